"""Worker functions for tests/test_progress.py (importable under spawn and forkserver)."""

from __future__ import annotations

import time

HANG_AT = 5  # the item that hangs


def square(x: int) -> int:
    return x * x


def slow_square(x: int) -> int:
    time.sleep(0.002)
    return x * x


def sleep_at_five(x: int) -> int:
    """Item 5 blocks in ``time.sleep`` (a C call) for a while; the rest are quick."""
    if x == HANG_AT:
        time.sleep(1.5)
    return x


def spin_in_python(seconds: float) -> float:
    """Spins in a pure-Python loop that never blocks."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return seconds


def spin_at_five(x: int) -> int:
    if x == HANG_AT:
        spin_in_python(1.5)
    return x


def fail_at_five(x: int) -> int:
    if x == HANG_AT:
        raise ValueError("five")
    return x
