"""Task functions for the scheduled-task tests (tests/test_schedule.py), importable by workers.

A test learns that a task runs, or lets it return, through FIFOs: opening one blocks until
the other side opens it, so neither side polls.
"""

from __future__ import annotations

import os
import signal
import time

INITIALIZED = False  # set by the pool's initializer in each worker


def initialize() -> None:
    global INITIALIZED
    INITIALIZED = True


def worker_info() -> tuple[int, bool]:
    """This worker's pid, and whether the pool's initializer ran in it."""
    return os.getpid(), INITIALIZED


def announce(fifo: str) -> None:
    """Tell the test (reading ``fifo``) that this task runs, in which worker."""
    with open(fifo, "w") as f:
        f.write(f"{os.getpid()}\n")


def wait_for(fifo: str) -> str:
    """Block until the test writes to ``fifo``; what it wrote."""
    with open(fifo) as f:
        return f.read()


def run_until_stopped(started: str, *unused: object) -> int:
    """Announce, then run far longer than any test (until the worker is stopped)."""
    announce(started)
    time.sleep(600)
    return os.getpid()


def ignore_sigterm_and_run(started: str) -> int:
    """As :func:`run_until_stopped`, deaf to SIGTERM: only SIGKILL stops it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    announce(started)
    time.sleep(600)
    return os.getpid()


def announce_then_return(started: str, go: str) -> int:
    """Announce, wait until the test says go, then return this worker's pid."""
    announce(started)
    wait_for(go)
    return os.getpid()


def leave_mark(path: str) -> int:
    """Create ``path`` (so that the test sees whether the task ran); the worker's pid."""
    with open(path, "w"):
        pass
    return os.getpid()


def nap(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


def keywords(a: int, *, b: int = 0, timeout: float = 0.0) -> tuple[int, int, float]:
    """Takes a parameter named ``timeout``: schedule() passes it on (in ``kwargs``)."""
    return a, b, timeout
