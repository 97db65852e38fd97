"""Interpreter exit with work pending: python exit_pending.py START_METHOD API.

API ``pool``: a ``WorkerPool`` with long tasks submitted is left without ``shutdown()``;
API ``imap``: an ``imap_parallel`` iterator over long tasks is left unfinished.  The
workers print ``WORKER <pid>``; once both run, this prints ``EXITING`` and ``main()``
returns, so the interpreter has to deal with the pending work as it exits.  Needs
``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import sys
import time

import parallelkit as pk
import tasks.faults as wf

KEEP: list[object] = []  # the pending work stays referenced until interpreter exit


def main() -> None:
    method, api = wf.start_method_arg(sys.argv[1]), sys.argv[2]
    if api == "pool":
        pool = pk.WorkerPool(2, start_method=method)
        assert pool.submit(wf.square, 3).result(timeout=60) == 9
        KEEP.append(pool)
        KEEP.extend(pool.submit(wf.announce_and_sleep, 60.0) for _ in range(4))
    else:
        it = pk.imap_parallel(
            wf.announce_and_sleep,
            iter([0.0] + [60.0] * 10),
            start_method=method,
            max_workers=2,
            chunksize=1,
        )
        assert next(it) == 0.0
        KEEP.append(it)
    time.sleep(0.5)  # let the long tasks start
    wf.say("EXITING", os.getpid())


if __name__ == "__main__":
    main()
