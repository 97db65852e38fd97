#!/usr/bin/env python3
"""Backends: what ``backend="serial"`` and a Dask ``backend=client`` cost, side by side.

Two workloads, every contender interleaved in one process (see ``harness.py``):

* ``serial``: 200,000 items of ``x*x`` in this process -- ``run_parallel(...,
  backend="serial")`` against a plain ``list(map(fn, items))`` (the claim: <= 1.2x);
* ``dask``: 10,000 items of ``x*x`` on a 2-worker ``LocalCluster`` (one thread each), all
  contenders on the same warm cluster -- ``run_parallel(..., backend=client)`` against a
  hand-chunked ``client.map`` over 100 chunks (the claim: <= 1.2x) and against
  ``client.get_executor().map`` (one task per item; the claim: >= 30x faster).  The
  executor sends one task per item and takes tens of seconds for 10,000 items, so it runs
  on ``--executor-items`` items (default 1,000) and its time is scaled up linearly to
  10,000 items; the report says so.

Usage::

    python benchmarks/bench_backends.py                 # both workloads, 5 rounds
    python benchmarks/bench_backends.py --quick         # 3 rounds
    python benchmarks/bench_backends.py --workloads serial
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Run as a file, this folder heads sys.path; the package imports from the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness as h
from benchmarks import tasks as t


def _chunked_map(client: Any, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """The hand-written Dask idiom: 100 chunks, one task each, gathered in order."""
    n = max(1, -(-len(items) // 100))
    chunks = [list(items[i : i + n]) for i in range(0, len(items), n)]
    futures = client.map(t.map_chunk, [fn] * len(chunks), chunks, pure=False)
    out: list[Any] = []
    for part in client.gather(futures):
        out.extend(part)
    return out


def dask_contenders(client: Any) -> list[h.Contender[Any]]:
    import parallelkit as pk

    def ours(c: Any, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return pk.run_parallel(fn, items, backend=c)

    def executor_map(c: Any, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return list(c.get_executor().map(fn, items))

    common: dict[str, Any] = {"open": lambda: client, "close": lambda _: None, "modes": ("warm",)}
    return [
        h.Contender(
            "parallelkit backend=client", "parallelkit", "run_parallel", map=ours, **common
        ),
        h.Contender(
            "client.map, 100 chunks", "peer", "hand-chunked client.map", map=_chunked_map, **common
        ),
        h.Contender(
            "client.get_executor().map",
            "peer",
            "one task per item",
            map=executor_map,
            **common,
        ),
    ]


def serial_contenders() -> list[h.Contender[Any]]:
    import parallelkit as pk

    def ours(_: None, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return pk.run_parallel(fn, items, backend="serial")

    return [
        h.serial_contender(),
        h.Contender(
            "parallelkit backend='serial'",
            "parallelkit",
            "run_parallel in this process",
            open=lambda: None,
            map=ours,
            close=lambda _: None,
            modes=("serial",),
        ),
    ]


def _median_ratio(a: h.Entry, b: h.Entry) -> float:
    return statistics.median(h.paired_ratios(a.samples, b.samples))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="serial,dask")
    ap.add_argument("--items", type=int, default=200_000, help="items (serial)")
    ap.add_argument("--dask-items", type=int, default=10_000)
    ap.add_argument("--executor-items", type=int, default=1_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="3 rounds")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds = 3
    opts = h.RunOptions(rounds=args.rounds, warmup=1, gate_seconds=1.0, check_leftovers=False)
    wanted = {w.strip() for w in args.workloads.split(",")}
    import parallelkit

    lines = [
        f"Measured {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on "
        f"{len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}, "
        f"parallelkit {parallelkit.__version__}; {args.rounds} rounds after 1 warm-up.",
    ]
    if "serial" in wanted:
        items = list(range(args.items))
        expected = [x * x for x in items]
        entries = h.run_interleaved(
            serial_contenders(), t.square, items, expected, opts, title="serial"
        )
        ratio = _median_ratio(entries[1], entries[0])
        lines += [
            "",
            f"**serial** — {args.items:,} items of `x*x` in this process",
            "",
            h.markdown_table(h.summarise("serial", entries)),
            "",
            f"- `backend='serial'` / `list(map(fn, items))`: **{ratio:.2f}x** (median of "
            "paired rounds)",
        ]
    if "dask" in wanted:
        import distributed

        with (
            distributed.LocalCluster(  # type: ignore[no-untyped-call]
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
            ) as cluster,
            distributed.Client(cluster) as client,  # type: ignore[no-untyped-call]
        ):
            items = list(range(args.dask_items))
            expected = [x * x for x in items]
            contenders = dask_contenders(client)
            entries = h.run_interleaved(
                contenders[:2], t.square, items, expected, opts, title="dask"
            )
            few = list(range(args.executor_items))
            slow = h.run_interleaved(
                contenders[2:],
                t.square,
                few,
                [x * x for x in few],
                h.RunOptions(rounds=min(3, args.rounds), warmup=0, check_leftovers=False),
                title="dask executor",
            )
        ours, chunked = entries
        scale = args.dask_items / args.executor_items
        executor_10k = statistics.median(slow[0].samples) * scale
        lines += [
            "",
            f"**dask** — {args.dask_items:,} items of `x*x`, LocalCluster of 2 worker processes "
            "(1 thread each), warm",
            "",
            h.markdown_table(h.summarise("dask", entries)),
            "",
            f"- `backend=client` / hand-chunked `client.map` (100 chunks): "
            f"**{_median_ratio(ours, chunked):.2f}x**",
            f"- `client.get_executor().map`: {statistics.median(slow[0].samples):.2f} s for "
            f"{args.executor_items:,} items (median of {len(slow[0].samples)}), so about "
            f"{executor_10k:.1f} s for {args.dask_items:,} (scaled linearly, not measured); "
            f"`backend=client` is **{executor_10k / ours.median:.0f}x** faster",
        ]
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
