"""``python -m parallelkit``: ``info`` about this machine, and a ``demo``.

- ``python -m parallelkit info``: the usable CPU count, the start methods and the default,
  the Python version, and whether the optional cloudpickle, numpy and distributed (Dask)
  are installed.
- ``python -m parallelkit demo``: a CPU-bound map, serial versus parallel under each start
  method, then a worker that kills itself, reported as ``WorkerCrashedError``.
- ``python -m parallelkit bench [--quick] [--json]``: parallel map, parallelkit side by side
  with ``multiprocessing.Pool`` and ``ProcessPoolExecutor`` (standard library only): tiny
  items, CPU-bound tasks, worker start-up.  The comparison with the peer libraries is the
  repository's benchmark suite, ``python -m benchmarks`` in a checkout.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Sequence
from typing import TextIO

from parallelkit import __version__, _bench, _platform
from parallelkit._util.context import (
    available_start_methods,
    default_start_method,
    usable_cpu_count,
)
from parallelkit._util.types import StartMethod


def _optional(distribution: str) -> str:
    if importlib.util.find_spec(distribution) is None:
        return "not installed"
    try:
        return f"installed ({importlib.metadata.version(distribution)})"
    except importlib.metadata.PackageNotFoundError:
        return "installed"


def _fast_paths() -> str:
    offers = _platform.OFFERS
    fallbacks = [name for name in _platform.FACILITIES if not getattr(offers, name)]
    if not fallbacks:
        return "all (Linux)"
    why = f"{_platform.PORTABLE_ENV} set" if _platform.FORCED else "not offered here"
    kept = [name for name in _platform.FACILITIES if getattr(offers, name)]
    return f"{', '.join(kept) or 'none'} (portable fallbacks, {why}: {', '.join(fallbacks)})"


def info(out: TextIO) -> int:
    """Print what parallelkit sees on this machine."""
    cpus = usable_cpu_count()
    methods = ", ".join(available_start_methods())
    rows = [
        ("parallelkit", __version__),
        ("Python", f"{platform.python_version()} ({platform.python_implementation()})"),
        ("platform", platform.platform()),
        ("usable CPUs", f"{cpus} (os.cpu_count(): {os.cpu_count()})"),
        ("fast paths", _fast_paths()),
        ("start methods", methods),
        ("default start method", default_start_method()),
        ("cloudpickle", _optional("cloudpickle")),
        ("numpy", _optional("numpy")),
        ("distributed", _optional("distributed")),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name + ':':<{width + 1}} {value}", file=out)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m parallelkit",
        description="parallelkit: typed, safe and fast multiprocessing.",
    )
    parser.add_argument("--version", action="version", version=f"parallelkit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="usable CPUs, start methods, Python version, optional extras")
    demo = commands.add_parser(
        "demo", help="a CPU-bound map, serial vs parallel, and a crashing worker (a few seconds)"
    )
    demo.add_argument(
        "--start-method",
        action="append",
        choices=available_start_methods(),
        dest="start_methods",
        help="run only under this start method (repeatable; default: every available one)",
    )
    demo.add_argument("--items", type=int, help="number of items (default: 4 per usable CPU)")
    demo.add_argument(
        "--item-seconds", type=float, help="approximate CPU seconds per item (default: auto)"
    )
    bench = commands.add_parser(
        "bench",
        help="parallel map against the standard library's pools (--quick: under a minute)",
        description="Parallel map: parallelkit side by side with multiprocessing.Pool and "
        "ProcessPoolExecutor; interleaved rounds, medians, ratios. The comparison with "
        f"mpire, joblib, loky and pebble: {_bench.FULL_SUITE} in a checkout of the repository.",
    )
    _bench.add_arguments(
        bench, start_methods=available_start_methods(), default=default_start_method()
    )
    bench.set_defaults(parser=bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "info":
        return info(sys.stdout)
    if args.command == "bench":
        return _bench.run(args.parser, args)
    from parallelkit._demo import DemoPlan, run_demo  # the demo imports the engine; info does not

    methods: list[StartMethod] = args.start_methods or list(available_start_methods())
    plan = DemoPlan.for_this_machine(usable_cpu_count())
    if args.items is not None or args.item_seconds is not None:
        plan = DemoPlan(
            items=args.items if args.items is not None else plan.items,
            item_seconds=args.item_seconds if args.item_seconds is not None else plan.item_seconds,
        )
    return run_demo(methods, plan=plan, out=sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
