"""Handing chunks to workers: which worker gets which chunk, and the TASK message it gets.

::

    engine.future_queue ─┐                      ┌─ idle worker:  TASK ──▶ stream.post
    engine.jobs (in turn)┴─ next_chunk() ──send()┤   busy worker: a 2nd small chunk behind the
                                   │             └─   1st, if both fit in its pipe
                                   └─ large buffers ──▶ the arena (a region per chunk)

The :class:`Dispatcher` owns the argument arena (made when a chunk first has a large buffer;
a chunk's region is freed by :meth:`Dispatcher.release_region` once its worker answered or
died) and whose turn it is among the engine's jobs (``job.Turns``, as in the other
backends' driver).  The engine owns the workers and the job lists it reads; starting a
worker for a chunk is asked of the engine.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from parallelkit._map import worker as W
from parallelkit._map.job import Chunk, Turns
from parallelkit._proc.forkserver import want_modules
from parallelkit._util import fuzz as _fuzz
from parallelkit._util import timeline as _timeline
from parallelkit._wire.arena import ArgArena
from parallelkit._wire.layouts import POOL_TASK

if TYPE_CHECKING:
    from parallelkit._map.engine import Engine
    from parallelkit._map.handle import WorkerHandle

PIPELINE_SECONDS: Final = 0.005  # a 2nd chunk goes to a busy worker if its 1st takes this or less


class Dispatcher:
    """Sends the engine's chunks to its workers (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.arena: ArgArena | None = None  # made when a chunk first has a large buffer
        self.turns = Turns()  # the engine's map jobs are asked for chunks in turn

    def dispatch(self) -> None:
        """Send chunks to the workers that can take them; start workers as needed."""
        self._dispatch_chunks()
        if self.engine.one_shot:
            self._stop_finished_workers()

    def release_region(self, chunk: Chunk, *, kept: bool) -> None:
        """Free ``chunk``'s arena region (``kept``: the worker keeps views of it)."""
        region, chunk.region = chunk.region, None
        if self.arena is not None:
            self.arena.release(region, kept=kept)
        if kept:
            chunk.job.note_kept()

    def close(self) -> None:
        """Close the arena (every worker has gone)."""
        if self.arena is not None:
            self.arena.close()
            self.arena = None

    def send(self, worker: WorkerHandle, chunk: Chunk) -> bool:
        """Send ``chunk``; False (and the chunk queued again) if the arena has no room
        for its buffers until a worker answers."""
        job = chunk.job
        arena_spec = b""
        if chunk.buffers:
            if self.arena is None:
                self.arena = ArgArena(self.engine.max_workers)
            if _timeline.ENABLED:
                _timeline.stamp(f"parent.arena_put {chunk.cid}")
            try:
                placed = self.arena.put(chunk.buffers)
            except OSError:  # no room in /dev/shm: this job sends its buffers in band
                placed = None
                job.out_of_band = False
                chunk.buffers = None
                chunk.payload = job.dump_in_band(chunk)
            if chunk.buffers is not None:
                if placed is None:
                    self.engine.retry(chunk)
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
            | (W.DIRECT if self.engine.replies.direct and not arena_spec else 0)
        )
        header = POOL_TASK.pack(job.fn_id, flags, len(fn_payload), chunk.start, chunk.stop)
        payload = chunk.payload or b""
        if not worker.chunks:
            worker.head_since = time.monotonic_ns()
        worker.chunks.append(chunk)
        job.in_flight += 1
        # if it has died, its sentinel tells, and the chunk (not taken) runs elsewhere
        worker.stream.post(W.TASK, chunk.cid, b"".join((header, fn_payload, arena_spec, payload)))
        if _timeline.ENABLED:
            _timeline.stamp(f"parent.task_sent {chunk.cid} to {worker.slot}")
        return True

    def _capacity(self, worker: WorkerHandle) -> bool:  # noqa: PLR0911 - a hot path kept in one frame (a helper call costs more than its branches)
        if worker.stopping or worker.dead or worker.killed_for is not None:
            return False
        limit = self.engine.max_tasks_per_worker
        if limit is not None:  # a recycled worker holds one chunk at a time
            return not worker.chunks and worker.tasks_done < limit
        if not worker.chunks:
            return True
        if len(worker.chunks) >= 2:
            return False
        head = worker.chunks[0]
        if head.job.solo:  # a cancel may stop this worker: nothing else waits in it
            return False
        per_item = head.job.seconds_per_item
        if per_item is not None and per_item * (head.stop - head.start) > PIPELINE_SECONDS:
            return False  # long chunks: hand out the next one when a worker is free
        # the next chunk is about as large as this one (checked again in _dispatch_chunks)
        return 2 * len(head.payload or b"") <= worker.pipe_room

    @staticmethod
    def _fits(worker: WorkerHandle, chunk: Chunk) -> bool:
        """Can ``chunk`` wait in ``worker``'s pipe behind the chunks it holds?"""
        held = sum(len(c.payload or b"") for c in worker.chunks)
        return held + len(chunk.payload or b"") + 4096 <= worker.pipe_room

    def _next_chunk(self, busy: bool = False) -> Chunk | None:
        """The next chunk to send; ``busy``: for a worker that holds a chunk already, which
        a task that may be cancelled never waits behind (it would be running() meanwhile)."""
        engine = self.engine
        queue = engine.future_queue
        while queue and not (busy and queue[0].solo):
            chunk = queue.popleft().next_chunk()
            if chunk is not None:
                return chunk
        return self.turns.next_chunk(engine.jobs, engine.abandon)

    def _stop_finished_workers(self) -> None:
        """The input is used up: every worker is told to exit after the chunks it holds.

        The STOP waits in the worker's pipe behind its chunks, so a busy worker exits as
        soon as it has sent its last results, without waiting for us to answer them.  (A
        chunk to run again after a crash, later, gets a new worker.)
        """
        engine = self.engine
        if engine.future_queue or engine.broken is not None:
            return
        for job in engine.jobs:
            if not job.exhausted or job.retries:
                return
        for w in engine.workers:
            if not w.stopping and not w.dead and w.killed_for is None:
                w.stopping = True
                if _fuzz.ENABLED:
                    _fuzz.point("engine.before_stop")
                w.stream.post(W.STOP, 0, b"")
                if _fuzz.ENABLED:
                    _fuzz.point("engine.after_stop")

    def _dispatch_chunks(self) -> None:  # noqa: PLR0911,PLR0912 - a hot path kept in one frame (a helper call costs more than its branches)
        engine = self.engine
        if engine.broken is not None:
            return
        # first, idle workers; then a second (small) chunk to busy ones to hide latency
        for depth in (0, 1):
            for worker in list(engine.workers):
                while len(worker.chunks) <= depth and self._capacity(worker):
                    chunk = self._next_chunk(busy=bool(worker.chunks))
                    if chunk is None:
                        return
                    if worker.chunks and not self._fits(worker, chunk):
                        engine.retry(chunk)  # the next idle worker takes it
                        return
                    if not self.send(worker, chunk):
                        return
            while len(engine.workers) < engine.max_workers and depth == 0:
                chunk = self._next_chunk()
                if chunk is None:
                    return
                if engine.start_method == "forkserver":  # the server imports them, once
                    want_modules(chunk.job.fn, chunk.items)
                try:
                    spawned = engine.spawn()
                except BaseException:
                    engine.retry(chunk)
                    raise
                if spawned is None:
                    if not chunk.job.cancelled and chunk.job.error is None:
                        engine.retry(chunk)
                    return
                if not self.send(spawned, chunk):
                    return
