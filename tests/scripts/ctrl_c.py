"""Ctrl-C during a long parallel map: python ctrl_c.py START_METHOD API.

API is ``run`` (``run_parallel``), ``imap`` (``imap_parallel``), ``pool`` (``WorkerPool``
and ``Future.result``) or ``pipeline`` (a two-stage ``Pipeline`` over a generator).
Prints ``READY`` when the work starts, ``KEYBOARD_INTERRUPT`` as
soon as the interrupt arrives, then ``CLEAN`` once no child process, thread or semaphore
of the map is left (``parallelkit.testing.check_no_leaks``).  The workers print
``WORKER <pid>`` when they start an item.  Needs ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import sys

import parallelkit as pk
import tasks.faults as wf
from parallelkit.testing import check_no_leaks


def work(method: pk.StartMethod, api: str) -> None:
    items = [30.0] * 20
    if api == "run":
        pk.run_parallel(
            wf.announce_and_sleep, items, start_method=method, max_workers=2, chunksize=1
        )
    elif api == "imap":
        for _ in pk.imap_parallel(
            wf.announce_and_sleep, iter(items), start_method=method, max_workers=2
        ):
            pass
    elif api == "pipeline":
        pipeline = pk.Pipeline((x for x in items), start_method=method, maxsize=2)
        pipeline.map(wf.announce_and_sleep, max_workers=2).map(abs).run()
    else:
        with pk.WorkerPool(2, start_method=method) as pool:
            futures = [pool.submit(wf.announce_and_sleep, x) for x in items]
            for future in futures:
                future.result()


def main() -> None:
    method, api = wf.start_method_arg(sys.argv[1]), sys.argv[2]
    with check_no_leaks(grace=5.0):
        try:
            wf.say("READY")
            work(method, api)
        except KeyboardInterrupt:
            wf.say("KEYBOARD_INTERRUPT")
        else:
            wf.say("FINISHED")
    wf.say("CLEAN")


if __name__ == "__main__":
    main()
