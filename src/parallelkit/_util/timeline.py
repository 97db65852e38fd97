"""An opt-in timeline of where a call's time goes: start-up, first task, first result, exit.

Off unless the environment variable ``PARALLELKIT_TIMELINE`` names a file (children inherit
it; under forkserver it must be set before the server starts), and then free at every call
site that guards itself with ``if ENABLED:``::

    from parallelkit._util import timeline as _timeline
    ...
    if _timeline.ENABLED:
        _timeline.stamp("engine.first_task")

Each stamp appends one line ``pid perf_counter_ns what`` to the file.  ``perf_counter_ns``
is the system's monotonic clock on Linux, so the parent's and the workers' stamps fall on
one time axis.  ``benchmarks/bench_timeline.py`` runs calls with it and prints the result.
"""

from __future__ import annotations

import os
import time
from typing import Final

ENV: Final = "PARALLELKIT_TIMELINE"
_path = os.environ.get(ENV) or None
ENABLED: Final = _path is not None


def stamp(what: str) -> None:
    """Append ``pid perf_counter_ns what`` to the timeline file (one ``write``: lines of
    several processes do not interleave)."""
    if _path is None:
        return
    now = time.perf_counter_ns()
    fd = os.open(_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()} {now} {what}\n".encode())
    finally:
        os.close(fd)
