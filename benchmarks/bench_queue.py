#!/usr/bin/env python3
"""Queues: parallelkit's ``Queue`` side by side with ``multiprocessing.Queue``.

A producer process (started once per contender, before timing) puts items when told to;
this process takes them.  A sample is the time from telling the producer to go until the
last item is taken, so it holds both sides of the transfer.  Every contender runs in every
round, interleaved (the order rotates each round); medians over rounds; ratios to
``mp.Queue`` are paired round by round (``harness.paired_ratios``: below 1 is faster).

Workloads (the cases issue 18 asks to keep fast):

* ``batch-get1``: ints, put in batches, taken one ``get()`` at a time: parallelkit
  ``put_many`` + ``get()``; ``mp.Queue`` has no batches: ``put(i)`` + ``get()``;
* ``1KB-put1-get1``: 1 KiB ``bytes`` items, one ``put`` and one ``get`` per item;
* ``batches``: ints in batches both ways: ``put_many`` + ``get_many()`` against
  ``put(list of 1,024)`` + ``get()``;
* ``1MB-put1-get1``: 1 MiB ``bytes`` items one at a time (parallelkit sends these through
  an anonymous file).

Usage::

    python benchmarks/bench_queue.py                  # fork, 7 rounds
    python benchmarks/bench_queue.py --quick          # 3 rounds, fewer items
    python benchmarks/bench_queue.py --start-method spawn --workloads batch-get1,batches
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Run as a file, this folder heads sys.path; the package imports from the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness as h

if TYPE_CHECKING:
    from parallelkit import StartMethod

KB = 1 << 10
MB = 1 << 20
BATCH = 1024  # items per mp.Queue put in `batches` (parallelkit's put_many batch, too)

WORKLOADS = ("batch-get1", "1KB-put1-get1", "batches", "1MB-put1-get1")


# ------------------------------------------------------------------ producers (child processes)


def produce(commands: Any, queue: Any, kind: str) -> None:
    """Put ``n`` items of ``workload`` each time a ``(workload, n)`` command comes."""
    while (command := commands.recv()) is not None:
        workload, n = command
        if workload in {"batch-get1", "batches"}:
            if kind == "parallelkit":
                queue.put_many(range(n))
            elif workload == "batches":
                for start in range(0, n, BATCH):
                    queue.put(list(range(start, min(n, start + BATCH))))
            else:
                for i in range(n):
                    queue.put(i)
        else:
            payload = b"x" * (KB if workload == "1KB-put1-get1" else MB)
            put = queue.put
            for _ in range(n):
                put(payload)


# ------------------------------------------------------------------ contenders


@dataclass
class Contender:
    name: str
    kind: str  # "stdlib" or "parallelkit"
    queue: Any
    commands: Any
    process: Any
    samples: dict[str, list[float]] = field(default_factory=dict)

    def run(self, workload: str, n: int) -> None:
        """One sample: tell the producer to go, take ``n`` items."""
        self.commands.send((workload, n))
        queue = self.queue
        if workload == "batches":
            taken = 0
            take = queue.get_many if self.kind == "parallelkit" else queue.get
            while taken < n:
                taken += len(take())
            return
        get = queue.get
        for _ in range(n):
            get()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.commands.send(None)
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        if self.kind == "parallelkit":
            self.queue.close()
        else:
            self.queue.close()
            self.queue.join_thread()


def contenders(ctx: Any, sm: StartMethod) -> list[Contender]:
    import parallelkit as pk

    out: list[Contender] = []
    for name, kind, queue in (
        ("mp.Queue", "stdlib", ctx.Queue()),
        ("pk.Queue", "parallelkit", pk.Queue(start_method=sm)),
    ):
        mine, theirs = ctx.Pipe()
        process = ctx.Process(target=produce, args=(theirs, queue, kind), daemon=True)
        process.start()
        theirs.close()
        out.append(Contender(name, kind, queue, mine, process))
    return out


# ------------------------------------------------------------------ the run


def run(
    workloads: list[str],
    sizes: dict[str, int],
    ctx: Any,
    sm: StartMethod,
    rounds: int,
    meter: h.NoiseMeter,
) -> list[Contender]:
    racers = contenders(ctx, sm)
    try:
        for workload in workloads:  # warm-up: imports, first buffers
            for c in racers:
                c.run(workload, max(1, sizes[workload] // 10))
        for r in range(rounds):
            for workload in workloads:
                order = racers[r % len(racers) :] + racers[: r % len(racers)]
                for c in order:
                    meter.gate()
                    t0 = time.perf_counter()
                    c.run(workload, sizes[workload])
                    c.samples.setdefault(workload, []).append(time.perf_counter() - t0)
    finally:
        for c in racers:
            c.stop()
    return racers


def report(workload: str, n: int, racers: list[Contender]) -> str:
    reference = next(c for c in racers if c.kind == "stdlib").samples[workload]
    lines = [
        "| contender | median ms | min-max ms | µs per item | x mp.Queue |",
        "|---|---|---|---|---|",
    ]
    for c in racers:
        samples = c.samples[workload]
        ratio = statistics.median(h.paired_ratios(samples, reference))
        name = f"**{c.name}**" if c.kind == "parallelkit" else c.name
        median = statistics.median(samples)
        lines.append(
            f"| {name} | {median * 1e3:.1f} | {min(samples) * 1e3:.1f}-"
            f"{max(samples) * 1e3:.1f} | {median / n * 1e6:.2f} | {ratio:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start-method", default="fork", choices=("fork", "forkserver", "spawn"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--ints", type=int, default=100_000, help="items of batch-get1, batches")
    parser.add_argument("--small", type=int, default=50_000, help="items of 1KB-put1-get1")
    parser.add_argument("--large", type=int, default=300, help="items of 1MB-put1-get1")
    parser.add_argument("--quick", action="store_true", help="3 rounds, a fifth of the items")
    parser.add_argument("--gate-seconds", type=float, default=0.5)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 3
        args.ints, args.small, args.large = args.ints // 5, args.small // 5, args.large // 5
    workloads = args.workloads.split(",")
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
    sizes = {
        "batch-get1": args.ints,
        "batches": args.ints,
        "1KB-put1-get1": args.small,
        "1MB-put1-get1": args.large,
    }
    ctx = multiprocessing.get_context(args.start_method)
    meter = h.NoiseMeter(gate_seconds=args.gate_seconds)
    print(
        f"# bench_queue: Python {platform.python_version()}, {args.start_method}, "
        f"{len(os.sched_getaffinity(0))} usable CPUs, {args.rounds} rounds, "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC\n"
    )
    h.log(f"{', '.join(workloads)} ...")
    racers = run(workloads, sizes, ctx, args.start_method, args.rounds, meter)
    for workload in workloads:
        print(f"## {workload} ({sizes[workload]} items)\n")
        print(report(workload, sizes[workload], racers) + "\n", flush=True)


if __name__ == "__main__":
    main()
