"""Task functions for the pool tests, at module level so spawn and forkserver can import them."""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys
import threading
import time

STATE: dict[str, object] = {}


def square(x: int) -> int:
    return x * x


def identity(x: object) -> object:
    return x


def add(a: int, b: int = 0) -> int:
    return a + b


def pid_of(_: object) -> int:
    return os.getpid()


def slow_pid(_: object) -> int:
    time.sleep(0.05)
    return os.getpid()


def fail_on_multiples_of_seven(x: int) -> int:
    if x % 7 == 0:
        raise ValueError(f"bad item {x}")
    return x


class NeedsArgs(Exception):
    """An exception whose constructor takes required arguments that are not its args."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"code {code}: {reason}")
        self.code = code
        self.reason = reason


def raise_needs_args(x: int) -> int:
    raise NeedsArgs(x, "because")


class HoldsLock(Exception):
    """An exception that cannot cross processes: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def raise_unpicklable(x: int) -> int:
    raise HoldsLock(f"item {x}")


def exit_in_task(x: int) -> int:
    if x == 3:
        sys.exit(5)
    return x


def crash_on(x: int, *, target: int = 13, how: str = "kill") -> int:
    if x == target:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif how == "exit3":
            os._exit(3)
        elif how == "exit0":
            os._exit(0)
        elif how == "segv":
            faulthandler.disable()  # inherited from pytest: keep the log free of its dump
            ctypes.string_at(0)
    return x


def kill_13(x: int) -> int:
    return crash_on(x, target=13, how="kill")


def exit3_13(x: int) -> int:
    return crash_on(x, target=13, how="exit3")


def exit0_13(x: int) -> int:
    return crash_on(x, target=13, how="exit0")


def segv_13(x: int) -> int:
    return crash_on(x, target=13, how="segv")


def sleep_on_5(x: int) -> int:
    if x == 5:
        time.sleep(60)
    return x


def stubborn_sleep_on_2(x: int) -> int:
    if x == 2:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(60)
    return x


def slow_zero(x: int) -> int:
    if x == 0:
        time.sleep(0.4)
    return x


def die_once_at_1500(marker: str, x: int) -> int:
    """SIGKILL this worker at item 1500 the first time (a marker file says it happened)."""
    if x == 1500 and not os.path.exists(marker):
        time.sleep(0.5)  # the other worker has finished its chunk by now
        with open(marker, "w"):
            pass
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def sleep_a_bit(x: int) -> int:
    time.sleep(0.2)
    return x


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def set_state(key: str, value: object) -> None:
    STATE[key] = value


def get_state(key: str) -> object:
    return STATE.get(key)


def failing_initializer() -> None:
    raise RuntimeError("initializer says no")


def return_lock(x: int) -> object:
    return threading.Lock() if x == 1 else x


class BadUnpickle:
    """Pickles fine, but fails when unpickled (in whichever process unpickles it)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> tuple[object, tuple[int]]:
        return (_refuse, (self.value,))


def _refuse(value: int) -> BadUnpickle:
    raise RuntimeError(f"refusing to unpickle {value}")


def make_bad_result(x: int) -> object:
    return BadUnpickle(x) if x == 4 else x


def value_of(x: object) -> object:
    return getattr(x, "value", x)


def note_exit_in(path: str) -> None:
    """Initializer: this worker notes when its atexit handlers run."""
    import atexit

    def noted() -> None:
        with open(path, "a") as f:
            f.write(f"atexit {os.getpid()}\n")

    atexit.register(noted)


def late_thread_noting(path: str) -> int:
    """Start a non-daemon thread that outlives the task and notes when it ends."""

    def later() -> None:
        time.sleep(0.2)
        with open(path, "a") as f:
            f.write(f"thread {os.getpid()}\n")

    threading.Thread(target=later, daemon=False).start()
    return os.getpid()


_NOTING_EXIT: list[str] = []


def note_exit_once_and_late_thread(path: str) -> int:
    """``note_exit_in`` once per process (for a pipeline stage, which has no initializer),
    then ``late_thread_noting``."""
    if not _NOTING_EXIT:
        _NOTING_EXIT.append(path)
        note_exit_in(path)
    return late_thread_noting(path)


def check_exit_notes(path: str, pids: set[int], start_method: str) -> None:
    """What ``note_exit_in`` and ``late_thread_noting`` wrote says each process ended as a
    child of its start method does: its non-daemon threads joined; then its atexit
    handlers run under spawn, and under fork and forkserver from Python 3.13 (gh-83856)
    only -- never before."""
    with open(path) as f:
        lines = f.read().splitlines()
    for pid in pids:
        assert f"thread {pid}" in lines  # joined before the process ended
        if start_method == "spawn" or sys.version_info >= (3, 13):
            assert lines.index(f"thread {pid}") < lines.index(f"atexit {pid}")
        else:
            assert f"atexit {pid}" not in lines


def close_descriptors_then_sleep(seconds: float) -> None:
    """Close every descriptor above stderr (the process's sentinel among them), then run on.

    Under fork and spawn the parent's sentinel of this process reads EOF at once, while
    the process is neither exited nor reapable for ``seconds``."""
    os.closerange(3, 65536)
    time.sleep(seconds)


def close_descriptors_then_exit(seconds: float) -> None:
    close_descriptors_then_sleep(seconds)
    os._exit(0)


def late_then_next(item: tuple[int, str]) -> int:
    """Item 0 overruns a 0.5 s timeout and then returns; item 1 first creates the file
    ``item[1]`` (it has started), then naps for less than the timeout."""
    index, path = item
    if index == 0:
        time.sleep(1.0)
    else:
        with open(path, "a"):
            pass
        time.sleep(0.2)
    return index
