"""The messages between a pipeline's router and its stage workers, as frames of the wire's
one duplex stream (:class:`parallelkit._wire.stream.FrameStream`).

A message is one frame whose kind is the message's (with the id flag: the id is the batch
number), whose body is ``FIELDS`` followed by the pickle (protocol 5), and whose buffers
are the pickle's large buffers, out of band by the codec's one rule::

    frame(kind | NUMBERED, id=batch)   body: FIELDS(count, busy, waiting, read-only) + pickle
                                       buffers: the pickle's out-of-band buffers

``count``, ``busy`` and ``waiting`` are the sender's (see :mod:`parallelkit._pipeline.stage`
for what each kind puts there); bit ``i`` of ``read-only`` says that buffer ``i`` was
read-only (a large ``bytes`` item: it is rebuilt as ``bytes``).  A received message owns
its memory, so the router can hold it and forward it to a worker of the next stage
without unpickling it.

Large buffers travel through shared memory, on the map engine's result wire
(:class:`parallelkit._wire.arena.ResultWriter` / :class:`~parallelkit._wire.arena.ResultReader`):
whoever *sends* a TASK or DONE message (the router for batches taken from the source, each
stage worker for its outputs) copies every buffer of at least ``arena.MIN_BYTES`` into
a region of a segment of its own, and the pickle after ``FIELDS`` is then the arena's
frame (segment names, region specs, the pickle) instead of a bare pickle, and the frame's
kind has the ``SHARED`` flag (kept when the router forwards a DONE as a TASK).  The
router forwards such a message without unpickling it, so a batch's bytes cross no socket
and the parent copies none of them: it routes only *where* they are::

    router ──TASK(specs)──▶ stage 1 ──DONE(specs)──▶ router ──TASK(same specs)──▶ stage 2 ...
      │ source items copied                │ outputs copied into its        (maps each region
      │ into the router's segments         │ own segments                     of stage 1's)

Ownership, and who frees what (the rule every failure below follows):

- A **region** belongs to its writer's segment and is in use from the moment its writer
  sets its flag word until its *receiver* (the process that unpickles the message: a
  worker of the next stage, or the router for the consumer) clears it -- when every
  object rebuilt on that region's own mapping is gone (a ``bytes`` item is a copy, so at
  once; a numpy array the consumer keeps, only when it is dropped).  A writer reuses only
  regions whose flag is clear, so a kept item is never written under; nobody else writes.
- A **segment** belongs to its writer while the run lives.  A stage worker's segments
  have the router as heir: a worker that stops (or dies) never unlinks them -- a message
  naming them may still be on its way -- and the router removes them
  (``arena.remove_leftovers``) once that worker has exited and the run is over
  (finished, failed, cancelled: ``processes.kill``, the run's finalizer).  The router's
  own segments are unlinked by the router at the same moment.  Mappings outlive the
  unlink, so items the consumer keeps stay valid.  If the parent is SIGKILLed, its
  workers die with it and multiprocessing's resource tracker, which holds the name of
  every segment whose file exists (registered before the file is made, unregistered after
  it is unlinked), unlinks them all.  A worker notes the name of a segment it is between
  those two steps for in its slot of the run's ledger (``_wire.shm.keep_ledger``): killed
  then, its heir still settles the tracker.
- **No room** in shared memory: a buffer that finds none goes in band, in the pickle.

A message's buffers are received into a buffer the thread reuses, then copied once into
their own memory: a ``bytes`` for a read-only one (which the item then is, without another
copy), a ``bytearray`` for the others (used by the object rebuilt on it).  Receiving into
fresh memory instead costs more (every page faulted and zeroed anew) and still needs the
copy to ``bytes``.  The reused buffer is kept only up to ``SCRATCH_KEEP`` bytes, so that a
reader does not hold a rare huge message's size for ever.

A message's body is a ``bytearray`` the pickle is copied into, never a view of an
``io.BytesIO`` (``getbuffer()``): on CPython 3.12.0 and 3.12.1 the garbage collector
crashes the process when such a view is part of a reference cycle (CPython gh-111049), and
a message is in one whenever an exception's traceback holds a frame that holds it.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

from parallelkit._util import fuzz as _fuzz
from parallelkit._wire.arena import ResultReader, ResultWriter, region_bytes
from parallelkit._wire.codec import OUT_OF_BAND_MIN_BYTES, dump_apart, dumps, mark_large_bytes
from parallelkit._wire.layouts import PIPELINE_FIELDS
from parallelkit._wire.stream import FrameStream

__all__ = (
    "DONE",
    "ERROR",
    "KINDS",
    "STARTUP_FAILED",
    "STOP",
    "TASK",
    "Message",
    "decode",
    "encode",
    "fields",
    "post",
    "read",
    "send",
    "set_fields",
    "shared_writer",
)

TASK: Final = 1
STOP: Final = 2
DONE: Final = 3
ERROR: Final = 4
STARTUP_FAILED: Final = 5  # + the start-up failure (see _proc.child.startup_error)

NUMBERED: Final = 0x40  # a stream id flag: the frame's id is the batch number
SHARED: Final = 0x20  # a kind flag: the body's pickle is an arena frame (see the module)
KINDS: Final = frozenset(
    [kind | NUMBERED for kind in (TASK, STOP, DONE, ERROR, STARTUP_FAILED)]
    + [kind | NUMBERED | SHARED for kind in (TASK, DONE)]
)
FIELDS: Final = PIPELINE_FIELDS  # count (or position), busy ns, waiting ns, read-only
FLAGGED: Final = 64  # buffers with a read-only bit (later ones arrive as bytearray)
SCRATCH_MIN: Final = 1 << 20  # bytes: the smallest reused receive buffer
SCRATCH_KEEP: Final = 16 << 20  # bytes: the largest receive buffer a thread keeps
# bytes: a sender's shared-memory segments kept for reuse stay this small (a larger buffer
# gets a segment of its own, gone once it is read: a rare huge item is not kept for ever)
SEGMENT_KEEP: Final = 64 << 20


class Message(NamedTuple):
    """One message: its kind, its batch number, the body (fields + pickle), the buffers;
    ``shared``: the pickle is an arena frame (its buffers are in shared memory)."""

    kind: int
    batch: int
    body: bytes | bytearray | memoryview
    buffers: list[bytes | bytearray | memoryview]
    shared: bool = False

    def size(self) -> int:
        """Bytes the message carries: on the wire (less the frame header) and in shared
        memory."""
        body = self.body
        shared = 0
        if self.shared:
            with memoryview(body) as view, view[FIELDS.size :] as data:
                shared = region_bytes(data)
        return len(body) + sum(memoryview(b).nbytes for b in self.buffers) + shared


def encode(
    obj: object, kind: int, batch: int = 0, count: int = 0, *, writer: ResultWriter | None = None
) -> Message:
    """A message carrying ``obj``; with ``writer``, a list's large buffers are copied into
    its shared memory (see the module docstring).

    Raises:
        Exception: whatever pickling raised when neither pickle nor cloudpickle can send it.
    """
    if writer is not None and type(obj) is list:
        try:
            payload, specs = writer.dump_list(obj)
        except Exception:  # pickle refuses: the in-band way below says why (or sends it)
            pass
        else:
            body = bytearray(FIELDS.pack(count, 0, 0, 0))
            body += writer.frame(payload, specs, None) if specs else payload
            if _fuzz.ENABLED and specs:
                _fuzz.point("messages.written")  # regions flagged, the message not sent yet
            return Message(kind, batch, body, [], bool(specs))
    try:
        marked = mark_large_bytes(obj, OUT_OF_BAND_MIN_BYTES) if type(obj) is list else obj
        data, raws = dump_apart(marked, OUT_OF_BAND_MIN_BYTES)
    except Exception:
        data, raws = dumps(obj), []  # cloudpickle, when pickle refuses
    readonly = 0
    for i, raw in enumerate(raws[:FLAGGED]):
        if raw.readonly:
            readonly |= 1 << i
    body = bytearray(FIELDS.pack(count, 0, 0, readonly))
    body += data  # the body owns its memory: no BytesIO.getbuffer() (see the module docstring)
    return Message(kind, batch, body, raws)  # type: ignore[arg-type]  # views, read-only ok


def shared_writer(*, heir: bool = True) -> ResultWriter:
    """A sender's shared memory for the large buffers of its messages (see the module);
    ``heir=False``: the router's own (no other process removes them)."""
    return ResultWriter(keep_max=SEGMENT_KEEP, heir=heir)


def fields(message: Message) -> tuple[int, int, int]:
    """``(count, busy, waiting)`` of a message."""
    count, busy, waiting, _ = FIELDS.unpack_from(message.body)
    return count, busy, waiting


def set_fields(message: Message, count: int, busy: int, waiting: int) -> None:
    """Change the fields of a message made by :func:`encode` (in place)."""
    readonly = FIELDS.unpack_from(message.body)[3]
    FIELDS.pack_into(message.body, 0, count, busy, waiting, readonly)


def decode(message: Message, reader: ResultReader | None = None) -> Any:
    """The object a message carries; ``reader`` maps the regions of a message whose
    buffers are in shared memory (each is given back once nothing built on it is left).

    Raises:
        ValueError: the message names shared memory and there is no ``reader``.
    """
    with memoryview(message.body) as body, body[FIELDS.size :] as data:
        if not message.shared:
            return pickle.loads(data, buffers=message.buffers)
        if reader is None:
            raise ValueError("a message with buffers in shared memory needs a reader")
        if _fuzz.ENABLED:
            _fuzz.point("messages.before_load")  # its writer may be collecting regions
        _, payload, buffers = reader.load(data, copy_readonly=True)
        try:
            return pickle.loads(payload, buffers=buffers)
        finally:
            payload.release()  # type: ignore[union-attr]  # load gives a view of data
            del buffers  # the regions of bytes items go back now (the items are copies)


def send(stream: FrameStream, message: Message, kind: int | None = None) -> None:
    """Send ``message`` (as ``kind`` if given), waiting for room: the worker's way.

    Raises:
        StreamEnd: the parent is gone.
    """
    kind = (message.kind if kind is None else kind) | (SHARED if message.shared else 0)
    stream.send(kind | NUMBERED, message.batch, message.body, message.buffers)


def post(stream: FrameStream, message: Message, kind: int | None = None) -> None:
    """Send ``message`` (as ``kind`` if given) without waiting: the router's way (what the
    socket does not take now waits in the stream's outbox for ``flush``)."""
    kind = (message.kind if kind is None else kind) | (SHARED if message.shared else 0)
    stream.post(kind | NUMBERED, message.batch, message.body, message.buffers)


def read(stream: FrameStream) -> Message:
    """Receive one whole message (blocks until it is in).

    Raises:
        StreamEnd: the peer is gone (or this end was closed).
        FrameError: the peer sent something that is not a message.
    """
    with stream.recv_lock:
        kind, batch, body, buffers = stream.read(None, _allocate)
        if buffers is None:  # a view of the stream's buffer: the message owns a copy
            with memoryview(body) as view:
                owned: bytes | bytearray | memoryview = bytes(view)
            body.release()  # type: ignore[union-attr]  # a memoryview when buffers is None
            return Message(kind & ~(NUMBERED | SHARED), batch, owned, [], bool(kind & SHARED))
    readonly = FIELDS.unpack_from(body)[3]
    own: list[bytes | bytearray | memoryview] = []
    for i, received in enumerate(buffers):
        with memoryview(received) as view:  # of this thread's receive buffer: copied out
            own.append(bytes(view) if readonly >> i & 1 else bytearray(view))
        if isinstance(received, memoryview):
            received.release()
    return Message(kind & ~(NUMBERED | SHARED), batch, body, own, bool(kind & SHARED))


_scratch = threading.local()


def _allocate(kind: int, body: int, lengths: Sequence[int]) -> list[bytearray | memoryview]:
    """Where a large frame is received: the body in its own memory, the buffers in this
    thread's reused receive buffer (see the module docstring)."""
    total = sum(lengths)
    buffer: bytearray | None = getattr(_scratch, "buffer", None)
    if total > SCRATCH_KEEP:
        buffer = bytearray(total)  # the message's own, freed once it is copied out
    elif buffer is None or len(buffer) < total:
        buffer = _scratch.buffer = bytearray(max(total, SCRATCH_MIN))
    whole = memoryview(buffer)
    parts: list[bytearray | memoryview] = [bytearray(body)]
    offset = 0
    for length in lengths:
        parts.append(whole[offset : offset + length])
        offset += length
    whole.release()
    return parts
