"""Framed messages over a ``multiprocessing`` connection, large buffers sent out of band.

A message is a small header, a pickle, and the pickle's large buffers (pickle protocol 5)
sent as they are, each with its own ``send_bytes``, so that a megabyte payload is copied
by the kernel and nowhere else::

    part 0:        HEAD(kind, f1, f2, f3, f4, nbuf) + nbuf x SPEC(size, writable) + pickle
    parts 1..nbuf: the raw buffers

- What protocol 5 sends out of band on its own (numpy arrays, ``pickle.PickleBuffer``) is
  read by the kernel straight into a new ``bytearray`` of the size part 0 announces, which
  the object then uses without a copy (so it arrives writable).  The stdlib's
  ``recv_bytes`` would copy each chunk twice on the way.
- Large ``bytes`` and ``bytearray`` items of a list (a batch) are sent out of band too
  (the codec's ``mark_large_bytes``: the standard pickle copies them in band); ``bytes``
  are read into a reused buffer and copied once into a new ``bytes``.  The reused buffer
  is kept only up to ``SCRATCH_KEEP`` bytes: a larger item is read into a buffer of its
  own, freed at once, so that a reader does not hold its largest message's size for ever.
- Buffers under ``OUT_OF_BAND_MIN`` stay in the pickle: one message beats several.

The header's four fields are the caller's (a batch number, a count, timings...).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import queue
import socket
import threading
from multiprocessing.connection import Connection
from typing import Any, Final

from parallelkit._util import fuzz as _fuzz
from parallelkit._util.threads import quiet_thread
from parallelkit._wire import layouts
from parallelkit._wire.codec import OUT_OF_BAND_MIN_BYTES, dumps, keep_apart, mark_large_bytes

HEAD: Final = layouts.MESSAGE_HEAD  # kind, f1, f2, f3, f4, number of buffers
SPEC: Final = layouts.MESSAGE_SPEC  # size, writable
OUT_OF_BAND_MIN: Final = OUT_OF_BAND_MIN_BYTES  # the codec's one rule
SCRATCH_MIN: Final = 1 << 20  # bytes: the smallest reused read buffer
SCRATCH_KEEP: Final = 16 << 20  # bytes: the largest read buffer a thread keeps between messages

Parts = list[Any]  # bytes-like objects: part 0, then the buffers


def encode(obj: object, kind: int, f1: int = 0, f2: int = 0, f3: int = 0, f4: int = 0) -> Parts:
    """The parts of a message carrying ``obj``.

    Raises:
        Exception: whatever pickling raised when neither pickle nor cloudpickle can send it.
    """
    raws: list[memoryview] = []
    stream = io.BytesIO()
    try:
        marked = mark_large_bytes(obj, OUT_OF_BAND_MIN) if type(obj) is list else obj
        pickle.Pickler(stream, 5, buffer_callback=keep_apart(raws, OUT_OF_BAND_MIN)).dump(marked)
        payload: Any = stream.getbuffer()
    except Exception:
        raws.clear()
        payload = dumps(obj)  # cloudpickle, when plain pickle refuses; or raise
    separate = len(payload) >= OUT_OF_BAND_MIN  # don't copy a large in-band pickle
    head = bytearray(HEAD.size + SPEC.size * len(raws))
    # a negative count says: the pickle follows as its own part
    HEAD.pack_into(head, 0, kind, f1, f2, f3, f4, -1 - len(raws) if separate else len(raws))
    for i, raw in enumerate(raws):
        SPEC.pack_into(head, HEAD.size + SPEC.size * i, raw.nbytes, not raw.readonly)
    if separate:
        return [head, payload, *raws]
    return [head + payload, *raws]


def header(parts: Parts) -> tuple[int, int, int, int, int]:
    """``(kind, f1, f2, f3, f4)`` of a message."""
    kind, f1, f2, f3, f4, _ = HEAD.unpack_from(parts[0])
    return kind, f1, f2, f3, f4


def set_header(parts: Parts, kind: int, f1: int, f2: int, f3: int, f4: int) -> None:
    """Change the header fields of a message made by :func:`encode` (in place)."""
    first = parts[0]
    HEAD.pack_into(first, 0, kind, f1, f2, f3, f4, HEAD.unpack_from(first)[5])


def size(parts: Parts) -> int:
    """Bytes on the wire."""
    return sum(memoryview(p).nbytes for p in parts)


def enlarge_buffers(conn: Connection, nbytes: int = 1 << 20) -> None:
    """Ask the kernel for ``nbytes`` socket buffers on a ``Pipe(duplex=True)`` end.

    With the default (about 200 KiB) a megabyte message takes several wake-ups of the
    reader; the kernel caps the request at ``net.core.wmem_max`` / ``rmem_max``, so this
    is a best effort and never an error.
    """
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, nbytes)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, nbytes)


def send(conn: Connection, parts: Parts) -> None:
    """Send a message: part 0 (and a separate pickle) framed by the connection, then each
    buffer raw, straight from its memory (the receiver knows the sizes from part 0)."""
    conn.send_bytes(parts[0])
    first = 1
    if HEAD.unpack_from(parts[0])[5] < 0:
        conn.send_bytes(parts[1])
        first = 2
    if len(parts) > first:
        fd = conn.fileno()
        for part in parts[first:]:
            _write_all(fd, part)


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def _read_into(fd: int, view: memoryview) -> None:
    while view:
        got = os.readv(fd, [view])
        if got == 0:
            raise EOFError("the connection closed in the middle of a message")
        view = view[got:]


_scratch = threading.local()


def _read_bytes(fd: int, nbytes: int) -> bytes:
    """``nbytes`` from ``fd`` as ``bytes``: read into this thread's reused scratch buffer,
    then one copy.  (Reading into a fresh buffer and copying it to a fresh ``bytes`` is
    several times slower: two large allocations at once defeat malloc's reuse, and every
    page is faulted in anew.)  Above ``SCRATCH_KEEP`` the buffer is the message's own and
    is freed on return: past that size the page faults of the copy dominate anyway, and a
    reader must not keep a rare huge message's memory."""
    buffer: bytearray | None = getattr(_scratch, "buffer", None)
    if nbytes > SCRATCH_KEEP:
        own = bytearray(nbytes)
        _read_into(fd, memoryview(own))
        return bytes(own)
    if buffer is None or len(buffer) < nbytes:
        buffer = _scratch.buffer = bytearray(max(nbytes, SCRATCH_MIN))
    view = memoryview(buffer)[:nbytes]
    _read_into(fd, view)
    return bytes(view)


def recv(conn: Connection) -> Parts:
    """Receive one whole message (blocks until every part is in).

    A buffer that was writable arrives as a ``bytearray`` the kernel filled directly (the
    object rebuilt on it uses it without a copy); a read-only one as ``bytes``.
    """
    first = conn.recv_bytes()
    nbuf = HEAD.unpack_from(first)[5]
    parts: Parts = [first]
    if nbuf < 0:  # the pickle comes as its own part
        nbuf = -1 - nbuf
        parts.append(conn.recv_bytes())
    if nbuf:
        fd = conn.fileno()
        for i in range(nbuf):
            nbytes, writable = SPEC.unpack_from(first, HEAD.size + SPEC.size * i)
            if writable:
                buffer = bytearray(nbytes)
                _read_into(fd, memoryview(buffer))
                parts.append(buffer)
            else:
                parts.append(_read_bytes(fd, nbytes))
    return parts


def decode(parts: Parts) -> Any:
    """The object a message carries."""
    first = parts[0]
    nbuf = HEAD.unpack_from(first)[5]
    if nbuf < 0:
        nbuf = -1 - nbuf
        return pickle.loads(parts[1], buffers=parts[2:])
    offset = HEAD.size + SPEC.size * nbuf
    return pickle.loads(memoryview(first)[offset:], buffers=parts[1:])


class Writer:
    """Sends large messages from a helper thread, so that the caller goes on reading.

    A router that both sends work and receives results spends as long in ``write`` as in
    ``read`` when payloads are large; both release the GIL, so a second thread doing the
    writes overlaps them.  The thread starts with the first large message; from then on
    every message goes through it, so that messages to one connection stay in order.
    Write errors are ignored here: a peer that died is noticed through its process.
    """

    LARGE: Final = 64 * 1024

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Connection, Parts] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def send(self, conn: Connection, parts: Parts) -> None:
        if self._thread is None:
            if size(parts) < self.LARGE:
                send(conn, parts)
                return
            # it never takes a Ctrl-C meant for the main thread
            self._thread = quiet_thread(self._run, name="parallelkit-writer")
            self._thread.start()
        self._queue.put((conn, parts))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            conn, parts = item
            if _fuzz.ENABLED:
                _fuzz.point("frames.writer_send")  # the router goes on, or closes the conn
            with contextlib.suppress(OSError, ValueError):  # a dead peer; a closed conn
                send(conn, parts)
            # not held while waiting for the next one (it may be a large batch)
            del item, conn, parts

    def close(self, timeout: float = 5.0) -> None:
        """Let queued messages go out (waiting up to ``timeout``), then stop the thread."""
        thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)
