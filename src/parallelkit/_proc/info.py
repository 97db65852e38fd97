"""The public record of which worker a task runs in (:func:`parallelkit.worker_info`).

Apart from :mod:`parallelkit._proc.identity`, so that a worker imports ``dataclasses`` only
when a task asks.
"""

from __future__ import annotations

from dataclasses import dataclass

from parallelkit._util.types import StartMethod

__all__ = ("WorkerInfo",)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """Which parallelkit worker process the calling code runs in.

    What :func:`~parallelkit.worker_info` returns in a worker.

    Attributes:
        index: the worker's place among its pool's (or pipeline stage's) workers, from 0 to
            ``max_workers - 1``.  A worker replaced (after a crash, a timeout or
            ``max_tasks_per_worker``) is replaced by one with the same index, so at any time
            each index is held by one living worker.
        max_workers: how many workers the pool (or the stage) has.
        pid: the process id of the worker.
        start_method: how the worker was started.
        stage: the name of the pipeline stage the worker serves; ``None`` for a map worker
            (``run_parallel``, ``imap_parallel``, :class:`~parallelkit.WorkerPool`).

    .. versionadded:: 0.1
    """

    index: int
    max_workers: int
    pid: int
    start_method: StartMethod
    stage: str | None = None
