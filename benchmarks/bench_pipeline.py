#!/usr/bin/env python3
"""Pipelines side by side: parallelkit's ``Pipeline`` against hand-made queue pipelines.

Workloads (each contender runs the whole pipeline, start-up included, in every round;
rounds are interleaved and rotated, and ratios are taken round by round):

- ``tiny``: N small ints through two trivial ``map`` stages (``x + 1``, then ``2 * x``).
  Contenders: the textbook ``multiprocessing.Queue`` pipeline with sentinels (one process
  per stage, one ``put`` per item), the same hand-batched 256 items per message, and
  parallelkit with a ``range`` source and with a generator source.
- ``1MB``: M distinct 1 MiB ``bytes`` payloads through one identity stage, the consumer
  taking ``len()``: the same contenders (the batched one capped at 4 payloads per message),
  plus faster-fifo's shared-memory queue when it is installed; MB/s in the table.
- ``latency``: a slow source (one item every 50 ms); how long the first items take from
  the source to the consumer (median over items and rounds), for the textbook pipeline and
  for parallelkit.

    python benchmarks/bench_pipeline.py [--quick] [--json FILE] [--update-readme]
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import itertools
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Run as a file, this folder heads sys.path; the package imports from the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness as h

if TYPE_CHECKING:
    from parallelkit import StartMethod

README = Path(__file__).resolve().parent / "README.md"
MB = 1 << 20
BATCH = 256


# ------------------------------------------------------------------ stage functions


def inc(x: int) -> int:
    return x + 1


def double(x: int) -> int:
    return 2 * x


def same(x: bytes) -> bytes:
    return x


def _payloads(n: int) -> Iterator[bytes]:
    """``n`` 1 MiB payloads cycling through 8 distinct objects (no pickle memo sharing)."""
    pool = [bytes([i]) * MB for i in range(8)]
    return itertools.islice(itertools.cycle(pool), n)


# ------------------------------------------------------------------ hand-made pipelines


def _produce(kind: str, n: int, q: Any, batch: int) -> None:
    source: Iterator[Any] = iter(range(n)) if kind == "tiny" else _payloads(n)
    if batch == 1:
        for x in source:
            q.put(x)
    else:
        while chunk := list(itertools.islice(source, batch)):
            q.put(chunk)
    q.put(None)


def _stage(fn: Callable[[Any], Any], qin: Any, qout: Any, batched: bool) -> None:
    get, put = qin.get, qout.put
    while (x := get()) is not None:
        put([fn(v) for v in x] if batched else fn(x))
    put(None)


def queue_pipeline(
    kind: str, n: int, fns: Sequence[Callable[[Any], Any]], batch: int, method: StartMethod
) -> list[Any]:
    """Producer process -> one process per stage -> this process, over mp.Queue."""
    ctx: Any = multiprocessing.get_context(method)  # a concrete context: it has Process
    queues = [ctx.Queue() for _ in range(len(fns) + 1)]
    procs = [ctx.Process(target=_produce, args=(kind, n, queues[0], batch))]
    procs += [
        ctx.Process(target=_stage, args=(fn, queues[i], queues[i + 1], batch > 1))
        for i, fn in enumerate(fns)
    ]
    for p in procs:
        p.start()
    out: list[Any] = []
    get = queues[-1].get
    fold = (lambda x: x) if kind == "tiny" else len
    while (x := get()) is not None:
        if batch > 1:
            out.extend(fold(v) for v in x)
        else:
            out.append(fold(x))
    for p in procs:
        p.join()
    return out


def _ff_produce(n: int, q: Any) -> None:
    for x in _payloads(n):
        q.put(x, timeout=1e9)
    q.put(None, timeout=1e9)


def _ff_stage(qin: Any, qout: Any) -> None:
    while True:
        for x in qin.get_many(timeout=1e9):
            qout.put(x, timeout=1e9)
            if x is None:
                return


def faster_fifo_pipeline(n: int, method: StartMethod) -> list[int]:
    faster_fifo: Any = importlib.import_module("faster_fifo")

    ctx: Any = multiprocessing.get_context(method)  # a concrete context: it has Process
    q1, q2 = (faster_fifo.Queue(max_size_bytes=8 * MB + 65536) for _ in range(2))
    procs = [
        ctx.Process(target=_ff_produce, args=(n, q1)),
        ctx.Process(target=_ff_stage, args=(q1, q2)),
    ]
    for p in procs:
        p.start()
    out: list[int] = []
    done = False
    while not done:
        for x in q2.get_many(timeout=1e9):
            if x is None:
                done = True
                break
            out.append(len(x))
    for p in procs:
        p.join()
    return out


# ------------------------------------------------------------------ contenders


def _contender(
    name: str, kind: h.Kind, note: str, run: Callable[[], list[Any]]
) -> h.Contender[None]:
    return h.Contender(
        name,
        kind,
        note,
        open=lambda: None,
        map=lambda _h, _fn, _items: run(),
        close=lambda _h: None,
        modes=("one-shot",),
    )


def tiny_contenders(n: int, method: StartMethod) -> list[h.Contender[None]]:
    import parallelkit as pk

    fns = (inc, double)
    return [
        _contender(
            "mp.Queue textbook",
            "stdlib",
            "producer + 1 process per stage, mp.Queue, one put per item, None sentinels",
            lambda: queue_pipeline("tiny", n, fns, 1, method),
        ),
        _contender(
            f"mp.Queue batched {BATCH}",
            "stdlib",
            f"the same, hand-batched: lists of {BATCH} items per put",
            lambda: queue_pipeline("tiny", n, fns, BATCH, method),
        ),
        _contender(
            "pk.Pipeline (range)",
            "parallelkit",
            "Pipeline(range(n)).map(inc).map(double).run()",
            lambda: pk.Pipeline(range(n), start_method=method).map(inc).map(double).run(),
        ),
        _contender(
            "pk.Pipeline (generator)",
            "parallelkit",
            "the same with a generator source (read by the source thread)",
            lambda: (
                pk.Pipeline((x for x in range(n)), start_method=method).map(inc).map(double).run()
            ),
        ),
    ]


def big_contenders(n: int, method: StartMethod) -> tuple[list[h.Contender[None]], list[str]]:
    import parallelkit as pk

    missing = []
    contenders = [
        _contender(
            "mp.Queue textbook",
            "stdlib",
            "producer -> stage -> consumer over mp.Queue, one payload per put",
            lambda: queue_pipeline("1MB", n, (same,), 1, method),
        ),
        _contender(
            "mp.Queue batched 4",
            "stdlib",
            "the same, 4 payloads per put",
            lambda: queue_pipeline("1MB", n, (same,), 4, method),
        ),
        _contender(
            "pk.Pipeline",
            "parallelkit",
            "Pipeline(payloads).map(same), consumer takes len()",
            lambda: [len(x) for x in pk.Pipeline(_payloads(n), start_method=method).map(same)],
        ),
    ]
    if importlib.util.find_spec("faster_fifo") is None:
        missing.append("faster-fifo")
    else:
        contenders.append(
            _contender(
                "faster-fifo",
                "peer",
                "producer -> stage -> consumer over faster_fifo.Queue (shared-memory ring)",
                lambda: faster_fifo_pipeline(n, method),
            )
        )
    return contenders, missing


# ------------------------------------------------------------------ latency


def _slow_source(n: int, stamps: list[float]) -> Iterator[float]:
    for _ in range(n):
        stamps.append(time.perf_counter())
        yield stamps[-1]
        time.sleep(0.05)


def _slow_produce(n: int, q: Any) -> None:
    for _ in range(n):
        q.put(time.perf_counter())
        time.sleep(0.05)
    q.put(None)


def _identity(x: float) -> float:
    return x


def latency_textbook(n: int, method: StartMethod) -> list[float]:
    ctx: Any = multiprocessing.get_context(method)  # a concrete context: it has Process
    q1, q2 = ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(target=_slow_produce, args=(n, q1)),
        ctx.Process(target=_stage, args=(_identity, q1, q2, False)),
    ]
    for p in procs:
        p.start()
    out = []
    while (x := q2.get()) is not None:
        out.append(time.perf_counter() - x)  # CLOCK_MONOTONIC: comparable across processes
    for p in procs:
        p.join()
    return out


def latency_parallelkit(n: int, method: StartMethod) -> list[float]:
    import parallelkit as pk

    stamps: list[float] = []
    return [
        time.perf_counter() - x
        for x in pk.Pipeline(_slow_source(n, stamps), start_method=method).map(_identity)
    ]


# ------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--start-method", default="fork")
    p.add_argument("--items", type=int, default=1_000_000, help="tiny: items (default 1M)")
    p.add_argument("--payloads", type=int, default=500, help="1MB: payloads (default 500)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--workloads", default="tiny,1MB,latency")
    p.add_argument("--quick", action="store_true", help="fewer items and rounds (~30 s)")
    p.add_argument("--json", help="write JSON lines here ('-': stdout)")
    p.add_argument("--update-readme", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.items, args.payloads, args.rounds = 200_000, 200, 3
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import parallelkit

    method = args.start_method
    meta: dict[str, Any] = {
        "type": "meta",
        "benchmark": "bench_pipeline",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "cpus": len(os.sched_getaffinity(0)),
        "start_method": method,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "parallelkit": parallelkit.__version__,
    }
    opts = h.RunOptions(rounds=args.rounds, warmup=args.warmup)
    wanted = set(args.workloads.split(","))
    lines: list[str] = []
    sections: list[str] = [
        f"Measured {meta['date']} on {meta['cpus']} cores, Python {meta['python']}, "
        f"{method}; {args.rounds} rounds after {args.warmup} warm-up; "
        f"`python benchmarks/bench_pipeline.py{' --quick' if args.quick else ''}`."
    ]
    if "tiny" in wanted:
        n = args.items
        expected = [2 * (x + 1) for x in range(n)]
        entries = h.run_interleaved(
            tiny_contenders(n, method), inc, [], expected, opts, title="tiny"
        )
        rows = h.summarise("tiny", entries)
        lines += h.json_lines(rows, meta)
        sections.append(_section(f"**tiny** — {n:,} ints through two `map` stages", rows, n))
    if "1MB" in wanted:
        n = args.payloads
        contenders, missing = big_contenders(n, method)
        entries = h.run_interleaved(contenders, same, [], [MB] * n, opts, title="1MB")
        rows = h.summarise("1MB", entries)
        lines += h.json_lines(rows, meta)
        title = f"**1MB** — {n} payloads of 1 MiB through one stage"
        if missing:
            title += f" (not installed: {', '.join(missing)})"
        sections.append(_section(title, rows, n, megabytes=True))
    if "latency" in wanted:
        sections.append(_latency(method, rounds=args.rounds))
    text = "\n\n".join(sections)
    print(text)
    if args.json:
        import json

        out = "\n".join([json.dumps(meta), *lines]) + "\n"
        if args.json == "-":
            sys.stdout.write(out)
        else:
            Path(args.json).write_text(out)
    if args.update_readme:
        h.replace_between_markers(README, f"bench_pipeline:{method}", text)
    return 0


def _section(title: str, rows: Sequence[h.Row], n: int, *, megabytes: bool = False) -> str:
    best = min((r for r in rows if r.kind in h.PEER_KINDS and r.samples), key=lambda r: r.median)
    out = [
        title,
        "",
        "| contender | median | min-max | rate | x best stdlib/peer |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if not r.samples:
            out.append(f"| {r.name} | failed: {r.error} | | | |")
            continue
        rate = (n * MB / 1e9 / r.median) if megabytes else (n / r.median / 1e6)
        unit = "GB/s" if megabytes else "M items/s"
        ratio = statistics.median(h.paired_ratios(r.samples, best.samples))
        out.append(
            f"| {r.name} | {r.median * 1e3:.0f} ms | {min(r.samples) * 1e3:.0f}-"
            f"{max(r.samples) * 1e3:.0f} ms | {rate:.2f} {unit} | {ratio:.2f}x |"
        )
    out.append("")
    out.append("x best: time relative to the fastest stdlib/peer contender (lower is better).")
    return "\n".join(out)


def _latency(method: StartMethod, *, rounds: int) -> str:
    n = 8
    results: dict[str, list[float]] = {"mp.Queue textbook": [], "pk.Pipeline": []}
    for r in range(rounds):
        order = list(results) if r % 2 == 0 else list(reversed(results))
        for name in order:
            run = latency_textbook if name.startswith("mp") else latency_parallelkit
            results[name].extend(run(n, method)[1:])  # the first item includes start-up
    out = [
        "**latency** — a source yielding one item every 50 ms, one `map` stage: "
        "time from the source to the consumer (items 2-8 of each run)",
        "",
        "| contender | median | max |",
        "|---|---|---|",
    ]
    for name, values in results.items():
        out.append(
            f"| {name} | {statistics.median(values) * 1e3:.2f} ms | {max(values) * 1e3:.2f} ms |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
