"""A pipeline stage's role loop (run by the child main, ``_proc.child``), and the messages
it exchanges with the parent.

Messages are :mod:`parallelkit._wire.frames` (a header, a pickled list, large buffers out of
band)::

    parent -> worker   TASK(batch) + items             a batch to work on
                       STOP                            exit
    worker -> parent   DONE(batch, n, busy, waiting)   + the n outputs: the parent forwards
                                                         this message unchanged to a worker
                                                         of the next stage (any kind but STOP
                                                         is work to a worker)
                       ERROR(batch, position)          + (exception record, item repr,
                                                          pickled item or None)
                       STARTUP_FAILED                  + the start-up failure: the stage's
                                                         function cannot be unpickled here

``busy`` is the nanoseconds the worker spent on the batch (unpickling, the stage's function,
pickling); ``waiting`` the nanoseconds it waited for the batch before that.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, Final

from parallelkit._map.calls import each, explain
from parallelkit._proc import logs as _logs
from parallelkit._proc.child import StartupFailure
from parallelkit._util import fuzz as _fuzz
from parallelkit._wire import frames
from parallelkit._wire.codec import capture_exception, dumps, locate_unpicklable
from parallelkit.errors import SerializationError

TASK: Final = 1
STOP: Final = 2
DONE: Final = 3
ERROR: Final = 4
STARTUP_FAILED: Final = 5  # + the start-up failure (see _proc.child.startup_error)

MAP: Final = 0
FILTER: Final = 1
FLAT_MAP: Final = 2
KIND_NAMES: Final = {MAP: "map", FILTER: "filter", FLAT_MAP: "flat_map"}


def stage_loop(conn: Connection, fn: Callable[[Any], Any], dump_fd: int, kind: int) -> None:
    """A stage's role loop (run by :func:`parallelkit._proc.child.child_main`): apply
    ``fn`` to each batch it is sent, until STOP or the parent hangs up."""
    inbox: queue.SimpleQueue[frames.Parts | None] = queue.SimpleQueue()
    threading.Thread(
        target=_read, args=(conn, inbox), name="parallelkit-stage-reader", daemon=True
    ).start()
    clock = time.perf_counter_ns
    idle_since = clock()
    while True:
        message = inbox.get()
        if message is None:
            return  # the parent is gone, hung up or said STOP
        if _fuzz.ENABLED:
            _fuzz.point("stage.before_work")
        # in a function of its own, so that nothing of the batch (its items, its outputs,
        # its message) is held while waiting for the next one
        if not _work(conn, kind, fn, message, idle_since):
            return
        _logs.end_task()  # (holds none of the batch's outputs)
        del message
        idle_since = clock()


def report_startup_failure(conn: Connection, failure: StartupFailure) -> None:
    """How a stage tells the parent it could not start (its function cannot be unpickled)."""
    frames.send(conn, frames.encode(failure, STARTUP_FAILED))


def _work(
    conn: Connection, kind: int, fn: Callable[[Any], Any], message: frames.Parts, idle_since: int
) -> bool:
    """Run one batch and send its outcome; False when the parent hung up."""
    clock = time.perf_counter_ns
    start = clock()
    batch = frames.header(message)[1]
    items = frames.decode(message)
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
        _send_error(conn, batch, position, items[position], explain(fn, items[position], exc))
        return True
    try:
        parts = frames.encode(out, DONE)
    except Exception as exc:
        _send_unpicklable(conn, batch, kind, items, out, exc)
        return True
    end = clock()
    frames.set_header(parts, DONE, batch, len(out), end - start, start - idle_since)
    if _fuzz.ENABLED:
        _fuzz.point("stage.before_send")
    try:
        frames.send(conn, parts)
    except OSError:
        return False
    return True


def _read(conn: Connection, inbox: queue.SimpleQueue[frames.Parts | None]) -> None:
    """Take in the parent's messages as they come, so that its send never waits for us.

    Then the parent can send a worker its next batch while the worker works on (and sends
    the results of) the one before: no stall between batches, and no deadlock of two
    processes each sending a large message to the other.  The parent sends at most two
    batches ahead.
    """
    while True:
        if _fuzz.ENABLED:
            _fuzz.point("stage.before_read")
        try:
            message = frames.recv(conn)
        except (EOFError, OSError):
            inbox.put(None)
            return
        if frames.header(message)[0] == STOP:
            inbox.put(None)
            return
        inbox.put(message)
        del message  # not held while waiting for the next one


def _send_error(
    conn: Connection, batch: int, position: int, item: object, exc: BaseException
) -> None:
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
    with contextlib.suppress(OSError):
        frames.send(conn, frames.encode((record, shown, item_bytes), ERROR, batch, position))


def _send_unpicklable(
    conn: Connection, batch: int, kind: int, items: Sequence[Any], out: list[Any], exc: Exception
) -> None:
    found = locate_unpicklable(out)
    position = found[0] if found is not None else 0
    item = items[position] if kind == MAP else out[position]  # map: one output per input
    error = SerializationError(
        f"a result of this stage cannot be pickled to send it on: {found[1] if found else exc}",
        what="result",
        item_index=None,
    )
    _send_error(conn, batch, position if kind == MAP else 0, item, error)
