"""Workers SIGKILLed as they register a segment's name with the resource tracker and as
they unlink its file: tracker_once.py METHOD (needs ``tests/`` on ``PYTHONPATH``).

Prints ``DONE`` at the end; the resource tracker (a process of its own, writing to our
stderr) must have printed nothing: every segment registered and unregistered once.
"""

from __future__ import annotations

import gc
import sys

import numpy as np

import parallelkit as pk
import tasks.arena as wa
import tasks.faults as wf
from parallelkit._wire import arena as _arena
from parallelkit.testing import check_no_leaks

N = _arena.MIN_BYTES // 8 * 2  # a result that goes through a result segment


def main() -> None:
    method = wf.start_method_arg(sys.argv[1])
    with check_no_leaks(grace=5.0), pk.WorkerPool(1, start_method=method) as pool:
        crash = pool.submit(wa.die_before_registering, N).exception(timeout=60)
        assert isinstance(crash, pk.WorkerCrashedError), repr(crash)
        first = pool.submit(wa.make_array, N).result(timeout=60)
        assert np.array_equal(first, np.arange(N))
        del first  # its region goes back to the worker, which may then retire the segment
        gc.collect()
        crash = pool.submit(wa.die_before_unlinking, 1 << 20).exception(timeout=60)
        assert isinstance(crash, pk.WorkerCrashedError), repr(crash)
        again = pool.submit(wa.make_array, N).result(timeout=60)
        assert np.array_equal(again, np.arange(N))
        del again
    wf.say("DONE")


if __name__ == "__main__":
    main()
