"""Ctrl-C while workers start: python sigint_storm.py START_METHOD.

The test sends SIGINT to this process group every few milliseconds (as a terminal sends
Ctrl-C to the whole foreground group) while this script starts pool after pool.  The
script itself counts the signals instead of raising, so the work goes on; the workers must
never print a ``KeyboardInterrupt`` traceback, whenever the signal lands during their
start-up.  Prints ``READY`` when the storm may start and ``DONE <rounds> <signals seen>
<pools that gave up>`` at the end.  Needs ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

import parallelkit as pk
import tasks.faults as wf

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
    wf.say("READY")
    rounds = gave_up = 0
    while rounds < ROUNDS or seen < SIGNALS:
        rounds += 1
        try:
            got = pk.run_parallel(
                wf.square, range(8), start_method=method, max_workers=2, chunksize=1
            )
        except pk.WorkerCrashedError as exc:
            # Only under forkserver: its server process hands each child Python's default
            # SIGINT handler, so a storm can kill every worker before it ignores SIGINT.
            # The pool must then give up with this clear error (never hang, never print).
            if method != "forkserver" or "keep dying at start-up" not in str(exc):
                raise
            gave_up += 1
            continue
        assert got == [x * x for x in range(8)], got
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    wf.say("DONE", rounds, seen, gave_up)


if __name__ == "__main__":
    main()
