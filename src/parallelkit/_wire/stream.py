"""A framed duplex stream over a connected socket that cannot deadlock when both ends write.

:class:`FrameStream` owns the bytes of one stream socket (a ``socketpair`` or TCP): the
frame layout, sending without blocking in the kernel, and the receive buffer.  What the
frames *mean* (their kinds, pickles, ids) is its users': ``_channel.channel``,
``_pipeline.messages`` and the pool's wire (``_map.worker``, ``_map.handle``).

One frame on the socket::

    kind (1 B) | pad (3 B) | n buffers (4 B) | body length (8 B)
    | id (8 B, only when the kind has an ID_FLAGS bit) | n buffer lengths (8 B each)
    | body | buffer 1 | ... | buffer n

Sending.  A frame leaves from its parts' own memory with one ``sendmsg`` (no
concatenation), except a small frame without buffers, which goes out in one ``send``
with its header.  Writes never block in the kernel (``MSG_DONTWAIT``): when the socket
buffer is full the peer is not reading, maybe because it is itself stuck writing to us.
An end sends in one of two ways (never both):

* :meth:`FrameStream.send` (one thread talking to one peer) waits for room, and while it
  waits it *drains* what the peer sends into our receive buffer (which grows as needed);
  its send completes, it reads, and so does ours.  (If another thread holds the receive
  lock meanwhile, it does the draining.)  A peer that posts reads whenever it can, so an
  end made with ``peer_posts`` waits in a plain blocking write instead.
* :meth:`FrameStream.post` (an event loop over many peers) never waits: what the socket
  does not take stays in the stream's outbox (:attr:`FrameStream.out`), and the loop calls
  :meth:`FrameStream.flush` when the socket is writable -- while it goes on reading every
  peer, which is what lets a peer stuck writing to it finish.

Receiving.  A small frame without buffers (the common case) is read into a reused buffer,
usually with one read, and handed out as a view of it; a large one is read straight
into buffers its user chose (:data:`Allocate`), and a timeout in its middle keeps what
arrived: the next read completes it.

Threads.  One lock per direction (:attr:`FrameStream.send_lock`,
:attr:`FrameStream.recv_lock`) keeps frames whole; :meth:`FrameStream.close` from another
thread wakes a thread blocked on the socket.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Final

from parallelkit import _platform
from parallelkit._util import fuzz as _fuzz
from parallelkit._wire import layouts

__all__ = ("Allocate", "FrameError", "FrameStream", "StreamEnd", "widen")

HEAD: Final = layouts.STREAM_HEAD  # kind, number of buffers, body length
ID: Final = layouts.STREAM_ID  # the frame's id
LEN: Final = layouts.STREAM_LEN  # a buffer's length
ID_FLAGS: Final = 0xC0  # kind bits that say an id follows the header (their meaning: the user's)
MAX_BUFFERS: Final = 1 << 16
BUFFER_SIZE: Final = 256 * 1024  # bytes: the reused receive buffer
SMALL: Final = 64 * 1024  # bytes: a body this small (no buffers) goes out with its header
IOV_MAX: Final = 512  # parts per sendmsg
WIDE_BUFFER: Final = 1024 * 1024  # bytes: the send buffer widen() asks for
ROOM_FLOOR: Final = 32 * 1024  # bytes a peer may surely leave unread (see widen)
_SEND_FLAGS: Final = socket.MSG_DONTWAIT | _platform.MSG_NOSIGNAL

Buffer = bytes | bytearray | memoryview
# Where a large frame is received: (kind, body length, buffer lengths) -> writable parts,
# the body's first; may raise FrameError to refuse the frame.
Allocate = Callable[[int, int, Sequence[int]], list[bytearray | memoryview]]
# A frame read: kind, id (0 without), body, buffers (None: a small frame whose body is a
# view of the receive buffer, valid while recv_lock is held -- release it).
Frame = tuple[int, int, memoryview | bytearray, list[bytearray | memoryview] | None]


class StreamEnd(Exception):
    """The connection ended: the peer closed or reset it, or this end was closed.

    ``__cause__`` is the ``OSError`` when there was one; :attr:`FrameStream.mid_frame`
    says whether it ended inside a frame.
    """


class FrameError(Exception):
    """The peer sent a frame this end refuses (the stream is unusable afterwards)."""

    def __init__(self, what: str, *, size: int | None = None) -> None:
        super().__init__(what)
        self.size = size  # set when the frame is larger than max_frame_bytes


class _Incoming:
    """A large frame being received: its parts fill in place, across reads."""

    __slots__ = ("ident", "index", "kind", "offset", "parts")

    def __init__(self, kind: int, ident: int, parts: list[bytearray | memoryview]) -> None:
        self.kind = kind
        self.ident = ident
        self.parts = parts
        self.index = 0
        self.offset = 0


def _fresh(kind: int, body: int, lengths: Sequence[int]) -> list[bytearray | memoryview]:
    return [bytearray(body), *map(bytearray, lengths)]


def ms(seconds: float) -> int:
    """``seconds`` as whole milliseconds for ``poll``, rounded up, never negative."""
    return max(0, math.ceil(seconds * 1000))


class FrameStream:
    """Frames over one connected stream socket, both ways (see the module docstring).

    Args:
        sock: a connected stream socket; the stream owns it from now on.
        kinds: the kind bytes (id flags included) a frame may have; others are a
            :class:`FrameError` as soon as the header arrives.
        max_frame_bytes: a larger frame (body and buffers) is a :class:`FrameError`
            before any of it is received; ``None``: no limit.
        peer_posts: the peer is an event loop that never waits to write to us (it posts)
            and reads whenever it can; a send that does not fit then waits in the kernel,
            a plain blocking write, rather than polling for room and draining.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        kinds: frozenset[int],
        max_frame_bytes: int | None = None,
        peer_posts: bool = False,
    ) -> None:
        sock.setblocking(True)
        self._peer_posts = peer_posts
        self.sock = sock
        self._fd = sock.fileno()
        self._kinds = kinds
        self._max = max_frame_bytes
        self.send_lock = threading.Lock()
        self.recv_lock = threading.Lock()  # the bytes: whoever reads or drains them
        self.out: list[Buffer] = []  # what post() left for flush(), oldest first
        self._rbuf = bytearray(BUFFER_SIZE)
        self._rview = memoryview(self._rbuf)
        self._rpos = 0
        self._rend = 0
        self._incoming: _Incoming | None = None
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLIN)
        self.closed = False
        self._drained_eof = False
        self.release = weakref.finalize(self, sock.close)  # closes the descriptor here only
        self._owner = os.getpid()  # a forked child's copy must never shut the socket down

    # ------------------------------------------------------------------ state
    @property
    def mid_frame(self) -> bool:
        """Whether part of a frame is received (or buffered) and the rest is not."""
        return self._incoming is not None or self._rend > self._rpos

    def ready(self, timeout_ms: int) -> bool:
        """Whether a read would not block: bytes buffered or arriving (or the socket broke)."""
        if self._rend > self._rpos:
            return True
        try:
            return bool(self._poller.poll(timeout_ms))
        except OSError:
            return True  # the socket broke: a read will say so

    def close(self) -> None:
        """Close the socket, waking a thread of ours blocked on it; idempotent.

        In a forked child's inherited copy, only the descriptor is closed: its locks may be
        held by threads that exist only in the parent, and ``shutdown`` would end the
        parent's connection too.
        """
        if self.closed:
            return
        self.closed = True
        self.out.clear()
        if os.getpid() != self._owner:
            self.release()
            return
        if _fuzz.ENABLED:
            _fuzz.point("stream.close")
        busy = self.recv_lock.locked() or self.send_lock.locked()
        if busy:  # wake them (this shuts the socket down for every process holding it)
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        got_recv = self.recv_lock.acquire(timeout=1.0)
        got_send = self.send_lock.acquire(timeout=1.0)
        try:
            self.release()
            self._poller = select.poll()
        finally:
            if got_send:
                self.send_lock.release()
            if got_recv:
                self.recv_lock.release()

    def abort(self) -> None:
        """Close the descriptor now, in this process only; a later send or read ends."""
        self.closed = True
        self.out.clear()
        self.release()

    # ------------------------------------------------------------------ sending
    def send(self, kind: int, ident: int, body: Buffer, buffers: Sequence[Buffer] = ()) -> None:
        """Send one frame (``ident`` is sent when ``kind`` has an :data:`ID_FLAGS` bit).

        Raises:
            StreamEnd: the connection is gone, or this end was closed.
        """
        if not buffers and len(body) <= SMALL:  # (_frame's one-part case, inline: the usual)
            head = HEAD.pack(kind, 0, len(body))
            self._write_one(head + ID.pack(ident) + body if kind & ID_FLAGS else head + body)
        else:
            self._write(_frame(kind, ident, body, buffers))

    def post(self, kind: int, ident: int, body: Buffer, buffers: Sequence[Buffer] = ()) -> None:
        """Send one frame without ever waiting: what the socket does not take now waits in
        :attr:`out` for :meth:`flush` (call it when the socket is writable).

        A peer that has gone is not reported here: its frames are dropped, and reading
        from it says that it ended.
        """
        out = self.out
        older = bool(out)
        out.extend(_frame(kind, ident, body, buffers))
        if not older:
            self.flush()

    def flush(self) -> bool:
        """Write what the socket takes now of :attr:`out`; whether all of it is written."""
        out = self.out
        while out:
            try:
                n = self.sock.sendmsg(out[:IOV_MAX], (), _SEND_FLAGS)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:  # the peer has gone: reading it says so
                out.clear()
                return True
            while n:
                size = _nbytes(out[0])
                if n < size:
                    out[0] = memoryview(out[0])[n:]
                    return False  # the socket is full
                n -= size
                del out[0]
        return True

    def fileno(self) -> int:
        """The socket's descriptor (to wait on it with others)."""
        return self._fd

    def _write_one(self, data: Buffer) -> None:
        with self.send_lock:
            try:
                n = self.sock.send(data, _SEND_FLAGS)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                raise StreamEnd from exc
            if n < len(data):
                self._write_locked([memoryview(data)[n:]])

    def _write(self, parts: list[Buffer]) -> None:
        with self.send_lock:
            self._write_locked(parts)

    def _write_locked(self, parts: list[Buffer]) -> None:
        sock = self.sock
        while parts:
            if self.closed:
                raise StreamEnd
            try:
                n = sock.sendmsg(parts[:IOV_MAX], (), _SEND_FLAGS)
            except BlockingIOError:
                if self._peer_posts:
                    self._write_blocking(parts)
                    return
                self._wait_writable()
                continue
            except OSError as exc:
                raise StreamEnd from exc
            while n:
                size = _nbytes(parts[0])
                if n >= size:
                    n -= size
                    del parts[0]
                else:
                    parts[0] = memoryview(parts[0])[n:]
                    n = 0
            while parts and not _nbytes(parts[0]):
                del parts[0]

    def _write_blocking(self, parts: list[Buffer]) -> None:
        """Write ``parts`` whole, waiting in the kernel for room (see ``peer_posts``)."""
        for part in parts:
            with memoryview(part) as view:
                at, size = 0, view.nbytes
                while at < size:
                    try:
                        at += os.write(self.sock.fileno(), view[at:])
                    except OSError as exc:
                        raise StreamEnd from exc

    def _wait_writable(self) -> None:
        """Wait for room in the socket buffer, draining what the peer sends meanwhile.

        The receive lock is held only while draining, never while waiting, so that a
        thread of ours that wants to receive is not kept out.
        """
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT | (0 if self._drained_eof else select.POLLIN))
        ready = poller.poll(200)
        if not ready or not ready[0][1] & select.POLLIN:
            return
        if self.recv_lock.acquire(blocking=False):
            try:
                if _fuzz.ENABLED:
                    _fuzz.point("stream.drain")
                self._drain()
            finally:
                self.recv_lock.release()
        elif not ready[0][1] & select.POLLOUT:
            # A thread of ours holds the receive lock: it reads, we only wait for room.
            poller.modify(self._fd, select.POLLOUT)
            poller.poll(20)

    def _drain(self) -> None:
        while True:
            if self._rend == len(self._rbuf):
                self._make_room(len(self._rbuf))
            try:
                n = self.sock.recv_into(self._rview[self._rend :], 0, socket.MSG_DONTWAIT)
            except OSError:  # BlockingIOError: all drained; else: a send will report it
                return
            if n == 0:
                self._drained_eof = True
                return
            self._rend += n

    # ------------------------------------------------------------------ receiving
    def read(self, deadline: float | None, allocate: Allocate = _fresh) -> Frame:
        """Read the next frame (hold :attr:`recv_lock`); see :data:`Frame`.

        Args:
            deadline: ``time.monotonic()`` by which it must be complete; ``None``: no limit.
            allocate: where a large frame's parts are received.

        Raises:
            TimeoutError: not complete in time (what arrived is kept for the next read).
            StreamEnd: the connection ended (:attr:`mid_frame`: inside a frame).
            FrameError: the peer sent a frame that is refused.
        """
        if self._incoming is None:
            if self._rend - self._rpos < HEAD.size:
                self._fill(HEAD.size, deadline)
            kind, nbufs, blen = HEAD.unpack_from(self._rbuf, self._rpos)
            if kind not in self._kinds or nbufs > MAX_BUFFERS:
                raise FrameError(f"an invalid frame header (kind {kind}, {nbufs} buffers)")
            head = HEAD.size
            ident = 0
            if kind & ID_FLAGS:
                head += ID.size
                if self._rend - self._rpos < head:
                    self._fill(head, deadline)
                (ident,) = ID.unpack_from(self._rbuf, self._rpos + HEAD.size)
            if nbufs == 0 and blen <= SMALL:
                if self._max is not None and blen > self._max:
                    raise FrameError("a frame too large", size=blen)
                end = self._rpos + head + blen
                if self._rend < end:
                    self._fill(head + blen, deadline)
                    end = self._rpos + head + blen
                start, self._rpos = self._rpos + head, end
                return kind, ident, self._rview[start:end], None
            self._begin_large(kind, ident, nbufs, blen, head, deadline, allocate)
        incoming = self._incoming
        assert incoming is not None
        self._fill_parts(incoming, deadline)
        self._incoming = None
        parts = incoming.parts
        return incoming.kind, incoming.ident, parts[0], parts[1:]

    def _begin_large(
        self,
        kind: int,
        ident: int,
        nbufs: int,
        blen: int,
        fixed: int,
        deadline: float | None,
        allocate: Allocate,
    ) -> None:
        head = fixed + LEN.size * nbufs
        if self._rend - self._rpos < head:
            self._fill(head, deadline)
        lengths = struct.unpack_from(f"<{nbufs}Q", self._rbuf, self._rpos + fixed)
        if self._max is not None and blen + sum(lengths) > self._max:
            raise FrameError("a frame too large", size=blen + sum(lengths))
        parts = allocate(kind, blen, lengths)
        self._rpos += head
        self._incoming = _Incoming(kind, ident, parts)

    def _make_room(self, need: int) -> None:
        """Make at least ``need`` bytes free after the buffered data."""
        if len(self._rbuf) - self._rend >= need:
            return
        size = self._rend - self._rpos
        if size + need <= len(self._rbuf):
            self._rview[:size] = self._rview[self._rpos : self._rend]  # memmove
        else:
            grown = bytearray(max(size + need, 2 * len(self._rbuf)))
            grown[:size] = self._rview[self._rpos : self._rend]
            self._rview.release()
            self._rbuf = grown
            self._rview = memoryview(grown)
        self._rpos, self._rend = 0, size

    def _read_into(self, view: memoryview, deadline: float | None) -> int:
        if deadline is not None:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._poller.poll(ms(remaining)):
                    if deadline - time.monotonic() <= 0:
                        raise TimeoutError("nothing arrived in time")
                    continue
                break
        try:
            # readv(2), not recv: the same bytes, accounted as this process's reads (rchar
            # in /proc/PID/io) like any pipe's; a closed socket's fileno() is -1 (EBADF)
            n = os.readv(self.sock.fileno(), [view])
        except OSError as exc:
            if self.closed:
                raise StreamEnd from None
            raise StreamEnd from exc
        if n == 0:
            raise StreamEnd
        return n

    def _fill(self, size: int, deadline: float | None) -> None:
        """Buffer at least ``size`` bytes of the current frame."""
        while self._rend - self._rpos < size:
            if self._rend == self._rpos:
                self._rpos = self._rend = 0
                if len(self._rbuf) > BUFFER_SIZE:  # shrink after a drained burst
                    self._rview.release()
                    self._rbuf = bytearray(BUFFER_SIZE)
                    self._rview = memoryview(self._rbuf)
            self._make_room(size - (self._rend - self._rpos))
            self._rend += self._read_into(self._rview[self._rend :], deadline)

    def _fill_parts(self, incoming: _Incoming, deadline: float | None) -> None:
        parts = incoming.parts
        while incoming.index < len(parts):
            part = parts[incoming.index]
            need = len(part) - incoming.offset
            if need == 0:
                incoming.index += 1
                incoming.offset = 0
                continue
            buffered = self._rend - self._rpos
            if buffered:
                n = min(buffered, need)
                part[incoming.offset : incoming.offset + n] = self._rview[
                    self._rpos : self._rpos + n
                ]
                self._rpos += n
                incoming.offset += n
                continue
            with memoryview(part) as whole, whole[incoming.offset :] as target:
                incoming.offset += self._read_into(target, deadline)


def widen(sock: socket.socket, nbytes: int = WIDE_BUFFER) -> int:
    """Ask for a send buffer of ``nbytes`` (the kernel may cap it); return how many payload
    bytes may wait unread by the peer before a write to ``sock`` would have to wait.

    On Linux, data of a Unix stream socket waiting to be read counts against the
    *sender's* ``SO_SNDBUF`` (the value read back is what the kernel accounts: the bytes
    plus their bookkeeping), so half of it is a safe bound.  Elsewhere, or if the socket
    refuses: :data:`ROOM_FLOOR`.
    """
    if not _platform.OFFERS.sockbuf or sock.family != socket.AF_UNIX:
        return ROOM_FLOOR
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 2 * nbytes:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, nbytes)
        return max(ROOM_FLOOR, sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2)
    except OSError:
        return ROOM_FLOOR


def _frame(kind: int, ident: int, body: Buffer, buffers: Sequence[Buffer]) -> list[Buffer]:
    """A frame's parts as they go out: its header with the body when both are small."""
    head = HEAD.pack(kind, len(buffers), len(body))
    if kind & ID_FLAGS:
        head += ID.pack(ident)
    if buffers:
        head += struct.pack(f"<{len(buffers)}Q", *map(_nbytes, buffers))
        return [head, body, *buffers] if len(body) else [head, *buffers]
    if len(body) <= SMALL:
        return [head + body]
    return [head, body]


def _nbytes(part: Buffer) -> int:
    return part.nbytes if isinstance(part, memoryview) else len(part)
