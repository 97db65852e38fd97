"""What a run of the parallel-map comparison measures, and the options that say so.

The command-line options of ``python -m benchmarks`` (``bench_map.py``), the sizes of each
workload, and the :class:`Settings` the parsed options make.  Only the standard library is
imported here.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, replace

from .harness import RunOptions

PEERS = ("mpire", "joblib", "loky", "pebble")
START_METHODS = ("fork", "forkserver", "spawn")
WORKLOADS = ("tiny", "cpu", "arrays", "arrays-results", "membound", "tiles", "startup")
# --quick leaves out the large results: with spawn, every one-shot sample starts workers that
# import numpy, and two array workloads took a minute on their own
QUICK_WORKLOADS = ("tiny", "cpu", "arrays", "startup")


def add_arguments(ap: argparse.ArgumentParser, *, start_method: str) -> None:
    """What to measure and how: workloads, contenders, sizes, rounds."""
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smaller workloads and no arrays-results, 3 rounds, no warm-up round "
        "(under a minute on 2 cores)",
    )
    ap.add_argument("--start-method", choices=START_METHODS, default=start_method)
    ap.add_argument(
        "--workloads",
        help="comma-separated, from: "
        + ", ".join(WORKLOADS)
        + " (default: all; with --quick: "
        + ", ".join(QUICK_WORKLOADS)
        + ")",
    )
    ap.add_argument(
        "--only",
        metavar="REGEX",
        help="contenders whose name matches (the references always run)",
    )
    ap.add_argument("--no-peers", action="store_true", help="stdlib and parallelkit only")
    ap.add_argument("--workers", type=int, help="default: the CPUs this process may use")
    ap.add_argument("--rounds", type=int, help="timed rounds (5; --quick 3)")
    ap.add_argument("--warmup", type=int, help="untimed rounds first (1; --quick 0)")
    ap.add_argument("--items", type=int, help="tiny: items (200,000; --quick 10,000)")
    ap.add_argument("--tasks", type=int, help="cpu: tasks (16; --quick 4)")
    ap.add_argument("--task-seconds", type=float, help="cpu: seconds (0.1; --quick 0.03)")
    ap.add_argument("--arrays", type=int, help="arrays: how many (32; --quick 4)")
    ap.add_argument("--elements", type=int, help="arrays: float64 elements an array (1,000,000)")
    ap.add_argument(
        "--tile-side",
        type=int,
        help="tiles: a tile's side in float64 elements (512: 2 MB); the image is 4 x 8 tiles",
    )
    ap.add_argument(
        "--startup-workers",
        help="startup: comma-separated worker counts (2,8; --quick 2)",
    )
    ap.add_argument(
        "--gate-seconds",
        type=float,
        help="before a sample, wait up to this long for a quiet CPU (1; --quick 0)",
    )
    ap.add_argument(
        "--retries",
        type=int,
        help="re-take a sample that other processes disturbed, this often (1; --quick 0)",
    )
    ap.add_argument(
        "--sample-timeout",
        type=float,
        default=300.0,
        help="a sample running longer is a hang: dump every thread's stack and exit (300)",
    )
    ap.add_argument(
        "--no-leak-check",
        action="store_true",
        help="skip the check for child processes left behind after one-shot calls",
    )


@dataclass(frozen=True)
class Sizes:
    """How big each workload is: :data:`FULL` for the README, :data:`QUICK` for users."""

    items: int = 200_000  # tiny
    tasks: int = 16  # cpu
    task_seconds: float = 0.1
    arrays: int = 32  # arrays, arrays-results
    elements: int = 1_000_000  # float64 elements an array: 8 MB
    tile_side: int = 512  # tiles: 512 x 512 float64 = 2 MB
    tile_grid: tuple[int, int] = (4, 8)  # tiles: rows x columns of tiles in the image
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
        tile_side=args.tile_side or base.tile_side,
        startup_workers=startup,
        rounds=args.rounds or base.rounds,
    )
    workers = args.workers or usable_cpus()
    numbers = (
        workers,
        sizes.rounds,
        sizes.items,
        sizes.tasks,
        sizes.arrays,
        sizes.elements,
        sizes.tile_side,
    )
    if min(numbers) < 1 or not startup or min(startup) < 1 or (args.warmup or 0) < 0:
        ap.error(
            "--workers, --rounds, --items, --tasks, --arrays, --elements, --tile-side and "
            "--startup-workers must be positive"
        )
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
