"""Each worker writes its own output file: per-worker state, worker identity, clean exit.

A task appends its result to a file that belongs to its worker: opened once per worker (a
``WorkerLocal``), named after the worker's index (``worker_info()``), closed when the
worker stops (the ``WorkerLocal``'s ``close``). Workers are recycled every 250 items, so a
replacement (same index, new pid) opens a file of its own. The parent then reads the
shards back.  Run it with ``python examples/worker_shards.py [N] [START_METHOD]``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import TextIO

import parallelkit as pk

_directory = ""  # set in each worker by the initializer


def set_directory(directory: str) -> None:
    global _directory
    _directory = directory


def open_shard() -> TextIO:
    info = pk.worker_info()
    assert info is not None, "only tasks run by workers write shards"
    return open(Path(_directory) / f"shard-{info.index}-{info.pid}.txt", "w")


shard = pk.WorkerLocal(open_shard, close=lambda f: f.close())


def work(x: int) -> int:
    y = x * x
    shard.get().write(f"{x} {y}\n")
    return y


def main(n: int, start_method: pk.StartMethod | None) -> None:
    with tempfile.TemporaryDirectory() as directory:
        results = pk.run_parallel(
            work,
            range(n),
            max_workers=2,
            chunksize=50,
            start_method=start_method,
            initializer=set_directory,
            initargs=(directory,),
            max_tasks_per_worker=250,
        )
        shards = {path.name: path.read_text().splitlines() for path in Path(directory).iterdir()}
    lines = [line for shard_lines in shards.values() for line in shard_lines]
    indices = sorted({int(name.split("-")[1]) for name in shards})
    print(f"{len(lines)} lines from workers {indices}")
    print(f"at most 250 per shard: {max(len(s) for s in shards.values()) <= 250}")
    print(
        f"same as the results: {sorted(int(line.split()[1]) for line in lines) == sorted(results)}"
    )


if __name__ == "__main__":
    method = sys.argv[2] if len(sys.argv) > 2 else None
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000, method)  # type: ignore[arg-type]
