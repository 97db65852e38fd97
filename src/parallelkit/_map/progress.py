"""Progress reporting (``progress=``) and the per-call watch that drives it.

The records and reporters are :mod:`parallelkit._observe.progress`.  A map call with
``progress=`` or ``stall_timeout=`` runs a :class:`TrackedJob`: a
:class:`~parallelkit._map.job.Job` that counts the items of each chunk as its results arrive
(chunk granularity: nothing is added per item, and a call without these options runs the
plain ``Job``).  The count is reported from the thread that drives the run -- outside the
engine's lock, through the engine's deferred callbacks::

    worker ──DONE(chunk)──▶ engine.step ──complete()──▶ TrackedJob: done += len(chunk)
                                                         └─ defer(report) ─▶ tqdm bar or
                                                            the user's callable(Progress)

Pipelines report from their router (the consumer's thread) after each batch it receives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from parallelkit._map.job import Job
from parallelkit._observe.progress import ProgressOption, Reporter, make_reporter

if TYPE_CHECKING:
    from parallelkit._map.backends.choose import ChunkEngine
    from parallelkit._map.engine import Engine
    from parallelkit._map.stats import StallWatch
    from parallelkit._observe.stalls import StallReport

__all__ = ("TrackedJob", "Watch", "job_class")


class Watch:
    """What one map call watches: its progress and, on processes, stalls.

    ``completed`` runs under the engine's lock (in ``Job.complete``); reports run outside
    it, in the thread that drives the run.
    """

    def __init__(
        self,
        progress: ProgressOption,
        stall_timeout: float | None,
        on_stall: Callable[[StallReport], object] | None,
        total: int | None,
    ) -> None:
        self.progress = progress
        self.stall_timeout = stall_timeout
        self.on_stall = on_stall
        self.total = total
        self.done = 0
        self.reporter: Reporter | None = None
        self.engine: Engine | ChunkEngine | None = None
        self.stall: StallWatch | None = None
        self.report_pending = False
        self.closed = False

    @staticmethod
    def create(
        progress: ProgressOption,
        stall_timeout: float | None,
        on_stall: Callable[[StallReport], object] | None,
        total: int | None,
    ) -> Watch | None:
        """A watch, or ``None`` when the call asked for neither progress nor stall checks."""
        if progress is False and stall_timeout is None:
            return None
        return Watch(progress, stall_timeout, on_stall, total)

    def attach(self, engine: Engine | ChunkEngine, job: Job) -> None:
        """Start watching ``job`` (a :class:`TrackedJob`) on ``engine``."""
        from parallelkit._map.engine import Engine  # noqa: PLC0415

        assert isinstance(job, TrackedJob)
        job.watch = self
        self.engine = engine
        self.reporter = make_reporter(self.progress, self.total)
        if self.reporter is not None:
            self.reporter.update(0, ())
        if self.stall_timeout is not None and isinstance(engine, Engine):
            from parallelkit._map.stats import StallWatch  # noqa: PLC0415

            self.stall = StallWatch(engine, job, self.stall_timeout, self.on_stall, self._done)
            # a stall report names the item each worker is on: no untracked tiny items
            from parallelkit._map import worker as W  # noqa: PLC0415

            job.flags |= W.TRACKED
            with engine.mutex:
                engine.watchers.append(self.stall)
            engine.wake()  # a thread waiting already: let it pick up the shorter poll

    def _done(self) -> int:
        return self.done

    def completed(self, count: int) -> None:
        self.done += count
        if self.reporter is not None and not self.report_pending and self.engine is not None:
            self.report_pending = True
            self.engine.defer(self._report)

    def _report(self) -> None:
        self.report_pending = False
        if self.reporter is not None and not self.closed:
            self.reporter.update(self.done, ())

    def close(self) -> None:
        """Stop watching; show the final count and close the bar.  Idempotent; may run
        from garbage collection, so it never takes the engine's lock."""
        if self.closed:
            return
        self.closed = True
        engine, stall = self.engine, self.stall
        if stall is not None and engine is not None:
            watchers: list[Any] = getattr(engine, "watchers", [])
            if stall in watchers:
                watchers.remove(stall)
        if self.reporter is not None:
            try:
                self.reporter.update(self.done, ())
            finally:
                self.reporter.close()


class TrackedJob(Job):
    """A job that counts its items as their results arrive (see the module docstring)."""

    watch: Watch | None = None

    def complete(
        self, start: int, results: list[Any], errors: list[tuple[int, BaseException]] | None
    ) -> None:
        if not self.cancelled and self.watch is not None:
            self.watch.completed(len(results))
        super().complete(start, results, errors)


def job_class(watch: Watch | None) -> type[Job]:
    """The job type for a call: the plain ``Job`` unless something watches it."""
    return Job if watch is None else TrackedJob
