"""The README's code runs as written, and its set-up commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from child import run_python

README = Path(__file__).resolve().parent.parent / "README.md"

pytestmark = pytest.mark.skipif(not README.is_file(), reason="README.md not beside tests/")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.DOTALL | re.MULTILINE)


def test_the_two_set_up_commands_come_first() -> None:
    first = _blocks("sh")[0]
    commands = [line for line in first.splitlines() if line and not line.startswith("#")]
    assert commands == [
        "python3 -m pip install . && python3 -m parallelkit demo",
        "python3 -m pip install -e '.[test]' && python3 -m pytest",
    ]


def _run(tmp_path: Path, code: str) -> list[str]:
    """Run a README example as a script (a file, so that spawn workers can import it)."""
    script = tmp_path / "example.py"
    script.write_text(code)
    result = run_python("-W", "error", str(script), timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_the_tour_runs(tmp_path: Path) -> None:
    tour = _blocks("python")[0]
    assert "run_parallel" in tour
    assert "imap_parallel" in tour
    assert "WorkerPool" in tour
    lines = _run(tmp_path, tour)
    assert lines[0] == str([x * x for x in range(10)])
    assert lines[1] == "49"
    assert lines[2] == "[0, 1, 4, 9, 16]"
    assert re.fullmatch(r"\['parallelkit: raised in worker pid \d+ on item 2'\]", lines[3])
    assert lines[4:6] == ["[8, 16]", "[1.2, 2.8]"]


def test_the_pipeline_example_runs(tmp_path: Path) -> None:
    block = next(b for b in _blocks("python") if "pk.Pipeline" in b)
    lines = _run(tmp_path, block)
    assert lines[0] == "['disk', '0', 'is', 'full']"
    assert lines[1].split()[:4] == ["stage", "workers", "in", "out"]
    assert [line.split()[:4] for line in lines[2:5]] == [
        ["map(parse)", "2", "9", "9"],
        ["filter(is_error)", "1", "9", "3"],
        ["flat_map(words)", "1", "3", "12"],
    ]


def test_the_progress_example_runs(tmp_path: Path) -> None:
    block = next(b for b in _blocks("python") if "stall_timeout" in b)
    lines = _run(tmp_path, block)
    assert lines[0] == "0 1000"  # the callable: first before any result...
    assert lines[lines.index("1000 1000")] == "1000 1000"  # ...then up to the total
    stats = lines[lines.index("1000 1000") + 1 :]
    assert stats[0].split() == ["worker", "items", "busy", "s", "idle", "s", "busy", "%"]
    assert re.fullmatch(r"1000 items on \d+ workers in .*", stats[-1])
