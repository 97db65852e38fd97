"""A parent that gets killed while its workers run: python parent_death.py START_METHOD.

Submits long tasks to a ``WorkerPool`` of two workers (each prints ``WORKER <pid>``),
prints ``SUBMITTED`` and sleeps, so that the test can SIGKILL or SIGTERM this process and
check that the workers do not outlive it.  Needs ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import sys
import time

import parallelkit as pk
import workers_faults as wf


def main() -> None:
    method = wf.start_method_arg(sys.argv[1])
    pool = pk.WorkerPool(2, start_method=method)
    futures = [pool.submit(wf.announce_and_sleep, 60.0) for _ in range(4)]
    wf.say("SUBMITTED")
    time.sleep(60)  # the test kills us long before this ends
    pool.shutdown(cancel_futures=True)
    print([f.done() for f in futures])


if __name__ == "__main__":
    main()
