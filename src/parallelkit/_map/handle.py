"""One worker process as the engine sees it: its handle, our end of its stream, its outbox.

::

    Engine ──post(frame)──▶ stream.out ──flush(): never blocking──▶ socket ──▶ worker
       ▲                    (the outbox)                                         │
       └──────────── stream.read() ◀──────────── socket ◀── replies ─────────────┘

A :class:`WorkerHandle` owns our end of its pipe (``stream``, a
:class:`~parallelkit._wire.stream.FrameStream` in its outbox mode: the engine posts, and
flushes when the pipe is writable; a blocking send could wait for ever on a worker that is
not reading -- itself stuck sending us a large result -- while we did not read) and the
reader of its result segments (``results``);
:meth:`~WorkerHandle.close` and :meth:`~WorkerHandle.drop_segments` release them.  The
process itself is started, reaped and closed by the engine.  :func:`wait_events` is the
engine's one wait: every stream to read, every sentinel, and the streams with an outbox
to write.
"""

from __future__ import annotations

import math
import multiprocessing.connection
import select
import socket
import time
from collections import deque
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Final

from parallelkit._map import worker as W
from parallelkit._map.job import Chunk
from parallelkit._wire.arena import ResultReader, remove_leftovers
from parallelkit._wire.stream import FrameStream, widen

_READABLE: Final = select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL


class WorkerHandle:
    """A worker process, our end of its pipe, and what the engine knows of its work."""

    __slots__ = (
        "born",
        "busy",
        "chunks",
        "dead",
        "fns",
        "head_since",
        "hung_up",
        "killed_at",
        "killed_for",
        "pid",
        "pipe_room",
        "process",
        "results",
        "sentinel",
        "slot",
        "stopping",
        "stream",
        "tasks_done",
    )

    def __init__(self, process: BaseProcess, conn: Connection, slot: int) -> None:
        self.process = process
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
        # the stream owns our end from now on (a dup of it: the Connection is closed here)
        try:
            sock = socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
        finally:
            conn.close()
        self.stream = FrameStream(sock, kinds=W.WORKER_KINDS)
        # A worker may hold a 2nd chunk (sent while it runs the 1st) only if both fit in its
        # pipe, so that the 2nd waits there rather than in our outbox.  (Not for safety: no
        # post ever blocks us.)
        self.pipe_room = widen(sock)  # bytes it may have unread in the pipe

    def close(self) -> None:
        """Close our end of its pipe; drop what we had not sent it yet."""
        self.stream.close()

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
    """Wait until one of ``objs`` (streams, file descriptors) is ready to read or the pipe
    of one of ``writers`` has room; ``(readable objs, writable writers)``."""
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
        fd = w.stream.fileno()
        writer_fds[fd] = w
        poller.register(fd, select.POLLOUT | (select.POLLIN if fd in by_fd else 0))
    ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
    events = poller.poll(ms)
    readable = [by_fd[fd] for fd, ev in events if fd in by_fd and ev & _READABLE]
    writable = [writer_fds[fd] for fd, ev in events if fd in writer_fds]
    return readable, writable
