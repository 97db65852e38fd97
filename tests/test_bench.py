"""``python -m parallelkit bench``: the quick comparison with the standard library's pools.

Run for real in a fresh interpreter at a tiny size (every workload and contender measured,
every result checked, the ratios there), and its runner in this process where a test needs
to control what a contender does.  ``tests/test_package.py`` runs it from the installed
wheel in an environment with nothing else installed.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import parallelkit
from child import run_python
from parallelkit import StartMethod, _bench

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--items", "300", "--tasks", "2", "--task-seconds", "0.005", "--rounds", "2"]
POOLS = {"Pool.map", "PPE.map", "parallelkit.run_parallel", "parallelkit.WorkerPool"}


def _bench_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_python("-m", "parallelkit", "bench", *args, timeout=90)


def _records(stdout: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    records = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    assert records, "no JSON lines"
    assert records[0]["type"] == "meta"
    assert all(r["type"] == "result" for r in records[1:])
    return records[0], records[1:]


def _positive(x: object) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_every_workload_and_contender_is_measured_and_checked(start_method: StartMethod) -> None:
    result = _bench_cli("--json", "--start-method", start_method, "--workers", "2", *TINY)
    assert result.returncode == 0, result.stderr
    meta, records = _records(result.stdout)
    assert meta["start_method"] == start_method
    assert meta["parallelkit"] == parallelkit.__version__
    assert (meta["rounds"], meta["warmup"], meta["workers"]) == (2, 1, 2)
    assert meta["full_suite"] == "python -m benchmarks"
    assert set(meta["workloads"]) == {"tiny", "cpu", "startup-2"}
    seen: dict[str, set[tuple[str, str]]] = {}
    for r in records:
        seen.setdefault(r["workload"], set()).add((r["contender"], r["mode"]))
        where = f"{r['workload']}: {r['contender']} [{r['mode']}]"
        # a wrong result, a failure or a hang would have left an error and no samples
        assert "error" not in r, where
        assert len(r["samples"]) == 2, where
        assert all(s > 0 for s in r["samples"]), where
        assert r["min"] <= r["median"] <= r["max"], where
        if r["kind"] == "baseline":
            assert r["x_best_stdlib"] is None, where
        else:
            assert _positive(r["x_best_stdlib"]), where
        assert (r["speedup"] is not None) == (r["workload"] == "cpu" and r["kind"] != "baseline")
        assert (r["x_baseline"] is not None) == (
            r["workload"] == "startup-2" and r["kind"] != "baseline"
        ), where
    both = {("Pool.map", m) for m in ("one-shot", "warm")} | {
        ("PPE.map", m) for m in ("one-shot", "warm")
    }
    mapped = {("serial", "serial"), ("parallelkit.run_parallel", "one-shot")}
    mapped |= both | {("parallelkit.WorkerPool", "warm")}
    assert seen["tiny"] == mapped
    assert seen["cpu"] == mapped
    assert seen["startup-2"] == {("Process", "one-shot")} | {(c, "one-shot") for c in POOLS}


def test_tables_point_to_the_full_suite() -> None:
    result = _bench_cli("--workloads", "tiny,startup", "--workers", "1", *TINY)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "**tiny** — 300 items of `x*x`" in out
    assert "| contender | mode | median ms | min-max ms | x best stdlib |" in out
    assert "| contender | mode | median ms | min-max ms | x best stdlib | x Process |" in out
    assert "| **parallelkit.run_parallel** | one-shot |" in out
    assert "**cpu**" not in out
    assert "`python -m benchmarks` in a checkout" in out
    assert "# tiny: measured in" in result.stderr


def test_quick_sizes() -> None:
    result = _bench_cli("--quick", "--json", "--workloads", "tiny", "--workers", "1")
    assert result.returncode == 0, result.stderr
    meta, records = _records(result.stdout)
    assert (meta["rounds"], meta["warmup"]) == (_bench.QUICK.rounds, _bench.QUICK.warmup)
    assert meta["workloads"]["tiny"]["items"] == _bench.QUICK.items
    assert {len(r["samples"]) for r in records} == {_bench.QUICK.rounds}


def _parsed(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    _bench.add_arguments(ap, start_methods=["fork", "forkserver", "spawn"], default="fork")
    return ap.parse_args(argv)


def test_the_quick_plan_is_what_the_docs_say() -> None:
    # What --quick runs is said in its --help and in benchmarks/README.md (whose goal row
    # has its times); neither may drift from the plan the code runs.
    assert _bench.sizes_of(_parsed("--quick")) == _bench.QUICK
    assert _bench.sizes_of(_parsed()) == _bench.FULL
    assert _bench.sizes_of(_parsed("--quick", "--rounds", "5")).rounds == 5
    quick = _bench.QUICK
    assert quick.warmup == 0
    ap = argparse.ArgumentParser()
    _bench.add_arguments(ap, start_methods=["fork"], default="fork")
    shown = " ".join(ap.format_help().split())
    assert (
        f"--quick {quick.items:,} tiny items, {quick.tasks} CPU tasks of "
        f"{quick.task_seconds:g} s, {quick.rounds} rounds, no warm-up round"
    ) in shown
    text = _bench.describe_quick(2)
    assert text == (
        f"{quick.items:,} tiny items, {quick.tasks} CPU tasks of {quick.task_seconds:g} s, "
        f"start-up of 2 workers; {quick.rounds} rounds, no warm-up round; 39 pool starts"
    )
    readme = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    assert f"`python -m parallelkit bench --quick` runs {text}" in " ".join(readme.split())


def test_pool_starts_count_each_one_shot_sample_and_each_warm_pool() -> None:
    # 39 for --quick with 2 workers: tiny and cpu start 3 one-shot pools (Pool.map,
    # PPE.map, run_parallel) a round and 3 warm pools once; start-up 5 a round (the bare
    # processes too); 3 rounds, no warm-up: 2 * (3 * 3 + 3) + 5 * 3
    sizes = _bench.QUICK
    mapped = _bench.contenders("fork", 2, sizes.items, startup=False)
    started = _bench.contenders("fork", 2, 2, startup=True)
    assert _bench.pool_starts(mapped, sizes) == 3 * 3 + 3
    assert _bench.pool_starts(started, sizes) == 5 * 3
    assert _bench.pool_starts(mapped, sizes._replace(warmup=1)) == 3 * 4 + 3
    assert _bench.describe(sizes, 2, ["tiny"]).endswith("; 12 pool starts")


def test_bad_options_are_refused() -> None:
    result = _bench_cli("--workloads", "tiny,arrays")
    assert result.returncode == 2
    assert "--workloads: unknown ['arrays']" in result.stderr
    result = _bench_cli("--start-method", "frok")
    assert result.returncode == 2
    assert "invalid choice: 'frok'" in result.stderr


# ------------------------------------------------------------------ the runner, in-process

PAUSE_S = 0.05


def _sleepy(seconds: float, result: Callable[[Sequence[Any]], list[Any]]) -> _bench.MapFn:
    def map_(_: Any, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        time.sleep(seconds)  # the work being timed, not a wait for something
        return result(items)

    return map_


def _right(items: Sequence[Any]) -> list[Any]:
    return [x * x for x in items]


def test_a_sample_times_the_map_in_both_modes_and_the_pool_one_shot() -> None:
    opened: list[object] = []

    def open_() -> object:
        time.sleep(PAUSE_S)  # a slow start, timed in one-shot and not in warm
        opened.append(object())
        return opened[-1]

    slow = _bench.Contender("slow", "stdlib", ("one-shot", "warm"), _sleepy(PAUSE_S, _right), open_)
    sizes = _bench.Sizes(items=3, tasks=1, task_seconds=0.0, rounds=3, warmup=1)
    logged: list[str] = []
    one_shot, warm = _bench.run_interleaved(
        [slow], _bench.square, [1, 2, 3], sizes, log=logged.append
    )
    assert (one_shot.mode, warm.mode) == ("one-shot", "warm")
    assert one_shot.errors == warm.errors == logged == []
    assert len(one_shot.samples) == len(warm.samples) == 3
    assert min(warm.samples) >= PAUSE_S
    assert min(one_shot.samples) >= 2 * PAUSE_S
    assert len(opened) == 1 + 4  # one warm pool, a pool for each one-shot sample (+ warm-up)
    assert warm.handle == []  # closed at the end


def test_a_wrong_or_failing_contender_is_dropped_and_the_others_go_on() -> None:
    def boom(_: Any, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        raise RuntimeError("boom")

    def no_pool() -> object:
        raise OSError("no pool")

    closed: list[object] = []
    good = _bench.Contender(
        "good", "stdlib", ("one-shot", "warm"), _sleepy(0, _right), object, closed.append
    )
    wrong = _bench.Contender("wrong", "parallelkit", ("one-shot",), _sleepy(0, list))
    failing = _bench.Contender("failing", "parallelkit", ("one-shot",), boom)
    unopened = _bench.Contender("unopened", "parallelkit", ("warm",), _sleepy(0, _right), no_pool)
    logged: list[str] = []
    sizes = _bench.Sizes(items=3, tasks=1, task_seconds=0.0, rounds=2, warmup=0)
    entries = _bench.run_interleaved(
        [good, wrong, failing, unopened], _bench.square, [1, 2, 3], sizes, log=logged.append
    )
    errors = {e.contender.name: e.errors for e in entries}
    assert errors == {
        "good": [],
        "wrong": ["wrong result: not list(map(fn, items))"],
        "failing": ["RuntimeError: boom"],
        "unopened": ["open failed: OSError: no pool"],
    }
    assert [len(e.samples) for e in entries if e.contender.name == "good"] == [2, 2]
    assert len(closed) == 2 + 1  # each one-shot sample's pool, then the warm one
    rows = _bench.summarise("tiny", entries, speedup=False)
    table = _bench.markdown_table(rows)
    assert "| **wrong** | one-shot | error | wrong result: not list(map(fn, items)) |  |" in table
    assert "| good | warm |" in table
    assert len(logged) == 3


def test_ratios_are_paired_round_by_round() -> None:
    def entry(name: str, kind: _bench.Kind, mode: _bench.Mode, samples: list[float]) -> Any:
        return _bench.Entry(
            _bench.Contender(name, kind, (mode,), _sleepy(0, _right)), mode, [], samples, []
        )

    entries = [
        entry("serial", "baseline", "serial", [4.0, 8.0, 4.0]),
        entry("Pool.map", "stdlib", "one-shot", [2.0, 4.0, 2.0]),
        entry("PPE.map", "stdlib", "one-shot", [3.0, 3.0, 3.0]),
        entry("parallelkit.run_parallel", "parallelkit", "one-shot", [1.0, 2.0, 1.0]),
    ]
    rows = {r.name: r for r in _bench.summarise("cpu", entries, speedup=True)}
    # the fastest stdlib contender by median is Pool.map (2.0 against 3.0)
    assert rows["parallelkit.run_parallel"].x_best_stdlib == pytest.approx(0.5)
    assert rows["PPE.map"].x_best_stdlib == pytest.approx(1.5)  # ratios 1.5, 0.75, 1.5
    assert rows["parallelkit.run_parallel"].speedup == pytest.approx(4.0)
    assert rows["serial"].x_best_stdlib is None
    assert rows["serial"].speedup is None
