"""Task functions for the benchmarks, in their own small module.

Module-level and importable by name, so every start method (and every peer library) can send
them to workers by reference.  Nothing is imported at the top: a spawn or forkserver child
that unpickles a task pays for nothing but this module (numpy is imported by the array tasks
when they first run, and only there).
"""

from __future__ import annotations

from typing import Any

_SEGMENTS: dict[str, Any] = {}  # worker side: shared-memory segments attached, by name


def square(x: int) -> int:
    """The tiny-item task: almost no work, so only the per-item overhead shows."""
    return x * x


def burn(loops: int) -> int:
    """The CPU-bound task: a pure-Python loop (holds the GIL), ``loops`` iterations."""
    acc = 0
    for i in range(loops):
        acc = (acc + i * i) & 0xFFFFFFFF
    return acc


def array_sum(a: Any) -> float:
    """The large-arguments task: an 8 MB array in, one float out."""
    return float(a.sum())


def make_array(spec: tuple[int, int]) -> Any:
    """The large-results task: ``(i, n)`` in, ``arange(n) + i`` (float64) out."""
    import numpy as np

    i, n = spec
    out = np.arange(n, dtype=np.float64)
    out += i
    return out


def scale_add(a: Any) -> Any:
    """The memory-bound task: an 8 MB array in, ``1.5 a + a`` (a new 8 MB array) out."""
    out = a * 1.5
    out += a
    return out


def shm_sum(spec: tuple[str, int, int, int]) -> float:
    """``array_sum`` of row ``i`` of a ``(rows, n)`` float64 array in the segment ``name``.

    The hand-written reference for large arguments: the data is already in shared memory
    and a task carries only its coordinates.  A worker attaches each segment once.
    """
    import numpy as np

    name, i, rows, n = spec
    view = _SEGMENTS.get(name)
    if view is None:
        from multiprocessing import shared_memory

        segment = shared_memory.SharedMemory(name=name)
        view = (segment, np.ndarray((rows, n), dtype=np.float64, buffer=segment.buf))
        _SEGMENTS[name] = view
    return float(view[1][i].sum())


def map_chunk(fn: Any, chunk: list[Any]) -> list[Any]:
    """One hand-made chunk task (``bench_backends.py``'s ``client.map`` baseline)."""
    return [fn(x) for x in chunk]


def run_one(fn: Any, x: Any, conn: Any) -> None:
    """The body of one bare ``multiprocessing.Process``: ``fn(x)``, sent back on ``conn``."""
    conn.send(fn(x))
    conn.close()


def mul(a: int, b: int) -> int:
    """The tiny task of two arguments (``bench_args.py``): ``pk.star(mul)``, ``starmap``."""
    return a * b


def mul_pair(pair: tuple[int, int]) -> int:
    """``mul`` of one tuple item, unpacked by the function itself (the plain-map reference)."""
    return pair[0] * pair[1]


def mul_record(record: dict[str, int]) -> int:
    """``mul`` of one dict item, read by the function itself (the plain-map reference)."""
    return record["a"] * record["b"]


def power(x: int, exp: int) -> int:
    """The tiny task with an argument shared by every call: ``pk.with_args(power, 2)``."""
    return int(x**exp)


def mul_kwargs(record: dict[str, int]) -> int:
    """What one writes without ``pk.star_kwargs``: a wrapper that unpacks the dict."""
    return mul(**record)


def fill_queue(queue: Any, n: int) -> None:
    """A producer for ``bench_platform.py``: ``0 .. n-1`` into a ``parallelkit.Queue``."""
    queue.put_many(range(n))
    queue.close()


def tile_scale(item: tuple[int, int, Any]) -> tuple[int, int, Any]:
    """The tiles task: ``(y, x, tile)`` in (the tile a view of a larger image, often not
    contiguous), ``(y, x, tile * 0.5)`` out (a new array), for the caller to place."""
    y, x, tile = item
    return y, x, tile * 0.5


def log_item(spec: tuple[int, int]) -> int:
    """Log one WARNING of ``spec[1]`` characters for item ``spec[0]``."""
    import logging

    logging.getLogger("benchmarks.tasks").warning("item %d %s", spec[0], "x" * spec[1])
    return spec[0]
