"""Independent processes for the shared-memory lifecycle tests: shared_segments.py MODE ...

Modes (each prints what it saw as one JSON line, or ``NAME <name>``):

- ``attach HEX``: unpickle a shared object from hex, add 5 to it, start this process's
  own multiprocessing resource tracker (as any program using multiprocessing would),
  and exit normally.  An attach that registered the segment with that tracker would get
  it unlinked at exit (CPython gh-82300).
- ``attach-stdlib NAME``: the same, the standard library's way:
  ``SharedMemory(NAME)``; the control that shows the trap is real here.
- ``create``: create a ``SharedCounter``, add 7, print ``NAME <name> <tracker pid>``
  and sleep until killed.
- ``no-room``: meant to run with a tiny ``/dev/shm`` (the segment directory: see
  ``parallelkit._platform``): try to create a 4 MiB segment (the
  low-level way, and as a ``SharedArray`` when numpy is installed) and report the error
  and what is left there; a ``SharedCounter`` (16 KiB) must still work.
- ``no-room-fallocate``: the same, with the free-space check before creation off, so that
  reserving the pages (``posix_fallocate``, or writing zeros in portable mode) is what
  fails.
- ``sigbus``: the standard library's way on a tiny ``/dev/shm``: creating a 4 MiB
  ``SharedMemory`` succeeds, and writing it kills this process with SIGBUS.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
from multiprocessing import resource_tracker, shared_memory

import parallelkit as pk
from parallelkit import _platform
from parallelkit._wire import shm as _shm

FOUR_MIB = 4 << 20


def emit(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def attach(blob: str) -> None:
    shared = pickle.loads(bytes.fromhex(blob))
    shared.add(5)
    resource_tracker.ensure_running()
    emit(value=shared.value, tracker_pid=resource_tracker._resource_tracker._pid)  # type: ignore[attr-defined]


def attach_stdlib(name: str) -> None:
    block = shared_memory.SharedMemory(name)
    assert block.buf is not None
    block.buf[0] = 5
    block.close()
    emit(attached=name)


def create() -> None:
    counter = pk.SharedCounter()
    counter.add(7)
    resource_tracker.ensure_running()  # started already, except in portable mode
    tracker = resource_tracker._resource_tracker._pid  # type: ignore[attr-defined]
    sys.stdout.write(f"NAME {counter.name} {tracker}\n")
    sys.stdout.flush()
    time.sleep(60)  # killed long before


def no_room() -> None:
    errors = []
    try:
        _shm.Segment.create(FOUR_MIB)
    except OSError as exc:
        errors.append({"what": "segment", "errno": exc.errno, "message": str(exc)})
    try:
        import numpy  # noqa: F401
    except ImportError:
        pass
    else:
        try:
            pk.SharedArray.zeros(FOUR_MIB // 8)
        except OSError as exc:
            errors.append({"what": "array", "errno": exc.errno, "message": str(exc)})
    left = sorted(os.listdir(_platform.SEGMENT_DIR))
    with pk.SharedCounter() as counter:
        counter.add(3)
        small = counter.value
    emit(errors=errors, left=left, small=small, after=sorted(os.listdir(_platform.SEGMENT_DIR)))


def sigbus() -> None:
    block = shared_memory.SharedMemory(create=True, size=FOUR_MIB)
    emit(created=block.name)
    assert block.buf is not None
    block.buf[:] = b"x" * FOUR_MIB  # SIGBUS: the pages cannot be backed
    emit(wrote=True)


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "attach":
        attach(args[0])
    elif mode == "attach-stdlib":
        attach_stdlib(args[0])
    elif mode == "create":
        create()
    elif mode == "no-room":
        no_room()
    elif mode == "no-room-fallocate":
        _shm._free_bytes = lambda: None  # as if statvfs said nothing: fallocate finds out
        no_room()
    elif mode == "sigbus":
        sigbus()
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
