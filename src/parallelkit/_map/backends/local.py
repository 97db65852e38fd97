"""Runners for the serial backend, threads, and any ``concurrent.futures.Executor``.

- :class:`SerialRunner` runs each chunk in the calling thread, when the driver asks for it:
  in order, no threads, no pickling -- a debugger steps straight into the function.
- :class:`ExecutorRunner` submits one call per chunk to an executor.  On threads (our own
  pool for ``backend="thread"``, or a user's ``ThreadPoolExecutor``) items and results are
  not copied and the driver watches each item's progress (timeouts, cancellation); on any
  other executor (a ``ProcessPoolExecutor``, say) the function travels pickled once per
  chunk (cloudpickle when plain pickle cannot) and exceptions come back as records.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import os
import pickle
import threading
from collections.abc import Callable, Collection, Sequence
from typing import Any

from parallelkit._map.backends.protocol import ChunkOutcome, ChunkTask, WorkerLostError, run_chunk
from parallelkit._wire.codec import dump_function

SERIAL_WHERE = "in the calling thread (serial backend)"


class _Ran:
    __slots__ = ("outcome",)

    def __init__(self, outcome: ChunkOutcome) -> None:
        self.outcome = outcome


class SerialRunner:
    """Runs chunks in the caller, one at a time, as the results are needed."""

    max_workers = 1
    capacity = 1
    in_caller = True

    def prepare(self, fn: Callable[..., object]) -> None:
        pass

    def submit(self, task: ChunkTask) -> _Ran:
        return _Ran(run_chunk(task, SERIAL_WHERE))

    def wait(self, handles: Collection[_Ran], timeout: float | None) -> Collection[_Ran]:
        return handles

    def outcome(self, handle: _Ran) -> ChunkOutcome:
        return handle.outcome

    def close(self, *, wait: bool) -> None:
        pass


def _run_in_thread(task: ChunkTask) -> ChunkOutcome:
    return run_chunk(task, f"in thread {threading.current_thread().name!r}")


@functools.lru_cache(maxsize=16)
def _load_function(payload: bytes) -> Callable[[Any], object]:
    fn: Callable[[Any], object] = pickle.loads(payload)
    return fn


def _run_elsewhere(
    fn_payload: bytes,
    items: Sequence[object],
    start: int,
    stop_on_error: bool,
    timeout: float | None,
) -> ChunkOutcome:
    """Runs in the executor's worker process."""
    task = ChunkTask(_load_function(fn_payload), items, start, stop_on_error, timeout, True)
    return run_chunk(task, f"in process pid {os.getpid()}")


class ExecutorRunner:
    """Runs chunks on a ``concurrent.futures.Executor`` (one ``submit`` per chunk)."""

    def __init__(self, executor: cf.Executor, *, owned: bool, max_workers: int) -> None:
        self.executor = executor
        self.owned = owned  # ours (backend="thread"): shut it down in close()
        self.local = isinstance(executor, cf.ThreadPoolExecutor)
        self.max_workers = max_workers
        self.capacity = 2 * max_workers
        self.in_caller = False
        self.fn_payload = b""
        self.futures: set[cf.Future[ChunkOutcome]] = set()

    def prepare(self, fn: Callable[..., object]) -> None:
        if not self.local:
            self.fn_payload = dump_function(fn, by_value=True)

    def submit(self, task: ChunkTask) -> cf.Future[ChunkOutcome]:
        try:
            if self.local:
                future = self.executor.submit(_run_in_thread, task)
            else:
                future = self.executor.submit(
                    _run_elsewhere,
                    self.fn_payload,
                    task.items,
                    task.start,
                    task.stop_on_error,
                    task.timeout,
                )
        except cf.BrokenExecutor as exc:  # broken by a chunk still in flight, or before us
            raise WorkerLostError(
                f"the executor broke ({type(exc).__name__}: {exc})", retryable=False
            ) from exc
        self.futures.add(future)
        return future

    def wait(
        self, handles: Collection[cf.Future[ChunkOutcome]], timeout: float | None
    ) -> Collection[cf.Future[ChunkOutcome]]:
        return cf.wait(handles, timeout, cf.FIRST_COMPLETED).done

    def outcome(self, handle: cf.Future[ChunkOutcome]) -> ChunkOutcome:
        self.futures.discard(handle)
        try:
            return handle.result()
        except cf.BrokenExecutor as exc:
            raise WorkerLostError(
                f"the executor broke ({type(exc).__name__}: {exc})", retryable=False
            ) from exc

    def close(self, *, wait: bool) -> None:
        for future in self.futures:
            future.cancel()
        if self.owned:
            self.executor.shutdown(wait=wait, cancel_futures=True)
        elif wait:
            cf.wait(self.futures)
        self.futures.clear()


def executor_workers(executor: cf.Executor) -> int:
    """How many calls ``executor`` runs at once, as far as it says."""
    n = getattr(executor, "_max_workers", None) or getattr(executor, "max_workers", None)
    if isinstance(n, int) and n > 0:
        return n
    return os.cpu_count() or 1
