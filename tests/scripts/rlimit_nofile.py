"""Starting workers with too few file descriptors: python rlimit_nofile.py START_METHOD SPARE...

For each SPARE, lowers ``RLIMIT_NOFILE`` so that only SPARE more descriptors can be opened,
runs a small ``run_parallel`` and restores the limit, all inside
``parallelkit.testing.check_no_leaks`` (which fails the script if a worker is left).
Prints one line per SPARE::

    RESULT <spare> <process starts> <failed starts> ok
    RESULT <spare> <process starts> <failed starts> OSError <errno> <message>
    RESULT <spare> <process starts> <failed starts> OTHER <type>: <message>

then ``CLEAN``.  Needs ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import resource
import sys
from multiprocessing.process import BaseProcess

import parallelkit as pk
import tasks.faults as wf
from parallelkit.testing import check_no_leaks

starts = {"ok": 0, "failed": 0}
_original_start = BaseProcess.start


def _counting_start(self: BaseProcess) -> None:
    try:
        _original_start(self)
    except BaseException:
        starts["failed"] += 1
        raise
    starts["ok"] += 1


def _open_fds() -> set[int]:
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:  # the descriptor listdir used, closed by now
            continue
        fds.add(int(name))
    return fds


def _limit_leaving(spare: int) -> int:
    """The soft limit under which exactly ``spare`` descriptor numbers are free."""
    open_fds = _open_fds()
    limit, free = 0, 0
    while free < spare or limit in open_fds:
        if limit not in open_fds:
            free += 1
        limit += 1
    return limit


def attempt(method: pk.StartMethod, spare: int) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (_limit_leaving(spare), hard))
    try:
        got = pk.run_parallel(wf.square, range(12), start_method=method, max_workers=6, chunksize=1)
    except OSError as exc:
        return f"OSError {exc.errno} {exc}"
    except Exception as exc:
        return f"OTHER {type(exc).__name__}: {exc}"
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return "ok" if got == [x * x for x in range(12)] else f"WRONG {got}"


def main() -> None:
    method = wf.start_method_arg(sys.argv[1])
    # multiprocessing's helpers (resource tracker, forkserver) start with the full limit
    assert pk.run_parallel(wf.square, range(2), start_method=method, max_workers=1) == [0, 1]
    BaseProcess.start = _counting_start  # type: ignore[method-assign]  # observe, not change
    for spare in map(int, sys.argv[2:]):
        starts.update(ok=0, failed=0)
        with check_no_leaks(grace=5.0):
            outcome = attempt(method, spare)
        wf.say("RESULT", spare, starts["ok"], starts["failed"], outcome)
    wf.say("CLEAN")


if __name__ == "__main__":
    main()
