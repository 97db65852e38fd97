"""Log records from children to the parent's handlers, for every role.

Each child gets one end of its own ``SOCK_SEQPACKET`` socket pair (:class:`LogPipe`;
``SOCK_DGRAM`` where there is none, see below), handed to the child main by
:func:`parallelkit._proc.lifecycle.start_child`::

    child: logger.info(...) ─▶ level check (the parent's levels, mirrored) ─▶ Forwarder on
           the root: message formatted, traceback as text, item index ─▶ one datagram
    parent: the role's event loop (map engine, pipeline router; a channel's hub thread)
           reads the datagrams ─▶ logging.getLogger(name).handle(record): the parent's
           handlers, as configured when the record arrives

Why a socket of its own rather than a message kind on the role's stream: one mechanism
for every role (channels have no parent-side loop at all), a record from any thread of the
child is one datagram (atomic: no lock, nothing to corrupt), and a record sent is in the
parent's socket buffer: a child that crashes right after logging loses nothing.  The
parent reads a child's records before each of its replies, so a record logged before a
result is handled before that result is seen (a channel's parent: before each message
the child flagged as sent after records, :class:`Forwarded`; it reads nothing at others).

Levels.  The child's loggers mirror the parent's: its levels (and ``logging.disable``)
when the child starts, then again whenever they change (pool workers and pipeline stages
pick the change up before their next task: the parent sends it down the same socket).
A record the parent's loggers would drop is neither formatted nor sent.  The parent
checks its current levels once more when a record arrives (a raised level applies at
once).  Whether the parent's levels changed is an O(1) check: any ``setLevel`` or
``logging.disable`` clears every logger's cache of ``isEnabledFor`` answers, ours too.

Without ``SOCK_SEQPACKET`` (macOS; the ``seqpacket`` facility of
:mod:`parallelkit._platform`), a ``SOCK_DGRAM`` pair (:class:`Records`).  Datagrams keep
record boundaries too, but may be small (macOS: 2 KB unless raised), so each carries a
header -- whole, first, middle or last piece, and the sending process and thread -- and a
record larger than one datagram goes in pieces, all of them sent before the logging call
returns (each thread's pieces are reassembled apart: several threads, or a process forked
without us, may send at once).  A BSD system does not block a datagram sender whose
receiver is full but fails with ``ENOBUFS``: the child waits for room and sends again, so a
sent record is in the parent's buffer as with ``SOCK_SEQPACKET``.  Nothing relies on the
end of file a ``SOCK_SEQPACKET`` end reads once the child is gone (a datagram end reads
none): a child's exit is seen through its sentinel or its role's stream.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pickle
import select
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any, Final

from parallelkit import _platform
from parallelkit._proc.wakeup import WakeUpPipe
from parallelkit._util import fuzz as _fuzz
from parallelkit._util.threads import quiet_thread

MAX_RECORD_BYTES: Final = 64 * 1024  # bytes: a larger record has its texts shortened
_RECV_BYTES: Final = 2 * MAX_RECORD_BYTES + 4096  # a datagram never exceeds this
_TEXT_KEEP: Final = 8 * 1024  # characters kept of each long text of a too-large record
_LEVELS_LOGGER: Final = "parallelkit._levels"  # whose isEnabledFor cache says "unchanged"
# a pipeline stage's record: its batch and position there, for the parent to turn into an
# item index (removed before the record reaches the parent's loggers)
BATCH: Final = "_parallelkit_batch"
POSITION: Final = "_parallelkit_position"

# a snapshot of the parent's levels: (version, {logger name: level}, logging.disable level)
Levels = tuple[int, dict[str, int], int]

# ===================================================================== either end

# the datagram fallback's header: (piece kind, sending process, sending thread)
_HEADER: Final = struct.Struct("!BIQ")
_WHOLE, _FIRST, _MORE, _LAST = range(4)  # piece kinds
_MIN_PIECE: Final = 512  # bytes: a piece is never cut smaller than this
_FULL_WAIT: Final = 0.0001  # s: the first wait for room (ENOBUFS), doubled up to ...
_FULL_WAIT_MAX: Final = 0.01  # s: ... this
_HALVE_AFTER: Final = 8  # full in a row: the rest of the record goes in smaller pieces
_pid = os.getpid()  # (asked once, not per record: getpid is a system call)


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Records:
    """One end of a log socket: whole records each way, whatever the socket's type.

    ``SOCK_SEQPACKET``: a record is one datagram, as it is.  ``SOCK_DGRAM`` (the fallback,
    see the module docstring): a header on each datagram, a record too large for one in
    pieces of at most :attr:`piece` bytes, reassembled per sending thread by :meth:`take`.
    """

    __slots__ = ("framed", "partial", "piece", "sock", "unsent")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.framed = sock.type == socket.SOCK_DGRAM
        # the most a datagram carries besides its header; never more than the reader's
        # receive size (which would truncate it)
        self.piece = (
            min(_platform.max_datagram(sock), _RECV_BYTES) - _HEADER.size if self.framed else 0
        )
        self.partial: dict[tuple[int, int], list[memoryview]] = {}  # pieces, per thread
        # a record whose first pieces went, the rest not (wait=False): (it, from, key)
        self.unsent: tuple[memoryview, int, tuple[int, int]] | None = None

    def send(self, data: bytes, *, wait: bool = True) -> None:
        """Send one record, in pieces if it must be, all of them before returning.

        ``wait``: on a BSD system, wait for room where the receiver's buffer is full
        (``ENOBUFS``), as a Linux socket blocks.  ``False`` (the parent's non-blocking end):
        raise as a full socket does; a record left half sent is finished first by the next
        call (a reader that takes one piece at a time then still gets it whole).

        Raises:
            OSError: the other end is gone, or the socket is full and ``wait`` is false.
        """
        if not self.framed:
            self.sock.send(data)
            return
        thread = threading.get_ident()
        if self.unsent is None and len(data) <= self.piece:
            try:  # (the usual record: one datagram)
                self.sock.send(_HEADER.pack(_WHOLE, _pid, thread) + data)
                return
            except OSError:
                pass  # nothing sent: the way below tells why, or waits, or cuts it smaller
        if self.unsent is not None:
            view, pos, key = self.unsent
            self.unsent = None
            self._send(view, pos, key, wait)
        self._send(memoryview(data), 0, (_pid, thread), wait)

    def _send(self, view: memoryview, pos: int, key: tuple[int, int], wait: bool) -> None:
        total = len(view)
        size = self.piece
        full = 0
        while True:
            end = min(total, pos + size)
            if pos == 0:
                kind = _WHOLE if end == total else _FIRST
            else:
                kind = _LAST if end == total else _MORE
            try:
                self.sock.send(_HEADER.pack(kind, *key) + view[pos:end])
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE and size > _MIN_PIECE:
                    # larger than the system sends whole: smaller pieces, from now on
                    size = self.piece = max(_MIN_PIECE, size // 2)
                    continue
                if not wait or exc.errno != errno.ENOBUFS:
                    if pos:
                        self.unsent = (view, pos, key)
                    raise
                # BSD: the receiver's buffer is full (it does not block): wait for room;
                # a piece that fits no buffer at all, halved
                full += 1
                if full % _HALVE_AFTER == 0 and size > _MIN_PIECE:
                    size = max(_MIN_PIECE, size // 2)
                time.sleep(min(_FULL_WAIT_MAX, _FULL_WAIT * 2 ** min(full, 16)))
                continue
            full = 0
            if end == total:
                return
            pos = end
            if _fuzz.ENABLED:
                _fuzz.point("logs.between_pieces")  # other threads' records come between

    def take(self, datagram: bytes) -> bytes | memoryview | None:  # noqa: PLR0911 - a hot path kept in one frame (a helper call costs more than its branches)
        """The record ``datagram`` completes, or ``None`` (a piece of one to come)."""
        if not self.framed:
            return datagram
        if len(datagram) < _HEADER.size:
            return None
        if datagram[0] == _WHOLE and not self.partial:  # (the usual record)
            return memoryview(datagram)[_HEADER.size :]
        kind, pid, thread = _HEADER.unpack_from(datagram)
        body = memoryview(datagram)[_HEADER.size :]
        key = (pid, thread)
        if kind == _WHOLE:
            self.partial.pop(key, None)
            return body
        if kind == _FIRST:
            self.partial[key] = [body]
            return None
        pieces = self.partial.get(key)
        if pieces is None:  # its first piece was never sent (the parent's levels, full)
            return None
        pieces.append(body)
        if kind == _MORE:
            return None
        del self.partial[key]
        return b"".join(pieces)


# ===================================================================== parent side

_levels_lock = threading.Lock()
_levels: Levels | None = None


def current_levels() -> Levels:
    """The parent's logger levels now (recomputed only when some level changed)."""
    global _levels
    watch = logging.getLogger(_LEVELS_LOGGER)
    with _levels_lock:
        cache = getattr(watch, "_cache", None)
        if _levels is not None and cache:  # no setLevel or disable since we looked
            return _levels
        manager = logging.Logger.manager
        levels = {"": logging.root.level}
        for name, logger in list(manager.loggerDict.items()):
            if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
                levels[name] = logger.level
        disable = manager.disable
        if _levels is None or _levels[1] != levels or _levels[2] != disable:
            _levels = ((_levels[0] + 1) if _levels is not None else 1, levels, disable)
        watch.disabled = False  # (fileConfig may disable it: then it would never cache)
        watch.isEnabledFor(logging.CRITICAL)  # fills the cache a level change clears
        return _levels


class LogPipe:
    """The parent's end of one child's log socket (see the module docstring).

    :attr:`child` is the end to pass to the child (closed here once it started, by
    :meth:`child_started`).  :meth:`read` takes every record waiting, without blocking;
    :func:`handle` gives them to the parent's loggers.
    """

    __slots__ = ("child", "closed", "ended", "lock", "records", "sent", "sock")

    def __init__(self) -> None:
        self.sock, self.child = _platform.record_socketpair()
        self.sock.setblocking(False)
        self.records = Records(self.sock)
        self.lock = threading.Lock()  # read + handle as one step, when two threads drain
        self.sent = current_levels()
        self.closed = False
        # the child's end is closed and every record read (SOCK_SEQPACKET's end of file;
        # a datagram socket has none): the socket stays readable, with nothing to read
        self.ended = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def child_started(self) -> None:
        """Close our copy of the child's end (the child has its own now)."""
        self.child.close()

    def read(self) -> list[dict[str, Any]]:
        """Every record the child has sent so far (never blocks)."""
        records: list[dict[str, Any]] = []
        if self.closed or self.ended:
            return records
        recv = self.sock.recv
        take = self.records.take if self.records.framed else None
        while True:
            try:
                data = recv(_RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                return records
            except OSError:
                return records
            if not data:  # the child's end is closed: nothing more will come
                self.ended = True
                return records
            record = data if take is None else take(data)
            if record is None:  # a piece of a record
                continue
            try:
                records.append(pickle.loads(record))
            except Exception:  # a class of an extra attribute we cannot import: skip it
                continue

    def send_levels(self, levels: Levels) -> None:
        """Tell the child the parent's levels changed (it applies them at its next task)."""
        if self.closed or self.sent[0] >= levels[0]:
            return
        try:
            self.records.send(pickle.dumps(levels), wait=False)
        except OSError:  # full (it takes no task) or gone: sent again at the next change
            return
        self.sent = levels

    def flush(self) -> None:
        """Hand every record waiting to the parent's loggers, in order with any other
        thread doing the same."""
        with self.lock:
            if _fuzz.ENABLED:
                _fuzz.point("logs.flush")  # the hub thread and a recv() race for the lock
            records = self.read()
            if records:
                handle(records)

    def close(self) -> None:
        """Close both ends we may hold (idempotent)."""
        with self.lock:
            self.closed = True
            self.sock.close()
            self.child.close()


class _Hub:
    """One thread that reads the log sockets of children no event loop of ours waits on
    (processes serving channels), running only while there are some: not a thread per
    child, and none left once the last of them is closed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pipes: set[LogPipe] = set()
        self.thread: threading.Thread | None = None
        self.wakeup: WakeUpPipe | None = None

    def add(self, pipe: LogPipe) -> None:
        with self.lock:
            self.pipes.add(pipe)
            if self.wakeup is None:
                self.wakeup = WakeUpPipe()
                self.thread = quiet_thread(self._run, name="parallelkit-logs", args=(self.wakeup,))
                self.thread.start()
            else:
                self.wakeup.wake()

    def remove(self, pipe: LogPipe) -> None:
        """Stop reading ``pipe`` (and stop the thread with the last one); the caller
        flushes it."""
        with self.lock:
            self.pipes.discard(pipe)
            thread, wakeup = self.thread, self.wakeup
            if self.pipes or wakeup is None:
                if wakeup is not None:
                    wakeup.wake()
                return
            self.thread = self.wakeup = None
        wakeup.wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
            wakeup.close()

    def _run(self, wakeup: WakeUpPipe) -> None:
        while True:
            with self.lock:
                if self.wakeup is not wakeup:
                    return
                # (not one whose child has gone: its end of file would wake us forever)
                pipes = {
                    pipe.fileno(): pipe for pipe in self.pipes if not (pipe.closed or pipe.ended)
                }
            poller = select.poll()
            poller.register(wakeup.fd, select.POLLIN)
            for fd in pipes:
                poller.register(fd, select.POLLIN)
            ready = [fd for fd, _ in poller.poll()]
            if _fuzz.ENABLED:
                _fuzz.point("logs.hub_ready")  # a channel may be closed meanwhile
            wakeup.drain()
            for fd in ready:
                pipe = pipes.get(fd)
                if pipe is not None:
                    pipe.flush()

    def reset(self) -> None:
        """In a fork child: the parent's thread is not here (nor its children)."""
        self.lock = threading.Lock()
        self.pipes = set()
        self.thread = None
        self.wakeup = None


_hub = _Hub()
os.register_at_fork(after_in_child=_hub.reset)


def watch(pipe: LogPipe) -> None:
    """Read ``pipe`` from the hub thread (a child no loop of ours waits on)."""
    _hub.add(pipe)


def unwatch(pipe: LogPipe) -> None:
    """The child has exited: its last records, then its socket closed."""
    _hub.remove(pipe)
    pipe.flush()
    pipe.close()


def push_levels(pipes: Iterable[LogPipe]) -> None:
    """Send the parent's levels to each of ``pipes`` whose child has older ones."""
    levels = current_levels()
    for pipe in pipes:
        if pipe.sent[0] < levels[0]:
            pipe.send_levels(levels)


def handle(records: Iterable[dict[str, Any]]) -> None:
    """Give children's records to the parent's loggers, as configured now."""
    for fields in records:
        try:
            record = logging.makeLogRecord(fields)
            logger = logging.getLogger(record.name)
            if logger.isEnabledFor(record.levelno):
                logger.handle(record)
        except Exception:  # a user's filter raised: say so, as logging does for a handler
            if logging.raiseExceptions and sys.stderr is not None:
                sys.stderr.write("--- parallelkit: error handling a worker's log record\n")
                traceback.print_exc(file=sys.stderr)


# ===================================================================== child side


class _Task:
    """What the role's loop says of the task it runs: the item index its records get."""

    base: int | None = None  # the index of the chunk's first item; None: no item
    batch: int | None = None  # a pipeline batch: the parent knows its first item
    where: Callable[[], int] | None = None  # the running item's position in the chunk
    thread: int | None = None  # the thread running it


class Forwarded:
    """How many records this process has sent to its parent: a role whose parent has no
    loop of its own that reads them before each message (a channel's) tells the parent,
    with the message, that there are records to read first, instead of the parent looking
    at the log socket before every message.

    The count goes up after the record is in the parent's socket buffer, under the
    handler's lock (so no increment is lost to another thread's).
    """

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


_task = _Task()
_sock: Records | None = None
_version = 0
_forwarded = Forwarded()


class Forwarder(logging.Handler):
    """The child's one handler: sends each record to the parent (one datagram, or its
    pieces: :class:`Records`), and counts it (:class:`Forwarded`)."""

    def __init__(self, sock: Records) -> None:
        super().__init__()
        self.sock = sock
        self._formatter = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = self._dump(record)
            if _fuzz.ENABLED:
                _fuzz.point("logs.before_send")  # the task's thread and others race here
            self.sock.send(data)
            _forwarded.count += 1  # (handle() holds the handler's lock around emit)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _dump(self, record: logging.LogRecord) -> bytes:
        fields = dict(record.__dict__)
        fields["msg"] = record.getMessage()
        fields["args"] = None
        if record.exc_info:
            if not record.exc_text:
                fields["exc_text"] = self._formatter.formatException(record.exc_info)
            fields["exc_info"] = None
        fields.pop("message", None)
        if "item_index" not in fields:  # (a grandchild's record keeps its own)
            _where(fields)
        try:
            data = pickle.dumps(fields, pickle.HIGHEST_PROTOCOL)
        except Exception:
            for key, value in list(fields.items()):
                try:
                    pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
                except Exception:
                    fields[key] = _safe_repr(value)
            data = pickle.dumps(fields, pickle.HIGHEST_PROTOCOL)
        if len(data) > MAX_RECORD_BYTES:
            for key, value in list(fields.items()):
                if isinstance(value, str) and len(value) > 2 * _TEXT_KEEP:
                    cut = len(value) - 2 * _TEXT_KEEP
                    fields[key] = (
                        f"{value[:_TEXT_KEEP]}\n... ({cut} characters left out) ...\n"
                        f"{value[-_TEXT_KEEP:]}"
                    )
            data = pickle.dumps(fields, pickle.HIGHEST_PROTOCOL)
        return data


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__name__} object>"


def _where(fields: dict[str, Any]) -> None:
    """Name the item the record comes from: ``item_index``, or the batch and position
    for the parent to turn into one (``BATCH``, ``POSITION``); ``None`` outside a task."""
    task = _task
    fields["item_index"] = None
    if task.thread != threading.get_ident() or (task.base is None and task.batch is None):
        return
    position = task.where() if task.where is not None else 0
    if task.base is not None:
        fields["item_index"] = task.base + position
    else:
        fields[BATCH] = task.batch
        fields[POSITION] = position


def install(sock: socket.socket, levels: Levels) -> None:
    """In a child: send every record to the parent instead of the handlers it has.

    Every logger passes its records up to the root (the parent's own hierarchy decides
    where they go), and the root's only handler is the :class:`Forwarder`.  The user's
    initializer runs after this: handlers it adds see the records too.
    """
    global _sock
    sock.setblocking(True)
    _sock = Records(sock)
    root = logging.getLogger()
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            logger.handlers.clear()  # (fork: the parent's, which must not write twice)
            logger.propagate = True
    root.handlers.clear()
    root.addHandler(Forwarder(_sock))
    _apply(levels)


def _apply(levels: Levels) -> None:
    global _version
    version, named, disable = levels
    if version <= _version:
        return
    _version = version
    manager = logging.Logger.manager
    for name, logger in list(manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and name not in named:
            logger.setLevel(logging.NOTSET)
    for name, level in named.items():
        logging.getLogger(name or None).setLevel(level)
    logging.disable(disable)


def begin_task(
    base: int | None, where: Callable[[], int] | None = None, *, batch: int | None = None
) -> None:
    """The role's loop starts a task: its records name item ``base + where()`` (or, for a
    pipeline ``batch``, its position ``where()`` in it); levels the parent changed since
    apply from now."""
    task = _task
    task.base = base
    task.batch = batch
    task.where = where
    task.thread = threading.get_ident()
    records = _sock
    if records is None:
        return
    recv = records.sock.recv
    latest = None
    while True:
        try:
            data = recv(_RECV_BYTES, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            return
        if not data:
            break
        message = records.take(data) if records.framed else data
        if message is None:  # a piece of the levels
            continue
        with contextlib.suppress(Exception):
            latest = pickle.loads(message)
    if latest is not None:
        _apply(latest)


def count_items(done: list[Any]) -> None:
    """The list the running chunk appends one entry to per finished item (the running
    item's position is its length)."""
    _task.where = done.__len__


def end_task() -> None:
    """The task is over: records name no item until the next one begins."""
    _task.base = None
    _task.batch = None
    _task.where = None


def enabled() -> bool:
    """Is this process a child whose records go to its parent?"""
    return _sock is not None


def forwarded() -> Forwarded | None:
    """The count of records this process has sent to its parent; ``None`` when its
    records do not go there."""
    return _forwarded if _sock is not None else None
