#!/usr/bin/env python3
"""What unpacking items costs: ``pk.star``, ``pk.star_kwargs`` and ``pk.with_args`` against a
plain map of the same items, and ``Pool.starmap``.

One workload, every contender interleaved in one process (see ``harness.py``): ``--items``
tiny items (a product of two ints: nothing but per-item overhead, where any per-item cost
would show), each contender one-shot (start the workers, map, stop them).  Every contender
computes ``x * x`` for ``x`` in ``range(items)``:

* ``Pool.map(square)`` and ``run_parallel(square)``: one int per item (the reference);
* ``run_parallel(mul_pair)``: a tuple per item, unpacked by the function (``p[0] * p[1]``);
* ``run_parallel(pk.star(mul))`` on the same tuples, and ``Pool.starmap(mul)``;
* ``run_parallel(pk.with_args(power, 2))`` against ``run_parallel(partial(power, exp=2))``;
* ``run_parallel(pk.star_kwargs(mul))`` on dicts against ``run_parallel(mul_kwargs)``, a
  wrapper that calls ``mul(**record)`` (what one writes without ``star_kwargs``).

First, the same pairs of contenders in the pool worker's chunk loop alone, in this process
(no processes, no pickling): the per-item cost of unpacking by itself.

Usage::

    python benchmarks/bench_args.py                  # fork, 200,000 items, 5 rounds
    python benchmarks/bench_args.py --quick
    python benchmarks/bench_args.py --start-method spawn --rounds 9
    python benchmarks/bench_args.py --loop-only      # the worker loop alone, in-process
"""

from __future__ import annotations

import argparse
import functools
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
from benchmarks.tasks import mul, mul_kwargs, mul_pair, mul_record, power, square

if TYPE_CHECKING:
    from parallelkit import StartMethod

WORKERS = 2

# (contender, the contender it is compared with): the ratios printed under the table
PAIRS = (
    ("run_parallel star(mul)", "run_parallel mul_pair"),
    ("run_parallel star(mul)", "Pool.starmap"),
    ("run_parallel with_args", "run_parallel partial"),
    ("run_parallel star_kwargs", "run_parallel mul_kwargs"),
    ("run_parallel mul_pair", "run_parallel square"),
)


def contenders(method: StartMethod, items: int) -> list[h.Contender[Any]]:
    import parallelkit as pk

    ctx = multiprocessing.get_context(method)
    pairs = [(x, x) for x in range(items)]
    records = [{"a": x, "b": x} for x in range(items)]

    def pool_map(_: None, fn: Callable[[Any], Any], xs: Sequence[Any]) -> list[Any]:
        with ctx.Pool(WORKERS) as pool:
            return pool.map(square, xs)

    def pool_starmap(_: None, fn: Callable[[Any], Any], xs: Sequence[Any]) -> list[Any]:
        with ctx.Pool(WORKERS) as pool:
            return pool.starmap(mul, pairs)

    Map = Callable[[None, Callable[[Any], Any], Sequence[Any]], list[Any]]

    def run(fn: Callable[[Any], Any], data: Sequence[Any] | None = None) -> Map:
        def map_(_: None, __: Callable[[Any], Any], xs: Sequence[Any]) -> list[Any]:
            return pk.run_parallel(
                fn, xs if data is None else data, max_workers=WORKERS, start_method=method
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
        contender("Pool.starmap", "stdlib", "Pool.starmap(mul, tuples)", pool_starmap),
        contender("run_parallel square", "parallelkit", "ints", run(square)),
        contender("run_parallel mul_pair", "parallelkit", "tuples, fn(pair)", run(mul_pair, pairs)),
        contender(
            "run_parallel star(mul)",
            "parallelkit",
            "tuples, pk.star(mul)",
            run(pk.star(mul), pairs),
        ),
        contender(
            "run_parallel partial",
            "parallelkit",
            "partial(power, exp=2)",
            run(functools.partial(power, exp=2)),
        ),
        contender(
            "run_parallel with_args",
            "parallelkit",
            "pk.with_args(power, 2)",
            run(pk.with_args(power, 2)),
        ),
        contender(
            "run_parallel mul_kwargs",
            "parallelkit",
            "dicts, fn(record) calls mul(**record)",
            run(mul_kwargs, records),
        ),
        contender(
            "run_parallel star_kwargs",
            "parallelkit",
            "dicts, pk.star_kwargs(mul)",
            run(pk.star_kwargs(mul), records),
        ),
    ]


def worker_loop(items: int, rounds: int) -> None:
    """The pool worker's chunk loop alone, in this process: ns per item, paired ratios.

    No processes, no pickling: what unpacking adds to the loop that runs each item is all
    that differs between a contender and its reference, so the ratios are steadier than the
    one-shot ones on a busy machine.
    """
    import time

    import parallelkit as pk
    from parallelkit._map import worker as W
    from parallelkit._proc.slots import SLOT_WORDS

    xs = list(range(items))
    pairs = [(x, x) for x in xs]
    records = [{"a": x, "b": x} for x in xs]
    words = memoryview(bytearray(8 * SLOT_WORDS)).cast("q")
    loops: dict[str, tuple[Callable[[Any], Any], Sequence[Any]]] = {
        "square": (square, xs),
        "mul_pair": (mul_pair, pairs),
        "star(mul)": (pk.star(mul), pairs),
        "partial": (functools.partial(power, exp=2), xs),
        "with_args": (pk.with_args(power, 2), xs),
        "with_args kw": (pk.with_args(power, exp=2), xs),
        "mul_record": (mul_record, records),
        "mul_kwargs": (mul_kwargs, records),
        "star_kwargs": (pk.star_kwargs(mul), records),
    }
    expected = [x * x for x in xs]
    samples: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(rounds + 1):  # the first round warms up
        for name, (fn, data) in loops.items():
            t0 = time.perf_counter()
            results, errors = W._run_chunk(fn, data, 0, words, 0)
            samples[name].append((time.perf_counter() - t0) * 1e9 / items)
            assert errors is None, name
            assert results == expected, name
    print(f"**worker loop** -- {items:,} items in one chunk, in this process\n")
    print("| loop | median ns/item | paired ratio | to |")
    print("|---|---|---|---|")
    references = {
        "star(mul)": "mul_pair",
        "with_args": "partial",
        "with_args kw": "partial",
        "star_kwargs": "mul_kwargs",
    }
    for name, all_times in samples.items():
        times = all_times[1:]
        ref = references.get(name)
        ratio = ""
        if ref is not None:
            paired = sorted(t / r for t, r in zip(times, samples[ref][1:], strict=True))
            ratio = f"x{paired[len(paired) // 2]:.2f}"
        print(f"| {name} | {sorted(times)[len(times) // 2]:.0f} | {ratio} | {ref or ''} |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--start-method", choices=START_METHODS, default="fork")
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="50,000 items, 3 rounds")
    ap.add_argument(
        "--loop-only", action="store_true", help="only the worker loop, in this process"
    )
    args = ap.parse_args()
    reexec_with_bytecode_cache()
    items = 50_000 if args.quick else args.items
    rounds = 3 if args.quick else args.rounds
    worker_loop(items, max(rounds, 9))
    if args.loop_only:
        return
    xs = list(range(items))
    expected = [square(x) for x in xs]
    opts = h.RunOptions(rounds=rounds, warmup=1)
    entries = h.run_interleaved(
        contenders(args.start_method, items), square, xs, expected, opts, title="args"
    )
    rows = h.summarise("args", entries)
    print(f"**args** -- {items:,} tiny items, {WORKERS} workers, {args.start_method}\n")
    print(h.markdown_table(rows))
    print()
    h.print_pairs(rows, PAIRS)


if __name__ == "__main__":
    main()
