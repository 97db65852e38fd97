"""The schedule fuzzer (``parallelkit._util.fuzz``): off by default, deterministic when on."""

from __future__ import annotations

from pathlib import Path

import pytest

from child import package_env, run_python
from parallelkit._util import fuzz as _fuzz

_PROGRAM = """
from parallelkit._util import fuzz as _fuzz
assert _fuzz.ENABLED
for _ in range(200):
    _fuzz.point("a")
    _fuzz.point("b")
"""


def test_off_by_default_point_returns_at_once() -> None:
    # The suite does not set PARALLELKIT_FUZZ (the stress run does, in its own children).
    assert not _fuzz.ENABLED
    _fuzz.point("anything")  # no sleep, no error


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("7", ("7", 3.0, 25.0)), ("7:5", ("7", 5.0, 25.0)), ("x:0.5:100", ("x", 0.5, 100.0))],
)
def test_parse_accepts(spec: str, expected: tuple[str, float, float]) -> None:
    assert _fuzz.parse(spec) == expected


@pytest.mark.parametrize("spec", ["", ":5", "7:five", "7:5:101", "7:-1", "1:2:3:4"])
def test_parse_refuses_with_the_expected_form(spec: str) -> None:
    with pytest.raises(ValueError, match="SEED"):
        _fuzz.parse(spec)


def test_delays_are_a_function_of_seed_and_place() -> None:
    one = [_fuzz.delay_for("1", "MainProcess", "MainThread", "p", n) for n in range(500)]
    again = [_fuzz.delay_for("1", "MainProcess", "MainThread", "p", n) for n in range(500)]
    other = [_fuzz.delay_for("2", "MainProcess", "MainThread", "p", n) for n in range(500)]
    assert one == again
    assert one != other


@pytest.mark.timeout(60)
def test_same_seed_same_schedule_in_a_child(tmp_path: Path) -> None:
    logs = []
    for run, seed in enumerate(["11:1:30", "11:1:30", "12:1:30"]):
        log = tmp_path / f"log{run}"
        env = package_env(PARALLELKIT_FUZZ=seed, PARALLELKIT_FUZZ_LOG=str(log))
        done = run_python("-c", _PROGRAM, timeout=50, env=env)
        assert done.returncode == 0, done.stderr
        # drop the pid column: it differs between runs
        logs.append([line.split(" ", 1)[1] for line in log.read_text().splitlines()])
    assert logs[0] == logs[1]
    assert logs[0] != logs[2]
    # about 30% of 400 passings are delayed
    assert 60 < len(logs[0]) < 180
