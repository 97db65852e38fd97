"""Lifecycle plumbing shared by everything that owns processes.

- :func:`stop_processes`: join → terminate → kill escalation for a group of processes, all
  waited on together through their sentinels, warning when it had to escalate.
- :func:`signal_name`: ``-9`` → ``"SIGKILL"``.
"""

from __future__ import annotations

import multiprocessing.connection
import signal
import time
import warnings
from collections.abc import Iterable
from multiprocessing.process import BaseProcess
from typing import Final

TERMINATE_GRACE: Final = 1.0  # seconds a SIGTERMed process gets before SIGKILL


def signal_name(exitcode: int | None) -> str | None:
    """The signal that ended a process with this exit code, or ``None``."""
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


def describe_exit(exitcode: int | None) -> str:
    name = signal_name(exitcode)
    if name is not None:
        return f"killed by {name}"
    if exitcode is None:
        return "still running"
    return f"exited with code {exitcode}"


def _wait_all(procs: list[BaseProcess], deadline: float) -> list[BaseProcess]:
    """Wait until every process has exited or the deadline passes; return the living."""
    alive = [p for p in procs if p.exitcode is None]
    while alive:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        multiprocessing.connection.wait([p.sentinel for p in alive], remaining)
        alive = [p for p in alive if p.exitcode is None]
    return alive


def stop_processes(
    procs: Iterable[BaseProcess],
    *,
    join_timeout: float,
    what: str = "worker",
    warn: bool = True,
) -> None:
    """End ``procs``: wait ``join_timeout`` for them to exit, then SIGTERM, then SIGKILL.

    ``join_timeout=0`` kills at once without a warning (a deliberate abort).  Every
    process is reaped and closed afterwards.
    """
    procs = [p for p in procs if p.pid is not None]  # started ones only
    if join_timeout <= 0:  # a deliberate abort: no grace, no warning
        for p in procs:
            if p.exitcode is None:
                p.kill()
        alive = _wait_all(procs, time.monotonic() + 10.0)
    else:
        alive = _wait_all(procs, time.monotonic() + join_timeout)
    if alive:
        if warn and join_timeout > 0:
            warnings.warn(
                f"{len(alive)} parallelkit {what} process(es) did not exit within "
                f"{join_timeout:g} s of being asked to; terminating them",
                ResourceWarning,
                stacklevel=3,
            )
        for p in alive:
            p.terminate()
        alive = _wait_all(alive, time.monotonic() + TERMINATE_GRACE)
        for p in alive:
            p.kill()
        _wait_all(alive, time.monotonic() + 10.0)
    for p in procs:
        p.join(0)
        if p.exitcode is not None:
            p.close()
