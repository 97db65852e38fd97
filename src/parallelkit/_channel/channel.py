"""Duplex channels: typed connections between two processes, on one host or across hosts.

This module owns the public end (:class:`Channel`, :func:`channel_pair`): what a message
is, request/reply correlation, timeouts and the closed-state errors.  The bytes on the
socket -- framing, sending that cannot deadlock, receive buffering -- are the wire's
(``_wire/stream.py``).  ``process.py`` adds processes that serve a channel
(:func:`start_process`), ``net.py`` listeners and connections across hosts,
``_wire/handshake.py`` their authentication.

A :class:`Channel` is one end of a stream socket (a ``socketpair`` between processes of
one host, TCP across hosts).  Each message is one frame of the stream, whose kind says
what it carries::

    MESSAGE     the pickle (protocol 5) as the body, its out-of-band buffers as buffers
    BYTES       a top-level bytes of 64 KiB or more: no body, itself as the one buffer
    BYTEARRAY   the same for a bytearray
    FAILED      a start_process target raised: a pickled ExceptionRecord

and whose id flags say REQUEST (sent by ``request``, the id is the request's) or REPLY
(the id of the request it answers).  A ``start_process`` child sets one more flag,
LOGGED, on a frame when it has sent log records since its previous frame: the parent
hands those to its loggers before the message (``process.py``), and reads the log socket
at no other message.

Speed.  What travels out of band follows the codec's one rule (``_wire.codec.dump_apart``,
as for the pool and ``Queue``): contiguous buffers of 64 KiB or more (numpy arrays,
``PickleBuffer``, ``bytearray``, the large ``bytes`` items of a short list) and a large
top-level ``bytes`` or ``bytearray`` (no pickle at all) are written straight from their
own memory and received straight into their final buffer (a ``bytes``, which cannot be
written into, into a reused one, then copied once); smaller buffers stay in the pickle.
Small messages are one ``send`` and usually one ``recv``.

Threads.  One thread at a time reads frames and files each where it belongs (``recv``'s
inbox, or the waiting request's reply); ``close()`` from another thread wakes a thread
blocked in ``recv`` or ``send``.

The other end gone, however it went (closed, exited, killed in the middle of a message),
is :class:`~parallelkit.errors.ChannelClosedError`; a timeout is :class:`TimeoutError`
and leaves the channel usable (a partly received message is kept and completed by the
next ``recv``).

Security.  A channel unpickles what the other end sends: whoever can send to it can run
code in this process.  ``Channel.listen`` / ``Channel.connect`` therefore require a key
of at least 16 bytes, and nothing is unpickled before both ends proved they hold it (see
``_wire/handshake.py``).  The traffic is *not* encrypted: use it on trusted networks, or
tunnel it (SSH, WireGuard, stunnel).
"""

from __future__ import annotations

import pickle
import socket
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Final, Generic, NoReturn, Self, overload

from parallelkit._channel.mailbox import REPLY, REQUEST, Mailbox, timeout_message
from parallelkit._util import fuzz as _fuzz
from parallelkit._util.checks import check_max_message_bytes, check_timeout
from parallelkit._wire import handshake as _handshake
from parallelkit._wire.codec import (
    OUT_OF_BAND_MIN_BYTES,
    ExceptionRecord,
    check_single_host,
    dump_apart,
    mark_large_bytes,
    rebuild_exception,
)
from parallelkit._wire.stream import FrameError, FrameStream, StreamEnd, ms
from parallelkit.errors import ChannelClosedError, SerializationError

if TYPE_CHECKING:
    from typing_extensions import TypeVar

    from parallelkit._channel.net import ChannelListener
    from parallelkit._proc.logs import Forwarded
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

# ------------------------------------------------------------------ frame kinds
MESSAGE: Final = 1  # pickle + out-of-band buffers
BYTES: Final = 2  # a top-level bytes: one buffer, no pickle
BYTEARRAY: Final = 3  # a top-level bytearray: one buffer, no pickle
FAILED: Final = 4  # a start_process target raised: a pickled ExceptionRecord
TAGS: Final = REQUEST | REPLY
LOGGED: Final = 0x20  # flag: the sender sent log records since its previous frame
KINDS: Final = frozenset(
    kind | tag | logged
    for kind in (MESSAGE, BYTES, BYTEARRAY, FAILED)
    for tag in (0, REQUEST, REPLY)
    for logged in (0, LOGGED)
)

RAW_MIN: Final = OUT_OF_BAND_MIN_BYTES  # bytes: what travels apart from the pickle
SCRATCH_MAX: Final = 16 * 1024 * 1024  # bytes: a top-level bytes up to this size: a reused buffer
PROTOCOL: Final = 5
_CLOSED_HERE: Final = "this end of the channel is closed (close() was called on it)"
DEFAULT_ADDRESS: Final = ("127.0.0.1", 0)


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
        self._max = check_max_message_bytes(max_message_bytes)
        self._stream = FrameStream(sock, kinds=KINDS, max_frame_bytes=self._max)
        self._mailbox = Mailbox()
        self._scratch = bytearray()  # where a large top-level bytes is received
        self._closed = False
        self._eof = False  # the other end closed between two messages
        self._broken: tuple[str, BaseException | None] | None = None
        self._peer = peer
        self._forwarded: Forwarded | None = None  # this process's records (see _send)
        self._forwarded_seen = 0  # their count when the last frame flagged LOGGED left

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
        pending = self._mailbox.unanswered()
        if pending:
            # the answer to the oldest request this thread received and did not answer
            self._send(obj, REPLY, pending[0])
            pending.popleft()
        else:
            self._send(obj, 0, 0)

    def _send(self, obj: object, tag: int, request_id: int) -> None:
        if self._closed:
            raise ChannelClosedError(_CLOSED_HERE)
        forwarded = self._forwarded
        count = 0
        if forwarded is not None:
            count = forwarded.count
            if count != self._forwarded_seen:
                tag |= LOGGED
            if _fuzz.ENABLED:
                _fuzz.point("channel.send.records_counted")  # another thread's frame may pass
        cls = type(obj)
        try:
            if (cls is bytes or cls is bytearray) and len(obj) >= RAW_MIN:  # type: ignore[arg-type]
                kind = BYTES if cls is bytes else BYTEARRAY
                self._stream.send(kind | tag, request_id, b"", (obj,))  # type: ignore[arg-type]
            else:
                try:
                    marked = mark_large_bytes(obj, RAW_MIN) if cls is list else obj  # type: ignore[arg-type]
                    data, buffers = dump_apart(marked, RAW_MIN)
                except Exception:
                    data, buffers = _dumps_fallback(obj), []
                self._stream.send(MESSAGE | tag, request_id, data, buffers)
        except StreamEnd as end:
            raise self._gone_error(end.__cause__) from end.__cause__
        if tag & LOGGED:
            # Only once a flagged frame has left: another thread's frame that goes out
            # before it is still flagged (it compared with the older count).
            self._forwarded_seen = count

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
        return self._mailbox.wait(0, deadline, self._read_one)  # type: ignore[return-value]

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether :meth:`recv` would not block: a message or the end is there.

        Args:
            timeout: seconds to wait for one; ``None`` waits forever, ``0`` not at all.
        """
        timeout = check_timeout(timeout, zero_ok=True)
        if self._closed:
            raise ChannelClosedError(_CLOSED_HERE)
        if self._mailbox.has_mail() or self._broken is not None or self._eof:
            return True
        return self._stream.ready(-1 if timeout is None else ms(timeout))

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
        mailbox = self._mailbox
        request_id = mailbox.new_request()
        try:
            if _fuzz.ENABLED:
                _fuzz.point("channel.request.before_send")
            self._send(obj, REQUEST, request_id)
            return mailbox.wait(request_id, deadline, self._read_one)  # type: ignore[return-value]
        except BaseException:
            mailbox.forget(request_id)  # (wait forgot it if it returned the reply)
            raise

    def _read_one(self, deadline: float | None, request_id: int) -> tuple[object, int, int]:
        """Read one frame as the mailbox's reader: the message, its tag and request id."""
        lock = self._stream.recv_lock
        if deadline is None:
            lock.acquire()
        elif not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError(timeout_message(request_id))
        try:
            if _fuzz.ENABLED:
                _fuzz.point("channel.read_one")
            return self._recv(deadline)
        except TimeoutError:
            raise TimeoutError(timeout_message(request_id)) from None
        finally:
            lock.release()

    def close(self) -> None:
        """Close this end; the other end's ``recv`` then raises ChannelClosedError.

        Idempotent.  A thread of this process blocked in ``recv`` or ``send`` on this end
        wakes up with :class:`ChannelClosedError`.
        """
        if self._closed:
            return
        self._closed = True
        self._stream.close()

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
        return (_rebuild, (self._stream.sock, self._max, self._peer))

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

    # ------------------------------------------------------------------ receiving
    def _recv(self, deadline: float | None) -> tuple[object, int, int]:  # noqa: PLR0912 - a hot path kept in one frame: each frame kind and flag is a branch
        """Read and decode one frame (holding the receive lock), with its tag and id."""
        if self._closed:
            raise ChannelClosedError(_CLOSED_HERE)
        if self._broken is not None:
            message, cause = self._broken
            raise ChannelClosedError(message) from cause
        try:
            kind, request_id, body, buffers = self._stream.read(deadline, self._allocate)
        except StreamEnd as end:
            raise self._gone_error(end.__cause__) from end.__cause__
        except FrameError as refused:
            if refused.size is not None:
                self._too_large(refused.size)
            self._protocol_error(str(refused))
        tag = kind & TAGS
        kind ^= tag
        if kind & LOGGED:
            kind ^= LOGGED
            self._records_first()
        if buffers is None:  # a small frame: a view of the stream's buffer
            with body:  # type: ignore[union-attr]  # a memoryview when buffers is None
                if kind == MESSAGE:
                    return self._loads(body, None), tag, request_id
                if kind == FAILED:
                    raise self._target_failed(pickle.loads(body))
            self._protocol_error(f"an invalid frame header (kind {kind}, 0 buffers)")
        if kind == MESSAGE:
            return self._loads(body, buffers), tag, request_id  # type: ignore[arg-type]
        if kind == BYTES:
            received = buffers[0]
            result = bytes(received)
            if isinstance(received, memoryview):
                received.release()  # of the scratch buffer
            return result, tag, request_id
        if kind == BYTEARRAY:
            return buffers[0], tag, request_id
        raise self._target_failed(pickle.loads(body))  # FAILED

    def _allocate(
        self, kind: int, plen: int, lengths: Sequence[int]
    ) -> list[bytearray | memoryview]:
        """Where a large frame is received (called by the stream once its header is in)."""
        kind &= ~(TAGS | LOGGED)
        if kind in (BYTES, BYTEARRAY) and (len(lengths) != 1 or plen):
            raise FrameError(f"an invalid frame header (kind {kind}, {len(lengths)} buffers)")
        if kind == BYTES and lengths[0] <= SCRATCH_MAX:
            # The bytes object is made by one copy at the end, so receive into a buffer
            # kept for the purpose: allocating (and page-faulting) a fresh one per message
            # costs more than the copy.
            if len(self._scratch) < lengths[0]:
                self._scratch = bytearray(lengths[0])
            return [bytearray(), memoryview(self._scratch)[: lengths[0]]]
        return [bytearray(plen), *map(bytearray, lengths)]

    def _loads(self, data: memoryview | bytearray, buffers: list[bytearray] | None) -> object:
        try:
            return pickle.loads(data, buffers=buffers)
        except Exception as exc:
            raise SerializationError(
                f"a message from {self._peer} cannot be unpickled here: "
                f"{type(exc).__name__}: {exc}",
                what="argument",
            ) from exc

    def _announce_records(self, forwarded: Forwarded) -> None:
        """Flag each frame sent after this process sent log records (``forwarded`` counts
        them) with LOGGED: the other end is the parent those records go to."""
        self._forwarded = forwarded
        self._forwarded_seen = 0  # records sent before the first frame: flagged too

    def _records_first(self) -> None:
        """The other end may have sent log records before what was just read (a frame
        flagged LOGGED, or its end): nothing to do here; a ``start_process`` parent hands
        them to its loggers."""

    # ------------------------------------------------------------------ failures
    def _gone_error(self, cause: BaseException | None) -> ChannelClosedError:
        if self._closed:
            return ChannelClosedError(_CLOSED_HERE)
        self._records_first()
        if self._stream.mid_frame:
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
        self._records_first()
        cause = rebuild_exception(record, where=f"in the target of {self._peer}")
        message = (
            f"{self._peer} ended because its target raised {record.type_name}: {record.message}"
        )
        self._broken = (message, cause)
        error = ChannelClosedError(message)
        error.__cause__ = cause
        return error

    def _too_large(self, size: int) -> NoReturn:
        self._protocol_error(f"a message of {size} bytes, more than max_message_bytes={self._max}")

    def _protocol_error(self, what: str) -> NoReturn:
        message = f"{self._peer} sent {what}; the channel is closed"
        self._closed = True
        self._stream.abort()  # the sender sees ChannelClosedError instead of blocking
        raise ChannelClosedError(message)

    def _send_failure(self, record: ExceptionRecord) -> None:
        """Tell the parent that the target raised (``start_process``'s child).

        Raises:
            ChannelClosedError: the parent is gone.
        """
        try:
            self._stream.send(FAILED, 0, pickle.dumps(record, PROTOCOL))
        except StreamEnd as end:
            raise self._gone_error(end.__cause__) from end.__cause__


def _rebuild(
    sock: socket.socket, max_message_bytes: int | None, peer: str
) -> Channel[object, object]:
    return Channel(sock, max_message_bytes=max_message_bytes, peer=peer)


def _dumps_fallback(obj: object) -> bytes:
    from parallelkit._wire.codec import dumps  # noqa: PLC0415 - the rare path

    try:
        return dumps(obj)
    except Exception as exc:
        raise SerializationError(
            f"cannot send a {type(obj).__name__} over a channel: {type(exc).__name__}: {exc}",
            what="argument",
        ) from exc


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
