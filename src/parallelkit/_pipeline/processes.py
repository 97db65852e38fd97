"""A pipeline run's stage processes: starting them, talking to them, stopping them.

``StageProcesses`` owns, for one run, every stage worker process, the parent's end of
each one's duplex pipe, the writer thread that sends large messages
(:class:`parallelkit._wire.frames.Writer`) and the one ``poll`` object over the pipes, the
processes' sentinels and the source's wake-up pipe.  It is used from the router (the
consumer's thread) only; :func:`kill` is also the run's garbage-collection backstop.
Which batch each worker holds is kept here too (``StageWorker.held``): a crash names it.
"""

from __future__ import annotations

import contextlib
import select
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Final

from parallelkit._pipeline.stage import STOP, report_startup_failure, stage_loop
from parallelkit._proc.lifecycle import (
    leave_if_exiting,
    start_child,
    stop_processes,
    wait_exited,
    waiting_on_children,
)
from parallelkit._proc.logs import LogPipe
from parallelkit._util import fuzz as _fuzz
from parallelkit._util.context import child_share, get_context
from parallelkit._util.types import StartMethod
from parallelkit._wire import frames
from parallelkit._wire.codec import dump_function

__all__ = ("STOP_TIMEOUT", "Stage", "StageProcesses", "StageWorker", "kill")

STOP_TIMEOUT: Final = 5.0  # seconds finished workers get to exit before being terminated
EXIT_VISIBLE: Final = 1.0  # seconds to wait for a dead worker's exit code to be known


@dataclass(frozen=True, slots=True)
class Stage:
    """A stage as the pipeline describes it."""

    kind: int
    fn: Callable[[Any], Any]
    max_workers: int
    name: str
    ordered: bool


class StageWorker:
    """One worker process of a stage, the parent's end of its pipe, the batches it holds."""

    __slots__ = ("conn", "held", "logs", "process", "stage")

    def __init__(
        self, process: BaseProcess, conn: Connection, stage: int, logs: LogPipe | None
    ) -> None:
        self.process = process
        self.conn = conn
        self.stage = stage
        self.held: deque[int] = deque()  # batch numbers sent and not yet answered
        self.logs = logs  # its log socket (_proc.logs), or None


class StageProcesses:
    """The worker processes of every stage of one run."""

    def __init__(
        self, stages: Sequence[Stage], start_method: StartMethod, *, forward_logs: bool = True
    ) -> None:
        self.stages = stages
        self.start_method = start_method
        self.forward_logs = forward_logs
        # given the log records a worker sent (by the run: it knows the batches' items)
        self.on_records: Callable[[StageWorker, list[dict[str, Any]]], None] = _ignore
        self.workers: list[StageWorker] = []
        self.by_stage: list[list[StageWorker]] = [[] for _ in stages]
        self.writer = frames.Writer()
        self._poll: select.poll | None = None

    def payloads(self) -> list[bytes | None]:
        """Each stage's function, pickled to send it (``None``: a fork child inherits it).

        Raises:
            SerializationError: a function cannot be pickled.
        """
        fork = self.start_method == "fork"
        return [None if fork else dump_function(stage.fn) for stage in self.stages]

    def start(self, payloads: Sequence[bytes | None]) -> None:
        """Start every stage's workers (on failure the caller kills those started)."""
        context = get_context(self.start_method)
        # each worker's share of our CPUs, for work it starts itself (docs/nesting.md)
        share = child_share(sum(stage.max_workers for stage in self.stages))
        for index, stage in enumerate(self.stages):
            for number in range(stage.max_workers):
                self._start_worker(context, index, stage, payloads[index], number, share)

    def _start_worker(
        self,
        context: Any,
        index: int,
        stage: Stage,
        payload: bytes | None,
        number: int,
        share: int,
    ) -> None:
        parent_end, child_end = context.Pipe(duplex=True)
        frames.enlarge_buffers(parent_end)
        frames.enlarge_buffers(child_end)
        log_pipe = LogPipe() if self.forward_logs else None

        def record(process: BaseProcess) -> None:
            worker = StageWorker(process, parent_end, index, log_pipe)
            self.workers.append(worker)
            self.by_stage[index].append(worker)

        try:
            start_child(
                context,
                self.start_method,
                stage_loop,
                child_end,
                args=(stage.kind,),
                name=f"parallelkit-stage{index}-{number}",
                parent_end=parent_end,
                fn=stage.fn if payload is None else None,
                fn_payload=payload,
                report=report_startup_failure,
                on_started=record,
                logs=log_pipe,
                identity=(number, stage.max_workers, self.start_method, stage.name, share),
            )
        except BaseException:
            if not any(w.conn is parent_end for w in self.workers):
                parent_end.close()
                if log_pipe is not None:
                    log_pipe.close()
            raise
        finally:
            child_end.close()

    # ---------------------------------------------------------------- sending

    def free_worker(self, stage: int) -> StageWorker | None:
        """An idle worker of ``stage``, else one with a single batch (its reader thread
        takes a second one in at once: see ``_pipeline.stage._read``), else ``None``."""
        best: StageWorker | None = None
        for worker in self.by_stage[stage]:
            held = len(worker.held)
            if held == 0:
                return worker
            if held == 1 and best is None:
                best = worker
        return best

    def send(self, worker: StageWorker, batch: int, message: frames.Parts) -> None:
        """Hand ``batch`` to ``worker``.

        Raises:
            OSError: the worker is dead (its exit code is known by then).
        """
        worker.held.append(batch)
        if _fuzz.ENABLED:
            _fuzz.point("router.before_send")
        try:
            self.writer.send(worker.conn, message)
        except OSError:
            leave_if_exiting()  # killed at interpreter exit (_lifecycle._quiet_exit): quietly
            # it died: its sentinel says how; wait a moment for the exit to be visible
            wait_exited([worker.process], time.monotonic() + EXIT_VISIBLE)
            raise

    # ---------------------------------------------------------------- receiving

    def wait(self, timeout_ms: int | None, wakeup_fd: int | None) -> set[int]:
        """Wait until a pipe, a sentinel or the wake-up pipe is ready; the ready fds."""
        poller = self._poller(wakeup_fd)
        with waiting_on_children():
            return {fd for fd, _ in poller.poll(timeout_ms)}

    def _poller(self, wakeup_fd: int | None) -> select.poll:
        """One poll object for the whole run: every pipe, every sentinel, the wake-up pipe.

        (``multiprocessing.connection.wait`` would build and fill a new selector on every
        call, which costs more than routing a small batch.)
        """
        if self._poll is None:
            self._poll = select.poll()
            fds = [w.conn.fileno() for w in self.workers]
            fds += [w.process.sentinel for w in self.workers]
            fds += [w.logs.fileno() for w in self.workers if w.logs is not None]
            if wakeup_fd is not None:
                fds.append(wakeup_fd)
            for fd in fds:
                self._poll.register(fd, select.POLLIN)
        return self._poll

    def receive(
        self, ready: set[int], handle: Callable[[StageWorker, frames.Parts], None]
    ) -> list[StageWorker]:
        """Pass every message the ``ready`` pipes hold to ``handle``; the dead workers."""
        dead: list[StageWorker] = []
        for worker in self.workers:
            if worker.logs is not None and worker.logs.fileno() in ready:
                self.read_logs(worker)
            if worker.conn.fileno() in ready:
                try:
                    while True:
                        self.read_logs(worker)  # what it logged before the message first
                        handle(worker, frames.recv(worker.conn))
                        if not worker.held or not worker.conn.poll():
                            break
                except (EOFError, OSError):
                    dead.append(worker)
            elif worker.process.sentinel in ready:
                dead.append(worker)
        return dead

    def receive_last(
        self, worker: StageWorker, handle: Callable[[StageWorker, frames.Parts], None]
    ) -> None:
        """``worker`` died: pass on a message it sent before, and wait for its exit code."""
        leave_if_exiting()  # killed at interpreter exit (_lifecycle._quiet_exit): quietly
        self.read_logs(worker)
        if worker.conn.poll() if not worker.conn.closed else False:
            with contextlib.suppress(EOFError, OSError):
                handle(worker, frames.recv(worker.conn))
        wait_exited([worker.process], time.monotonic() + EXIT_VISIBLE)
        self.read_logs(worker)  # what it logged last (right before a crash, say)

    def read_logs(self, worker: StageWorker) -> None:
        """Pass on the log records ``worker`` has sent."""
        if worker.logs is not None:
            records = worker.logs.read()
            if records:
                self.on_records(worker, records)

    # ---------------------------------------------------------------- stopping

    def say_stop(self) -> None:
        """Every item is through: tell each worker to exit, after what it was sent."""
        stop = frames.encode(None, STOP)
        for worker in self.workers:
            with contextlib.suppress(OSError):
                self.writer.send(worker.conn, stop)
        self.writer.close()

    def reap(self) -> None:
        """Wait for the workers told to stop (terminating those that do not)."""
        stop_processes(
            [w.process for w in self.workers], join_timeout=STOP_TIMEOUT, what="pipeline stage"
        )
        for worker in self.workers:  # what they logged after their last batch
            self.read_logs(worker)
            if worker.logs is not None:
                worker.logs.close()


def kill(workers: list[StageWorker], writer: frames.Writer) -> None:
    """Kill every worker at once and close their pipes and the writer."""
    stop_processes([w.process for w in workers], join_timeout=0, what="pipeline stage")
    writer.close()  # its writes to the dead workers fail at once
    for worker in workers:
        worker.conn.close()
        if worker.logs is not None:
            worker.logs.close()


def _ignore(worker: StageWorker, records: list[dict[str, Any]]) -> None:
    pass
