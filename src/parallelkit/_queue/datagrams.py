"""A Queue's transport: one message, one datagram; a large message in an anonymous file.

::

    items ──encode──▶ parts ──pack──▶ QUEUE_HEAD + sizes + parts ─────▶ one datagram
                                 └──▶ (too large) an anonymous file; the datagram carries
                                      QUEUE_HEAD and the file's descriptor (HAS_FD)

Messages travel as datagrams of a ``socketpair(AF_UNIX, SOCK_DGRAM)``: the kernel takes a
datagram whole or not at all, and never blocks a non-blocking send, so a put never leaves
half a message behind.  A message larger than a quarter of the socket's buffer (or
``INLINE_MAX``) is written to an anonymous file (``memfd``) first.  The layout
(``_wire.layouts.QUEUE_HEAD`` / ``QUEUE_SIZE``) and the encoding of the items (the codec's
one rule for what goes out of band, through ``_wire.frames``) are the wire's.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import pickle
import socket
import struct
import threading
from typing import Any, Final

from parallelkit import _platform
from parallelkit._wire import frames, layouts
from parallelkit._wire.codec import OUT_OF_BAND_MIN_BYTES, has_large_bytes

QHEAD: Final = layouts.QUEUE_HEAD  # kind, flags, parts, items, message id, body bytes
SIZE: Final = layouts.QUEUE_SIZE  # a part's length
ITEMS: Final = 1  # kind: a message of items
END: Final = 2  # kind: every producer closed (left in the socket for every consumer)
HAS_FD: Final = 1  # flag: the body is in the file whose descriptor the datagram carries
INLINE_MAX: Final = 16 << 20  # bytes: a larger message travels in an anonymous file
SOCKET_BUFFER: Final = 4 << 20  # bytes asked for (the kernel caps it at wmem_max)
OUT_OF_BAND_MIN: Final = OUT_OF_BAND_MIN_BYTES  # the codec's one rule (as frames.OUT_OF_BAND_MIN)

# plain ints: or-ing the socket module's flag enums costs more than the system call
SEND_FLAGS: Final = int(socket.MSG_DONTWAIT | _platform.MSG_NOSIGNAL)
NOWAIT: Final = int(socket.MSG_DONTWAIT)
PEEK: Final = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
FD_SPACE: Final = socket.CMSG_SPACE(4)

# Message ids: unique per queue (the pid keeps forked children apart).  The pid is kept
# here, not asked for per message: getpid is a system call.
_ids = itertools.count(1)
_pid_bits = os.getpid() << 32


def next_id() -> int:
    """A new message id."""
    return _pid_bits | (next(_ids) & 0xFFFFFFFF)


def _after_fork_in_child() -> None:
    global _pid_bits
    _pid_bits = os.getpid() << 32


os.register_at_fork(after_in_child=_after_fork_in_child)


def socket_pair() -> tuple[socket.socket, socket.socket, int]:
    """``(consumers' end, producers' end, largest message sent inline)``."""
    sock, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with contextlib.suppress(OSError):
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    buffer = peer.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    if not _platform.OFFERS.sockbuf:
        # queued bytes counted against the receiver's buffer (a BSD system, macOS): it
        # takes a datagram only into room there (4 KB by default on macOS; a larger one
        # would fail with ENOBUFS for ever)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        buffer = min(buffer, sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    return sock, peer, max(4096, min(INLINE_MAX, buffer // 4))


# ------------------------------------------------------------------ encoding

# A message's first part when it is one small pickle (see encode)
_SMALL_HEAD: Final = frames.HEAD.pack(ITEMS, 0, 0, 0, 0, 0)
# ... and when it is one large pickle, in a part of its own
_PICKLE_HEAD: Final = frames.HEAD.pack(ITEMS, 0, 0, 0, 0, -1)
# where the pickle starts in the body of a message of one part
PICKLE_AT: Final = SIZE.size + frames.HEAD.size


def encode(items: list[Any]) -> frames.Parts:
    """``frames.encode(items, ITEMS)``, in one ``pickle.dumps`` when nothing goes out of band.

    The same parts as ``frames.encode`` would make (it is used whenever an item is or has a
    large buffer, or plain pickle refuses one), for a fraction of the cost of a small
    message.
    """
    # large bytes are looked for before pickling (the codec's rule: in short lists only),
    # so that they are not pickled in vain
    if has_large_bytes(items, OUT_OF_BAND_MIN):
        return frames.encode(items, ITEMS)  # large bytes travel out of band
    try:
        payload = pickle.dumps(items, 5, buffer_callback=_in_band)
    except Exception:  # _OutOfBand, or what only cloudpickle sends, or the error to report
        return frames.encode(items, ITEMS)
    if len(payload) < OUT_OF_BAND_MIN:
        return [_SMALL_HEAD + payload]  # no large bytes in it, then
    return [_PICKLE_HEAD, payload]


def _in_band(buffer: pickle.PickleBuffer) -> bool:
    with contextlib.suppress(BufferError):  # not contiguous: in band, as frames does
        if buffer.raw().nbytes >= OUT_OF_BAND_MIN:
            raise _OutOfBand  # stop pickling: this one goes out of band
    return True


class _OutOfBand(Exception):
    """An item has a buffer to send out of band: ``frames.encode`` sends it."""


def decode(body: memoryview, nparts: int) -> list[Any]:
    """The items of a message's body of several parts (``nparts``; one part: see
    ``cursor.Cursor.decode``)."""
    items: list[Any] = frames.decode(_parts(body, nparts))
    return items


def _parts(body: memoryview, nparts: int) -> list[Any]:
    sizes = struct.unpack_from(f"<{nparts}Q", body)
    offset = SIZE.size * nparts
    parts: list[Any] = []
    for size in sizes:
        parts.append(body[offset : offset + size])
        offset += size
    if isinstance(body.obj, bytearray) and body.obj is getattr(_scratch_local, "buffer", None):
        # the buffers an object is rebuilt on must be its own, not the reused buffer's
        nbuf = frames.HEAD.unpack_from(parts[0])[5]
        first = 1 if nbuf >= 0 else 2
        nbuf = nbuf if nbuf >= 0 else -1 - nbuf
        for i in range(nbuf):
            _, writable = frames.SPEC.unpack_from(parts[0], frames.HEAD.size + frames.SPEC.size * i)
            raw = parts[first + i]
            parts[first + i] = bytearray(raw) if writable else bytes(raw)
    return parts


# ------------------------------------------------------------------ sending


def fd_ancillary(fd: int | None) -> list[Any]:
    """The ancillary data that passes ``fd`` along with a datagram (none for ``None``)."""
    return [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]


def try_send(peer: socket.socket, buffers: list[Any], ancillary: list[Any]) -> bool:
    """Send one datagram if the socket has room for it now; never blocks."""
    try:
        peer.sendmsg(buffers, ancillary, SEND_FLAGS)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno == errno.ENOBUFS:  # some systems say so for a full buffer
            return False
        raise
    return True


def post_end(peer: socket.socket) -> None:
    """Tell consumers the queue ended (best effort: a full socket has data to wake them)."""
    with contextlib.suppress(OSError):
        peer.send(QHEAD.pack(END, 0, 0, 0, 0, 0), SEND_FLAGS)


def write_all(fd: int, buffers: list[Any]) -> None:
    """Write ``buffers`` to the file ``fd``, all of them."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        n = os.writev(fd, views[:512])
        while n:
            if n >= len(views[0]):
                n -= len(views[0])
                del views[0]
            else:
                views[0] = views[0][n:]
                n = 0
        while views and not len(views[0]):
            del views[0]


# ------------------------------------------------------------------ receiving


def receive(sock: socket.socket, flags: int, body: int, *, peek: bool = False) -> Any:
    """The head datagram's body (removed from the socket unless ``peek``)."""
    how = PEEK if peek else NOWAIT
    if not flags & HAS_FD and body < OUT_OF_BAND_MIN:
        # small: no out-of-band buffer in it, and a fresh buffer costs less than the reuse
        return memoryview(sock.recv(QHEAD.size + body, how))[QHEAD.size :]
    if not flags & HAS_FD:
        # into this thread's reused buffer (a fresh one per message costs page faults);
        # decode copies out what outlives it
        scratch = _scratch(QHEAD.size + body)
        sock.recvmsg_into([scratch], 0, how)
        return scratch[QHEAD.size : QHEAD.size + body]
    _, ancillary, _, _ = sock.recvmsg(QHEAD.size, FD_SPACE, how)
    fds = _fds(ancillary)
    if not fds:
        raise OSError(
            errno.EMFILE,
            "a large message of the queue could not be received: this process has too "
            f"many open files{'' if peek else ' (the message is lost)'}",
        )
    try:
        buffer = bytearray(body)
        _read_all(fds[0], memoryview(buffer))
    finally:
        for fd in fds:
            os.close(fd)
    return memoryview(buffer)


def remove(sock: socket.socket, flags: int) -> None:
    """Drop the head datagram (its items are all taken)."""
    ancillary_space = FD_SPACE if flags & HAS_FD else 0
    _, ancillary, _, _ = sock.recvmsg(1, ancillary_space, NOWAIT)
    for fd in _fds(ancillary):
        os.close(fd)


_scratch_local = threading.local()


def _scratch(nbytes: int) -> memoryview:
    """This thread's reused receive buffer, at least ``nbytes`` long."""
    buffer: bytearray | None = getattr(_scratch_local, "buffer", None)
    if buffer is None or len(buffer) < nbytes:
        buffer = _scratch_local.buffer = bytearray(max(nbytes, 256 * 1024))
    return memoryview(buffer)


def _fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", data[:usable]))
    return fds


def _read_all(fd: int, view: memoryview) -> None:
    offset = 0
    while offset < len(view):
        n = _platform.pread_into(fd, view[offset:], offset)
        if n == 0:
            raise EOFError("a large message of the queue ended early")
        offset += n
