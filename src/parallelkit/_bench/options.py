"""The command-line options of both benchmark front ends.

``python -m parallelkit bench`` and ``benchmarks/bench_map.py`` take the same options; this
module imports only ``argparse``, so that ``python -m parallelkit info`` stays light.
"""

from __future__ import annotations

import argparse

START_METHODS = ("fork", "forkserver", "spawn")
WORKLOADS = ("tiny", "cpu", "arrays", "arrays-results", "startup")
# --quick leaves out the large results: with spawn, every one-shot sample starts workers that
# import numpy, and two array workloads took a minute on their own
QUICK_WORKLOADS = ("tiny", "cpu", "arrays", "startup")


def add_arguments(ap: argparse.ArgumentParser, *, start_method: str, hide_sizes: bool) -> None:
    """The options both front ends take; ``hide_sizes`` leaves the size knobs out of --help."""

    def sized(text: str) -> str:
        return argparse.SUPPRESS if hide_sizes else text

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
    ap.add_argument("--rounds", type=int, help=sized("timed rounds (5; --quick 3)"))
    ap.add_argument("--warmup", type=int, help=sized("untimed rounds first (1; --quick 0)"))
    ap.add_argument("--items", type=int, help=sized("tiny: items (200,000; --quick 10,000)"))
    ap.add_argument("--tasks", type=int, help=sized("cpu: tasks (16; --quick 4)"))
    ap.add_argument("--task-seconds", type=float, help=sized("cpu: seconds (0.1; --quick 0.03)"))
    ap.add_argument("--arrays", type=int, help=sized("arrays: how many (32; --quick 4)"))
    ap.add_argument(
        "--elements", type=int, help=sized("arrays: float64 elements an array (1,000,000)")
    )
    ap.add_argument(
        "--startup-workers",
        help=sized("startup: comma-separated worker counts (2,8; --quick 2)"),
    )
    ap.add_argument(
        "--gate-seconds",
        type=float,
        help=sized("before a sample, wait up to this long for a quiet CPU (1; --quick 0)"),
    )
    ap.add_argument(
        "--retries",
        type=int,
        help=sized("re-take a sample that other processes disturbed, this often (1; --quick 0)"),
    )
    ap.add_argument(
        "--sample-timeout",
        type=float,
        default=300.0,
        help=sized("a sample running longer is a hang: dump every thread's stack and exit (300)"),
    )
    ap.add_argument(
        "--no-leak-check",
        action="store_true",
        help=sized("skip the check for child processes left behind after one-shot calls"),
    )
