"""What a benchmark run measures: sizes, start method, contenders, run options.

Shared by ``python -m parallelkit bench`` and ``benchmarks/bench_map.py``.
"""

from __future__ import annotations

import argparse
import os
import typing
from dataclasses import dataclass, replace

from .options import QUICK_WORKLOADS, WORKLOADS

if typing.TYPE_CHECKING:
    from .harness import RunOptions

PEERS = ("mpire", "joblib", "loky", "pebble")


@dataclass(frozen=True)
class Sizes:
    """How big each workload is: :data:`FULL` for the README, :data:`QUICK` for users."""

    items: int = 200_000  # tiny
    tasks: int = 16  # cpu
    task_seconds: float = 0.1
    arrays: int = 32  # arrays, arrays-results
    elements: int = 1_000_000  # float64 elements an array: 8 MB
    startup_workers: tuple[int, ...] = (2, 8)
    heavy_main: bool = True  # startup-W-heavy, under spawn
    rounds: int = 5


FULL = Sizes()
QUICK = Sizes(
    items=10_000,
    tasks=4,
    task_seconds=0.03,
    arrays=4,
    startup_workers=(2,),
    heavy_main=False,
    rounds=3,
)


@dataclass
class Settings:
    """What one run measures and how."""

    start_method: str
    workers: int
    sizes: Sizes
    run: RunOptions
    workloads: tuple[str, ...] = WORKLOADS
    peers: bool = True
    only: str | None = None  # regex on contender names (baselines always run)


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def settings_from(ap: argparse.ArgumentParser, args: argparse.Namespace) -> Settings:
    """The :class:`Settings` that parsed options ask for (errors go through ``ap``)."""
    base = QUICK if args.quick else FULL
    chosen = args.workloads or ",".join(QUICK_WORKLOADS if args.quick else WORKLOADS)
    wanted = tuple(w.strip() for w in chosen.split(",") if w.strip())
    unknown = sorted(set(wanted) - set(WORKLOADS))
    if unknown or not wanted:
        ap.error(f"--workloads: unknown {unknown}; choose from {', '.join(WORKLOADS)}")
    startup = base.startup_workers
    if args.startup_workers:
        startup = tuple(int(w) for w in args.startup_workers.split(",") if w.strip())
    sizes = replace(
        base,
        items=args.items or base.items,
        tasks=args.tasks or base.tasks,
        task_seconds=args.task_seconds or base.task_seconds,
        arrays=args.arrays or base.arrays,
        elements=args.elements or base.elements,
        startup_workers=startup,
        rounds=args.rounds or base.rounds,
    )
    workers = args.workers or usable_cpus()
    numbers = (workers, sizes.rounds, sizes.items, sizes.tasks, sizes.arrays, sizes.elements)
    if min(numbers) < 1 or not startup or min(startup) < 1 or (args.warmup or 0) < 0:
        ap.error(
            "--workers, --rounds, --items, --tasks, --arrays, --elements and "
            "--startup-workers must be positive"
        )
    from .harness import RunOptions

    retries = args.retries if args.retries is not None else 0 if args.quick else 1

    # --quick must end within a minute: no wait for a quiet machine (each wait takes 50 ms
    # at least), no second try of a noisy sample (the noise column still shows it), no
    # warm-up round (the median of 3 rounds drops a first round's one-time costs)
    gate = args.gate_seconds
    if gate is None:
        gate = 0.0 if args.quick else 1.0
    warmup = args.warmup if args.warmup is not None else 0 if args.quick else 1
    return Settings(
        start_method=args.start_method,
        workers=workers,
        sizes=sizes,
        workloads=wanted,
        peers=not args.no_peers,
        only=args.only,
        run=RunOptions(
            rounds=sizes.rounds,
            warmup=warmup,
            gate_seconds=gate,
            retries=retries,
            sample_timeout=args.sample_timeout,
            check_leftovers=not args.no_leak_check,
        ),
    )
