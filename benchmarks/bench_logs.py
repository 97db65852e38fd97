#!/usr/bin/env python3
"""What forwarding the workers' log records costs: a map that does not log, with
forwarding on (the default) and off, against ``Pool.map``; and a map that logs rarely.

One workload, every contender interleaved in one process (see ``harness.py``): ``--items``
tiny items (``x * x``: nothing but per-item overhead, where any per-item cost would show),
each contender one-shot (start the workers, map, stop them):

* ``Pool.map(square)``: the reference;
* ``run_parallel(square)``: forwarding on (each worker has its log socket, reads the
  parent's levels at start and before each chunk; the parent reads the socket before each
  reply), and with ``forward_logs=False``;
* ``run_parallel(square_warn_rarely)``: one WARNING per 1,000 items (200 records at the
  default size), handled by a ``NullHandler`` in the parent, forwarding on.

Usage::

    python benchmarks/bench_logs.py                  # fork, 200,000 items, 5 rounds
    python benchmarks/bench_logs.py --quick
    python benchmarks/bench_logs.py --start-method spawn --rounds 9
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
from collections.abc import Callable, Sequence
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
LOGGER = "benchmarks.bench_logs"
log = logging.getLogger(LOGGER)

PAIRS = (
    ("run_parallel forwarding on", "run_parallel forwarding off"),
    ("run_parallel forwarding on", "Pool.map"),
    ("run_parallel forwarding off", "Pool.map"),
    ("run_parallel warns 1/1000", "run_parallel forwarding on"),
)


def square_warn_rarely(x: int) -> int:
    if x % 1000 == 999:
        log.warning("item %d", x)
    return x * x


def contenders(method: StartMethod) -> list[h.Contender[Any]]:
    import parallelkit as pk

    ctx = multiprocessing.get_context(method)
    Map = Callable[[None, Callable[[Any], Any], Sequence[Any]], list[Any]]

    def pool_map(_: None, fn: Callable[[Any], Any], xs: Sequence[Any]) -> list[Any]:
        with ctx.Pool(WORKERS) as pool:
            return pool.map(square, xs)

    def run(fn: Callable[[Any], Any], *, forward_logs: bool = True) -> Map:
        def map_(_: None, __: Callable[[Any], Any], xs: Sequence[Any]) -> list[Any]:
            return pk.run_parallel(
                fn, xs, max_workers=WORKERS, start_method=method, forward_logs=forward_logs
            )

        return map_

    def none(_: None) -> None:
        return None

    def contender(name: str, kind: h.Kind, note: str, map_: Map) -> h.Contender[Any]:
        c: h.Contender[Any] = h.Contender(name, kind, note, lambda: None, map_, none)
        c.modes = ("one-shot",)
        return c

    return [
        contender("Pool.map", "stdlib", "Pool.map(square, ints)", pool_map),
        contender("run_parallel forwarding on", "parallelkit", "the default", run(square)),
        contender(
            "run_parallel forwarding off",
            "parallelkit",
            "forward_logs=False",
            run(square, forward_logs=False),
        ),
        contender(
            "run_parallel warns 1/1000",
            "parallelkit",
            "WARNING every 1,000th item, NullHandler",
            run(square_warn_rarely),
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--start-method", choices=START_METHODS, default="fork")
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="50,000 items, 3 rounds")
    args = ap.parse_args()
    reexec_with_bytecode_cache()
    log.addHandler(logging.NullHandler())
    log.propagate = False
    items = 50_000 if args.quick else args.items
    rounds = 3 if args.quick else args.rounds
    xs = list(range(items))
    expected = [square(x) for x in xs]
    opts = h.RunOptions(rounds=rounds, warmup=1)
    entries = h.run_interleaved(
        contenders(args.start_method), square, xs, expected, opts, title="logs"
    )
    rows = h.summarise("logs", entries)
    print(f"**logs** -- {items:,} tiny items, {WORKERS} workers, {args.start_method}\n")
    print(h.markdown_table(rows))
    print()
    h.print_pairs(rows, PAIRS)


if __name__ == "__main__":
    main()
