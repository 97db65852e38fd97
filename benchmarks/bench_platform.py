"""What the portable fallbacks cost: Linux fast paths against portable mode, interleaved.

python benchmarks/bench_platform.py [--rounds N] [--quick] [--workloads a,b] [--portable LIST]

Portable mode (``PARALLELKIT_PORTABLE=1``) is decided once when parallelkit is imported,
so each sample runs in a fresh interpreter (``--child MODE WORKLOAD``) that times the
workload alone (not its own start-up) and prints the seconds.  Rounds alternate the two
modes (fast, portable, fast, ...; the order flips every round), and the table gives the
median of each and the median of the per-round ratios (portable / fast): on a shared
machine ratios within a round are what to compare, not absolute times.  Portable mode's
segments go to a temporary directory of this run (``TMPDIR``), which is on whatever file
system holds it: on a disk, as on macOS, not in ``/dev/shm``.  ``--portable seqpacket``
(any value of ``PARALLELKIT_PORTABLE``) forces only those fallbacks: one facility's cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from parallelkit import StartMethod

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20


def _squares(method: StartMethod, workers: int, items: int) -> None:
    import parallelkit as pk
    from benchmarks import tasks

    got = pk.run_parallel(tasks.square, range(items), max_workers=workers, start_method=method)
    assert got[-1] == (items - 1) ** 2


def _arrays(quick: bool) -> Callable[[], None]:
    import numpy as np

    import parallelkit as pk
    from benchmarks import tasks

    arrays = [np.full(MB, float(i)) for i in range(4 if quick else 16)]  # 8 MB each
    pool = pk.WorkerPool(2, start_method="fork")
    pk.run_parallel(tasks.square, range(4), backend=pool)  # started: only the map is timed

    def run() -> None:
        try:
            sums = pk.run_parallel(tasks.array_sum, arrays, backend=pool, chunksize=1)
            assert sums == [float(i) * MB for i in range(len(arrays))]
        finally:
            pool.shutdown()

    return run


def _results(quick: bool) -> Callable[[], None]:
    import parallelkit as pk
    from benchmarks import tasks

    count = 4 if quick else 16
    pool = pk.WorkerPool(2, start_method="fork")
    pk.run_parallel(tasks.square, range(4), backend=pool)

    def run() -> None:
        try:
            got = pk.run_parallel(
                tasks.make_array, [(i, MB) for i in range(count)], backend=pool, chunksize=1
            )
            assert all(int(a[0]) == i for i, a in enumerate(got))
        finally:
            pool.shutdown()

    return run


def _logs(quick: bool, size: int, count: int) -> Callable[[], None]:
    import logging

    import parallelkit as pk
    from benchmarks import tasks

    logger = logging.getLogger("benchmarks.tasks")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    n = count // 10 if quick else count
    pool = pk.WorkerPool(2, start_method="fork")
    pk.run_parallel(tasks.square, range(4), backend=pool)

    def run() -> None:
        try:
            got = pk.run_parallel(tasks.log_item, [(i, size) for i in range(n)], backend=pool)
            assert got == list(range(n))
        finally:
            pool.shutdown()

    return run


def _shared_array(quick: bool) -> None:
    import parallelkit as pk

    for _ in range(2 if quick else 8):
        with pk.SharedArray.zeros(8 * MB) as shared:  # 64 MB, all of it reserved
            assert shared.array[-1] == 0


def _queue(quick: bool) -> None:
    import multiprocessing

    import parallelkit as pk
    from benchmarks import tasks

    n = 2_000 if quick else 20_000
    queue: pk.Queue[int] = pk.Queue(start_method="fork")
    producer = multiprocessing.get_context("fork").Process(target=tasks.fill_queue, args=(queue, n))
    producer.start()
    total = sum(queue.get(timeout=60) for _ in range(n))
    producer.join()
    assert total == n * (n - 1) // 2


WORKLOADS: dict[str, str] = {
    "startup-spawn": "start 2 spawn workers, map 100 ints, shut down (slots, parent-death "
    "watch, reaping)",
    "startup-fork": "the same under fork",
    "tiny-fork": "200,000 ints (10,000 --quick) through a fresh fork pool",
    "arrays": "16 arrays of 8 MB as arguments through a warm fork pool (the arena)",
    "arrays-results": "16 results of 8 MB through a warm fork pool (worker segments)",
    "shared-array": "create and free a 64 MB SharedArray, 8 times (space reserved)",
    "queue": "20,000 ints through a Queue from a forked producer (record locks, state file)",
    "logs": "20,000 WARNING records of 100 characters from a warm fork pool's workers "
    "(log socket: SOCK_SEQPACKET, or SOCK_DGRAM with a header)",
    "logs-large": "2,000 WARNING records of 60,000 characters (the same; macOS's default "
    "buffers would cut them in pieces)",
}


def child(workload: str, quick: bool) -> float:
    """Run one workload in this interpreter; its seconds."""
    setup: Callable[[], None] | None = None
    if workload == "arrays":
        setup = _arrays(quick)
    elif workload == "arrays-results":
        setup = _results(quick)
    elif workload == "logs":
        setup = _logs(quick, 100, 20_000)
    elif workload == "logs-large":
        setup = _logs(quick, 60_000, 2_000)
    start = time.perf_counter()
    if setup is not None:
        setup()
    elif workload == "startup-spawn":
        _squares("spawn", 2, 100)
    elif workload == "startup-fork":
        _squares("fork", 2, 100)
    elif workload == "tiny-fork":
        _squares("fork", 2, 10_000 if quick else 200_000)
    elif workload == "shared-array":
        _shared_array(quick)
    elif workload == "queue":
        _queue(quick)
    else:
        raise SystemExit(f"unknown workload {workload!r}")
    return time.perf_counter() - start


def _sample(mode: str, workload: str, quick: bool, tmpdir: str, portable: str = "1") -> float:
    env = dict(os.environ)
    env["PARALLELKIT_PORTABLE"] = portable if mode == "portable" else "0"
    env["TMPDIR"] = tmpdir
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH")) if p
    )
    command = [sys.executable, "-m", "benchmarks.bench_platform", "--child", mode, workload]
    if quick:
        command.append("--quick")
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{mode} {workload} failed:\n{out.stderr}")
    return float(json.loads(out.stdout.splitlines()[-1])["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, 3 rounds")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument(
        "--portable", default="1", help="PARALLELKIT_PORTABLE of the portable mode (1: all)"
    )
    parser.add_argument("--child", nargs=2, metavar=("MODE", "WORKLOAD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"seconds": child(args.child[1], args.quick)}))
        return
    rounds = 3 if args.quick and args.rounds == 7 else args.rounds
    names = [w for w in args.workloads.split(",") if w]
    load = os.getloadavg()
    print(
        f"# {rounds} rounds, PARALLELKIT_PORTABLE={args.portable} as the portable mode, "
        f"Python {sys.version.split()[0]}, load average {load[0]:.2f} "
        f"{load[1]:.2f} {load[2]:.2f} at the start",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="pk-bench-platform-") as tmpdir:
        for name in names:
            times: dict[str, list[float]] = {"fast": [], "portable": []}
            ratios = []
            for r in range(rounds):
                order = ("fast", "portable") if r % 2 == 0 else ("portable", "fast")
                got = {
                    mode: _sample(mode, name, args.quick, tmpdir, args.portable) for mode in order
                }
                for mode, seconds in got.items():
                    times[mode].append(seconds)
                ratios.append(got["portable"] / got["fast"])
            fast, portable = (statistics.median(times[m]) for m in ("fast", "portable"))
            rows.append((name, fast, portable, statistics.median(ratios), min(ratios), max(ratios)))
            print(
                f"{name}: fast {fast * 1000:.1f} ms, portable {portable * 1000:.1f} ms", flush=True
            )
    print(f"# load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end\n")
    print(
        "| workload | Linux fast paths (median) | portable mode (median) | portable / fast "
        "(median of paired ratios, [min, max]) |"
    )
    print("| --- | ---: | ---: | --- |")
    for name, fast, portable, ratio, low, high in rows:
        print(
            f"| `{name}` | {fast * 1000:.1f} ms | {portable * 1000:.1f} ms | "
            f"{ratio:.2f}x [{low:.2f}, {high:.2f}] |"
        )


if __name__ == "__main__":
    main()
