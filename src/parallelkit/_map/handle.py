"""One worker process as the engine sees it: its handle, our end of its pipe, its outbox.

::

    Engine ──post(msg)──▶ handle.out ──flush(): send, never blocking──▶ pipe ──▶ worker
       ▲                  (the outbox)                                         │
       └──────────── conn.recv_bytes() ◀──────────── pipe ◀── replies ─────────┘

A :class:`WorkerHandle` owns our end of its pipe (``conn``, and ``sock``, a dup of it that
we send through), what waits to be sent (``out``), and the reader of its result segments
(``results``); :meth:`~WorkerHandle.close` and :meth:`~WorkerHandle.drop_segments` release
them.  The process itself is started, reaped and closed by the engine.  :func:`wait_events` is the
engine's one wait: every pipe to read, every sentinel, and the pipes with an outbox to write.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing.connection
import select
import socket
import time
from collections import deque
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Final

from parallelkit import _platform
from parallelkit._map.job import Chunk
from parallelkit._wire import layouts
from parallelkit._wire.arena import ResultReader, remove_leftovers
from parallelkit._wire.stream import ROOM_FLOOR, widen

# multiprocessing.Connection's framing (its layouts: _wire/layouts.py)
_LEN: Final = layouts.CONNECTION_LEN
_LONG_LEN: Final = layouts.CONNECTION_LONG_LEN
_SEND_FLAGS: Final = socket.MSG_DONTWAIT | _platform.MSG_NOSIGNAL
_SMALL: Final = 16 * 1024  # bytes: a message this small goes out with its header in one piece
_READABLE: Final = select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL


class WorkerHandle:
    """A worker process, our end of its pipe, and what the engine knows of its work."""

    __slots__ = (
        "born",
        "busy",
        "chunks",
        "conn",
        "dead",
        "fns",
        "head_since",
        "hung_up",
        "killed_at",
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
        self.chunks: deque[Chunk] = deque()  # sent to it, oldest (the one it runs) first
        self.fns: dict[int, None] = {}  # ids of the functions it has (its cache, mirrored)
        self.tasks_done = 0
        self.stopping = False
        self.dead = False
        self.head_since = 0
        self.hung_up = False  # its end of the pipe is closed: wait for its sentinel only
        self.killed_for: BaseException | None = None  # a timeout we killed it for
        # ...and the chunk and item it ran then: it may finish that chunk and start its next
        # one before the signal lands, and the next one is not to blame
        self.killed_at: tuple[Chunk, int] | None = None
        self.busy = 0.0  # seconds it spent running chunks, as it measured them
        self.born = time.monotonic()
        self.results: ResultReader | None = None  # its result segments, once it sent some
        # what we send it goes through `sock` (a dup of our end), never blocking: `out`
        # holds what the pipe did not take yet (see post)
        self.sock: socket.socket | None = None
        with contextlib.suppress(OSError):  # not a socket (another platform): blocking sends
            self.sock = socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
        self.out: deque[memoryview] = deque()
        # A worker may hold a 2nd chunk (sent while it runs the 1st) only if both fit in its
        # pipe, so that the 2nd waits there rather than in our outbox.  (Not for safety: no
        # send ever blocks us, see post.)
        self.pipe_room = ROOM_FLOOR if self.sock is None else widen(self.sock)

    def post(self, data: bytes) -> None:
        """Send ``data`` as one message, without ever blocking: what the pipe does not take
        now waits in ``out``, written by :meth:`flush` as the pipe drains (the engine waits
        for that as well).  A blocking send could wait for ever on a worker that is not
        reading -- itself blocked sending us a large result -- while we did not read."""
        n = len(data)
        if self.sock is None:  # pragma: no cover - not Linux: the old blocking way
            with contextlib.suppress(OSError):
                self.conn.send_bytes(data)
            return
        head = _LEN.pack(n) if n <= 0x7FFFFFFF else _LONG_LEN.pack(-1, n)
        if n <= _SMALL:
            self.out.append(memoryview(head + data))
        else:
            self.out.append(memoryview(head))
            self.out.append(memoryview(data))
        if len(self.out) <= 2:  # nothing older waits: try now
            self.flush()

    def flush(self) -> None:
        """Write what the pipe takes now of what waits in ``out``."""
        out, sock = self.out, self.sock
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

    def close(self) -> None:
        """Close our end of its pipe; drop what we had not sent it yet."""
        self.out.clear()
        if self.sock is not None:
            self.sock.close()
        self.conn.close()

    def drop_segments(self, *, gone: bool) -> None:
        """Unmap its result segments; unlink any it left (``gone``: it has exited)."""
        if self.results is not None:
            self.results.close()
            self.results = None
        if gone and self.pid is not None:
            remove_leftovers(self.pid)


def wait_events(
    objs: list[Any], writers: list[WorkerHandle], timeout: float | None
) -> tuple[list[Any], list[WorkerHandle]]:
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
    writer_fds: dict[int, WorkerHandle] = {}
    for w in writers:
        fd = w.conn.fileno()
        writer_fds[fd] = w
        poller.register(fd, select.POLLOUT | (select.POLLIN if fd in by_fd else 0))
    ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
    events = poller.poll(ms)
    readable = [by_fd[fd] for fd, ev in events if fd in by_fd and ev & _READABLE]
    writable = [writer_fds[fd] for fd, ev in events if fd in writer_fds]
    return readable, writable
