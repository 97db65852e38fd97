"""Where the time of one ``run_parallel`` call goes: a timeline of parent and workers.

Runs ``--calls`` one-shot calls of one workload under one start method with
``PARALLELKIT_TIMELINE`` set (``parallelkit._util.timeline``): the parent and every worker
append ``pid perf_counter_ns event`` at start-up, each task sent and taken, each reply,
and at shutdown.  Prints, per event, the median over the calls of its time after the
call began (first and last occurrence), and the median totals of the phases::

    python benchmarks/bench_timeline.py --start-method forkserver --workload arrays
    python benchmarks/bench_timeline.py --start-method spawn --workload tiny --calls 9

The timestamps cost about 10 us each (an open, a write and a close), a few per chunk: on
the tiny workload (a few dozen chunks) they add well under a millisecond.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _events(path: str, call_pid: int) -> list[tuple[float, str, str]]:
    """``(ms after the call began, who, event)``; numbers in events are dropped."""
    rows: list[tuple[int, int, str]] = []
    with open(path) as f:
        for line in f:
            pid_text, ns_text, what = line.rstrip("\n").split(" ", 2)
            rows.append((int(ns_text), int(pid_text), what))
    rows.sort()
    t0 = next(ns for ns, _, what in rows if what == "call.start")
    workers: dict[int, str] = {}
    out = []
    for ns, pid, what in rows:
        who = "parent" if pid == call_pid else workers.setdefault(pid, f"w{len(workers)}")
        out.append(((ns - t0) / 1e6, who, what))
    return out


def _key(who: str, what: str) -> str:
    head = what.split(" (", maxsplit=1)[0]
    words = [w for w in head.split() if not w.isdigit() and not w.startswith("parallelkit-")]
    if words and words[-1] == "to":
        words = words[:-1]
    if words and words[-1] == "from":
        words = words[:-1]
    return ("parent " if who == "parent" else "worker ") + " ".join(words)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start-method", default="fork", choices=("fork", "forkserver", "spawn"))
    parser.add_argument("--workload", default="arrays", choices=("arrays", "tiny", "tiles"))
    parser.add_argument("--calls", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--arrays", type=int, default=32)
    parser.add_argument("--elements", type=int, default=1_000_000)
    parser.add_argument("--keep", help="also write the raw stamps of the last call here")
    args = parser.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="pk-timeline-")
    path = os.path.join(tmp, "stamps")
    os.environ["PARALLELKIT_TIMELINE"] = path  # before parallelkit (and its server) starts
    import parallelkit
    from benchmarks import tasks
    from parallelkit._util import timeline

    items: Any
    if args.workload == "arrays":
        import numpy as np

        rng = np.random.default_rng(0)
        items = [rng.random(args.elements) for _ in range(args.arrays)]
        fn: Any = tasks.array_sum
    elif args.workload == "tiles":  # bench_map's tiles: imap_parallel over a generator
        import numpy as np

        image = np.random.default_rng(0).random((2048, 4096))
        fn = tasks.tile_scale
    else:
        items = list(range(args.items))
        fn = tasks.square

    def one() -> float:
        t = time.perf_counter()
        if args.workload == "tiles":
            side = 512
            tiles = (
                (y, x, image[y : y + side, x : x + side])
                for y in range(0, image.shape[0], side)
                for x in range(0, image.shape[1], side)
            )
            out = np.empty_like(image)
            with parallelkit.imap_parallel(
                fn, tiles, max_workers=args.workers, start_method=args.start_method
            ) as it:
                for y, x, tile in it:
                    out[y : y + side, x : x + side] = tile
        else:
            parallelkit.run_parallel(
                fn, items, max_workers=args.workers, start_method=args.start_method
            )
        return time.perf_counter() - t

    one()  # the forkserver started, imports warm
    firsts: dict[str, list[float]] = defaultdict(list)
    lasts: dict[str, list[float]] = defaultdict(list)
    totals: dict[str, list[float]] = defaultdict(list)
    order: dict[str, float] = {}
    for _ in range(args.calls):
        if os.path.exists(path):
            os.unlink(path)
        cpu0 = time.process_time()
        timeline.stamp("call.start")
        one()
        timeline.stamp("call.end")
        cpu_ms = (time.process_time() - cpu0) * 1e3
        time.sleep(0.3)  # late stamps (a worker's exit) land before we read
        events = _events(path, os.getpid())
        seen: dict[str, float] = {}
        last: dict[str, float] = {}
        for ms, who, what in events:
            key = _key(who, what)
            seen.setdefault(key, ms)
            last[key] = ms
        for key, ms in seen.items():
            firsts[key].append(ms)
            lasts[key].append(last[key])
            order[key] = order.get(key, 0.0) + ms
        # phases: the parent's copying into the arena, the workers' time in the function
        put = sum(
            b[0] - a[0]
            for a, b in itertools.pairwise(events)
            if a[2].startswith("parent.arena_put") and b[1] == "parent"
        )
        totals["parent: arena copies (ms)"].append(put)
        fn_ms = sum(float(w.split("(")[1].split()[0]) for _, _, w in events if " in fn)" in w)
        totals["workers: in the function (ms, summed)"].append(fn_ms)
        totals["call (ms)"].append(last["parent call.end"])
        totals["parent: CPU during the call (ms)"].append(cpu_ms)
        totals["workers: CPU, start to exit (ms, summed)"].append(
            sum(float(w.split("(cpu ")[1].split()[0]) for _, _, w in events if "(cpu " in w)
        )
        if args.keep:
            with open(args.keep, "w") as f:
                f.writelines(f"{ms:9.3f} {who:6} {what}\n" for ms, who, what in events)
    os.unlink(path)
    os.rmdir(tmp)
    print(
        f"# timeline: {args.workload}, {args.start_method}, {args.workers} workers, "
        f"median of {args.calls} calls (ms after the call began); load {os.getloadavg()[0]:.2f}"
    )
    print(f"{'event':42} {'first':>8} {'last':>8}")
    for key in sorted(order, key=lambda k: statistics.median(firsts[k])):
        n = len(firsts[key])
        if n < args.calls // 2:
            continue
        print(
            f"{key:42} {statistics.median(firsts[key]):8.2f} {statistics.median(lasts[key]):8.2f}"
        )
    for key, values in totals.items():
        print(f"{key:42} {statistics.median(values):8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
