"""One platform fallback run for real: platform_fallback.py FACILITY (for test_platform.py).

Run with ``PARALLELKIT_PORTABLE=FACILITY`` (or ``=1``), so that this process and every
child it starts, whatever the start method, use the fallback.  Exercises what the
facility serves, under every start method where it matters, and prints one JSON line of
what it saw; any failure is a traceback and a non-zero exit.
"""

from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing
import os
import sys
import time
from typing import Any

import parallelkit as pk
from parallelkit import _platform
from parallelkit._observe.stalls import dump_stack
from parallelkit._wire import shm as _shm
from tasks import basic as wb
from tasks import channel as wc
from tasks import logs as wl
from tasks import queue as wq

METHODS: tuple[pk.StartMethod, ...] = ("fork", "forkserver", "spawn")


def emit(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def maps() -> dict[str, Any]:
    """A map, a pool's progress slots and a channel child's stack dump, per start method."""
    seen: dict[str, Any] = {}
    for method in METHODS:
        squares = pk.run_parallel(wb.square, range(50), max_workers=2, start_method=method)
        with pk.start_process(wc.echo, start_method=method) as child:
            assert child.request("started", timeout=30) == "started"
            stack, note = dump_stack(child.pid)
        seen[method] = {
            "squares": squares == [x * x for x in range(50)],
            "stack": "in echo" in stack,
            "note": note,
        }
    return seen


def memfd() -> dict[str, Any]:
    fd = _platform.anonymous_file("parallelkit-probe")
    try:
        info = os.fstat(fd)
        target = os.readlink(f"/proc/self/fd/{fd}")
        cloexec = bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
    finally:
        os.close(fd)
    queue: pk.Queue[int] = pk.Queue(start_method="spawn")  # its state is an anonymous file
    producer = multiprocessing.get_context("spawn").Process(target=wq.produce, args=(queue, 0, 5))
    producer.start()  # (the producer closes the queue)
    from_queue = [queue.get(timeout=30) for _ in range(5)]
    producer.join(30)
    return {
        "links": info.st_nlink,
        "target": target,
        "cloexec": cloexec,
        "maps": maps(),
        "queue": from_queue,
    }


def dev_shm() -> dict[str, Any]:
    with pk.SharedCounter() as counter:
        counter.add(2)
        path = _shm.SHM_DIR / counter.name
        exists = path.exists()
        added = [
            pk.run_parallel(wb.identity, [0], start_method=method) and counter.value
            for method in METHODS
        ]
    mode = os.stat(_platform.SEGMENT_DIR).st_mode & 0o777
    return {
        "dir": str(_platform.SEGMENT_DIR),
        "mode": mode,
        "exists": exists,
        "gone": not path.exists(),
        "added": added,
        "maps": maps(),
    }


def fallocate() -> dict[str, Any]:
    size = 3 << 20
    segment = _shm.Segment.create(size)
    try:
        info = os.stat(_shm.SHM_DIR / segment.name)
    finally:
        segment.close()
    return {"size": info.st_size, "allocated": info.st_blocks * 512}


def affinity() -> dict[str, Any]:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # as `taskset -c N` would
    return {"usable": pk.usable_cpu_count(), "cpu_count": os.cpu_count()}


def seqpacket() -> dict[str, Any]:
    """Log records of 60,000 characters from a map, a pipeline and a channel's process
    (one each way SIGKILLed right after logging), per start method: what arrived."""

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record.getMessage())

    got: list[str] = []
    logger = logging.getLogger(wl.logger.name)
    logger.setLevel(logging.INFO)
    logger.addHandler(Keep())
    seen: dict[str, Any] = {}
    for method in METHODS:
        got.clear()
        pk.run_parallel(wl.log_big, range(3), max_workers=2, start_method=method)
        pk.Pipeline([3], start_method=method).map(wl.log_big).run()
        try:
            pk.run_parallel(wl.log_big_then_sigkill, [4], start_method=method)
        except pk.WorkerCrashedError:
            pass
        with pk.start_process(wl.log_big_server, start_method=method) as child:
            child.request("x", timeout=30)
        want = [f"big {x} {wl.big_text(x, 60_000)}" for x in range(5)]
        want.append(f"server got x {wl.big_text(7, 60_000)}")
        seen[method] = sorted(got) == sorted(want)
    a, b = _platform.record_socketpair()
    with a, b:
        return {"logs": seen, "type": int(a.type)}


def pdeathsig() -> None:
    """Start a pool under ``sys.argv[2]``, print its workers' pids, wait to be killed."""
    method: Any = sys.argv[2]
    with pk.WorkerPool(2, start_method=method) as pool:
        pids = sorted(set(pool.map(wb.slow_pid, range(8))))
        emit(pids=pids)
        time.sleep(120)  # SIGKILLed by the test long before


def main() -> None:
    facility = sys.argv[1]
    forced = sorted(_platform.FORCED)
    if facility == "pdeathsig":
        pdeathsig()
        return
    scenario = {
        "memfd": memfd,
        "dev_shm": dev_shm,
        "fallocate": fallocate,
        "affinity": affinity,
        "seqpacket": seqpacket,
    }
    seen = scenario[facility]() if facility in scenario else {"maps": maps()}
    emit(forced=forced, offered=getattr(_platform.OFFERS, facility), **seen)


if __name__ == "__main__":
    main()
