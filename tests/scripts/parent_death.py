"""A parent that gets killed while its workers run: python parent_death.py START_METHOD [API].

Submits long tasks to a ``WorkerPool`` of two workers (each prints ``WORKER <pid>``), or
with API ``pipeline`` starts a pipeline whose stage has two workers, prints ``SUBMITTED``
and sleeps, so that the test can SIGKILL or SIGTERM this process and check that the
workers do not outlive it.  Needs ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import sys
import time

import parallelkit as pk
import tasks.faults as wf


def main() -> None:
    method = wf.start_method_arg(sys.argv[1])
    if sys.argv[2:] == ["pipeline"]:
        pipeline = pk.Pipeline([60.0] * 4, start_method=method)
        results = iter(pipeline.map(wf.announce_and_sleep, max_workers=2))
        wf.say("SUBMITTED")
        next(results)  # runs the pipeline; the test kills us long before it returns
        return
    pool = pk.WorkerPool(2, start_method=method)
    futures = [pool.submit(wf.announce_and_sleep, 60.0) for _ in range(4)]
    wf.say("SUBMITTED")
    time.sleep(60)  # the test kills us long before this ends
    pool.shutdown(cancel_futures=True)
    print([f.done() for f in futures])


if __name__ == "__main__":
    main()
