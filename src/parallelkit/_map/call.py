"""One map call: its options, checked once, and the set-up and end every entry point shares.

``run_parallel``, ``imap_parallel`` and ``WorkerPool.imap`` check their per-call options
into one :class:`MapOptions`, pick an engine (new worker processes, a pool's, or a
``ChunkEngine`` over another backend) and hand both here::

    check_options(...) ─▶ MapOptions ─┐   engine
                                      ▼     │
      collect_call: job + watch ─▶ collect ─┴─▶ list   ─┐ the end, however it ends: stats,
      stream_call:  job + watch ─▶ ResultIterator       ─┘ an owned engine shut down or the
                                                           job released, the watch closed

Whatever fails during the set-up, the watch is closed and an engine the call owns stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from parallelkit._map.job import collect
from parallelkit._map.progress import Watch, job_class
from parallelkit._map.results import ResultIterator
from parallelkit._map.stats import StatsBaseline, engine_stats
from parallelkit._observe.progress import ProgressOption, total_of
from parallelkit._observe.stalls import StallReport
from parallelkit._observe.stats import MapStats
from parallelkit._util.checks import (
    check_bool,
    check_callable,
    check_chunksize,
    check_progress,
    check_timeout,
)

if TYPE_CHECKING:
    from parallelkit._map.backends.driver import ChunkEngine
    from parallelkit._map.engine import Engine
    from parallelkit._map.job import Job

__all__ = ("MapOptions", "as_sequence", "check_options", "collect_call", "stream_call")


@dataclass(frozen=True, slots=True)
class MapOptions:
    """The per-call options of a map, checked (timeouts normalised: ``None`` is no limit)."""

    chunksize: int | None = None
    ordered: bool = True
    timeout: float | None = None
    return_exceptions: bool = False
    progress: ProgressOption = False
    stall_timeout: float | None = None
    on_stall: Callable[[StallReport], object] | None = None
    on_stats: Callable[[MapStats], object] | None = None

    @property
    def watched(self) -> bool:
        """Whether the call reports progress or looks for stalls (a :class:`Watch`)."""
        return self.progress is not False or self.stall_timeout is not None

    def refuse_stall_options(self) -> None:
        """Raise ``ValueError`` if stall options are set: the backend has no processes."""
        if self.stall_timeout is not None or self.on_stall is not None:
            raise ValueError(
                "stall_timeout and on_stall apply to worker processes (the default backend or "
                "a WorkerPool): they dump the stacks of the processes running the items"
            )


def check_options(
    fn: object,
    *,
    chunksize: int | None,
    ordered: bool,
    timeout: float | None,
    return_exceptions: bool,
    progress: ProgressOption,
    stall_timeout: float | None,
    on_stall: Callable[[StallReport], object] | None,
    on_stats: Callable[[MapStats], object] | None = None,
) -> MapOptions:
    """Validate ``fn`` and a map call's per-call options, in the caller's process.

    Raises:
        TypeError: an option of the wrong type (``fn`` not callable, or async).
        ValueError: an option out of range.
        ImportError: ``progress=True`` without tqdm.
    """
    check_callable(fn)
    check_chunksize(chunksize)
    checked_timeout = check_timeout(timeout)
    check_bool(ordered, "ordered")
    check_bool(return_exceptions, "return_exceptions")
    check_progress(progress)
    checked_stall_timeout = check_timeout(stall_timeout, "stall_timeout")
    if on_stall is not None:
        check_callable(on_stall, "on_stall")
    if on_stats is not None:
        check_callable(on_stats, "on_stats")
    return MapOptions(
        chunksize,
        ordered,
        checked_timeout,
        return_exceptions,
        progress,
        checked_stall_timeout,
        on_stall,
        on_stats,
    )


def as_sequence(items: Iterable[Any]) -> Sequence[Any]:
    """``items`` as a sequence: a list, tuple or range as it is, anything else read in full."""
    if isinstance(items, list | tuple | range):
        return items
    return list(items)


def length_of(items: Iterable[Any]) -> int | None:
    """The number of items of a list, tuple or range; ``None`` for other inputs (read lazily)."""
    return len(items) if isinstance(items, list | tuple | range) else None


# items that ran before the job (``backend="auto"``'s probe): (count, results, errors,
# the error that fails the call)
Resume = tuple[int, list[Any], list[tuple[int, BaseException]] | None, BaseException | None]


def _new_job(
    engine: Engine | ChunkEngine,
    fn: Callable[..., object],
    items: Iterable[Any],
    length: int | None,
    options: MapOptions,
    watch: Watch | None,
    inherited: bool,
    resume: Resume | None = None,
) -> Job:
    job = job_class(watch)(
        engine,
        fn,
        items if length is not None else iter(items),  # type: ignore[arg-type]  # a Sequence
        length=length,
        chunksize=options.chunksize,
        ordered=options.ordered,
        return_exceptions=options.return_exceptions,
        fail_fast=True,
        timeout=options.timeout,
        inherited=inherited,
    )
    if watch is not None:
        watch.attach(engine, job)
    if resume is not None:
        job.resume(*resume)
    return job


def collect_call(
    engine: Engine | ChunkEngine,
    fn: Callable[..., object],
    seq: Sequence[Any],
    options: MapOptions,
    *,
    owned: bool,
    inherited: bool = False,
    resume: Resume | None = None,
    baseline: StatsBaseline | None = None,
) -> list[Any]:
    """Run ``fn`` over ``seq`` on ``engine``; the results as a list.

    ``owned``: the call made ``engine`` and shuts it down at the end (gracefully if the
    call succeeded); otherwise (a pool's engine) only the call's job is stopped.  Either
    way the watch is closed and ``on_stats`` receives the call's stats, also on failure.
    ``inherited``: fork workers inherited ``fn`` and ``seq`` (see ``Engine``).  ``resume``:
    the first items ran already (``backend="auto"``), ``baseline`` says so for the stats.
    """
    watch = Watch.create(options.progress, options.stall_timeout, options.on_stall, len(seq))
    baseline = _baseline(engine, baseline)
    job: Job | None = None
    ok = False
    try:
        job = _new_job(engine, fn, seq, len(seq), options, watch, inherited, resume)
        engine.add_job(job)
        results = collect(engine, job)
        ok = True
        return results
    finally:
        _end(engine, job, baseline, watch, options.on_stats, owned=owned, graceful=ok)


def _baseline(engine: Engine | ChunkEngine, given: StatsBaseline | None) -> StatsBaseline:
    if given is None:
        return StatsBaseline(engine)
    fresh = StatsBaseline(engine, began=given.began)
    fresh.choice, fresh.probe = given.choice, given.probe
    return fresh


def _end(
    engine: Engine | ChunkEngine,
    job: Job | None,
    baseline: StatsBaseline,
    watch: Watch | None,
    on_stats: Callable[[MapStats], object] | None,
    *,
    owned: bool,
    graceful: bool,
) -> None:
    stats = None
    try:
        if owned:
            if on_stats is not None:
                stats = engine_stats(engine, baseline)  # before the workers go
            engine.shutdown(graceful=graceful)
        elif job is not None:
            with engine.mutex:
                job.cancel()
                job.release()
    finally:
        if watch is not None:
            watch.close()
    if on_stats is not None:
        on_stats(engine_stats(engine, baseline) if stats is None else stats)


def stream_call(
    engine: Engine | ChunkEngine,
    fn: Callable[..., object],
    items: Iterable[Any],
    options: MapOptions,
    *,
    owned: bool,
    resume: Resume | None = None,
    baseline: StatsBaseline | None = None,
) -> ResultIterator[Any]:
    """Start ``fn`` over ``items`` on ``engine``; an iterator over the results.

    A list, tuple or range is chunked by length; anything else is read lazily.  ``owned``:
    the iterator shuts ``engine`` down when it is closed (or dropped).  ``resume`` and
    ``baseline`` as for :func:`collect_call`.
    """
    length = length_of(items)
    watch = Watch.create(options.progress, options.stall_timeout, options.on_stall, total_of(items))
    baseline = _baseline(engine, baseline)
    try:
        job = _new_job(engine, fn, items, length, options, watch, False, resume)
        engine.add_job(job)
    except BaseException:
        try:
            if owned:
                engine.shutdown(graceful=False)
        finally:
            if watch is not None:
                watch.close()
        raise
    return ResultIterator._start(engine, job, owns_engine=owned, watch=watch, baseline=baseline)
