"""A parent in the middle of a map with large arguments and results: arena_parent_death.py METHOD

Prints ``SEGMENTS <worker pids>`` once the arena and the workers' result segments exist,
then blocks in the map until the test SIGKILLs it.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

import parallelkit as pk


def slow_echo(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    if a[0] >= 4:
        time.sleep(60)
    return a


def main() -> None:
    pool = pk.WorkerPool(2, start_method=sys.argv[1])  # type: ignore[arg-type]
    arrays = [np.full(100_000, i, dtype=np.float64) for i in range(8)]
    results = pool.imap(slow_echo, arrays, chunksize=1)
    for i in range(4):
        assert float(next(results)[0]) == i
    pids = " ".join(str(w.pid) for w in pool._engine.workers)
    print("SEGMENTS", pids, flush=True)
    for _ in results:  # blocks: items 4.. sleep
        pass


if __name__ == "__main__":
    main()
