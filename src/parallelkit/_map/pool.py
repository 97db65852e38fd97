"""``WorkerPool``: reusable worker processes, a :class:`concurrent.futures.Executor`.

The pool owns one process :class:`~parallelkit._map.engine.Engine` for its life.
``submit`` runs a one-item :class:`_FutureJob` that completes a Future; ``map`` is the
Executor contract (star arguments, a deadline for the whole call); ``imap`` and
``run_parallel(backend=pool)`` are map calls on the pool's engine (:mod:`._map.call`).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import CancelledError, Executor, Future
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, TypeVarTuple, overload

from parallelkit._map.call import MapOptions, as_sequence, check_options, collect_call, stream_call
from parallelkit._map.engine import Engine
from parallelkit._map.futures import TaskFuture, set_exception, set_result
from parallelkit._map.job import Job, PoolBrokenError, handed_out, iterate
from parallelkit._map.results import ResultIterator
from parallelkit._map.stats import StatsBaseline, engine_stats
from parallelkit._observe.progress import ProgressOption
from parallelkit._observe.stalls import StallReport
from parallelkit._observe.stats import MapStats
from parallelkit._util.checks import (
    check_callable,
    check_chunksize,
    check_initializer,
    check_max_tasks,
    check_timeout,
    resolve_max_workers,
    resolve_start_method,
)
from parallelkit._util.context import get_context
from parallelkit._util.owners import Owned, register
from parallelkit._util.types import P, R, StartMethod, T

_U = TypeVar("_U")
Ts = TypeVarTuple("Ts")

__all__ = ("WorkerPool",)


class _FutureJob(Job):
    """One ``submit()`` or ``schedule()`` call: a one-item job whose outcome completes a
    Future.  It settles once (``settled``): a result, an error, or a cancel, whichever the
    engine sees first; only then does it stop counting as a pending future."""

    alone = True
    engine: Engine  # the process engine (a map's job may run on another driver)

    def __init__(
        self,
        engine: Engine,
        future: Future[Any],
        fn: Callable[..., object],
        args: tuple[object, ...],
        kwargs: dict[str, object],
        *,
        timeout: float | None = None,
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
            timeout=timeout,
            star=True,
        )
        self.future = future
        self.started = False
        self.settled = False
        if isinstance(future, TaskFuture):
            # cancel() stops it by stopping its worker: it runs on a worker that holds
            # nothing else (see Dispatcher), so that nothing else is stopped with it
            self.solo = True
            future._bind(self, engine.futures.stops)

    def _settle(self) -> bool:
        """Settle it now (False: it was settled already); lets go of its arguments."""
        if self.settled:
            return False
        self.settled = True
        self.engine.abandon(self)
        self.engine.future_done(self)
        self.release()
        if isinstance(self.future, TaskFuture):
            self.future._unbind()
        return True

    def next_chunk(self) -> Any:
        if not self.started:
            self.started = True
            if not self.future.set_running_or_notify_cancel():
                self.cancelled = True
                self._settle()
                return None
        return super().next_chunk()

    def complete(
        self, start: int, results: list[Any], errors: list[tuple[int, BaseException]] | None
    ) -> None:
        self.engine.changes += 1
        if self.cancelled:
            return
        self.exhausted = True
        if not self._settle():
            return
        future = self.future
        if errors:
            exc = errors[0][1]
            self.engine.defer(lambda: set_exception(future, exc))
        else:
            value = results[0]
            self.engine.defer(lambda: set_result(future, value))

    def fail(self, exc: BaseException) -> None:
        self.engine.changes += 1
        if self.error is None:
            self.error = exc
            if not self._settle():
                return
            future = self.future
            if self.started:
                self.engine.defer(lambda: set_exception(future, exc))
            else:
                self.engine.defer(lambda: _cancel_and_notify(future))

    def cancel(self) -> None:
        if not self.cancelled and self.error is None:
            self.fail(PoolBrokenError("the pool was shut down before this task finished"))
        self.cancelled = True

    def stop(self) -> None:
        """Its TaskFuture was cancelled: stop the worker running it, if one still does,
        and settle it (under the engine's mutex, by the driver)."""
        if self.settled:
            return  # finished first (its result is dropped: the future is cancelled)
        engine = self.engine
        engine.changes += 1
        self.cancelled = True
        self.retries.clear()
        if self in engine.future_queue:
            engine.future_queue.remove(self)
        for w in engine.workers:
            if w.chunks and w.chunks[0].job is self and w.killed_for is None:
                engine.blame.stop(
                    w,
                    0,
                    CancelledError(f"the task was cancelled; its worker (pid {w.pid}) was stopped"),
                )
        self._settle()
        if not self.started:  # so that wait() and as_completed() count it as done (last:
            self.started = True  # what they wake up sees it settled)
            self.future.set_running_or_notify_cancel()


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
        forward_logs: the workers' log records go to this process's handlers (``True``,
            the default; see :doc:`logging`); ``False`` leaves their logging alone.
        finalizer: called in each worker once, when it stops normally: at ``shutdown()``,
            or when ``max_tasks_per_worker`` retires it.  Not in a worker that is killed
            (a crash, a timeout, ``shutdown`` with work still running).  See
            :doc:`/lifecycle`.
        finalargs: arguments for ``finalizer``.

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
        forward_logs: bool = True,
        finalizer: Callable[..., object] | None = None,
        finalargs: tuple[object, ...] = (),
    ) -> None:
        workers = resolve_max_workers(max_workers)
        method = resolve_start_method(start_method)
        check_initializer(initializer, initargs)
        check_initializer(finalizer, finalargs, "finalizer", "finalargs")
        check_max_tasks(max_tasks_per_worker)
        self._engine = Engine(
            context=get_context(method),
            start_method=method,
            max_workers=workers,
            initializer=initializer,
            initargs=initargs,
            max_tasks_per_worker=max_tasks_per_worker,
            forward_logs=forward_logs,
            finalizer=finalizer,
            finalargs=finalargs,
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
    def schedule(
        self, fn: Callable[[], R], /, *, timeout: float | None = None
    ) -> TaskFuture[R]: ...
    @overload
    def schedule(
        self, fn: Callable[[*Ts], R], /, *, args: tuple[*Ts], timeout: float | None = None
    ) -> TaskFuture[R]: ...
    @overload
    def schedule(
        self,
        fn: Callable[..., R],
        /,
        *,
        args: tuple[object, ...] = (),
        kwargs: Mapping[str, object],
        timeout: float | None = None,
    ) -> TaskFuture[R]: ...
    def schedule(
        self,
        fn: Callable[..., R],
        /,
        *,
        args: tuple[object, ...] = (),
        kwargs: Mapping[str, object] | None = None,
        timeout: float | None = None,
    ) -> TaskFuture[R]:
        """Run ``fn(*args, **kwargs)`` in a worker, with its own timeout; a
        :class:`TaskFuture` whose ``cancel()`` stops the task even while it runs.

        ``submit`` is the :class:`~concurrent.futures.Executor` call (every argument goes to
        ``fn``); ``schedule`` takes the call's arguments as ``args`` and ``kwargs`` so that
        it can take options of its own.  A task that runs longer than ``timeout``, or is
        cancelled while it runs, has its worker stopped (SIGTERM, then SIGKILL after a short
        grace) and replaced by a new one, which runs the pool's initializer; the pool's
        other tasks go on.  A scheduled task never waits in a busy worker's pipe, and no
        other work waits behind it, so stopping its worker stops nothing else.

        Args:
            fn: the function; it and the arguments must pickle (as for ``submit``).
            args: positional arguments for ``fn``, a tuple.
            kwargs: keyword arguments for ``fn``.
            timeout: seconds the call may run, counted from when it starts in its worker
                (not while it waits for one); ``None``: no limit.

        Returns:
            A :class:`TaskFuture`: its ``result()`` raises
            :class:`~parallelkit.errors.TaskTimeoutError` after a timeout and
            :class:`concurrent.futures.CancelledError` once cancelled.

        Raises:
            TypeError: ``fn`` is not callable, ``args`` not a tuple, ``kwargs`` not a
                mapping with string keys, or ``timeout`` not a number.
            ValueError: ``timeout`` is not positive.
            RuntimeError: the pool has been shut down.

        Example:
            >>> import time
            >>> with WorkerPool(1) as pool:
            ...     late = pool.schedule(time.sleep, args=(60,), timeout=0.5)
            ...     print(type(late.exception()).__name__)
            ...     print(pool.schedule(pow, args=(2, 10)).result())
            TaskTimeoutError
            1024
        """
        check_callable(fn)
        if not isinstance(args, tuple):
            raise TypeError(f"args must be a tuple, not {type(args).__name__}")
        call_kwargs: dict[str, object] = {}
        if kwargs is not None:
            if not isinstance(kwargs, Mapping):
                raise TypeError(f"kwargs must be a mapping, not {type(kwargs).__name__}")
            call_kwargs = dict(kwargs)
            for key in call_kwargs:
                if not isinstance(key, str):
                    raise TypeError(f"kwargs keys must be strings, not {type(key).__name__}")
        timeout = check_timeout(timeout)
        self._check_open()
        future: TaskFuture[R] = TaskFuture()
        engine = self._engine
        engine.submit_future(_FutureJob(engine, future, fn, args, call_kwargs, timeout=timeout))
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
        check_chunksize(chunksize)
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
        options = check_options(
            fn,
            chunksize=chunksize,
            ordered=ordered,
            timeout=timeout,
            return_exceptions=return_exceptions,
            progress=progress,
            stall_timeout=stall_timeout,
            on_stall=on_stall,
        )
        return self._stream(fn, items, options)

    def _stream(
        self, fn: Callable[..., object], items: Iterable[Any], options: MapOptions
    ) -> ResultIterator[Any]:
        """A map call on this pool, streamed (``imap``, ``imap_parallel(backend=pool)``)."""
        self._check_open()
        return stream_call(self._engine, fn, items, options, owned=False)

    def _run(
        self, fn: Callable[..., object], items: Iterable[Any], options: MapOptions
    ) -> list[Any]:
        """A map call on this pool, collected (``run_parallel(backend=pool)``)."""
        self._check_open()
        return collect_call(self._engine, fn, as_sequence(items), options, owned=False)

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
