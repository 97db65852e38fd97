"""Large results copied straight out of a worker's memory, when shared memory runs out.

Large results normally travel through the worker's shared-memory segments (:mod:`._arena`):
zero copy in the parent, and the cost of fresh pages spread over the workers.  When
``/dev/shm`` has no room left (Docker gives it 64 MiB by default), a result used to fall
back to the pipe: pickled whole, copied three times.  Instead, where the kernel lets us
(Linux ``process_vm_readv``), the parent copies each large buffer once from the worker's
own memory into new private memory (huge pages asked for from 2 MiB)::

    worker: results pickled, large buffers left where they are (pickle protocol 5)
      ──▶ DIRECT reply: (address, size) of each buffer, then the pickle
    parent: new private buffers, process_vm_readv(worker pid) into them, then
      ──▶ ACK (ok, or "resend": the worker sends the same reply in band)
    worker: waits for the ACK before it runs anything else, holding the results as they
            are (a function that reuses a buffer it returned cannot change it under us)

Why not always: neither way was reliably faster for one-shot maps of large results (fresh
pages cost about the same wherever they are faulted in, and the parent faults these in
alone, where the segments are faulted in by every worker at once; see
``docs/performance.md``, "Why the thresholds"), and the parent's copy is serial: with many
workers it would become a bottleneck that zero copy is not.

The parent may read a process it started, or one its forkserver started (a descendant),
under Yama's default ``ptrace_scope=1``; where it may not (``ptrace_scope`` 2 or 3, a
seccomp filter, another kernel), the first refusal turns this off for the pool.  A chunk
whose arguments came through the arena never answers directly (its results may be views
of those arguments, which the arena must know about before it reuses them).
``PARALLELKIT_DIRECT_RESULTS=0`` turns this off.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Sequence
from typing import Any, Final

from parallelkit import _platform
from parallelkit._wire import layouts
from parallelkit._wire.codec import dump_apart, mark_large_bytes

_HEAD: Final = layouts.DIRECT_HEAD  # number of buffers
_SPEC: Final = layouts.DIRECT_SPEC  # address in the worker, size
HUGE_MIN: Final = 2 * 1024 * 1024  # buffers this large get their own huge-page mapping
_IOV_MAX: Final = 1024  # iovecs per call (Linux UIO_MAXIOV)
# the reader's answer to a DIRECT reply (the flags field of an ACK message)
ACK_OK: Final = 0
ACK_RESEND: Final = 1
# refusals that will not go away for this process: stop asking
_REFUSED: Final = frozenset({errno.EPERM, errno.EACCES, errno.ENOSYS})


def enabled() -> bool:
    """Whether a new pool lets its workers answer directly (Linux, not turned off).

    ctypes is loaded at the first such reply, not here: a map whose results fit in shared
    memory never pays for it; without ``process_vm_readv`` that first read is refused
    (``ENOSYS``) and the pool stops asking.
    """
    return _platform.OFFERS.process_vm and os.environ.get("PARALLELKIT_DIRECT_RESULTS", "1") != "0"


# ------------------------------------------------------------------ worker side
def _address_of() -> Any:
    """A function giving the address of a contiguous buffer's first byte (via ctypes)."""
    global _ADDRESS_OF
    if _ADDRESS_OF is None:
        import ctypes  # noqa: PLC0415 - only a worker with large results needs it

        class PyBuffer(ctypes.Structure):
            _fields_ = (
                ("buf", ctypes.c_void_p),
                ("obj", ctypes.c_void_p),
                ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t),
                ("readonly", ctypes.c_int),
                ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p),
                ("shape", ctypes.c_void_p),
                ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p),
                ("internal", ctypes.c_void_p),
            )

        api = ctypes.pythonapi
        get = api.PyObject_GetBuffer
        get.argtypes = (ctypes.py_object, ctypes.POINTER(PyBuffer), ctypes.c_int)
        get.restype = ctypes.c_int
        release = api.PyBuffer_Release
        release.argtypes = (ctypes.POINTER(PyBuffer),)
        release.restype = None

        def address_of(raw: memoryview) -> int:
            view = PyBuffer()
            if get(raw, ctypes.byref(view), 0) != 0:  # PyBUF_SIMPLE: contiguous bytes
                raise BufferError("no simple buffer")
            try:
                return int(view.buf or 0)
            finally:
                release(ctypes.byref(view))

        _ADDRESS_OF = address_of
    return _ADDRESS_OF


_ADDRESS_OF: Any = None


def dump(
    msg: tuple[Any, ...], results: list[Any], min_bytes: int
) -> tuple[bytes, list[memoryview]]:
    """Pickle ``msg`` (whose third field is ``results``); buffers of ``min_bytes`` or more
    are left out of the pickle and returned (views of the results' own memory).

    Raises:
        Exception: a result cannot be pickled, or ctypes is missing (the caller then
            answers the usual way).
    """
    address_of = _address_of()
    marked = mark_large_bytes(results, min_bytes)
    payload, raws = dump_apart((*msg[:2], marked, *msg[3:]), min_bytes)
    return frame(payload, [(address_of(raw), raw.nbytes) for raw in raws]), raws


def frame(payload: bytes, specs: Sequence[tuple[int, int]]) -> bytes:
    """A DIRECT reply: the head, each buffer's ``(address, size)``, then ``payload``."""
    head = bytearray(_HEAD.size + _SPEC.size * len(specs))
    _HEAD.pack_into(head, 0, len(specs))
    at = _HEAD.size
    for address, n in specs:
        _SPEC.pack_into(head, at, address, n)
        at += _SPEC.size
    head += payload
    return bytes(head)


# ------------------------------------------------------------------ parent side
class Unreadable(OSError):
    """The worker's memory could not be read; ``refused``: nor will it ever be."""

    def __init__(self, err: int, what: str) -> None:
        super().__init__(err, what)
        self.refused = err in _REFUSED


def parse(data: bytes | bytearray | memoryview) -> tuple[list[tuple[int, int]], memoryview]:
    """``(specs, pickle)`` of a DIRECT reply."""
    (count,) = _HEAD.unpack_from(data)
    at = _HEAD.size
    specs = []
    for _ in range(count):
        specs.append(_SPEC.unpack_from(data, at))
        at += _SPEC.size
    return specs, memoryview(data)[at:]


def new_buffer(n: int) -> mmap.mmap | bytearray:
    """``n`` bytes of new private memory (huge pages asked for when ``n`` is large)."""
    if n < HUGE_MIN:
        return bytearray(n)
    buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            buf.madvise(advice)
        except OSError:  # pragma: no cover - THP configured out: plain pages
            pass
    return buf


def read(pid: int, specs: Sequence[tuple[int, int]]) -> list[mmap.mmap | bytearray]:
    """Copy each ``(address, size)`` region of process ``pid`` into a new buffer.

    Raises:
        Unreadable: the kernel refused or the process is gone (nothing is returned).
    """
    call = _syscall()
    if call is None:
        raise Unreadable(errno.ENOSYS, "process_vm_readv is not available")
    readv, iovec, addressof_buffer = call
    buffers = [new_buffer(n) for _, n in specs]
    keep: list[Any] = []
    try:
        for first in range(0, len(specs), _IOV_MAX):
            part = range(first, min(first + _IOV_MAX, len(specs)))
            local = (iovec * len(part))()
            remote = (iovec * len(part))()
            want = 0
            for k, i in enumerate(part):
                address, n = specs[i]
                base = addressof_buffer(buffers[i], keep)
                local[k].base, local[k].len = base, n
                remote[k].base, remote[k].len = address, n
                want += n
            _read_all(readv, pid, local, remote, want)
    finally:
        keep.clear()  # the ctypes views of the buffers: they pin them while alive
    return buffers


def _read_all(readv: Any, pid: int, local: Any, remote: Any, want: int) -> None:
    import ctypes  # noqa: PLC0415 - loaded by _syscall already

    while True:
        got = readv(pid, local, len(local), remote, len(remote), 0)
        if got >= 0 or ctypes.get_errno() != errno.EINTR:
            break
    if got < 0:
        err = ctypes.get_errno()
        raise Unreadable(err, f"process_vm_readv from pid {pid}: {os.strerror(err)}")
    if got != want:  # it stops short only where the next region cannot be read
        raise Unreadable(errno.EFAULT, f"process_vm_readv from pid {pid} stopped short")


_SYSCALL: Any = None


def _syscall() -> Any:
    """``(process_vm_readv, iovec, address_of_buffer)``, or ``None`` where there is none."""
    global _SYSCALL
    if _SYSCALL is None and not _platform.OFFERS.process_vm:
        _SYSCALL = False
    if _SYSCALL is None:
        _SYSCALL = False
        try:
            import ctypes  # noqa: PLC0415 - the parent loads it once, on first use

            libc = ctypes.CDLL(None, use_errno=True)
            readv = libc.process_vm_readv
        except (ImportError, OSError, AttributeError):
            return None

        class Iovec(ctypes.Structure):
            _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))

        readv.restype = ctypes.c_ssize_t
        readv.argtypes = (
            ctypes.c_int,
            ctypes.POINTER(Iovec),
            ctypes.c_ulong,
            ctypes.POINTER(Iovec),
            ctypes.c_ulong,
            ctypes.c_ulong,
        )

        def address_of_buffer(buf: Any, keep: list[Any]) -> int:
            view = (ctypes.c_char * len(buf)).from_buffer(buf)
            keep.append(view)
            return ctypes.addressof(view)

        _SYSCALL = (readv, Iovec, address_of_buffer)
    return _SYSCALL or None
