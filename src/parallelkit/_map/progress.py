"""Progress reporting (``progress=``) and the per-call watch that drives it.

A map call with ``progress=`` or ``stall_timeout=`` runs a :class:`TrackedJob`: a
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

import time
from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from parallelkit._map.job import Job

if TYPE_CHECKING:
    from parallelkit._map.backends.choose import ChunkEngine
    from parallelkit._map.engine import Engine
    from parallelkit._map.stats import StallReport, StallWatch

__all__ = ("Progress", "ProgressOption", "StageProgress")

EXTRA_HINT = "pip install 'parallelkit[progress]'"


@dataclass(frozen=True, slots=True)
class StageProgress:
    """How far one pipeline stage has got.

    Attributes:
        name: the stage's name.
        items_in: items it has received.
        items_out: items it has passed on.
    """

    name: str
    items_in: int
    items_out: int


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a run has got; what a ``progress=`` callable receives.

    Attributes:
        done: items finished (for a pipeline: source items whose outputs came out of the
            last stage).  Grows with every event and ends at ``total`` when the run
            completes.
        total: the number of items, when the input has a length; else ``None``.
        elapsed: seconds since the run started.
        stages: for a pipeline, one :class:`StageProgress` per stage; else empty.
    """

    done: int
    total: int | None
    elapsed: float
    stages: tuple[StageProgress, ...] = ()

    @property
    def fraction(self) -> float | None:
        """``done / total`` (0 to 1), or ``None`` without a total."""
        if self.total is None:
            return None
        return self.done / self.total if self.total else 1.0


ProgressOption: TypeAlias = bool | Callable[[Progress], object]


class _Reporter(Protocol):
    def update(self, done: int, stages: tuple[StageProgress, ...]) -> None: ...
    def close(self) -> None: ...


class _CallbackReporter:
    def __init__(self, fn: Callable[[Progress], object], total: int | None) -> None:
        self.fn = fn
        self.total = total
        self.began = time.monotonic()
        self.last: tuple[int, tuple[StageProgress, ...]] | None = None

    def update(self, done: int, stages: tuple[StageProgress, ...]) -> None:
        if (done, stages) == self.last:
            return
        self.last = (done, stages)
        self.fn(Progress(done, self.total, time.monotonic() - self.began, stages))

    def close(self) -> None:
        pass


class _BarReporter:
    def __init__(self, total: int | None, desc: str | None) -> None:
        from tqdm import tqdm  # noqa: PLC0415 - optional, imported when asked for

        class Bar(tqdm):  # type: ignore[misc]  # tqdm is untyped
            # no monitor thread: it would outlive the bar, and fork workers would be forked
            # from a process running it (Python 3.12 warns about that, rightly)
            monitor_interval = 0

        self.bar: Any = Bar(total=total, desc=desc, unit="item", dynamic_ncols=True)
        self.done = 0
        self.stages: tuple[StageProgress, ...] = ()
        self.closed = False

    def update(self, done: int, stages: tuple[StageProgress, ...]) -> None:
        if self.closed:
            return
        if stages != self.stages:
            self.stages = stages
            self.bar.set_postfix_str(
                " ".join(f"{s.name}={s.items_out}" for s in stages), refresh=False
            )
        if done > self.done:
            self.bar.update(done - self.done)
            self.done = done

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.bar.close()


def check_progress(progress: object) -> None:
    """Validate ``progress=`` in the caller; with ``True``, check that tqdm is installed."""
    if isinstance(progress, bool):
        if progress:
            try:
                import tqdm  # noqa: F401, PLC0415
            except ImportError as exc:
                raise ImportError(
                    f"progress=True shows a tqdm progress bar, and tqdm is not installed: "
                    f"{EXTRA_HINT} (or pass a callable to render progress yourself)"
                ) from exc
        return
    if not callable(progress):
        raise TypeError(
            "progress must be True, False or a callable taking a parallelkit.Progress, "
            f"not {type(progress).__name__}"
        )


def make_reporter(
    progress: ProgressOption, total: int | None, desc: str | None = None
) -> _Reporter | None:
    if progress is False:
        return None
    if progress is True:
        return _BarReporter(total, desc)
    return _CallbackReporter(progress, total)


def total_of(items: object) -> int | None:
    """The number of items, when the input has a ``len()``."""
    if isinstance(items, Sized):
        try:
            return len(items)
        except TypeError:
            return None
    return None


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
        self.reporter: _Reporter | None = None
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


class PipelineProgress:
    """Reports a pipeline run's progress from its router (see ``_router.Run``)."""

    def __init__(self, progress: ProgressOption, total: int | None) -> None:
        self.reporter = make_reporter(progress, total)
        self.closed = False

    def update(self, done: int, stages: tuple[StageProgress, ...]) -> None:
        if self.reporter is not None and not self.closed:
            self.reporter.update(done, stages)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.reporter is not None:
                self.reporter.close()
