"""The supervisor behind every parallel map: N worker processes, each on its own pipe.

::

    caller thread(s) ─Job─▶ drive ─▶ step ─┬─ Dispatcher ──TASK──▶ handle.stream.post ─▶ worker i
    WorkerPool.submit ─▶ FutureCompleter ─┘ ├─ wait_events: pipes, sentinels, outboxes ◀─────┘
                                            ├─ a pipe readable ──▶ Replies ──▶ job.complete
                                            ├─ a sentinel fired ─▶ reap, forget ─▶ Blame
                                            └─ Blame.check_timeouts, watchers, dispatch again

There is no supervisor thread for maps: whichever thread needs a result *drives* (dispatches
chunks to idle workers, then waits on every pipe and every process sentinel at once).  Only
``WorkerPool.submit`` starts a helper thread, to complete futures nobody is waiting on
(:mod:`~parallelkit._map.futures`).  Because the engine always knows which chunk each worker
holds, and the worker writes the position of the item it is running into its progress slot,
a worker that dies or overruns its timeout is pinned to the exact item, stopped, and
replaced (:mod:`~parallelkit._map.blame`); one that dies before it has taken its chunk blames
nothing, and the chunk runs elsewhere.  No send blocks the engine: what a worker's pipe does
not take waits in that worker's outbox (its stream's, :mod:`~parallelkit._wire.stream`) and
is written as the pipe drains, while every pipe is still read.

Who owns what: the :class:`Engine` owns the worker processes (starts, reaps, closes them),
the progress slots, the wake-up pipe, the job lists and the mutex; the
:class:`~parallelkit._map.functions.FunctionRegistry` the pickled functions and the
caller's inherited function and input; each
:class:`~parallelkit._map.handle.WorkerHandle` our end of its pipe, its outbox and its
result-segment reader; the :class:`~parallelkit._map.dispatch.Dispatcher` the argument
arena; :class:`~parallelkit._map.replies.Replies` the choice of direct reads;
:class:`~parallelkit._map.blame.Blame` the start-up death count; the
:class:`~parallelkit._map.futures.FutureCompleter` the futures thread.  The parts run only
under the engine's mutex: by the driving thread, or by a caller holding it (``submit``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any, Final

from parallelkit._map import worker as W
from parallelkit._map.blame import Blame
from parallelkit._map.dispatch import Dispatcher
from parallelkit._map.functions import FunctionRegistry
from parallelkit._map.futures import FutureCompleter
from parallelkit._map.handle import WorkerHandle, wait_events
from parallelkit._map.job import Chunk, Job, PoolBrokenError
from parallelkit._map.replies import Replies
from parallelkit._proc import logs, slots
from parallelkit._proc.lifecycle import (
    check_can_start_children,
    close_process,
    start_child,
    stop_processes,
    wait_reapable,
    waiting_on_children,
)
from parallelkit._proc.wakeup import WakeUpPipe
from parallelkit._util import fuzz as _fuzz
from parallelkit._util import timeline as _timeline
from parallelkit._util.context import child_share
from parallelkit._util.threads import Mutex
from parallelkit._util.types import StartMethod
from parallelkit._wire.arena import ArgArena

WATCH_POLL: Final = 0.25  # seconds, at most, between two calls of the watchers (stall checks)
KILL_POLL: Final = 0.05  # seconds, at most, between two checks of a worker being stopped
REAP_SECONDS: Final = 5.0  # seconds to wait for an exiting worker to become reapable


def _progress_slots(
    context: BaseContext, start_method: StartMethod, max_workers: int
) -> tuple[slots.ProgressSlots | None, Any, memoryview]:
    """The workers' progress slots: ``(the slots, what each worker is passed, our view of
    them as 64-bit words)``."""
    shared = slots.ProgressSlots(slots.SLOT_WORDS * max_workers, inherited=start_method == "fork")
    return shared, shared.for_child, memoryview(shared.mm).cast("B").cast("q")


class Engine:
    """Owns the worker processes and runs jobs on them.  Not public: see ``WorkerPool``.

    The supervisor: it starts, reaps and replaces workers, keeps the jobs, and steps the
    event loop; the functions, sending chunks, reading replies, blaming deaths and timeouts,
    and the futures thread are its parts (see the module docstring).  What is left here is
    one unit on purpose: the state one mutex guards (workers, jobs, ``broken``/``closed``,
    the driving thread) and every transition of it -- drive, step, abort, shutdown,
    release -- which must be read together to see that no thread waits for ever.
    """

    pickles_items = True
    out_of_band = True  # jobs send large buffers through the dispatcher's arena

    def __init__(
        self,
        *,
        context: BaseContext,
        start_method: StartMethod,
        max_workers: int,
        initializer: Callable[..., object] | None,
        initargs: tuple[object, ...],
        max_tasks_per_worker: int | None,
        inherit: tuple[Callable[..., object], Sequence[Any] | None] | None = None,
        one_shot: bool = False,
        forward_logs: bool = True,
        finalizer: Callable[..., object] | None = None,
        finalargs: tuple[object, ...] = (),
    ) -> None:
        check_can_start_children(start_method)  # before anything: no child could start
        self.context = context
        self.start_method = start_method
        self.max_workers = max_workers
        self.max_tasks_per_worker = max_tasks_per_worker
        # one_shot: the engine of one run_parallel / imap_parallel call; a worker with
        # nothing left to run is told to exit at once (its exit overlaps the others' work)
        self.one_shot = one_shot
        # the workers' log sockets, by slot (_proc.logs): None: workers log as they please
        self.log_pipes: dict[int, logs.LogPipe] | None = {} if forward_logs else None
        self.functions = FunctionRegistry(
            start_method=start_method,
            initializer=initializer,
            initargs=initargs,
            inherit=inherit,
            finalizer=finalizer,
            finalargs=finalargs,
        )
        # each worker's share of our CPUs, for work it starts itself (docs/nesting.md)
        self.cpu_share = child_share(max_workers)
        # the progress slots: what each worker is passed (progress), our view of them (words)
        self.slots, self.progress, self.words = _progress_slots(context, start_method, max_workers)
        self.workers: list[WorkerHandle] = []
        self.free_slots = list(range(max_workers - 1, -1, -1))
        self.jobs: list[Job] = []  # map jobs, asked for chunks in turn
        self.future_queue: deque[Job] = deque()  # submitted calls, first come first served
        self.broken: BaseException | None = None
        self.closed = False
        self.mutex = Mutex()
        # any lock with acquire/release works (Condition falls back to them)
        self.progressed = threading.Condition(self.mutex)  # type: ignore[arg-type]
        self.driver: int | None = None
        self.wakeup = WakeUpPipe()
        self.deferred: list[Callable[[], object]] = []
        self.changes = 0  # bumped whenever a job gets a result or an error
        self.released = False
        # parallelkit._map.stats: per-call checks run after each step (stall diagnosis), and
        # (pid, items, busy seconds, lifetime seconds) of the workers that have exited
        self.watchers: list[Callable[[], None]] = []
        self.retired: list[tuple[int | None, int, float, float]] = []
        # the parts (see the module docstring)
        self.dispatcher = Dispatcher(self)
        self.replies = Replies(self)
        self.blame = Blame(self)
        self.futures = FutureCompleter(self)
        if start_method == "fork":
            # workers that create result segments register them with *our* tracker (so
            # that they go if we are SIGKILLed), not with one each of them would start
            from multiprocessing import resource_tracker  # noqa: PLC0415

            resource_tracker.ensure_running()

    # ---------------------------------------------------------------- functions
    def register_function(self, fn: Callable[..., object]) -> tuple[int, bytes]:
        return self.functions.register(fn)

    @property
    def inherited_items(self) -> Sequence[Any] | None:
        """The input the workers inherit (fork, one-shot calls), while the engine runs."""
        return self.functions.inherited_items

    # ---------------------------------------------------------------- workers
    def spawn(self) -> WorkerHandle | None:
        """Start one worker in a free slot; an OSError says that it could not.

        ``None``: the new worker died at once (counted as a start-up death).
        """
        slot = self.free_slots.pop()
        try:
            return self._start_worker(slot)
        except BaseException as exc:
            self.free_slots.append(slot)
            if isinstance(exc, BrokenPipeError) and self.start_method == "forkserver":
                # the server forked it, but it died before it read what to run (a signal):
                # the server reaps it; we count it like any worker dying at start-up
                self.blame.startup_death(None, None)
                return None
            if isinstance(exc, OSError):
                raise OSError(
                    exc.errno,
                    f"parallelkit could not start a worker process: {exc.strerror or exc}",
                ) from exc
            if isinstance(exc, EOFError):  # the forkserver hung up (it ran out of something)
                raise OSError(
                    None,
                    "parallelkit could not start a worker process: the forkserver closed "
                    f"the connection ({type(exc).__name__}: {exc})",
                ) from exc
            raise

    def _start_worker(self, slot: int) -> WorkerHandle:
        self.words[slot * slots.SLOT_WORDS + slots.POS] = slots.POS_STARTING
        self.words[slot * slots.SLOT_WORDS + slots.TAKEN] = 0
        fork = self.start_method == "fork"
        inherited = self.functions.inherited() if fork else None
        parent_end, child_end = self.context.Pipe(duplex=True)
        started: list[WorkerHandle] = []
        log_pipe = logs.LogPipe() if self.log_pipes is not None else None

        def record(process: BaseProcess) -> None:
            worker = WorkerHandle(process, parent_end, slot)
            if inherited is not None:
                worker.fns.update(dict.fromkeys(inherited[0]))
            self.workers.append(worker)
            started.append(worker)
            if log_pipe is not None:
                self.log_pipes[slot] = log_pipe  # type: ignore[index]

        try:
            start_child(
                self.context,
                self.start_method,
                W.pool_loop,
                child_end,
                args=(self.progress, slot, inherited),
                parent_end=parent_end,
                init_payload=self.functions.init_payload,
                report=W.report_startup_failure,
                name=f"parallelkit-worker-{slot}",
                on_started=record,
                # The only other thread is our futures helper: see the docstring.
                threads_ok=self._our_threads_alive(),
                logs=log_pipe,
                identity=(slot, self.max_workers, self.start_method, None, self.cpu_share),
            )
        except BaseException:
            if not started:
                parent_end.close()
                if log_pipe is not None:
                    log_pipe.close()
            child_end.close()
            raise
        child_end.close()
        return started[0]

    def _our_threads_alive(self) -> bool:
        return self.futures.alive()

    def read_logs(self, w: WorkerHandle) -> None:
        """Take the log records ``w`` has sent; the parent's loggers get them outside the
        mutex, before anyone sees a result that came after them (see ``drive``)."""
        if self.log_pipes is None:
            return
        pipe = self.log_pipes.get(w.slot)
        if pipe is not None:
            records = pipe.read()
            if records:
                self.defer(lambda: logs.handle(records))

    def _close_logs(self, w: WorkerHandle) -> None:
        """``w`` has gone: its last records, then its log socket."""
        if self.log_pipes is not None:
            pipe = self.log_pipes.get(w.slot)
            if pipe is not None:
                self.read_logs(w)
                del self.log_pipes[w.slot]
                pipe.close()

    def _forget(self, w: WorkerHandle) -> None:
        w.dead = True
        self._close_logs(w)
        if w in self.workers:
            self.workers.remove(w)
            self.free_slots.append(w.slot)
            self.retired.append((w.pid, w.tasks_done, w.busy, time.monotonic() - w.born))
        w.close()
        w.process.join(0)
        gone = w.process.exitcode is not None
        if gone:
            close_process(w.process)
        for chunk in w.chunks:  # a dead worker holds nothing: its regions are free
            if chunk.region is not None:
                self.dispatcher.release_region(chunk, kept=False)
        w.drop_segments(gone=gone)

    # ---------------------------------------------------------------- jobs
    def add_job(self, job: Job) -> None:
        if self.closed:
            raise RuntimeError("cannot run new work: the pool has been shut down")
        if self.broken is not None:
            raise PoolBrokenError("the pool is broken") from self.broken
        self.jobs.append(job)
        self.wake()

    def retry(self, chunk: Chunk) -> None:
        """Run ``chunk`` again, before anything else its job has."""
        job = chunk.job
        job.retries.appendleft(chunk)
        if job.alone:
            self.future_queue.appendleft(job)

    def _all_jobs(self) -> list[Job]:
        """Every job the engine knows: queued, running on a worker, or making chunks."""
        seen: dict[int, Job] = {}
        for job in (*self.jobs, *self.future_queue):
            seen[id(job)] = job
        for w in self.workers:
            for chunk in w.chunks:
                seen[id(chunk.job)] = chunk.job
        return list(seen.values())

    def abandon(self, job: Job) -> None:
        """Forget ``job``; workers finishing its chunks have their results dropped."""
        if job in self.jobs:
            self.jobs.remove(job)

    def wake(self) -> None:
        """Make a thread waiting in :meth:`drive` look again (from any thread)."""
        self.wakeup.wake()

    def break_pool(self, exc: BaseException) -> None:
        if self.broken is None:
            self.broken = exc
        for job in self._all_jobs():
            job.fail(exc)
        self.jobs.clear()
        self.future_queue.clear()

    def drive(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        """Make progress until ``done()`` (under the mutex) or the timeout; True if done.

        One thread at a time steps the engine; others wait for it to report progress.
        Callbacks deferred by the step (completing futures) run outside the mutex.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.mutex:
            while True:
                if self.deferred:
                    self._run_deferred_locked()
                    continue
                if done():
                    return True
                if self.closed or (
                    self.broken is not None and not self.jobs and not self.future_queue
                ):
                    return done()
                remaining = None
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                if self.driver is None:
                    self.driver = threading.get_ident()
                    try:
                        self.step(remaining, done)
                    except BaseException as exc:
                        self.mutex.hold()  # a Ctrl-C may have landed while it was released
                        self.driver = None
                        self._abort_locked(exc)
                        self._run_deferred_locked()
                        raise
                    finally:
                        self.driver = None
                        self.progressed.notify_all()
                else:
                    self.progressed.wait(remaining)

    def _run_deferred_locked(self) -> None:
        callbacks, self.deferred = self.deferred, []
        try:  # released inside the try: a Ctrl-C right after the release unwinds through hold()
            self.mutex.release()
            for callback in callbacks:
                callback()
        finally:
            self.mutex.hold()

    def defer(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` outside the mutex after this step (completing a future)."""
        self.deferred.append(callback)

    # ---------------------------------------------------------------- events
    def step(self, timeout: float | None, done: Callable[[], bool] = lambda: False) -> None:  # noqa: PLR0912 - the engine's one event step: each event kind is a branch
        """Dispatch, wait once for any event (mutex released meanwhile), handle events.

        The wait has no timeout of its own: every change of state that a waiter can be
        waiting for is an event on a pipe, a sentinel or the wake-up pipe -- or happens
        in the dispatch right before the wait, which is why ``done`` is asked again there.
        """
        changes = self.changes
        if self.log_pipes:  # levels the parent changed reach the workers before a task
            logs.push_levels(self.log_pipes.values())
        self.futures.stops.handle()  # before dispatching: a cancelled task is not sent
        self.dispatcher.dispatch()
        if self.changes != changes or self.deferred or done():
            return  # dispatching itself settled something (an item that cannot be sent,
            # the input found empty after every result was in)
        deadline = self.blame.next_deadline()
        if deadline is not None:
            timeout = max(0.0, deadline) if timeout is None else min(timeout, max(0.0, deadline))
        killing = [w for w in self.workers if w.killed_for is not None]
        if killing:
            timeout = KILL_POLL if timeout is None else min(timeout, KILL_POLL)
        if self.watchers:
            timeout = WATCH_POLL if timeout is None else min(timeout, WATCH_POLL)
        objs: list[Any] = [self.wakeup.fd]
        pipes = self.log_pipes or {}
        for w in self.workers:
            if not w.hung_up:
                objs.append(w.stream)
            objs.append(w.sentinel)
            if w.slot in pipes:
                objs.append(pipes[w.slot])
        writers = [w for w in self.workers if w.stream.out and not w.hung_up]
        try:  # as in _run_deferred_locked
            self.mutex.release()
            with waiting_on_children():
                ready, writable = wait_events(objs, writers, timeout)
        finally:
            self.mutex.hold()
        for w in writable:
            if not w.dead:
                w.stream.flush()
        if self.closed:  # shut down by another thread while we waited
            self._release_locked()
            return
        if self.wakeup.fd in ready:
            self.wakeup.drain()
            self.futures.stops.handle()
        ready_streams = {id(o) for o in ready if not isinstance(o, int)}
        ready_fds = {o for o in ready if isinstance(o, int)}
        for w in list(self.workers):
            if w.dead:
                continue
            if w.slot in pipes and id(pipes[w.slot]) in ready_streams:
                self.read_logs(w)
            if id(w.stream) in ready_streams:
                self.replies.drain(w)
            if w.sentinel in ready_fds:
                self._on_exit(w)
        self.blame.check_timeouts()
        for watch in self.watchers:
            watch()
        self.dispatcher.dispatch()

    def _on_exit(self, w: WorkerHandle) -> None:
        """The worker's process has exited: read what it sent, reap it, forget it, blame."""
        if _fuzz.ENABLED:
            _fuzz.point("engine.sentinel_before_messages")
        self.replies.drain(w)
        self.read_logs(w)  # what it logged last (right before a crash, say)
        # The sentinel fired: the child is exiting, or closed its descriptors and runs on
        # (then it is killed).  Not a blocking waitpid, which would wait for ever for that.
        wait_reapable([w.process], time.monotonic() + REAP_SECONDS)
        if w.process.exitcode is None:
            w.process.kill()
            wait_reapable([w.process], time.monotonic() + REAP_SECONDS)
        exitcode = w.process.exitcode
        if _timeline.ENABLED:
            _timeline.stamp(f"parent.reaped {w.slot}")
        self._forget(w)
        if self.broken is not None:
            return
        self.blame.worker_exited(w, exitcode)

    # ---------------------------------------------------------------- futures
    # WorkerPool's calls, answered by the FutureCompleter (see _map.futures)
    def submit_future(self, job: Job) -> None:
        """Queue a submitted call; make sure a thread is driving to complete it."""
        self.futures.submit(job)

    def future_done(self, job: Job) -> None:
        self.futures.pending -= 1

    @property
    def pending_futures(self) -> int:
        return self.futures.pending

    @property
    def helper_thread(self) -> threading.Thread | None:
        return self.futures.thread

    def cancel_pending_futures(self) -> None:
        self.futures.cancel_pending()

    def shutdown_when_idle(self) -> None:
        self.futures.shutdown_when_idle()

    @property
    def arena(self) -> ArgArena | None:
        """The argument arena (the dispatcher's), if any chunk needed one."""
        return self.dispatcher.arena

    # ---------------------------------------------------------------- shutdown
    def _abort_locked(self, cause: BaseException) -> None:
        """Something escaped the event loop: kill everything, fail every job with it.

        An ``Exception`` (a worker that could not be started) is what every waiting job
        and future gets; Ctrl-C and the like become :class:`PoolBrokenError`.
        """
        if isinstance(cause, Exception):
            self.break_pool(cause)
        else:
            self.break_pool(
                PoolBrokenError(
                    f"the pool was interrupted ({type(cause).__name__}) and its workers stopped"
                )
            )
        workers, self.workers = self.workers, []
        stop_processes([w.process for w in workers], join_timeout=0)
        for w in workers:
            w.dead = True
            self._close_logs(w)
            w.close()
            w.drop_segments(gone=True)
        self.progressed.notify_all()

    def shutdown(self, *, graceful: bool, join_timeout: float = 5.0) -> None:
        """Stop every worker (STOP and join, or kill at once) and release everything.

        Interrupted part-way (a Ctrl-C while it joins the workers, say), it finishes at once
        -- kills what still runs, closes everything -- and lets the interruption go on.  The
        workers a call takes out of the engine are its own: a concurrent shutdown (the
        futures thread's, say) finds none left and only waits for the mutex.
        """
        taken: list[WorkerHandle] = []
        if _timeline.ENABLED:
            _timeline.stamp("parent.shutdown")
        try:
            self._shutdown(taken, graceful=graceful, join_timeout=join_timeout)
        except BaseException:
            self._shutdown(taken, graceful=False, join_timeout=0)
            raise

    def _shutdown(self, taken: list[WorkerHandle], *, graceful: bool, join_timeout: float) -> None:
        with self.mutex:
            if self.closed and not self.workers and not taken:
                if self.driver is None:  # idempotent: a shutdown interrupted before it
                    self._release_locked()
                self._run_deferred_locked()
                return
            self.closed = True
            for job in self._all_jobs():
                job.cancel()
            self.future_queue.clear()
            moving = self.workers
            self.workers = []
            taken.extend(moving)  # (a Ctrl-C lands after this call, not between the two)
            workers = list({id(w): w for w in taken}.values())
            if graceful:
                for w in workers:
                    if w.chunks or w.stopping or w.stream.out:
                        continue
                    w.stream.post(W.STOP, 0, b"")
            # busy: running a chunk, or not reading what we sent it (not even the STOP)
            busy = [w for w in workers if w.chunks or w.stream.out]
            idle = [w for w in workers if not (w.chunks or w.stream.out)]
            for w in workers:
                w.dead = True
            self.wake()
        stop_processes([w.process for w in busy], join_timeout=0)
        stop_processes([w.process for w in idle], join_timeout=join_timeout if graceful else 0)
        with self.mutex:
            for w in workers:
                self._close_logs(w)
                w.close()
                w.drop_segments(gone=True)
            taken.clear()
            if self.driver is None:
                self._release_locked()
            self._run_deferred_locked()

    def _release_locked(self) -> None:
        """Close the wake-up pipe and the progress view (once no thread is driving)."""
        if self.released:
            return
        if _timeline.ENABLED:
            _timeline.stamp("parent.release")
        self.released = True
        self.functions.release()
        self.dispatcher.close()
        self.wakeup.close()
        self.words.release()
        if self.slots is not None:
            self.slots.close()
