"""Fault injection for ``test_faults.py`` and the scripts in ``tests/scripts/``.

Everything here is at module level so that spawn and forkserver workers can import it.

The *bad objects* fail at one phase of an item's trip, in one of three ways (``Mode``):
``"raise"`` an exception, ``"exit"`` through ``sys.exit``, or ``"crash"`` (the process that
runs the code SIGKILLs itself: a hard crash, as the OOM killer does)::

    parent: pickle the argument ──▶ worker: unpickle it, run the task, pickle the result
                                                                         │
    parent: unpickle the result ◀────────────────────────────────────────┘

- :class:`PickleBomb` fails wherever it is pickled (the argument in the parent, the result
  in the worker);
- :class:`UnpickleBomb` pickles fine and fails wherever it is unpickled (the argument in the
  worker, the result in the parent);
- :class:`Fault` is an argument that makes :func:`fault_task` fail while running, return a
  bomb as its result, or raise an exception that cannot cross back to the parent.

Subprocess helpers write ``WORKER <pid>`` lines to the inherited stdout (one ``os.write``,
so lines from several workers never interleave) so that a test can check the pids are gone.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, NoReturn, TypeAlias

from parallelkit import StartMethod
from parallelkit._util.context import available_start_methods

Mode: TypeAlias = Literal["raise", "exit", "crash"]
Phase: TypeAlias = Literal["task", "result-pickle", "result-unpickle", "exc-pickle", "exc-rebuild"]

EXIT_CODE: Final = 9  # what the "exit" mode passes to sys.exit


class FaultError(Exception):
    """What the ``"raise"`` mode raises (an ordinary, picklable exception)."""


def explode(mode: Mode, where: str) -> NoReturn:
    """Fail ``where`` in the way ``mode`` says."""
    if mode == "raise":
        raise FaultError(f"{where} refuses")
    if mode == "exit":
        sys.exit(EXIT_CODE)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # pragma: no cover - SIGKILL is not deferred for long
    raise AssertionError("still alive after SIGKILL")  # pragma: no cover


class PickleBomb:
    """Fails while being pickled, in whichever process pickles it."""

    def __init__(self, mode: Mode) -> None:
        self.mode: Mode = mode

    def __reduce__(self) -> NoReturn:
        explode(self.mode, "pickling")

    def __repr__(self) -> str:
        return f"PickleBomb({self.mode!r})"


class UnpickleBomb:
    """Pickles fine; fails while being unpickled, in whichever process unpickles it."""

    def __init__(self, mode: Mode) -> None:
        self.mode: Mode = mode

    def __reduce__(self) -> tuple[object, tuple[Mode, str]]:
        return (explode, (self.mode, "unpickling"))

    def __repr__(self) -> str:
        return f"UnpickleBomb({self.mode!r})"


def _only_in_a_child(value: int) -> int:
    if multiprocessing.parent_process() is None:
        raise FaultError("this object cannot be unpickled in the main process")
    return value


class ChildOnly:
    """Unpickles in a child process (a worker), fails to unpickle in the main process."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> tuple[object, tuple[int]]:
        return (_only_in_a_child, (self.value,))


class LockedError(Exception):
    """A task exception that cannot be pickled at all: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class UnrebuildableError(Exception):
    """A task exception that pickles, and rebuilds in the worker, but not in the parent."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.payload = ChildOnly(1)


@dataclass(frozen=True)
class Fault:
    """An argument that makes :func:`fault_task` fail at ``phase``, in ``mode``."""

    phase: Phase
    mode: Mode = "raise"


def fault_task(item: object) -> object:
    """Return ``item``, unless it is a :class:`Fault`: then fail as it says."""
    if not isinstance(item, Fault):
        return item
    if item.phase == "task":
        explode(item.mode, "the task")
    if item.phase == "result-pickle":
        return PickleBomb(item.mode)
    if item.phase == "result-unpickle":
        return UnpickleBomb(item.mode)
    if item.phase == "exc-pickle":
        raise LockedError("an exception holding a lock")
    raise UnrebuildableError("an exception the parent cannot rebuild")


def start_method_arg(value: str) -> StartMethod:
    """A script's start-method argument, checked."""
    for method in available_start_methods():
        if value == method:
            return method
    raise SystemExit(f"not a start method: {value!r}")


# ------------------------------------------------------------------ simple tasks


def square(x: int) -> int:
    return x * x


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def die(_: object) -> NoReturn:
    """SIGKILL the worker running this item."""
    explode("crash", "die")


def die_after(seconds: float) -> NoReturn:
    time.sleep(seconds)
    explode("crash", "die_after")


def say(*words: object) -> None:
    """One line to stdout in a single write(), so workers' lines cannot land inside it.

    (``print`` may write the text and its newline separately.)
    """
    os.write(1, (" ".join(map(str, words)) + "\n").encode())


def announce_and_sleep(seconds: float) -> float:
    """Write ``WORKER <pid>`` to stdout, then sleep."""
    os.write(1, f"WORKER {os.getpid()}\n".encode())
    time.sleep(seconds)
    return seconds


def exit_in_initializer() -> None:
    os._exit(4)


def kill_in_initializer() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # pragma: no cover


# ------------------------------------------------------------------ workers killing each other


def mark_and_sleep(directory: str, seconds: float) -> int:
    """Say "I am running" with a file named after this pid, then sleep; returns the pid."""
    (Path(directory) / f"running-{os.getpid()}").touch()
    time.sleep(seconds)
    return os.getpid()


def kill_when_running(directory: str, pids: tuple[int, ...]) -> int:
    """Wait until another worker of ``pids`` runs :func:`mark_and_sleep`, SIGKILL it.

    Returns this worker's pid.
    """
    others = [Path(directory) / f"running-{pid}" for pid in pids if pid != os.getpid()]
    deadline = time.monotonic() + 30
    while not (running := [m for m in others if m.exists()]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"none of the workers {pids} started its task")
        time.sleep(0.005)
    os.kill(int(running[0].name.removeprefix("running-")), signal.SIGKILL)
    return os.getpid()


def kill_each_other(directory: str, pids: tuple[int, ...]) -> int:
    """Mark this worker as running, wait for the others, then SIGKILL every other pid."""
    me = os.getpid()
    (Path(directory) / f"running-{me}").touch()
    others = [p for p in pids if p != me]
    deadline = time.monotonic() + 30
    while not all((Path(directory) / f"running-{p}").exists() for p in others):
        if time.monotonic() > deadline:
            raise TimeoutError("the other workers never started")
        time.sleep(0.005)
    for pid in others:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # it got us first (and we are about to go too)
            pass
    time.sleep(0.2)
    return me


# ------------------------------------------------------------------ crashes mid-transfer


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "rchar":
            return int(value)
    raise LookupError("rchar")  # pragma: no cover


def _kill_after_reading(nbytes: int) -> None:
    start = _bytes_read()
    while _bytes_read() - start < nbytes:  # our own reads of /proc count too: a little early
        time.sleep(0.0005)
    os.kill(os.getpid(), signal.SIGKILL)


def arm_kill_mid_read(nbytes: int) -> int:
    """Make this worker SIGKILL itself once it has read ``nbytes`` more bytes: in the middle
    of receiving a large argument (a pipe read returns as the data comes).  Returns the pid.
    """
    threading.Thread(target=_kill_after_reading, args=(nbytes,), daemon=True).start()
    return os.getpid()


_WRITE_SYSCALLS: Final = {"x86_64": 1, "aarch64": 64}


def _blocked_in_pipe_write(tid: int) -> bool:
    task = Path(f"/proc/self/task/{tid}")
    try:
        if "pipe_write" in (task / "wchan").read_text():
            return True
        number = (task / "syscall").read_text().split()[0]
    except (OSError, IndexError):
        return False
    return number == str(_WRITE_SYSCALLS.get(os.uname().machine))


def _kill_mid_write(tid: int) -> None:
    while not _blocked_in_pipe_write(tid):
        time.sleep(0.0005)
    os.kill(os.getpid(), signal.SIGKILL)


def arm_kill_mid_write() -> int:
    """Make this worker SIGKILL itself as soon as its main thread waits in a pipe write: in
    the middle of sending a result too large for the pipe (one write(2) call sends it all,
    so counting written bytes would see them only at the end).  Returns the pid.
    """
    main = threading.main_thread().native_id
    assert main is not None
    threading.Thread(target=_kill_mid_write, args=(main,), daemon=True).start()
    return os.getpid()


# Large *text*: it travels through the pipe.  (Large bytes and arrays travel through the
# shared-memory arena instead; test_arena.py kills workers holding those.)
def length(data: str) -> int:
    return len(data)


def big_result(nbytes: int) -> str:
    return "x" * nbytes


def wait_for_file(path: str) -> int:
    """Run until the test creates ``path``; returns this worker's pid."""
    while not Path(path).exists():
        time.sleep(0.01)
    return os.getpid()


class RaiseSigint:
    """Unpickled in a child, sends that child SIGINT at once: a Ctrl-C that lands while the
    child is still reading its process object, before any parallelkit code runs there."""

    def __reduce__(self) -> tuple[Callable[..., object], tuple[int]]:
        return signal.raise_signal, (int(signal.SIGINT),)


def say_ran(conn: Any, fn: object, dump_fd: object, *args: object) -> None:
    """A role loop for ``_proc.lifecycle.start_child``: tell the parent it ran."""
    conn.send("ran")
