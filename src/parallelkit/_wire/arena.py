"""Large buffers of a parallel map travel through reused shared memory, not the pipe.

Pickle protocol 5 hands an object's large buffers (numpy arrays, ``pickle.PickleBuffer``;
large top-level ``bytes`` / ``bytearray`` items are wrapped so that they go the same way)
to a callback instead of copying them into the pickle.  Buffers of at least
``ARG_MIN_BYTES`` (arguments) or ``MIN_BYTES`` (results) are copied into shared memory;
the message carries only where they are::

    parent ── TASK: [ARENA spec: segment, (offset, size)...] + small pickle ──▶ worker
      │  copies each argument buffer into the engine's arena          maps the arena once,
      │  (one segment, reused across chunks and calls, grown when      unpickles onto views
      │  it is too small), a region per chunk                           of it: zero copy
    parent ◀── kept + result specs + small pickle ─────────────────────── worker
         maps each result region on its own and builds the result   copies each large result
         on that mapping: zero copy; when the object is gone, the   into its result segment
         region goes back to the worker (a flag word per page)      (reused, grown if full)

- **Arguments** (:class:`ArgArena`, :class:`ArgReader`): a chunk's region is reused only
  after its worker answered.  Before answering, the worker checks that nothing still
  points into the region (releasing each view raises ``BufferError`` otherwise: the
  function kept its argument).  It then reports the region as *kept*, and the parent never
  writes to that segment again: it stops using it, frees (``MADV_REMOVE``) what is not
  kept, and unlinks it once no region of it is in flight; the worker's mapping keeps the
  kept memory alive for as long as the function's objects use it.  After ``KEPT_LIMIT``
  such reports a job sends its buffers in band.
- **Results** (:class:`ResultWriter`, :class:`ResultReader`): each worker owns result
  segments.  The parent maps each result region by itself (``mmap`` at its offset), so
  the object built on it owns that mapping alone; a ``weakref.finalize`` on the mapping
  clears the region's flag word in the segment's table when the object is gone, and the
  worker then reuses the region.  Results a caller keeps make the worker grow into a new
  segment instead.  (Rather than copying each result out in the parent: faulting in fresh
  private pages made the parent the bottleneck, while reused shared pages cost nothing
  more; the numbers are in ``docs/performance.md``, "Why the thresholds".)
- **Cleanup**: every segment is created by ``_shm.Segment`` (named ``pk_<pid>_<hex>``;
  the name is registered with multiprocessing's resource tracker before the file exists
  and unregistered after it is gone, so the tracker unlinks it whatever instant its
  creator is SIGKILLed together with the parent).  A result segment has one owner of its end at a
  time: while the worker lives, the worker, which unlinks it only once the parent has
  given back every region in it (so the parent has read every reply that named it); when
  the worker exits, for whatever reason, the parent, which first reads every reply the
  worker sent and then removes what the worker left (:func:`remove_leftovers`).  A
  stopping worker never unlinks: a reply it sent just before may not be read yet.
- **No room** in ``/dev/shm``: argument buffers go in band; result buffers are copied by
  the parent out of the worker's memory (:mod:`._direct`) where it may, else in band.
- The parent's arena mapping is ``MADV_DONTFORK``: a worker forked later inherits none.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import mmap
import os
import pickle
import time
import weakref
from collections.abc import Sequence
from typing import Any, Final, cast

from parallelkit import _platform
from parallelkit._util import fuzz as _fuzz
from parallelkit._wire import layouts
from parallelkit._wire.codec import (
    ARENA_MIN_BYTES,
    SCAN_LIMIT,
    NoRoom,
    Strided,
    dump_apart,
    dump_apart_arrays,
    dump_arrays,
    mark_large_bytes,
    numpy_array_type,
)
from parallelkit._wire.shm import NAME_RE, SHM_DIR, Segment, remove_segments_of

# Buffers this large go through shared memory.  An argument pays off sooner than a result,
# which costs a mapping of its own in the parent (measurements: docs/performance.md,
# "Why the thresholds").
ARG_MIN_BYTES: Final = 16 * 1024
MIN_BYTES: Final = ARENA_MIN_BYTES  # results (the worker decides with the same number)
CHUNK_BYTES: Final = 4 * 1024 * 1024  # automatic chunks carry about this much at most
KEPT_LIMIT: Final = 3  # after this many kept regions a job sends its buffers in band
_MIN_SEGMENT: Final = 4 * 1024 * 1024
WHOLE_MAX: Final = 64 * 1024 * 1024  # bytes: a reader maps a larger segment for no copy
# After /dev/shm had no room for a result segment, seconds before a worker tries again
# (doubling while it stays full, up to NO_ROOM_RETRY_MAX); results meanwhile go directly
# or in band.  Trying costs a statvfs while the space is short (see Segment.create).
NO_ROOM_RETRY = 1.0
NO_ROOM_RETRY_MAX = 60.0
_PAGE: Final = mmap.PAGESIZE
_ALIGN: Final = 64  # each buffer starts on a cache line (numpy wants 16 at least)

# a result mapping's page tables are filled at once: faulting 8 MB page by page when the
# caller reads it costs several times more
_RESULT_FLAGS: Final = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
# the headers and buffer specs, both ways (their layouts: layouts.py)
_ARG_HEAD: Final = layouts.ARENA_ARG_HEAD
_ARG_SPEC: Final = layouts.ARENA_ARG_SPEC
_RES_HEAD: Final = layouts.ARENA_RES_HEAD
_RES_SPEC: Final = layouts.ARENA_RES_SPEC


def _round(n: int, to: int) -> int:
    return -(-n // to) * to


# ------------------------------------------------------------------ pickling
def dump_items(items: Sequence[Any]) -> tuple[bytes, list[memoryview | Strided]]:
    """Pickle a chunk's items; buffers of at least ``ARG_MIN_BYTES`` are returned apart.

    Non-contiguous numpy arrays that large go apart too (:class:`Strided`), in a chunk of
    ``SCAN_LIMIT`` items at most or one whose first item is (or holds) an array: the look
    for them costs a call per container pickled, too much for a long chunk of small tuples.

    Returns:
        The pickle and the large buffers (contiguous byte views of the items' memory,
        not copies, or the non-contiguous arrays themselves), in the order the unpickler
        wants them.
    """
    marked = mark_large_bytes(items, ARG_MIN_BYTES)
    if len(items) <= SCAN_LIMIT or _holds_array(items[0]):
        return dump_apart_arrays(marked, ARG_MIN_BYTES)
    payload, raws = dump_apart(marked, ARG_MIN_BYTES)
    return payload, cast("list[memoryview | Strided]", raws)


def _holds_array(item: Any) -> bool:
    """Whether ``item`` is a numpy array, or a tuple with one (numpy is not imported)."""
    parts = item if type(item) is tuple else (item,)
    return any(type(part).__module__ == "numpy" for part in parts)


# ------------------------------------------------------------------ space
class _Space:
    """First-fit allocation of page-aligned regions inside one segment."""

    __slots__ = ("size", "used")

    def __init__(self, size: int) -> None:
        self.size = size
        self.used: list[tuple[int, int]] = []  # sorted (start, end)

    def alloc(self, n: int) -> int | None:
        n = _round(max(n, 1), _PAGE)
        pos = 0
        for i, (start, end) in enumerate(self.used):
            if start - pos >= n:
                self.used.insert(i, (pos, pos + n))
                return pos
            pos = end
        if self.size - pos >= n:
            self.used.append((pos, pos + n))
            return pos
        return None

    def free(self, offset: int) -> tuple[int, int]:
        for i, (start, end) in enumerate(self.used):
            if start == offset:
                del self.used[i]
                return start, end
        raise KeyError(offset)  # pragma: no cover - a bug


def _map_private(segment: Segment) -> None:
    """A mapping that only this process uses: no fd kept, not inherited by fork."""
    segment.drop_fd()
    _platform.dont_fork(segment.mm)


class _ArgSegment:
    __slots__ = ("kept", "live", "segment", "space", "view")

    def __init__(self, size: int) -> None:
        self.segment = Segment.create(size)
        _map_private(self.segment)
        self.view = memoryview(self.segment.mm)
        self.space = _Space(self.segment.size)
        self.live = 0  # regions in flight
        self.kept: list[tuple[int, int]] = []  # regions a worker still uses

    def destroy(self) -> None:
        """Free every page no worker keeps, then unmap and unlink."""
        pos = 0
        mm = self.segment.mm
        for start, end in [*sorted(self.kept), (self.segment.size, self.segment.size)]:
            if start > pos:
                _platform.free_pages(mm, pos, start - pos)
            pos = max(pos, end)
        self.segment.close((self.view,))


class Region:
    """Where one chunk's argument buffers are (owned by :class:`ArgArena`)."""

    __slots__ = ("home", "offset")

    def __init__(self, home: _ArgSegment, offset: int) -> None:
        self.home = home
        self.offset = offset


class ArgArena:
    """The parent's shared memory for argument buffers (see the module docstring)."""

    def __init__(self, max_workers: int) -> None:
        self.max_workers = max_workers
        self.current: _ArgSegment | None = None
        self.retired: list[_ArgSegment] = []
        self.live = 0

    def put(self, raws: Sequence[memoryview | Strided]) -> tuple[bytes, Region] | None:
        """Copy ``raws`` into one region; ``(spec, region)``, or ``None`` to wait for room.

        Raises:
            OSError: no room in ``/dev/shm`` for a segment (``errno.ENOSPC``).
        """
        sizes = [raw.nbytes for raw in raws]
        need = sum(_round(n, _ALIGN) for n in sizes)
        home = self.current
        offset = None if home is None else home.space.alloc(need)
        if offset is None:
            if home is not None and self.live >= 2 * self.max_workers:
                return None  # the regions in flight come back as their workers answer
            size = max(_MIN_SEGMENT, 2 * self.max_workers * _round(need, _PAGE))
            if home is not None:
                size = max(size, 2 * home.segment.size)
            self._retire_current()
            home = self.current = _ArgSegment(_round(size, 1 << 20))
            offset = home.space.alloc(need)
            assert offset is not None
        assert home is not None
        name = home.segment.name.encode()
        spec = bytearray(_ARG_HEAD.size + len(name) + _ARG_SPEC.size * len(raws))
        _ARG_HEAD.pack_into(spec, 0, len(raws), len(name))
        spec[_ARG_HEAD.size : _ARG_HEAD.size + len(name)] = name
        at = _ARG_HEAD.size + len(name)
        view = home.view
        pos = offset
        for raw, n in zip(raws, sizes, strict=True):
            if isinstance(raw, Strided):  # one strided copy, straight into shared memory
                raw.copy_into(view[pos : pos + n])
            else:
                view[pos : pos + n] = raw
            _ARG_SPEC.pack_into(spec, at, pos, n)
            at += _ARG_SPEC.size
            pos += _round(n, _ALIGN)
        home.live += 1
        self.live += 1
        return bytes(spec), Region(home, offset)

    def release(self, region: Region, *, kept: bool) -> None:
        """The worker is done with ``region`` (``kept``: its objects still use it)."""
        home = region.home
        home.live -= 1
        self.live -= 1
        span = home.space.free(region.offset)
        if kept:
            home.kept.append(span)
            if home is self.current:
                self._retire_current()
        if home is not self.current and home.live == 0 and home in self.retired:
            self.retired.remove(home)
            home.destroy()

    def _retire_current(self) -> None:
        home, self.current = self.current, None
        if home is None:
            return
        if home.live == 0:
            home.destroy()
        else:
            self.retired.append(home)

    def close(self) -> None:
        """Unmap and unlink every segment (workers still mapping one keep their memory)."""
        homes = [*self.retired, *([self.current] if self.current is not None else [])]
        self.current = None
        self.retired = []
        for home in homes:
            home.destroy()


class ArgReader:
    """A worker's side of :class:`ArgArena`: the current segment, mapped once."""

    def __init__(self) -> None:
        self.name = ""
        self.segment: Segment | None = None
        self.view: memoryview | None = None
        self.held: list[memoryview] = []

    def load(self, data: memoryview) -> Any:
        """Unpickle a chunk's items onto views of the arena (no copy)."""
        nbuf, name_len = _ARG_HEAD.unpack_from(data)
        at = _ARG_HEAD.size
        name = bytes(data[at : at + name_len]).decode()
        at += name_len
        if name != self.name:
            self._switch(name)
        view = self.view
        assert view is not None
        held = self.held
        for _ in range(nbuf):
            offset, n = _ARG_SPEC.unpack_from(data, at)
            at += _ARG_SPEC.size
            held.append(view[offset : offset + n])
        # A PickleBuffer per region: what the objects built on it hold, so that a region
        # still in use cannot be released (see release()).
        return pickle.loads(data[at:], buffers=[pickle.PickleBuffer(v) for v in held])

    def release(self) -> bool:
        """Let go of the last chunk's regions; True if the function's objects kept one."""
        held, self.held = self.held, []
        kept = False
        for attempt in (0, 1):
            left = []
            for view in held:
                try:
                    view.release()
                except BufferError:
                    left.append(view)
            if not left:
                return kept
            held = left
            kept = True
            if attempt == 0:
                gc.collect()  # a reference cycle (a traceback) may be all that holds it
                kept = False
        return True

    def _switch(self, name: str) -> None:
        self.close()  # the parent never writes to an older segment again
        segment = Segment.attach(name)
        segment.drop_fd()
        self.segment, self.view, self.name = segment, memoryview(segment.mm), name

    def close(self) -> None:
        """Unmap (memory the function's objects still use stays until they go)."""
        if self.segment is not None:
            assert self.view is not None
            self.segment.close((self.view,))
        self.segment = self.view = None
        self.name = ""


# ------------------------------------------------------------------ results
class _ResultSegment:
    """One of a worker's result segments: a table of flag words (one per page: 1 while
    the parent's objects use the region that starts there; the parent writes 0 when they
    are gone), then the regions."""

    __slots__ = ("allocated", "segment", "space", "view", "words")

    def __init__(self, size: int, *, heir: bool = True) -> None:
        table = _table_bytes(size)
        # heir: the parent (for a worker's; a parent's own segments have none)
        self.segment = Segment.create(table + size, heir=heir)
        self.segment.drop_fd()
        self.view = memoryview(self.segment.mm)
        self.words = self.view[:table].cast("q")
        self.space = _Space(self.segment.size)
        self.space.used.append((0, table))
        self.allocated: list[int] = []  # offsets of the regions the parent may hold

    def collect(self) -> None:
        """Take back the regions whose flag the parent has cleared."""
        words = self.words
        still = []
        for offset in self.allocated:
            if words[offset // _PAGE]:
                still.append(offset)
            else:
                self.space.free(offset)
        self.allocated = still

    def close(self, *, unlink: bool = True) -> None:
        self.segment.close((self.words, self.view), unlink=unlink)


def _table_bytes(size: int) -> int:
    return _round(8 * (size // _PAGE + 2), _PAGE)


class ResultWriter:
    """A worker's result segments: large result buffers are copied in, and the parent's
    objects are built on them without a copy (see the module docstring)."""

    def __init__(self, *, keep_max: int | None = None, heir: bool = True) -> None:
        # keep_max: segments kept for reuse stay this small; a buffer over a quarter of it
        # gets a segment of its own, unlinked as soon as its reader gives it back
        self.keep_max = keep_max
        self.heir = heir  # False: the writer's own process removes every segment
        self.current: _ResultSegment | None = None
        self.retired: list[_ResultSegment] = []
        self.retry_at = 0.0  # /dev/shm was full: no new segment is tried before then
        self.retry_after = NO_ROOM_RETRY

    def dump(
        self, msg: tuple[Any, ...], results: list[Any], *, strict: bool = False
    ) -> tuple[bytes, list[tuple[_ResultSegment, int, int, bool]]]:
        """Pickle ``msg`` (whose third field is ``results``), large buffers copied into
        a result segment; give the pickle and the buffers' specs to :meth:`frame`.  A
        buffer with no room in shared memory goes in band, or with ``strict`` raises
        :class:`NoRoom`.

        Raises:
            NoRoom: ``strict`` and a buffer did not fit (nothing is left allocated).
            Exception: a result cannot be pickled (nothing is left allocated).
        """
        marked = (*msg[:2], mark_large_bytes(results, MIN_BYTES), *msg[3:])
        return self._dump(marked, results, strict=strict)

    def dump_list(
        self, items: list[Any]
    ) -> tuple[bytes, list[tuple[_ResultSegment, int, int, bool]]]:
        """Pickle the list ``items`` itself, as :meth:`dump` does its ``results`` (a buffer
        with no room in shared memory goes in band): a pipeline's message."""
        return self._dump(mark_large_bytes(items, MIN_BYTES), items, strict=False)

    def _dump(
        self, marked: Any, results: Sequence[Any], *, strict: bool
    ) -> tuple[bytes, list[tuple[_ResultSegment, int, int, bool]]]:
        self._collect()
        specs: list[tuple[_ResultSegment, int, int, bool]] = []

        def take(raw: memoryview | Strided) -> bool:
            n = raw.nbytes
            try:
                home, offset = self._alloc(n)
            except OSError:  # no room in /dev/shm: this one goes in band (or directly)
                if strict:
                    raise NoRoom from None
                return False
            home.words[offset // _PAGE] = 1
            home.allocated.append(offset)
            if isinstance(raw, Strided):  # one strided copy, rebuilt C-contiguous, writable
                raw.copy_into(home.view[offset : offset + n])
                specs.append((home, offset, n, False))
            else:
                home.view[offset : offset + n] = raw
                specs.append((home, offset, n, raw.readonly))
            return True

        def out_of_band(buffer: pickle.PickleBuffer) -> bool:
            try:
                raw = buffer.raw()
            except BufferError:
                return True
            return raw.nbytes < MIN_BYTES or not take(raw)

        def unclaim() -> None:
            for home, offset, _, _ in specs:
                home.words[offset // _PAGE] = 0
            specs.clear()

        ndarray = numpy_array_type()
        try:
            # non-contiguous arrays out of band too, as for arguments (same scan rule)
            if ndarray is not None and (len(results) <= SCAN_LIMIT or _holds_array(results[0])):
                try:
                    return dump_arrays(marked, MIN_BYTES, take, ndarray), specs
                except NoRoom:
                    if strict:
                        raise
                    unclaim()  # a strided one found no room: numpy's pickle, in band
            payload = pickle.dumps(marked, 5, buffer_callback=out_of_band)
        except BaseException:
            unclaim()
            raise
        return payload, specs

    def frame(
        self,
        payload: bytes,
        specs: list[tuple[_ResultSegment, int, int, bool]],
        kept: bool | None,
    ) -> bytes:
        """The reply when there is something to say out of band (its user sends it as a
        reply of its own kind): the kept flag (``None``: no arguments came through the
        arena), the specs of the result buffers, then ``payload``."""
        homes: list[_ResultSegment] = []
        for home, *_ in specs:
            if home not in homes:
                homes.append(home)
        names = "\n".join(home.segment.name for home in homes).encode()
        head = bytearray(_RES_HEAD.size + len(names) + _RES_SPEC.size * len(specs))
        _RES_HEAD.pack_into(head, 0, int(bool(kept)), len(specs), len(names))
        head[_RES_HEAD.size : _RES_HEAD.size + len(names)] = names
        at = _RES_HEAD.size + len(names)
        for home, offset, n, readonly in specs:
            _RES_SPEC.pack_into(head, at, homes.index(home), offset, n, int(readonly))
            at += _RES_SPEC.size
        head += payload
        return bytes(head)

    def collect(self) -> None:
        """Take back the regions given back, and remove retired segments left unused."""
        self._collect()

    def _collect(self) -> None:
        if self.current is not None:
            self.current.collect()
        for home in list(self.retired):
            home.collect()
            if not home.allocated:
                self.retired.remove(home)
                home.close()

    def _alloc(self, n: int) -> tuple[_ResultSegment, int]:
        home = self.current
        keep_max = self.keep_max
        alone = keep_max is not None and 4 * n > keep_max
        offset = None if home is None or alone else home.space.alloc(n)
        if offset is not None:
            assert home is not None
            return home, offset
        if self.retry_at and time.monotonic() < self.retry_at:
            raise OSError(errno.ENOSPC, "no room in /dev/shm a moment ago")
        if alone:
            return self._alone(n)
        size = max(_MIN_SEGMENT, 4 * _round(n, _PAGE))
        if home is not None:
            size = max(size, 2 * home.segment.size)
        if keep_max is not None:
            size = max(min(size, keep_max), 4 * _round(n, _PAGE))
        try:
            new = _ResultSegment(
                _round(size, 1 << 20), heir=self.heir
            )  # OSError: the caller sends in band
        except OSError:
            if self.retry_at:  # full again: wait longer before the next try
                self.retry_after = min(2 * self.retry_after, NO_ROOM_RETRY_MAX)
            self.retry_at = time.monotonic() + self.retry_after
            raise
        self.retry_at, self.retry_after = 0.0, NO_ROOM_RETRY
        if home is not None:
            if home.allocated:
                self.retired.append(home)  # the parent still uses some of it
            else:
                home.close()
        self.current = new
        offset = new.space.alloc(n)
        assert offset is not None
        return new, offset

    def _alone(self, n: int) -> tuple[_ResultSegment, int]:
        """A segment for one large buffer, retired at once (removed once it is given back)."""
        try:
            new = _ResultSegment(_round(n, _PAGE), heir=self.heir)
        except OSError:
            self.retry_at = time.monotonic() + self.retry_after
            raise
        self.retired.append(new)
        offset = new.space.alloc(n)
        assert offset is not None
        return new, offset

    def close(self, *, unlink: bool = False) -> None:
        """The worker is stopping: unmap every result segment, and leave them to the
        parent, which may not have read our last replies yet (see the module docstring).

        ``unlink``: remove them now instead (their owner knows every reader is done).
        """
        homes = [*self.retired, *([self.current] if self.current is not None else [])]
        self.current = None
        self.retired = []
        for home in homes:
            home.close(unlink=unlink)


def _read_region(fd: int, n: int, offset: int) -> bytearray:
    """``n`` bytes of the segment open as ``fd``, from ``offset``, copied into new memory."""
    out = bytearray(n)
    view = memoryview(out)
    done = 0
    while done < n:
        got = _platform.pread_into(fd, view[done:], offset + done)
        if got <= 0:
            raise OSError(f"a result region ends early ({done} of {n} bytes)")
        done += got
    return out


def _free_region(owner: int, words: memoryview, index: int) -> None:
    """The parent's objects built on a result region are gone: the worker may reuse it."""
    if os.getpid() != owner:  # a forked child dropping its copy of them: not ours to free
        return
    with contextlib.suppress(ValueError, IndexError):
        words[index] = 0


class _Mapped:
    """The parent's handle on one worker result segment: its file and its flag table."""

    __slots__ = ("__weakref__", "fd", "mm", "size", "whole", "words")

    def __init__(self, name: str) -> None:
        if NAME_RE.fullmatch(name) is None:
            raise ValueError(f"not a parallelkit shared-memory segment name: {name!r}")
        if _fuzz.ENABLED:
            _fuzz.point("arena.before_map")
        self.fd = os.open(SHM_DIR / name, os.O_RDWR)
        try:
            self.size = os.fstat(self.fd).st_size
            table = _table_bytes(self.size)
            self.mm = mmap.mmap(self.fd, table)
        except BaseException:
            os.close(self.fd)
            raise
        # the table is unmapped once every finalizer holding ``words`` has run
        self.words = memoryview(self.mm).cast("B").cast("q")
        self.whole: mmap.mmap | None = None  # the whole segment, read-only (see copy)
        _OPEN.add(self)

    def copy(self, offset: int, n: int) -> bytes:
        """A region's bytes, copied out of one read-only mapping of the whole segment, kept
        for the next (cheaper than a mapping per region, or a ``pread``, for a copy)."""
        if self.size > WHOLE_MAX:  # not kept mapped: its pages would stay with us
            data = os.pread(self.fd, n, offset)
            return data if len(data) == n else bytes(_read_region(self.fd, n, offset))
        whole = self.whole
        if whole is None:
            whole = self.whole = mmap.mmap(self.fd, 0, prot=mmap.PROT_READ)
        return whole[offset : offset + n]

    def drop_fd(self) -> None:
        """No more regions to map from this segment (the mappings stay valid)."""
        _OPEN.discard(self)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.whole is not None:
            self.whole.close()  # never exported: copies only
            self.whole = None


# The parent's open result segments: a child forked from it closes its copies of their
# descriptors, which would otherwise keep unlinked segments alive as long as it lives.
_OPEN: weakref.WeakSet[_Mapped] = weakref.WeakSet()


def _close_inherited() -> None:
    for home in list(_OPEN):
        home.drop_fd()


os.register_at_fork(after_in_child=_close_inherited)


class ResultReader:
    """The parent's view of one worker's result segments."""

    def __init__(self) -> None:
        self.mapped: dict[str, _Mapped] = {}

    def load(
        self, data: bytes | bytearray | memoryview, *, copy_readonly: bool = False
    ) -> tuple[bool, bytes | memoryview, list[Any]]:
        """``(kept, pickle, buffers)`` of a reply made by :meth:`ResultWriter.frame`.

        Each buffer is a mapping of its own region of the worker's segment (no copy);
        the region goes back to the worker when the mapping, and so every object built
        on it, is gone.  With ``copy_readonly``, a read-only buffer (a ``bytes`` item,
        which is rebuilt as a copy anyway) is copied into a new ``bytes`` instead, from one
        mapping of the whole segment (no mapping to set up and tear down per region), and
        its region goes back at once.
        """
        kept, nbuf, names_len = _RES_HEAD.unpack_from(data)
        at = _RES_HEAD.size
        buffers: list[Any] = []
        if nbuf:
            names = bytes(data[at : at + names_len]).decode().split("\n")
            homes = [self._map(name) for name in names]
            for stale in [name for name in self.mapped if name not in names]:
                self.mapped.pop(stale).drop_fd()  # the worker has moved on
            at += names_len
            me = os.getpid()
            for _ in range(nbuf):
                index, offset, n, readonly = _RES_SPEC.unpack_from(data, at)
                at += _RES_SPEC.size
                home = homes[index]
                if readonly and copy_readonly:
                    buffers.append(home.copy(offset, n))
                    _free_region(me, home.words, offset // _PAGE)
                    continue
                # Not MADV_DONTFORK: a child forked later may use the results mapped here.
                try:
                    part: Any = mmap.mmap(home.fd, n, flags=_RESULT_FLAGS, offset=offset)
                except OSError:
                    # No mapping to be had (the caller keeps more than vm.max_map_count
                    # results alive, or memory is short): copy this one out instead.
                    part = _read_region(home.fd, n, offset)
                    _free_region(me, home.words, offset // _PAGE)
                else:
                    weakref.finalize(part, _free_region, me, home.words, offset // _PAGE)
                buffers.append(part)
            for name, home in zip(names, homes, strict=True):
                if home.size > WHOLE_MAX:  # a segment for one buffer: its writer removes it
                    self.mapped.pop(name, None)
                    home.drop_fd()
        else:
            at += names_len
        return bool(kept), memoryview(data)[at:], buffers

    def _map(self, name: str) -> _Mapped:
        known = self.mapped.get(name)
        if known is None:
            known = self.mapped[name] = _Mapped(name)
        return known

    def close(self) -> None:
        """Forget the segments (each goes once no object built on it is left)."""
        mapped, self.mapped = self.mapped, {}
        for home in mapped.values():
            home.drop_fd()


def region_bytes(data: bytes | bytearray | memoryview) -> int:
    """The bytes in shared memory that a frame made by :meth:`ResultWriter.frame` names."""
    _, nbuf, names_len = _RES_HEAD.unpack_from(data)
    at = _RES_HEAD.size + names_len
    total = 0
    for _ in range(nbuf):
        total += _RES_SPEC.unpack_from(data, at)[2]
        at += _RES_SPEC.size
    return total


class WorkerArena:
    """What a worker needs: the parent's arena mapped, its own result segment."""

    def __init__(self) -> None:
        self.reader = ArgReader()
        self.writer = ResultWriter()

    def close(self) -> None:
        self.writer.close()
        self.reader.close()


def remove_leftovers(pid: int, pending: str = "") -> None:
    """Unlink the segments a worker (``pid``, exited) left; call it only after every reply
    of that worker has been read.  ``pending``: the name its ledger holds, if it kept one
    (see ``_shm.keep_ledger``)."""
    remove_segments_of(pid, pending)
