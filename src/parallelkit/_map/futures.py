"""The thread that completes ``WorkerPool.submit`` futures nobody is waiting on.

::

    submit ──▶ engine.future_queue ──▶ (wake) ──▶ helper thread: engine.drive(until none pending)
                                                      └─ exits when no future is pending

Maps need no thread (the caller drives); a future must complete even if nobody calls its
``result()``, so the first pending one starts this helper, which drives the engine like any
caller and exits once none is pending.  :class:`FutureCompleter` owns that thread and the count
of pending futures; the queue of submitted calls is the engine's (dispatch reads it first).

Fork and threads: a child forked while another thread runs inherits whatever locks that
thread held (CPython 3.12+ warns about it).  So under fork the helper starts only after
every worker has been forked, and one replaced while the helper runs (after a crash or a
timeout) is forked with that warning silenced: the helper holds no lock a worker needs,
unless a user's future callback is running and holding one at that very moment.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING

from parallelkit._map.job import Job, PoolBrokenError
from parallelkit._proc.forkserver import start_forkserver
from parallelkit._util import threads

if TYPE_CHECKING:
    from parallelkit._map.engine import Engine


class FutureCompleter:
    """Pending futures of an engine and the thread that completes them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.pending = 0  # submitted calls not settled yet (under the engine's mutex)
        self.running = False  # the thread runs (set under the mutex, cleared as it exits)
        self.thread: threading.Thread | None = None
        self.close_when_idle = False  # shut the engine down once no future is pending

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
