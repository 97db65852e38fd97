"""What the platform offers, decided once at import: the one module that knows about Linux.

Every platform-specific facility parallelkit uses is here, each with a portable fallback
built only on what the standard library offers on every POSIX system (files mapped with
``mmap``, ``os.ftruncate``/``os.pwrite``, pipes and ``select``, ``os.cpu_count``):

=================  ==========================================  =============================
facility           Linux fast path                             portable fallback
=================  ==========================================  =============================
``pidfd``          ``os.pidfd_open``: wait until a child is    poll ``exitcode`` with 1 ms
                   reapable                                    sleeps
``memfd``          ``os.memfd_create``: anonymous files        a file made in the temporary
                   (progress slots, queue state, stack dumps)  directory and unlinked at once
``process_vm``     ``process_vm_readv``: the parent copies a   the worker copies the result
                   large result out of the worker (ctypes)     into its pipe (in band)
``pdeathsig``      ``prctl(PR_SET_PDEATHSIG)`` (ctypes)        a thread waiting on the
                                                               parent's sentinel
``madvise``        ``MADV_DONTFORK`` (arena not inherited),    none needed: the pages go with
                   ``MADV_REMOVE`` (pages freed early)         the last mapping
``fallocate``      ``os.posix_fallocate``: a segment's size    ``ftruncate``, then zeros
                   reserved up front                           written over the whole size
``dev_shm``        segments are files in ``/dev/shm``          files in ``$TMPDIR`` (or
                                                               ``/tmp``)``/parallelkit-<uid>``
``affinity``       ``os.sched_getaffinity``                    ``os.cpu_count``
``sockbuf``        a socket's queued bytes count against its   a fixed pipeline depth
                   sender's ``SO_SNDBUF``
``seqpacket``      ``AF_UNIX`` ``SOCK_SEQPACKET`` socket       ``SOCK_DGRAM``, buffers raised;
                   pairs: a log record is one datagram, the    a record larger than a
                   parent's end sees the child's hang-up       datagram goes in pieces
                                                               (:mod:`parallelkit._proc.logs`)
``preadv``         ``os.preadv`` (macOS from 11): a queue's    ``os.pread``, then a copy
                   large message read straight into place
``schedstat``      a thread's time waiting for a CPU, and      CPU time alone (a busy item
                   whether it waits now (``/proc``): auto      on a loaded machine looks
                   tells busy items from ones waiting on I/O   partly idle, or GIL-free)
=================  ==========================================  =============================

``fcntl`` locks (``flock``, ``lockf``) are POSIX and used everywhere.  Windows has none of
this (no ``fcntl``, no ``fork``, no signals to kill with): importing parallelkit there
raises an :class:`ImportError` naming what works.

**Portable mode**: ``PARALLELKIT_PORTABLE=1`` in the environment (read once, here, at
import; children inherit it) forces every fallback, so that Linux runs exactly the code
macOS runs; a comma-separated list of the facility names above forces only those.  The
whole test suite runs in this mode in CI.
"""

from __future__ import annotations

import errno
import mmap
import os
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final, NamedTuple

if sys.platform == "win32":  # refused before anything else is imported
    raise ImportError(
        "parallelkit runs on POSIX systems only (Linux, and macOS through its portable "
        "fallbacks): it needs fork/forkserver or spawn with POSIX file descriptors, fcntl "
        "locks and signals. On Windows, run it under WSL 2 (Linux); for a portable process "
        "pool use concurrent.futures.ProcessPoolExecutor."
    )

PORTABLE_ENV: Final = "PARALLELKIT_PORTABLE"
FACILITIES: Final = (
    "pidfd",
    "memfd",
    "process_vm",
    "pdeathsig",
    "madvise",
    "fallocate",
    "dev_shm",
    "affinity",
    "sockbuf",
    "seqpacket",
    "preadv",
    "schedstat",
)
LINUX: Final = sys.platform.startswith("linux")
DEV_SHM: Final = Path("/dev/shm")
SCHEDSTAT: Final = "/proc/thread-self/schedstat"  # run time, wait time (ns), timeslices
_ZEROS_CHUNK: Final = 1 << 20  # bytes written at a time when reserving by writing zeros
# bytes: the datagram fallback's socket buffers are raised to at least this (macOS: 2 KB
# datagrams and a 4 KB receive buffer by default), less where the system refuses
DGRAM_BUFFER: Final = 128 * 1024
_DGRAM_BUFFER_FLOOR: Final = 8 * 1024  # bytes: not worth asking for less
_DGRAM_SLACK: Final = 256  # bytes: what a buffer holds beside one datagram (its address, ...)
# the send flag that spares a sender SIGPIPE when its peer is gone; macOS has none (0 then:
# Python ignores SIGPIPE, so such a send fails with EPIPE all the same)
MSG_NOSIGNAL: Final = int(getattr(socket, "MSG_NOSIGNAL", 0))


def _forced(value: str) -> frozenset[str]:
    """The facilities ``PARALLELKIT_PORTABLE=value`` forces to their fallback."""
    value = value.strip().lower()
    if value in ("", "0", "no", "false"):
        return frozenset()
    if value in ("1", "yes", "true", "all"):
        return frozenset(FACILITIES)
    names = frozenset(name.strip() for name in value.split(",") if name.strip())
    unknown = sorted(names - set(FACILITIES))
    if unknown:
        raise ImportError(
            f"{PORTABLE_ENV}={value!r}: unknown facilities {', '.join(unknown)}; use 1 (all "
            f"of them) or a comma-separated list of: {', '.join(FACILITIES)}"
        )
    return names


class Offers(NamedTuple):
    """Which fast paths this process uses (``False``: the portable fallback)."""

    pidfd: bool
    memfd: bool
    process_vm: bool
    pdeathsig: bool
    madvise: bool
    fallocate: bool
    dev_shm: bool
    affinity: bool
    sockbuf: bool
    seqpacket: bool
    preadv: bool
    schedstat: bool

    @property
    def portable(self) -> bool:
        """Whether every facility is the fallback (portable mode, or not Linux)."""
        return not any(getattr(self, name) for name in FACILITIES)


def _seqpacket_works() -> bool:
    """Whether an ``AF_UNIX`` ``SOCK_SEQPACKET`` socket pair can be made (macOS: no, with
    ``EPROTONOSUPPORT``): tried once, for real."""
    kind = getattr(socket, "SOCK_SEQPACKET", None)
    if kind is None:
        return False
    try:
        pair = socket.socketpair(socket.AF_UNIX, kind)
    except OSError:
        return False
    for end in pair:
        end.close()
    return True


def decide(forced: frozenset[str] = frozenset()) -> Offers:
    """What this platform offers, less the facilities in ``forced``."""
    offered = {
        "pidfd": hasattr(os, "pidfd_open"),
        "memfd": hasattr(os, "memfd_create"),
        # ctypes is loaded at the first read (see _wire.direct), not to decide this
        "process_vm": LINUX,
        "pdeathsig": LINUX,
        "madvise": hasattr(mmap, "MADV_DONTFORK") and hasattr(mmap, "MADV_REMOVE"),
        "fallocate": hasattr(os, "posix_fallocate"),
        "dev_shm": LINUX and DEV_SHM.is_dir(),
        "affinity": hasattr(os, "sched_getaffinity"),
        "sockbuf": LINUX,
        "seqpacket": _seqpacket_works(),
        "preadv": hasattr(os, "preadv"),
        "schedstat": os.path.exists(SCHEDSTAT),
    }
    return Offers(**{name: offered[name] and name not in forced for name in FACILITIES})


FORCED: Final = _forced(os.environ.get(PORTABLE_ENV, ""))
OFFERS: Final = decide(FORCED)


# ------------------------------------------------------------------ segments and files
def _portable_dir() -> Path:
    return Path(os.environ.get("TMPDIR") or "/tmp") / f"parallelkit-{os.getuid()}"


SEGMENT_DIR: Final = DEV_SHM if OFFERS.dev_shm else _portable_dir()
"""Where shared-memory segments (and the anonymous files of the fallback) live."""

_dir_checked = False


def segment_dir() -> Path:
    """:data:`SEGMENT_DIR`, created (mode 0700) if it is the portable one; checked once.

    Raises:
        PermissionError: the portable directory exists but is not a private directory of
            this user (another user's, or a symbolic link).
    """
    global _dir_checked
    if _dir_checked or SEGMENT_DIR == DEV_SHM:
        return SEGMENT_DIR
    try:
        os.mkdir(SEGMENT_DIR, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(SEGMENT_DIR)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(
            errno.EPERM,
            f"{SEGMENT_DIR} is not a private directory of this user (mode 0700, owned by "
            f"uid {os.getuid()}): parallelkit keeps its shared-memory files there",
        )
    _dir_checked = True
    return SEGMENT_DIR


def anonymous_file(name: str) -> int:
    """A new empty file with no name, close-on-exec: freed when its last descriptor closes.

    ``memfd_create`` (``name`` is what ``/proc/<pid>/fd`` shows), or a file made in
    :func:`segment_dir` and unlinked at once (its name starts with ``name``).
    """
    if OFFERS.memfd:
        return os.memfd_create(name, os.MFD_CLOEXEC)
    directory = segment_dir()
    while True:
        path = directory / f"{name}-{os.urandom(6).hex()}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:  # pragma: no cover - 48 random bits collided
            continue
        os.unlink(path)
        return fd


def reserve(fd: int, size: int) -> None:
    """Make the file ``fd`` ``size`` bytes long with all of its space reserved now.

    So that a full file system fails here, with an :class:`OSError`, rather than killing
    the first process that writes to a page of a mapping (SIGBUS).  ``posix_fallocate``;
    where there is none (or the file system cannot), zeros written over the whole size.

    Raises:
        OSError: no room (``ENOSPC``, ``ENOMEM``, ``EFBIG``), or another error as it is.
    """
    if OFFERS.fallocate:
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
    os.ftruncate(fd, size)
    zeros = bytes(min(size, _ZEROS_CHUNK))
    pos = 0
    while pos < size:
        pos += os.pwrite(fd, zeros[: size - pos], pos)


def dont_fork(mm: mmap.mmap) -> bool:
    """Keep a mapping out of children forked later (``MADV_DONTFORK``); whether it is."""
    if not OFFERS.madvise:
        return False
    try:
        mm.madvise(mmap.MADV_DONTFORK)
    except (OSError, ValueError):
        return False
    return True


def free_pages(mm: mmap.mmap, start: int, length: int) -> bool:
    """Give a shared file mapping's pages back now (``MADV_REMOVE``); whether they went.

    Without it they go when the file is unlinked and its last mapping closed.
    """
    if not OFFERS.madvise:
        return False
    try:
        mm.madvise(mmap.MADV_REMOVE, start, length)
    except (OSError, ValueError):
        return False
    return True


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Read the file ``fd`` from ``offset`` into ``view``; how many bytes came (0: its end).

    ``os.preadv`` reads in place; without it (macOS before 11), ``os.pread`` and a copy.
    """
    if OFFERS.preadv:
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


# ------------------------------------------------------------------ processes
def pidfd_open(pid: int) -> int | None:
    """A descriptor that reads ready once process ``pid`` is reapable, or ``None``."""
    if not OFFERS.pidfd:
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:  # ENOSYS (an old kernel), EPERM (a sandbox), ...
        return None


def find_prctl() -> Callable[..., int] | None:
    """libc's ``prctl`` (loads ctypes), or ``None`` where the parent-death signal is not
    offered: then a thread waits on the parent's sentinel instead."""
    if not OFFERS.pdeathsig:
        return None
    try:
        import ctypes  # noqa: PLC0415 - only where it is used: see _proc.child

        return ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None


def affinity_count() -> int | None:
    """How many CPUs this process may run on (its affinity mask), or ``None`` if unknown."""
    if not OFFERS.affinity:
        return None
    return len(os.sched_getaffinity(0)) or None


def run_queue_seconds() -> float:
    """Seconds the calling thread has waited in the run queue for a CPU since it started;
    0.0 where the platform does not say (``schedstat``)."""
    if not OFFERS.schedstat:
        return 0.0
    try:
        with open(SCHEDSTAT, "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def runnable(native_id: int) -> bool:
    """Whether thread ``native_id`` of this process is running or waiting for a CPU (not
    blocked), as far as the platform says (``schedstat``; ``False`` where it does not)."""
    if not OFFERS.schedstat:
        return False
    try:
        with open(f"/proc/self/task/{native_id}/stat", "rb") as f:
            line = f.read()
    except OSError:
        return False
    # "tid (name) state ...": the name may hold spaces and parentheses
    state = line.rfind(b")") + 2
    return line[state : state + 1] == b"R"


# ------------------------------------------------------------------ record sockets
def record_socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected ``AF_UNIX`` pair that keeps record boundaries: ``SOCK_SEQPACKET``, or
    ``SOCK_DGRAM`` with both ends' buffers raised to :data:`DGRAM_BUFFER` where smaller.

    What differs with ``SOCK_DGRAM`` (the callers' business, see
    :mod:`parallelkit._proc.logs`): no end of file or hang-up when the other end closes; a
    datagram is at most :func:`max_datagram` bytes; and a BSD system (macOS) does not
    block a sender whose receiver's buffer is full but fails with ``ENOBUFS``.
    """
    if OFFERS.seqpacket:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for end in pair:
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            _raise_buffer(end, option, DGRAM_BUFFER)
    return pair


def _raise_buffer(sock: socket.socket, option: int, size: int) -> None:
    """Raise a socket buffer to ``size`` bytes, or as far toward it as the system allows."""
    if sock.getsockopt(socket.SOL_SOCKET, option) >= size:
        return
    while size >= _DGRAM_BUFFER_FLOOR:
        try:  # (macOS refuses above kern.ipc.maxsockbuf; Linux caps at its maximum)
            sock.setsockopt(socket.SOL_SOCKET, option, size)
            return
        except OSError:
            size //= 2


def max_datagram(sock: socket.socket) -> int:
    """The largest datagram ``sock`` sends whole, by its send buffer (macOS: the buffer's
    size is the limit; Linux: a little less) and the receiver's (set alike by
    :func:`record_socketpair`)."""
    return max(1024, sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - _DGRAM_SLACK)
