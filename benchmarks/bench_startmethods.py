"""One call under each start method, interleaved in one process: the ratios between them.

``bench_map.py`` runs one start method per process, so it cannot say how forkserver compares
with fork under the same load.  This script runs ``run_parallel`` (one-shot) and
``multiprocessing.Pool.map`` (one-shot: create, map, close, join) under every start method
asked for, each (contender, start method) once per round in an order rotated every round,
and prints medians and *paired* ratios (the median over rounds of the ratio of two samples of
the same round)::

    python benchmarks/bench_startmethods.py --workloads arrays,tiny,cpu --rounds 9

As in ``bench_map.py``, the forkserver is started first, the way parallelkit starts it (before
numpy is imported: the arrays are made later, inside a function), so every contender shares
it.  The workloads are ``bench_map.py``'s: ``tiny`` (200,000 ints, ``x*x``), ``cpu`` (16 tasks
of about 0.1 s) and ``arrays`` (32 float64 arrays of 8 MB, ``float(a.sum())``).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _workload(name: str, args: argparse.Namespace) -> tuple[Callable[[Any], Any], list[Any]]:
    from benchmarks import tasks

    if name == "arrays":
        import numpy as np

        rng = np.random.default_rng(0)
        return tasks.array_sum, [rng.random(args.elements) for _ in range(args.arrays)]
    if name == "tiny":
        return tasks.square, list(range(args.items))
    if name == "cpu":
        loops, t = 10_000, 0.0
        while t < 0.02:
            loops *= 2
            t0 = time.perf_counter()
            tasks.burn(loops)
            t = time.perf_counter() - t0
        return tasks.burn, [int(loops * args.task_seconds / t)] * args.tasks
    raise SystemExit(f"unknown workload {name!r}")


def _paired(
    samples: dict[tuple[str, str], list[float]], this: tuple[str, str], other: tuple[str, str]
) -> str:
    """The median over rounds of this sample / the other's sample of the same round."""
    if other not in samples or other == this:
        return "—"
    ratios = [a / b for a, b in zip(samples[this], samples[other], strict=True)]
    return f"{statistics.median(ratios):.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="arrays,tiny,cpu")
    parser.add_argument("--start-methods", default="fork,forkserver,spawn")
    parser.add_argument("--contenders", default="run_parallel,Pool.map")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--arrays", type=int, default=32)
    parser.add_argument("--elements", type=int, default=1_000_000)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--task-seconds", type=float, default=0.1)
    args = parser.parse_args(argv)
    methods = args.start_methods.split(",")
    contenders = args.contenders.split(",")

    import parallelkit

    if "forkserver" in methods:
        from parallelkit._proc.forkserver import start_forkserver

        start_forkserver()

    def run(contender: str, method: Any, fn: Callable[[Any], Any], items: list[Any]) -> float:
        gc.collect()
        t0 = time.perf_counter()
        out: list[Any]
        if contender == "run_parallel":
            out = parallelkit.run_parallel(fn, items, max_workers=args.workers, start_method=method)
        else:
            pool = multiprocessing.get_context(method).Pool(args.workers)
            out = pool.map(fn, items)
            pool.close()
            pool.join()
        elapsed = time.perf_counter() - t0
        assert len(out) == len(items)
        return elapsed

    print(
        f"# bench_startmethods: {args.workers} workers, {args.rounds} rounds, "
        f"load at start {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    for wl in args.workloads.split(","):
        fn, items = _workload(wl, args)
        keys = [(c, m) for c in contenders for m in methods]
        samples: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
        for k in keys:  # warm-up: the server's imports, caches
            run(*k, fn, items)
        for r in range(args.rounds):
            for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
                samples[k].append(run(*k, fn, items))
        print(f"\n## {wl} (load {os.getloadavg()[0]:.2f})")
        print(
            "| contender | start method | median ms | min-max ms | x same contender under fork "
            "| x Pool.map, same start method | x Pool.map under fork |"
        )
        print("|---|---|---|---|---|---|---|")
        for c, m in keys:
            s = samples[(c, m)]
            print(
                f"| {c} | {m} | {statistics.median(s) * 1e3:.1f} | "
                f"{min(s) * 1e3:.1f}-{max(s) * 1e3:.1f} | "
                f"{_paired(samples, (c, m), (c, 'fork'))} | "
                f"{_paired(samples, (c, m), ('Pool.map', m))} | "
                f"{_paired(samples, (c, m), ('Pool.map', 'fork'))} |"
            )
        del items
    print(f"\n# load at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
