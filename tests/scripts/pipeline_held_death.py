"""A pipeline whose router or stage is held halfway through making or removing a
shared-memory segment: pipeline_held_death.py METHOD WHO POINT FIFO

Needs ``tests/`` on ``PYTHONPATH``.  Prints ``TRACKER <pid>`` (the resource tracker's);
then ``WHO`` (``router``: this process; ``stage``: the stage's worker) waits at the
schedule fuzzer's ``POINT`` the first time it gets there, after writing its pid to the
FIFO ``FIFO``, until the test SIGKILLs this process.  ``WHO`` ``stage-killed``: this
process reads the FIFO itself and SIGKILLs the held stage, prints ``CRASHED`` when the
pipeline says so, and exits.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from multiprocessing import resource_tracker
from typing import Any

import parallelkit as pk
import tasks.faults as wf
import tasks.pipeline as w


def main() -> None:
    method = wf.start_method_arg(sys.argv[1])
    who, point, fifo = sys.argv[2:5]
    resource_tracker.ensure_running()
    wf.say("TRACKER", resource_tracker._resource_tracker._pid)  # type: ignore[attr-defined]
    source: Any
    if who == "router":
        # HUGE source items: the router makes a segment for each and removes it once read
        source = (w.payload(i, w.HUGE) for i in range(40))
        fn: Any = w.identity
        w.hold_at_point(point, fifo, pid=os.getpid())
    else:
        source = range(40)
        fn = functools.partial(w.huge_held_at, point, fifo)
    if who == "stage-killed":
        threading.Thread(target=_kill_holder, args=(fifo,), daemon=True).start()
    try:
        for _ in pk.Pipeline(source, start_method=method).map(fn):
            pass  # blocks once the holder holds
    except pk.PipelineError as exc:
        if isinstance(exc.__cause__, pk.WorkerCrashedError):
            wf.say("CRASHED")
        else:
            raise


def _kill_holder(fifo: str) -> None:
    with open(fifo) as held:
        os.kill(int(held.readline()), signal.SIGKILL)


if __name__ == "__main__":
    main()
