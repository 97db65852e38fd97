"""The one-call map API: ``run_parallel`` and ``imap_parallel``.

Thin, validating front ends: every argument is checked in the caller's process (so a typo
never starts a process), then the call picks where the items run -- new worker processes,
a :class:`~parallelkit.WorkerPool`, or a ``ChunkEngine`` over another backend -- and hands
the rest to :mod:`parallelkit._map.call`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, overload

from parallelkit._map.backends.auto import run_into
from parallelkit._map.backends.choose import ChunkEngine, RunnerFactory, check_backend
from parallelkit._map.backends.local import SERIAL_WHERE, SerialRunner
from parallelkit._map.call import (
    MapOptions,
    Resume,
    as_sequence,
    check_options,
    collect_call,
    length_of,
    stream_call,
)
from parallelkit._map.engine import Engine
from parallelkit._map.pool import WorkerPool
from parallelkit._map.results import ResultIterator
from parallelkit._map.stats import StatsBaseline
from parallelkit._observe.progress import ProgressOption
from parallelkit._observe.stalls import StallReport
from parallelkit._observe.stats import AutoChoice, MapStats
from parallelkit._util.checks import (
    check_initializer,
    check_max_tasks,
    resolve_max_workers,
    resolve_start_method,
)
from parallelkit._util.context import cpu_share, default_workers, get_context
from parallelkit._util.types import R, StartMethod, T

if TYPE_CHECKING:
    from parallelkit._map.backends.choose import MapBackend

__all__ = ("imap_parallel", "run_parallel")


@dataclass(frozen=True, slots=True)
class _Processes:
    """The options of one call that configure worker processes, as the caller passed them
    (checked by :meth:`check`)."""

    max_workers: int | None
    start_method: StartMethod | None
    initializer: Callable[..., object] | None
    initargs: tuple[object, ...]
    forward_logs: bool
    finalizer: Callable[..., object] | None
    finalargs: tuple[object, ...]
    max_tasks_per_worker: int | None

    def check(self) -> None:
        """Refuse a malformed hook or recycling limit (one clear error, nothing started)."""
        check_initializer(self.initializer, self.initargs)
        check_initializer(self.finalizer, self.finalargs, "finalizer", "finalargs")
        check_max_tasks(self.max_tasks_per_worker)

    def engine(
        self,
        fn: Callable[..., object],
        seq: Sequence[Any] | None,
        workers: int,
        method: StartMethod,
    ) -> Engine:
        """New worker processes for one call (``seq``: the items, for fork workers to
        inherit)."""
        return Engine(
            context=get_context(method),
            start_method=method,
            max_workers=workers,
            initializer=self.initializer,
            initargs=self.initargs,
            max_tasks_per_worker=self.max_tasks_per_worker,
            inherit=(fn, seq),
            one_shot=True,
            forward_logs=self.forward_logs,
            finalizer=self.finalizer,
            finalargs=self.finalargs,
        )


def _check_backend(
    options: MapOptions, backend: object, procs: _Processes
) -> WorkerPool | RunnerFactory | None:
    """Validate ``backend=`` and the options that configure processes.

    Returns the pool to reuse, a factory for another backend's runner, or ``None`` for new
    worker processes.
    """
    procs.check()
    if backend is None and _in_process_when_nested(options, procs):
        backend = "serial"
    if backend is None or (isinstance(backend, str) and backend == "process"):
        return None
    if isinstance(backend, WorkerPool):
        if (
            procs.start_method is not None
            or procs.initializer is not None
            or procs.finalizer is not None
            or procs.max_workers is not None
            or procs.max_tasks_per_worker is not None
            or not procs.forward_logs
        ):
            raise ValueError(
                "start_method, max_workers, initializer, finalizer, max_tasks_per_worker and "
                "forward_logs belong to the WorkerPool when it is the backend; set them where "
                "the pool is created"
            )
        return backend
    factory = check_backend(
        backend,
        max_workers=procs.max_workers,
        start_method=procs.start_method,
        initializer=procs.initializer,
        finalizer=procs.finalizer,
        max_tasks_per_worker=procs.max_tasks_per_worker,
    )
    options.refuse_stall_options()
    return factory


def _in_process_when_nested(options: MapOptions, procs: _Processes) -> bool:
    """A call with no backend made in a parallelkit worker whose share of the CPUs is one
    runs in that worker's own process (``docs/nesting.md``): more processes would only
    share the cores its siblings already use.  Not when the caller asked for something
    only worker processes do."""
    return (
        cpu_share() == 1
        and procs.max_workers is None
        and procs.start_method is None
        and procs.initializer is None
        and procs.finalizer is None
        and procs.max_tasks_per_worker is None
        and options.timeout is None
        and options.stall_timeout is None
        and options.on_stall is None
    )


def _no_items(options: MapOptions, choice: AutoChoice | None = None) -> list[Any]:
    """``run_parallel`` over no items: no engine, no workers (stats of nothing)."""
    if options.on_stats is not None:
        options.on_stats(MapStats((), 0, 0.0, choice))
    return []


class _Auto:
    """``backend="auto"`` for one call: where the rest runs after the probe (see
    :mod:`parallelkit._map.backends.auto`)."""

    def __init__(
        self,
        fn: Callable[..., object],
        items: Iterable[Any],
        options: MapOptions,
        procs: _Processes,
        *,
        streaming: bool,
    ) -> None:
        from parallelkit._map.backends import auto  # noqa: PLC0415

        procs.check()
        workers = resolve_max_workers(procs.max_workers)
        method = resolve_start_method(procs.start_method)
        self.options = options
        self.baseline = StatsBaseline()
        self.resume: Resume | None = None
        self.length = length_of(items)
        self.source: Iterable[Any]
        if streaming:
            self.source = items if self.length is not None else iter(items)
        else:
            self.source = as_sequence(items)
            self.length = len(self.source)
        self.fn, self.procs, self.workers, self.method = fn, procs, workers, method
        why = auto.process_only(
            timeout=options.timeout,
            initializer=procs.initializer,
            finalizer=procs.finalizer,
            max_tasks_per_worker=procs.max_tasks_per_worker,
            stall_timeout=options.stall_timeout,
            on_stall=options.on_stall,
            forward_logs=procs.forward_logs,
        )
        if why is not None:  # no probe: an item must not run where the option cannot hold
            n = workers if self.length is None else max(1, min(workers, self.length))
            self.choice = AutoChoice("process", n, 0, None, {}, why)
            self.baseline.choice = self.choice
            auto.announce(self.choice)
            return
        if self.length == 0:
            self.choice = AutoChoice("serial", 1, 0, None, {}, "no items")
            self.baseline.choice = self.choice
            auto.announce(self.choice)
            return
        model = auto.Model(
            workers=workers,
            cpus=workers if procs.max_workers is None else default_workers(),
            start_method=method,
            items_inherited=method == "fork" and not streaming,
            threads_fixed=procs.max_workers is not None,
        )
        probe = auto.run_probe(
            fn,
            self.source,  # type: ignore[arg-type]
            self.length,
            fail_fast=not options.return_exceptions,
            measure_items=True,
            model=model,
        )
        if probe.rest is not None:
            self.source = probe.rest
        self.resume = (probe.count, probe.results, probe.errors or None, probe.failed)
        if probe.count:
            self.baseline.probe.append((auto.PROBE_WHERE, probe.count, probe.seconds))
        remaining = None if self.length is None else self.length - probe.count
        if probe.failed is not None:
            index = probe.errors[0][0] if probe.errors else probe.count
            m = probe.measured
            self.choice = AutoChoice(
                "serial",
                1,
                probe.count,
                None if m is None else m.seconds_per_item,
                {},
                f"the probe stopped: item {index} failed"
                if probe.errors
                else "the probe stopped: the input raised",
            )
        else:
            self.choice = auto.decide(probe, remaining, model)
            if self.choice.backend == "process" and not _sendable(fn, method):
                # the function cannot reach worker processes
                model = replace(model, allowed=("serial", "thread"))
                self.choice = auto.decide(probe, remaining, model)
        self.baseline.choice = self.choice
        auto.announce(self.choice)
        if (
            self.choice.backend == "serial"
            and not streaming
            and not options.watched
            and probe.failed is None
            and remaining
        ):
            self._rest_here(fn, probe.count, probe.seq_rest)

    def _rest_here(self, fn: Callable[..., object], start: int, rest: Iterator[Any] | None) -> None:
        """Run the items after the probe now, in one go: what the serial backend would do,
        less its copies (the results join the probe's, and the job takes them whole)."""
        assert self.resume is not None
        assert isinstance(self.source, Sequence)
        done, results, errors, _ = self.resume
        fail_fast = not self.options.return_exceptions
        if rest is None:
            rest = itertools.islice(self.source, start, None)  # no copy of the input
        t0 = time.perf_counter()
        failed = run_into(results, fn, rest, fail_fast)  # after the probe's results
        seconds = time.perf_counter() - t0
        failure = None
        if failed:
            errors = list(errors or ())
            for pos, exc in failed:
                exc.add_note(f"parallelkit: raised {SERIAL_WHERE} on item {start + pos}")
                errors.append((done + pos, exc))
            if fail_fast:
                failure = failed[0][1]
        ran = len(results) - done
        self.resume = (done + ran, results, errors, failure)
        self.baseline.probe.append((SERIAL_WHERE, ran, seconds))

    def engine(self, seq: Sequence[Any] | None) -> tuple[Engine | ChunkEngine, MapOptions, bool]:
        """The engine for the rest, the options to run it with, and whether fork workers
        inherit ``seq``."""
        choice, options = self.choice, self.options
        remaining = None
        if self.length is not None:
            remaining = self.length - (self.resume[0] if self.resume else 0)
        if choice.backend == "process":
            workers = self.workers
            if remaining is not None:
                workers = max(1, min(workers, remaining))
            engine = self.procs.engine(self.fn, seq, workers, self.method)
            return engine, options, engine.inherited_items is not None
        if choice.backend == "thread":
            factory = check_backend(
                "thread",
                max_workers=choice.workers,
                start_method=None,
                initializer=None,
            )
            runner, tracked = factory(remaining)
            return ChunkEngine(runner, tracked=tracked), options, False
        if options.chunksize is None and not options.watched and remaining:
            options = replace(options, chunksize=remaining)  # one chunk: the cheapest
        return ChunkEngine(SerialRunner()), options, False


def _sendable(fn: Callable[..., object], method: StartMethod) -> bool:
    """Whether worker processes can get ``fn`` (fork workers inherit it)."""
    if method == "fork":
        return True
    from parallelkit._wire.codec import dump_function  # noqa: PLC0415

    try:
        dump_function(fn)
    except Exception:
        return False
    return True


@overload
def run_parallel(
    fn: Callable[[T], R],
    items: Iterable[T],
    /,
    *,
    max_workers: int | None = None,
    start_method: StartMethod | None = None,
    backend: MapBackend | None = None,
    chunksize: int | None = None,
    ordered: bool = True,
    timeout: float | None = None,
    return_exceptions: Literal[False] = False,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[object, ...] = (),
    finalizer: Callable[..., object] | None = None,
    finalargs: tuple[object, ...] = (),
    max_tasks_per_worker: int | None = None,
    progress: ProgressOption = False,
    stall_timeout: float | None = None,
    on_stall: Callable[[StallReport], object] | None = None,
    on_stats: Callable[[MapStats], object] | None = None,
    forward_logs: bool = True,
) -> list[R]: ...
@overload
def run_parallel(
    fn: Callable[[T], R],
    items: Iterable[T],
    /,
    *,
    max_workers: int | None = None,
    start_method: StartMethod | None = None,
    backend: MapBackend | None = None,
    chunksize: int | None = None,
    ordered: bool = True,
    timeout: float | None = None,
    return_exceptions: Literal[True],
    initializer: Callable[..., object] | None = None,
    initargs: tuple[object, ...] = (),
    finalizer: Callable[..., object] | None = None,
    finalargs: tuple[object, ...] = (),
    max_tasks_per_worker: int | None = None,
    progress: ProgressOption = False,
    stall_timeout: float | None = None,
    on_stall: Callable[[StallReport], object] | None = None,
    on_stats: Callable[[MapStats], object] | None = None,
    forward_logs: bool = True,
) -> list[R | BaseException]: ...
@overload
def run_parallel(
    fn: Callable[[T], R],
    items: Iterable[T],
    /,
    *,
    max_workers: int | None = None,
    start_method: StartMethod | None = None,
    backend: MapBackend | None = None,
    chunksize: int | None = None,
    ordered: bool = True,
    timeout: float | None = None,
    return_exceptions: bool = False,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[object, ...] = (),
    finalizer: Callable[..., object] | None = None,
    finalargs: tuple[object, ...] = (),
    max_tasks_per_worker: int | None = None,
    progress: ProgressOption = False,
    stall_timeout: float | None = None,
    on_stall: Callable[[StallReport], object] | None = None,
    on_stats: Callable[[MapStats], object] | None = None,
    forward_logs: bool = True,
) -> list[R] | list[R | BaseException]: ...
def run_parallel(  # noqa: PLR0911 - one return per backend
    fn: Callable[[T], R],
    items: Iterable[T],
    /,
    *,
    max_workers: int | None = None,
    start_method: StartMethod | None = None,
    backend: MapBackend | None = None,
    chunksize: int | None = None,
    ordered: bool = True,
    timeout: float | None = None,
    return_exceptions: bool = False,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[object, ...] = (),
    finalizer: Callable[..., object] | None = None,
    finalargs: tuple[object, ...] = (),
    max_tasks_per_worker: int | None = None,
    progress: ProgressOption = False,
    stall_timeout: float | None = None,
    on_stall: Callable[[StallReport], object] | None = None,
    on_stats: Callable[[MapStats], object] | None = None,
    forward_logs: bool = True,
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
            for this call), a :class:`WorkerPool` to reuse, ``"auto"`` (the first items
            run in the calling thread to measure them, the rest serially, on threads or on
            processes, whichever is predicted to finish first; see :doc:`/backends`),
            ``"thread"`` (a thread pool;
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
        finalizer: called in each worker process once, when it stops normally: when the
            call has no more items for it, or when ``max_tasks_per_worker`` retires it.
            Not in a worker that is killed (a crash, a ``timeout``, the work cancelled).
            See :doc:`/lifecycle`.
        finalargs: arguments for ``finalizer``.
        max_tasks_per_worker: replace a worker by a new one after it has run this many
            items (its finalizer runs; the new one runs the initializer).
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
        forward_logs: log records of the worker processes this call starts go to this
            process's handlers (``True``, the default; see :doc:`logging`); ``False``
            leaves the workers' logging as they find it.

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

    options = check_options(
        fn,
        chunksize=chunksize,
        ordered=ordered,
        timeout=timeout,
        return_exceptions=return_exceptions,
        progress=progress,
        stall_timeout=stall_timeout,
        on_stall=on_stall,
        on_stats=on_stats,
    )
    procs = _Processes(
        max_workers,
        start_method,
        initializer,
        initargs,
        forward_logs,
        finalizer,
        finalargs,
        max_tasks_per_worker,
    )
    if isinstance(backend, str) and backend == "auto":
        auto = _Auto(fn, items, options, procs, streaming=False)
        seq = auto.source
        assert isinstance(seq, Sequence)
        if len(seq) == 0:
            return _no_items(options, auto.choice)
        engine, run_options, inherited = auto.engine(seq)
        return collect_call(
            engine,
            fn,
            seq,
            run_options,
            owned=True,
            inherited=inherited,
            resume=auto.resume,
            baseline=auto.baseline,
        )
    place = _check_backend(options, backend, procs)
    seq = as_sequence(items)
    if isinstance(place, WorkerPool):
        return place._run(fn, seq, options)
    if place is None:
        workers = resolve_max_workers(max_workers)  # checked even when there are no items
        method = resolve_start_method(start_method)
        if len(seq) == 0:
            return _no_items(options)
        engine = procs.engine(fn, seq, min(workers, len(seq)), method)
        inherited = engine.inherited_items is not None
        return collect_call(engine, fn, seq, options, owned=True, inherited=inherited)
    if len(seq) == 0:
        return _no_items(options)
    runner, tracked = place(len(seq))
    if options.chunksize is None and runner.in_caller and not options.watched:
        # nothing runs in parallel and nothing streams: one chunk is the cheapest
        options = replace(options, chunksize=len(seq))
    return collect_call(ChunkEngine(runner, tracked=tracked), fn, seq, options, owned=True)


@overload
def imap_parallel(
    fn: Callable[[T], R],
    items: Iterable[T],
    /,
    *,
    max_workers: int | None = None,
    start_method: StartMethod | None = None,
    backend: MapBackend | None = None,
    chunksize: int | None = None,
    ordered: bool = True,
    timeout: float | None = None,
    return_exceptions: Literal[False] = False,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[object, ...] = (),
    finalizer: Callable[..., object] | None = None,
    finalargs: tuple[object, ...] = (),
    max_tasks_per_worker: int | None = None,
    progress: ProgressOption = False,
    stall_timeout: float | None = None,
    on_stall: Callable[[StallReport], object] | None = None,
    forward_logs: bool = True,
) -> ResultIterator[R]: ...
@overload
def imap_parallel(
    fn: Callable[[T], R],
    items: Iterable[T],
    /,
    *,
    max_workers: int | None = None,
    start_method: StartMethod | None = None,
    backend: MapBackend | None = None,
    chunksize: int | None = None,
    ordered: bool = True,
    timeout: float | None = None,
    return_exceptions: Literal[True],
    initializer: Callable[..., object] | None = None,
    initargs: tuple[object, ...] = (),
    finalizer: Callable[..., object] | None = None,
    finalargs: tuple[object, ...] = (),
    max_tasks_per_worker: int | None = None,
    progress: ProgressOption = False,
    stall_timeout: float | None = None,
    on_stall: Callable[[StallReport], object] | None = None,
    forward_logs: bool = True,
) -> ResultIterator[R | BaseException]: ...
@overload
def imap_parallel(
    fn: Callable[[T], R],
    items: Iterable[T],
    /,
    *,
    max_workers: int | None = None,
    start_method: StartMethod | None = None,
    backend: MapBackend | None = None,
    chunksize: int | None = None,
    ordered: bool = True,
    timeout: float | None = None,
    return_exceptions: bool = False,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[object, ...] = (),
    finalizer: Callable[..., object] | None = None,
    finalargs: tuple[object, ...] = (),
    max_tasks_per_worker: int | None = None,
    progress: ProgressOption = False,
    stall_timeout: float | None = None,
    on_stall: Callable[[StallReport], object] | None = None,
    forward_logs: bool = True,
) -> ResultIterator[R] | ResultIterator[R | BaseException]: ...
def imap_parallel(
    fn: Callable[[T], R],
    items: Iterable[T],
    /,
    *,
    max_workers: int | None = None,
    start_method: StartMethod | None = None,
    backend: MapBackend | None = None,
    chunksize: int | None = None,
    ordered: bool = True,
    timeout: float | None = None,
    return_exceptions: bool = False,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[object, ...] = (),
    finalizer: Callable[..., object] | None = None,
    finalargs: tuple[object, ...] = (),
    max_tasks_per_worker: int | None = None,
    progress: ProgressOption = False,
    stall_timeout: float | None = None,
    on_stall: Callable[[StallReport], object] | None = None,
    forward_logs: bool = True,
) -> ResultIterator[R] | ResultIterator[R | BaseException]:
    """Like :func:`run_parallel`, but lazy: an iterator over the results.

    ``items`` is consumed lazily and only a bounded number of chunks is in flight, so an
    endless generator works and memory stays flat.  Chunk sizes adapt to how long items
    take when the input has no length.  Closing the iterator (or ``with``) stops the work
    promptly and leaves nothing running.  ``backend=`` as for :func:`run_parallel`; on Dask,
    at most twice the cluster's threads in tasks are in flight.

    ``progress``, ``stall_timeout``, ``on_stall`` and ``forward_logs`` as for
    :func:`run_parallel` (the bar
    knows the total when ``items`` has a ``len()``; progress is reported, and stalls are
    looked for, while the iterator is waiting for results, in the thread iterating).  The
    iterator's :attr:`~ResultIterator.stats` give the per-worker statistics.

    Example:
        >>> with imap_parallel(abs, iter([-1, -2, 3]), max_workers=2) as results:
        ...     list(results)
        [1, 2, 3]
    """

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
    procs = _Processes(
        max_workers,
        start_method,
        initializer,
        initargs,
        forward_logs,
        finalizer,
        finalargs,
        max_tasks_per_worker,
    )
    if isinstance(backend, str) and backend == "auto":
        auto = _Auto(fn, items, options, procs, streaming=True)
        engine, run_options, _ = auto.engine(None)
        return stream_call(
            engine,
            fn,
            auto.source,
            run_options,
            owned=True,
            resume=auto.resume,
            baseline=auto.baseline,
        )
    place = _check_backend(options, backend, procs)
    if isinstance(place, WorkerPool):
        return place._stream(fn, items, options)
    if place is not None:
        runner, tracked = place(length_of(items))
        return stream_call(ChunkEngine(runner, tracked=tracked), fn, items, options, owned=True)
    workers = resolve_max_workers(max_workers)
    method = resolve_start_method(start_method)
    length = length_of(items)
    if length is not None:
        workers = max(1, min(workers, length))
    engine = procs.engine(fn, None, workers, method)
    return stream_call(engine, fn, items, options, owned=True)
