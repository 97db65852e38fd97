"""``python -m parallelkit bench``: a quick parallel-map comparison with the standard library.

parallelkit (``run_parallel``, a ``WorkerPool``) side by side with ``multiprocessing.Pool``
and ``ProcessPoolExecutor``, under one start method, on the user's own machine, with
nothing but the standard library::

    tiny        many items of x*x: nothing but per-item overhead
    cpu         pure-Python tasks: speed-up over serial
    startup-W   start W workers, each runs one x*x, shut down; against W bare Processes

Every contender runs in this one process, interleaved: one-shot (start, map, shut down, all
timed) and warm (the map alone, on a pool started before timing).  Round r runs them in an
order rotated by r, and ratios are taken round by round (a shared machine's load drifts
over a run, and both samples of one round saw about the same load).  Every result is
checked against ``list(map(fn, items))``.

The peer libraries (mpire, joblib, loky, pebble), large numpy arrays, a noise meter and the
project's published tables are the repository's benchmark suite, ``python -m benchmarks``,
run from a checkout (``benchmarks/README.md``).  It is not installed with the package, so a
peer's API change cannot break an installed release.

Workers of every contender import this module to find the task functions: only modules
that ``import parallelkit`` already loads are imported at the top.
"""

from __future__ import annotations

import faulthandler
import gc
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple, TextIO

if TYPE_CHECKING:
    import argparse
    from multiprocessing.connection import Connection

FULL_SUITE: Final = "python -m benchmarks"
"""The full comparison, run from a checkout of the repository."""
WORKLOADS: Final = ("tiny", "cpu", "startup")
SAMPLE_TIMEOUT_S: Final = 300.0
"""A sample that runs longer is a hang: every thread's stack is dumped and the run exits."""

Mode = Literal["serial", "one-shot", "warm"]
Kind = Literal["baseline", "stdlib", "parallelkit"]
MapFn = Callable[[Any, Callable[[Any], Any], Sequence[Any]], list[Any]]


class Sizes(NamedTuple):
    items: int  # tiny
    tasks: int  # cpu
    task_seconds: float
    rounds: int
    warmup: int  # untimed rounds first


FULL: Final = Sizes(items=200_000, tasks=16, task_seconds=0.1, rounds=5, warmup=1)
# --quick: under a minute under every start method on 2 cores (benchmarks/README.md has the
# times); no warm-up round (the median of 3 rounds drops a first round's one-time costs)
QUICK: Final = Sizes(items=10_000, tasks=4, task_seconds=0.03, rounds=3, warmup=0)


# ------------------------------------------------------------------ tasks (sent by name)


def square(x: int) -> int:
    """The tiny task: almost no work, so only the per-item overhead shows."""
    return x * x


def spin(rounds: int) -> int:
    """Pure-Python busy work: ``rounds`` steps of a small hash; holds the GIL throughout."""
    total = 0
    for i in range(rounds):
        total = (total * 31 + i) % 1_000_003
    return total


def run_one(fn: Callable[[Any], Any], x: Any, conn: Connection) -> None:
    """The body of one bare ``multiprocessing.Process``: ``fn(x)``, sent back on ``conn``."""
    conn.send(fn(x))
    conn.close()


# ------------------------------------------------------------------ contenders


class Contender(NamedTuple):
    """One way to map: ``open`` a pool, ``map`` on it, ``close`` it, timed in ``modes``."""

    name: str
    kind: Kind
    modes: tuple[Mode, ...]
    map: MapFn
    open: Callable[[], Any] = lambda: None
    close: Callable[[Any], None] = lambda _: None


class Entry(NamedTuple):
    """A (contender, mode) of a run: its warm pool (if any), samples, and what went wrong."""

    contender: Contender
    mode: Mode
    handle: list[Any]  # the warm pool, while the run holds one
    samples: list[float]
    errors: list[str]


def _serial(_: None, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    return list(map(fn, items))


def contenders(method: str, workers: int, n_items: int, *, startup: bool) -> list[Contender]:
    """The stdlib's pools and parallelkit's, plus the reference (serial, or bare processes)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import parallelkit as pk

    ctx = multiprocessing.get_context(method)
    sm: pk.StartMethod = method  # type: ignore[assignment]  # checked by the options
    # ProcessPoolExecutor's own default, one item a message, measures nobody's engine: it
    # gets Pool's rule, ceil(n / (4 * workers)), as Pool.map applies by default
    chunksize = max(1, math.ceil(n_items / (4 * workers)))
    pools: tuple[Mode, ...] = ("one-shot",) if startup else ("one-shot", "warm")

    def pool_close(pool: Any) -> None:
        pool.close()  # graceful, as every other contender (Pool.__exit__ terminates)
        pool.join()

    def bare_processes(_: None, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        pipes = [ctx.Pipe(duplex=False) for _x in items]
        procs = [
            ctx.Process(target=run_one, args=(fn, x, pipe[1]))  # type: ignore[attr-defined]
            for x, pipe in zip(items, pipes, strict=True)
        ]
        for proc, (_recv, send) in zip(procs, pipes, strict=True):
            proc.start()
            send.close()
        out = [recv.recv() for recv, _send in pipes]
        for proc in procs:
            proc.join()
        for recv, _send in pipes:
            recv.close()
        return out

    reference = (
        Contender("Process", "baseline", ("one-shot",), bare_processes)
        if startup
        else Contender("serial", "baseline", ("serial",), _serial)
    )
    return [
        reference,
        Contender(
            "Pool.map",
            "stdlib",
            pools,
            lambda pool, fn, items: pool.map(fn, items),
            lambda: ctx.Pool(workers),
            pool_close,
        ),
        Contender(
            "PPE.map",
            "stdlib",
            pools,
            lambda ex, fn, items: list(ex.map(fn, items, chunksize=chunksize)),
            lambda: ProcessPoolExecutor(workers, mp_context=ctx),
            lambda ex: ex.shutdown(wait=True),
        ),
        Contender(
            "parallelkit.run_parallel",
            "parallelkit",
            ("one-shot",),
            lambda _, fn, items: pk.run_parallel(fn, items, max_workers=workers, start_method=sm),
        ),
        Contender(
            "parallelkit.WorkerPool",
            "parallelkit",
            ("one-shot",) if startup else ("warm",),
            lambda pool, fn, items: pk.run_parallel(fn, items, backend=pool),
            lambda: pk.WorkerPool(workers, start_method=sm),
            lambda pool: pool.shutdown(wait=True),
        ),
    ]


def pool_starts(contenders: Sequence[Contender], sizes: Sizes) -> int:
    """How many pools (or groups of bare processes) a workload starts: one per one-shot
    sample, warm-up rounds included, and one per warm contender."""
    samples = sizes.rounds + sizes.warmup
    return sum(
        samples if mode == "one-shot" else 1 if mode == "warm" else 0
        for c in contenders
        for mode in c.modes
    )


def describe(
    sizes: Sizes, workers: int, wanted: Sequence[str] = WORKLOADS, method: str = "fork"
) -> str:
    """What a run does, in words: workloads, sizes, rounds, and the pools it starts."""
    parts = []
    starts = 0
    for key in wanted:
        n = {"tiny": sizes.items, "cpu": sizes.tasks, "startup": workers}[key]
        starts += pool_starts(contenders(method, workers, n, startup=key == "startup"), sizes)
        if key == "tiny":
            parts.append(f"{sizes.items:,} tiny items")
        elif key == "cpu":
            parts.append(f"{sizes.tasks} CPU tasks of {sizes.task_seconds:g} s")
        else:
            parts.append(f"start-up of {workers} workers")
    warmup = f"{sizes.warmup} warm-up round" if sizes.warmup else "no warm-up round"
    return f"{', '.join(parts)}; {sizes.rounds} rounds, {warmup}; {starts} pool starts"


def describe_quick(workers: int) -> str:
    """What ``--quick`` does (its ``--help`` and ``benchmarks/README.md`` say it)."""
    return describe(QUICK, workers)


def sizes_of(args: argparse.Namespace) -> Sizes:
    """The sizes a command line asks for: ``--quick`` or the full ones, then each knob."""
    base = QUICK if args.quick else FULL
    return Sizes(
        items=args.items or base.items,
        tasks=args.tasks or base.tasks,
        task_seconds=args.task_seconds or base.task_seconds,
        rounds=args.rounds or base.rounds,
        warmup=base.warmup if args.warmup is None else args.warmup,
    )


# ------------------------------------------------------------------ the runner


def _sample(entry: Entry, fn: Callable[[Any], Any], items: Sequence[Any]) -> tuple[float, Any]:
    c = entry.contender
    faulthandler.dump_traceback_later(SAMPLE_TIMEOUT_S, exit=True)
    try:
        t0 = time.perf_counter()
        if entry.mode == "warm":
            result = c.map(entry.handle[0], fn, items)
        else:
            handle = c.open()
            try:
                result = c.map(handle, fn, items)
            finally:
                c.close(handle)
        return time.perf_counter() - t0, result
    finally:
        faulthandler.cancel_dump_traceback_later()


def run_interleaved(  # noqa: PLR0912 - one case per branch, read top to bottom (split, it would be read across functions)
    contenders: Sequence[Contender],
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    sizes: Sizes,
    *,
    log: Callable[[str], None],
) -> list[Entry]:
    """Time every (contender, mode) ``sizes.rounds`` times, the order rotated each round.

    A contender whose result is wrong, or that raises, is dropped with the reason in
    ``errors``; the others go on.
    """
    expected = [fn(x) for x in items]
    entries = [Entry(c, m, [], [], []) for c in contenders for m in c.modes]
    try:
        for e in entries:
            if e.mode == "warm":
                try:
                    e.handle.append(e.contender.open())
                except Exception as exc:
                    e.errors.append(f"open failed: {type(exc).__name__}: {exc}")
                    log(f"# {e.contender.name} [{e.mode}] dropped: {e.errors[0]}")
        for r in range(-sizes.warmup, sizes.rounds):
            k = r % len(entries)
            for e in entries[k:] + entries[:k]:
                if e.errors:
                    continue
                gc.collect()
                try:
                    seconds, result = _sample(e, fn, items)
                except Exception as exc:
                    e.errors.append(f"{type(exc).__name__}: {exc}")
                else:
                    if result != expected:
                        e.errors.append("wrong result: not list(map(fn, items))")
                    elif r >= 0:
                        e.samples.append(seconds)
                if e.errors:
                    log(f"# {e.contender.name} [{e.mode}] dropped: {e.errors[0]}")
    finally:
        for e in entries:
            if e.handle:
                e.contender.close(e.handle.pop())
    return entries


def _median(values: Sequence[float]) -> float:
    import statistics

    return statistics.median(values)


def _paired(a: Sequence[float], b: Sequence[float]) -> float:
    """The median of ``a[i] / b[i]``, round by round."""
    return _median([x / y for x, y in zip(a, b, strict=True)])


class Row(NamedTuple):
    """A (contender, mode) summarised, with its ratios (``None`` where they do not apply)."""

    workload: str
    name: str
    kind: Kind
    mode: Mode
    samples: list[float]
    error: str | None
    x_best_stdlib: float | None
    baseline: str | None  # what x_baseline compares with
    x_baseline: float | None
    speedup: float | None  # serial time / this time


def summarise(workload: str, entries: Sequence[Entry], *, speedup: bool) -> list[Row]:
    """Rows with paired ratios to the fastest stdlib contender of the same mode, to the bare
    processes (start-up), and the speed-up over serial (``speedup``)."""
    ok = [e for e in entries if e.samples and not e.errors]
    process = next((e for e in ok if e.contender.name == "Process"), None)
    serial = next((e for e in ok if e.mode == "serial"), None)
    rows = []
    for e in entries:
        error = e.errors[0] if e.errors else None if e.samples else "no samples"
        best = x_process = up = None
        if error is None and e.contender.kind != "baseline":
            stdlib = [s for s in ok if s.contender.kind == "stdlib" and s.mode == e.mode]
            if stdlib:
                fastest = min(stdlib, key=lambda s: _median(s.samples))
                best = _paired(e.samples, fastest.samples)
            if process is not None:
                x_process = _paired(e.samples, process.samples)
            if speedup and serial is not None:
                up = _paired(serial.samples, e.samples)
        baseline = "Process" if x_process is not None else None
        rows.append(
            Row(
                workload,
                e.contender.name,
                e.contender.kind,
                e.mode,
                list(e.samples),
                error,
                best,
                baseline,
                x_process,
                up,
            )
        )
    return rows


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table, fastest first within each mode."""

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.3g}" if seconds < 0.1 else f"{seconds * 1000:.0f}"

    def x(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}"

    head = ["contender", "mode", "median ms", "min-max ms", "x best stdlib"]
    head += ["x Process"] if any(r.baseline for r in rows) else []
    head += ["speed-up"] if any(r.speedup is not None for r in rows) else []
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    order = {"serial": 0, "one-shot": 1, "warm": 2}
    for r in sorted(rows, key=lambda r: (order[r.mode], _median(r.samples or [math.inf]))):
        name = f"**{r.name}**" if r.kind == "parallelkit" else r.name
        if r.error is not None:
            cells = [name, r.mode, "error", r.error] + [""] * (len(head) - 4)
        else:
            cells = [
                name,
                r.mode,
                ms(_median(r.samples)),
                f"{ms(min(r.samples))}-{ms(max(r.samples))}",
                x(r.x_best_stdlib),
            ]
            if "x Process" in head:
                cells.append(x(r.x_baseline))
            if "speed-up" in head:
                cells.append("—" if r.speedup is None else f"{r.speedup:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def json_records(rows: Sequence[Row], workers: int) -> list[dict[str, Any]]:
    """One ``result`` record a (contender, mode): times in seconds, the ratios."""
    out: list[dict[str, Any]] = []
    for r in rows:
        record: dict[str, Any] = {
            "type": "result",
            "workload": r.workload,
            "contender": r.name,
            "kind": r.kind,
            "mode": r.mode,
            "workers": workers,
        }
        if r.error is not None:
            record["error"] = r.error
        else:
            record |= {
                "median": _median(r.samples),
                "min": min(r.samples),
                "max": max(r.samples),
                "samples": r.samples,
                "x_best_stdlib": r.x_best_stdlib,
                "baseline": r.baseline,
                "x_baseline": r.x_baseline,
                "speedup": r.speedup,
            }
        out.append(record)
    return out


# ------------------------------------------------------------------ the command


def add_arguments(
    ap: argparse.ArgumentParser, *, start_methods: Sequence[str], default: str
) -> None:
    """The ``bench`` subcommand's options (the size knobs work but stay out of --help)."""
    import argparse

    ap.add_argument(
        "--quick",
        action="store_true",
        help=(
            f"{QUICK.items:,} tiny items, {QUICK.tasks} CPU tasks of {QUICK.task_seconds:g} s, "
            f"{QUICK.rounds} rounds, no warm-up round (under a minute on 2 cores)"
        ),
    )
    ap.add_argument(
        "--json",
        action="store_true",
        help="print JSON lines (a meta record, then one record a result) instead of tables",
    )
    ap.add_argument("--start-method", choices=start_methods, default=default)
    ap.add_argument("--workers", type=int, help="default: the CPUs this process may use")
    ap.add_argument(
        "--workloads", help=f"comma-separated, from: {', '.join(WORKLOADS)} (default: all)"
    )
    hidden = argparse.SUPPRESS
    ap.add_argument("--items", type=int, help=hidden)
    ap.add_argument("--tasks", type=int, help=hidden)
    ap.add_argument("--task-seconds", type=float, help=hidden)
    ap.add_argument("--rounds", type=int, help=hidden)
    ap.add_argument("--warmup", type=int, help=hidden)


def calibrate(seconds: float) -> int:
    """The number of :func:`spin` rounds that takes about ``seconds`` on this machine."""
    rounds = 20_000
    while True:
        started = time.perf_counter()
        spin(rounds)
        elapsed = time.perf_counter() - started
        if elapsed >= 0.02:
            return max(1, round(rounds * seconds / elapsed))
        rounds *= 4


def run(ap: argparse.ArgumentParser, args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Measure, then print markdown tables (or, with ``--json``, JSON lines) to ``out``."""
    import datetime
    import json
    import platform

    import parallelkit
    from parallelkit._proc.forkserver import start_forkserver
    from parallelkit._util.context import usable_cpu_count

    sizes = sizes_of(args)
    workers = args.workers or usable_cpu_count()
    wanted = [w.strip() for w in (args.workloads or ",".join(WORKLOADS)).split(",") if w.strip()]
    unknown = sorted(set(wanted) - set(WORKLOADS))
    if unknown or not wanted:
        ap.error(f"--workloads: unknown {unknown}; choose from {', '.join(WORKLOADS)}")
    if min(workers, sizes.items, sizes.tasks, sizes.rounds) < 1 or sizes.warmup < 0:
        ap.error("--workers, --items, --tasks and --rounds must be positive")

    def log(message: str) -> None:  # progress on stderr: stdout stays machine-readable
        print(message, file=sys.stderr, flush=True)

    method = args.start_method
    meta: dict[str, Any] = {
        "type": "meta",
        "benchmark": "parallelkit bench",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "parallelkit": parallelkit.__version__,
        "start_method": method,
        "workers": workers,
        "rounds": sizes.rounds,
        "warmup": sizes.warmup,
        "workloads": {},
        "full_suite": FULL_SUITE,
    }
    if method == "forkserver":
        # One server a process, shared by every contender: started as parallelkit starts
        # it, so that all of them fork from the same preloads, whoever opens first.
        meta["forkserver_preload"] = start_forkserver()
    plan: list[tuple[str, str, Callable[[Any], Any], list[Any]]] = []
    if "tiny" in wanted:
        title = f"{sizes.items:,} items of `x*x`: per-item overhead"
        plan.append(("tiny", title, square, list(range(sizes.items))))
    if "cpu" in wanted:
        loops = calibrate(sizes.task_seconds)
        title = (
            f"{sizes.tasks} pure-Python tasks of ~{sizes.task_seconds:g} s; "
            f"speed-up over serial (ideal {min(workers, sizes.tasks)}x)"
        )
        plan.append(("cpu", title, spin, [loops + i for i in range(sizes.tasks)]))
    if "startup" in wanted:
        title = f"start {workers} workers, each runs one `x*x`, shut down; against bare Processes"
        plan.append((f"startup-{workers}", title, square, list(range(workers))))
    plan_text = describe(sizes, workers, [w for w in WORKLOADS if w in wanted], method)
    log(f"# parallelkit bench: {method}, {workers} workers: {plan_text}")
    records: list[dict[str, Any]] = []
    for key, title, fn, items in plan:
        t0 = time.perf_counter()
        pools = contenders(method, workers, len(items), startup=key.startswith("startup"))
        entries = run_interleaved(pools, fn, items, sizes, log=log)
        rows = summarise(key, entries, speedup=key == "cpu")
        meta["workloads"][key] = {"title": title, "items": len(items)}
        log(f"# {key}: measured in {time.perf_counter() - t0:.1f} s")
        records += json_records(rows, workers)
        if not args.json:
            print(f"\n**{key}** — {title}\n\n{markdown_table(rows)}", file=out, flush=True)
    if args.json:
        out.write("".join(json.dumps(r) + "\n" for r in [meta, *records]))
    else:
        print(
            "\nRatios are paired round by round; 'x best stdlib' compares with the faster of "
            "Pool.map and PPE.map in the same mode (below 1 is faster).\nThe comparison with "
            "mpire, joblib, loky and pebble, and with large numpy arrays, is the repository's "
            f"benchmark suite: `{FULL_SUITE}` in a checkout (see benchmarks/README.md).",
            file=out,
        )
    out.flush()
    return 0
