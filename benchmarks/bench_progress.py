#!/usr/bin/env python3
"""What progress, statistics and stall checks cost: parallelkit with and without them.

One workload, every contender interleaved in one process (see ``harness.py``): ``--items``
tiny items (``x*x``, nothing but per-item overhead, where any per-item cost would show),
each contender one-shot (start the workers, map, stop them):

* ``Pool.map`` (the stdlib reference) and ``run_parallel`` with nothing watched;
* ``run_parallel(progress=callable)``: the count reported per chunk;
* ``run_parallel(progress=True)``: a real tqdm bar (drawn into /dev/null);
* ``run_parallel(stall_timeout=60, on_stats=...)``: the stall watcher and the statistics;
* tqdm's own ``process_map`` (a ``ProcessPoolExecutor`` under a bar), with the same chunk
  size, when tqdm is installed.

Usage::

    python benchmarks/bench_progress.py                  # fork, 200,000 items, 5 rounds
    python benchmarks/bench_progress.py --quick
    python benchmarks/bench_progress.py --start-method spawn --rounds 9
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Run as a file, this folder heads sys.path; the package imports from the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness as h
from benchmarks.settings import START_METHODS
from benchmarks.suite import reexec_with_bytecode_cache
from benchmarks.tasks import square

if TYPE_CHECKING:
    from parallelkit import StartMethod

WORKERS = 2


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """tqdm draws on stderr, where the harness logs: draw into /dev/null instead."""
    saved = sys.stderr
    with open(os.devnull, "w") as sink:
        sys.stderr = sink
        try:
            yield
        finally:
            sys.stderr = saved


def contenders(method: StartMethod, items: int) -> list[h.Contender[Any]]:
    import parallelkit as pk

    ctx = multiprocessing.get_context(method)
    chunksize = -(-items // (4 * WORKERS))  # what run_parallel picks for a known length

    def pool_map(_: None, fn: Callable[[Any], Any], xs: Sequence[Any]) -> list[Any]:
        with ctx.Pool(WORKERS) as pool:
            return pool.map(fn, xs)

    def plain(_: None, fn: Callable[[Any], Any], xs: Sequence[Any]) -> list[Any]:
        return pk.run_parallel(fn, xs, max_workers=WORKERS, start_method=method)

    def callback(_: None, fn: Callable[[Any], Any], xs: Sequence[Any]) -> list[Any]:
        seen: list[int] = []
        out = pk.run_parallel(
            fn,
            xs,
            max_workers=WORKERS,
            start_method=method,
            progress=lambda p: seen.append(p.done),
        )
        assert seen[-1] == len(xs)
        return out

    def bar(_: None, fn: Callable[[Any], Any], xs: Sequence[Any]) -> list[Any]:
        with _quiet_stderr():
            return pk.run_parallel(
                fn,
                xs,
                max_workers=WORKERS,
                start_method=method,
                progress=True,
            )

    def watched(_: None, fn: Callable[[Any], Any], xs: Sequence[Any]) -> list[Any]:
        stats: list[pk.MapStats] = []
        out = pk.run_parallel(
            fn,
            xs,
            max_workers=WORKERS,
            start_method=method,
            stall_timeout=60,
            on_stats=stats.append,
        )
        assert stats[0].items == len(xs)
        return out

    def none(_: None) -> None:
        return None

    out: list[h.Contender[Any]] = [
        h.Contender("Pool.map", "stdlib", "multiprocessing.Pool.map", lambda: None, pool_map, none),
        h.Contender("run_parallel", "parallelkit", "nothing watched", lambda: None, plain, none),
        h.Contender(
            "run_parallel progress=fn", "parallelkit", "a callable", lambda: None, callback, none
        ),
        h.Contender(
            "run_parallel progress=True", "parallelkit", "a tqdm bar", lambda: None, bar, none
        ),
        h.Contender(
            "run_parallel stall_timeout",
            "parallelkit",
            "stall_timeout=60, on_stats",
            lambda: None,
            watched,
            none,
        ),
    ]
    for c in out:
        c.modes = ("one-shot",)
    try:
        from tqdm.contrib.concurrent import process_map
    except ImportError:
        return out

    def tqdm_map(_: None, fn: Callable[[Any], Any], xs: Sequence[Any]) -> list[Any]:
        with _quiet_stderr():
            return list(
                process_map(
                    fn, xs, max_workers=WORKERS, chunksize=chunksize, mp_context=ctx, disable=False
                )
            )

    peer = h.Contender(
        "tqdm process_map", "peer", "ProcessPoolExecutor under a bar", lambda: None, tqdm_map, none
    )
    peer.modes = ("one-shot",)
    out.append(peer)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--start-method", choices=START_METHODS, default="fork")
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="50,000 items, 3 rounds")
    args = ap.parse_args()
    reexec_with_bytecode_cache()
    items = 50_000 if args.quick else args.items
    rounds = 3 if args.quick else args.rounds
    xs = list(range(items))
    expected = [square(x) for x in xs]
    opts = h.RunOptions(rounds=rounds, warmup=1)
    entries = h.run_interleaved(
        contenders(args.start_method, items),
        square,
        xs,
        expected,
        opts,
        title="progress",
    )
    rows = h.summarise("progress", entries)
    plain = next(r for r in rows if r.name == "run_parallel" and r.samples)
    print(f"**progress** -- {items:,} items, `x*x`, {WORKERS} workers, {args.start_method}\n")
    print(h.markdown_table(rows))
    print()
    for row in rows:
        if row.name.startswith("run_parallel ") and row.samples:
            ratio = h.paired_ratios(row.samples, plain.samples)
            print(f"- {row.name}: x{sorted(ratio)[len(ratio) // 2]:.2f} of plain run_parallel")


if __name__ == "__main__":
    main()
