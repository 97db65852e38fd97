"""Reading what workers answer: one reply per chunk, decoded into its job.

::

    stream ─read()─▶ on_message ─┬─ REPLY_DIRECT: copy buffers out of the worker, ACK ─┐
                                 ├─ REPLY_ARENA: views of the worker's result segment ─┼▶ unpickle
                                 └─ REPLY: in band ────────────────────────────────────┘
      DONE ─▶ job.complete(results, errors)    CHUNK_FAILED ─▶ job.fail, or blame the item
      INIT_FAILED ─▶ the pool is broken

:class:`Replies` owns the decision to read results straight out of the workers (``direct``,
turned off for the pool once the system refuses it).  A worker's result segments are read
through its handle's ``results`` reader (the handle owns it); a chunk's argument region is
freed through the dispatcher that placed it.
"""

from __future__ import annotations

import pickle
import time
from typing import TYPE_CHECKING, Any

from parallelkit._map import blame
from parallelkit._map import worker as W
from parallelkit._map.job import Chunk, PoolBrokenError
from parallelkit._proc import child
from parallelkit._util import fuzz as _fuzz
from parallelkit._util import timeline as _timeline
from parallelkit._wire import direct as _direct
from parallelkit._wire.arena import ResultReader
from parallelkit._wire.codec import rebuild_exception
from parallelkit._wire.stream import Buffer, StreamEnd
from parallelkit.errors import SerializationError

if TYPE_CHECKING:
    from parallelkit._map.engine import Engine
    from parallelkit._map.handle import WorkerHandle


class Replies:
    """Decodes the engine's workers' replies (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.direct = _direct.enabled()  # may copy results out of workers (_direct)

    def drain(self, w: WorkerHandle) -> None:
        """Read every message the worker has sent."""
        stream = w.stream
        try:
            while not w.dead and stream.ready(0):
                if _fuzz.ENABLED:
                    _fuzz.point("engine.before_read")
                self.engine.read_logs(w)  # what it logged before this reply comes first
                kind, _, data, _ = stream.read(None)
                self.on_message(w, kind, data)
        except (StreamEnd, OSError):
            # Closed (every message before the close was read): the sentinel reports the
            # exit.  Under forkserver that comes a little later (the server reaps the
            # worker and then writes it), and a closed pipe is always "ready": waiting on it
            # meanwhile would spin.
            w.hung_up = True

    def on_message(self, w: WorkerHandle, kind: int, data: Buffer) -> None:  # noqa: PLR0912 - a hot path kept in one frame (a helper call costs more than its branches)
        """Decode one reply of ``w`` (a frame of ``kind`` ``W.REPLY*``; ``data``, its
        body, may be a view of the stream's receive buffer, valid until its next read) and
        settle the chunk it answers."""
        engine = self.engine
        chunk = w.chunks[0] if w.chunks else None
        if _timeline.ENABLED:
            _timeline.stamp(f"parent.reply {None if chunk is None else chunk.cid} from {w.slot}")
        try:
            if kind == W.REPLY_DIRECT:
                msg = self._direct_message(w, data)
                if msg is None:
                    return  # the worker answers again in band, or has died
            elif kind == W.REPLY_ARENA:
                msg = self._arena_message(w, chunk, data)
            else:
                if chunk is not None and chunk.region is not None:
                    engine.dispatcher.release_region(chunk, kept=False)
                msg = pickle.loads(data)
        except (Exception, SystemExit) as exc:  # a result's __reduce__ may even sys.exit()
            if chunk is None:
                return
            w.chunks.popleft()
            self._chunk_done(w, chunk)
            blame.blame_or_split(chunk, "result", "cannot be unpickled here", exc)
            return
        tag = msg[0]
        if tag == W.INIT_FAILED:
            engine.break_pool(child.startup_error(msg[1], w.pid))
            return
        if chunk is None or msg[1] != chunk.cid:  # pragma: no cover - a bug, never a hang
            engine.break_pool(
                PoolBrokenError(
                    f"internal error: worker pid {w.pid} answered chunk {msg[1]}, "
                    f"expected {None if chunk is None else chunk.cid}"
                )
            )
            return
        w.chunks.popleft()
        w.head_since = time.monotonic_ns()
        self._chunk_done(w, chunk)
        job = chunk.job
        engine.blame.startup_deaths = 0
        if tag == W.DONE:
            _, _, results, records, seconds = msg
            errors = None
            if records:
                errors = [
                    (pos, blame.rebuild(rec, chunk.start + pos, w.pid)) for pos, rec in records
                ]
            w.busy += seconds
            job._adapt(len(results), seconds)
            job.complete(chunk.start, results, errors)
        else:  # CHUNK_FAILED: the function or the items failed to unpickle in the worker
            _, _, what, rec = msg
            cause = rebuild_exception(rec, where=f"in worker pid {w.pid}")
            if what == "function":
                w.fns.pop(job.fn_id, None)
                error = SerializationError(
                    f"the worker cannot unpickle the function: {type(cause).__name__}: {cause}",
                    what="function",
                )
                error.__cause__ = cause
                job.fail(error)
            else:
                blame.blame_or_split(chunk, "argument", "cannot be unpickled in the worker", cause)
        self._maybe_retire(w)

    def _arena_message(self, w: WorkerHandle, chunk: Chunk | None, data: Buffer) -> Any:
        """A reply with result buffers in the worker's segment, or a kept flag: let go of
        the chunk's region, then unpickle onto views of the worker's segment."""
        if w.results is None:
            w.results = ResultReader()
        kept, payload, buffers = w.results.load(data)
        if chunk is not None and chunk.region is not None:
            self.engine.dispatcher.release_region(chunk, kept=kept)
        return pickle.loads(payload, buffers=buffers)

    def _direct_message(self, w: WorkerHandle, data: Buffer) -> Any:
        """A reply whose large buffers are still in the worker (no room in its shared
        memory): copy them out, tell the worker it may go on, unpickle onto the copies
        (``None``: the worker was asked to send it again in band, or is gone)."""
        buffers = None
        try:
            specs, payload = _direct.parse(data)
            if self.direct:
                buffers = _direct.read(w.pid or 0, specs)
        except _direct.Unreadable as exc:
            if exc.refused:  # not allowed here: no more direct replies in this pool
                self.direct = False
        except Exception:  # no memory for the copies (MemoryError, ENOMEM): in band
            buffers = None
        finally:  # always answered: the worker waits for this before it does anything
            answer = _direct.ACK_OK if buffers is not None else _direct.ACK_RESEND
            w.stream.post(W.ACK, answer, b"")
        if buffers is None:
            return None
        return pickle.loads(payload, buffers=buffers)

    @staticmethod
    def _chunk_done(w: WorkerHandle, chunk: Chunk) -> None:
        chunk.job.in_flight -= 1
        w.tasks_done += chunk.stop - chunk.start

    def _maybe_retire(self, w: WorkerHandle) -> None:
        limit = self.engine.max_tasks_per_worker
        if limit is not None and w.tasks_done >= limit and not w.chunks and not w.stopping:
            w.stopping = True
            w.stream.post(W.STOP, 0, b"")
