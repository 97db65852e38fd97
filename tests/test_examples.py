"""Every program in ``examples/`` runs, as a user would run it, and prints the right thing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import parallelkit
from child import run_python

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.skipif(not EXAMPLES.is_dir(), reason="examples/ not beside tests/")


def _run(name: str, *args: str) -> list[str]:
    result = run_python("-W", "error", str(EXAMPLES / name), *args, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    for block in result.stderr.split("Traceback (most recent call last):")[1:]:
        # Dask's own shutdown may log a CommClosedError from its background sender (its
        # traceback runs through distributed and tornado alone); nothing of ours may fail.
        assert str(Path(parallelkit.__file__).parent) not in block, result.stderr
        assert str(EXAMPLES) not in block, result.stderr
        assert "distributed" in block, result.stderr
    return result.stdout.splitlines()


def test_every_example_is_tested() -> None:
    tested = {
        "dask_run.py",
        "log_pipeline.py",
        "rpc_worker.py",
        "sum_range.py",
        "tile_filter.py",
        "word_count.py",
        "worker_shards.py",
    }
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_sum_range() -> None:
    lines = _run("sum_range.py", "2000000")
    assert lines[0] == f"sum(range(2_000_000)) = {2_000_000 * 1_999_999 // 2:_}"
    assert lines[1] == "matches n * (n - 1) // 2: True"
    assert re.fullmatch(rf"{parallelkit.usable_cpu_count()} workers, \d+\.\d\d s", lines[2])


def test_word_count_generated() -> None:
    lines = _run("word_count.py")
    assert lines[0] == "200_000 words, 11 distinct"
    assert len(lines) == 5
    assert lines[-1] == "same as a serial count: True"


def test_word_count_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("The cat and the hat.\n")
    (tmp_path / "b.txt").write_text("THE END, the end\n")
    lines = _run("word_count.py", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"))
    assert lines[0] == "9 words, 5 distinct"
    assert lines[1].split() == ["the", "4"]
    assert lines[2].split() == ["end", "2"]


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_worker_shards(method: str) -> None:
    assert _run("worker_shards.py", "2000", method) == [
        "2000 lines from workers [0, 1]",
        "at most 250 per shard: True",
        "same as the results: True",
    ]


def test_log_pipeline() -> None:
    lines = _run("log_pipeline.py")
    assert lines[0] == "10_000 errors"
    counts = {tuple(line.split()[:2]): line.split()[2] for line in lines[1:17]}
    assert len(counts) == 16  # 4 services x 4 status codes, 625 errors each
    assert set(counts.values()) == {"625"}
    assert lines[17].split()[:4] == ["stage", "workers", "in", "out"]
    assert lines[18].split()[:4] == ["map(parse)", "2", "70000", "70000"]
    assert lines[19].split()[:4] == ["filter(is_error)", "1", "70000", "10000"]
    assert lines[20].split()[:4] == ["map(classify)", "1", "10000", "10000"]


def test_log_pipeline_reads_a_file(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text(
        "t INFO api status=200 request=1\n"
        "t ERROR auth status=503 request=2\n"
        "t ERROR auth status=503 request=3\n"
    )
    lines = _run("log_pipeline.py", str(log))
    assert lines[0] == "2 errors"
    assert lines[1].split() == ["auth", "503", "2"]


def test_rpc_worker() -> None:
    assert _run("rpc_worker.py") == [
        "worker pid differs from ours: True",
        "get('answer') -> 42",
        "get('items') -> [1, 2, 3]",
        "remote get() failed: KeyError: 'missing'",
        "worker exited",
    ]


def test_tile_filter() -> None:
    lines = _run("tile_filter.py", "600")
    assert re.fullmatch(r"600x600 image, 9 tiles, 360_000 pixels in \d+\.\d\d s", lines[0])
    assert lines[1] == "same as one whole-image blur: True"


def test_dask_run() -> None:
    assert _run("dask_run.py") == [
        "2 Dask workers; same results as local processes: True",
        "longest: 278 steps, for 17647",
        "numbers over 150 steps (pipeline on the cluster): 2751",
    ]
