"""The repository's benchmark suite (``benchmarks/``, run from a checkout): run for real, at
a tiny size, in a fresh interpreter.

The runs check what the project's published tables rely on: every contender of every
workload is measured (the stdlib, parallelkit, the bare-process and shared-memory
references, and whichever peers are installed here), every result was verified (a wrong one
is reported as an error), and the ratios are numbers that the saved JSON lines reproduce.
The suite is not in the wheel; pytest runs from the repository root, which is on sys.path.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import multiprocessing
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import parallelkit
import tasks.benchmarks as wb
from benchmarks import harness as h
from benchmarks.settings import QUICK_WORKLOADS, WORKLOADS, add_arguments, settings_from
from benchmarks.suite import heavy_main
from child import package_env, run_python
from parallelkit._util.context import default_start_method

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--items", "3000",
    "--tasks", "2",
    "--task-seconds", "0.005",
    "--arrays", "3",
    "--elements", "2000",
    "--tile-side", "32",
    "--startup-workers", "1",
    "--rounds", "1",
    "--warmup", "0",
    "--gate-seconds", "0",
    "--retries", "0",
]  # fmt: skip
STDLIB = {"Pool.map", "PPE.map"}
PARALLELKIT = {
    "parallelkit.run_parallel",
    "parallelkit.run_parallel(auto)",
    "parallelkit.run_parallel(thread)",
    "parallelkit.WorkerPool",
    "parallelkit.WorkerPool.imap",
}
PEERS = {
    "loky": "loky.map",
    "joblib": "joblib",
    "mpire": "mpire.map",
    "pebble": "pebble.map",
}
INSTALLED_PEERS = {name for lib, name in PEERS.items() if importlib.util.find_spec(lib)}
HAVE_NUMPY = importlib.util.find_spec("numpy") is not None


def _suite(*args: str, extra_path: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m benchmarks ARGS`` from the repository root, as the README runs it."""
    env = package_env(*([extra_path] if extra_path else []))
    return run_python(
        "-m",
        "benchmarks",
        "--start-method",
        default_start_method(),
        "--keep-dont-write-bytecode",  # no re-exec: measure this interpreter as it is
        *args,
        timeout=280,  # a hang guard: with every peer installed, a loaded machine takes minutes
        env=env,
        cwd=ROOT,
    )


def _positive(x: object) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def _records(stdout: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    records = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    assert records, "no JSON lines"
    assert records[0]["type"] == "meta"
    assert all(r["type"] == "result" for r in records[1:])
    return records[0], records[1:]


@pytest.mark.timeout(300)
def test_every_workload_and_contender_is_measured_and_checked() -> None:
    result = _suite("--json", "-", *TINY)
    assert result.returncode == 0, result.stderr
    meta, records = _records(result.stdout)
    assert meta["start_method"] == default_start_method()
    assert meta["parallelkit"] == parallelkit.__version__
    assert meta["rounds"] == 1
    assert meta["leftover_processes_at_exit"] == []  # needs psutil (a test dependency)
    seconds = [r for r in records if r["metric"] == "seconds"]
    by_workload: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for r in seconds:
        by_workload.setdefault(r["workload"], {})[r["contender"], r["mode"]] = r
    arrays = {"arrays", "arrays-results", "membound"}
    tiles = {"tiles", "tiles-rows"}
    if HAVE_NUMPY:
        assert set(by_workload) == {"tiny", "cpu", "startup-1"} | arrays | tiles
        assert "skipped" not in meta
    else:  # CI installs numpy; a bare environment runs the rest and says what it skipped
        assert set(by_workload) == {"tiny", "cpu", "startup-1"}
        assert set(meta["skipped"]) == arrays | {"tiles"}
        for key in arrays:
            by_workload[key] = {}
    assert set(meta["workloads"]) == set(by_workload) - set(meta.get("skipped", ()))

    pools = STDLIB | PARALLELKIT | INSTALLED_PEERS
    assert {c for c, _ in by_workload["tiny"]} == {"serial"} | pools
    assert {c for c, _ in by_workload["cpu"]} == {"serial"} | pools
    if HAVE_NUMPY:
        assert {c for c, _ in by_workload["arrays"]} == (
            {"serial", "Pool.map(chunksize=1)", "shm_ideal"} | pools
        )
        assert {c for c, _ in by_workload["arrays-results"]} == (
            {"serial", "Pool.map(chunksize=1)"} | pools
        )
        for key in tiles:
            assert {c for c, _ in by_workload[key]} == {
                "serial",
                "PPE.map",
                "Pool.imap",
                "Pool.imap_unordered",
                "imap_parallel",
                "imap_parallel(ordered=False)",
                "imap_parallel(chunksize=1)",
                "run_parallel",
                "run_parallel(ordered=False)",
                "run_parallel(chunksize=1)",
            }
        assert {c for c, _ in by_workload["membound"]} == {"serial"} | pools
    startup = by_workload["startup-1"]
    assert {c for c, _ in startup} == {"Process", "serial"} | STDLIB | PARALLELKIT - {
        "parallelkit.WorkerPool.imap"
    } | INSTALLED_PEERS
    assert {m for _, m in startup} == {"one-shot", "serial"}
    assert {r["workers"] for r in startup.values()} == {1}
    assert meta["workloads"]["startup-1"]["workers"] == 1
    assert ("parallelkit.WorkerPool", "warm") in by_workload["tiny"]
    assert ("parallelkit.run_parallel", "one-shot") in by_workload["tiny"]

    for r in seconds:
        where = f"{r['workload']}: {r['contender']} [{r['mode']}]"
        # a wrong result, a failure or a hang would have left an error and no samples
        assert "error" not in r, where
        assert len(r["samples"]) == 1, where
        assert all(s > 0 for s in r["samples"]), where
        assert r["min"] <= r["median"] <= r["max"], where
        assert r["leftover_processes"] == [], where
        if r["kind"] != "baseline":
            assert _positive(r["x_best_peer"]), where
            # the tiles have no Pool.map (imap takes a generator): x PPE.map instead
            assert _positive(r["x_pool_map"]) or r["workload"] in tiles, where
    references = [("arrays", "shm_ideal"), ("startup-1", "Process")]
    references += [(key, "PPE.map") for key in tiles if HAVE_NUMPY]
    for key, reference in references:
        for (name, _), r in by_workload[key].items():
            if name not in (reference, "serial"):
                assert r["baseline"] == reference, (key, name)
                assert _positive(r["x_baseline"]), (key, name)
    cpu_metrics = {r["metric"] for r in records if r["workload"] == "cpu"}
    assert cpu_metrics == {"seconds", "speedup", "efficiency"}

    # the saved lines give the same ratios again (that is how the README is re-rendered)
    _, rows = h.rows_from_json(result.stdout.splitlines())
    for row in (row for group in rows.values() for row in group):
        saved = by_workload[row.workload][row.name, row.mode]
        assert row.x_best_peer == pytest.approx(saved["x_best_peer"])
        assert row.x_baseline == pytest.approx(saved["x_baseline"])
    table = h.markdown_table(rows["startup-1"])
    assert "| x Process |" in table.splitlines()[0]


def test_tables_and_a_missing_numpy(tmp_path: Path) -> None:
    # A numpy that cannot be imported, first on the path: the array workloads say so.
    (tmp_path / "numpy").mkdir()
    (tmp_path / "numpy" / "__init__.py").write_text("raise ImportError('numpy hidden')\n")
    result = _suite(
        "--workloads", "tiny,arrays,arrays-results", "--no-peers", *TINY,
        extra_path=str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "**tiny** — 3,000 items" in out
    assert "| contender | mode | median ms | min-max ms | x best peer | x Pool.map |" in out
    assert "| **parallelkit.run_parallel** | one-shot |" in out
    assert "**arrays** — skipped: numpy is not installed." in out
    assert "**arrays-results** — skipped: numpy is not installed." in out
    assert "# arrays: skipped, numpy is not installed" in result.stderr
    assert "Not installed" not in out  # --no-peers: no peer is missing


def test_bad_options_are_refused() -> None:
    result = _suite("--workloads", "tiny,nope")
    assert result.returncode == 2
    assert "--workloads: unknown ['nope']" in result.stderr


def test_heavy_main_makes_spawn_children_import_numpy() -> None:
    pytest.importorskip("numpy")  # the test environment has numpy; CI installs it
    ctx = multiprocessing.get_context("spawn")
    seen = []
    for heavy in (False, True):
        recv, send = ctx.Pipe(duplex=False)
        with heavy_main() if heavy else contextlib.nullcontext():
            proc = ctx.Process(target=wb.report_numpy, args=(send,))
            proc.start()
        send.close()
        seen.append(recv.recv())
        recv.close()
        proc.join()
        assert proc.exitcode == 0
    assert seen == [False, True]
    assert sys.modules["__main__"].__name__ == "__main__"


def test_quick_leaves_out_the_large_results_unless_asked() -> None:
    ap = argparse.ArgumentParser()
    add_arguments(ap, start_method="fork")
    for argv, expected in [
        (["--quick"], QUICK_WORKLOADS),
        ([], WORKLOADS),
        (["--quick", "--workloads", "arrays-results"], ("arrays-results",)),
    ]:
        assert settings_from(ap, ap.parse_args(argv)).workloads == expected, argv
    assert "arrays-results" not in QUICK_WORKLOADS
    assert set(QUICK_WORKLOADS) < set(WORKLOADS)


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py")))
def test_every_script_runs_as_a_file_from_anywhere(script: str, tmp_path: Path) -> None:
    # `python benchmarks/bench_x.py` puts the script's folder, not the repository root, at
    # the head of sys.path: each script must still import the package (and its peers).
    result = run_python(str(ROOT / "benchmarks" / script), "--help", timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ")
