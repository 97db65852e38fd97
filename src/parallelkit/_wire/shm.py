"""Shared-memory segments: naming, creation with the space reserved, attaching, cleanup.

One job: own the life of a POSIX shared-memory segment, so that ``_shared`` only lays
out what is inside it.

- Names are ``pk_<creator pid>_<random hex>``: a leftover of a creator that was killed
  is recognisable, and :func:`remove_stale_segments` removes those whose creator is gone.
- :meth:`Segment.create` reserves the whole size up front (``posix_fallocate``), so a
  full ``/dev/shm`` (Docker's default is 64 MiB) fails at once with a clear
  :class:`OSError` (``errno.ENOSPC``) instead of killing the first writer with SIGBUS.
- Only the creator unlinks, and only from its own process (a forked child inherits the
  object, not the ownership).  The creator registers the segment with multiprocessing's
  resource tracker, which unlinks it if the creator dies without closing it (unless the
  tracker dies too, say when a whole process group is SIGKILLed: then
  :func:`remove_stale_segments` is the way out).
- The resource tracker holds a segment's name whenever its file exists (except for a
  creator with an heir and no ledger, below): the name is registered *before* the file is
  made, and unregistered only *after* the file is unlinked.  So no moment exists at which
  a SIGKILL of the creator and of every heir (a parent SIGKILLed, its workers dying with
  it) leaves a file that nobody will remove.
- A segment created with an *heir* (a worker's, whose parent cleans up after it) may
  outlive its creator: the creator leaves it with ``close(unlink=False)``, and the heir
  removes what the creator left, once the creator has exited, with
  :func:`remove_segments_of`, settling the tracker exactly (each name registered and
  unregistered once, whatever moment the creator died at).  The heir finds the files by
  the creator's pid; a name registered without a file (the creator died between the two
  steps) it can only learn from the creator's *ledger* (:func:`keep_ledger`: a slot of
  the heir's memory where the creator writes the name it is between the steps of making
  or removing).  A creator without a ledger (a pool worker) makes the file before it
  registers the name and unregisters the name before it unlinks the file, so that the
  heir sees every name the tracker holds; if the heir is SIGKILLed too at that moment,
  the file is :func:`remove_stale_segments`' to remove.
- Attaching opens the file itself and never talks to the resource tracker: on Python
  3.11 and 3.12 an attaching :class:`multiprocessing.shared_memory.SharedMemory`
  registers the segment, and its tracker unlinks the creator's segment when the
  attacher exits (CPython gh-82300; 3.13 added ``track=False``).  Unregistering after
  attaching is no cure either: a child shares its creator's tracker, and would drop the
  creator's own registration.
- :meth:`Segment.locked` is a cross-process lock (``flock`` on the segment's file) that
  the kernel releases when its holder dies, so a process killed while holding it cannot
  deadlock the others.  Each process has its own open file description (re-opened in a
  forked child), because ``flock`` does not exclude holders of the same description.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import re
import secrets
import threading
import weakref
from collections.abc import Iterator
from multiprocessing import resource_tracker
from typing import Final

from parallelkit import _platform
from parallelkit._util import fuzz as _fuzz

SHM_DIR: Final = _platform.SEGMENT_DIR  # /dev/shm, or the portable directory
PREFIX: Final = "pk_"
NAME_RE: Final = re.compile(r"pk_(\d+)_[0-9a-f]{12}")
_TRACKER_KIND: Final = "shared_memory"

# Segments with an open file descriptor in this process, re-opened in a forked child.
_LIVE: weakref.WeakSet[Segment] = weakref.WeakSet()

LEDGER_SLOT: Final = 64  # bytes: a creator's slot in its heir's ledger (a name, NUL-ended)
# This process's slot in its heir's ledger (see the module docstring), or None
_ledger: memoryview | None = None


def keep_ledger(slot: memoryview | None) -> None:
    """From now on, write the name of a segment with an heir that this process is between
    the two steps of making or removing into ``slot`` (``LEDGER_SLOT`` bytes of memory
    its heir reads once it has exited: :func:`ledger_name`); ``None``: stop."""
    global _ledger
    _ledger = slot


def _note(name: str) -> None:
    slot = _ledger
    if slot is not None:
        data = name.encode()
        slot[: len(data)] = data
        slot[len(data)] = 0


def ledger_name(slot: bytes | bytearray | memoryview) -> str:
    """The name a creator's ledger ``slot`` holds ("" if none)."""
    return bytes(slot).split(b"\0", 1)[0].decode("ascii", "replace")


def tracked() -> bool:
    """Whether the resource tracker removes this process's segments if it is killed (they
    are in ``/dev/shm``; in the portable directory :func:`remove_stale_segments` does)."""
    return SHM_DIR == _platform.DEV_SHM


def _track(name: str) -> None:
    # The tracker unlinks what it holds with shm_unlink, which reaches /dev/shm only: in
    # the portable directory a killed creator's files are remove_stale_segments' to remove.
    if SHM_DIR == _platform.DEV_SHM:
        resource_tracker.register("/" + name, _TRACKER_KIND)


def _untrack(name: str) -> None:
    if SHM_DIR == _platform.DEV_SHM:
        resource_tracker.unregister("/" + name, _TRACKER_KIND)


def new_name() -> str:
    """A fresh segment name: ``pk_<this pid>_<12 random hex digits>``."""
    return f"{PREFIX}{os.getpid()}_{secrets.token_hex(6)}"


def _path(name: str) -> str:
    return str(SHM_DIR / name)


def _describe_size(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"


def _free_bytes() -> int | None:
    """What ``/dev/shm`` has free, or ``None`` if it does not say (fallocate decides)."""
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize if stat.f_blocks else None


def _no_room(size: int, cause: OSError) -> OSError:
    try:
        stat = os.statvfs(SHM_DIR)
        free = f"{_describe_size(stat.f_bavail * stat.f_frsize)} free of " + _describe_size(
            stat.f_blocks * stat.f_frsize
        )
    except OSError:
        free = "free space unknown"
    return OSError(
        errno.ENOSPC,
        f"no room in {SHM_DIR} for a shared-memory segment of {_describe_size(size)} "
        f"({size} bytes; {free}): {cause.strerror}. Free some space, make the segment "
        f"smaller, or give the container a larger {SHM_DIR} (docker run --shm-size=...)",
    )


def _new_file(*, heir: bool, tracker_first: bool) -> tuple[str, int]:
    """A new segment file's name and descriptor; with ``tracker_first``, its name is
    registered before the file is made (and noted in the ledger for an heir)."""
    while True:
        name = new_name()
        if tracker_first:
            if heir:
                _note(name)  # before the tracker holds it: the heir settles it
            _track(name)
        if _fuzz.ENABLED and tracker_first:
            _fuzz.point("shm.made")  # between registering the name and making the file
        try:
            return name, os.open(_path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # pragma: no cover - 48 random bits collided
            continue  # (the tracker keeps a set: its owner's registration stands)
        except BaseException:
            if tracker_first:
                _untrack(name)
            raise


class Segment:
    """One mapping of a shared-memory segment in this process.

    Not thread-safe by itself: the handles in ``_shared`` serialise what needs it.
    """

    __slots__ = (
        "__weakref__",
        "_fd_pid",
        "closed",
        "fd",
        "heir",
        "mm",
        "name",
        "owner_pid",
        "size",
    )

    def __init__(
        self, name: str, fd: int, mm: mmap.mmap, size: int, owner_pid: int, *, heir: bool = False
    ) -> None:
        self.name = name
        self.heir = heir  # another process removes what we leave (see the module doc)
        self.fd = fd
        self._fd_pid = os.getpid()
        self.mm = mm
        self.size = size
        self.owner_pid = owner_pid  # 0: attached, never unlinks
        self.closed = False
        _LIVE.add(self)

    @classmethod
    def create(cls, size: int, *, heir: bool = False) -> Segment:
        """Create a new zero-filled segment of ``size`` bytes, all of it reserved now.

        ``heir``: another process (a pool worker's parent) removes the segment if this one
        leaves it (see the module docstring).

        Raises:
            OSError: ``errno.ENOSPC`` with a message naming ``/dev/shm`` and the size when
                there is no room for it; other errors from the operating system as they are.
        """
        size = max(size, mmap.PAGESIZE)
        free = _free_bytes()  # short of it: fail now, not after fallocate filled the rest
        if free is not None and free < size:
            raise _no_room(size, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        if _fuzz.ENABLED:
            _fuzz.point("shm.before_create")
        _platform.segment_dir()  # the portable one is made (and checked) at first use
        tracker_first = not heir or _ledger is not None  # see the module docstring
        name, fd = _new_file(heir=heir, tracker_first=tracker_first)
        try:
            try:
                _platform.reserve(fd, size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                    raise _no_room(size, exc) from exc
                raise
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(_path(name))
            if tracker_first:
                _untrack(name)
                _note("")
            raise
        if not tracker_first:
            if _fuzz.ENABLED:
                _fuzz.point("shm.made")  # between making the file and registering the name
            _track(name)  # after the file exists: a creator killed before leaves a file
            # its heir finds
        elif heir:
            _note("")  # the file exists: the heir finds it
        return cls(name, fd, mm, size, owner_pid=os.getpid(), heir=heir)

    @classmethod
    def attach(cls, name: str) -> Segment:
        """Map the existing segment ``name``; never registers with the resource tracker.

        Raises:
            FileNotFoundError: the segment is gone (its creator closed it or exited).
        """
        if NAME_RE.fullmatch(name) is None:
            raise ValueError(f"not a parallelkit shared-memory segment name: {name!r}")
        try:
            fd = os.open(_path(name), os.O_RDWR)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT,
                f"shared-memory segment {name!r} no longer exists: its creator closed it "
                "or exited (keep the creating object open while other processes use it)",
            ) from None
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return cls(name, fd, mm, size, owner_pid=0)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the segment's cross-process lock (released by the kernel if we die)."""
        if self._fd_pid != os.getpid():  # pragma: no cover - the fork hook did it already
            self._reopen()
        if self.fd < 0:  # re-opening after a fork found it gone
            raise FileNotFoundError(
                errno.ENOENT,
                f"shared-memory segment {self.name!r} no longer exists: its creator closed it "
                "or exited",
            )
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def drop_fd(self) -> None:
        """Close the file descriptor now: a segment that needs no :meth:`locked`."""
        _LIVE.discard(self)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _reopen(self) -> None:
        """In a forked child: an open file description of our own, for ``flock``."""
        old, self.fd = self.fd, -1
        self._fd_pid = os.getpid()
        if old >= 0:
            os.close(old)
        if not self.closed:
            with contextlib.suppress(OSError):  # gone: the handle finds out when it locks
                self.fd = os.open(_path(self.name), os.O_RDWR)

    def close(self, views: tuple[memoryview, ...] = (), *, unlink: bool = True) -> None:
        """Unmap (and, in the creator's process, unlink); idempotent.

        ``views`` are released first.  Memory that numpy arrays still point into stays
        mapped until they are gone (unmapping it under them would crash the process).
        ``unlink=False`` (a segment with an heir only): leave the name and its
        registration to the heir, which may still have to read what is in it.
        """
        if self.closed:
            return
        self.closed = True
        for view in views:
            view.release()
        with contextlib.suppress(BufferError):
            self.mm.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not (self.owner_pid and self.owner_pid == os.getpid()):
            return
        self.owner_pid = 0
        if not unlink:
            assert self.heir, "only a segment with an heir may be left behind"
            return
        if _fuzz.ENABLED:
            _fuzz.point("shm.before_unlink")
        if self.heir and _ledger is None:  # the tracker lets go first: the heir sees it all
            _untrack(self.name)
            if _fuzz.ENABLED:
                _fuzz.point("shm.half_removed")  # between unregistering it and unlinking it
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_path(self.name))
            return
        if self.heir:
            _note(self.name)
        try:
            os.unlink(_path(self.name))
        except FileNotFoundError:
            pass  # removed by somebody else (remove_stale_segments, a user)
        if _fuzz.ENABLED:
            _fuzz.point("shm.half_removed")  # between unlinking the file and its name
        _untrack(self.name)  # the tracker held the name until the file was gone
        if self.heir:
            _note("")


def _after_fork_in_child() -> None:
    global _ledger
    _ledger = None  # the ledger's owner is not our heir
    for segment in list(_LIVE):
        segment._reopen()


os.register_at_fork(after_in_child=_after_fork_in_child)

_CLEANUP_LOCK = threading.Lock()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a zombie counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # somebody else's process
    return True


def remove_segments_of(pid: int, pending: str = "") -> list[str]:
    """As the heir of the exited process ``pid``: remove the segments it left; their names.

    ``pending``: the name its ledger holds (:func:`ledger_name`), if it kept one.  Each
    name is registered with the resource tracker again before it is unregistered: the
    creator may have died before registering it or after unregistering it (the tracker
    keeps a set, so registering a name it holds changes nothing), and either way the
    tracker ends with the name registered and unregistered exactly once.
    """
    prefix = f"{PREFIX}{pid}_"
    try:
        names = [name for name in os.listdir(SHM_DIR) if name.startswith(prefix)]
    except OSError:
        return []
    if pending.startswith(prefix) and pending not in names:
        names.append(pending)  # it may have no file: the tracker may hold its name
    removed = []
    for name in names:
        if NAME_RE.fullmatch(name) is None:
            continue
        if _fuzz.ENABLED:
            _fuzz.point("shm.before_unlink_leftover")
        _track(name)
        try:
            os.unlink(_path(name))
        except FileNotFoundError:
            pass
        else:
            removed.append(name)
        _untrack(name)
    return removed


def stale_segments() -> list[str]:
    """Names in ``/dev/shm`` of parallelkit segments whose creating process is gone."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    stale = []
    for name in names:
        match = NAME_RE.fullmatch(name)
        if match is not None and not pid_alive(int(match.group(1))):
            stale.append(name)
    return sorted(stale)


def remove_stale_segments() -> list[str]:
    """Remove the shared-memory segments that parallelkit processes left behind.

    A segment is stale when its name is parallelkit's (``pk_<pid>_<random>``) and no
    process with that id exists any more: its creator was killed (SIGKILL, the OOM
    killer) before it could free it, together with the resource tracker that would
    otherwise have done so.  Segments of living processes are left alone.  Processes
    still attached keep their mappings; only the name is removed.

    Only processes that share this process's ``/dev/shm`` *and* process-id namespace
    should run it (in a container, from inside the container).

    Returns:
        The names removed, sorted.

    Example:
        >>> from parallelkit.testing import remove_stale_segments
        >>> isinstance(remove_stale_segments(), list)
        True

    .. versionadded:: 0.1
    """
    removed = []
    with _CLEANUP_LOCK:
        for name in stale_segments():
            try:
                os.unlink(_path(name))
            except FileNotFoundError:
                continue
            removed.append(name)
    return removed
