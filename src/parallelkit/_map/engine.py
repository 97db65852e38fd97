"""The supervisor behind every parallel map: N worker processes, each on its own pipe.

::

    caller thread(s) ──Job──▶ Engine ──TASK──▶ worker 0 ─┐   each worker: one duplex pipe and
                               ▲  │   ──TASK──▶ worker 1  │   one progress slot in shared
                               │  └── wait(pipes + sentinels + wake-up) ◀─┘ memory
                               └── results, per chunk, into the job's reorder buffer

There is no supervisor thread for maps: whichever thread needs a result *drives* (dispatches
chunks to idle workers, then waits on every pipe and every process sentinel at once with
``multiprocessing.connection.wait``).  Only ``WorkerPool.submit`` starts a helper thread, to
complete futures nobody is waiting on; it exits when no future is pending.  Because the
engine always knows which chunk each worker holds, and the worker writes the position of the
item it is running into its progress slot, a worker that dies or overruns its timeout is
pinned to the exact item, stopped, and replaced; one that dies before it has taken its chunk
(the slot names the last chunk it received whole) blames nothing, and the chunk runs
elsewhere.  No send blocks the engine: what a worker's pipe does not take waits in that
worker's outbox and is written as the pipe drains, while every pipe is still read.

Fork and threads: a child forked while another thread runs inherits whatever locks that
thread held (CPython 3.12+ warns about it).  So under fork the futures helper starts only
after every worker has been forked, and one replaced while the helper runs (after a crash or a
timeout) is forked with that warning silenced: the helper holds no lock a worker needs,
unless a user's future callback is running and holding one at that very moment.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import select
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any, Final

from parallelkit._map import worker as W
from parallelkit._map.job import Chunk, Job, PoolBrokenError
from parallelkit._proc import child, slots
from parallelkit._proc.lifecycle import (
    bootstrap_options,
    check_main_importable,
    describe_exit,
    signal_name,
    start_child,
    start_forkserver,
    stop_processes,
    wait_reapable,
    waiting_on_children,
)
from parallelkit._util import fuzz as _fuzz
from parallelkit._util import threads
from parallelkit._util.types import StartMethod
from parallelkit._wire import direct as _direct
from parallelkit._wire.arena import MAGIC, ArgArena, ResultReader, remove_leftovers
from parallelkit._wire.codec import (
    ExceptionRecord,
    FunctionCache,
    dumps,
    rebuild_exception,
)
from parallelkit.errors import (
    SerializationError,
    SerializedWhat,
    TaskTimeoutError,
    WorkerCrashedError,
)

WATCH_POLL: Final = 0.25  # seconds, at most, between two calls of the watchers (stall checks)
# A worker may hold a 2nd chunk (sent while it runs the 1st) only if both fit in its pipe's
# buffer together, so that the 2nd waits in the pipe rather than in our outbox.  (Not for
# safety: no send ever blocks us, see Engine._post.)  The buffer is widened to PIPE_BUFFER
# where the kernel allows (Linux caps it at net.core.wmem_max) and measured;
# PIPELINE_LIMIT where it cannot be.
PIPELINE_LIMIT: Final = 32 * 1024
PIPE_BUFFER: Final = 1024 * 1024
PIPELINE_SECONDS: Final = 0.005  # ... and if its chunk takes about this long or less
STARTUP_DEATHS_LIMIT: Final = 5  # workers dying before any result, per worker slot...
STARTUP_DEATHS_SECONDS: Final = 0.5  # ...for at least this long, and the pool gives up
UNTAKEN_RETRIES: Final = 3  # times a chunk is sent again after workers died before taking it
_fn_ids = itertools.count(1)


class _Worker:
    __slots__ = (
        "born",
        "busy",
        "chunks",
        "conn",
        "dead",
        "fns",
        "head_since",
        "hung_up",
        "killed_for",
        "out",
        "pid",
        "pipe_room",
        "process",
        "results",
        "sentinel",
        "slot",
        "sock",
        "stopping",
        "tasks_done",
    )

    def __init__(self, process: BaseProcess, conn: Connection, slot: int) -> None:
        self.process = process
        self.conn = conn
        self.slot = slot
        self.pid = process.pid
        self.sentinel = process.sentinel
        self.chunks: deque[Chunk] = deque()
        self.fns: dict[int, None] = {}
        self.tasks_done = 0
        self.stopping = False
        self.dead = False
        self.head_since = 0
        self.hung_up = False  # its end of the pipe is closed: wait for its sentinel only
        self.killed_for: BaseException | None = None  # a timeout we killed it for
        self.busy = 0.0  # seconds it spent running chunks, as it measured them
        self.born = time.monotonic()
        self.results: ResultReader | None = None  # its result segments, once it sent some
        # what we send it goes through `sock` (a dup of our end), never blocking: `out`
        # holds what the pipe did not take yet (see Engine._post)
        self.sock: socket.socket | None = None
        with contextlib.suppress(OSError):  # not a socket (another platform): blocking sends
            self.sock = socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
        self.out: deque[memoryview] = deque()
        self.pipe_room = _pipe_room(self.sock)  # bytes it may have unread in the pipe

    def close(self) -> None:
        """Close our end of its pipe; drop what we had not sent it yet."""
        self.out.clear()
        if self.sock is not None:
            self.sock.close()
        self.conn.close()


def _pipe_room(sock: socket.socket | None) -> int:
    """How many bytes we may send ``sock``'s reader ahead of it before the pipe is full.

    A duplex ``Pipe`` is a Unix stream socket pair; on Linux, data waiting to be read counts
    against the *sender's* SO_SNDBUF (the value read back is what the kernel accounts, the
    bytes plus their bookkeeping), so half of it is a safe bound for payload bytes.
    """
    if sock is None or not sys.platform.startswith("linux"):
        return PIPELINE_LIMIT
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 2 * PIPE_BUFFER:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PIPE_BUFFER)
        return max(PIPELINE_LIMIT, sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2)
    except OSError:
        return PIPELINE_LIMIT


# multiprocessing.Connection's framing: a 4-byte big-endian length, or -1 and 8 bytes
_LEN: Final = struct.Struct("!i")
_LONG_LEN: Final = struct.Struct("!iQ")
_SEND_FLAGS: Final = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)
_SMALL: Final = 16 * 1024  # a message this small goes out with its header in one piece
_READABLE: Final = select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL


def _wait(
    objs: list[Any], writers: list[_Worker], timeout: float | None
) -> tuple[list[Any], list[_Worker]]:
    """Wait until one of ``objs`` (connections, file descriptors) is ready to read or the
    pipe of one of ``writers`` has room; ``(readable objs, writable writers)``."""
    if not writers:
        return multiprocessing.connection.wait(objs, timeout), []
    poller = select.poll()
    by_fd: dict[int, Any] = {}
    for obj in objs:
        fd = obj if isinstance(obj, int) else obj.fileno()
        by_fd[fd] = obj
        poller.register(fd, select.POLLIN)
    writer_fds: dict[int, _Worker] = {}
    for w in writers:
        fd = w.conn.fileno()
        writer_fds[fd] = w
        poller.register(fd, select.POLLOUT | (select.POLLIN if fd in by_fd else 0))
    ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
    events = poller.poll(ms)
    readable = [by_fd[fd] for fd, ev in events if fd in by_fd and ev & _READABLE]
    writable = [writer_fds[fd] for fd, ev in events if fd in writer_fds]
    return readable, writable


class Engine:
    """Owns the worker processes and runs jobs on them.  Not public: see ``WorkerPool``."""

    pickles_items = True
    out_of_band = True  # jobs send large buffers through self.arena (_arena)

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
    ) -> None:
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            child.refuse_to_start_in_bootstrap()
        check_main_importable(start_method)  # before anything: no child could start
        self.context = context
        self.start_method = start_method
        self.max_workers = max_workers
        self.max_tasks_per_worker = max_tasks_per_worker
        # one_shot: the engine of one run_parallel / imap_parallel call; a worker with
        # nothing left to run is told to exit at once (its exit overlaps the others' work)
        self.one_shot = one_shot
        self.init_payload: bytes | None = None
        if initializer is not None:
            from parallelkit._wire.codec import dump_function  # noqa: PLC0415

            dump_function(initializer, what="initializer", by_value=start_method != "fork")
            try:
                self.init_payload = dumps((initializer, tuple(initargs)))
            except Exception as exc:
                raise SerializationError(
                    f"cannot send initargs to worker processes: {type(exc).__name__}: {exc}",
                    what="initializer",
                ) from exc
        # fork: the function (and the input) are inherited by the workers, never pickled
        self.inherited_fn: Callable[..., object] | None = None
        self.inherited_fn_id = 0
        self.inherited_items: Sequence[Any] | None = None
        if inherit is not None and start_method == "fork":
            self.inherited_fn, self.inherited_items = inherit
            self.inherited_fn_id = next(_fn_ids)
        # (id, payload) of each function sent, for as long as the function lives (weakly)
        self.functions: FunctionCache[tuple[int, bytes]] = FunctionCache()
        # the progress slots: what each worker is passed, and our view of them
        self.slots: slots.ProgressSlots | None = None
        self.progress: Any
        if start_method == "fork" or hasattr(os, "memfd_create"):
            self.slots = slots.ProgressSlots(
                slots.SLOT_WORDS * max_workers, inherited=start_method == "fork"
            )
            self.progress = self.slots.for_child
            self.words = memoryview(self.slots.mm).cast("B").cast("q")
        else:  # no memfd (not Linux): a RawArray
            import ctypes  # noqa: PLC0415

            self.progress = context.RawArray(ctypes.c_int64, slots.SLOT_WORDS * max_workers)
            self.words = memoryview(self.progress).cast("B").cast("q")
        self.workers: list[_Worker] = []
        self.free_slots = list(range(max_workers - 1, -1, -1))
        self.jobs: list[Job] = []  # map jobs, asked for chunks in turn
        self.future_queue: deque[Job] = deque()  # submitted calls, first come first served
        self.startup_deaths = 0
        self.first_startup_death = 0.0
        self.broken: BaseException | None = None
        self.closed = False
        self.mutex = threading.Lock()
        self.progressed = threading.Condition(self.mutex)
        self.driver: int | None = None
        self.helper_thread: threading.Thread | None = None
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self._rr = 0
        # WorkerPool.submit: futures, and the helper thread that completes them
        self.pending_futures = 0
        self.helper_running = False
        self.close_when_idle = False
        self.deferred: list[Callable[[], object]] = []
        self.changes = 0  # bumped whenever a job gets a result or an error
        self.released = False
        # parallelkit._map.stats: per-call checks run after each step (stall diagnosis), and
        # (pid, items, busy seconds, lifetime seconds) of the workers that have exited
        self.watchers: list[Callable[[], None]] = []
        self.retired: list[tuple[int | None, int, float, float]] = []
        self.arena: ArgArena | None = None  # made when a chunk first has a large buffer
        self.direct = _direct.enabled()  # may copy results out of workers (_direct)
        if start_method == "fork":
            # workers that create result segments register them with *our* tracker (so
            # that they go if we are SIGKILLed), not with one each of them would start
            from multiprocessing import resource_tracker  # noqa: PLC0415

            resource_tracker.ensure_running()

    # ---------------------------------------------------------------- functions
    def register_function(self, fn: Callable[..., object]) -> tuple[int, bytes]:
        if fn is self.inherited_fn:
            return self.inherited_fn_id, b""
        known = self.functions.get(fn)
        if known is not None:
            return known
        from parallelkit._wire.codec import dump_function  # noqa: PLC0415

        payload = dump_function(fn, by_value=self.start_method != "fork")
        fn_id = next(_fn_ids)
        self.functions.put(fn, (fn_id, payload))
        return fn_id, payload

    # ---------------------------------------------------------------- workers
    def _spawn(self) -> _Worker | None:
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
                self._startup_death(None, None)
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

    def _start_worker(self, slot: int) -> _Worker:
        self.words[slot * slots.SLOT_WORDS + slots.POS] = slots.POS_STARTING
        self.words[slot * slots.SLOT_WORDS + slots.TAKEN] = 0
        fork = self.start_method == "fork"
        inherited = None
        if fork and self.inherited_fn is not None:
            inherited = ({self.inherited_fn_id: self.inherited_fn}, self.inherited_items)
        parent_end, child_end = self.context.Pipe(duplex=True)
        started: list[_Worker] = []

        def record(process: BaseProcess) -> None:
            worker = _Worker(process, parent_end, slot)
            if self.inherited_fn is not None and fork:
                worker.fns[self.inherited_fn_id] = None
            self.workers.append(worker)
            started.append(worker)

        try:
            start_child(
                self.context,
                self.start_method,
                W.pool_worker,
                args=(child_end, self.progress, slot),
                kwargs={
                    **bootstrap_options(self.start_method),
                    "init_payload": self.init_payload,
                    "fast_exit": self.start_method == "spawn",
                    "inherited": inherited,
                    "parent_end": parent_end if fork else None,
                },
                name=f"parallelkit-worker-{slot}",
                on_started=record,
                # The only other thread is our futures helper: see the docstring.
                threads_ok=self._our_threads_alive(),
            )
        except BaseException:
            if not started:
                parent_end.close()
            child_end.close()
            raise
        child_end.close()
        return started[0]

    def _our_threads_alive(self) -> bool:
        return self.helper_thread is not None and self.helper_thread.is_alive()

    # ---------------------------------------------------------------- dispatch
    def _send(self, worker: _Worker, chunk: Chunk) -> bool:
        """Send ``chunk``; False (and the chunk queued again) if the arena has no room
        for its buffers until a worker answers."""
        job = chunk.job
        arena_spec = b""
        if chunk.buffers:
            if self.arena is None:
                self.arena = ArgArena(self.max_workers)
            try:
                placed = self.arena.put(chunk.buffers)
            except OSError:  # no room in /dev/shm: this job sends its buffers in band
                placed = None
                job.out_of_band = False
                chunk.buffers = None
                chunk.payload = job.dump_in_band(chunk)
            if chunk.buffers is not None:
                if placed is None:
                    self.retry(chunk)
                    return False
                arena_spec, chunk.region = placed
        fn_payload = b""
        if job.fn_id not in worker.fns:
            fn_payload = job.fn_payload
            worker.fns[job.fn_id] = None
            if len(worker.fns) > W.FN_CACHE_SIZE:
                del worker.fns[next(iter(worker.fns))]
        flags = (
            job.flags
            | (W.INHERITED_ITEMS if chunk.items is None else 0)
            | (W.TRACKED if chunk.tracked else 0)
            | (W.ARENA if arena_spec else 0)
            | (W.DIRECT if self.direct and not arena_spec else 0)
        )
        header = W.HEADER.pack(
            W.TASK, chunk.cid, job.fn_id, flags, len(fn_payload), chunk.start, chunk.stop
        )
        payload = chunk.payload or b""
        if not worker.chunks:
            worker.head_since = time.monotonic_ns()
        worker.chunks.append(chunk)
        job.in_flight += 1
        # if it has died, its sentinel tells, and the chunk (not taken) runs elsewhere
        self._post(worker, b"".join((header, fn_payload, arena_spec, payload)))
        return True

    def _post(self, w: _Worker, data: bytes) -> None:
        """Send ``data`` to ``w`` as one message, without ever blocking: what its pipe does
        not take now waits in ``w.out``, written as the pipe drains (:meth:`step` waits
        for that as well).  A blocking send could wait for ever on a worker that is not
        reading -- itself blocked sending us a large result -- while we did not read."""
        n = len(data)
        if w.sock is None:  # pragma: no cover - not Linux: the old blocking way
            with contextlib.suppress(OSError):
                w.conn.send_bytes(data)
            return
        head = _LEN.pack(n) if n <= 0x7FFFFFFF else _LONG_LEN.pack(-1, n)
        if n <= _SMALL:
            w.out.append(memoryview(head + data))
        else:
            w.out.append(memoryview(head))
            w.out.append(memoryview(data))
        if len(w.out) <= 2:  # nothing older waits: try now
            self._flush(w)

    def _flush(self, w: _Worker) -> None:
        """Write what the pipe to ``w`` takes now of what waits in ``w.out``."""
        out, sock = w.out, w.sock
        assert sock is not None
        while out:
            view = out[0]
            try:
                sent = sock.send(view, _SEND_FLAGS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # it has died: its sentinel tells
                out.clear()
                return
            if sent < len(view):
                out[0] = view[sent:]
                return  # the pipe is full
            out.popleft()

    def _capacity(self, worker: _Worker) -> bool:
        if worker.stopping or worker.dead or worker.killed_for is not None:
            return False
        limit = self.max_tasks_per_worker
        if limit is not None:  # a recycled worker holds one chunk at a time
            return not worker.chunks and worker.tasks_done < limit
        if not worker.chunks:
            return True
        if len(worker.chunks) >= 2:
            return False
        head = worker.chunks[0]
        per_item = head.job.seconds_per_item
        if per_item is not None and per_item * (head.stop - head.start) > PIPELINE_SECONDS:
            return False  # long chunks: hand out the next one when a worker is free
        # the next chunk is about as large as this one (checked again in _dispatch_chunks)
        return 2 * len(head.payload or b"") <= worker.pipe_room

    @staticmethod
    def _fits(worker: _Worker, chunk: Chunk) -> bool:
        """Can ``chunk`` wait in ``worker``'s pipe behind the chunks it holds?"""
        held = sum(len(c.payload or b"") for c in worker.chunks)
        return held + len(chunk.payload or b"") + 4096 <= worker.pipe_room

    def _next_chunk(self) -> Chunk | None:
        while self.future_queue:
            chunk = self.future_queue.popleft().next_chunk()
            if chunk is not None:
                return chunk
        # a snapshot: asking a job for a chunk may settle it and remove it from self.jobs
        jobs = list(self.jobs)
        n = len(jobs)
        for k in range(n):
            job = jobs[(self._rr + k) % n]
            if job.cancelled:  # closed from another thread, or by the garbage collector
                self.abandon(job)
                continue
            chunk = job.next_chunk()
            if chunk is not None:
                self._rr = (self._rr + k + 1) % n
                return chunk
        return None

    def _dispatch(self) -> None:
        self._dispatch_chunks()
        if self.one_shot:
            self._stop_finished_workers()

    def _stop_finished_workers(self) -> None:
        """The input is used up: every worker is told to exit after the chunks it holds.

        The STOP waits in the worker's pipe behind its chunks, so a busy worker exits as
        soon as it has sent its last results, without waiting for us to answer them.  (A
        chunk to run again after a crash, later, gets a new worker.)
        """
        if self.future_queue or self.broken is not None:
            return
        for job in self.jobs:
            if not job.exhausted or job.retries:
                return
        for w in self.workers:
            if not w.stopping and not w.dead and w.killed_for is None:
                w.stopping = True
                if _fuzz.ENABLED:
                    _fuzz.point("engine.before_stop")
                self._post(w, W.HEADER.pack(W.STOP, 0, 0, 0, 0, 0, 0))
                if _fuzz.ENABLED:
                    _fuzz.point("engine.after_stop")

    def _dispatch_chunks(self) -> None:
        if self.broken is not None:
            return
        # first, idle workers; then a second (small) chunk to busy ones to hide latency
        for depth in (0, 1):
            for worker in list(self.workers):
                while len(worker.chunks) <= depth and self._capacity(worker):
                    chunk = self._next_chunk()
                    if chunk is None:
                        return
                    if worker.chunks and not self._fits(worker, chunk):
                        self.retry(chunk)  # the next idle worker takes it
                        return
                    if not self._send(worker, chunk):
                        return
            while len(self.workers) < self.max_workers and depth == 0:
                chunk = self._next_chunk()
                if chunk is None:
                    return
                try:
                    spawned = self._spawn()
                except BaseException:
                    self.retry(chunk)
                    raise
                if spawned is None:
                    if not chunk.job.cancelled and chunk.job.error is None:
                        self.retry(chunk)
                    return
                if not self._send(spawned, chunk):
                    return

    # ---------------------------------------------------------------- events
    def _wait_objects(self) -> list[Any]:
        objs: list[Any] = [self.wake_r]
        for w in self.workers:
            if not w.hung_up:
                objs.append(w.conn)
            objs.append(w.sentinel)
        return objs

    def _next_deadline(self) -> float | None:
        """Seconds until the earliest item timeout (None: no timeouts pending)."""
        now = time.monotonic_ns()
        best: float | None = None
        for w in self.workers:
            if not w.chunks or w.killed_for is not None:
                continue
            job = w.chunks[0].job
            if job.timeout is None:
                continue
            started = max(self.words[w.slot * slots.SLOT_WORDS + slots.STARTED_NS], w.head_since)
            left = (started - now) / 1e9 + job.timeout
            best = left if best is None else min(best, left)
        return best

    def step(self, timeout: float | None, done: Callable[[], bool] = lambda: False) -> None:
        """Dispatch, wait once for any event (mutex released meanwhile), handle events.

        The wait has no timeout of its own: every change of state that a waiter can be
        waiting for is an event on a pipe, a sentinel or the wake-up pipe -- or happens
        in the dispatch right before the wait, which is why ``done`` is asked again there.
        """
        changes = self.changes
        self._dispatch()
        if self.changes != changes or self.deferred or done():
            return  # dispatching itself settled something (an item that cannot be sent,
            # the input found empty after every result was in)
        deadline = self._next_deadline()
        if deadline is not None:
            timeout = max(0.0, deadline) if timeout is None else min(timeout, max(0.0, deadline))
        killing = [w for w in self.workers if w.killed_for is not None]
        if killing:
            timeout = 0.05 if timeout is None else min(timeout, 0.05)
        if self.watchers:
            timeout = WATCH_POLL if timeout is None else min(timeout, WATCH_POLL)
        objs = self._wait_objects()
        writers = [w for w in self.workers if w.out and not w.hung_up]
        self.mutex.release()
        try:
            with waiting_on_children():
                ready, writable = _wait(objs, writers, timeout)
        finally:
            self.mutex.acquire()
        for w in writable:
            if not w.dead:
                self._flush(w)
        if self.closed:  # shut down by another thread while we waited
            self._release_locked()
            return
        if self.wake_r in ready:
            try:
                os.read(self.wake_r, 4096)
            except BlockingIOError:  # pragma: no cover
                pass
        ready_conns = {id(o) for o in ready if not isinstance(o, int)}
        ready_fds = {o for o in ready if isinstance(o, int)}
        for w in list(self.workers):
            if w.dead:
                continue
            if id(w.conn) in ready_conns:
                self._drain(w)
            if w.sentinel in ready_fds:
                self._on_exit(w)
        self._check_timeouts()
        for watch in self.watchers:
            watch()
        self._dispatch()

    def _drain(self, w: _Worker) -> None:
        """Read every message the worker has sent."""
        try:
            while not w.dead and w.conn.poll():
                if _fuzz.ENABLED:
                    _fuzz.point("engine.before_read")
                data = w.conn.recv_bytes()
                self._on_message(w, data)
        except (EOFError, OSError):
            # Closed (every message before the close was read): the sentinel reports the
            # exit.  Under forkserver that comes a little later (the server reaps the
            # worker and then writes it), and a closed pipe is always "ready": waiting on it
            # meanwhile would spin.
            w.hung_up = True

    def _on_message(self, w: _Worker, data: bytes) -> None:
        chunk = w.chunks[0] if w.chunks else None
        try:
            if data[:4] == _direct.MAGIC_DIRECT:
                msg = self._direct_message(w, chunk, data)
                if msg is None:
                    return  # the worker answers again in band, or has died
            elif data[:4] == MAGIC:
                msg = self._arena_message(w, chunk, data)
            else:
                if chunk is not None and chunk.region is not None:
                    self._release_region(chunk, kept=False)
                msg = pickle.loads(data)
        except (Exception, SystemExit) as exc:  # a result's __reduce__ may even sys.exit()
            if chunk is None:
                return
            w.chunks.popleft()
            self._chunk_done(w, chunk)
            self._blame_or_split(chunk, "result", "cannot be unpickled here", exc)
            return
        kind = msg[0]
        if kind == W.INIT_FAILED:
            record: ExceptionRecord = msg[1]
            self._break(
                rebuild_exception(record, where=f"in the initializer of worker pid {w.pid}")
            )
            return
        if chunk is None or msg[1] != chunk.cid:  # pragma: no cover - a bug, never a hang
            self._break(
                PoolBrokenError(
                    f"internal error: worker pid {w.pid} answered chunk {msg[1]}, "
                    f"expected {None if chunk is None else chunk.cid}"
                )
            )
            return
        w.chunks.popleft()
        w.head_since = time.monotonic_ns()
        self._chunk_done(w, chunk)
        job = chunk.job
        self.startup_deaths = 0
        if kind == W.DONE:
            _, _, results, records, seconds = msg
            errors = None
            if records:
                errors = [
                    (pos, self._rebuild(rec, chunk.start + pos, w.pid)) for pos, rec in records
                ]
            w.busy += seconds
            job._adapt(len(results), seconds)
            job.complete(chunk.start, results, errors)
        else:  # CHUNK_FAILED: the function or the items failed to unpickle in the worker
            _, _, what, rec = msg
            cause = rebuild_exception(rec, where=f"in worker pid {w.pid}")
            if what == "function":
                w.fns.pop(job.fn_id, None)
                error = SerializationError(
                    f"the worker cannot unpickle the function: {type(cause).__name__}: {cause}",
                    what="function",
                )
                error.__cause__ = cause
                job.fail(error)
            else:
                self._blame_or_split(chunk, "argument", "cannot be unpickled in the worker", cause)
        self._maybe_retire(w)

    def _arena_message(self, w: _Worker, chunk: Chunk | None, data: bytes) -> Any:
        """A reply with result buffers in the worker's segment, or a kept flag: let go of
        the chunk's region, then unpickle onto views of the worker's segment."""
        if w.results is None:
            w.results = ResultReader()
        kept, payload, buffers = w.results.load(data)
        if chunk is not None and chunk.region is not None:
            self._release_region(chunk, kept=kept)
        return pickle.loads(payload, buffers=buffers)

    def _direct_message(self, w: _Worker, chunk: Chunk | None, data: bytes) -> Any:
        """A reply whose large buffers are still in the worker (no room in its shared
        memory): copy them out, tell the worker it may go on, unpickle onto the copies
        (``None``: the worker was asked to send it again in band, or is gone)."""
        buffers = None
        try:
            specs, payload = _direct.parse(data)
            if self.direct:
                buffers = _direct.read(w.pid or 0, specs)
        except _direct.Unreadable as exc:
            if exc.refused:  # not allowed here: no more direct replies in this pool
                self.direct = False
        except Exception:  # no memory for the copies (MemoryError, ENOMEM): in band
            buffers = None
        finally:  # always answered: the worker waits for this before it does anything
            answer = _direct.ACK_OK if buffers is not None else _direct.ACK_RESEND
            self._post(w, W.HEADER.pack(W.ACK, 0, 0, answer, 0, 0, 0))
        if buffers is None:
            return None
        return pickle.loads(payload, buffers=buffers)

    def _release_region(self, chunk: Chunk, *, kept: bool) -> None:
        region, chunk.region = chunk.region, None
        if self.arena is not None:
            self.arena.release(region, kept=kept)
        if kept:
            chunk.job.note_kept()

    def _blame_or_split(
        self, chunk: Chunk, what: SerializedWhat, problem: str, cause: BaseException
    ) -> None:
        """A chunk failed to (un)pickle as a whole: blame its item if it has only one,
        otherwise run its items one by one to find the culprit."""
        if chunk.stop - chunk.start > 1:
            chunk.job.split_around(chunk, 0, None)
            return
        subject = f"the result of item {chunk.start}" if what == "result" else f"item {chunk.start}"
        error = SerializationError(
            f"{subject} {problem}: {type(cause).__name__}: {cause}",
            what=what,
            item_index=chunk.start,
        )
        error.__cause__ = cause
        chunk.job.split_around(chunk, 0, error)

    def _rebuild(self, record: ExceptionRecord, index: int, pid: int | None) -> BaseException:
        exc = rebuild_exception(record, where=f"in worker pid {pid} on item {index}")
        if isinstance(exc, SerializationError) and exc.item_index is None:
            exc.item_index = index
        return exc

    def _chunk_done(self, w: _Worker, chunk: Chunk) -> None:
        chunk.job.in_flight -= 1
        w.tasks_done += chunk.stop - chunk.start

    def _maybe_retire(self, w: _Worker) -> None:
        limit = self.max_tasks_per_worker
        if limit is not None and w.tasks_done >= limit and not w.chunks and not w.stopping:
            w.stopping = True
            self._post(w, W.HEADER.pack(W.STOP, 0, 0, 0, 0, 0, 0))

    def _on_exit(self, w: _Worker) -> None:
        """The worker's process has exited: attribute its chunks, then forget it."""
        if _fuzz.ENABLED:
            _fuzz.point("engine.sentinel_before_messages")
        self._drain(w)
        # The sentinel fired: the child is exiting, or closed its descriptors and runs on
        # (then it is killed).  Not a blocking waitpid, which would wait for ever for that.
        wait_reapable([w.process], time.monotonic() + 5.0)
        if w.process.exitcode is None:
            w.process.kill()
            wait_reapable([w.process], time.monotonic() + 5.0)
        exitcode = w.process.exitcode
        self._forget(w)
        if self.broken is not None:
            return
        if exitcode == child.EXIT_MAIN_GUARD:
            self._break(
                WorkerCrashedError(
                    f"worker pid {w.pid} could not start: the main module starts parallel work "
                    f"when it is imported, and {self.start_method!r} workers import it again. "
                    'Put the code that starts the work under `if __name__ == "__main__":`',
                    pid=w.pid,
                    exitcode=exitcode,
                )
            )
            return
        if not w.chunks:
            if not w.stopping and self.broken is None and w.tasks_done == 0:
                self._startup_death(w, exitcode)
            return
        head = w.chunks.popleft()
        head.job.in_flight -= 1
        for other in reversed(w.chunks):  # pipelined chunks it never started: run elsewhere
            other.job.in_flight -= 1
            if not other.job.cancelled:
                self.retry(other)
        w.chunks.clear()
        job = head.job
        if job.cancelled:
            return
        pos = self.words[w.slot * slots.SLOT_WORDS + slots.POS]
        size = head.stop - head.start
        if w.killed_for is not None:
            job.split_around(head, max(0, min(pos, size - 1)), w.killed_for)
            return
        taken = self.words[w.slot * slots.SLOT_WORDS + slots.TAKEN] == head.cid
        starting = pos == slots.POS_STARTING
        if not taken and (starting or head.untaken < UNTAKEN_RETRIES):
            # It died before it had the chunk whole (at start-up, or idle: killed between
            # two calls): the chunk is blameless and runs elsewhere.  (Deaths at start-up
            # are counted below; a chunk that keeps killing workers as they read it, too
            # large for memory, is blamed after a few.)
            self.retry(head)  # first: giving up below fails the jobs that are queued
            if not starting:
                head.untaken += 1
            elif w.tasks_done == 0:
                self._startup_death(w, exitcode)
            return
        if not taken:
            pos = slots.POS_RECEIVING  # what the slot says is about an earlier chunk
        if pos == slots.POS_UNTRACKED and not head.tracked:
            # it died among tiny items run without noting each one: run the chunk again,
            # noting each, so a crash names its item (an item that crashes every time does)
            head.tracked = True
            self.retry(head)
            return
        if pos in (slots.POS_RECEIVING, slots.POS_SENDING) and size > 1:
            # died unpickling the chunk or pickling its results: run its items one by one
            # to find the culprit
            job.split_around(head, 0, None)
            return
        doing = {slots.POS_RECEIVING: "receiving", slots.POS_SENDING: "sending the result of"}.get(
            pos, "running"
        )
        pos = max(pos, 0)
        index = head.start + pos
        error = WorkerCrashedError(
            f"worker pid {w.pid} {describe_exit(exitcode)} while {doing} item {index}"
            + (" (without sending a result)" if exitcode == 0 else ""),
            item_index=index,
            pid=w.pid,
            exitcode=exitcode,
            signal=signal_name(exitcode),
        )
        job.split_around(head, pos, error)

    def _startup_death(self, w: _Worker | None, exitcode: int | None) -> None:
        # Give up only on a run of deaths that is both long and lasting: a broken
        # initializer, not a passing storm (signals sent to the whole process group).
        now = time.monotonic()
        if self.startup_deaths == 0:
            self.first_startup_death = now
        self.startup_deaths += 1
        if (
            self.startup_deaths >= STARTUP_DEATHS_LIMIT * self.max_workers
            and now - self.first_startup_death >= STARTUP_DEATHS_SECONDS
        ):
            self._break(
                WorkerCrashedError(
                    "worker processes keep dying at start-up (last: "
                    + (
                        "one that died before it could be handed its work"
                        if w is None
                        else f"pid {w.pid} {describe_exit(exitcode)}"
                    )
                    + "); is the initializer or the environment killing them?",
                    pid=None if w is None else w.pid,
                    exitcode=exitcode,
                    signal=signal_name(exitcode),
                )
            )

    def _forget(self, w: _Worker) -> None:
        w.dead = True
        if w in self.workers:
            self.workers.remove(w)
            self.free_slots.append(w.slot)
            self.retired.append((w.pid, w.tasks_done, w.busy, time.monotonic() - w.born))
        w.close()
        w.process.join(0)
        gone = w.process.exitcode is not None
        if gone:
            w.process.close()
        for chunk in w.chunks:  # a dead worker holds nothing: its regions are free
            if chunk.region is not None:
                self._release_region(chunk, kept=False)
        self._drop_segments(w, gone=gone)

    def _drop_segments(self, w: _Worker, *, gone: bool) -> None:
        """Unmap the worker's result segments; unlink any it left (it has exited)."""
        if w.results is not None:
            w.results.close()
            w.results = None
        if gone and w.pid is not None:
            remove_leftovers(w.pid)

    def _check_timeouts(self) -> None:
        now = time.monotonic_ns()
        for w in self.workers:
            if w.killed_for is not None:
                # SIGTERMed earlier: SIGKILL once the grace is over
                if now - w.head_since > 500_000_000 and w.process.exitcode is None:
                    w.process.kill()
                continue
            if not w.chunks:
                continue
            head = w.chunks[0]
            job = head.job
            if job.timeout is None:
                continue
            slot = w.slot * slots.SLOT_WORDS
            if self.words[slot + slots.TAKEN] != head.cid:
                # not received yet (the worker is starting, in its initializer, or still
                # reading an earlier chunk): no item of it runs, none is late
                continue
            started = max(self.words[slot + slots.STARTED_NS], w.head_since)
            if (now - started) / 1e9 < job.timeout:
                continue
            pos = self.words[slot + slots.POS]
            index = head.start + max(pos, 0)
            w.killed_for = TaskTimeoutError(
                f"item {index} ran longer than its timeout of {job.timeout:g} s; "
                f"its worker (pid {w.pid}) was stopped",
                item_index=index,
                timeout=job.timeout,
            )
            w.head_since = now  # from now on: the grace before SIGKILL
            w.process.terminate()

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
        if self.released:
            return
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    def _break(self, exc: BaseException) -> None:
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
        self.mutex.release()
        try:
            for callback in callbacks:
                callback()
        finally:
            self.mutex.acquire()

    def defer(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` outside the mutex after this step (completing a future)."""
        self.deferred.append(callback)

    # ---------------------------------------------------------------- futures
    def submit_future(self, job: Job) -> None:
        """Queue a submitted call; make sure a thread is driving to complete it."""
        with self.mutex:
            if self.closed:
                raise RuntimeError("cannot schedule new futures after shutdown()")
            if self.broken is not None:
                raise PoolBrokenError("the pool is broken") from self.broken
            self.future_queue.append(job)
            self.pending_futures += 1
            if self.helper_running:
                self.wake()
                return
            if self.start_method == "fork":
                # fork every worker now, before our thread exists (see the module docstring)
                while len(self.workers) < self.max_workers:
                    self._spawn()  # never None: that is only for forkserver
            elif self.start_method == "forkserver":
                start_forkserver()  # from this thread, with its signal mask (see below)
            # it never takes a Ctrl-C meant for the main thread (see threads.THREAD_BLOCKED)
            thread = threads.quiet_thread(self._complete_futures, name="parallelkit-futures")
            self.helper_thread = thread
            try:
                thread.start()
            finally:  # even if a Ctrl-C comes now: running if and only if started
                self.helper_running = thread.ident is not None

    def future_done(self, job: Job) -> None:
        self.pending_futures -= 1

    def _complete_futures(self) -> None:
        def idle() -> bool:
            if self.pending_futures <= 0 or self.closed:
                self.helper_running = False
                return True
            return False

        try:
            self.drive(idle)
        except BaseException:  # the pool was torn down under us: futures already failed
            with self.mutex:
                self.helper_running = False
        if self.close_when_idle:
            self.shutdown(graceful=True)

    def cancel_pending_futures(self) -> None:
        with self.mutex:
            queued, self.future_queue = self.future_queue, deque()
            for job in queued:
                if getattr(job, "started", True) is False:
                    job.cancel()
                else:
                    self.future_queue.append(job)  # running, but waiting to be re-run
        self.drive(lambda: True)  # run the deferred cancellations

    def shutdown_when_idle(self) -> None:
        with self.mutex:
            busy = self.pending_futures > 0 and self.helper_running
            if busy:
                self.close_when_idle = True
        if not busy:
            self.shutdown(graceful=True)

    # ---------------------------------------------------------------- shutdown
    def _abort_locked(self, cause: BaseException) -> None:
        """Something escaped the event loop: kill everything, fail every job with it.

        An ``Exception`` (a worker that could not be started) is what every waiting job
        and future gets; Ctrl-C and the like become :class:`PoolBrokenError`.
        """
        if isinstance(cause, Exception):
            self._break(cause)
        else:
            self._break(
                PoolBrokenError(
                    f"the pool was interrupted ({type(cause).__name__}) and its workers stopped"
                )
            )
        workers, self.workers = self.workers, []
        stop_processes([w.process for w in workers], join_timeout=0)
        for w in workers:
            w.dead = True
            w.close()
            self._drop_segments(w, gone=True)
        self.progressed.notify_all()

    def shutdown(self, *, graceful: bool, join_timeout: float = 5.0) -> None:
        """Stop every worker (STOP and join, or kill at once) and release everything."""
        with self.mutex:
            if self.closed and not self.workers:
                self._run_deferred_locked()
                return
            self.closed = True
            for job in self._all_jobs():
                job.cancel()
            self.future_queue.clear()
            workers, self.workers = self.workers, []
            if graceful:
                for w in workers:
                    if w.chunks or w.stopping or w.out:
                        continue
                    self._post(w, W.HEADER.pack(W.STOP, 0, 0, 0, 0, 0, 0))
            # busy: running a chunk, or not reading what we sent it (not even the STOP)
            busy = [w for w in workers if w.chunks or w.out]
            idle = [w for w in workers if not (w.chunks or w.out)]
            for w in workers:
                w.dead = True
            self.wake()
        stop_processes([w.process for w in busy], join_timeout=0)
        stop_processes([w.process for w in idle], join_timeout=join_timeout if graceful else 0)
        with self.mutex:
            for w in workers:
                w.close()
                self._drop_segments(w, gone=True)
            if self.driver is None:
                self._release_locked()
            self._run_deferred_locked()

    def _release_locked(self) -> None:
        """Close the wake-up pipe and the progress view (once no thread is driving)."""
        if self.released:
            return
        self.released = True
        self.inherited_fn = self.inherited_items = None  # the caller's: not ours to keep
        if self.arena is not None:
            self.arena.close()
            self.arena = None
        for fd in (self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.words.release()
        if self.slots is not None:
            self.slots.close()
