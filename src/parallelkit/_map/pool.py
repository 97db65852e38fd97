"""The parallel-map API: ``run_parallel``, ``imap_parallel`` and ``WorkerPool``.

These are thin, validating front ends over :mod:`parallelkit._map.engine`: they check every
argument in the caller's process (so a typo never starts a process), build a job, and either
collect its results (``run_parallel``), stream them (``imap_parallel`` / ``WorkerPool.imap``)
or complete futures (``WorkerPool.submit``).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar, overload

from parallelkit._map.backends.choose import ChunkEngine, RunnerFactory, check_backend
from parallelkit._map.engine import Engine
from parallelkit._map.job import Job, PoolBrokenError, collect, handed_out, iterate, stop
from parallelkit._map.progress import Watch, job_class
from parallelkit._map.stats import StatsBaseline, engine_stats
from parallelkit._observe.progress import ProgressOption, check_progress, total_of
from parallelkit._observe.stalls import StallReport
from parallelkit._observe.stats import MapStats
from parallelkit._util.checks import check_bool, check_callable, check_timeout
from parallelkit._util.context import get_context, resolve_max_workers, resolve_start_method
from parallelkit._util.owners import Owned, register
from parallelkit._util.types import P, R, StartMethod, T

if TYPE_CHECKING:
    from parallelkit._map.backends.choose import Backend

_Y = TypeVar("_Y")
_U = TypeVar("_U")

__all__ = ("ResultIterator", "WorkerPool", "imap_parallel", "run_parallel")


# ------------------------------------------------------------------ validation


def _check_chunksize(chunksize: int | None) -> None:
    if chunksize is None:
        return
    if isinstance(chunksize, bool) or not isinstance(chunksize, int):
        raise TypeError(f"chunksize must be a positive int or None, not {type(chunksize).__name__}")
    if chunksize <= 0:
        raise ValueError(f"chunksize must be a positive int or None (automatic), got {chunksize}")


def _check_timeout(timeout: float | None, what: str = "timeout") -> None:
    check_timeout(timeout, what)


def _check_initializer(
    initializer: Callable[..., object] | None, initargs: tuple[object, ...]
) -> None:
    if initializer is not None:
        check_callable(initializer, "initializer")
    if not isinstance(initargs, tuple):
        raise TypeError(f"initargs must be a tuple, not {type(initargs).__name__}")


def _check_max_tasks(max_tasks: int | None) -> None:
    if max_tasks is None:
        return
    if isinstance(max_tasks, bool) or not isinstance(max_tasks, int) or max_tasks <= 0:
        raise ValueError(f"max_tasks_per_worker must be a positive int or None, got {max_tasks!r}")


def _check_watch_options(
    progress: object,
    stall_timeout: float | None,
    on_stall: object,
    on_stats: object,
    on_processes: bool,
) -> None:
    """Validate ``progress``, ``stall_timeout``, ``on_stall`` and ``on_stats``."""
    check_progress(progress)
    _check_timeout(stall_timeout, "stall_timeout")
    if on_stall is not None:
        check_callable(on_stall, "on_stall")
    if on_stats is not None:
        check_callable(on_stats, "on_stats")
    if not on_processes and (stall_timeout is not None or on_stall is not None):
        raise ValueError(
            "stall_timeout and on_stall apply to worker processes (the default backend or a "
            "WorkerPool): they dump the stacks of the processes running the items"
        )


def _end_call(
    engine: Engine | ChunkEngine,
    baseline: StatsBaseline,
    on_stats: Callable[[MapStats], object] | None,
    watch: Watch | None,
    *,
    graceful: bool,
) -> None:
    """The end of a one-call map, however it ends: stats (taken before the workers go),
    shut the engine down, close the progress watch, then hand the stats to ``on_stats``."""
    stats = None if on_stats is None else engine_stats(engine, baseline)
    try:
        engine.shutdown(graceful=graceful)
    finally:
        if watch is not None:
            watch.close()
    if on_stats is not None and stats is not None:
        on_stats(stats)


def _check_map_options(
    fn: object,
    backend: object,
    chunksize: int | None,
    timeout: float | None,
    initializer: Callable[..., object] | None,
    initargs: tuple[object, ...],
    start_method: StartMethod | None,
    max_workers: int | None,
) -> WorkerPool | RunnerFactory | None:
    """Validate what ``run_parallel`` and ``imap_parallel`` share.

    Returns the pool to reuse, a factory for another backend's runner, or ``None``
    for new worker processes.
    """
    check_callable(fn)
    _check_chunksize(chunksize)
    _check_timeout(timeout)
    _check_initializer(initializer, initargs)
    if backend is None or (isinstance(backend, str) and backend == "process"):
        return None
    if isinstance(backend, WorkerPool):
        if start_method is not None or initializer is not None or max_workers is not None:
            raise ValueError(
                "start_method, max_workers and initializer belong to the WorkerPool "
                "when it is the backend; set them where the pool is created"
            )
        return backend
    return check_backend(
        backend, max_workers=max_workers, start_method=start_method, initializer=initializer
    )


def _run_elsewhere(
    factory: RunnerFactory,
    fn: Callable[[T], R],
    items: Iterable[T],
    chunksize: int | None,
    ordered: bool,
    timeout: float | None,
    return_exceptions: bool,
    watch: Watch | None = None,
    on_stats: Callable[[MapStats], object] | None = None,
) -> list[Any]:
    """``run_parallel`` on a backend other than processes (same Job, another driver)."""
    seq = _as_sequence(items)
    if len(seq) == 0:
        if on_stats is not None:
            on_stats(MapStats((), 0, 0.0))
        return []
    runner, tracked = factory(len(seq))
    if chunksize is None and runner.in_caller and watch is None:
        # nothing runs in parallel and nothing streams: one chunk is the cheapest
        chunksize = len(seq)
    engine = ChunkEngine(runner, tracked=tracked)
    baseline = StatsBaseline()
    ok = False
    try:
        job = job_class(watch)(
            engine,
            fn,
            seq,
            length=len(seq),
            chunksize=chunksize,
            ordered=ordered,
            return_exceptions=return_exceptions,
            fail_fast=True,
            timeout=timeout,
        )
        if watch is not None:
            watch.attach(engine, job)
        engine.add_job(job)
        results = collect(engine, job)
        ok = True
        return results
    finally:
        _end_call(engine, baseline, on_stats, watch, graceful=ok)


def _imap_elsewhere(
    factory: RunnerFactory,
    fn: Callable[[T], R],
    items: Iterable[T],
    chunksize: int | None,
    ordered: bool,
    timeout: float | None,
    return_exceptions: bool,
    watch: Watch | None = None,
) -> ResultIterator[Any]:
    length = len(items) if isinstance(items, list | tuple | range) else None
    runner, tracked = factory(length)
    engine = ChunkEngine(runner, tracked=tracked)
    baseline = StatsBaseline()
    try:
        job = job_class(watch)(
            engine,
            fn,
            items if length is not None else iter(items),  # type: ignore[arg-type]
            length=length,
            chunksize=chunksize,
            ordered=ordered,
            return_exceptions=return_exceptions,
            fail_fast=True,
            timeout=timeout,
        )
        if watch is not None:
            watch.attach(engine, job)
        engine.add_job(job)
    except BaseException:
        engine.shutdown(graceful=False)
        if watch is not None:
            watch.close()
        raise
    return ResultIterator._start(engine, job, owns_engine=True, watch=watch, baseline=baseline)


def _as_sequence(items: Iterable[T]) -> Sequence[T]:
    if isinstance(items, list | tuple | range):
        return items
    return list(items)


# ------------------------------------------------------------------ one-shot API


@overload
def run_parallel(
    fn: Callable[[T], R],
    items: Iterable[T],
    /,
    *,
    max_workers: int | None = None,
    start_method: StartMethod | None = None,
    backend: Backend | None = None,
    chunksize: int | None = None,
    ordered: bool = True,
    timeout: float | None = None,
    return_exceptions: Literal[False] = False,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[object, ...] = (),
    progress: ProgressOption = False,
    stall_timeout: float | None = None,
    on_stall: Callable[[StallReport], object] | None = None,
    on_stats: Callable[[MapStats], object] | None = None,
) -> list[R]: ...
@overload
def run_parallel(
    fn: Callable[[T], R],
    items: Iterable[T],
    /,
    *,
    max_workers: int | None = None,
    start_method: StartMethod | None = None,
    backend: Backend | None = None,
    chunksize: int | None = None,
    ordered: bool = True,
    timeout: float | None = None,
    return_exceptions: Literal[True],
    initializer: Callable[..., object] | None = None,
    initargs: tuple[object, ...] = (),
    progress: ProgressOption = False,
    stall_timeout: float | None = None,
    on_stall: Callable[[StallReport], object] | None = None,
    on_stats: Callable[[MapStats], object] | None = None,
) -> list[R | BaseException]: ...
@overload
def run_parallel(
    fn: Callable[[T], R],
    items: Iterable[T],
    /,
    *,
    max_workers: int | None = None,
    start_method: StartMethod | None = None,
    backend: Backend | None = None,
    chunksize: int | None = None,
    ordered: bool = True,
    timeout: float | None = None,
    return_exceptions: bool = False,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[object, ...] = (),
    progress: ProgressOption = False,
    stall_timeout: float | None = None,
    on_stall: Callable[[StallReport], object] | None = None,
    on_stats: Callable[[MapStats], object] | None = None,
) -> list[R] | list[R | BaseException]: ...
def run_parallel(
    fn: Callable[[T], R],
    items: Iterable[T],
    /,
    *,
    max_workers: int | None = None,
    start_method: StartMethod | None = None,
    backend: Backend | None = None,
    chunksize: int | None = None,
    ordered: bool = True,
    timeout: float | None = None,
    return_exceptions: bool = False,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[object, ...] = (),
    progress: ProgressOption = False,
    stall_timeout: float | None = None,
    on_stall: Callable[[StallReport], object] | None = None,
    on_stats: Callable[[MapStats], object] | None = None,
) -> list[R] | list[R | BaseException]:
    """Apply ``fn`` to every item in worker processes; the results as a list.

    Args:
        fn: a callable of one argument.  Sent to the workers once (not at all under fork);
            lambdas and closures need cloudpickle unless the start method is fork.
        items: the inputs; read in full before any work starts.
        max_workers: how many worker processes; ``None`` means the CPUs this process may
            use (affinity and cgroup quota), and never more than there are items.
        start_method: ``"fork"``, ``"forkserver"``, ``"spawn"`` or ``None`` for the
            platform default.
        backend: where the items run.  ``"process"`` (the default: new worker processes
            for this call), a :class:`WorkerPool` to reuse, ``"thread"`` (a thread pool;
            ``max_workers`` threads), ``"serial"`` (in the calling thread, in order), any
            ``concurrent.futures.Executor``, a Dask ``distributed.Client``, or ``"dask"``
            (the current Dask client; ``pip install 'parallelkit[dask]'``).  Results,
            order and errors are the same on every backend; ``start_method`` and
            ``initializer`` apply only to processes this call starts.
        chunksize: items per message to a worker; ``None`` sizes chunks automatically.
        ordered: results in input order (``True``) or in completion order.
        timeout: seconds each item may run (from when its worker takes it: start-up and
            the initializer do not count); a late item fails with
            :class:`~parallelkit.TaskTimeoutError`.  On processes its worker is stopped
            and replaced at the deadline; a thread cannot be stopped (the error comes at
            the deadline, the thread finishes the item in the background); the serial
            backend, other executors and Dask report the item when it has finished.
        return_exceptions: put each failed item's exception in its result slot and finish
            the other items, instead of raising the first failure at once.
        initializer: called in each worker process once, before its first item.
        initargs: arguments for ``initializer``.
        progress: ``True`` shows a tqdm progress bar that counts items
            (``pip install 'parallelkit[progress]'``); a callable receives a
            :class:`~parallelkit.Progress` each time chunks of results arrive, in the
            thread that called ``run_parallel``.
        stall_timeout: when no item has finished (and no worker has moved on to another
            item) for this many seconds, print each busy worker's Python stack (every
            thread) and the item it is on to stderr, or pass a
            :class:`~parallelkit.StallReport` to ``on_stall``; at most once per period, and
            the run goes on (``timeout`` is what stops items).  Worker processes only.
        on_stall: receives the stall reports instead of stderr (in the calling thread).
        on_stats: called once when the call ends (also when it fails) with the
            :class:`~parallelkit.MapStats` of the run: items and busy/idle seconds per
            worker.

    Returns:
        ``[fn(x) for x in items]``, in input order unless ``ordered=False``.

    Raises:
        Exception: the first failing item's own exception (with the worker's traceback as
            ``__cause__`` and a note naming the item), unless ``return_exceptions``.
        WorkerCrashedError: a worker died running an item.
        TaskTimeoutError: an item ran longer than ``timeout``.
        SerializationError: the function, an item or a result cannot be pickled.
        StartMethodError: ``start_method`` is unknown or unavailable.
        ValueError: another argument is out of range, an unknown backend, or an option
            that does not apply to the backend.
        ImportError: ``backend="dask"`` without Dask installed (names the extra).

    Example:
        >>> run_parallel(abs, [-1, -2, 3], max_workers=2)
        [1, 2, 3]
        >>> run_parallel(abs, [-1, -2, 3], backend="serial")
        [1, 2, 3]
    """
    pool = _check_map_options(
        fn, backend, chunksize, timeout, initializer, initargs, start_method, max_workers
    )
    check_bool(ordered, "ordered")
    check_bool(return_exceptions, "return_exceptions")
    timeout = check_timeout(timeout)
    stall_timeout = check_timeout(stall_timeout, "stall_timeout")
    _check_watch_options(
        progress, stall_timeout, on_stall, on_stats, pool is None or isinstance(pool, WorkerPool)
    )
    seq = _as_sequence(items)
    watch = Watch.create(progress, stall_timeout, on_stall, len(seq))
    if isinstance(pool, WorkerPool):
        return pool._run(
            fn, seq, chunksize, ordered, timeout, return_exceptions, watch=watch, on_stats=on_stats
        )
    if pool is not None:
        return _run_elsewhere(
            pool, fn, seq, chunksize, ordered, timeout, return_exceptions, watch, on_stats
        )
    workers = resolve_max_workers(max_workers)
    method = resolve_start_method(start_method)
    if len(seq) == 0:
        if on_stats is not None:
            on_stats(MapStats((), 0, 0.0))
        return []
    engine = Engine(
        context=get_context(method),
        start_method=method,
        max_workers=min(workers, len(seq)),
        initializer=initializer,
        initargs=initargs,
        max_tasks_per_worker=None,
        inherit=(fn, seq),
        one_shot=True,
    )
    baseline = StatsBaseline()
    ok = False
    try:
        job = job_class(watch)(
            engine,
            fn,
            seq,
            length=len(seq),
            chunksize=chunksize,
            ordered=ordered,
            return_exceptions=return_exceptions,
            fail_fast=True,
            timeout=timeout,
            inherited=engine.inherited_items is not None,
        )
        if watch is not None:
            watch.attach(engine, job)
        engine.add_job(job)
        results = collect(engine, job)
        ok = True
        return results
    finally:
        _end_call(engine, baseline, on_stats, watch, graceful=ok)


class ResultIterator(Iterator[_Y]):
    """The iterator ``imap_parallel`` and ``WorkerPool.imap`` return.

    Closing it (``close()``, ``with``, or breaking out of a ``for`` loop over a generator
    that holds it) stops the work: no new items are started and, for ``imap_parallel``,
    the workers are stopped.
    """

    _chunks: Generator[list[Any], None, None]
    _current: Iterator[_Y]
    _engine: Engine | ChunkEngine
    _job: Job
    _closed: bool
    _baseline: StatsBaseline
    _finalizer: weakref.finalize[..., ResultIterator[_Y]] | None
    _watch: Watch | None
    _stats: MapStats | None  # taken when the work stops

    def __init__(self) -> None:
        raise TypeError("a ResultIterator is made by imap_parallel() or WorkerPool.imap()")

    @classmethod
    def _start(
        cls,
        engine: Engine | ChunkEngine,
        job: Job,
        *,
        owns_engine: bool,
        watch: Watch | None = None,
        baseline: StatsBaseline | None = None,
    ) -> ResultIterator[_Y]:
        # Not __init__: the engine and the job are private types, and a public constructor
        # taking them would put them in the public API (pyright --verifytypes).
        self = cls.__new__(cls)
        self._chunks = iterate(engine, job)
        self._current = iter(())
        self._engine = engine
        self._job = job
        self._closed = False
        self._baseline = baseline or StatsBaseline(engine)
        self._stats = None
        self._finalizer = (
            weakref.finalize(self, engine.shutdown, graceful=False) if owns_engine else None
        )
        self._watch = watch
        if watch is not None:
            weakref.finalize(self, watch.close)  # dropped (a `for` loop left by `break`)
        return self

    def __iter__(self) -> Iterator[_Y]:
        # A generator that hands out each chunk with ``yield from`` over a list iterator:
        # a ``for`` loop then gets each result without a Python-level call per item.  Its
        # frame holds ``self``, so the work lives as long as the loop does; leaving the
        # loop drops it (and, if nothing else holds this iterator, stops the work).
        return self._delegate()

    def _delegate(self) -> Generator[_Y, None, None]:
        while True:
            yield from self._current  # a list iterator: closing us leaves it resumable
            if not self._advance():
                return

    def _advance(self) -> bool:
        """Move to the next chunk of results; False when there are no more."""
        if self._closed:
            return False
        try:
            self._current = handed_out(next(self._chunks))
        except StopIteration:
            self.close()
            return False
        except BaseException:
            self.close()
            raise
        return True

    def __next__(self) -> _Y:
        while True:
            for value in self._current:
                return value
            if not self._advance():
                raise StopIteration

    @property
    def stats(self) -> MapStats:
        """Items and busy/idle seconds per worker, for this map so far.

        On a :class:`WorkerPool`, this counts what the pool's workers did while this
        iterator ran (work submitted to the pool at the same time included).
        """
        if self._stats is not None:
            return self._stats
        return engine_stats(self._engine, self._baseline)

    def close(self) -> None:
        """Stop the work; idempotent."""
        if self._closed:
            return
        self._closed = True
        finished = self._job.finished and self._job.error is None
        self._current = iter(())
        self._stats = engine_stats(self._engine, self._baseline)
        try:
            self._chunks.close()
            # a generator closed before it started runs no finally: stop the job here too
            stop(self._engine, self._job)
            self._job.release()
            if self._finalizer is not None:
                self._finalizer.detach()
                self._engine.shutdown(graceful=finished)
        finally:
            if self._watch is not None:
                self._watch.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@overload
def imap_parallel(
    fn: Callable[[T], R],
    items: Iterable[T],
    /,
    *,
    max_workers: int | None = None,
    start_method: StartMethod | None = None,
    backend: Backend | None = None,
    chunksize: int | None = None,
    ordered: bool = True,
    timeout: float | None = None,
    return_exceptions: Literal[False] = False,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[object, ...] = (),
    progress: ProgressOption = False,
    stall_timeout: float | None = None,
    on_stall: Callable[[StallReport], object] | None = None,
) -> ResultIterator[R]: ...
@overload
def imap_parallel(
    fn: Callable[[T], R],
    items: Iterable[T],
    /,
    *,
    max_workers: int | None = None,
    start_method: StartMethod | None = None,
    backend: Backend | None = None,
    chunksize: int | None = None,
    ordered: bool = True,
    timeout: float | None = None,
    return_exceptions: Literal[True],
    initializer: Callable[..., object] | None = None,
    initargs: tuple[object, ...] = (),
    progress: ProgressOption = False,
    stall_timeout: float | None = None,
    on_stall: Callable[[StallReport], object] | None = None,
) -> ResultIterator[R | BaseException]: ...
@overload
def imap_parallel(
    fn: Callable[[T], R],
    items: Iterable[T],
    /,
    *,
    max_workers: int | None = None,
    start_method: StartMethod | None = None,
    backend: Backend | None = None,
    chunksize: int | None = None,
    ordered: bool = True,
    timeout: float | None = None,
    return_exceptions: bool = False,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[object, ...] = (),
    progress: ProgressOption = False,
    stall_timeout: float | None = None,
    on_stall: Callable[[StallReport], object] | None = None,
) -> ResultIterator[R] | ResultIterator[R | BaseException]: ...
def imap_parallel(
    fn: Callable[[T], R],
    items: Iterable[T],
    /,
    *,
    max_workers: int | None = None,
    start_method: StartMethod | None = None,
    backend: Backend | None = None,
    chunksize: int | None = None,
    ordered: bool = True,
    timeout: float | None = None,
    return_exceptions: bool = False,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[object, ...] = (),
    progress: ProgressOption = False,
    stall_timeout: float | None = None,
    on_stall: Callable[[StallReport], object] | None = None,
) -> ResultIterator[R] | ResultIterator[R | BaseException]:
    """Like :func:`run_parallel`, but lazy: an iterator over the results.

    ``items`` is consumed lazily and only a bounded number of chunks is in flight, so an
    endless generator works and memory stays flat.  Chunk sizes adapt to how long items
    take when the input has no length.  Closing the iterator (or ``with``) stops the work
    promptly and leaves nothing running.  ``backend=`` as for :func:`run_parallel`; on Dask,
    at most twice the cluster's threads in tasks are in flight.

    ``progress``, ``stall_timeout`` and ``on_stall`` as for :func:`run_parallel` (the bar
    knows the total when ``items`` has a ``len()``; progress is reported, and stalls are
    looked for, while the iterator is waiting for results, in the thread iterating).  The
    iterator's :attr:`~ResultIterator.stats` give the per-worker statistics.

    Example:
        >>> with imap_parallel(abs, iter([-1, -2, 3]), max_workers=2) as results:
        ...     list(results)
        [1, 2, 3]
    """
    pool = _check_map_options(
        fn, backend, chunksize, timeout, initializer, initargs, start_method, max_workers
    )
    check_bool(ordered, "ordered")
    check_bool(return_exceptions, "return_exceptions")
    timeout = check_timeout(timeout)
    stall_timeout = check_timeout(stall_timeout, "stall_timeout")
    _check_watch_options(
        progress, stall_timeout, on_stall, None, pool is None or isinstance(pool, WorkerPool)
    )
    if pool is not None and not isinstance(pool, WorkerPool):
        watch = Watch.create(progress, stall_timeout, on_stall, total_of(items))
        return _imap_elsewhere(
            pool, fn, items, chunksize, ordered, timeout, return_exceptions, watch
        )
    if pool is not None:
        return pool.imap(
            fn,
            items,
            chunksize=chunksize,
            ordered=ordered,
            timeout=timeout,
            return_exceptions=return_exceptions,
            progress=progress,
            stall_timeout=stall_timeout,
            on_stall=on_stall,
        )
    workers = resolve_max_workers(max_workers)
    method = resolve_start_method(start_method)
    length = len(items) if isinstance(items, list | tuple | range) else None
    if length is not None:
        workers = max(1, min(workers, length))
    engine = Engine(
        context=get_context(method),
        start_method=method,
        max_workers=workers,
        initializer=initializer,
        initargs=initargs,
        max_tasks_per_worker=None,
        inherit=(fn, None),
        one_shot=True,
    )
    watch = Watch.create(progress, stall_timeout, on_stall, total_of(items))
    baseline = StatsBaseline()
    try:
        job = job_class(watch)(
            engine,
            fn,
            items if length is not None else iter(items),  # type: ignore[arg-type]
            length=length,
            chunksize=chunksize,
            ordered=ordered,
            return_exceptions=return_exceptions,
            fail_fast=True,
            timeout=timeout,
        )
        if watch is not None:
            watch.attach(engine, job)
        engine.add_job(job)
    except BaseException:
        engine.shutdown(graceful=False)
        if watch is not None:
            watch.close()
        raise
    return ResultIterator._start(engine, job, owns_engine=True, watch=watch, baseline=baseline)


# ------------------------------------------------------------------ the reusable pool


class _FutureJob(Job):
    """One ``submit()`` call: a one-item job whose outcome completes a Future."""

    alone = True

    def __init__(
        self,
        engine: Engine,
        future: Future[Any],
        fn: Callable[..., object],
        args: tuple[object, ...],
        kwargs: dict[str, object],
    ) -> None:
        super().__init__(
            engine,
            fn,
            [(args, kwargs)],
            length=1,
            chunksize=1,
            ordered=False,
            return_exceptions=True,
            fail_fast=False,
            timeout=None,
            star=True,
        )
        self.future = future
        self.started = False

    def next_chunk(self) -> Any:
        if not self.started:
            self.started = True
            if not self.future.set_running_or_notify_cancel():
                self.cancelled = True
                self.engine.abandon(self)
                self.engine.future_done(self)
                return None
        return super().next_chunk()

    def complete(
        self, start: int, results: list[Any], errors: list[tuple[int, BaseException]] | None
    ) -> None:
        self.engine.changes += 1
        if self.cancelled:
            return
        self.exhausted = True
        self.engine.abandon(self)
        future = self.future
        if errors:
            exc = errors[0][1]
            self.engine.defer(lambda: future.set_exception(exc))
        else:
            value = results[0]
            self.engine.defer(lambda: future.set_result(value))
        self.engine.future_done(self)

    def fail(self, exc: BaseException) -> None:
        self.engine.changes += 1
        if self.error is None:
            self.error = exc
            self.engine.abandon(self)
            future = self.future
            if self.started:
                self.engine.defer(lambda: future.set_exception(exc))
            else:
                self.engine.defer(lambda: _cancel_and_notify(future))
            self.engine.future_done(self)

    def cancel(self) -> None:
        if not self.cancelled and self.error is None:
            self.fail(PoolBrokenError("the pool was shut down before this task finished"))
        self.cancelled = True


def _cancel_and_notify(future: Future[Any]) -> None:
    # cancel() alone leaves the future CANCELLED, which concurrent.futures.wait() and
    # as_completed() do not count as done until it is also "notified".
    if future.cancel():
        future.set_running_or_notify_cancel()


def _abandon(engine: Engine) -> None:
    """Finalizer of a WorkerPool that was dropped without shutdown()."""
    with engine.mutex:
        busy = bool(engine.jobs or engine.future_queue) or any(w.chunks for w in engine.workers)
    engine.shutdown(graceful=not busy, join_timeout=1.0)  # first: a warning may raise
    if busy:
        warnings.warn(
            "a parallelkit WorkerPool was garbage-collected with work pending; its workers "
            "were stopped (use `with WorkerPool() as pool:` or call shutdown())",
            ResourceWarning,
            stacklevel=2,
        )


def _owned_by(pool: WorkerPool) -> Owned:
    """What a pool holds now (for the leak check): its workers, the futures helper thread
    and the argument segments, all started or made on first use, not at creation."""
    engine = pool._engine
    arena = engine.arena
    homes = [] if arena is None else [*arena.retired, arena.current]
    thread = engine.helper_thread
    return Owned(
        pids=tuple(w.pid for w in list(engine.workers) if w.pid is not None),
        threads=() if thread is None else (thread,),
        segments=tuple(home.segment.name for home in homes if home is not None),
    )


class WorkerPool(Executor):
    """A reusable group of worker processes; a :class:`concurrent.futures.Executor`.

    Workers start on first use and are reused across calls.  ``with WorkerPool() as pool``
    means ``shutdown(wait=True)`` at the end of the block.

    Args:
        max_workers: how many worker processes; ``None``: the CPUs this process may use.
        start_method: ``"fork"``, ``"forkserver"``, ``"spawn"`` or ``None`` (the default).
        initializer: called in each worker once, before its first task.
        initargs: arguments for ``initializer``.
        max_tasks_per_worker: replace a worker after it has run this many items.

    Example:
        >>> with WorkerPool(2) as pool:
        ...     pool.submit(pow, 2, 10).result()
        1024
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        start_method: StartMethod | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[object, ...] = (),
        max_tasks_per_worker: int | None = None,
    ) -> None:
        workers = resolve_max_workers(max_workers)
        method = resolve_start_method(start_method)
        _check_initializer(initializer, initargs)
        _check_max_tasks(max_tasks_per_worker)
        self._engine = Engine(
            context=get_context(method),
            start_method=method,
            max_workers=workers,
            initializer=initializer,
            initargs=initargs,
            max_tasks_per_worker=max_tasks_per_worker,
        )
        self._max_workers = workers
        self._start_method: StartMethod = method
        self._baseline = StatsBaseline(self._engine)
        self._shutdown = False
        self._finalizer = weakref.finalize(self, _abandon, self._engine)
        register(self, _owned_by)  # lazily started workers are ours, not the caller's leak

    @property
    def max_workers(self) -> int:
        """The number of worker processes."""
        return self._max_workers

    @property
    def start_method(self) -> StartMethod:
        """The start method of the workers."""
        return self._start_method

    @property
    def stats(self) -> MapStats:
        """Items and busy/idle seconds per worker since the pool was created (every worker
        it has had, including replaced ones)."""
        return engine_stats(self._engine, self._baseline)

    def _check_open(self) -> None:
        if self._shutdown:
            raise RuntimeError("cannot schedule new work after shutdown()")

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Run ``fn(*args, **kwargs)`` in a worker; a Future of its result."""
        check_callable(fn)
        self._check_open()
        future: Future[R] = Future()
        engine = self._engine
        job = _FutureJob(engine, future, fn, args, kwargs)
        engine.submit_future(job)
        return future

    @overload
    def map(
        self,
        fn: Callable[[T], R],
        iterable: Iterable[T],
        /,
        *,
        timeout: float | None = None,
        chunksize: int | None = None,
    ) -> Iterator[R]: ...
    @overload
    def map(
        self,
        fn: Callable[[T, _U], R],
        iterable: Iterable[T],
        iterable2: Iterable[_U],
        /,
        *,
        timeout: float | None = None,
        chunksize: int | None = None,
    ) -> Iterator[R]: ...
    @overload
    def map(
        self,
        fn: Callable[..., R],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
    ) -> Iterator[R]: ...
    def map(
        self,
        fn: Callable[..., R],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
    ) -> Iterator[R]:
        """``concurrent.futures.Executor.map``: ``fn(*args)`` for each tuple of arguments.

        The iterables are read at once; results come in order; a failed call raises when
        its result is reached; ``timeout`` bounds the whole call, from now.
        """
        check_callable(fn)
        _check_chunksize(chunksize)
        timeout = check_timeout(timeout)
        self._check_open()
        items: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
            (args, {}) for args in zip(*iterables, strict=False)
        ]
        job = Job(
            self._engine,
            fn,
            items,
            length=len(items),
            chunksize=chunksize,
            ordered=True,
            return_exceptions=False,
            fail_fast=False,
            timeout=None,
            star=True,
        )
        self._engine.add_job(job)
        return self._map_results(job, timeout)

    def _map_results(self, job: Job, timeout: float | None) -> Iterator[R]:
        import time  # noqa: PLC0415

        deadline = None if timeout is None else time.monotonic() + timeout
        chunks = iterate(self._engine, job)
        try:
            while True:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if not self._engine.drive(
                        lambda: bool(job.out) or job.error is not None or job.finished, left
                    ):
                        raise TimeoutError(f"map() results not ready within {timeout} s")
                try:
                    results = next(chunks)
                except StopIteration:
                    return
                yield from handed_out(results)
        finally:
            chunks.close()
            job.release()

    @overload
    def imap(
        self,
        fn: Callable[[T], R],
        items: Iterable[T],
        /,
        *,
        chunksize: int | None = None,
        ordered: bool = True,
        timeout: float | None = None,
        return_exceptions: Literal[False] = False,
        progress: ProgressOption = False,
        stall_timeout: float | None = None,
        on_stall: Callable[[StallReport], object] | None = None,
    ) -> ResultIterator[R]: ...
    @overload
    def imap(
        self,
        fn: Callable[[T], R],
        items: Iterable[T],
        /,
        *,
        chunksize: int | None = None,
        ordered: bool = True,
        timeout: float | None = None,
        return_exceptions: Literal[True],
        progress: ProgressOption = False,
        stall_timeout: float | None = None,
        on_stall: Callable[[StallReport], object] | None = None,
    ) -> ResultIterator[R | BaseException]: ...
    @overload
    def imap(
        self,
        fn: Callable[[T], R],
        items: Iterable[T],
        /,
        *,
        chunksize: int | None = None,
        ordered: bool = True,
        timeout: float | None = None,
        return_exceptions: bool = False,
        progress: ProgressOption = False,
        stall_timeout: float | None = None,
        on_stall: Callable[[StallReport], object] | None = None,
    ) -> ResultIterator[R] | ResultIterator[R | BaseException]: ...
    def imap(
        self,
        fn: Callable[[T], R],
        items: Iterable[T],
        /,
        *,
        chunksize: int | None = None,
        ordered: bool = True,
        timeout: float | None = None,
        return_exceptions: bool = False,
        progress: ProgressOption = False,
        stall_timeout: float | None = None,
        on_stall: Callable[[StallReport], object] | None = None,
    ) -> ResultIterator[R] | ResultIterator[R | BaseException]:
        """Stream ``fn(item)`` for each item, on this pool's workers (see ``imap_parallel``)."""
        check_callable(fn)
        _check_chunksize(chunksize)
        _check_watch_options(progress, stall_timeout, on_stall, None, True)
        check_bool(ordered, "ordered")
        check_bool(return_exceptions, "return_exceptions")
        timeout = check_timeout(timeout)
        stall_timeout = check_timeout(stall_timeout, "stall_timeout")
        self._check_open()
        length = len(items) if isinstance(items, list | tuple | range) else None
        watch = Watch.create(progress, stall_timeout, on_stall, total_of(items))
        baseline = StatsBaseline(self._engine)
        job = job_class(watch)(
            self._engine,
            fn,
            items if length is not None else iter(items),  # type: ignore[arg-type]
            length=length,
            chunksize=chunksize,
            ordered=ordered,
            return_exceptions=return_exceptions,
            fail_fast=True,
            timeout=timeout,
        )
        if watch is not None:
            watch.attach(self._engine, job)
        try:
            self._engine.add_job(job)
        except BaseException:
            if watch is not None:
                watch.close()
            raise
        return ResultIterator._start(
            self._engine, job, owns_engine=False, watch=watch, baseline=baseline
        )

    def _run(
        self,
        fn: Callable[[T], R],
        items: Iterable[T],
        chunksize: int | None,
        ordered: bool,
        timeout: float | None,
        return_exceptions: bool,
        *,
        watch: Watch | None = None,
        on_stats: Callable[[MapStats], object] | None = None,
    ) -> list[R]:
        self._check_open()
        seq = _as_sequence(items)
        baseline = StatsBaseline(self._engine)
        job = job_class(watch)(
            self._engine,
            fn,
            seq,
            length=len(seq),
            chunksize=chunksize,
            ordered=ordered,
            return_exceptions=return_exceptions,
            fail_fast=True,
            timeout=timeout,
        )
        if watch is not None:
            watch.attach(self._engine, job)
        try:
            self._engine.add_job(job)
            return collect(self._engine, job)
        finally:
            with self._engine.mutex:
                job.cancel()
                job.release()
            if watch is not None:
                watch.close()
            if on_stats is not None:
                on_stats(engine_stats(self._engine, baseline))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work and stop the workers.

        Args:
            wait: wait for pending futures to finish, then for the workers to exit.
            cancel_futures: cancel futures that have not started running: every call not
                yet handed to a worker.  ``submit`` returns before it hands the call out,
                so right after ``submit`` this may cancel all of them (unlike
                ``ProcessPoolExecutor``, which runs the few already queued for its workers).
        """
        engine = self._engine
        self._shutdown = True
        if cancel_futures:
            engine.cancel_pending_futures()
        if wait:
            engine.drive(lambda: engine.pending_futures == 0)
            self._finalizer.detach()
            engine.shutdown(graceful=True)
        else:
            engine.shutdown_when_idle()
            self._finalizer.detach()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is not None and not issubclass(et, Exception):
            # Ctrl-C or SystemExit in the block: do not wait for the work
            self.shutdown(wait=False, cancel_futures=True)
            self._engine.shutdown(graceful=False)
            return
        self.shutdown(wait=True)
