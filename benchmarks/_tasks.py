"""Task functions for the benchmarks here: the package's (``parallelkit._bench.tasks``),
importable by name in every worker, and one for the Dask benchmark.
"""

from __future__ import annotations

from parallelkit._bench.tasks import burn, square

__all__ = ["burn", "map_chunk", "square"]


def map_chunk(fn: object, chunk: list[int]) -> list[object]:
    """One hand-made chunk task (the Dask benchmark's ``client.map`` baseline)."""
    return [fn(x) for x in chunk]  # type: ignore[operator]
