"""The driver that runs :class:`~parallelkit._map.job.Job` s on a :class:`Runner`.

It plays the part the process :class:`~parallelkit._map.engine.Engine` plays for the default
backend, with the same contract towards jobs (:class:`~parallelkit._map.job.Driver`): whichever
thread needs a result drives -- hands chunks to the runner while it has capacity, waits for
any chunk to finish, and feeds the outcome to the job, which reorders it and applies the
error policy.  The driver itself only adds what depends on *where* chunks ran:

- an item's exception gets the note ``parallelkit: raised <where> on item <i>`` (the
  original object when it ran in this process, rebuilt with its own type and the remote
  traceback as ``__cause__`` when it ran elsewhere);
- a chunk whose worker died is re-run one item per chunk, each *alone* (nothing else in
  flight: a worker that dies takes every task it holds with it, innocent or not), so that
  only an item that kills a worker while it runs alone is reported, as
  :class:`~parallelkit.WorkerCrashedError`;
- on threads, a late item is pinned as soon as its timeout passes: it fails with
  :class:`~parallelkit.TaskTimeoutError` and the rest of its chunk runs again elsewhere,
  while the thread (which cannot be killed) finishes that item in the background.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from typing import Any

from parallelkit._map.backends.protocol import (
    NOT_STARTED,
    ChunkTask,
    Progress,
    Runner,
    WorkerLostError,
)
from parallelkit._map.job import Chunk, Job, Turns
from parallelkit._util.threads import Mutex
from parallelkit._wire.codec import ExceptionRecord, locate_unpicklable, rebuild_exception
from parallelkit.errors import SerializationError, TaskTimeoutError, WorkerCrashedError


class ChunkEngine:
    """Runs jobs on a :class:`Runner` (serial, threads, an Executor, Dask)."""

    pickles_items = False  # the runner's transport (if any) pickles them

    def __init__(self, runner: Runner[Any], *, tracked: bool = False) -> None:
        self.runner = runner
        self.tracked = tracked  # chunks run in this process's threads: publish progress
        self.max_workers = runner.max_workers
        self.changes = 0
        self.mutex = Mutex()
        self.jobs: list[Job] = []
        self.running: dict[Any, tuple[Chunk, ChunkTask]] = {}
        self.abandoned: list[Progress] = []  # timed-out chunks whose thread still runs
        self.prepared: set[int] = set()
        self.suspects: set[int] = set()  # ids of chunks to run alone (see the docstring)
        self.closed = False
        self.turns = Turns()  # the jobs are asked for chunks in turn
        # parallelkit._map.stats: where chunks ran -> [items, busy seconds]
        self.tally: dict[str, list[float]] = {}
        self.started = time.monotonic()

    # ---------------------------------------------------------------- Driver contract
    def register_function(self, fn: Callable[..., object]) -> tuple[int, bytes]:
        return 0, b""

    def abandon(self, job: Job) -> None:
        if job in self.jobs:
            self.jobs.remove(job)

    def defer(self, callback: Callable[[], object]) -> None:
        callback()

    def future_done(self, job: Job) -> None:
        pass

    def add_job(self, job: Job) -> None:
        if self.closed:
            raise RuntimeError("cannot run new work: the backend has been shut down")
        self.jobs.append(job)

    def drive(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        """Make progress until ``done()`` or the timeout; True if done."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.mutex:
            while True:
                if done():
                    return True
                if self.closed:
                    return done()
                self._dispatch()
                if done():
                    return True
                if not self.running:
                    return done()  # nothing left to wait for
                wait = self._next_deadline()
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    wait = left if wait is None else min(wait, left)
                finished = self.runner.wait(list(self.running), wait)
                for handle in sorted(finished, key=lambda h: self.running[h][0].start):
                    self._settle(handle)
                self._check_timeouts()

    # ---------------------------------------------------------------- dispatch
    def _next_chunk(self) -> Chunk | None:
        return self.turns.next_chunk(self.jobs, self.abandon, self._prepare)

    def _prepare(self, job: Job) -> None:
        if id(job) not in self.prepared:
            self.prepared.add(id(job))
            self.runner.prepare(job.fn)

    def _dispatch(self) -> None:
        while len(self.running) < (1 if self.suspects else self.runner.capacity):
            chunk = self._next_chunk()
            if chunk is None:
                return
            job = chunk.job
            assert chunk.items is not None
            task = ChunkTask(
                job.fn,
                chunk.items,
                chunk.start,
                stop_on_error=job.fail_fast and not job.return_exceptions,
                timeout=job.timeout,
                progress=Progress() if self.tracked else None,
            )
            try:
                handle = self.runner.submit(task)
            except WorkerLostError as exc:
                if self.running:
                    # The backend broke under a chunk still in flight: that chunk's outcome
                    # names the item that broke it.  This one ran nowhere; it waits.
                    job.retries.appendleft(chunk)
                    return
                job.fail(exc.__cause__ if isinstance(exc.__cause__, Exception) else exc)
                continue
            except Exception as exc:
                job.fail(self._submit_error(chunk, exc))
                continue
            job.in_flight += 1
            self.running[handle] = (chunk, task)

    def _submit_error(self, chunk: Chunk, exc: Exception) -> BaseException:
        if isinstance(exc, SerializationError):
            return exc
        if isinstance(exc, pickle.PicklingError) or (
            isinstance(exc, TypeError | AttributeError) and "pickl" in str(exc).lower()
        ):
            found = locate_unpicklable(chunk.items or ())
            index = chunk.start + (found[0] if found else 0)
            error = SerializationError(
                f"item {index} cannot be pickled to send it to the backend: "
                f"{type(exc).__name__}: {exc}",
                what="argument",
                item_index=index,
            )
            error.__cause__ = exc
            return error
        return exc

    # ---------------------------------------------------------------- outcomes
    def _settle(self, handle: Any) -> None:
        entry = self.running.pop(handle, None)
        if entry is None:
            return
        chunk, _task = entry
        job = chunk.job
        job.in_flight -= 1
        alone = chunk.cid in self.suspects
        self.suspects.discard(chunk.cid)
        if job.cancelled:
            return
        try:
            outcome = self.runner.outcome(handle)
        except WorkerLostError as lost:
            if not lost.retryable or alone:
                job.split_around(chunk, 0, self._crash(chunk, lost))
                return
            # find the item that kills workers: its items again, one by one, each alone
            pending = len(job.retries)
            job.split_around(chunk, 0, None)
            for piece in list(job.retries)[: len(job.retries) - pending]:
                self.suspects.add(piece.cid)
            return
        except Exception as exc:
            job.fail(exc)
            return
        errors: list[tuple[int, BaseException]] | None = None
        if outcome.errors:
            errors = [
                (pos, self._exception(exc, chunk.start + pos, outcome.where))
                for pos, exc in outcome.errors
            ]
        tally = self.tally.setdefault(outcome.where, [0, 0.0])
        tally[0] += len(outcome.results)
        tally[1] += outcome.seconds
        job._adapt(len(outcome.results), outcome.seconds)
        job.complete(chunk.start, outcome.results, errors)

    @staticmethod
    def _exception(exc: BaseException | ExceptionRecord, index: int, where: str) -> BaseException:
        if isinstance(exc, ExceptionRecord):
            exc = rebuild_exception(exc, where=f"{where} on item {index}")
        elif not isinstance(exc, TaskTimeoutError):
            exc.add_note(f"parallelkit: raised {where} on item {index}")
        if isinstance(exc, SerializationError) and exc.item_index is None:
            exc.item_index = index
        return exc

    @staticmethod
    def _crash(chunk: Chunk, lost: Exception) -> WorkerCrashedError:
        index = chunk.start
        error = WorkerCrashedError(
            f"item {index} was lost with the worker running it: {lost}"
            if chunk.stop - chunk.start == 1
            else f"items {index} to {chunk.stop - 1} were lost with the worker running them: "
            f"{lost}",
            item_index=index,
        )
        error.__cause__ = lost.__cause__ or lost
        return error

    # ---------------------------------------------------------------- timeouts (threads)
    def _next_deadline(self) -> float | None:
        if not self.tracked:
            return None
        now = time.monotonic()
        best: float | None = None
        for _chunk, task in self.running.values():
            p = task.progress
            if p is None or task.timeout is None or p.pos < 0:
                continue
            left = max(0.0, p.started + task.timeout - now)
            best = left if best is None else min(best, left)
        if best is None and any(t.timeout is not None for _, t in self.running.values()):
            best = 0.05  # a tracked chunk that has not started yet: look again soon
        return best

    def _check_timeouts(self) -> None:
        if not self.tracked:
            return
        now = time.monotonic()
        for handle, (chunk, task) in list(self.running.items()):
            p = task.progress
            timeout = task.timeout
            if p is None or timeout is None:
                continue
            with p.lock:
                if p.pos < 0 or now - p.started < timeout:
                    continue
                p.cancelled = True
                pos = p.pos
                done = p.results[:pos]
                failed = [e for e in p.errors if e[0] < pos]
            del self.running[handle]
            self.abandoned.append(p)
            job = chunk.job
            job.in_flight -= 1
            if job.cancelled:
                continue
            index = chunk.start + pos
            late = TaskTimeoutError(
                f"item {index} ran longer than its timeout of {timeout:g} s; a thread cannot "
                "be stopped, so it finishes that item in the background",
                item_index=index,
                timeout=timeout,
            )
            if pos:
                job.complete(
                    chunk.start,
                    done,
                    [(i, self._exception(e, chunk.start + i, "in a thread")) for i, e in failed]
                    or None,
                )
            job.complete(index, [None], [(0, late)])
            if index + 1 < chunk.stop and not job.cancelled and job.error is None:
                assert chunk.items is not None
                job.retries.appendleft(Chunk(job, index + 1, chunk.stop, chunk.items[pos + 1 :]))

    # ---------------------------------------------------------------- shutdown
    def shutdown(self, *, graceful: bool, join_timeout: float = 5.0) -> None:
        """Cancel every job and what is queued; release the runner.

        ``graceful`` and ``join_timeout`` are the process engine's; nothing here can be
        killed, so both cases wait for running items, except a timed-out one.
        """
        with self.mutex:
            if self.closed:
                return
            self.closed = True
            for job in list(self.jobs):
                job.cancel()
            self.jobs.clear()
            for _chunk, task in self.running.values():
                if task.progress is not None:
                    task.progress.cancelled = True
            self.running.clear()
        # threads stop before their next item; wait for them unless one runs a late item
        self.runner.close(wait=not self.late_threads)

    @property
    def late_threads(self) -> bool:
        """A timed-out item is still running in one of our threads."""
        return any(p.pos != NOT_STARTED and p.pos >= 0 for p in self.abandoned)
