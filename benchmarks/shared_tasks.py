"""Task functions and process targets for ``bench_shared.py``.

Module-level so that every start method and every peer can send them by reference.  numpy
and parallelkit are imported inside the functions that need them (or arrive with an
unpickled argument), so importing this module costs nothing.
"""

from __future__ import annotations

import time
from typing import Any

# ------------------------------------------------------------------ counting


def count_locked_value(value: Any, n: int, out: Any) -> None:
    """The idiomatic exact way: ``with v.get_lock(): v.value += 1``."""
    lock = value.get_lock()
    t0 = time.perf_counter()
    for _ in range(n):
        with lock:
            value.value += 1
    out.put(time.perf_counter() - t0)


def count_shared_counter(counter: Any, n: int, out: Any) -> None:
    """``counter.add(1)`` on a ``parallelkit.SharedCounter``."""
    add = counter.add
    t0 = time.perf_counter()
    for _ in range(n):
        add(1)
    out.put(time.perf_counter() - t0)


def count_locally(value: Any, n: int, out: Any) -> None:
    """The ceiling: count in a local variable, then merge once under the lock."""
    t0 = time.perf_counter()
    local = 0
    for _ in range(n):
        local += 1
    with value.get_lock():
        value.value += local
    out.put(time.perf_counter() - t0)


# ------------------------------------------------------------------ summing slices


def _bounds(length: int, index: int, parts: int) -> tuple[int, int]:
    return length * index // parts, length * (index + 1) // parts


def sum_shared_array(item: tuple[Any, int, int]) -> float:
    """Sum slice ``index`` of ``parts`` of a ``parallelkit.SharedArray``."""
    shared, index, parts = item
    array = shared.array
    start, stop = _bounds(len(array), index, parts)
    return float(array[start:stop].sum())


def sum_shared_memory(item: tuple[str, int, str, int, int]) -> float:
    """The same on a hand-made ``SharedMemory`` block, attached by name."""
    from multiprocessing import shared_memory

    import numpy as np

    name, length, dtype, index, parts = item
    block = shared_memory.SharedMemory(name)
    try:
        array = np.ndarray((length,), dtype=dtype, buffer=block.buf)
        start, stop = _bounds(length, index, parts)
        total = float(array[start:stop].sum())
        del array
    finally:
        block.close()
    return total


def sum_array(array: Any) -> float:
    """Sum an array that arrived as an argument (a slice, pickled or memmapped)."""
    return float(array.sum())


def sum_array_slice(array: Any, index: int, parts: int) -> float:
    """Sum slice ``index`` of a whole array that arrived as an argument (joblib memmaps it)."""
    start, stop = _bounds(len(array), index, parts)
    return float(array[start:stop].sum())
