#!/usr/bin/env python3
"""Parallel map: parallelkit side by side with the standard library and peer libraries.

Two workloads, every contender interleaved in one process (see ``_harness.py``):

* ``tiny``: 200,000 items of ``x*x`` -- nothing but per-item overhead;
* ``cpu``: 16 pure-Python tasks of ~0.1 s each (loop count calibrated at start-up) --
  speed-up over serial and efficiency (speed-up / workers).

Each contender runs *one-shot* (create a pool, map, shut it down: what one call costs) and
*warm* (on a pool created before timing and reused).  Peers (mpire, joblib, loky, pebble)
join when they are importable.  Every result is checked against ``list(map(fn, items))``.

Usage::

    python benchmarks/bench_map.py                     # default sizes, fork
    python benchmarks/bench_map.py --quick             # about a minute
    python benchmarks/bench_map.py --start-method spawn --json spawn.jsonl
    python benchmarks/bench_map.py --only 'pool|parallelkit' --rounds 9
    python benchmarks/bench_map.py --update-readme     # rewrite this start method's table
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _harness as h
from _tasks import burn, square

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
START_METHODS = ("fork", "forkserver", "spawn")


@dataclass
class Workload:
    key: str
    title: str
    fn: Callable[[int], int]
    items: list[int]
    ideal_speedup: int | None  # None: speed-up is not the point (tiny items)


# ------------------------------------------------------------------ contenders


def batched_chunksize(n: int, workers: int) -> int:
    """What ``Pool.map`` picks by default, ceil(n / (4 * workers)); given to PPE and peers.

    ``ProcessPoolExecutor.map`` defaults to ``chunksize=1``: one message per item, ~100x
    slower on tiny items, which measures nobody's engine.  We give it Pool's default rule.
    """
    return max(1, math.ceil(n / (4 * workers)))


def stdlib_contenders(sm: str, workers: int, chunksize: int) -> list[h.Contender[Any]]:
    ctx = multiprocessing.get_context(sm)

    def pool_open() -> Any:
        return ctx.Pool(workers)

    def pool_map(pool: Any, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return list(pool.map(fn, items))

    def pool_close(pool: Any) -> None:
        pool.close()  # graceful, like every other contender (Pool.__exit__ terminates)
        pool.join()

    def ppe_open() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=ctx)

    def ppe_map(
        ex: ProcessPoolExecutor, fn: Callable[[Any], Any], items: Sequence[Any]
    ) -> list[Any]:
        return list(ex.map(fn, items, chunksize=chunksize))

    def ppe_close(ex: ProcessPoolExecutor) -> None:
        ex.shutdown(wait=True)

    return [
        h.Contender(
            "Pool.map",
            "stdlib",
            "multiprocessing.Pool.map, default chunksize; close()+join()",
            pool_open,
            pool_map,
            pool_close,
            start_method=sm,
        ),
        h.Contender(
            "PPE.map",
            "stdlib",
            f"concurrent.futures.ProcessPoolExecutor.map(chunksize={chunksize}) "
            "(Pool's default rule; its own default of 1 is ~100x slower on tiny items)",
            ppe_open,
            ppe_map,
            ppe_close,
            start_method=sm,
        ),
    ]


def parallelkit_contenders(sm: str, workers: int) -> list[h.Contender[Any]]:
    import parallelkit as pk

    def one_shot(_: None, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return pk.run_parallel(fn, items, max_workers=workers, start_method=sm)  # type: ignore[arg-type]

    def pool_open() -> pk.WorkerPool:
        return pk.WorkerPool(workers, start_method=sm)  # type: ignore[arg-type]

    def pool_run(pool: pk.WorkerPool, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return pk.run_parallel(fn, items, backend=pool)

    def pool_imap(pool: pk.WorkerPool, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return list(pool.imap(fn, items))

    def pool_close(pool: pk.WorkerPool) -> None:
        pool.shutdown(wait=True)

    return [
        h.Contender(
            "parallelkit.run_parallel",
            "parallelkit",
            "run_parallel(fn, items, max_workers=W, start_method=SM), automatic chunksize",
            lambda: None,
            one_shot,
            lambda _: None,
            modes=("one-shot",),
            start_method=sm,
        ),
        h.Contender(
            "parallelkit.WorkerPool",
            "parallelkit",
            "run_parallel(fn, items, backend=pool) on a WorkerPool(W, start_method=SM)",
            pool_open,
            pool_run,
            pool_close,
            modes=("warm",),
            start_method=sm,
        ),
        h.Contender(
            "parallelkit.WorkerPool.imap",
            "parallelkit",
            "list(pool.imap(fn, items)) on a WorkerPool(W, start_method=SM)",
            pool_open,
            pool_imap,
            pool_close,
            modes=("warm",),
            start_method=sm,
        ),
    ]


def _shutdown_joblib_executor() -> None:
    """joblib keeps one process-wide loky executor alive after a call; stop it."""
    from joblib.externals.loky import reusable_executor

    executor = getattr(reusable_executor, "_executor", None)
    if executor is None:
        return
    if hasattr(executor, "terminate"):  # joblib's memmapping executor also cleans up files
        executor.terminate(kill_workers=False)
    else:
        executor.shutdown(wait=True)


def peer_contenders(
    sm: str, workers: int, chunksize: int
) -> tuple[list[h.Contender[Any]], dict[str, str]]:
    """The peers that are importable, and why the others are missing."""
    out: list[h.Contender[Any]] = []
    missing: dict[str, str] = {}
    ctx = multiprocessing.get_context(sm)

    try:  # loky before joblib: the other order breaks joblib's memmap clean-up (1 s stalls)
        import loky

        def loky_open() -> Any:
            return loky.ProcessPoolExecutor(max_workers=workers)

        def loky_map(ex: Any, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
            return list(ex.map(fn, items, chunksize=chunksize))

        def loky_close(ex: Any) -> None:
            ex.shutdown(wait=True)

        out.append(
            h.Contender(
                "loky.map",
                "peer",
                f"loky.ProcessPoolExecutor.map(chunksize={chunksize}); loky's own start method",
                loky_open,
                loky_map,
                loky_close,
                start_method="loky",
            )
        )
    except ImportError as exc:
        missing["loky"] = str(exc)

    try:
        import joblib

        def joblib_map(_: None, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
            return list(joblib.Parallel(n_jobs=workers)(joblib.delayed(fn)(x) for x in items))

        out.append(
            h.Contender(
                "joblib",
                "peer",
                "joblib.Parallel(n_jobs=W)(delayed(fn)(x) ...), batch_size auto, loky backend; "
                "one-shot only (its executor is process-wide: a warm one would be shared)",
                lambda: None,
                joblib_map,
                lambda _: _shutdown_joblib_executor(),
                modes=("one-shot",),
                start_method="loky",
            )
        )
    except ImportError as exc:
        missing["joblib"] = str(exc)

    try:
        import mpire

        def mpire_open() -> Any:
            return mpire.WorkerPool(n_jobs=workers, start_method=sm, keep_alive=True)

        def mpire_map(pool: Any, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
            return list(pool.map(fn, items))

        def mpire_close(pool: Any) -> None:
            pool.stop_and_join()

        out.append(
            h.Contender(
                "mpire.map",
                "peer",
                "mpire.WorkerPool(keep_alive=True).map, default chunk_size",
                mpire_open,
                mpire_map,
                mpire_close,
                start_method=sm,
            )
        )
    except ImportError as exc:
        missing["mpire"] = str(exc)

    try:
        import pebble

        def pebble_open() -> Any:
            return pebble.ProcessPool(max_workers=workers, context=ctx)

        def pebble_map(pool: Any, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
            return list(pool.map(fn, items, chunksize=chunksize).result())

        def pebble_close(pool: Any) -> None:
            pool.close()
            pool.join()

        out.append(
            h.Contender(
                "pebble.map",
                "peer",
                f"pebble.ProcessPool.map(chunksize={chunksize})",
                pebble_open,
                pebble_map,
                pebble_close,
                start_method=sm,
            )
        )
    except ImportError as exc:
        missing["pebble"] = str(exc)
    return out, missing


# ------------------------------------------------------------------ workloads


def calibrate(target_seconds: float) -> int:
    """Loop count for which ``burn`` takes ``target_seconds`` on one undisturbed core."""
    loops = 10_000
    while True:
        t0 = time.perf_counter()
        burn(loops)
        if time.perf_counter() - t0 >= 0.02:
            break
        loops *= 2
    tries = []
    for _ in range(5):
        t0 = time.perf_counter()
        burn(loops)
        tries.append(time.perf_counter() - t0)
    # the median, not the fastest: a brief try on an idle core runs faster than 16 tasks
    # on busy ones (the fastest try made tasks of ~0.15 s in a full run)
    return max(1, round(loops * target_seconds / statistics.median(tries)))


# ------------------------------------------------------------------ metadata


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _versions(names: Sequence[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def reexec_with_bytecode_cache() -> None:
    """Restart this script with ``.pyc`` files enabled, kept in a cache under /tmp.

    With ``PYTHONDONTWRITEBYTECODE`` set (as on our machines), a package run from its source
    tree -- parallelkit in an editable install -- is compiled anew by every spawn and
    forkserver child, while pip-installed peers ship their ``.pyc`` files: tens of ms per
    worker, charged to parallelkit alone.  Users have bytecode caches, so the benchmark does
    too.  The variable (and ``-B``, which multiprocessing passes on to its children) can only
    be dropped at interpreter start, hence the exec; the cache goes to a prefix outside the
    repository and is filled by the warm-up round.
    """
    if not sys.flags.dont_write_bytecode or os.environ.get(_REEXEC_MARK):
        return
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / "parallelkit-bench"))
    env[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


_REEXEC_MARK = "PARALLELKIT_BENCH_REEXEC"


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


# ------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--start-method", choices=START_METHODS, default="fork")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="50,000 items, 8 tasks of 0.05 s, 3 rounds (about a minute)",
    )
    ap.add_argument("--json", metavar="PATH", help="write JSON lines here ('-': stdout)")
    ap.add_argument(
        "--only",
        metavar="REGEX",
        help="contenders whose name matches (serial always runs: it is the reference)",
    )
    ap.add_argument(
        "--render",
        metavar="PATH",
        help="measure nothing: print (and with --update-readme, store) the tables of a --json file",
    )
    ap.add_argument("--workloads", default="tiny,cpu", help="comma-separated: tiny, cpu")
    ap.add_argument(
        "--update-readme",
        action="store_true",
        help=f"rewrite this start method's table in {README.name}",
    )
    ap.add_argument("--rounds", type=int, help="timed rounds (default 5; --quick 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument("--workers", type=int, default=usable_cpus())
    ap.add_argument("--items", type=int, help="tiny: items (default 200,000; --quick 50,000)")
    ap.add_argument("--tasks", type=int, help="cpu: tasks (default 16; --quick 8)")
    ap.add_argument("--task-seconds", type=float, help="cpu: seconds a task (0.1; --quick 0.05)")
    ap.add_argument("--no-peers", action="store_true", help="stdlib and parallelkit only")
    ap.add_argument(
        "--gate-seconds",
        type=float,
        default=1.0,
        help="before a sample, wait up to this long for a quiet CPU (0: never)",
    )
    ap.add_argument(
        "--sample-timeout",
        type=float,
        default=300.0,
        help="a sample running longer is a hang: dump every thread's stack and exit (300)",
    )
    ap.add_argument(
        "--keep-dont-write-bytecode",
        action="store_true",
        help="measure with PYTHONDONTWRITEBYTECODE as set (see reexec_with_bytecode_cache)",
    )
    ap.add_argument(
        "--no-leak-check",
        action="store_true",
        help="skip the check for child processes left behind after one-shot calls",
    )
    args = ap.parse_args(argv)
    q = args.quick
    args.rounds = args.rounds or (3 if q else 5)
    args.items = args.items or (50_000 if q else 200_000)
    args.tasks = args.tasks or (8 if q else 16)
    args.task_seconds = args.task_seconds or (0.05 if q else 0.1)
    if args.quick:
        args.gate_seconds = min(args.gate_seconds, 0.3)
    if args.workers < 1 or args.rounds < 1 or args.items < 1 or args.tasks < 1:
        ap.error("--workers, --rounds, --items and --tasks must be positive")
    return args


def build_contenders(
    args: argparse.Namespace, n_items: int
) -> tuple[list[h.Contender[Any]], dict[str, str]]:
    sm, w = args.start_method, args.workers
    cs = batched_chunksize(n_items, w)
    contenders: list[h.Contender[Any]] = [h.serial_contender()]
    contenders += stdlib_contenders(sm, w, cs)
    contenders += parallelkit_contenders(sm, w)
    missing: dict[str, str] = {}
    if not args.no_peers:
        peers, missing = peer_contenders(sm, w, cs)
        contenders += peers
    if args.only:
        keep = re.compile(args.only)
        contenders = [c for c in contenders if c.kind == "baseline" or keep.search(c.name)]
    return contenders, missing


def _shown_command(argv: Sequence[str]) -> str:
    """The command line, less the options that only say where the output goes."""
    shown: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--json", "--render"):
            skip = True
            continue
        if arg == "--update-readme" or arg.startswith(("--json=", "--render=")):
            continue
        shown.append(arg)
    return " ".join(["python benchmarks/bench_map.py", *shown])


def render(meta: dict[str, Any], sections: Sequence[tuple[str, str, str]]) -> str:
    """The README section of one run: a header line, then (workload, title, table)s."""
    peers = meta.get("peers") or {}
    missing = sorted(meta.get("peers_missing") or {})
    lines = [
        f"### {meta['start_method']}",
        "",
        f"Measured {meta['date']} on {meta['cpus']} cores ({meta['cpu_model']}), "
        f"Python {meta['python']}, parallelkit {meta['parallelkit']}"
        + (f" (git {meta['git']})" if meta.get("git") else "")
        + (", " + ", ".join(f"{k} {v}" for k, v in sorted(peers.items())) if peers else "")
        + f"; {meta['workers']} workers, {meta['rounds']} rounds after {meta['warmup']} "
        f"warm-up; `{meta['command']}`.",
    ]
    for key, title, table in sections:
        lines += ["", f"**{key}** — {title}", "", table]
    if missing:
        lines += ["", "Peers not installed (skipped): " + ", ".join(missing) + "."]
    return "\n".join(lines)


def render_saved(path: str, *, update_readme: bool) -> int:
    """``--render PATH``: tables from saved JSON lines, without measuring again."""
    meta, rows = h.rows_from_json(Path(path).read_text().splitlines())
    if not meta:
        raise SystemExit(f"{path}: no meta line; was it written by --json?")
    titles = {k: v.get("title", k) for k, v in (meta.get("workloads") or {}).items()}
    meta["command"] = _shown_command(meta.get("command", "").split()[2:])
    sections = [(key, titles.get(key, key), h.markdown_table(group)) for key, group in rows.items()]
    text = render(meta, sections)
    print(text)
    if update_readme:
        h.replace_between_markers(README, f"bench_map:{meta['start_method']}", text)
        h.log(f"# {README} updated ({meta['start_method']}) from {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return render_saved(args.render, update_readme=args.update_readme)
    sm, workers = args.start_method, args.workers
    if sm not in multiprocessing.get_all_start_methods():
        raise SystemExit(f"start method {sm!r} is not available here")
    if not args.keep_dont_write_bytecode:
        reexec_with_bytecode_cache()
    import parallelkit

    peers = ("mpire", "joblib", "loky", "pebble")
    meta: dict[str, Any] = {
        "type": "meta",
        "benchmark": "bench_map",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpus": usable_cpus(),
        "workers": workers,
        "start_method": sm,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "parallelkit": parallelkit.__version__,
        "git": _git_revision(),
        "bytecode": "off (-B)" if sys.flags.dont_write_bytecode else "on",
        "pycache_prefix": sys.pycache_prefix,
        "peers": _versions(peers),
        "command": _shown_command(sys.argv[1:] if argv is None else argv),
    }
    opts = h.RunOptions(
        rounds=args.rounds,
        warmup=args.warmup,
        gate_seconds=args.gate_seconds,
        sample_timeout=args.sample_timeout,
        check_leftovers=not args.no_leak_check,
    )
    wanted = {w.strip() for w in args.workloads.split(",") if w.strip()}
    workloads: list[Workload] = []
    if "tiny" in wanted:
        workloads.append(
            Workload(
                "tiny",
                f"{args.items:,} items, `x*x`: per-item overhead",
                square,
                list(range(args.items)),
                None,
            )
        )
    if "cpu" in wanted:
        loops = calibrate(args.task_seconds)
        meta["cpu_task_loops"] = loops
        ideal = min(workers, args.tasks)
        workloads.append(
            Workload(
                "cpu",
                f"{args.tasks} pure-Python tasks of ~{args.task_seconds:g} s "
                f"(`burn({loops:,})`); speed-up over serial, ideal {ideal}x",
                burn,
                [loops + i for i in range(args.tasks)],
                ideal,
            )
        )
    if not workloads:
        raise SystemExit("--workloads: choose from tiny, cpu")
    meta["workloads"] = {
        wl.key: {"title": wl.title, "items": len(wl.items), "ideal_speedup": wl.ideal_speedup}
        for wl in workloads
    }
    h.log(f"# bench_map: {sm}, {workers} workers, {args.rounds} rounds; python {meta['python']}")

    lines: list[str] = []
    sections: list[tuple[str, str, str]] = []
    missing: dict[str, str] = {}
    before = h._children()
    for wl in workloads:
        contenders, missing = build_contenders(args, len(wl.items))
        expected = list(map(wl.fn, wl.items))
        entries = h.run_interleaved(contenders, wl.fn, wl.items, expected, opts, title=wl.key)
        rows = h.summarise(wl.key, entries, speedup_over=wl.ideal_speedup)
        lines += h.json_lines(rows, meta)
        table = h.markdown_table(rows)
        sections.append((wl.key, wl.title, table))
        print(f"\n**{wl.key}** — {wl.title}\n\n{table}\n", flush=True)
    meta["peers_missing"] = missing
    if not args.no_leak_check:
        left = h.leftover_children(before)
        meta["leftover_processes_at_exit"] = left
        if left:
            h.log(f"# child processes still alive after every pool was closed: {left}")
    if args.json:
        import json

        text = "\n".join([json.dumps(meta), *lines]) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            Path(args.json).write_text(text)
            h.log(f"# JSON lines written to {args.json}")
    if args.update_readme:
        h.replace_between_markers(README, f"bench_map:{sm}", render(meta, sections))
        h.log(f"# {README} updated ({sm})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
