"""A pipeline run's stage processes: starting them, talking to them, stopping them.

``StageProcesses`` owns, for one run, every stage worker process, the parent's end of
each one's duplex stream (:class:`parallelkit._wire.stream.FrameStream` over a
``socketpair``) and the one ``poll`` object over the streams, the processes' sentinels and
the source's wake-up pipe.  The router posts its messages (it never waits to write: what a
socket does not take now waits in that stream's outbox, written when the socket is
writable) and reads every worker that has something, so neither side can wait for the
other to read.  It is used from the router (the consumer's thread) only; :func:`kill` is
also the run's garbage-collection backstop.  Which batch each worker holds is kept here
too (``StageWorker.held``): a crash names it.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any, Final

from parallelkit._pipeline import messages
from parallelkit._pipeline.messages import STOP, TASK, Message
from parallelkit._pipeline.stage import report_startup_failure, stage_loop
from parallelkit._proc.lifecycle import (
    check_can_start_children,
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
from parallelkit._wire.arena import remove_leftovers
from parallelkit._wire.codec import dump_function
from parallelkit._wire.shm import LEDGER_SLOT, Segment, ledger_name, tracked
from parallelkit._wire.stream import FrameError, FrameStream, StreamEnd, ms, widen

__all__ = ("STOP_TIMEOUT", "Stage", "StageProcesses", "StageWorker", "kill")

STOP_TIMEOUT: Final = 5.0  # seconds finished workers get to exit before being terminated
EXIT_VISIBLE: Final = 1.0  # seconds to wait for a dead worker's exit code to be known
READ: Final = select.POLLIN
READ_WRITE: Final = select.POLLIN | select.POLLOUT


@dataclass(frozen=True, slots=True)
class Stage:
    """A stage as the pipeline describes it."""

    kind: int
    fn: Callable[[Any], Any]
    max_workers: int
    name: str
    ordered: bool


class StageWorker:
    """One worker process of a stage, the parent's end of its stream, the batches it holds."""

    __slots__ = ("fd", "held", "ledger", "logs", "pid", "process", "stage", "stream")

    def __init__(
        self,
        process: BaseProcess,
        stream: FrameStream,
        stage: int,
        logs: LogPipe | None,
        ledger: memoryview | None = None,
    ) -> None:
        self.process = process
        self.ledger = ledger  # its slot in the run's ledger (see _wire.shm.keep_ledger)
        self.pid = process.pid  # kept: its segments are named after it (messages.py)
        self.stream = stream
        self.fd = stream.fileno()
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
        self.writing: dict[int, StageWorker] = {}  # fd -> worker whose outbox is not empty
        self._poll: select.poll | None = None
        # the run's ledger (one slot per worker: see _wire.shm.keep_ledger), once started
        self.ledgers: list[Segment] = []

    def payloads(self) -> list[bytes | None]:
        """Each stage's function, pickled to send it (``None``: a fork child inherits it).

        Raises:
            SerializationError: a function cannot be pickled.
        """
        fork = self.start_method == "fork"
        return [None if fork else dump_function(stage.fn) for stage in self.stages]

    def start(self, payloads: Sequence[bytes | None]) -> None:
        """Start every stage's workers (on failure the caller kills those started)."""
        # before anything is built: a child importing our main module again that starts a
        # pipeline exits here, and one killed (by its parent) in the middle of making the
        # ledger would leave the resource tracker a name to warn about
        check_can_start_children(self.start_method)
        context = get_context(self.start_method)
        if self.start_method == "fork":
            # workers register their segments with *our* resource tracker (which unlinks
            # them if we are SIGKILLed), not each with one it would start itself
            from multiprocessing import resource_tracker  # noqa: PLC0415

            resource_tracker.ensure_running()
        total = sum(stage.max_workers for stage in self.stages)
        ledger: Segment | None = None
        try:
            # the ledger is for the resource tracker: none where it removes no segment (a
            # SIGKILLed parent would leave the ledger itself there)
            made = Segment.create(LEDGER_SLOT * total) if tracked() else None
        except OSError:  # no room: the workers keep none (see _wire.shm)
            made = None
        if made is not None:
            made.drop_fd()
            self.ledgers.append(made)
            ledger = made
        # each worker's share of our CPUs, for work it starts itself (docs/nesting.md)
        share = child_share(total)
        for index, stage in enumerate(self.stages):
            for number in range(stage.max_workers):
                self._start_worker(context, index, stage, payloads[index], number, share, ledger)

    def _start_worker(
        self,
        context: Any,
        index: int,
        stage: Stage,
        payload: bytes | None,
        number: int,
        share: int,
        ledger: Segment | None,
    ) -> None:
        slot = len(self.workers)
        view = None
        if ledger is not None:
            view = memoryview(ledger.mm)[slot * LEDGER_SLOT : (slot + 1) * LEDGER_SLOT]
        parent_end, child_end = socket.socketpair()
        widen(parent_end)  # a large batch in fewer writes, both ways
        widen(child_end)
        stream = FrameStream(parent_end, kinds=messages.KINDS)
        log_pipe = LogPipe() if self.forward_logs else None

        def record(process: BaseProcess) -> None:
            worker = StageWorker(process, stream, index, log_pipe, view)
            self.workers.append(worker)
            self.by_stage[index].append(worker)

        try:
            start_child(
                context,
                self.start_method,
                stage_loop,
                child_end,
                args=(stage.kind, "" if ledger is None else ledger.name, slot),
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
            if not any(w.stream is stream for w in self.workers):
                if view is not None:
                    view.release()
                stream.abort()
                if log_pipe is not None:
                    log_pipe.close()
            raise
        finally:
            child_end.close()

    # ---------------------------------------------------------------- sending

    def free_worker(self, stage: int) -> StageWorker | None:
        """An idle worker of ``stage``, else one with a single batch (the second waits in
        the socket, so the worker starts on it as soon as it sent the first), else
        ``None``."""
        best: StageWorker | None = None
        for worker in self.by_stage[stage]:
            held = len(worker.held)
            if held == 0:
                return worker
            if held == 1 and best is None:
                best = worker
        return best

    def send(self, worker: StageWorker, batch: int, message: Message) -> None:
        """Hand ``batch`` to ``worker`` (as a TASK: a forwarded DONE message is one) without
        waiting; a worker that died is noticed through its sentinel."""
        worker.held.append(batch)
        if _fuzz.ENABLED:
            _fuzz.point("router.before_send")
        messages.post(worker.stream, message, TASK)
        if worker.stream.out:
            self.writing[worker.fd] = worker

    # ---------------------------------------------------------------- receiving

    def wait(self, timeout_ms: int | None, wakeup_fd: int | None) -> set[int]:
        """Write what the streams' outboxes hold as their sockets take it, until a stream
        has something to read, a sentinel or the wake-up pipe is ready; the ready fds."""
        poller = self._poller(wakeup_fd)
        writing = self.writing
        for fd in writing:
            poller.modify(fd, READ_WRITE)
        with waiting_on_children():
            events = poller.poll(timeout_ms)
        ready: set[int] = set()
        for fd, event in events:
            if event & select.POLLOUT:
                worker = writing.get(fd)
                if worker is not None and worker.stream.flush():
                    del writing[fd]
                    poller.modify(fd, READ)
            if event & ~select.POLLOUT:
                ready.add(fd)
        return ready

    def _poller(self, wakeup_fd: int | None) -> select.poll:
        """One poll object for the whole run: every stream, every sentinel, the wake-up pipe.

        (``multiprocessing.connection.wait`` would build and fill a new selector on every
        call, which costs more than routing a small batch.)
        """
        if self._poll is None:
            self._poll = select.poll()
            fds = [w.fd for w in self.workers]
            fds += [w.process.sentinel for w in self.workers]
            fds += [w.logs.fileno() for w in self.workers if w.logs is not None]
            if wakeup_fd is not None:
                fds.append(wakeup_fd)
            for fd in fds:
                self._poll.register(fd, READ)
        return self._poll

    def receive(
        self, ready: set[int], handle: Callable[[StageWorker, Message], None]
    ) -> list[StageWorker]:
        """Pass every message the ``ready`` streams hold to ``handle``; the dead workers."""
        dead: list[StageWorker] = []
        for worker in self.workers:
            if worker.logs is not None and worker.logs.fileno() in ready:
                self.read_logs(worker)
            if worker.fd in ready:
                stream = worker.stream
                try:
                    while True:
                        self.read_logs(worker)  # what it logged before the message first
                        handle(worker, messages.read(stream))
                        if not worker.held or not stream.ready(0):
                            break
                except (StreamEnd, FrameError):
                    dead.append(worker)
            elif worker.process.sentinel in ready:
                dead.append(worker)
        return dead

    def receive_last(
        self, worker: StageWorker, handle: Callable[[StageWorker, Message], None]
    ) -> None:
        """``worker`` died: pass on a message it sent before, and wait for its exit code."""
        leave_if_exiting()  # killed at interpreter exit (_lifecycle._quiet_exit): quietly
        self.read_logs(worker)
        stream = worker.stream
        if not stream.closed and stream.ready(0):
            with contextlib.suppress(StreamEnd, FrameError):
                handle(worker, messages.read(stream))
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
        """Every item is through: tell each worker to exit, after what it was sent (waiting
        up to ``STOP_TIMEOUT`` for the sockets to take it)."""
        stop = messages.encode(None, STOP)
        for worker in self.workers:
            messages.post(worker.stream, stop)
            if worker.stream.out:
                self.writing[worker.fd] = worker
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.writing:
            poller = select.poll()
            for fd in self.writing:
                poller.register(fd, select.POLLOUT)
            for fd, _ in poller.poll(ms(deadline - time.monotonic())):
                if self.writing[fd].stream.flush():
                    del self.writing[fd]
            if time.monotonic() >= deadline:
                break

    def reap(self) -> None:
        """Wait for the workers told to stop (terminating those that do not)."""
        stop_processes(
            [w.process for w in self.workers], join_timeout=STOP_TIMEOUT, what="pipeline stage"
        )
        for worker in self.workers:  # what they logged after their last batch
            self.read_logs(worker)
            if worker.logs is not None:
                worker.logs.close()


def kill(workers: list[StageWorker], ledgers: list[Segment]) -> None:
    """Kill every worker at once, close their streams, and remove the shared-memory
    segments they leave (they have exited: none can make another), then the ledger."""
    stop_processes([w.process for w in workers], join_timeout=0, what="pipeline stage")
    for worker in workers:
        worker.stream.abort()
        if worker.logs is not None:
            worker.logs.close()
        pending = ""
        if worker.ledger is not None:
            pending = ledger_name(worker.ledger)
            worker.ledger.release()
            worker.ledger = None
        if worker.pid is not None:
            if _fuzz.ENABLED:
                _fuzz.point("router.before_leftovers")
            remove_leftovers(worker.pid, pending)
    for ledger in ledgers:
        ledger.close()
    ledgers.clear()


def _ignore(worker: StageWorker, records: list[dict[str, Any]]) -> None:
    pass
