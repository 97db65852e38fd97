"""A pipeline stage's role loop (run by the child main, ``_proc.child``), and the messages
it exchanges with the parent.

Messages are :mod:`parallelkit._pipeline.messages` (frames of the wire's duplex stream: the
kind, the batch number, three fields, a pickled list, large buffers out of band)::

    parent -> worker   TASK(batch, n) + items          a batch to work on (the parent forwards
                                                         a DONE message's body and buffers
                                                         unchanged to a worker of the next
                                                         stage as a TASK)
                       STOP                            exit
    worker -> parent   DONE(batch, n, busy, waiting)   + the n outputs
                       ERROR(batch, position)          + (exception record, item repr,
                                                          pickled item or None)
                       STARTUP_FAILED                  + the start-up failure: the stage's
                                                         function cannot be unpickled here

``busy`` is the nanoseconds the worker spent on the batch (unpickling, the stage's function,
pickling); ``waiting`` the nanoseconds it waited for the batch before that.

The worker has one thread: it reads a batch, works, and sends the outcome.  Its send
never deadlocks with the parent's (which never waits: the router posts): while the socket
is full it takes in what the parent sends (see :mod:`parallelkit._wire.stream`).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from parallelkit._map.calls import each, explain
from parallelkit._pipeline import messages
from parallelkit._pipeline.messages import DONE, ERROR, STARTUP_FAILED, STOP, Message
from parallelkit._proc import logs as _logs
from parallelkit._proc.child import StartupFailure
from parallelkit._util import fuzz as _fuzz
from parallelkit._wire import shm as _shm
from parallelkit._wire.arena import ResultReader, ResultWriter
from parallelkit._wire.codec import capture_exception, dumps, locate_unpicklable
from parallelkit._wire.stream import FrameError, FrameStream, StreamEnd
from parallelkit.errors import SerializationError

MAP: Final = 0
FILTER: Final = 1
FLAT_MAP: Final = 2
KIND_NAMES: Final = {MAP: "map", FILTER: "filter", FLAT_MAP: "flat_map"}


def stage_loop(
    sock: socket.socket,
    fn: Callable[[Any], Any],
    dump_fd: int,
    kind: int,
    ledger: str = "",
    slot: int = 0,
) -> None:
    """A stage's role loop (run by :func:`parallelkit._proc.child.child_main`): apply
    ``fn`` to each batch it is sent, until STOP or the parent hangs up.  ``ledger`` and
    ``slot``: where we note a segment we are halfway through making or removing, for the
    parent, our segments' heir (``_wire.shm.keep_ledger``)."""
    stream = FrameStream(sock, kinds=messages.KINDS)
    kept = _keep_ledger(ledger, slot)
    reader = ResultReader()  # regions of the batches we are sent (the sender's segments)
    writer = messages.shared_writer()  # our outputs' large buffers (segments the parent removes)
    try:
        _loop(stream, reader, writer, fn, kind)
    finally:
        # never unlinked here: a message naming them may not be read yet (messages.py)
        writer.close(unlink=False)
        reader.close()
        if kept is not None:
            _shm.keep_ledger(None)
            kept[0].close(kept[1:])


def _keep_ledger(name: str, slot: int) -> tuple[_shm.Segment, memoryview] | None:
    if not name:
        return None
    try:
        ledger = _shm.Segment.attach(name)
    except OSError:  # the parent is gone: it is nobody's heir now
        return None
    ledger.drop_fd()
    view = memoryview(ledger.mm)[slot * _shm.LEDGER_SLOT : (slot + 1) * _shm.LEDGER_SLOT]
    _shm.keep_ledger(view)
    return ledger, view


def _loop(
    stream: FrameStream,
    reader: ResultReader,
    writer: ResultWriter,
    fn: Callable[[Any], Any],
    kind: int,
) -> None:
    clock = time.perf_counter_ns
    idle_since = clock()
    while True:
        if _fuzz.ENABLED:
            _fuzz.point("stage.before_read")
        try:
            message = messages.read(stream)
        except (StreamEnd, FrameError):
            return  # the parent is gone or hung up
        if message.kind == STOP:
            return
        writer.collect()  # what the last batch's readers gave back (a huge one: removed)
        if _fuzz.ENABLED:
            _fuzz.point("stage.before_work")
        # in a function of its own, so that nothing of the batch (its items, its outputs,
        # its message) is held while waiting for the next one
        if not _work(stream, kind, fn, message, idle_since, reader, writer):
            return
        _logs.end_task()  # (holds none of the batch's outputs)
        del message
        idle_since = clock()


def report_startup_failure(sock: socket.socket, failure: StartupFailure) -> None:
    """How a stage tells the parent it could not start (its function cannot be unpickled)."""
    with contextlib.suppress(StreamEnd):
        messages.send(
            FrameStream(sock, kinds=messages.KINDS), messages.encode(failure, STARTUP_FAILED)
        )


def _work(
    stream: FrameStream,
    kind: int,
    fn: Callable[[Any], Any],
    message: Message,
    idle_since: int,
    reader: ResultReader,
    writer: ResultWriter,
) -> bool:
    """Run one batch and send its outcome; False when the parent hung up."""
    clock = time.perf_counter_ns
    start = clock()
    batch = message.batch
    items = messages.decode(message, reader)
    del message
    out: list[Any] = []
    append = out.append
    position = 0
    at = [0]  # filter, flat_map: the running item's position (its log records name it)
    if _logs.enabled():
        _logs.begin_task(None, out.__len__ if kind == MAP else lambda: at[0], batch=batch)
    try:
        if kind == MAP:
            out.extend(each(fn, items))  # keeps the outputs before a failing item
        elif kind == FILTER:
            for position, item in enumerate(items):
                at[0] = position
                if fn(item):
                    append(item)
        else:
            for position, item in enumerate(items):
                at[0] = position
                out.extend(fn(item))
    except BaseException as exc:
        if kind == MAP:
            position = len(out)
        return _send_error(
            stream, batch, position, items[position], explain(fn, items[position], exc)
        )
    try:
        done = messages.encode(out, DONE, batch, writer=writer)
    except Exception as exc:
        return _send_unpicklable(stream, batch, kind, items, out, exc)
    end = clock()
    messages.set_fields(done, len(out), end - start, start - idle_since)
    if _fuzz.ENABLED:
        _fuzz.point("stage.before_send")
    try:
        messages.send(stream, done)
    except StreamEnd:
        return False
    return True


def _send_error(
    stream: FrameStream, batch: int, position: int, item: object, exc: BaseException
) -> bool:
    try:
        shown = repr(item)
    except Exception:
        shown = f"<{type(item).__name__} object>"
    if len(shown) > 200:
        shown = shown[:197] + "..."
    try:
        item_bytes: bytes | None = dumps(item)
    except Exception:
        item_bytes = None
    record = capture_exception(exc)
    try:
        messages.send(stream, messages.encode((record, shown, item_bytes), ERROR, batch, position))
    except StreamEnd:
        return False
    return True


def _send_unpicklable(
    stream: FrameStream, batch: int, kind: int, items: Sequence[Any], out: list[Any], exc: Exception
) -> bool:
    found = locate_unpicklable(out)
    position = found[0] if found is not None else 0
    item = items[position] if kind == MAP else out[position]  # map: one output per input
    error = SerializationError(
        f"a result of this stage cannot be pickled to send it on: {found[1] if found else exc}",
        what="result",
        item_index=None,
    )
    return _send_error(stream, batch, position if kind == MAP else 0, item, error)
