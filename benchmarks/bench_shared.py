#!/usr/bin/env python3
"""Shared memory: parallelkit's shared objects side by side with the stdlib and peers.

Two workloads, every contender interleaved in one process (see ``harness.py``):

* ``counter``: two worker processes each add 1 to one shared counter, ``--adds`` times, in
  a tight loop: ``SharedCounter.add(1)`` against the idiomatic exact stdlib way,
  ``with v.get_lock(): v.value += 1`` on a ``multiprocessing.Value``, and against the
  ceiling, counting in a local variable and merging once.  Every total is checked.
  Timed: start both processes, count, join (the same for every contender); the loop
  alone is also reported, as adds per second.
* ``array``: ``--tasks`` tasks each sum one slice of a ``--mb`` MB float64 array.
  parallelkit: a ``SharedArray`` made once, sent to ``WorkerPool`` tasks by reference.
  The same work on a hand-made ``SharedMemory`` block (tasks attach by name), through the
  same ``WorkerPool`` and through ``multiprocessing.Pool``.  Peers passing the array as an
  argument: joblib (the whole array; joblib memmaps it) and mpire (a slice per task).
  Every per-slice sum is checked (the data are small integers, so the sums are exact).

Usage::

    python benchmarks/bench_shared.py                    # fork, both workloads
    python benchmarks/bench_shared.py --quick            # smaller, 3 rounds
    python benchmarks/bench_shared.py --start-method spawn --workloads counter
    python benchmarks/bench_shared.py --update-readme    # rewrite this start method's table
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import multiprocessing
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Run as a file, this folder heads sys.path; the package imports from the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness as h
from benchmarks import shared_tasks as t
from benchmarks.settings import START_METHODS
from benchmarks.suite import cpu_model as _cpu_model
from benchmarks.suite import git_revision as _git_revision
from benchmarks.suite import reexec_with_bytecode_cache
from benchmarks.suite import shutdown_joblib_executor as _shutdown_joblib_executor
from benchmarks.suite import versions as _versions

if TYPE_CHECKING:
    from parallelkit import StartMethod

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
WORKERS = 2


def _no_fn(_: Any) -> Any:  # the harness passes a function; these contenders ignore it
    raise AssertionError("not called")


# ------------------------------------------------------------------ counter


def counter_contenders(sm: StartMethod, adds: int, loop_times: dict[str, list[float]]) -> list[Any]:
    ctx = multiprocessing.get_context(sm)

    def run_two(target: Callable[..., None], shared: Any, name: str) -> None:
        out = ctx.SimpleQueue()
        procs = [ctx.Process(target=target, args=(shared, adds, out)) for _ in range(WORKERS)]  # type: ignore[attr-defined]
        for p in procs:
            p.start()
        times = [out.get() for _ in procs]
        for p in procs:
            p.join()
            if p.exitcode != 0:
                raise RuntimeError(f"{name}: a worker exited with {p.exitcode}")
        loop_times.setdefault(name, []).append(max(times))

    def locked_value(_: None, fn: Any, items: Sequence[Any]) -> list[Any]:
        value = ctx.Value("q", 0)
        run_two(t.count_locked_value, value, "Value + get_lock()")
        return [value.value]

    def shared_counter(_: None, fn: Any, items: Sequence[Any]) -> list[Any]:
        import parallelkit as pk

        with pk.SharedCounter() as counter:
            run_two(t.count_shared_counter, counter, "parallelkit.SharedCounter")
            return [counter.value]

    def local(_: None, fn: Any, items: Sequence[Any]) -> list[Any]:
        value = ctx.Value("q", 0)
        run_two(t.count_locally, value, "local int, merged once")
        return [value.value]

    def contender(name: str, kind: h.Kind, note: str, fn: Any) -> h.Contender[None]:
        return h.Contender(
            name,
            kind,
            note,
            lambda: None,
            fn,
            lambda _: None,
            modes=("one-shot",),
            start_method=sm,
        )

    return [
        contender(
            "Value + get_lock()",
            "stdlib",
            "`with v.get_lock(): v.value += 1` on a multiprocessing.Value('q')",
            locked_value,
        ),
        contender("parallelkit.SharedCounter", "parallelkit", "`counter.add(1)`", shared_counter),
        contender(
            "local int, merged once",
            "baseline",
            "`local += 1`, then one locked `v.value += local`: the ceiling",
            local,
        ),
    ]


# ------------------------------------------------------------------ array


def array_contenders(
    sm: StartMethod, data: Any, tasks: int
) -> tuple[list[h.Contender[Any]], dict[str, str]]:
    import numpy as np

    import parallelkit as pk

    length = len(data)
    missing: dict[str, str] = {}

    def pk_open() -> tuple[pk.WorkerPool, pk.SharedArray]:
        return pk.WorkerPool(WORKERS, start_method=sm), pk.SharedArray.from_array(data)

    def pk_map(handle: Any, fn: Any, items: Sequence[Any]) -> list[Any]:
        pool, shared = handle
        work = [(shared, i, tasks) for i in range(tasks)]
        return pk.run_parallel(t.sum_shared_array, work, backend=pool)

    def pk_close(handle: Any) -> None:
        pool, shared = handle
        pool.shutdown()
        shared.close()

    def shm_block() -> Any:
        from multiprocessing import shared_memory

        block = shared_memory.SharedMemory(create=True, size=data.nbytes)
        np.ndarray(data.shape, data.dtype, buffer=block.buf)[:] = data
        return block

    def shm_close_block(block: Any) -> None:
        block.close()
        block.unlink()

    def shm_work(block: Any) -> list[tuple[str, int, str, int, int]]:
        return [(block.name, length, data.dtype.str, i, tasks) for i in range(tasks)]

    def shm_pk_open() -> tuple[pk.WorkerPool, Any]:
        return pk.WorkerPool(WORKERS, start_method=sm), shm_block()

    def shm_pk_map(handle: Any, fn: Any, items: Sequence[Any]) -> list[Any]:
        pool, block = handle
        return pk.run_parallel(t.sum_shared_memory, shm_work(block), backend=pool)

    def shm_pk_close(handle: Any) -> None:
        pool, block = handle
        pool.shutdown()
        shm_close_block(block)

    ctx = multiprocessing.get_context(sm)

    def shm_pool_open() -> tuple[Any, Any]:
        return ctx.Pool(WORKERS), shm_block()

    def shm_pool_map(handle: Any, fn: Any, items: Sequence[Any]) -> list[Any]:
        pool, block = handle
        return list(pool.map(t.sum_shared_memory, shm_work(block)))

    def shm_pool_close(handle: Any) -> None:
        pool, block = handle
        pool.close()
        pool.join()
        shm_close_block(block)

    out: list[h.Contender[Any]] = [
        h.Contender(
            "parallelkit SharedArray",
            "parallelkit",
            "SharedArray made once; run_parallel(task, [(shared, i) ...], backend=WorkerPool)",
            pk_open,
            pk_map,
            pk_close,
            modes=("warm",),
            start_method=sm,
        ),
        h.Contender(
            "SharedMemory by hand, WorkerPool",
            "stdlib",
            "the same work on a hand-made SharedMemory block (tasks attach by name), same pool",
            shm_pk_open,
            shm_pk_map,
            shm_pk_close,
            modes=("warm",),
            start_method=sm,
        ),
        h.Contender(
            "SharedMemory by hand, Pool.map",
            "stdlib",
            "the same, through multiprocessing.Pool.map",
            shm_pool_open,
            shm_pool_map,
            shm_pool_close,
            modes=("warm",),
            start_method=sm,
        ),
    ]
    try:
        joblib: Any = importlib.import_module("joblib")

        def joblib_map(_: None, fn: Any, items: Sequence[Any]) -> list[Any]:
            run = joblib.Parallel(n_jobs=WORKERS)
            return list(
                run(joblib.delayed(t.sum_array_slice)(data, i, tasks) for i in range(tasks))
            )

        out.append(
            h.Contender(
                "joblib (array as argument)",
                "peer",
                "Parallel(n_jobs=W)(delayed(task)(array, i) ...): joblib memmaps the array",
                lambda: None,
                joblib_map,
                lambda _: _shutdown_joblib_executor(),
                modes=("warm",),
            )
        )
    except ImportError as exc:
        missing["joblib"] = str(exc)
    try:
        mpire: Any = importlib.import_module("mpire")

        def mpire_open() -> Any:
            return mpire.WorkerPool(WORKERS, start_method=sm, keep_alive=True)

        def mpire_map(pool: Any, fn: Any, items: Sequence[Any]) -> list[Any]:
            bounds = [t._bounds(length, i, tasks) for i in range(tasks)]
            slices = [(data[a:b],) for a, b in bounds]
            return list(pool.map(t.sum_array, slices))

        out.append(
            h.Contender(
                "mpire (slices as arguments)",
                "peer",
                "WorkerPool(W, keep_alive=True).map(task, [(array[a:b],) ...]): pickled slices",
                mpire_open,
                mpire_map,
                lambda pool: pool.terminate(),
                modes=("warm",),
                start_method=sm,
            )
        )
    except ImportError as exc:
        missing["mpire"] = str(exc)
    for name, why in missing.items():
        h.log(f"# array: peer {name} is not installed, skipped ({why})")
    return out, missing


# ------------------------------------------------------------------ reporting


def _ratio(entries: Sequence[h.Entry], a: str, b: str) -> float | None:
    """Median over rounds of time(a) / time(b)."""
    by_name = {e.contender.name: e for e in entries if e.samples and e.error is None}
    if a not in by_name or b not in by_name:
        return None
    return statistics.median(h.paired_ratios(by_name[a].samples, by_name[b].samples))


def counter_summary(
    entries: Sequence[h.Entry], adds: int, loop_times: dict[str, list[float]]
) -> list[str]:
    lines = ["| contender | adds/s inside the loop, both workers (median) |", "|---|---|"]
    for name, times in loop_times.items():
        rate = WORKERS * adds / statistics.median(times)
        lines.append(f"| {name} | {rate / 1e6:.2f} M |")
    whole = _ratio(entries, "Value + get_lock()", "parallelkit.SharedCounter")
    values = loop_times.get("Value + get_lock()")
    ours = loop_times.get("parallelkit.SharedCounter")
    if whole is not None and values and ours:
        loop = statistics.median(values) / statistics.median(ours)
        lines += [
            "",
            f"SharedCounter against the locked Value: **{loop:.1f}x** as fast inside the loop "
            f"(goal: 25x), {whole:.1f}x for the whole run (start, count, join).",
        ]
    return lines


def array_summary(entries: Sequence[h.Entry]) -> list[str]:
    ours = "parallelkit SharedArray"
    lines = []
    for other, goal in (
        ("SharedMemory by hand, WorkerPool", "goal: within 1.2x"),
        ("SharedMemory by hand, Pool.map", ""),
    ):
        r = _ratio(entries, ours, other)
        if r is not None:
            lines.append(f"- SharedArray / {other}: **{r:.2f}x**" + (f" ({goal})" if goal else ""))
    peers = [
        (r, name)
        for name in ("joblib (array as argument)", "mpire (slices as arguments)")
        if (r := _ratio(entries, ours, name)) is not None
    ]
    if peers:
        best = max(peers)  # the largest ratio: against the fastest peer
        lines.append(
            f"- SharedArray / best peer ({best[1]}): **{best[0]:.2f}x** (goal: at most 0.5x)"
        )
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--start-method", choices=START_METHODS, default="fork")
    ap.add_argument("--workloads", default="counter,array", help="counter, array (default both)")
    ap.add_argument("--adds", type=int, default=500_000, help="adds per worker (counter)")
    ap.add_argument("--mb", type=int, default=256, help="array size in MB (array)")
    ap.add_argument("--tasks", type=int, default=32, help="tasks, one slice each (array)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--gate-seconds", type=float, default=1.0)
    ap.add_argument("--quick", action="store_true", help="100,000 adds, 64 MB, 3 rounds")
    ap.add_argument("--update-readme", action="store_true")
    ap.add_argument("--keep-dont-write-bytecode", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.adds, args.mb, args.rounds = 100_000, 64, 3
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sm = args.start_method
    if not args.keep_dont_write_bytecode:
        reexec_with_bytecode_cache()
    import parallelkit

    opts = h.RunOptions(rounds=args.rounds, warmup=args.warmup, gate_seconds=args.gate_seconds)
    wanted = {w.strip() for w in args.workloads.split(",") if w.strip()}
    peers = _versions(("numpy", "joblib", "mpire"))
    shown = " ".join(
        [
            "python benchmarks/bench_shared.py",
            *(a for a in (argv or sys.argv[1:]) if a != "--update-readme"),
        ]
    )
    lines = [
        f"### {sm}",
        "",
        f"Measured {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on "
        f"{len(os.sched_getaffinity(0))} cores ({_cpu_model()}), Python "
        f"{platform.python_version()}, parallelkit {parallelkit.__version__}"
        + (f" (git {g})" if (g := _git_revision()) else "")
        + (", " + ", ".join(f"{k} {v}" for k, v in sorted(peers.items())) if peers else "")
        + f"; {WORKERS} workers, {args.rounds} rounds after {args.warmup} warm-up; `{shown}`.",
    ]
    if "counter" in wanted:
        loop_times: dict[str, list[float]] = {}
        expected = [WORKERS * args.adds]
        contenders = counter_contenders(sm, args.adds, loop_times)
        entries = h.run_interleaved(contenders, _no_fn, [None], expected, opts, title="counter")
        for name in loop_times:  # drop the warm-up rounds' loop times
            loop_times[name] = loop_times[name][args.warmup :]
        table = h.markdown_table(h.summarise("counter", entries))
        title = f"two workers, {args.adds:,} `add(1)` each, exact total checked"
        lines += [
            "",
            f"**counter** — {title}",
            "",
            table,
            "",
            *counter_summary(entries, args.adds, loop_times),
        ]
    if "array" in wanted:
        import numpy as np

        length = args.mb * 2**20 // 8
        data = (np.arange(length) % 1000).astype(np.float64)
        expected_sums = [
            float(data[a:b].sum())
            for a, b in (t._bounds(length, i, args.tasks) for i in range(args.tasks))
        ]
        contenders, _missing = array_contenders(sm, data, args.tasks)
        entries = h.run_interleaved(contenders, _no_fn, [None], expected_sums, opts, title="array")
        table = h.markdown_table(h.summarise("array", entries))
        title = f"{args.tasks} tasks each sum a slice of a {args.mb} MB float64 array"
        lines += ["", f"**array** — {title}", "", table, "", *array_summary(entries)]
        for name in _missing:
            lines.append(f"- {name} is not installed here: skipped.")
    text = "\n".join(lines)
    print(text, flush=True)
    if args.update_readme:
        h.replace_between_markers(README, f"bench_shared:{sm}", text)
        h.log(f"# {README} updated ({sm})")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
