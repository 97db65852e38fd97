"""Run a child Python interpreter that imports this checkout's parallelkit (not whatever
another ``parallelkit`` the environment may hold)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import parallelkit

TESTS = str(Path(__file__).resolve().parent)


def package_env(*paths: str, **variables: str) -> dict[str, str]:
    """This environment with parallelkit's source root (after ``paths``) on PYTHONPATH,
    and ``variables`` set."""
    env = dict(os.environ)
    root = str(Path(parallelkit.__file__).parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (*paths, root, env.get("PYTHONPATH")) if p)
    env.update(variables)
    return env


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group ``proc`` leads (started with ``start_new_session``), reap
    ``proc`` and close its pipes: a test's ``finally``, whatever state the test left."""
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def run_python(
    *args: str,
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` to completion, its output captured as text; ``env`` defaults to
    :func:`package_env`."""
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=package_env() if env is None else env,
        cwd=cwd,
        check=False,
    )
