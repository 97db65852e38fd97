"""Ctrl-C while workers start: python sigint_storm.py START_METHOD.

The test sends SIGINT to this process group every few milliseconds (as a terminal sends
Ctrl-C to the whole foreground group) while this script starts pool after pool.  The
script itself counts the signals instead of raising, so the work goes on; the workers must
never print a ``KeyboardInterrupt`` traceback, whenever the signal lands during their
start-up.  Prints ``READY`` when the storm may start and ``DONE <signals seen>`` at the
end.  Needs ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

import parallelkit as pk
import workers_faults as wf

ROUNDS = 6  # at least this many pools
SIGNALS = 200  # ...and at least this many signals seen meanwhile
seen = 0


def count(signum: int, frame: FrameType | None) -> None:
    global seen
    seen += 1


def main() -> None:
    method = wf.start_method_arg(sys.argv[1])
    # Start multiprocessing's own helpers (resource tracker, forkserver) before the storm:
    # their start-up is the standard library's business, not parallelkit's.
    assert pk.run_parallel(wf.square, range(2), start_method=method, max_workers=1) == [0, 1]
    signal.signal(signal.SIGINT, count)
    print("READY", flush=True)
    rounds = 0
    while rounds < ROUNDS or seen < SIGNALS:
        rounds += 1
        got = pk.run_parallel(wf.square, range(8), start_method=method, max_workers=2, chunksize=1)
        assert got == [x * x for x in range(8)], got
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("DONE", rounds, seen, flush=True)


if __name__ == "__main__":
    main()
