"""Process targets for the Queue tests, importable by spawn and forkserver children."""

from __future__ import annotations

import fcntl
import os
import signal
from multiprocessing.connection import Connection
from threading import Barrier

import parallelkit as pk
from parallelkit._queue.state import COUNT_LOCK, READ_LOCK
from parallelkit._util import fuzz as _fuzz


def produce(q: pk.Queue[int], start: int, stop: int) -> None:
    q.put_many(range(start, stop))
    q.close()


def produce_one_by_one(q: pk.Queue[int], start: int, stop: int) -> None:
    for i in range(start, stop):
        q.put(i)
    q.close()


def consume(q: pk.Queue[int], results: pk.Queue[list[int]]) -> None:
    results.put(list(q))
    results.close()


def take_one(q: pk.Queue[int], out: Connection) -> None:
    """Take one item and stop (a consumer that needed only one)."""
    out.send(q.get(timeout=30))
    out.close()


def take_one_then_all(q: pk.Queue[int], barrier: Barrier, out: Connection) -> None:
    """Take one item, wait until the other consumer took one too, then take until the end."""
    got = [q.get(timeout=30)]
    barrier.wait(30)
    while True:
        try:
            got.append(q.get(timeout=30))
        except pk.QueueClosedError:
            break
    out.send(got)
    out.close()


def announce_then_get(q: pk.Queue[int], ready: Connection) -> None:
    """Say we are about to wait in ``get`` (the test kills us there)."""
    ready.send("waiting")
    q.get()


def announce_then_put(q: pk.Queue[int], ready: Connection, item: int) -> None:
    """Say we are about to wait for room in ``put`` (the test kills us there)."""
    ready.send("waiting")
    q.put(item)


def die_at(point: str) -> None:
    """SIGKILL this process when it reaches fuzz point ``point``."""

    def stop_here(name: str) -> None:
        if name == point:
            os.kill(os.getpid(), signal.SIGKILL)

    setattr(_fuzz, "ENABLED", True)  # noqa: B010 - a Final constant, switched on for this child
    setattr(_fuzz, "point", stop_here)  # noqa: B010


def take_dying_at(q: pk.Queue[int], point: str, max_items: int) -> None:
    """Take up to ``max_items`` items, but be SIGKILLed at fuzz point ``point`` on the way."""
    die_at(point)
    q.get_many(max_items, timeout=30)
    raise AssertionError(f"never reached {point}")


def put_dying_at(q: pk.Queue[int], point: str, item: int) -> None:
    """Put ``item``, but be SIGKILLed at fuzz point ``point`` on the way."""
    die_at(point)
    q.put(item, timeout=30)
    raise AssertionError(f"never reached {point}")


def hold_read_then_wait_for_count(fd: int, ready: Connection) -> None:
    """Take the queue's read lock, say so, then wait for its counters' lock (in a cycle
    with the test's process, which holds the latter and asks for the former)."""
    fcntl.lockf(fd, fcntl.LOCK_EX, 1, READ_LOCK)
    ready.send("holding")
    fcntl.lockf(fd, fcntl.LOCK_EX, 1, COUNT_LOCK)  # blocks until the test releases it
    fcntl.lockf(fd, fcntl.LOCK_UN, 1, COUNT_LOCK)
    fcntl.lockf(fd, fcntl.LOCK_UN, 1, READ_LOCK)
