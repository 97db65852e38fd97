"""``python -m parallelkit``: ``info`` and ``demo`` run for real in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

import parallelkit
from child import package_env, run_python
from parallelkit.__main__ import main
from parallelkit._util.context import (
    available_start_methods,
    default_start_method,
    usable_cpu_count,
)


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_python("-m", "parallelkit", *args, timeout=timeout)


def test_info_reports_cpus_start_methods_and_extras() -> None:
    result = _run("info", timeout=60)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
    fields = {name: value.strip() for name, value in lines.items()}
    assert fields["parallelkit"] == parallelkit.__version__
    assert fields["usable CPUs"].startswith(f"{usable_cpu_count()} ")
    assert fields["start methods"] == ", ".join(available_start_methods())
    env = package_env(PARALLELKIT_PORTABLE="memfd,pidfd")
    portable = run_python("-m", "parallelkit", "info", timeout=60, env=env)
    assert "portable fallbacks, PARALLELKIT_PORTABLE set: pidfd, memfd" in portable.stdout
    assert fields["default start method"] == default_start_method()
    assert fields["Python"].startswith(".".join(map(str, sys.version_info[:3])))
    for extra in ("cloudpickle", "numpy"):
        assert fields[extra].startswith(("installed", "not installed"))


def test_demo_shows_speed_up_and_a_reported_crash() -> None:
    # A small plan keeps the suite quick; CI also runs the full demo from the README.
    result = _run("demo", "--items", "4", "--item-seconds", "0.02")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "4 items of ~20 ms" in out
    for method in available_start_methods():
        assert f"start_method={method!r})" in out
        crash_line = next(
            line for line in out.splitlines() if line.strip().startswith(method + " ")
        )
        assert "WorkerCrashedError" in crash_line
        assert "item 5" in crash_line
        assert "SIGKILL" in crash_line
    assert out.count("speed-up") == len(available_start_methods())
    assert "RESULTS DIFFER" not in out
    assert out.rstrip().endswith("All good.")
    assert "Traceback" not in result.stderr


def test_demo_runs_under_one_chosen_start_method() -> None:
    method = default_start_method()
    result = _run("demo", "--start-method", method, "--items", "2", "--item-seconds", "0.01")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("speed-up") == 1
    assert f"start_method={method!r})" in result.stdout


def test_no_command_prints_usage_and_fails() -> None:
    result = _run(timeout=60)
    assert result.returncode == 2
    assert "usage: python -m parallelkit" in result.stderr
    assert "{info,demo,bench}" in result.stderr


def test_unknown_start_method_is_refused_with_the_choices() -> None:
    result = _run("demo", "--start-method", "frok", timeout=60)
    assert result.returncode == 2
    assert "invalid choice: 'frok'" in result.stderr


def test_info_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    assert "usable CPUs:" in capsys.readouterr().out


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"parallelkit {parallelkit.__version__}"
