"""Log records from children to the parent's handlers, for every role.

Each child gets one end of its own ``SOCK_SEQPACKET`` socket pair (:class:`LogPipe`),
handed to the child main by :func:`parallelkit._proc.lifecycle.start_child`::

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
result is handled before that result is seen.

Levels.  The child's loggers mirror the parent's: its levels (and ``logging.disable``)
when the child starts, then again whenever they change (pool workers and pipeline stages
pick the change up before their next task: the parent sends it down the same socket).
A record the parent's loggers would drop is neither formatted nor sent.  The parent
checks its current levels once more when a record arrives (a raised level applies at
once).  Whether the parent's levels changed is an O(1) check: any ``setLevel`` or
``logging.disable`` clears every logger's cache of ``isEnabledFor`` answers, ours too.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import socket
import sys
import threading
import traceback
from collections.abc import Iterable
from typing import Any, Final

MAX_RECORD_BYTES: Final = 64 * 1024  # bytes: a larger record has its texts shortened
_RECV_BYTES: Final = 2 * MAX_RECORD_BYTES + 4096  # a datagram never exceeds this
_TEXT_KEEP: Final = 8 * 1024  # characters kept of each long text of a too-large record
_LEVELS_LOGGER: Final = "parallelkit._levels"  # whose isEnabledFor cache says "unchanged"

# a snapshot of the parent's levels: (version, {logger name: level}, logging.disable level)
Levels = tuple[int, dict[str, int], int]

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

    __slots__ = ("child", "closed", "lock", "sent", "sock")

    def __init__(self) -> None:
        self.sock, self.child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.setblocking(False)
        self.lock = threading.Lock()  # read + handle as one step, when two threads drain
        self.sent = current_levels()
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def child_started(self) -> None:
        """Close our copy of the child's end (the child has its own now)."""
        self.child.close()

    def read(self) -> list[dict[str, Any]]:
        """Every record the child has sent so far (never blocks)."""
        records: list[dict[str, Any]] = []
        if self.closed:
            return records
        recv = self.sock.recv
        while True:
            try:
                data = recv(_RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                return records
            except OSError:
                return records
            if not data:  # the child's end is closed: nothing more will come
                return records
            try:
                records.append(pickle.loads(data))
            except Exception:  # a class of an extra attribute we cannot import: skip it
                continue

    def send_levels(self, levels: Levels) -> None:
        """Tell the child the parent's levels changed (it applies them at its next task)."""
        if self.closed or self.sent[0] >= levels[0]:
            return
        try:
            self.sock.send(pickle.dumps(levels))
        except OSError:  # full (it takes no task) or gone: sent again at the next change
            return
        self.sent = levels

    def close(self) -> None:
        """Close both ends we may hold (idempotent)."""
        self.closed = True
        self.sock.close()
        self.child.close()


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
    done: list[Any] | None = None  # one entry per finished item of the chunk
    thread: int | None = None  # the thread running it


_task = _Task()
_sock: socket.socket | None = None
_version = 0


class Forwarder(logging.Handler):
    """The child's one handler: sends each record to the parent as one datagram."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self._formatter = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = self._dump(record)
            self.sock.send(data)
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
            fields["item_index"] = _item_index()
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


def _item_index() -> int | None:
    task = _task
    if task.base is None or task.thread != threading.get_ident():
        return None
    done = task.done
    return task.base + (len(done) if done is not None else 0)


def install(sock: socket.socket, levels: Levels) -> None:
    """In a child: send every record to the parent instead of the handlers it has.

    Every logger passes its records up to the root (the parent's own hierarchy decides
    where they go), and the root's only handler is the :class:`Forwarder`.  The user's
    initializer runs after this: handlers it adds see the records too.
    """
    global _sock
    _sock = sock
    sock.setblocking(True)
    root = logging.getLogger()
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            logger.handlers.clear()  # (fork: the parent's, which must not write twice)
            logger.propagate = True
    root.handlers.clear()
    root.addHandler(Forwarder(sock))
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


def begin_task(base: int | None, done: list[Any] | None = None) -> None:
    """The role's loop starts a task: its records name item ``base + len(done)``
    (``base`` ``None``: no item); levels the parent changed since apply from now."""
    task = _task
    task.base = base
    task.done = done
    task.thread = threading.get_ident()
    sock = _sock
    if sock is None:
        return
    latest = None
    while True:
        try:
            data = sock.recv(_RECV_BYTES, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            return
        if not data:
            break
        with contextlib.suppress(Exception):
            latest = pickle.loads(data)
    if latest is not None:
        _apply(latest)


def count_items(done: list[Any]) -> None:
    """The list the running chunk appends one entry to per finished item."""
    _task.done = done


def end_task() -> None:
    """The task is over: records name no item until the next one begins."""
    _task.base = None
    _task.done = None


def enabled() -> bool:
    """Is this process a child whose records go to its parent?"""
    return _sock is not None
