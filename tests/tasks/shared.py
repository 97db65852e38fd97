"""Task functions and process targets for ``test_shared.py``.

At module level in their own module so that spawn and forkserver children import them by
name.  Every shared object arrives as an argument (pickled by reference, or inherited
under fork) and is used as a user would use it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import resource
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from parallelkit import SharedAccumulator, SharedArray, SharedCounter, _platform
from parallelkit._shared import counters as _counters
from parallelkit._shared.counters import _locked

Accumulator = SharedAccumulator[int] | SharedAccumulator[float]


def add_values(item: tuple[Accumulator, Sequence[float]]) -> int:
    """A task: add every value of a share to the accumulator; returns this pid."""
    acc, values = item
    for value in values:
        acc.add(value)  # type: ignore[arg-type]  # int values for int accumulators
    return os.getpid()


def add_values_target(acc: Accumulator, values: Sequence[float]) -> None:
    """A ``multiprocessing.Process`` target doing what :func:`add_values` does."""
    add_values((acc, values))


def count(item: tuple[SharedCounter, int]) -> int:
    counter, n = item
    for _ in range(n):
        counter.add()
    return n


def _count_together(barrier: threading.Barrier, counter: SharedCounter, n: int) -> None:
    barrier.wait(30)  # every thread is alive before any adds: each needs a slot
    count((counter, n))


def count_in_threads(item: tuple[SharedCounter, int, int]) -> int:
    """``threads`` threads in this process, all alive together, each adding 1 ``n`` times."""
    counter, threads, n = item
    barrier = threading.Barrier(threads)
    workers = [
        threading.Thread(target=_count_together, args=(barrier, counter, n)) for _ in range(threads)
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return threads * n


def slots_of(counter: SharedCounter | Accumulator, pid: int) -> int:
    """How many slots of the object's segment ``pid`` owns."""
    words = counter._words
    return sum(
        1
        for slot in range(1, words[_counters.W_HWM])
        if words[_counters._base(slot) + _counters.S_PID] == pid
    )


def _add_racily(cell: memoryview[int], n: int, between: threading.Barrier) -> None:
    """The control: an add that the other threads interrupt between its read and its
    write, every time (they all read, then they all write): ``n`` adds in all, whatever
    the number of threads."""
    for _ in range(n):
        seen = cell[0]
        between.wait(30)
        cell[0] = seen + 1
        between.wait(30)


def add_in_switching_threads(
    item: tuple[SharedCounter | Accumulator | memoryview[int], int, int],
) -> tuple[int, int]:
    """``threads`` threads, alive together, each ``writer.add(1)`` ``n`` times, with the
    interpreter switching threads as often as it can (every microsecond), so that an add
    that can be interrupted between its read and its write loses updates.  A memoryview
    of one int64 is the control: :func:`_add_racily` on it.  Returns ``(adds, slots this
    process owns)``."""
    writer, threads, n = item
    barrier = threading.Barrier(threads)

    def target() -> None:
        barrier.wait(30)  # every thread is alive before any adds
        if isinstance(writer, memoryview):
            _add_racily(writer, n, barrier)
        else:
            for _ in range(n):
                writer.add(1)

    workers = [threading.Thread(target=target) for _ in range(threads)]
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    finally:
        sys.setswitchinterval(before)
    slots = 0 if isinstance(writer, memoryview) else slots_of(writer, os.getpid())
    return threads * n, slots


def count_alive_together(counter: SharedCounter, barrier: Any, n: int) -> None:
    """A process target: wait for the others, add 1 ``n`` times, wait again before exiting
    (so that every writer claims its slot while the others are alive: none is taken over)."""
    barrier.wait(30)
    count((counter, n))
    barrier.wait(30)


def add_forever(counter: SharedCounter, step: int) -> None:
    """Add ``step`` in a tight loop until killed."""
    while True:
        counter.add(step)


def hold_the_claim_lock(counter: SharedCounter, conn: Connection) -> None:
    """Take the lock a first ``add`` claims its slot under, say so, and wait to be killed."""
    with _locked(counter._segment, "SharedCounter"):
        conn.send("locked")
        time.sleep(60)


def add_each(item: tuple[SharedCounter, Sequence[object]]) -> None:
    """A task: add each of ``values`` to the counter, in this one writer."""
    counter, values = item
    for value in values:
        counter.add(value)  # type: ignore[arg-type]  # wrong types on purpose


def open_fds() -> set[int]:
    """This process's open file descriptors."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:  # the descriptor listdir used, closed by now
            continue
        fds.add(int(name))
    return fds


def descriptors_of(counters: Sequence[SharedCounter]) -> list[int]:
    """How many of this process's descriptors are open on each counter's segment."""
    targets: list[str] = []
    for fd in open_fds():
        with contextlib.suppress(OSError):
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    return [targets.count(f"{_platform.SEGMENT_DIR}/{counter.name}") for counter in counters]


def descriptors_after_adding(counters: Sequence[SharedCounter]) -> list[int]:
    """A task: add to each counter received (a slot claim each), then count as above."""
    for counter in counters:
        counter.add()
    return descriptors_of(counters)


def limit_leaving(spare: int) -> int:
    """The RLIMIT_NOFILE soft limit under which exactly ``spare`` more descriptors fit."""
    taken = open_fds()
    limit = free = 0
    while free < spare or limit in taken:
        if limit not in taken:
            free += 1
        limit += 1
    return limit


def attach_with_no_descriptor_left(payload: bytes, conn: Connection) -> None:
    """Receive a pickled counter with no descriptor to spare; send back what was raised."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit_leaving(0), hard))
    try:
        pickle.loads(payload)
    except OSError as exc:
        outcome = (exc.errno, str(exc))
    else:
        outcome = (0, "attached")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    conn.send(outcome)


def write_rows(item: tuple[SharedArray, int, int]) -> int:
    """Fill rows ``start:stop`` of a shared 2-d array with their row number."""
    shared, start, stop = item
    array = shared.array
    for row in range(start, stop):
        array[row, :] = row
    return stop - start


def write_rows_target(shared: SharedArray, start: int, stop: int) -> None:
    write_rows((shared, start, stop))


def array_sum(shared: SharedArray) -> float:
    return float(shared.array.sum())


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
