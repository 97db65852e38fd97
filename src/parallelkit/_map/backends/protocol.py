"""The one small protocol behind every backend other than the process engine.

A backend is a :class:`Runner`: it runs a :class:`ChunkTask` (a function and a slice of the
input) somewhere and hands back a :class:`ChunkOutcome`.  Everything else -- chunk sizes,
the in-flight window, ordering, ``return_exceptions``, fail-fast, timeouts, the note that
names the item -- is the :class:`~parallelkit._map.job.Job`'s and the
:class:`~parallelkit._map.backends.driver.ChunkEngine`'s, shared by all backends::

    Job ──Chunk──▶ ChunkEngine ──ChunkTask──▶ Runner.submit ──▶ run_chunk (caller, thread,
     ▲                 │                                         executor worker, Dask worker)
     └── complete() ◀──┴── Runner.wait / Runner.outcome ◀── ChunkOutcome ◀──┘

:func:`run_chunk` is the loop that calls the user's function on each item, wherever the
runner runs it.  Without a timeout or a progress cell it is ``list.extend(map(fn, items))``
(so the serial backend costs about what ``list(map(...))`` costs); ``list.extend`` keeps
the results before a failing item, which tells us that item's position.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar

from parallelkit._map.calls import each
from parallelkit._wire.codec import ExceptionRecord, capture_exception
from parallelkit.errors import TaskTimeoutError

H = TypeVar("H")

NOT_STARTED = -1
FINISHED = -2


class Progress:
    """What a thread running a chunk shares with the driver (threads only).

    ``pos`` is the position of the item being run (or ``NOT_STARTED`` / ``FINISHED``),
    ``started`` when it started (``time.monotonic()``); setting ``cancelled`` makes the
    thread stop before its next item.  Only timed chunks take ``lock`` per item, so that a
    late item can be pinned without the thread moving on meanwhile.
    """

    __slots__ = ("cancelled", "errors", "lock", "pos", "results", "started")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pos = NOT_STARTED
        self.started = 0.0
        self.cancelled = False
        self.results: list[object] = []
        self.errors: list[tuple[int, BaseException]] = []


@dataclass(slots=True)
class ChunkTask:
    """Items ``start ... start + len(items)`` of a job, to run with ``fn``."""

    fn: Callable[[Any], object]
    items: Sequence[object]
    start: int
    stop_on_error: bool  # fail fast: no point running the items after a failure
    timeout: float | None  # per item, seconds
    capture: bool = False  # exceptions travel as ExceptionRecord (another process)
    progress: Progress | None = field(default=None)


class ChunkOutcome(NamedTuple):
    """What running a chunk produced.

    ``results`` holds one value per item run (``None`` where it failed); with
    ``stop_on_error`` it ends at the first failure.  ``errors`` are ``(position,
    exception)`` pairs -- an :class:`ExceptionRecord` when the chunk ran in another process.
    """

    results: list[object]
    errors: list[tuple[int, BaseException | ExceptionRecord]] | None
    seconds: float
    where: str  # "in the calling thread", "in thread T", "on Dask worker tcp://..."


class WorkerLostError(Exception):
    """Internal: the worker running a chunk died (Dask ``KilledWorker``, a broken executor)."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable  # the backend can still run the chunk's items one by one


class Runner(Protocol[H]):
    """A backend: runs chunks somewhere; ``H`` is its handle for a chunk in flight."""

    @property
    def max_workers(self) -> int:
        """How many items it runs at once (sizes chunks and the in-flight window)."""
        ...

    @property
    def in_caller(self) -> bool:
        """Runs chunks in the calling thread (the serial backend)."""
        ...

    @property
    def capacity(self) -> int:
        """At most this many chunks in flight (bounds memory and, on Dask, tasks)."""
        ...

    def prepare(self, fn: Callable[..., object]) -> None:
        """Called once per job before its first chunk (send the function once)."""
        ...

    def submit(self, task: ChunkTask) -> H:
        """Start running ``task``; may run it at once (the serial backend)."""
        ...

    def wait(self, handles: Collection[H], timeout: float | None) -> Collection[H]:
        """Wait until at least one of ``handles`` is done (or ``timeout``); those done."""
        ...

    def outcome(self, handle: H) -> ChunkOutcome:
        """The outcome of a finished chunk.

        Raises:
            WorkerLostError: the worker running it died.
            Exception: the backend could not run it (the job fails with this).
        """
        ...

    def close(self, *, wait: bool) -> None:
        """Cancel what is still queued and release what this runner owns.

        ``wait``: wait for chunks that are running (``False`` when one runs a late item).
        """
        ...


def _timeout_error(index: int, timeout: float, seconds: float, how: str) -> TaskTimeoutError:
    return TaskTimeoutError(
        f"item {index} ran {seconds:.3g} s, longer than its timeout of {timeout:g} s; {how}",
        item_index=index,
        timeout=timeout,
    )


LATE_ON_FINISH = "this backend cannot stop a running item, so it is reported once it has finished"


def run_chunk(task: ChunkTask, where: str) -> ChunkOutcome:
    """Call ``task.fn`` on each item; results and errors by position (see the module doc)."""
    t0 = time.perf_counter()
    if task.progress is not None:
        results, errors = _run_tracked(task, task.progress)
    elif task.timeout is not None:
        results, errors = _run_timed(task)
    else:
        results, errors = _run_fast(task)
    seconds = time.perf_counter() - t0
    if errors and task.capture:
        return ChunkOutcome(
            results, [(pos, capture_exception(exc)) for pos, exc in errors], seconds, where
        )
    return ChunkOutcome(results, errors or None, seconds, where)  # type: ignore[arg-type]


def _run_fast(task: ChunkTask) -> tuple[list[object], list[tuple[int, BaseException]]]:
    results: list[object] = []
    errors: list[tuple[int, BaseException]] = []
    it = iter(task.items)
    fn = task.fn
    while True:
        try:
            results.extend(each(fn, it))
            return results, errors
        except KeyboardInterrupt:
            raise  # Ctrl-C in the caller (serial): stop, do not record it as the item's
        except BaseException as exc:  # SystemExit too: it is this item's exception
            errors.append((len(results), exc))
            results.append(None)
            if task.stop_on_error:
                return results, errors


def _run_timed(task: ChunkTask) -> tuple[list[object], list[tuple[int, BaseException]]]:
    """One item at a time, timed: a late item fails once it has finished."""
    results: list[object] = []
    errors: list[tuple[int, BaseException]] = []
    fn = task.fn
    timeout = task.timeout
    assert timeout is not None
    clock = time.monotonic
    for pos, item in enumerate(task.items):
        t = clock()
        try:
            value = fn(item)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            errors.append((pos, exc))
            results.append(None)
            if task.stop_on_error:
                break
            continue
        took = clock() - t
        if took > timeout:
            errors.append((pos, _timeout_error(task.start + pos, timeout, took, LATE_ON_FINISH)))
            results.append(None)
            if task.stop_on_error:
                break
            continue
        results.append(value)
    return results, errors


def _run_tracked(
    task: ChunkTask, p: Progress
) -> tuple[list[object], list[tuple[int, BaseException]]]:
    """In a thread: publish progress so that the driver can pin and abandon a late item."""
    fn = task.fn
    clock = time.monotonic
    results, errors = p.results, p.errors
    timed = task.timeout is not None
    lock = p.lock
    for pos, item in enumerate(task.items):
        if timed:
            with lock:
                if p.cancelled:
                    break
                p.pos = pos
                p.started = clock()
        elif p.cancelled:
            break
        try:
            value = fn(item)
        except BaseException as exc:
            if timed:
                with lock:
                    errors.append((pos, exc))
                    results.append(None)
            else:
                errors.append((pos, exc))
                results.append(None)
            if task.stop_on_error:
                break
            continue
        if timed:
            with lock:
                results.append(value)
        else:
            results.append(value)
    with lock:
        p.pos = FINISHED
    return list(results), list(errors)
