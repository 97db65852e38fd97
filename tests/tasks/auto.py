"""Task functions for the ``backend="auto"`` tests, at module level so spawn and forkserver
can import them."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

SPIN_SECONDS = 0.03  # each spin item holds the GIL this long (wall time)
NAP_SECONDS = 0.05  # each nap item sleeps this long


def square(x: int) -> int:
    return x * x


def spin(x: int) -> tuple[int, int]:
    """Pure Python, holding the GIL, for SPIN_SECONDS of wall time; (x, pid)."""
    end = time.perf_counter() + SPIN_SECONDS
    while time.perf_counter() < end:
        pass
    return x, os.getpid()


def spin_locked(item: tuple[threading.Lock, int]) -> int:
    """``spin`` on an item that cannot be pickled (it holds a lock)."""
    lock, x = item
    with lock:
        pass
    spin(x)
    return x


def nap(x: int) -> tuple[int, int, str]:
    """Sleeps NAP_SECONDS (the GIL is free meanwhile); (x, pid, thread name)."""
    time.sleep(NAP_SECONDS)
    return x, os.getpid(), threading.current_thread().name


class Sleepy:
    """Pickling it sleeps ``seconds`` (a thread that waits, using no CPU)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __reduce__(self) -> tuple[type[Sleepy], tuple[float]]:
        time.sleep(self.seconds)
        return Sleepy, (self.seconds,)


def doze(x: int) -> int:
    """Sleeps 2 ms (the GIL is free meanwhile); x."""
    time.sleep(0.002)
    return x


def fail_at(x: int) -> int:
    """Raises ValueError on 3 (and on every multiple of 1000 from 1000 on)."""
    if x == 3 or (x and x % 1000 == 0):
        raise ValueError(f"bad item {x}")
    return x * x


def where(_: object) -> tuple[int, str]:
    return os.getpid(), threading.current_thread().name


STATE: dict[str, Any] = {}


def remember(value: object) -> None:
    """An initializer: the worker remembers ``value``."""
    STATE["value"] = value


def recall(_: object) -> object:
    return STATE.get("value")


class Box:
    """A result that can be watched with a weakref."""

    def __init__(self, x: int) -> None:
        self.x = x


def box(x: int) -> Box:
    return Box(x)
