"""Pipelines: typed stages of worker processes, run by :mod:`parallelkit._pipeline.run`.

``Pipeline`` is a description (a source and stages); each ``run()`` or iteration makes a
``Run`` of the router, which starts the stages' processes and routes batches between
them, and stops them when it ends.
"""

from __future__ import annotations

import functools
import operator
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Protocol, Self, TypeVar

from parallelkit._observe.progress import PipelineProgress, ProgressOption, total_of
from parallelkit._pipeline.processes import Stage
from parallelkit._pipeline.run import Run
from parallelkit._pipeline.stage import FILTER, FLAT_MAP, KIND_NAMES, MAP
from parallelkit._pipeline.stats import PipelineStats, StageStats, StallWatch
from parallelkit._util.checks import (
    check_bool,
    check_callable,
    check_positive_int,
    check_progress,
    check_timeout,
    resolve_start_method,
)
from parallelkit._util.types import StartMethod

if TYPE_CHECKING:
    from parallelkit._map.backends.choose import Backend
    from parallelkit._observe.stalls import StallReport

__all__ = ("Pipeline", "PipelineIterator", "PipelineStats", "StageStats")

T = TypeVar("T")
U = TypeVar("U")
_Y = TypeVar("_Y")


# ------------------------------------------------------------------ public API


class _RunLike(Protocol):
    @property
    def outputs(self) -> deque[list[Any]]: ...
    @property
    def held_counts(self) -> deque[int]: ...

    finished: bool
    streaming: bool
    items_out: int  # items in the lists the consumer took from outputs
    unread: Callable[[], int]  # ... of which it has not read yet

    def release(self, count: int) -> None: ...

    def drive(self, *, until_output: bool) -> None: ...
    def abort(self) -> None: ...
    def stats(self) -> PipelineStats: ...


class PipelineIterator(Iterator[_Y]):
    """Streams a pipeline's results; closing it (or ``with``) cancels the run.

    Breaking out of a ``for`` loop over it drops it; the run is then cancelled when it is
    garbage-collected.  Call :meth:`close` (or use ``with``) to cancel at a known point.

    A run that fails (:class:`~parallelkit.PipelineError`, or ``KeyboardInterrupt`` while
    ``next()`` waits) raises that error once and stops its processes; from then on, as
    after the last result or :meth:`close`, ``next()`` raises ``StopIteration``.
    """

    def __init__(self, run: _RunLike) -> None:
        self._run = run
        run.streaming = True
        self._current: Iterator[_Y] = iter(())
        self._holding = 0  # source items behind self._current, released when we move on
        self._closed = False
        # the source thread holds the run, not this iterator: dropping it cancels the run
        self._finalizer = weakref.finalize(self, run.abort)
        run.unread = functools.partial(_unread, weakref.ref(self))

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> _Y:
        for value in self._current:
            return value
        if self._closed:
            raise StopIteration
        try:
            return self._next_batch()
        except StopIteration:
            raise
        except BaseException:
            # a failed run (a stage's error, a dead worker, Ctrl-C) is over: the error is
            # raised once, and the iterator is finished from then on
            self.close()
            raise

    def _next_batch(self) -> _Y:
        while True:
            for value in self._current:
                return value
            if self._closed:
                raise StopIteration
            run = self._run
            if self._holding:  # we are done with the last batch: it leaves the budget
                run.release(self._holding)
                self._holding = 0
            if not run.outputs:
                if run.finished:
                    self.close()
                    raise StopIteration
                run.drive(until_output=True)
                if not run.outputs:
                    self.close()
                    raise StopIteration
            batch = run.outputs.popleft()
            run.items_out += len(batch)
            self._current = iter(batch)
            del batch
            self._holding = run.held_counts.popleft() if run.held_counts else 0

    @property
    def stats(self) -> PipelineStats:
        """The per-stage summary of this run so far."""
        return self._run.stats()

    def close(self) -> None:
        """Cancel the run (if it is still going) and stop its processes; idempotent."""
        self._closed = True
        self._current = iter(())
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _unread(ref: weakref.ref[PipelineIterator[Any]]) -> int:
    """Values of the batch the iterator is on that it has not handed out yet."""
    iterator = ref()
    return 0 if iterator is None else operator.length_hint(iterator._current)


def _check_name(name: str | None) -> None:
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, not {type(name).__name__}")


class Pipeline(Generic[T]):
    """Stages of worker processes joined by bounded, batched buffers.

    Build it from a source and stages, then run it::

        lengths = Pipeline(paths).map(read, max_workers=2).map(len).run()

    Each stage is a group of ``max_workers`` processes.  A pipeline is a description: each
    :meth:`run` or iteration starts its own processes and stops them when it ends, and
    stages return a new pipeline (the original is unchanged).

    Args:
        source: any iterable, read lazily (a list, tuple or range is sliced directly; any
            other iterable is read by a helper thread, so a slow source does not hold up
            results that are ready).
        start_method: ``"fork"``, ``"forkserver"`` or ``"spawn"``; ``None`` is the
            platform default.
        maxsize: at most this many source items are between the source and the consumer
            at any time (read from the source and not yet handed out), whatever their
            size.  ``None`` (the default) sizes it from the workers and the batch size, and
            also weighs the items: once about 64 MiB of pickled items (a batch weighs its
            largest message at any stage) are between the source and the consumer, no
            more are read, so large items are not multiplied by stages and workers; at
            least two items are always let in, so that the stages overlap.
        progress: report how far each run (``run()`` or iteration) has got: ``True``
            shows one tqdm bar counting source items through the whole pipeline, with
            each stage's output count after it (``pip install 'parallelkit[progress]'``);
            a callable receives a :class:`~parallelkit.Progress` whose ``stages`` hold
            one :class:`~parallelkit.StageProgress` per stage, in the thread that runs
            or iterates the pipeline, after each batch of results arrives.
        stall_timeout: when no batch has come back from any stage for this many seconds
            while stage workers hold batches, print each busy worker's Python stack (every
            thread) and the source items it is on to stderr, or pass a
            :class:`~parallelkit.StallReport` to ``on_stall``; at most once per period;
            the run goes on.  Looked for while the consumer waits for results.
        on_stall: receives the stall reports instead of stderr (in the consumer's thread).
        forward_logs: the stage workers' log records go to this process's handlers
            (``True``, the default; see :doc:`logging`); ``False`` leaves their logging
            alone.

    Raises:
        TypeError: ``source`` is not iterable.
        StartMethodError: an unknown or unavailable start method.
        ValueError: ``maxsize`` is not a positive int.
    """

    def __init__(
        self,
        source: Iterable[T],
        /,
        *,
        start_method: StartMethod | None = None,
        maxsize: int | None = None,
        progress: ProgressOption = False,
        stall_timeout: float | None = None,
        on_stall: Callable[[StallReport], object] | None = None,
        forward_logs: bool = True,
    ) -> None:
        check_progress(progress)
        stall_timeout = check_timeout(stall_timeout, "stall_timeout")
        if on_stall is not None:
            check_callable(on_stall, "on_stall")
        if not isinstance(source, Iterable):
            raise TypeError(f"a pipeline's source must be iterable, not {type(source).__name__}")
        if maxsize is not None:
            check_positive_int(maxsize, "maxsize", none_means="automatic")
        self._source: Iterable[Any] = source
        self._start_method = resolve_start_method(start_method)
        self._maxsize = maxsize
        self._progress = progress
        self._stall = (stall_timeout, on_stall)
        self._forward_logs = forward_logs
        self._stages: tuple[Stage, ...] = ()
        self._last: _StatsSource | None = None

    def _then(
        self,
        kind: int,
        fn: Callable[[Any], Any],
        max_workers: int,
        name: str | None,
        ordered: bool,
    ) -> Pipeline[Any]:
        check_callable(fn, "fn" if kind != FILTER else "pred")
        check_positive_int(max_workers, "max_workers")
        _check_name(name)
        check_bool(ordered, "ordered")
        taken = {stage.name for stage in self._stages}
        if name is None:
            label = getattr(fn, "__qualname__", None) or type(fn).__name__
            base = name = f"{KIND_NAMES[kind]}({label})"
            number = 1
            while name in taken:
                number += 1
                name = f"{base}#{number}"
        elif name in taken:
            raise ValueError(f"a pipeline stage is already named {name!r}; names must differ")
        new: Pipeline[Any] = Pipeline.__new__(Pipeline)
        new._source = self._source
        new._start_method = self._start_method
        new._maxsize = self._maxsize
        new._progress = self._progress
        new._stall = self._stall
        new._forward_logs = self._forward_logs
        new._stages = (*self._stages, Stage(kind, fn, max_workers, name, ordered))
        new._last = None
        return new

    def map(
        self,
        fn: Callable[[T], U],
        /,
        *,
        max_workers: int = 1,
        name: str | None = None,
        ordered: bool = True,
    ) -> Pipeline[U]:
        """Add a stage that passes on ``fn(item)`` for each item.

        Args:
            fn: the function (sent to the workers with pickle, or cloudpickle when that
                is installed, under forkserver and spawn).
            max_workers: processes that run this stage.
            name: the stage's name in errors and statistics; default ``"map(fn name)"``.
            ordered: ``False`` lets results overtake each other (handed out as they are
                ready); the pipeline keeps source order only if every stage is ordered.
        """
        return self._then(MAP, fn, max_workers, name, ordered)

    def filter(
        self,
        pred: Callable[[T], object],
        /,
        *,
        max_workers: int = 1,
        name: str | None = None,
        ordered: bool = True,
    ) -> Pipeline[T]:
        """Add a stage that passes on the items for which ``pred(item)`` is true."""
        return self._then(FILTER, pred, max_workers, name, ordered)

    def flat_map(
        self,
        fn: Callable[[T], Iterable[U]],
        /,
        *,
        max_workers: int = 1,
        name: str | None = None,
        ordered: bool = True,
    ) -> Pipeline[U]:
        """Add a stage that passes on every item of ``fn(item)``, for each item."""
        return self._then(FLAT_MAP, fn, max_workers, name, ordered)

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages' names, in order."""
        return tuple(stage.name for stage in self._stages)

    @property
    def stats(self) -> PipelineStats | None:
        """The per-stage summary of the most recent run of this pipeline object (whatever
        its backend; so far, while it goes on), or ``None`` before the first run.

        ``items_out`` counts the results the consumer has received.  On a backend other
        than the stages' own processes every stage runs in the backend's workers: each
        stage's ``workers`` is theirs, and its ``waiting_seconds`` their idle time.
        """
        return None if self._last is None else self._last.stats()

    def _start(self) -> Run:
        run = Run(
            self._source,
            self._stages,
            self._start_method,
            self._maxsize,
            forward_logs=self._forward_logs,
        )
        self._last = run
        if self._progress is not False:
            run.progress = PipelineProgress(self._progress, total_of(self._source))
            run.report_progress()
        stall_timeout, on_stall = self._stall
        if stall_timeout is not None:
            run.stall = StallWatch(stall_timeout, on_stall)
        run.start()
        return run

    def run(self, *, backend: Backend | None = None) -> list[T]:
        """Run the pipeline to the end and return every result.

        Args:
            backend: ``None`` or ``"process"``: the stages' own worker processes.  Any
                other backend of :func:`~parallelkit.run_parallel` (``"thread"``,
                ``"serial"``, an Executor, a ``WorkerPool``, a Dask ``Client``) runs every
                stage of a chunk of source items in one task, so the data stays where it
                is between stages (on the Dask worker) and only the results come back;
                the stages' ``max_workers`` do not apply there, and the results come in
                source order.

        Raises:
            PipelineError: a stage raised (``__cause__`` is its exception, ``.item`` the
                item), a stage worker died (``__cause__`` is a ``WorkerCrashedError``), or
                the source raised (``.stage == "source"``).
            SerializationError: a stage's function cannot be sent to its workers.
        """
        if not self._stages:
            began = time.perf_counter()
            items = list(self._source)
            stats = PipelineStats((), len(items), len(items), time.perf_counter() - began, 0.0)
            self._last = _Finished(stats)
            return items
        if backend is not None and not (isinstance(backend, str) and backend == "process"):
            from parallelkit._pipeline.backends import run_stages  # noqa: PLC0415

            if self._stall != (None, None):
                raise ValueError(
                    "stall_timeout and on_stall apply to the stages' own worker processes, "
                    "not to backend="
                )

            done = _Finished(None)
            self._last = done
            return run_stages(
                self._source,
                self._stages,
                backend,
                progress=self._progress,
                on_stats=done.set,
            )
        run = self._start()
        results: list[T] = []
        try:
            run.drive(until_output=False)
            for batch in run.outputs:
                results.extend(batch)
            run.outputs.clear()  # the run is kept for its stats: not its results
            run.items_out = len(results)
            return results
        finally:
            run.abort()

    def __iter__(self) -> PipelineIterator[T]:
        """Start the pipeline and stream its results; close the iterator to cancel."""
        if not self._stages:
            passing = _PassThrough(self._source)
            self._last = passing
            return PipelineIterator(passing)
        return PipelineIterator(self._start())

    def __repr__(self) -> str:
        stages = " -> ".join(self.stages) or "no stages"
        return f"<Pipeline {stages}>"


class _StatsSource(Protocol):
    def stats(self) -> PipelineStats: ...


class _Finished:
    """The stats of a run on another backend (see ``run_stages``)."""

    def __init__(self, stats: PipelineStats | None) -> None:
        self._stats = stats

    def set(self, stats: PipelineStats) -> None:
        self._stats = stats

    def stats(self) -> PipelineStats:
        if self._stats is None:  # the run failed before it started
            return PipelineStats((), 0, 0, 0.0, 0.0)
        return self._stats


class _PassThrough:
    """The run of a pipeline without stages: the source itself, in this process."""

    def __init__(self, source: Iterable[Any]) -> None:
        self.iterator = iter(source)
        self.outputs: deque[list[Any]] = deque()
        self.held_counts: deque[int] = deque()
        self.finished = False
        self.streaming = True
        self.items_out = 0
        self.unread: Callable[[], int] = lambda: 0
        self.pulled = 0
        self.started = time.perf_counter()

    def release(self, count: int) -> None:
        return

    def drive(self, *, until_output: bool) -> None:
        for item in self.iterator:
            self.outputs.append([item])
            self.pulled += 1
            return
        self.finished = True

    def abort(self) -> None:
        self.outputs.clear()
        self.finished = True

    def stats(self) -> PipelineStats:
        out = self.items_out - self.unread()
        return PipelineStats((), self.pulled, out, time.perf_counter() - self.started, 0.0)
