"""What every parallelkit child process runs first, and the pool worker's task loop.

:func:`bootstrap` prepares any child (pool worker, pipeline stage, channel server): it
ignores SIGINT (the parent handles Ctrl-C and tears everything down), exits when the
parent dies (no orphans, even when the parent is SIGKILLed) and runs the user's
initializer.  :func:`pool_worker` is the target of the pool's processes::

    parent ──TASK(chunk, fn id, [fn], items)──▶ worker: for each item, note its position in
                                                 the shared progress slot, call fn(item)
    parent ◀──DONE(chunk, results, errors, s)── worker (errors: per item, as records)

The progress slot lets the parent name the exact item a dead or late worker was on.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import itertools
import mmap
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, Final, NoReturn

from . import _fuzz
from ._serialize import PROTOCOL, capture_exception, dumps

# ------------------------------------------------------------------ wire format
# parent -> worker: HEADER + fn payload + items payload, in one message
HEADER: Final = struct.Struct("<qqqqqqq")  # kind, chunk id, fn id, flags, fn len, start, stop
TASK: Final = 1
STOP: Final = 2
ACK: Final = 3  # the parent has copied a DIRECT reply's buffers (flags: _direct.ACK_*)
# flags
STOP_ON_ERROR: Final = 1
STAR_CALL: Final = 2  # items are (args, kwargs) pairs
TIMED: Final = 4  # write each item's start time to the progress slot
INHERITED_ITEMS: Final = 8  # no items payload: items = inherited[start:stop]
TRACKED: Final = 16  # note every item's position, even tiny ones (a re-run after a crash)
ARENA: Final = 32  # the items payload starts with where its large buffers are (_arena)
DIRECT: Final = 64  # the parent may copy large results out of our memory (_direct)
ARENA_MIN_BYTES: Final = 64 * 1024  # result buffers this large go through shared memory

# worker -> parent: pickled tuples
DONE: Final = 1  # (DONE, chunk id, results, errors | None, seconds)
CHUNK_FAILED: Final = 2  # (CHUNK_FAILED, chunk id, what, record)
INIT_FAILED: Final = 3  # (INIT_FAILED, record)

# progress slot layout (int64 words, one cache line per worker)
SLOT_WORDS: Final = 8
POS: Final = 0  # position in the chunk of the item being run, or one of:
POS_STARTING: Final = -1  # not yet ready for work (start-up, initializer)
POS_RECEIVING: Final = -2  # unpickling a chunk
POS_SENDING: Final = -3  # pickling and sending a chunk's results
POS_UNTRACKED: Final = -4  # running tiny items without noting each one (see _run_chunk)
STARTED_NS: Final = 1  # time.monotonic_ns() when the chunk was taken, then (TIMED) each item
DUMP_FD: Final = 2  # the worker's stack-dump file descriptor (see arm_stack_dump), or -1
# the id of the last chunk the worker has received whole (0: none yet): a worker that dies
# before its chunk's id is here never had it, and the chunk is not to blame
TAKEN: Final = 3
STACK_FILE_NAME: Final = "parallelkit-stacks"
FN_CACHE_SIZE: Final = 64
# Tiny items: noting each item's position costs about as much as calling ``x*x``.  A chunk
# runs its first PROBE_ITEMS items one by one; if they took under UNTRACKED_ITEM_NS each, the
# rest run in a C-level ``map`` with the slot saying "somewhere in this chunk".  A worker
# that dies there has its chunk run again, tracked, so the culprit is still named exactly.
PROBE_ITEMS: Final = 8
UNTRACKED_ITEM_NS: Final = 5_000

# Asynchronous signals, which Python handles in the main thread only.  A thread of ours
# blocks them all (see Engine.submit_future): a process-directed SIGINT that the kernel
# gave to it would be noted, but the main thread, asleep in a lock, would not wake to
# raise KeyboardInterrupt until something else woke it.  Children it starts inherit the
# mask (across exec too): bootstrap() unblocks them.
THREAD_BLOCKED: Final = frozenset(signal.valid_signals()) - {
    signal.SIGKILL,
    signal.SIGSTOP,
    # synchronous: raised by the faulting thread itself, must stay deliverable
    signal.SIGSEGV,
    signal.SIGBUS,
    signal.SIGFPE,
    signal.SIGILL,
    signal.SIGTRAP,
    signal.SIGSYS,
    signal.SIGABRT,
    signal.SIGPIPE,
}


def quiet_thread(
    target: Callable[..., object], *, name: str, args: tuple[object, ...] = ()
) -> threading.Thread:
    """A daemon thread of ours (not started) that first blocks every asynchronous signal
    (see THREAD_BLOCKED).  It blocks them itself: the starting thread's mask is never
    touched, so a Ctrl-C at any moment cannot leave the main thread with signals blocked."""

    def run() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, THREAD_BLOCKED)
        target(*args)

    return threading.Thread(target=run, name=name, daemon=True)


# exit codes of a worker that decided to stop
EXIT_PARENT_DIED: Final = 70
EXIT_INIT_FAILED: Final = 71
EXIT_MAIN_GUARD: Final = 72
EXIT_INTERRUPTED: Final = 73  # a Ctrl-C reached us before we could ignore it (forkserver)


def _find_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes  # noqa: PLC0415 - see below

        return ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None


# Looked up once, at import: fork and forkserver children inherit it instead of each opening
# libc again.  Not in a spawn child (multiprocessing is unpickling what it runs when it
# imports us): importing ctypes there costs more than the watcher thread that does the job.
_prctl = None if getattr(multiprocessing.current_process(), "_inheriting", False) else _find_prctl()
PR_SET_PDEATHSIG: Final = 1


def _set_parent_death_signal() -> bool:
    """Ask Linux to SIGKILL us when the thread that created us exits; False if we cannot
    (or, in a spawn child, would rather not load ctypes for it)."""
    if _prctl is None:
        return False
    try:
        return _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except Exception:  # a libc without prctl: the watcher thread does it
        return False


class ProgressSlots:
    """The workers' progress slots: int64 words in memory shared with them.

    Under fork, an anonymous shared mapping the workers inherit.  Otherwise a memfd: a child
    receives a copy of its descriptor as it is started (pickled as multiprocessing's
    ``DupFd``, as a ``RawArray``'s arena is) and maps it -- without the ctypes and
    ``multiprocessing.heap`` imports a ``RawArray`` would cost each spawn worker.
    :attr:`for_child` is what to pass a worker; :attr:`mm` is the parent's mapping.
    """

    def __init__(self, words: int, *, inherited: bool) -> None:
        self.size = max(8 * words, mmap.PAGESIZE)
        self.fd = -1
        if inherited:
            self.mm = mmap.mmap(-1, self.size)  # MAP_SHARED | MAP_ANONYMOUS
        else:
            self.fd = os.memfd_create("parallelkit-progress", os.MFD_CLOEXEC)
            try:
                os.ftruncate(self.fd, self.size)
                self.mm = mmap.mmap(self.fd, self.size)
            except BaseException:
                os.close(self.fd)
                raise
        self.for_child: Any = self.mm if inherited else self

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing import reduction  # noqa: PLC0415 - only while starting a child

        return (_attach_slots, (reduction.DupFd(self.fd), self.size))

    def close(self) -> None:
        """Close the descriptor and the mapping (which holds a descriptor of its own)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(BufferError):  # a view still open: it goes with the view
            self.mm.close()


def _attach_slots(dup: Any, size: int) -> mmap.mmap:
    fd = dup.detach()
    try:
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _watch_parent(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(EXIT_PARENT_DIED)


def bootstrap(
    *,
    parent_pid: int,
    pdeathsig: bool,
    initializer: Callable[..., object] | None,
    initargs: Sequence[object],
) -> None:
    """Prepare a parallelkit child process; raises whatever the initializer raises.

    When we are to die with our parent: ``PR_SET_PDEATHSIG`` where the kernel can tie us to
    it (``parent_pid`` is our parent: fork and spawn, started from the main thread), and a
    thread waiting on the parent's sentinel otherwise (forkserver, whose children's parent
    is the server; other platforms).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the parent blocked SIGINT while it started us (see Engine._start_worker), or more
    # (a thread of ours started us: see THREAD_BLOCKED)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, THREAD_BLOCKED)
    tied = _set_parent_death_signal() if pdeathsig else False
    parent = multiprocessing.parent_process()
    if not (tied and parent_pid) and parent is not None and parent.sentinel is not None:
        threading.Thread(
            target=_watch_parent,
            args=(parent.sentinel,),
            name="parallelkit-parent-watch",
            daemon=True,
        ).start()
    if parent_pid and os.getppid() != parent_pid:
        os._exit(EXIT_PARENT_DIED)  # the parent died before we got here (or before prctl)
    if initializer is not None:
        initializer(*initargs)


def arm_stack_dump() -> int:
    """Dump every thread's stack to an anonymous in-memory file on SIGUSR1; its fd, or -1.

    The parent reads the file through ``/proc/<pid>/fd/<fd>`` when a run stalls (see
    :mod:`parallelkit._insights`).  faulthandler writes from its C signal handler, so this
    works while the worker blocks in C code or spins in Python.  Nothing is on disk and the
    file goes away with the process.
    """
    previous = signal.getsignal(signal.SIGUSR1)
    chain = callable(previous)  # an initializer's own handler still runs, after the dump
    if not chain:  # until the dump is armed, a SIGUSR1 is dropped rather than fatal
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        fd = os.memfd_create(STACK_FILE_NAME, os.MFD_CLOEXEC)
    except (AttributeError, OSError):  # not Linux
        if previous is not None:
            signal.signal(signal.SIGUSR1, previous)
        return -1
    faulthandler.register(signal.SIGUSR1, file=fd, all_threads=True, chain=chain)
    return fd


def refuse_to_start_in_bootstrap() -> NoReturn:
    """We are a spawn/forkserver child importing the parent's ``__main__``, which starts work.

    Starting processes here would fail (and each child would print a traceback); exit with a
    code the parent recognises, after one line that says what to do.  In the forkserver,
    importing the main module once for all its children (``_forkserver_main``), raise
    instead: the server goes on, and each child meets the same code and exits here.
    """
    server = sys.modules.get("parallelkit._forkserver_main")
    if server is not None and getattr(server, "importing_main", False):
        raise RuntimeError("parallel work started while the forkserver imports __main__")
    sys.stderr.write(
        "parallelkit: this process was started to run tasks, but importing the main module "
        'started parallel work again; guard it with `if __name__ == "__main__":`\n'
    )
    sys.stderr.flush()
    os._exit(EXIT_MAIN_GUARD)


def pool_worker(
    conn: Connection,
    progress: Any,
    slot: int,
    *,
    parent_pid: int,
    pdeathsig: bool,
    init_payload: bytes | None,
    inherited: tuple[dict[int, Callable[..., object]], Sequence[object] | None] | None,
    parent_end: Connection | None,
    fast_exit: bool = False,
) -> None:
    """The target of every pool worker process (``fast_exit``: a spawned one, see
    :func:`_exit_without_teardown`)."""
    if parent_end is not None:  # fork: our copy of the parent's end of the pipe
        parent_end.close()
    try:
        initializer, initargs = (None, ()) if init_payload is None else pickle.loads(init_payload)
        bootstrap(
            parent_pid=parent_pid,
            pdeathsig=pdeathsig,
            initializer=initializer,
            initargs=initargs,
        )
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt) and signal.getsignal(signal.SIGINT) is not (
            signal.SIG_IGN
        ):
            # A Ctrl-C that came before bootstrap() ignored SIGINT (a forkserver child is
            # not started with it blocked): not the initializer's failure.  Exit like a
            # worker killed at start-up; the parent runs its chunk on another.
            os._exit(EXIT_INTERRUPTED)
        with contextlib.suppress(OSError):
            conn.send_bytes(dumps((INIT_FAILED, capture_exception(exc))))
        os._exit(EXIT_INIT_FAILED)
    fns: dict[int, Callable[..., object]] = {}
    shared_items: Sequence[object] | None = None
    if inherited is not None:
        fns.update(inherited[0])
        shared_items = inherited[1]
    words = memoryview(progress).cast("B").cast("q")
    base = slot * SLOT_WORDS
    words[base + DUMP_FD] = arm_stack_dump()  # armed before POS leaves POS_STARTING
    arena: list[Any] = []  # the _arena.WorkerArena, once a chunk needs it
    try:
        _task_loop(conn, fns, shared_items, words, base, arena)
    except (EOFError, OSError):
        pass  # the parent closed our pipe or went away: nothing left to do
    finally:
        if arena:
            arena[0].close()
        words.release()
    if fast_exit:
        _exit_without_teardown()


def _exit_without_teardown() -> None:
    """End a spawned worker the way the interpreter would, minus tearing down its modules.

    A spawned worker that returns goes through ``sys.exit`` and the whole interpreter
    finalization: measured 13-20 ms from its last message to its exit (a child that had
    imported parallelkit), against 2.5 ms this way -- time every one-shot map under spawn
    waited for.  What a program may rely on still happens, in the interpreter's order:
    non-daemon threads are joined, ``atexit`` handlers run (multiprocessing's own
    finalizers among them), standard streams are flushed.  (fork and forkserver children
    already end with ``os._exit`` in multiprocessing, which runs their own ``atexit``
    handlers first from Python 3.13 (gh-83856) and none before; this is not for them:
    before 3.13 a forked worker's handlers are the parent's, which must not run here.)
    """
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if run_exitfuncs is None:  # pragma: no cover - another Python: exit the usual way
        return
    me = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not me and not thread.daemon:
            with contextlib.suppress(RuntimeError):
                thread.join()
    run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    os._exit(0)


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


def _has_large_bytes(values: list[object]) -> bool:
    if len(values) > 64:  # as _arena._SCAN_LIMIT: long lists are not scanned
        return False
    for x in values:
        if (type(x) is bytes or type(x) is bytearray) and len(x) >= ARENA_MIN_BYTES:
            return True
    return False


class NoRoom(Exception):
    """A large result found no room in shared memory (``_arena.ResultWriter.dump``)."""


def _worker_arena(arena: list[Any]) -> Any:
    if not arena:
        from ._arena import WorkerArena  # noqa: PLC0415 - only maps with large buffers

        arena.append(WorkerArena())
    return arena[0]


def _task_loop(
    conn: Connection,
    fns: dict[int, Callable[..., object]],
    shared_items: Sequence[object] | None,
    words: memoryview,
    base: int,
    arena: list[Any],
) -> None:
    recv, send = conn.recv_bytes, conn.send_bytes
    unpack = HEADER.unpack_from
    hsize = HEADER.size
    backlog: deque[bytes] = deque()  # what came while we waited for an ACK
    while True:
        words[base] = POS_RECEIVING  # before recv(): a large chunk takes a while to arrive
        buf = backlog.popleft() if backlog else recv()
        kind, cid, fn_id, flags, fn_len, start, stop = unpack(buf)
        if kind == TASK:
            # the time first, then the id: a parent that sees the id sees when we took it
            # (a per-item timeout counts from then, never our start-up or initializer)
            words[base + STARTED_NS] = time.monotonic_ns()
            words[base + TAKEN] = cid
        elif kind == STOP:
            if _fuzz.ENABLED:
                _fuzz.point("worker.stop_received")
            return
        fn = fns.get(fn_id)
        if fn is None:
            try:
                fn = pickle.loads(buf[hsize : hsize + fn_len])
            except BaseException as exc:
                send(dumps((CHUNK_FAILED, cid, "function", capture_exception(exc))))
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
                if from_arena:
                    state = arena[0]
                    reply = state.writer.frame(reply, [], state.reader.release())
                send(reply)
                continue
        del buf
        t0 = time.perf_counter()
        results, errors = _run_chunk(fn, items, flags, words, base)
        elapsed = time.perf_counter() - t0
        words[base] = POS_SENDING
        msg = (DONE, cid, results, errors, elapsed)
        payload: bytes | None
        try:
            if from_arena or _has_large_bytes(results):
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
                if _reply_direct(conn, msg, results, backlog):
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
            payload = writer.frame(payload, specs, kept)
        else:
            # sent: hold no argument or result while waiting for the next task (they may
            # be the caller's objects: a Manager proxy, say, whose collection it waits for)
            del msg, results, items, errors
        send(payload)
        if _fuzz.ENABLED:
            _fuzz.point("worker.after_send")


def _reply_direct(
    conn: Connection, msg: tuple[Any, ...], results: list[Any], backlog: deque[bytes]
) -> bool:
    """Send a DIRECT reply and hold the results as they are until the parent has copied
    them; ``False``: send the reply the usual way instead (it could not be made, or the
    parent could not read our memory)."""
    from . import _direct  # noqa: PLC0415 - only maps with large results

    try:
        reply, raws = _direct.dump(msg, results, ARENA_MIN_BYTES)
    except BaseException:
        return False  # unpicklable (the usual path reports it) or no ctypes
    try:
        conn.send_bytes(reply)
        del reply
        while True:  # a second chunk or a STOP may come first: keep them for later
            buf = conn.recv_bytes()
            kind, _, _, answer, _, _, _ = HEADER.unpack_from(buf)
            if kind == ACK:
                return bool(answer == _direct.ACK_OK)
            backlog.append(buf)
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
            results.extend(map(fn, itertools.islice(items, pos, None)))
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
    from .errors import SerializationError  # noqa: PLC0415 - failure path only

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
