"""Start methods, the default worker count and multiprocessing contexts.

parallelkit never changes global multiprocessing state: every process it starts comes from
an explicit context returned by :func:`get_context`.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
from pathlib import Path
from typing import cast, get_args

from parallelkit import _platform
from parallelkit._util.types import StartMethod

ALL_START_METHODS: tuple[StartMethod, ...] = get_args(StartMethod)


def available_start_methods() -> tuple[StartMethod, ...]:
    """The start methods this platform offers, in the standard library's order."""
    offered = multiprocessing.get_all_start_methods()
    return tuple(m for m in ALL_START_METHODS if m in offered)


def default_start_method() -> StartMethod:
    """The running Python's platform default (fork on Linux up to 3.13)."""
    # get_start_method(allow_none=True) would report a method a user set globally;
    # the platform default is what a fresh DefaultContext would pick.
    name: str = multiprocessing.get_context().get_start_method()
    return cast(StartMethod, name)


def get_context(start_method: str | None) -> multiprocessing.context.BaseContext:
    """The multiprocessing context for ``start_method`` (validated)."""
    # checks imports this module (the start methods it validates against)
    from parallelkit._util.checks import resolve_start_method  # noqa: PLC0415

    return multiprocessing.get_context(resolve_start_method(start_method))


def usable_cpu_count() -> int:
    """The number of CPUs this process may actually use.

    The smaller of the CPU affinity mask and the cgroup CPU quota (cgroup v2
    ``cpu.max``, or v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``), rounded up, and never
    less than 1.  ``os.cpu_count()`` counts the machine's CPUs, which a container or a
    ``taskset`` may not let us use.
    """
    if _platform.OFFERS.affinity and hasattr(os, "process_cpu_count"):
        # Python 3.13+: affinity-aware (and honours -X cpu_count); not in portable mode,
        # whose fallback counts the machine's CPUs as the platform seam says
        count = os.process_cpu_count() or 1
    else:
        count = _platform.affinity_count() or os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, quota)
    return max(1, count)


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs allowed by the cgroup quota of this process, or ``None`` when unlimited."""
    try:
        cpu_max = (root / "cpu.max").read_text().split()
    except OSError:
        cpu_max = []
    if len(cpu_max) == 2 and cpu_max[0] != "max":
        try:
            return _ceil_quota(int(cpu_max[0]), int(cpu_max[1]))
        except ValueError:
            return None  # unreadable: no quota we can honour
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    if quota <= 0:
        return None
    return _ceil_quota(quota, period)


def _ceil_quota(quota: int, period: int) -> int | None:
    if period <= 0:
        return None
    return max(1, -(-quota // period))


# In a parallelkit worker: its share of the CPUs for the work it starts itself (nested
# parallelism, docs/nesting.md); None in a process we did not start.
_cpu_share: int | None = None


def set_cpu_share(share: int | None) -> None:
    """Set this process's share of the CPUs (a parallelkit worker, at start-up)."""
    global _cpu_share
    _cpu_share = share


def cpu_share() -> int | None:
    """This worker's share of the CPUs for work it starts itself; ``None`` outside a
    parallelkit worker (the whole of :func:`usable_cpu_count` is ours)."""
    return _cpu_share


def default_workers() -> int:
    """How many processes a call starts when ``max_workers=None``: the usable CPUs, or,
    in a parallelkit worker, its share of them (at least 1)."""
    share = _cpu_share
    return usable_cpu_count() if share is None else max(1, min(share, usable_cpu_count()))


def child_share(workers: int) -> int:
    """The CPU share of each of ``workers`` processes started here: what this process may
    use, divided among them (at least 1)."""
    return max(1, default_workers() // max(1, workers))
