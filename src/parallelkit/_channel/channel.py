"""Duplex channels: typed connections between two processes, on one host or across hosts.

This module owns the transport (:class:`Channel`, :func:`channel_pair`);
``_channel_process.py`` adds processes that serve a channel (:func:`start_process`),
``_channel_net.py`` listeners and connections across hosts, ``_handshake.py`` their
authentication.

A :class:`Channel` is one end of a stream socket (a ``socketpair`` between processes of
one host, TCP across hosts) carrying framed messages::

    frame = kind (1 B) | pad (3 B) | n out-of-band buffers (4 B) | pickle length (8 B)
            | n buffer lengths (8 B each) | pickle bytes | buffer 1 | ... | buffer n

Speed.  Objects are pickled with protocol 5; what pickle hands out of band (numpy arrays,
``PickleBuffer``) and a top-level ``bytes`` or ``bytearray`` of 64 KiB or more are written
straight from their own memory with one ``sendmsg`` (no concatenation), and received
with ``recv_into`` straight into their final buffer (a ``bytes``, which cannot be written
into, into a reused one, then copied once).  Small messages go out in one ``send`` and
come in through a reused 256 KiB buffer, usually one ``recv`` each.

No deadlock when both ends send large messages at once.  Writes never block in the
kernel (``MSG_DONTWAIT``).  When the socket buffer is full the peer is not reading, maybe
because it is itself stuck writing to us, so while we wait for room we *drain* whatever
it sends into our receive buffer (which grows as needed); its send completes, it reads,
and so does ours.  ``recv`` later takes the drained messages from that buffer.  (If
another thread of ours is receiving meanwhile, it does the draining.)

Threads.  One lock per direction keeps frames whole with several senders or receivers.
``close()`` from another thread wakes a thread blocked in ``recv``.

The other end gone, however it went (closed, exited, killed in the middle of a message),
is :class:`~parallelkit.errors.ChannelClosedError`; a timeout is :class:`TimeoutError`
and leaves the channel usable (a partly received message is kept and completed by the
next ``recv``).

Security.  A channel unpickles what the other end sends: whoever can send to it can run
code in this process.  ``Channel.listen`` / ``Channel.connect`` therefore require a key
of at least 16 bytes, and nothing is unpickled before both ends proved they hold it (see
``_handshake.py``).  The traffic is *not* encrypted: use it on trusted networks, or
tunnel it (SSH, WireGuard, stunnel).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import pickle
import select
import socket
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Final, Generic, Self, overload

from parallelkit._util import fuzz as _fuzz
from parallelkit._util.checks import check_timeout
from parallelkit._wire import handshake as _handshake
from parallelkit._wire.codec import ExceptionRecord, check_single_host, rebuild_exception
from parallelkit.errors import ChannelClosedError, SerializationError

if TYPE_CHECKING:
    from typing_extensions import TypeVar

    from parallelkit._channel.net import ChannelListener
else:
    from typing import TypeVar

__all__ = ("Channel", "channel_pair")

# Defaults (PEP 696) for the type checker only: an end whose types are not given is a
# Channel[object, object] rather than an error ("need type annotation").
if TYPE_CHECKING:
    SendT = TypeVar("SendT", contravariant=True, default=object)  # noqa: PLC0105 - public names
    RecvT = TypeVar("RecvT", covariant=True, default=object)  # noqa: PLC0105
    A = TypeVar("A", default=object)
    B = TypeVar("B", default=object)
else:
    SendT = TypeVar("SendT", contravariant=True)  # noqa: PLC0105 - the public names
    RecvT = TypeVar("RecvT", covariant=True)  # noqa: PLC0105
    A = TypeVar("A")
    B = TypeVar("B")

# ------------------------------------------------------------------ wire format
HEAD: Final = struct.Struct("<BxxxIQ")  # kind, number of out-of-band buffers, pickle length
HEAD_SIZE: Final = HEAD.size
LEN: Final = struct.Struct("<Q")
MESSAGE: Final = 1  # pickle + out-of-band buffers
BYTES: Final = 2  # a top-level bytes: one buffer, no pickle
BYTEARRAY: Final = 3  # a top-level bytearray: one buffer, no pickle
FAILED: Final = 4  # a start_process target raised: a pickled ExceptionRecord
KINDS: Final = frozenset((MESSAGE, BYTES, BYTEARRAY, FAILED))
# Tags on the kind byte: the frame carries a request id (8 bytes after HEAD).
REQUEST: Final = 0x40  # sent by request(): the receiving thread's next send answers it
REPLY: Final = 0x80  # the answer to the request with that id
TAGS: Final = REQUEST | REPLY
ID: Final = struct.Struct("<Q")
MAX_BUFFERS: Final = 1 << 16

BUFFER_SIZE: Final = 256 * 1024  # the reused receive buffer
RAW_MIN: Final = 64 * 1024  # a top-level bytes/bytearray this large goes without pickle
SMALL: Final = 64 * 1024  # a pickle this small goes out in one send with its header
SCRATCH_MAX: Final = 16 * 1024 * 1024  # a top-level bytes up to this size: a reused buffer
IOV_MAX: Final = 512
PROTOCOL: Final = 5
_SEND_FLAGS: Final = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_CLOSED_HERE: Final = "this end of the channel is closed (close() was called on it)"
DEFAULT_ADDRESS: Final = ("127.0.0.1", 0)


class _Incoming:
    """A large message being received: its parts fill in place, across ``recv`` calls."""

    __slots__ = ("index", "kind", "offset", "parts", "request_id", "tag")

    def __init__(
        self, kind: int, parts: list[bytearray | memoryview], tag: int, request_id: int
    ) -> None:
        self.kind = kind
        self.parts = parts
        self.tag = tag
        self.request_id = request_id
        self.index = 0
        self.offset = 0


class _EOF(Exception):
    """The socket reached end of file (internal)."""


def _raw(buffer: pickle.PickleBuffer) -> memoryview:
    try:
        return buffer.raw()
    except BufferError:  # not contiguous: one copy
        return memoryview(memoryview(buffer).tobytes())


def _ms(seconds: float) -> int:
    return max(0, math.ceil(seconds * 1000))


class Channel(Generic[SendT, RecvT]):
    """One end of a duplex connection: sends ``SendT``, receives ``RecvT``.

    Get one from :func:`channel_pair`, :func:`start_process`, :meth:`listen` or
    :meth:`connect`.  Messages are whole pickled objects, delivered in order.  A channel is
    a context manager, and iterating over it receives until the other end closes.

    Example:
        >>> left, right = channel_pair()
        >>> left.send([1, 2])
        >>> right.recv(timeout=5)
        [1, 2]
        >>> left.close(); right.close()

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_message_bytes: int | None = None,
        peer: str = "the other end",
    ) -> None:
        """Wrap a connected stream socket (internal: use the functions above)."""
        sock.setblocking(True)
        self._sock = sock
        self._fd = sock.fileno()
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()  # the bytes: whoever reads or drains them
        # Messages by who asked: one thread at a time reads frames (the reader) and files
        # them; plain ones in _inbox for recv(), replies in _replies for their request.
        self._mutex = threading.Lock()  # `with` on it directly: cheaper than the condition's
        self._cond = threading.Condition(self._mutex)
        self._inbox: deque[tuple[object, int]] = deque()  # (message, request id or 0)
        self._replies: dict[int, object] = {}
        self._waiting: set[int] = set()  # requests waiting for their reply
        self._reading = False
        self._sleepers = 0
        self._request_ids = itertools.count(1)
        self._local = threading.local()  # .pending: requests this thread received, unanswered
        self._tag = 0  # tag and request id of the frame _recv just returned
        self._tag_id = 0
        self._rbuf = bytearray(BUFFER_SIZE)
        self._rview = memoryview(self._rbuf)
        self._scratch = bytearray()  # where a large top-level bytes is received
        self._rpos = 0
        self._rend = 0
        self._incoming: _Incoming | None = None
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLIN)
        self._closed = False
        self._eof = False  # the other end closed between two messages
        self._drained_eof = False
        self._broken: tuple[str, BaseException | None] | None = None
        self._max = _check_max(max_message_bytes)
        self._peer = peer
        self._finalizer = weakref.finalize(self, sock.close)
        self._owner = os.getpid()  # a forked child's copy must never shut the socket down

    # ------------------------------------------------------------------ public API
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called on this end."""
        return self._closed

    def send(self, obj: SendT) -> None:
        """Send ``obj`` (pickled; large buffers straight from their own memory).

        Blocks while the other end is not reading and the socket buffer is full, receiving
        what it sends meanwhile, so two ends sending large messages at once cannot
        deadlock.  Safe to call from several threads.

        Raises:
            ChannelClosedError: the other end is gone, or this end was closed.
            SerializationError: ``obj`` cannot be pickled (nothing was sent).
        """
        pending: deque[int] | None = getattr(self._local, "pending", None)
        if pending:
            # the answer to the oldest request this thread received and did not answer
            self._send(obj, REPLY, pending[0])
            pending.popleft()
        else:
            self._send(obj, 0, 0)

    def _send(self, obj: object, tag: int, request_id: int) -> None:
        if self._closed:
            raise ChannelClosedError(_CLOSED_HERE)
        cls = type(obj)
        tagged = ID.pack(request_id) if tag else b""
        if (cls is bytes or cls is bytearray) and len(obj) >= RAW_MIN:  # type: ignore[arg-type]
            kind = BYTES if cls is bytes else BYTEARRAY
            size = len(obj)  # type: ignore[arg-type]
            head = HEAD.pack(kind | tag, 1, 0) + tagged + LEN.pack(size)
            self._write([head, obj])  # type: ignore[list-item]
            return
        buffers: list[pickle.PickleBuffer] = []
        try:
            data = pickle.dumps(obj, PROTOCOL, buffer_callback=buffers.append)
        except Exception:
            buffers = []
            data = _dumps_fallback(obj)
        if buffers:
            views = [_raw(b) for b in buffers]
            head = (
                HEAD.pack(MESSAGE | tag, len(views), len(data))
                + tagged
                + struct.pack(f"<{len(views)}Q", *(v.nbytes for v in views))
            )
            self._write([head, data, *views])
        elif len(data) <= SMALL:
            self._write_one(HEAD.pack(MESSAGE | tag, 0, len(data)) + tagged + data)
        else:
            self._write([HEAD.pack(MESSAGE | tag, 0, len(data)) + tagged, data])

    def recv(self, timeout: float | None = None) -> RecvT:
        """Receive the next object.

        Args:
            timeout: seconds to wait; ``None`` waits until a message or the end comes.

        Raises:
            TimeoutError: nothing complete arrived in time (the channel stays usable).
            ChannelClosedError: the other end is gone (closed, exited or killed, even in the
                middle of a message), or this end was closed.
            SerializationError: the message arrived but cannot be unpickled here.
        """
        timeout = check_timeout(timeout, zero_ok=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._wait(0, deadline)  # type: ignore[return-value]  # what the peer sent

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether :meth:`recv` would not block: a message or the end is there.

        Args:
            timeout: seconds to wait for one; ``None`` waits forever, ``0`` not at all.
        """
        timeout = check_timeout(timeout, zero_ok=True)
        if self._closed:
            raise ChannelClosedError(_CLOSED_HERE)
        if self._inbox or self._rend > self._rpos or self._broken is not None or self._eof:
            return True
        try:
            return bool(self._poller.poll(-1 if timeout is None else _ms(timeout)))
        except OSError:
            return True  # the socket broke: recv() will say so

    def request(self, obj: SendT, timeout: float | None = None) -> RecvT:
        """Send ``obj`` and receive the reply to it: a request/response round trip.

        The request carries an id, and the other end's reply carries it back: the reply
        is what the thread that received the request (with ``recv`` or by iterating) sends
        next on that end -- so a server written as ``for x in channel: channel.send(f(x))``
        answers correctly, in one thread or in several that each receive and answer.
        Therefore:

        - each ``request`` returns the reply to *its* request, also when several threads
          make requests on one channel at once (they are not serialized), and ``recv``
          never returns a reply;
        - after :class:`TimeoutError`, the request stays sent (the other end may still
          answer it), and its late reply is discarded when it arrives: it is never
          returned to another request nor to ``recv``; the channel stays usable.

        ``timeout`` bounds the wait for the reply; sending the request waits, as
        :meth:`send` does, only while the other end reads nothing and the socket buffer is
        full.

        Raises:
            TimeoutError: no reply within ``timeout`` seconds.
            ChannelClosedError: the other end is gone.
        """
        timeout = check_timeout(timeout, zero_ok=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        request_id = next(self._request_ids)
        with self._mutex:
            self._waiting.add(request_id)
        try:
            if _fuzz.ENABLED:
                _fuzz.point("channel.request.before_send")
            self._send(obj, REQUEST, request_id)
            return self._wait(request_id, deadline)  # type: ignore[return-value]
        finally:
            with self._mutex:
                self._waiting.discard(request_id)
                self._replies.pop(request_id, None)

    def _wait(self, request_id: int, deadline: float | None) -> object:
        """The reply to ``request_id``, or (0) the next message that is not a reply.

        One thread at a time reads frames and files each where it belongs; the others
        wait for theirs on the condition, or take over reading when it is free.
        """
        cond, mutex = self._cond, self._mutex
        while True:
            with mutex:
                while True:
                    if request_id:
                        if request_id in self._replies:
                            return self._replies.pop(request_id)
                    elif self._inbox:
                        message, asked = self._inbox.popleft()
                        if asked:
                            self._received_request(asked)
                        return message
                    if not self._reading:
                        self._reading = True
                        break
                    if deadline is None:
                        self._sleepers += 1
                        cond.wait()
                        self._sleepers -= 1
                    else:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise TimeoutError(_timeout_message(request_id))
                        self._sleepers += 1
                        cond.wait(left)
                        self._sleepers -= 1
            try:
                message = self._read_one(deadline, request_id)
            except BaseException:
                with mutex:
                    self._reading = False
                    if self._sleepers:
                        cond.notify_all()
                raise
            tag, tag_id = self._tag, self._tag_id
            with mutex:
                self._reading = False
                mine = False
                if tag == REPLY:
                    if tag_id == request_id:
                        mine = True
                    elif tag_id in self._waiting:
                        self._replies[tag_id] = message
                    # else: the reply to a request that gave up: discarded
                    elif _fuzz.ENABLED:
                        _fuzz.point("channel.late_reply_dropped")
                elif not request_id and not self._inbox:
                    mine = True
                else:
                    self._inbox.append((message, tag_id if tag == REQUEST else 0))
                if self._sleepers:
                    cond.notify_all()
            if mine:
                if tag == REQUEST:
                    self._received_request(tag_id)
                return message

    def _read_one(self, deadline: float | None, request_id: int) -> object:
        """Read one frame (as the reader); its tag is left in ``_tag`` / ``_tag_id``."""
        if deadline is None:
            self._recv_lock.acquire()
        elif not self._recv_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError(_timeout_message(request_id))
        try:
            if _fuzz.ENABLED:
                _fuzz.point("channel.read_one")
            return self._recv(deadline)
        except TimeoutError:
            if request_id:
                raise TimeoutError(_timeout_message(request_id)) from None
            raise
        finally:
            self._recv_lock.release()

    def _received_request(self, request_id: int) -> None:
        """This thread got a request: its next ``send`` on this end is the reply."""
        pending: deque[int] | None = getattr(self._local, "pending", None)
        if pending is None:
            pending = self._local.pending = deque()
        pending.append(request_id)

    def close(self) -> None:
        """Close this end; the other end's ``recv`` then raises ChannelClosedError.

        Idempotent.  A thread of this process blocked in ``recv`` or ``send`` on this end
        wakes up with :class:`ChannelClosedError`.
        """
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._owner:
            # An inherited copy (fork): its locks may be held by threads that exist only
            # in the parent, and shutdown() would end the parent's connection too.
            self._finalizer()
            return
        if _fuzz.ENABLED:
            _fuzz.point("channel.close")
        busy = self._recv_lock.locked() or self._send_lock.locked()
        if busy:  # wake them (this shuts the socket down for every process holding it)
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        got_recv = self._recv_lock.acquire(timeout=1.0)
        got_send = self._send_lock.acquire(timeout=1.0)
        try:
            self._finalizer()
            self._poller = select.poll()
        finally:
            if got_send:
                self._send_lock.release()
            if got_recv:
                self._recv_lock.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[RecvT]:
        """Receive until the other end closes cleanly (or this end is closed).

        A peer that dies in the middle of a message, or a ``start_process`` target that
        raises, still raises :class:`ChannelClosedError`.
        """
        while True:
            try:
                yield self.recv()
            except ChannelClosedError:
                if self._eof or self._closed:
                    return
                raise

    def __reduce__(self) -> tuple[object, ...]:
        # Only multiprocessing can send a socket, while it starts a process (spawn and
        # forkserver pass the descriptor along); plain pickle refuses it.
        if self._closed:
            raise ChannelClosedError(_CLOSED_HERE)
        check_single_host(self)
        return (_rebuild, (self._sock, self._max, self._peer))

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {state} to {self._peer}>"

    @classmethod
    def listen(
        cls,
        address: tuple[str, int] = DEFAULT_ADDRESS,
        *,
        authkey: bytes,
        max_message_bytes: int | None = None,
        handshake_timeout: float = _handshake.DEFAULT_HANDSHAKE_TIMEOUT,
        backlog: int = 16,
    ) -> ChannelListener[SendT, RecvT]:
        """Listen for authenticated channels on a TCP address.

        Args:
            address: ``(host, port)`` to bind; the default is loopback only, on a free
                port (read the bound one from ``.address``).  Bind to ``"0.0.0.0"`` only
                on a trusted network: the traffic is not encrypted.
            authkey: the shared secret, at least 16 bytes (``os.urandom(32)``).  Anyone
                who holds it can run code in this process through pickle.
            max_message_bytes: close a channel whose peer sends a larger message.
            handshake_timeout: seconds a client gets to authenticate.
            backlog: pending connections the kernel queues.

        Raises:
            TypeError: ``authkey`` is not bytes.
            ValueError: ``authkey`` is shorter than 16 bytes, or an option is invalid.
            OSError: the address cannot be bound.
        """
        from parallelkit._channel.net import ChannelListener  # noqa: PLC0415 - only across hosts

        return ChannelListener(
            address,
            authkey=authkey,
            max_message_bytes=max_message_bytes,
            handshake_timeout=handshake_timeout,
            backlog=backlog,
        )

    @classmethod
    def connect(
        cls,
        address: tuple[str, int],
        *,
        authkey: bytes,
        timeout: float | None = None,
        max_message_bytes: int | None = None,
        handshake_timeout: float = _handshake.DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> Channel[SendT, RecvT]:
        """Connect to a :meth:`listen` er and authenticate both ways.

        Args:
            address: the listener's ``(host, port)``.
            authkey: the listener's key (at least 16 bytes).
            timeout: seconds for the TCP connection (``None``: the system's default).
            max_message_bytes: close the channel if the peer sends a larger message.
            handshake_timeout: seconds for the authentication.

        Raises:
            multiprocessing.AuthenticationError: the keys differ, the listener is not a
                parallelkit one, or it did not answer within ``handshake_timeout``.
            OSError: the connection failed (refused, unreachable, timed out).
        """
        from parallelkit._channel.net import connect  # noqa: PLC0415 - only where channels cross hosts

        return connect(
            address,
            authkey=authkey,
            timeout=timeout,
            max_message_bytes=max_message_bytes,
            handshake_timeout=handshake_timeout,
        )

    # ------------------------------------------------------------------ sending
    def _write_one(self, data: bytes) -> None:
        with self._send_lock:
            try:
                n = self._sock.send(data, _SEND_FLAGS)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                raise self._gone_error(exc) from exc
            if n < len(data):
                self._write_locked([memoryview(data)[n:]])

    def _write(self, parts: list[bytes | memoryview]) -> None:
        with self._send_lock:
            self._write_locked(parts)

    def _write_locked(self, parts: list[bytes | memoryview]) -> None:
        sock = self._sock
        while parts:
            if self._closed:
                raise ChannelClosedError(_CLOSED_HERE)
            try:
                n = sock.sendmsg(parts[:IOV_MAX], (), _SEND_FLAGS)
            except BlockingIOError:
                self._wait_writable()
                continue
            except OSError as exc:
                raise self._gone_error(exc) from exc
            while n:
                size = len(parts[0])
                if n >= size:
                    n -= size
                    del parts[0]
                else:
                    parts[0] = memoryview(parts[0])[n:]
                    n = 0
            while parts and not len(parts[0]):
                del parts[0]

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
        if self._recv_lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._recv_lock.release()
        elif not ready[0][1] & select.POLLOUT:
            # A thread of ours holds the receive lock: it reads, we only wait for room.
            poller.modify(self._fd, select.POLLOUT)
            poller.poll(20)

    def _drain(self) -> None:
        while True:
            if self._rend == len(self._rbuf):
                self._make_room(len(self._rbuf))
            try:
                n = self._sock.recv_into(self._rview[self._rend :], 0, socket.MSG_DONTWAIT)
            except OSError:  # BlockingIOError: all drained; else: send() will report it
                return
            if n == 0:
                self._drained_eof = True
                return
            self._rend += n

    # ------------------------------------------------------------------ receiving
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
                if remaining <= 0 or not self._poller.poll(_ms(remaining)):
                    if deadline - time.monotonic() <= 0:
                        raise TimeoutError("no message arrived in time")
                    continue
                break
        try:
            n = self._sock.recv_into(view)
        except OSError as exc:
            if self._closed:
                raise ChannelClosedError(_CLOSED_HERE) from None
            raise _EOF from exc
        if n == 0:
            raise _EOF
        return n

    def _fill(self, size: int, deadline: float | None) -> None:
        """Buffer at least ``size`` bytes of the current message."""
        while self._rend - self._rpos < size:
            if self._rend == self._rpos:
                self._rpos = self._rend = 0
                if len(self._rbuf) > BUFFER_SIZE:  # shrink after a drained burst
                    self._rview.release()
                    self._rbuf = bytearray(BUFFER_SIZE)
                    self._rview = memoryview(self._rbuf)
            self._make_room(size - (self._rend - self._rpos))
            self._rend += self._read_into(self._rview[self._rend :], deadline)

    def _recv(self, deadline: float | None) -> object:
        if self._closed:
            raise ChannelClosedError(_CLOSED_HERE)
        if self._broken is not None:
            message, cause = self._broken
            raise ChannelClosedError(message) from cause
        try:
            if self._incoming is None:
                if self._rend - self._rpos < HEAD_SIZE:
                    self._fill(HEAD_SIZE, deadline)
                kind, nbufs, plen = HEAD.unpack_from(self._rbuf, self._rpos)
                head = HEAD_SIZE
                tag = kind & TAGS
                request_id = 0
                if tag:
                    kind ^= tag
                    if tag == TAGS:
                        self._protocol_error(f"an invalid frame header (kind {kind | tag})")
                    head += ID.size
                    if self._rend - self._rpos < head:
                        self._fill(head, deadline)
                    (request_id,) = ID.unpack_from(self._rbuf, self._rpos + HEAD_SIZE)
                if kind == MESSAGE and nbufs == 0 and plen <= SMALL:
                    if self._max is not None and plen > self._max:
                        self._too_large(plen)
                    end = self._rpos + head + plen
                    if self._rend < end:
                        self._fill(head + plen, deadline)
                        end = self._rpos + head + plen
                    start, self._rpos = self._rpos + head, end
                    self._tag, self._tag_id = tag, request_id
                    with self._rview[start:end] as data:
                        return self._loads(data, None)
                self._begin_large(kind, nbufs, plen, deadline, head, tag, request_id)
            incoming = self._incoming
            assert incoming is not None
            self._fill_parts(incoming, deadline)
        except _EOF as eof:
            raise self._gone_error(eof.__cause__) from eof.__cause__
        self._incoming = None
        self._tag, self._tag_id = incoming.tag, incoming.request_id
        parts = incoming.parts
        if incoming.kind == MESSAGE:
            return self._loads(parts[0], parts[1:])  # type: ignore[arg-type]  # bytearrays
        if incoming.kind == BYTES:
            received = parts[1]
            result = bytes(received)
            if isinstance(received, memoryview):
                received.release()  # of the scratch buffer
            return result
        if incoming.kind == BYTEARRAY:
            return parts[1]
        record = pickle.loads(parts[0])  # FAILED
        raise self._target_failed(record)

    def _begin_large(
        self,
        kind: int,
        nbufs: int,
        plen: int,
        deadline: float | None,
        fixed: int,
        tag: int,
        request_id: int,
    ) -> None:
        raw = kind in (BYTES, BYTEARRAY)
        if kind not in KINDS or nbufs > MAX_BUFFERS or (raw and (nbufs != 1 or plen)):
            self._protocol_error(f"an invalid frame header (kind {kind}, {nbufs} buffers)")
        head = fixed + 8 * nbufs
        if self._rend - self._rpos < head:
            self._fill(head, deadline)
        lengths = struct.unpack_from(f"<{nbufs}Q", self._rbuf, self._rpos + fixed)
        if self._max is not None and plen + sum(lengths) > self._max:
            self._too_large(plen + sum(lengths))
        self._rpos += head
        parts: list[bytearray | memoryview]
        if kind == BYTES and lengths[0] <= SCRATCH_MAX:
            # The bytes object is made by one copy at the end, so receive into a buffer
            # kept for the purpose: allocating (and page-faulting) a fresh one per message
            # costs more than the copy.
            if len(self._scratch) < lengths[0]:
                self._scratch = bytearray(lengths[0])
            parts = [bytearray(), memoryview(self._scratch)[: lengths[0]]]
        else:
            parts = [bytearray(plen), *map(bytearray, lengths)]
        self._incoming = _Incoming(kind, parts, tag, request_id)

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

    def _loads(self, data: memoryview | bytearray, buffers: list[bytearray] | None) -> object:
        try:
            return pickle.loads(data, buffers=buffers)
        except Exception as exc:
            raise SerializationError(
                f"a message from {self._peer} cannot be unpickled here: "
                f"{type(exc).__name__}: {exc}",
                what="argument",
            ) from exc

    # ------------------------------------------------------------------ failures
    def _gone_error(self, cause: BaseException | None) -> ChannelClosedError:
        if self._closed:
            return ChannelClosedError(_CLOSED_HERE)
        mid = self._incoming is not None or self._rend > self._rpos
        if mid:
            message = f"{self._peer} went away in the middle of a message{self._exit_note()}"
            self._broken = (message, cause)
        else:
            message = f"{self._peer} closed the channel{self._exit_note()}"
            self._eof = True
        error = ChannelClosedError(message)
        error.__cause__ = cause
        return error

    def _exit_note(self) -> str:
        return ""

    def _target_failed(self, record: ExceptionRecord) -> ChannelClosedError:
        cause = rebuild_exception(record, where=f"in the target of {self._peer}")
        message = (
            f"{self._peer} ended because its target raised {record.type_name}: {record.message}"
        )
        self._broken = (message, cause)
        error = ChannelClosedError(message)
        error.__cause__ = cause
        return error

    def _too_large(self, size: int) -> None:
        self._protocol_error(f"a message of {size} bytes, more than max_message_bytes={self._max}")

    def _protocol_error(self, what: str) -> None:
        message = f"{self._peer} sent {what}; the channel is closed"
        self._finalizer()  # the sender sees ChannelClosedError instead of blocking
        self._closed = True
        raise ChannelClosedError(message)

    def _send_failure(self, record: ExceptionRecord) -> None:
        data = pickle.dumps(record, PROTOCOL)
        self._write([HEAD.pack(FAILED, 0, len(data)), data])


def _rebuild(
    sock: socket.socket, max_message_bytes: int | None, peer: str
) -> Channel[object, object]:
    return Channel(sock, max_message_bytes=max_message_bytes, peer=peer)


def _check_max(max_message_bytes: int | None) -> int | None:
    if max_message_bytes is None:
        return None
    if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int):
        raise TypeError(
            f"max_message_bytes must be an int or None, not {type(max_message_bytes).__name__}"
        )
    if max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
    return max_message_bytes


def _dumps_fallback(obj: object) -> bytes:
    from parallelkit._wire.codec import dumps  # noqa: PLC0415 - the rare path

    try:
        return dumps(obj)
    except Exception as exc:
        raise SerializationError(
            f"cannot send a {type(obj).__name__} over a channel: {type(exc).__name__}: {exc}",
            what="argument",
        ) from exc


def _timeout_message(request_id: int) -> str:
    if request_id:
        return "no reply arrived in time (a late reply to this request will be discarded)"
    return "no message arrived in time"


def _format_address(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


# ------------------------------------------------------------------ pairs and processes


@overload
def channel_pair() -> tuple[Channel[A, B], Channel[B, A]]: ...
@overload
def channel_pair(
    *, send_type: type[A], recv_type: type[B]
) -> tuple[Channel[A, B], Channel[B, A]]: ...
def channel_pair(
    *, send_type: type[A] | None = None, recv_type: type[B] | None = None
) -> tuple[Channel[A, B], Channel[B, A]]:
    """Two connected channel ends: what one sends, the other receives.

    Type the ends with annotations (``left: Channel[int, str]; right: Channel[str, int]``)
    or with ``send_type=`` / ``recv_type=`` (what the *first* end sends and receives; they
    only inform the type checker).  An end can be an argument of a process that
    :mod:`multiprocessing` starts, under every start method; as with a ``Pipe``, close
    each end where it is not used (the parent's copy of the child's end once it started,
    and under fork the child's inherited copy of the parent's end), or the other side
    never sees the end.  :func:`start_process` does all that for you.

    Example:
        >>> left, right = channel_pair(send_type=int, recv_type=str)
        >>> left.send(2)
        >>> right.send(str(right.recv(timeout=5) * 21))
        >>> left.recv(timeout=5)
        '42'
        >>> left.close(); right.close()
    """
    del send_type, recv_type
    a, b = socket.socketpair()
    return Channel(a), Channel(b)
