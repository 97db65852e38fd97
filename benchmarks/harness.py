"""The interleaved benchmark runner, its noise meter and its reports.

How a run goes (the machine is shared and noisy, so only ratios *inside one run* mean much)::

    set-up:   open every warm contender's pool (untimed)
    warm-up:  every (contender, mode) runs once, untimed
    round r:  every (contender, mode) runs once, the order rotated by r
              one-shot = open + map + close timed together; warm = map on the open pool
              before each sample: gc.collect(), then wait (briefly) for a quiet CPU
              after each sample: check the result, measure other processes' CPU use
              (a noisy sample is re-taken once), look for child processes left behind
    report:   median and min-max per (contender, mode); ratios to the best stdlib/peer
              contender in the same mode; JSON lines and markdown tables

Every benchmark here uses it.  Only the standard library is imported (psutil is optional and
imported lazily): a spawn child that re-imports a benchmark script that imports this module
pays for nothing more than the stdlib does.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

Kind = Literal["baseline", "stdlib", "peer", "parallelkit"]
Mode = Literal["serial", "one-shot", "warm"]
H = TypeVar("H")
PEER_KINDS: tuple[Kind, ...] = ("stdlib", "peer")
HELPER_PROCESSES = re.compile(r"forkserver|resource_tracker|semaphore_tracker")


def log(message: str) -> None:
    """Progress goes to stderr, so that stdout stays machine-readable when asked."""
    print(message, file=sys.stderr, flush=True)


@dataclass
class Contender(Generic[H]):
    """One way of mapping a function over items: ``open`` a pool, ``map``, ``close`` it.

    ``modes`` says how it is timed: ``"one-shot"`` times open + map + close together,
    ``"warm"`` times ``map`` alone on a pool opened (and used once) before timing started,
    ``"serial"`` is the in-process reference.
    """

    name: str
    kind: Kind
    note: str
    open: Callable[[], H]
    map: Callable[[H, Callable[[Any], Any], Sequence[Any]], list[Any]]
    close: Callable[[H], None]
    modes: tuple[Mode, ...] = ("one-shot", "warm")
    start_method: str = ""


def serial_contender() -> Contender[None]:
    """``list(map(fn, items))`` in this process: the answer and the speed-up reference."""

    def map_(_: None, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return list(map(fn, items))

    return Contender(
        "serial",
        "baseline",
        "list(map(fn, items)) in this process",
        open=lambda: None,
        map=map_,
        close=lambda _: None,
        modes=("serial",),
    )


@dataclass
class Entry:
    """One (contender, mode) of a run and what was measured for it."""

    contender: Contender[Any]
    mode: Mode
    handle: Any = None
    samples: list[float] = field(default_factory=list)
    noise: list[float] = field(default_factory=list)
    retried: int = 0
    error: str | None = None
    leftovers: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.contender.name} [{self.mode}]"

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


# ------------------------------------------------------------------ noise


class NoiseMeter:
    """How much CPU *other* processes used while we measured.

    Busy CPU time comes from ``/proc/stat`` (the whole machine); our own is this process,
    its reaped children (``os.times``) and its live descendants (psutil, when installed).
    Without psutil or ``/proc/stat`` there is no meter and the gate only sleeps.
    """

    def __init__(self, *, gate_seconds: float) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.cpus = os.cpu_count() or 1
        self.gate_seconds = gate_seconds
        self.gate_timeouts = 0
        self.streak = 0  # gate timeouts in a row
        try:
            import psutil

            self.psutil: Any = psutil
            self._busy()
        except (ImportError, OSError):
            self.psutil = None

    @property
    def enabled(self) -> bool:
        return self.psutil is not None

    def _busy(self) -> float:
        """Seconds of CPU the whole machine has spent not idle since boot."""
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
        idle = values[3] + values[4]  # idle + iowait
        return (sum(values) - idle) / self.hz

    def _ours(self) -> float:
        t = os.times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in self.psutil.Process().children(recursive=True):
            with contextlib.suppress(Exception):
                c = child.cpu_times()
                total += c.user + c.system + c.children_user + c.children_system
        return float(total)

    def gate(self) -> None:
        """Wait (up to ``gate_seconds``) for a 50 ms window in which the machine is quiet.

        Our own processes are idle here (warm pools wait for work), so whatever is busy is
        somebody else.  Quiet means at most one clock tick of CPU in the window.
        """
        if not self.enabled or self.gate_seconds <= 0:
            return
        # under sustained load, waiting is wasted: after 3 fruitless waits, only glance
        wait = self.gate_seconds if self.streak < 3 else min(self.gate_seconds, 0.1)
        deadline = time.monotonic() + wait
        while True:
            before = self._busy()
            time.sleep(0.05)
            if self._busy() - before <= 1.5 / self.hz:
                self.streak = 0
                return
            if time.monotonic() >= deadline:
                self.gate_timeouts += 1
                self.streak += 1
                return

    @contextlib.contextmanager
    def measure(self) -> Iterator[list[float]]:
        """Yield a list that receives, afterwards, other processes' CPU use (in cores)."""
        out: list[float] = []
        if not self.enabled:
            yield out
            return
        busy0, ours0, t0 = self._busy(), self._ours(), time.perf_counter()
        yield out
        busy1, ours1, t1 = self._busy(), self._ours(), time.perf_counter()
        foreign = (busy1 - busy0) - (ours1 - ours0)
        out.append(max(0.0, foreign / max(t1 - t0, 1e-9)))


# ------------------------------------------------------------------ child processes


def children() -> dict[int, str]:
    try:
        import psutil
    except ImportError:
        return {}
    out: dict[int, str] = {}
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(Exception):
            cmd = " ".join(p.cmdline())[:120] or p.name()
            out[p.pid] = f"{p.status()}: {cmd}"
    return out


def leftover_children(before: dict[int, str], grace: float = 2.0) -> list[str]:
    """Child processes started since ``before`` that are still there after ``grace`` s.

    multiprocessing's own helpers (the forkserver, the resource tracker) live for the whole
    program by design and are not counted.
    """
    new = {pid: d for pid, d in children().items() if pid not in before}
    new = {pid: d for pid, d in new.items() if not HELPER_PROCESSES.search(d)}
    if not new:
        return []
    deadline = time.monotonic() + grace
    while new and time.monotonic() < deadline:
        time.sleep(0.05)
        now = children()
        new = {pid: d for pid, d in new.items() if pid in now and "zombie" not in now[pid]}
    now = children()
    return [f"pid {pid} {now.get(pid, d)}" for pid, d in new.items()]


# ------------------------------------------------------------------ the runner


@dataclass
class RunOptions:
    rounds: int = 5
    warmup: int = 1
    gate_seconds: float = 1.0
    noise_threshold: float = 0.25  # other processes' CPU, as a fraction of all cores
    retries: int = 1
    sample_timeout: float = 300.0  # a sample that takes longer is a hang: dump and exit
    check_leftovers: bool = True


def _run_once(entry: Entry, fn: Callable[[Any], Any], items: Sequence[Any]) -> tuple[float, Any]:
    c = entry.contender
    if entry.mode == "warm":
        t0 = time.perf_counter()
        result = c.map(entry.handle, fn, items)
        return time.perf_counter() - t0, result
    t0 = time.perf_counter()
    handle = c.open()
    try:
        result = c.map(handle, fn, items)
    finally:
        c.close(handle)
    return time.perf_counter() - t0, result


Check = Callable[[list[Any]], str | None]
"""Looks at a contender's result: ``None`` when right, else what is wrong with it."""


def equals(expected: Sequence[Any]) -> Check:
    """The usual check: the result is ``list(expected)``, element for element."""
    want = list(expected)

    def check(result: list[Any]) -> str | None:
        if result == want:
            return None
        bad = next((i for i, (a, b) in enumerate(zip(result, want, strict=False)) if a != b), None)
        return f"list of {len(result)}, first difference at {bad}"

    return check


def _sample(
    entry: Entry,
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    check: Check,
    meter: NoiseMeter,
    opts: RunOptions,
    *,
    timed: bool,
    attempt: int = 0,
) -> None:
    before = children() if opts.check_leftovers and entry.mode == "one-shot" else {}
    gc.collect()
    if timed:
        meter.gate()
    faulthandler.dump_traceback_later(opts.sample_timeout, exit=True)
    try:
        with meter.measure() as noise:
            seconds, result = _run_once(entry, fn, items)
    finally:
        faulthandler.cancel_dump_traceback_later()
    wrong = check(result) if isinstance(result, list) else type(result).__name__
    if wrong is not None:
        raise AssertionError(f"wrong result ({wrong}); expected list(map(fn, items))")
    if opts.check_leftovers and entry.mode == "one-shot":
        left = leftover_children(before)
        if left:
            entry.leftovers.extend(left)
            log(f"#   {entry.label}: {len(left)} child process(es) left behind: {left}")
    if not timed:
        return
    if noise and noise[0] > opts.noise_threshold * meter.cpus and attempt < opts.retries:
        entry.retried += 1
        log(f"#   {entry.label}: other processes used {noise[0]:.2f} cores; re-taking")
        _sample(entry, fn, items, check, meter, opts, timed=True, attempt=attempt + 1)
        return
    entry.samples.append(seconds)
    entry.noise.extend(noise)


def run_interleaved(
    contenders: Sequence[Contender[Any]],
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    expected: Sequence[Any],
    opts: RunOptions,
    *,
    title: str,
    check: Check | None = None,
) -> list[Entry]:
    """Time every (contender, mode) ``opts.rounds`` times, interleaved and rotated.

    Every result must equal ``expected``, or pass ``check`` when one is given (then
    ``expected`` is not looked at).
    """
    check = check if check is not None else equals(expected)
    meter = NoiseMeter(gate_seconds=opts.gate_seconds)
    entries = [Entry(c, mode) for c in contenders for mode in c.modes]
    try:
        for e in entries:
            if e.mode == "warm":
                try:
                    e.handle = e.contender.open()
                except Exception as exc:
                    e.error = f"open failed: {type(exc).__name__}: {exc}"
                    log(f"# {title}: {e.label} dropped, {e.error}")
        for r in range(-opts.warmup, opts.rounds):
            live = [e for e in entries if e.error is None]
            k = r % len(live) if live else 0
            order = live[k:] + live[:k]
            what = "warm-up" if r < 0 else f"round {r + 1}/{opts.rounds}"
            log(f"# {title}: {what}: " + ", ".join(e.label for e in order))
            for e in order:
                try:
                    _sample(e, fn, items, check, meter, opts, timed=r >= 0)
                except Exception as exc:
                    e.error = f"{type(exc).__name__}: {exc}"
                    log(f"# {title}: {e.label} dropped, {e.error}")
    finally:
        for e in entries:
            if e.mode == "warm" and e.handle is not None:
                try:
                    e.contender.close(e.handle)
                except Exception as exc:
                    log(f"# {title}: closing {e.label} failed: {type(exc).__name__}: {exc}")
                e.handle = None
    if meter.gate_timeouts:
        log(f"# {title}: the machine never went quiet before {meter.gate_timeouts} sample(s)")
    return entries


# ------------------------------------------------------------------ results


@dataclass
class Row:
    """A (contender, mode) summarised: what the JSON lines and the tables are made of."""

    workload: str
    name: str
    kind: Kind
    mode: Mode
    note: str
    samples: list[float]
    noise: float | None
    retried: int
    error: str | None
    leftovers: list[str]
    x_best_peer: float | None = None
    x_pool_map: float | None = None
    baseline: str | None = None  # the contender that x_baseline is relative to
    x_baseline: float | None = None
    speedup: tuple[float, float, float] | None = None  # median, min, max
    efficiency: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan


def summarise(
    workload: str,
    entries: Sequence[Entry],
    *,
    speedup_over: int | None = None,
    baseline: str | None = None,
) -> list[Row]:
    """Rows with ratios to the best stdlib/peer contender of the same mode (and to Pool.map).

    ``speedup_over``: the ideal speed-up (workers); adds speed-up vs serial and efficiency.
    ``baseline``: the name of a contender every row is also compared with (same mode, or
    its one-shot row), such as bare processes or data already in shared memory.
    """
    rows = [
        Row(
            workload,
            e.contender.name,
            e.contender.kind,
            e.mode,
            e.contender.note,
            list(e.samples),
            statistics.median(e.noise) if e.noise else None,
            e.retried,
            e.error,
            list(e.leftovers),
        )
        for e in entries
    ]
    return add_ratios(rows, speedup_over=speedup_over, baseline=baseline)


def add_ratios(
    rows: list[Row], *, speedup_over: int | None, baseline: str | None = None
) -> list[Row]:
    """Fill in each row's ratios (see :func:`summarise`); returns ``rows``."""
    ok = [r for r in rows if r.samples and r.error is None]
    serial = next((r for r in ok if r.mode == "serial"), None)
    for row in ok:
        peers = [p for p in ok if p.kind in PEER_KINDS and p.mode == row.mode]
        if peers:
            best = min(peers, key=lambda p: p.median)
            row.x_best_peer = statistics.median(paired_ratios(row.samples, best.samples))
        pool = next((p for p in ok if p.name == "Pool.map" and p.mode == row.mode), None)
        if pool is not None:
            row.x_pool_map = statistics.median(paired_ratios(row.samples, pool.samples))
        base = [b for b in ok if b.name == baseline and row.mode != "serial"]
        ref = next((b for b in base if b.mode == row.mode), base[0] if base else None)
        if ref is not None and ref is not row:
            row.baseline = ref.name
            row.x_baseline = statistics.median(paired_ratios(row.samples, ref.samples))
        if speedup_over and serial is not None:
            ups = paired_ratios(serial.samples, row.samples)
            row.speedup = (statistics.median(ups), min(ups), max(ups))
            row.efficiency = row.speedup[0] / speedup_over
    return rows


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """``a[i] / b[i]`` round by round: the load drifts over a run, and both samples of one
    round saw about the same load.  (Unequal lengths, after a drop: ratio of the medians.)
    """
    if len(a) != len(b):
        return [statistics.median(a) / statistics.median(b)]
    return [x / y for x, y in zip(a, b, strict=True)]


def print_pairs(rows: Sequence[Row], pairs: Sequence[tuple[str, str]]) -> None:
    """One line per ``(name, reference)`` pair that both ran: the median of their paired
    ratios (a markdown list, after a table)."""
    by_name = {r.name: r for r in rows if r.samples}
    for name, reference in pairs:
        if name in by_name and reference in by_name:
            ratio = statistics.median(
                paired_ratios(by_name[name].samples, by_name[reference].samples)
            )
            print(f"- {name}: x{ratio:.2f} of {reference} (median of paired ratios)")


def json_lines(rows: Sequence[Row], meta: dict[str, Any]) -> list[str]:
    """One JSON object per (contender, mode, metric)."""
    keys = ("start_method", "workers", "python", "date")
    common: dict[str, Any] = {k: meta[k] for k in keys if k in meta}
    out: list[str] = []
    for r in rows:
        base: dict[str, Any] = {
            "type": "result",
            "workload": r.workload,
            "contender": r.name,
            "kind": r.kind,
            "mode": r.mode,
            "note": r.note,
            **common,
        }
        if r.error is not None or not r.samples:
            out.append(json.dumps({**base, "metric": "seconds", "error": r.error}))
            continue
        out.append(
            json.dumps(
                {
                    **base,
                    "metric": "seconds",
                    "median": r.median,
                    "min": min(r.samples),
                    "max": max(r.samples),
                    "samples": r.samples,
                    "x_best_peer": r.x_best_peer,
                    "x_pool_map": r.x_pool_map,
                    "baseline": r.baseline,
                    "x_baseline": r.x_baseline,
                    "noise_cores": r.noise,
                    "retried": r.retried,
                    "leftover_processes": r.leftovers,
                }
            )
        )
        if r.speedup is not None:
            med, lo, hi = r.speedup
            out.append(
                json.dumps({**base, "metric": "speedup", "median": med, "min": lo, "max": hi})
            )
            out.append(json.dumps({**base, "metric": "efficiency", "median": r.efficiency}))
    return out


def rows_from_json(lines: Sequence[str]) -> tuple[dict[str, Any], dict[str, list[Row]]]:
    """Read back what :func:`json_lines` wrote (after a ``meta`` line): meta, rows by workload.

    The ratios are computed again from the raw samples, so a report can be re-rendered (or
    rendered differently) without measuring again.
    """
    meta: dict[str, Any] = {}
    rows: dict[str, list[Row]] = {}
    for line in lines:
        if not line.strip():
            continue
        d = json.loads(line)
        if d.get("type") == "meta":
            meta = d
            continue
        if d.get("type") != "result" or d.get("metric") != "seconds":
            continue
        noise = d.get("noise_cores")
        rows.setdefault(d["workload"], []).append(
            Row(
                d["workload"],
                d["contender"],
                d["kind"],
                d["mode"],
                d.get("note", ""),
                list(d.get("samples") or []),
                noise,
                d.get("retried", 0),
                d.get("error"),
                list(d.get("leftover_processes") or []),
            )
        )
    described = meta.get("workloads", {})
    for key, group in rows.items():
        about = described.get(key, {})
        speedup_over = about.get("ideal_speedup", meta.get("workers") if key == "cpu" else None)
        add_ratios(group, speedup_over=speedup_over, baseline=about.get("baseline"))
    return meta, rows


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table: ratios to the best stdlib/peer contender per mode."""
    with_speedup = any(r.speedup is not None for r in rows)
    baseline = next((r.baseline for r in rows if r.baseline is not None), None)
    head = ["contender", "mode", "median ms", "min-max ms", "x best peer", "x Pool.map"]
    if baseline is not None:
        head.append(f"x {baseline}")
    if with_speedup:
        head += ["speed-up", "efficiency"]
    head.append("noise")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    order = {"serial": 0, "one-shot": 1, "warm": 2}
    for r in sorted(rows, key=lambda r: (order[r.mode], r.median if r.samples else math.inf)):
        name = f"**{r.name}**" if r.kind == "parallelkit" else r.name
        if r.error is not None or not r.samples:
            cells = [name, r.mode, "error", r.error or "no samples", "", ""]
            cells += [""] if baseline is not None else []
            cells += ["", ""] if with_speedup else []
            cells.append("")
        else:
            cells = [
                name,
                r.mode,
                _ms(r.median),
                f"{_ms(min(r.samples))}-{_ms(max(r.samples))}",
                _x(r.x_best_peer) if r.kind != "baseline" else "—",
                _x(r.x_pool_map) if r.kind != "baseline" else "—",
            ]
            if baseline is not None:
                cells.append("—" if r.name == baseline else _x(r.x_baseline))
            if with_speedup:
                cells.append("—" if r.speedup is None else f"{r.speedup[0]:.2f}x")
                cells.append("—" if r.efficiency is None else f"{r.efficiency:.0%}")
            noise = "" if r.noise is None else f"{r.noise:.2f}"
            if r.retried:
                noise += f" r{r.retried}"
            if r.leftovers:
                noise += f" LEFT {len(r.leftovers)} PROC"
            cells.append(noise)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_between_markers(path: Path, key: str, body: str) -> None:
    """Replace the text between ``<!-- key:begin -->`` and ``<!-- key:end -->`` in ``path``."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    text = path.read_text()
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise SystemExit(f"{path}: markers {begin} ... {end} not found; add them first")
    path.write_text(text[: i + len(begin)] + "\n" + body.strip("\n") + "\n" + text[j:])
