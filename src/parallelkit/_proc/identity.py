"""Who this process is, as a parallelkit worker, and what it runs when it stops normally.

The child main (:mod:`parallelkit._proc.child`) calls :func:`become` before the user's
initializer, with what the parent said of the worker (its index among its pool's or
stage's workers, how many there are, the start method, its share of the CPUs for work it
starts itself), and :func:`run_exit_hooks` after the role's loop has returned -- never
when the worker is killed.  :func:`worker_info` is the public question; nothing is set in
the parent, so the answer there is ``None``.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from parallelkit._util import context as _context
from parallelkit._util.types import StartMethod

if TYPE_CHECKING:
    from parallelkit._proc.info import WorkerInfo

__all__ = ("Identity", "at_worker_exit", "become", "in_worker", "run_exit_hooks", "worker_info")


# What the parent tells a child: (index, max_workers, start method, stage name, CPU share)
Identity = tuple[int, int, StartMethod, "str | None", int]

_identity: Identity | None = None
_pid = 0  # the process _identity describes (a process a task forks inherits it)
_info: WorkerInfo | None = None  # made on the first worker_info() call
_exit_hooks: list[Callable[[], object]] = []
EXIT_HOOK_NOTE: Final = "parallelkit: an exit hook of worker pid {pid} raised:\n"


def become(identity: Identity) -> None:
    """Called once in a new worker, before its initializer."""
    global _identity, _pid, _info
    _identity, _pid, _info = identity, os.getpid(), None
    _context.set_cpu_share(identity[4])
    _exit_hooks.clear()  # a forked worker does not run hooks its parent registered


def worker_info() -> WorkerInfo | None:
    """Which parallelkit worker this code runs in; ``None`` outside one.

    In a task, an initializer or an exit hook run by a worker process of
    :func:`~parallelkit.run_parallel`, :func:`~parallelkit.imap_parallel`, a
    :class:`~parallelkit.WorkerPool` or a :class:`~parallelkit.Pipeline` stage, a
    :class:`~parallelkit.WorkerInfo`; anywhere else -- the parent process, the ``"thread"`` and
    ``"serial"`` backends, another executor, a process that a task started by itself --
    ``None``.  Typical use: pin a GPU (``info.index % n_gpus``) or name an output file.

    Example:
        >>> import parallelkit as pk
        >>> pk.worker_info() is None  # not in a worker
        True

    .. versionadded:: 0.1
    """
    global _info
    if _identity is None or _pid != os.getpid():  # a process a task forked by itself
        return None
    if _info is None:
        # (not at import: a spawned worker would import dataclasses for nothing)
        from parallelkit._proc.info import WorkerInfo  # noqa: PLC0415

        index, max_workers, start_method, stage, _ = _identity
        _info = WorkerInfo(index, max_workers, _pid, start_method, stage)
    return _info


def in_worker() -> bool:
    """Whether this process is a parallelkit worker (``worker_info()`` is not ``None``)."""
    return _identity is not None and _pid == os.getpid()


def at_worker_exit(hook: Callable[[], object]) -> None:
    """Run ``hook`` in this worker when it stops normally (see :func:`run_exit_hooks`);
    outside a worker, nothing (and nothing is kept)."""
    if in_worker():
        _exit_hooks.append(hook)


def run_exit_hooks() -> None:
    """Run the exit hooks, last registered first; one that raises has its traceback
    printed to stderr (as an ``atexit`` handler's is) and the others still run."""
    if not in_worker():
        return
    while _exit_hooks:
        hook = _exit_hooks.pop()
        try:
            hook()
        except BaseException:
            try:
                sys.stderr.write(EXIT_HOOK_NOTE.format(pid=os.getpid()))
                traceback.print_exc()
                sys.stderr.flush()
            except Exception:
                pass
