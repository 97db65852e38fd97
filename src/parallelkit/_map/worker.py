"""The pool worker: the target of the map engine's processes, and its task loop.

After the child main (:func:`parallelkit._proc.child.child_main`), :func:`pool_loop`
serves chunks until the parent says STOP, in frames of :mod:`parallelkit._wire.stream`
(the parent posts them from its event loop; we send ours draining what it posts)::

    parent ──TASK(chunk, fn id, [fn], items)──▶ worker: for each item, note its position in
                                                 the shared progress slot, call fn(item)
    parent ◀──DONE(chunk, results, errors, s)── worker (errors: per item, as records)

The progress slot (:mod:`parallelkit._proc.slots`) lets the parent name the exact item a
dead or late worker was on.
"""

from __future__ import annotations

import itertools
import pickle
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, Final

from parallelkit._map.calls import each
from parallelkit._proc import logs as _logs
from parallelkit._proc.child import StartupFailure
from parallelkit._proc.slots import (
    DUMP_FD,
    POS_RECEIVING,
    POS_SENDING,
    POS_UNTRACKED,
    SLOT_WORDS,
    STARTED_NS,
    TAKEN,
)
from parallelkit._util import fuzz as _fuzz
from parallelkit._util import timeline as _timeline
from parallelkit._wire.codec import (
    ARENA_MIN_BYTES,
    PROTOCOL,
    NoRoom,
    capture_exception,
    dumps,
    has_large_bytes,
    has_strided_array,
)
from parallelkit._wire.layouts import POOL_TASK
from parallelkit._wire.stream import FrameStream, StreamEnd, widen

# ------------------------------------------------------------------ wire format
# Frames of _wire.stream, both ways; the kind byte says what a frame is (WITH_ID: its id
# field is used).  parent -> worker:
WITH_ID: Final = 0x40  # a bit of stream.ID_FLAGS
TASK: Final = 1 | WITH_ID  # id: chunk id; body: POOL_TASK, fn payload, items payload
STOP: Final = 2
ACK: Final = 3 | WITH_ID  # id: _direct.ACK_*: the parent has copied a DIRECT reply's buffers
PARENT_KINDS: Final = frozenset({TASK, STOP, ACK})
# worker -> parent: a reply, whose body is a pickled tuple (below), as it is (REPLY) or
# framed by _wire.arena (REPLY_ARENA: result buffers in our segments, the kept flag) or
# _wire.direct (REPLY_DIRECT: result buffers to read from our memory)
REPLY: Final = 4
REPLY_ARENA: Final = 5
REPLY_DIRECT: Final = 6
WORKER_KINDS: Final = frozenset({REPLY, REPLY_ARENA, REPLY_DIRECT})
# flags
STOP_ON_ERROR: Final = 1
STAR_CALL: Final = 2  # items are (args, kwargs) pairs
TIMED: Final = 4  # write each item's start time to the progress slot
INHERITED_ITEMS: Final = 8  # no items payload: items = inherited[start:stop]
TRACKED: Final = 16  # note every item's position, even tiny ones (a re-run after a crash)
ARENA: Final = 32  # the items payload starts with where its large buffers are (_arena)
DIRECT: Final = 64  # the parent may copy large results out of our memory (_direct)

# what a REPLY says
DONE: Final = 1  # (DONE, chunk id, results, errors | None, seconds)
CHUNK_FAILED: Final = 2  # (CHUNK_FAILED, chunk id, what, record)
INIT_FAILED: Final = 3  # (INIT_FAILED, start-up failure: see _proc.child.startup_error)

FN_CACHE_SIZE: Final = 64
# Tiny items: noting each item's position costs about as much as calling ``x*x``.  A chunk
# runs its first PROBE_ITEMS items one by one; if they took under UNTRACKED_ITEM_NS each, the
# rest run in a C-level ``map`` with the slot saying "somewhere in this chunk".  A worker
# that dies there has its chunk run again, tracked, so the culprit is still named exactly.
PROBE_ITEMS: Final = 8
UNTRACKED_ITEM_NS: Final = 5_000


def pool_loop(
    conn: Connection,
    fn: None,
    dump_fd: int,
    progress: Any,
    slot: int,
    inherited: tuple[dict[int, Callable[..., object]], Sequence[object] | None] | None,
) -> None:
    """The pool worker's role loop (run by :func:`parallelkit._proc.child.child_main`):
    serve chunks until STOP.  Its functions come with its tasks (``fn`` is unused), or
    through fork (``inherited``: the function and items of the map that started it)."""
    fns: dict[int, Callable[..., object]] = {}
    shared_items: Sequence[object] | None = None
    if inherited is not None:
        fns.update(inherited[0])
        shared_items = inherited[1]
    words = memoryview(progress).cast("B").cast("q")
    base = slot * SLOT_WORDS
    words[base + DUMP_FD] = dump_fd  # armed before POS leaves POS_STARTING
    arena: list[Any] = []  # the _arena.WorkerArena, once a chunk needs it
    if _timeline.ENABLED:
        _timeline.stamp(f"worker.ready {slot}")
    try:
        _task_loop(_stream(conn), fns, shared_items, words, base, arena)
    except (StreamEnd, OSError):
        pass  # the parent closed our pipe or went away: nothing left to do
    finally:
        if arena:
            arena[0].close()
        words.release()
        if _timeline.ENABLED:
            _timeline.stamp(f"worker.loop_end {slot}")


def _stream(conn: Connection) -> FrameStream:
    sock = socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
    # Room for a whole reply in the pipe: a reply larger than the default send buffer
    # takes (about half of it) would keep us waiting until the engine reads it
    widen(sock)
    # the engine posts (never waits to write to us) and reads every worker whenever it can
    return FrameStream(sock, kinds=PARENT_KINDS, peer_posts=True)


def report_startup_failure(conn: Connection, failure: StartupFailure) -> None:
    """How a pool worker tells the engine it could not start (its initializer raised)."""
    stream = _stream(conn)
    try:
        stream.send(REPLY, 0, dumps((INIT_FAILED, failure)))
    finally:
        stream.close()


class _OutOfBand(Exception):
    """Raised by the first pickling of a reply that has a large buffer to send apart."""


def _in_band_unless_large(buffer: pickle.PickleBuffer) -> bool:
    try:
        raw = buffer.raw()
    except BufferError:
        return True
    if raw.nbytes >= ARENA_MIN_BYTES:
        raise _OutOfBand
    return True


def _worker_arena(arena: list[Any]) -> Any:
    if not arena:
        from parallelkit._wire.arena import WorkerArena  # noqa: PLC0415 - only maps with large buffers

        arena.append(WorkerArena())
    return arena[0]


def _task_loop(  # noqa: PLR0912,PLR0915 - a hot path kept in one frame (a helper call costs more than its branches)
    stream: FrameStream,
    fns: dict[int, Callable[..., object]],
    shared_items: Sequence[object] | None,
    words: memoryview,
    base: int,
    arena: list[Any],
) -> None:
    read, send = stream.read, stream.send
    unpack = POOL_TASK.unpack_from
    hsize = POOL_TASK.size
    backlog: deque[tuple[int, int, bytes]] = deque()  # what came while we waited for an ACK
    while True:
        words[base] = POS_RECEIVING  # before read(): a large chunk takes a while to arrive
        buf: Any  # a view of the stream's receive buffer, valid until the next read
        if backlog:
            kind, cid, buf = backlog.popleft()
        else:
            kind, cid, buf, _ = read(None)
        if _timeline.ENABLED:
            _timeline.stamp(f"worker.got {'task ' + str(cid) if kind == TASK else kind}")
        if kind == STOP:
            if _fuzz.ENABLED:
                _fuzz.point("worker.stop_received")
            return
        # TASK: the time first, then the id: a parent that sees the id sees when we took
        # it (a per-item timeout counts from then, never our start-up or initializer)
        words[base + STARTED_NS] = time.monotonic_ns()
        words[base + TAKEN] = cid
        fn_id, flags, fn_len, start, stop = unpack(buf)
        if _logs.enabled():  # its records name the item; the parent's new levels
            _logs.begin_task(start)
        fn = fns.get(fn_id)
        if fn is None:
            try:
                fn = pickle.loads(buf[hsize : hsize + fn_len])
            except BaseException as exc:
                send(REPLY, 0, dumps((CHUNK_FAILED, cid, "function", capture_exception(exc))))
                continue
            if len(fns) >= FN_CACHE_SIZE:  # the parent mirrors this FIFO eviction
                del fns[next(iter(fns))]
            fns[fn_id] = fn
        items: Sequence[Any]
        from_arena = flags & ARENA
        if flags & INHERITED_ITEMS:
            assert shared_items is not None
            items = shared_items[start:stop]
        else:
            try:
                if from_arena:
                    items = _worker_arena(arena).reader.load(memoryview(buf)[hsize + fn_len :])
                else:
                    items = pickle.loads(memoryview(buf)[hsize + fn_len :])
            except BaseException as exc:
                reply = dumps((CHUNK_FAILED, cid, "argument", capture_exception(exc)))
                del exc
                if from_arena:  # the parent learns whether the arguments are still used
                    state = arena[0]
                    reply = state.writer.frame(reply, [], state.reader.release())
                send(REPLY_ARENA if from_arena else REPLY, 0, reply)
                continue
        del buf
        if _timeline.ENABLED:
            _timeline.stamp(f"worker.items {cid}")
        t0 = time.perf_counter()
        results, errors = _run_chunk(fn, items, flags, words, base)
        _logs.end_task()  # (holds no result past the chunk)
        elapsed = time.perf_counter() - t0
        words[base] = POS_SENDING
        msg = (DONE, cid, results, errors, elapsed)
        payload: bytes | None
        kind = REPLY
        try:
            if (
                from_arena
                or has_large_bytes(results, ARENA_MIN_BYTES)
                or has_strided_array(results, ARENA_MIN_BYTES)
            ):
                raise _OutOfBand
            payload = pickle.dumps(msg, PROTOCOL, buffer_callback=_in_band_unless_large)
        except _OutOfBand:
            payload = None
        except BaseException:
            payload = _dump_results_one_by_one(cid, results, errors, elapsed)
        if payload is None:  # large buffers to send apart, or arguments to let go of
            state = _worker_arena(arena)
            writer = state.writer
            # with no room in /dev/shm, the parent may copy them out of our memory instead
            direct = bool(flags & DIRECT) and not from_arena
            specs: list[Any] = []
            try:
                payload, specs = writer.dump(msg, results, strict=direct)
            except NoRoom:
                if _reply_direct(stream, msg, results, backlog):
                    del msg, results, items, errors  # the parent has its copy
                    continue
                try:  # not this time: what finds no room goes in band
                    payload, specs = writer.dump(msg, results)
                except BaseException:
                    payload = _dump_results_one_by_one(cid, results, errors, elapsed)
            except BaseException:
                payload = _dump_results_one_by_one(cid, results, errors, elapsed)
            del msg, results, items, errors  # before asking whether anything uses the arena
            kept = state.reader.release() if from_arena else None
            if specs or kept is not None:
                payload, kind = writer.frame(payload, specs, kept), REPLY_ARENA
        else:
            # sent: hold no argument or result while waiting for the next task (they may
            # be the caller's objects: a Manager proxy, say, whose collection it waits for)
            del msg, results, items, errors
        send(kind, 0, payload)
        if _timeline.ENABLED:
            _timeline.stamp(f"worker.sent {cid} ({elapsed * 1e3:.2f} ms in fn)")
        if _fuzz.ENABLED:
            _fuzz.point("worker.after_send")


def _reply_direct(
    stream: FrameStream,
    msg: tuple[Any, ...],
    results: list[Any],
    backlog: deque[tuple[int, int, bytes]],
) -> bool:
    """Send a DIRECT reply and hold the results as they are until the parent has copied
    them; ``False``: send the reply the usual way instead (it could not be made, or the
    parent could not read our memory)."""
    from parallelkit._wire import direct as _direct  # noqa: PLC0415 - only maps with large results

    try:
        reply, raws = _direct.dump(msg, results, ARENA_MIN_BYTES)
    except BaseException:
        return False  # unpicklable (the usual path reports it) or no ctypes
    try:
        stream.send(REPLY_DIRECT, 0, reply)
        del reply
        while True:  # a second chunk or a STOP may come first: keep them for later
            kind, answer, body, _ = stream.read(None)
            if kind == ACK:
                return bool(answer == _direct.ACK_OK)
            backlog.append((kind, answer, bytes(body)))
    finally:
        for raw in raws:
            raw.release()


def _run_chunk(
    fn: Callable[..., object],
    items: Sequence[Any],
    flags: int,
    words: memoryview,
    base: int,
) -> tuple[list[object], list[tuple[int, Any]] | None]:
    results: list[object] = []
    _logs.count_items(results)  # (one entry per item run: the item a record is from)
    append = results.append
    errors: list[tuple[int, Any]] | None = None
    star = flags & STAR_CALL
    timed = flags & TIMED
    clock = time.monotonic_ns
    started = base + STARTED_NS
    n = len(items)
    probe = n if star or timed or flags & TRACKED or n <= PROBE_ITEMS else PROBE_ITEMS
    t0 = clock()
    pos = 0
    while pos < n:
        if pos == probe:
            if clock() - t0 < probe * UNTRACKED_ITEM_NS:
                break  # tiny items: the rest untracked, below
            probe = n
        item = items[pos]
        words[base] = pos
        if timed:
            words[started] = clock()
        try:
            append(fn(*item[0], **item[1]) if star else fn(item))
        except BaseException as exc:  # SystemExit too: it is this task's exception
            append(None)
            if errors is None:
                errors = []
            errors.append((pos, capture_exception(exc)))
            if flags & STOP_ON_ERROR:
                return results, errors
        pos += 1
    while pos < n:
        words[base] = POS_UNTRACKED
        try:
            # extend() keeps what map produced before an exception: its position is known
            results.extend(each(fn, itertools.islice(items, pos, None)))
            break
        except BaseException as exc:
            pos = len(results)
            append(None)
            if errors is None:
                errors = []
            errors.append((pos, capture_exception(exc)))
            if flags & STOP_ON_ERROR:
                break
            pos += 1
    return results, errors


def _dump_results_one_by_one(
    cid: int, results: list[object], errors: list[tuple[int, Any]] | None, elapsed: float
) -> bytes:
    """Some result cannot be pickled: replace each such result with an error record."""
    from parallelkit.errors import SerializationError  # noqa: PLC0415 - failure path only

    errors = list(errors or [])
    for pos, value in enumerate(results):
        try:
            pickle.dumps(value, PROTOCOL)
        except BaseException:
            try:
                dumps(value)  # cloudpickle may manage it
            except BaseException as exc:
                results[pos] = None
                error = SerializationError(
                    f"the result of the task cannot be pickled: {type(exc).__name__}: {exc}",
                    what="result",
                )
                errors.append((pos, capture_exception(error)))
    errors.sort(key=lambda e: e[0])
    return dumps((DONE, cid, results, errors or None, elapsed))
