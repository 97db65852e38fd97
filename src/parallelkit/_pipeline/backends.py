"""Pipelines on a backend other than their own processes: ``Pipeline.run(backend=...)``.

Built on the map API (``run_parallel``), on purpose: every stage of a pipeline runs, item by
item, inside one task per chunk of source items, so a chunk's data goes from stage to stage
where it is (on the Dask worker, in the thread) and only the last stage's outputs come
back.  Chunking, ordering, bounded work in flight and crash handling are the map API's::

    source ──chunks──▶ backend: for each item: stage 1 ▶ stage 2 ▶ ... ──outputs──▶ caller

A stage's exception becomes :class:`~parallelkit.PipelineError` naming the stage and the
item, as with the pipeline's own processes.  Per-stage ``max_workers`` do not apply: the
backend's workers run every stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from parallelkit._map.calls import explain
from parallelkit._pipeline.stage import FILTER, MAP
from parallelkit._pipeline.stats import PipelineStats, StageStats
from parallelkit._wire.codec import ExceptionRecord, capture_exception, dumps, rebuild_exception
from parallelkit.errors import PipelineError, WorkerCrashedError

if TYPE_CHECKING:
    from parallelkit._observe.stats import MapStats
    from parallelkit._pipeline.processes import Stage


def _shown(item: object) -> str:
    try:
        shown = repr(item)
    except Exception:
        shown = f"<{type(item).__name__} object>"
    return shown if len(shown) <= 200 else shown[:197] + "..."


class StageFailure:
    """A source item's result when one of its stages raised (rather than raising)."""

    __slots__ = ("exc", "item", "record", "shown", "stage")

    def __init__(
        self,
        stage: int,
        exc: BaseException | None,
        item: object,
        shown: str,
        record: ExceptionRecord | None = None,
    ) -> None:
        self.stage = stage
        self.exc = exc
        self.item = item
        self.shown = shown
        self.record = record

    def __reduce__(self) -> tuple[object, ...]:
        # crossing to another process: the exception as a record, the item if it can go
        record = self.record
        if self.exc is not None:
            record = capture_exception(self.exc)
        item = self.item
        try:
            dumps(item)
        except Exception:
            item = None
        return (StageFailure, (self.stage, None, item, self.shown, record))

    def error(self, stages: Sequence[Stage], index: int) -> PipelineError:
        stage = stages[self.stage]
        where = f"in pipeline stage {stage.name!r} on item {self.shown}"
        if self.exc is not None:
            cause = self.exc
            cause.add_note(f"parallelkit: raised {where}")
            type_name, message = type(cause).__name__, str(cause)
        else:
            assert self.record is not None
            cause = rebuild_exception(self.record, where=where)
            type_name, message = self.record.type_name, self.record.message
        error = PipelineError(
            f"stage {stage.name!r} failed on item {self.shown}: {type_name}: {message}",
            stage=stage.name,
            item=self.item,
            item_index=index if self.stage == 0 else None,
        )
        error.__cause__ = cause
        return error


class StageChain:
    """Runs every stage on one source item.

    Returns ``(outcome, counts)``: the outcome is the list of the item's outputs, or a
    :class:`StageFailure`; ``counts`` holds, for each stage the item reached, the items
    the stage passed on and the nanoseconds it spent (the run's statistics).
    """

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.steps = tuple((stage.kind, stage.fn) for stage in stages)

    @property
    def functions(self) -> tuple[object, ...]:
        """The stages' functions (the Dask backend sends their modules by value)."""
        return tuple(fn for _, fn in self.steps)

    def __call__(self, item: object) -> tuple[list[object] | StageFailure, tuple[int, ...]]:
        clock = time.perf_counter_ns
        counts: list[int] = []
        values = [item]
        for number, (kind, fn) in enumerate(self.steps):
            out: list[object] = []
            began = clock()
            for value in values:
                try:
                    if kind == MAP:
                        out.append(fn(value))
                    elif kind == FILTER:
                        if fn(value):
                            out.append(value)
                    else:
                        out.extend(fn(value))
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:
                    counts += (len(out), clock() - began)
                    failure = explain(fn, value, exc)
                    return StageFailure(number, failure, value, _shown(value)), tuple(counts)
            counts += (len(out), clock() - began)
            values = out
            if not values:
                break
        return values, tuple(counts)


class _Tally:
    """Adds up the per-item counts of a run's :class:`StageChain` into its stats."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = stages
        self.items_in = [0] * len(stages)
        self.items_out = [0] * len(stages)
        self.busy = [0] * len(stages)
        self.source_items = 0
        self.items_out_total = 0
        self.map_stats: MapStats | None = None
        self.started = time.perf_counter()

    def add(self, counts: tuple[int, ...]) -> None:
        self.source_items += 1
        passed = 1
        for stage in range(len(counts) // 2):
            self.items_in[stage] += passed
            passed = counts[2 * stage]
            self.items_out[stage] += passed
            self.busy[stage] += counts[2 * stage + 1]

    def stats(self) -> PipelineStats:
        workers = 0 if self.map_stats is None else len(self.map_stats.workers)
        idle = (
            0.0 if self.map_stats is None else sum(w.idle_seconds for w in self.map_stats.workers)
        )
        return PipelineStats(
            stages=tuple(
                StageStats(
                    name=stage.name,
                    workers=workers,
                    items_in=self.items_in[i],
                    items_out=self.items_out[i],
                    busy_seconds=self.busy[i] / 1e9,
                    waiting_seconds=idle,
                )
                for i, stage in enumerate(self.stages)
            ),
            source_items=self.source_items,
            items_out=self.items_out_total,
            seconds=time.perf_counter() - self.started,
            consumer_waiting_seconds=0.0,
        )


class _GuardedSource:
    """The source, read by the map API; an exception ends it and is kept for later."""

    def __init__(self, source: Iterable[Any]) -> None:
        self.source = source
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self.source
        except Exception as exc:
            self.error = exc


def run_stages(
    source: Iterable[Any],
    stages: Sequence[Stage],
    backend: object,
    *,
    progress: object = False,
    on_stats: Callable[[PipelineStats], object] | None = None,
) -> list[Any]:
    """``Pipeline(source)...run(backend=backend)``: every output, in source order.

    ``on_stats`` receives the run's statistics however it ends (before its error is
    raised).  Every stage runs in the backend's workers, so each stage's ``workers`` is
    the backend's and its ``waiting_seconds`` is their idle time.
    """
    from parallelkit._map.api import run_parallel  # noqa: PLC0415 - built on the map API

    if isinstance(backend, str) and backend == "auto":
        raise ValueError(
            "backend='auto' is for run_parallel and imap_parallel; a pipeline runs on its "
            "stages' own processes (backend=None) or on the backend you name"
        )
    guarded = _GuardedSource(source)
    items: Iterable[Any] = source if isinstance(source, list | tuple | range) else guarded
    names = " -> ".join(stage.name for stage in stages)
    tally = _Tally(stages)

    def keep(stats: MapStats) -> None:
        tally.map_stats = stats

    try:
        results = run_parallel(  # type: ignore[call-overload]
            StageChain(stages), items, backend=backend, progress=progress, on_stats=keep
        )
    except WorkerCrashedError as exc:
        error = PipelineError(
            f"a worker died running the stages {names} on source item {exc.item_index}: {exc}",
            stage=names,
            item_index=exc.item_index,
        )
        raise error from exc
    finally:
        if on_stats is not None:
            on_stats(tally.stats())  # so far; completed below when the results are in
    out: list[Any] = []
    failure: PipelineError | None = None
    for index, (result, counts) in enumerate(results):
        tally.add(counts)
        if failure is None:
            if type(result) is StageFailure:
                failure = result.error(stages, index)
            else:
                out.extend(result)
    tally.items_out_total = len(out) if failure is None else 0
    if on_stats is not None:
        on_stats(tally.stats())
    if guarded.error is not None:
        error = PipelineError(
            f"the pipeline's source raised {type(guarded.error).__name__}: {guarded.error}",
            stage="source",
        )
        raise error from guarded.error
    if failure is not None:
        raise failure
    return out
