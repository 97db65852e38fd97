"""The thread that completes ``WorkerPool.submit`` futures nobody is waiting on, and the
futures of ``WorkerPool.schedule``, which can be cancelled while they run.

::

    submit ──▶ engine.future_queue ──▶ (wake) ──▶ helper thread: engine.drive(until none pending)
                                                      └─ exits when no future is pending
    TaskFuture.cancel() ──▶ StopRequests ──▶ (wake) ──▶ the driver: StopRequests.handle() stops
                                                        the worker running the task (Blame.stop)

Maps need no thread (the caller drives); a future must complete even if nobody calls its
``result()``, so the first pending one starts this helper, which drives the engine like any
caller and exits once none is pending.  :class:`FutureCompleter` owns that thread and the count
of pending futures; the queue of submitted calls is the engine's (dispatch reads it first).

Fork and threads: a child forked while another thread runs inherits whatever locks that
thread held (CPython 3.12+ warns about it).  So under fork the helper starts only after
every worker has been forked, and one replaced while the helper runs (after a crash or a
timeout) is forked with that warning silenced: the helper holds no lock a worker needs,
unless a user's future callback is running and holding one at that very moment.

Cancelling a running task: the future itself decides who wins, under its own lock
(:meth:`TaskFuture.cancel` against the engine's deferred ``set_result``): a future cancelled
first keeps no result that arrives later; a result set first makes ``cancel()`` return
False.  ``cancel()`` never takes the engine's mutex: it queues a stop request and wakes the
driver, which stops the worker if it still runs the task -- the same SIGTERM, then SIGKILL,
as a timeout, and the worker is replaced in the same way.  The task's job counts as
pending until the driver has handled the request, so the helper drives until then.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import CANCELLED_AND_NOTIFIED, RUNNING
from typing import TYPE_CHECKING, Protocol, TypeVar

from parallelkit._map.job import Job, PoolBrokenError
from parallelkit._proc.forkserver import start_forkserver
from parallelkit._util import fuzz as _fuzz
from parallelkit._util import threads

if TYPE_CHECKING:
    from parallelkit._map.engine import Engine

_R = TypeVar("_R")


class Stoppable(Protocol):
    """A scheduled task's job, as its future and the stop requests see it."""

    def stop(self) -> None:
        """Its future was cancelled: stop it (under the engine's mutex, by the driver)."""


class TaskFuture(Future[_R]):
    """The Future of a task started by :meth:`WorkerPool.schedule
    <parallelkit.WorkerPool.schedule>`: :meth:`cancel` stops it even while it runs.

    Everything else is a :class:`concurrent.futures.Future`: ``result()``, ``exception()``,
    ``add_done_callback()``, ``concurrent.futures.wait()`` and ``as_completed()``.

    .. versionadded:: 0.1
    """

    _job: Stoppable | None  # the task's job until the engine has settled it
    _requests: StopRequests | None

    def __init__(self) -> None:
        super().__init__()
        self._job = None
        self._requests = None

    def cancel(self) -> bool:
        """Cancel the task; True unless it has already finished.

        A task not started yet never starts.  A running one is stopped: its worker gets
        SIGTERM (SIGKILL if it is still there after a short grace) and is replaced, so the
        pool goes on with its other tasks.  Either way the future is cancelled at once:
        ``cancelled()`` is True and ``result()`` raises
        :class:`concurrent.futures.CancelledError`.  If the task finishes as it is being
        cancelled, exactly one of the two happens: ``cancel()`` returns False and the result
        is kept, or it returns True and the result is dropped.
        """
        if not super().cancel():  # not pending: running, or finished
            with self._condition:
                if self._state != RUNNING:
                    return False  # finished (a cancelled one returned True above)
                # what Future.cancel() and set_running_or_notify_cancel() do for a pending
                # future, at once: wait() and as_completed() count it as done
                self._state = CANCELLED_AND_NOTIFIED
                for waiter in self._waiters:
                    waiter.add_cancelled(self)
                self._condition.notify_all()
            # reason: Future has no public way to run its callbacks (cancel() does this)
            self._invoke_callbacks()  # type: ignore[attr-defined]
        job, requests = self._job, self._requests
        if job is not None and requests is not None:
            requests.request(job)
        return True

    def _bind(self, job: Stoppable, requests: StopRequests) -> None:
        self._job, self._requests = job, requests

    def _unbind(self) -> None:
        """The engine has settled the task: let go of its job (and so of its arguments)."""
        self._job = self._requests = None


def set_result(future: Future[_R], value: _R) -> None:
    """Complete ``future`` with ``value``, unless it was cancelled as the result arrived."""
    try:
        future.set_result(value)
    except InvalidStateError:  # TaskFuture.cancel() won: the result is dropped
        pass


def set_exception(future: Future[object], exc: BaseException) -> None:
    """Fail ``future`` with ``exc``, unless it was cancelled as the outcome arrived."""
    try:
        future.set_exception(exc)
    except InvalidStateError:  # TaskFuture.cancel() won
        pass


class StopRequests:
    """Tasks whose futures were cancelled, for the driver to stop (any thread adds)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.jobs: deque[Stoppable] = deque()

    def request(self, job: Stoppable) -> None:
        """Ask the driver to stop ``job`` (from any thread; never blocks)."""
        if _fuzz.ENABLED:
            _fuzz.point("futures.before_stop_request")
        self.jobs.append(job)
        self.engine.wake()  # a no-op once the engine has closed (it settled every job)

    def handle(self) -> None:
        """Stop the tasks asked for (the driver, under the engine's mutex)."""
        jobs = self.jobs
        while jobs:
            jobs.popleft().stop()


class FutureCompleter:
    """Pending futures of an engine and the thread that completes them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.pending = 0  # submitted calls not settled yet (under the engine's mutex)
        self.running = False  # the thread runs (set under the mutex, cleared as it exits)
        self.thread: threading.Thread | None = None
        self.close_when_idle = False  # shut the engine down once no future is pending
        self.stops = StopRequests(engine)  # cancelled TaskFutures, for the driver to stop

    def submit(self, job: Job) -> None:
        """Queue a submitted call; make sure a thread is driving to complete it."""
        engine = self.engine
        with engine.mutex:
            if engine.closed:
                raise RuntimeError("cannot schedule new futures after shutdown()")
            if engine.broken is not None:
                raise PoolBrokenError("the pool is broken") from engine.broken
            engine.future_queue.append(job)
            self.pending += 1
            if self.running:
                engine.wake()
                return
            if engine.start_method == "fork":
                # fork every worker now, before our thread exists (see the module docstring)
                while len(engine.workers) < engine.max_workers:
                    engine.spawn()  # never None: that is only for forkserver
            elif engine.start_method == "forkserver":
                start_forkserver()  # from this thread, with its signal mask (see below)
            # it never takes a Ctrl-C meant for the main thread (see threads.THREAD_BLOCKED)
            thread = threads.quiet_thread(self._complete, name="parallelkit-futures")
            self.thread = thread
            try:
                thread.start()
            finally:  # even if a Ctrl-C comes now: running if and only if started
                self.running = thread.ident is not None

    def alive(self) -> bool:
        """Is the helper thread running (a worker forked now forks beside it)?"""
        return self.thread is not None and self.thread.is_alive()

    def _complete(self) -> None:
        engine = self.engine

        def idle() -> bool:
            if self.pending <= 0 or engine.closed:
                self.running = False
                return True
            return False

        try:
            engine.drive(idle)
        except BaseException:  # the pool was torn down under us: futures already failed
            with engine.mutex:
                self.running = False
        if self.close_when_idle:
            engine.shutdown(graceful=True)

    def cancel_pending(self) -> None:
        """Cancel the submitted calls not started yet (those being re-run stay queued)."""
        engine = self.engine
        with engine.mutex:
            queued, engine.future_queue = engine.future_queue, deque()
            for job in queued:
                if getattr(job, "started", True) is False:
                    job.cancel()
                else:
                    engine.future_queue.append(job)  # running, but waiting to be re-run
        engine.drive(lambda: True)  # run the deferred cancellations

    def shutdown_when_idle(self) -> None:
        """Shut the engine down now, or once the helper has completed every future."""
        with self.engine.mutex:
            busy = self.pending > 0 and self.running
            if busy:
                self.close_when_idle = True
        if not busy:
            self.engine.shutdown(graceful=True)
