"""Task functions for the benchmarks, in their own small module.

Module-level and importable by name, so every start method (and every peer library) can send
them to workers by reference.  This module imports nothing: a spawn or forkserver child that
unpickles a task pays for nothing but the function itself.
"""

from __future__ import annotations


def square(x: int) -> int:
    """The tiny-item task: almost no work, so only the per-item overhead shows."""
    return x * x


def burn(loops: int) -> int:
    """The CPU-bound task: a pure-Python loop (holds the GIL), ``loops`` iterations."""
    acc = 0
    for i in range(loops):
        acc = (acc + i * i) & 0xFFFFFFFF
    return acc


def map_chunk(fn: object, chunk: list[int]) -> list[object]:
    """One hand-made chunk task (the Dask benchmark's ``client.map`` baseline)."""
    return [fn(x) for x in chunk]  # type: ignore[operator]
