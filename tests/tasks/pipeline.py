"""Stage functions for the pipeline tests, at module level so spawn and forkserver import them."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any, TypeVar

from parallelkit import SharedCounter

T = TypeVar("T")


def square(x: int) -> int:
    return x * x


def plus_one(x: int) -> int:
    return x + 1


def is_even(x: int) -> bool:
    return x % 2 == 0


def is_small(x: int) -> bool:
    return x < 50


def twice(x: int) -> list[int]:
    return [x, x]


def up_to(x: int) -> range:
    return range(x % 4)


def as_text(x: int) -> str:
    return str(x)


def identity(x: T) -> T:
    return x


def length(x: bytes) -> int:
    return len(x)


def fail_on_13(x: int) -> int:
    if x == 13:
        raise ValueError(f"unlucky {x}")
    return x


def crash_on_5(x: int) -> int:
    if x == 5:
        os._exit(3)
    return x


def kill_self_on_5(x: int) -> int:
    if x == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def sleepy(x: int) -> int:
    time.sleep(0.2)
    return x


def pid_after_sleep(x: int) -> int:
    time.sleep(0.01)
    return os.getpid()


def slow_in_reverse(x: int) -> int:
    """Early items take longer, so that unordered results come out of source order."""
    time.sleep(0.02 * (5 - x % 5))
    return x


def lock_for(x: int) -> object:
    return threading.Lock()  # cannot be pickled, even by cloudpickle


def counting_source(n: int | None, counter: list[int]) -> Iterator[int]:
    i = 0
    while n is None or i < n:
        counter[0] += 1
        yield i
        i += 1


def count_into(counter: SharedCounter, x: int) -> int:
    counter.add(x)
    return x


def add_item(item: tuple[SharedCounter, int]) -> int:
    counter, x = item
    counter.add(x)
    return x


def rss_bytes() -> int:
    """This process's resident memory, in bytes (from /proc: Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_or_same(x: object) -> object:
    """``bytes`` pass through; anything else is answered with this worker's RSS."""
    return x if isinstance(x, bytes) else rss_bytes()


def count_in(item: tuple[SharedCounter, bytes]) -> tuple[SharedCounter, bytes, int]:
    """A first stage: counts the items inside the stages, and notes how many there are."""
    counter, data = item
    counter.add(1)
    return counter, data, counter.value


def count_out(item: tuple[SharedCounter, bytes, int]) -> tuple[int, int]:
    """A last stage: counts the item out; ``(its size, items inside when it came in)``."""
    counter, data, seen = item
    counter.add(-1)
    return len(data), seen


def socket_inodes(pid: int | str = "self") -> set[str]:
    """The sockets process ``pid`` holds (``"socket:[inode]"``, from /proc)."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


def sockets_shared_with_parent(_: object) -> list[str]:
    """The sockets this worker holds that its parent holds too."""
    return sorted(socket_inodes() & socket_inodes(os.getppid()))


def _refuse_to_load() -> object:
    raise ValueError("this function cannot be loaded here")


class Unloadable:
    """A stage function that pickles but cannot be unpickled (in a worker)."""

    def __call__(self, x: object) -> object:
        return x

    def __reduce__(self) -> tuple[object, ...]:
        return (_refuse_to_load, ())


# ---------------------------------------------------------- large buffers (test_pipeline_shm)

MB = 1 << 20


def payload(i: int, size: int = MB) -> bytes:
    """Item ``i`` of a large source: ``size`` bytes, its first 8 the number."""
    return i.to_bytes(8, "little") * (size // 8)


def number_of(x: bytes | bytearray) -> int:
    """Which :func:`payload` ``x`` is (checking that all of it is intact)."""
    i = int.from_bytes(bytes(x[:8]), "little")
    if bytes(x) != payload(i, len(x)):
        raise AssertionError(f"payload {i} is damaged")
    return i


def reversed_bytes(x: bytes) -> bytes:
    """A new large ``bytes`` per item (a stage that makes outputs of its own)."""
    return x[::-1][::-1]


def pid_and_same(x: object) -> tuple[int, object]:
    return os.getpid(), x


def kill_self_on_payload_3(x: bytes) -> bytes:
    """SIGKILLed while the previous stage's regions are in flight to it."""
    if int.from_bytes(x[:8], "little") == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def fail_on_payload_3(x: bytes) -> bytes:
    if int.from_bytes(x[:8], "little") == 3:
        raise ValueError("payload 3 refused")
    return x


def array_plus_one(a: Any) -> Any:
    """A new array for each one (numpy), one more than each element."""
    return a + 1


def slow_after_payload_3(x: object) -> tuple[int, object]:
    """As :func:`pid_and_same`, but items past the third (a payload, a numpy array of that
    number, or one of those inside ``pid_and_same``'s pairs) wait here until the test
    SIGKILLs the parent."""
    inner: Any = x
    while isinstance(inner, tuple):
        inner = inner[1]
    number = int.from_bytes(inner[:8], "little") if isinstance(inner, bytes) else int(inner[0])
    if number >= 3:
        time.sleep(60)
    return os.getpid(), x


HUGE = 17 * MB  # a buffer this large gets a segment of its own, removed once it is read


def hold_at_point(point: str, fifo: str, pid: int | None = None) -> None:
    """From now on, the first time this process (``pid``, if given, only) passes the schedule
    fuzzer's ``point``, it writes its pid to the FIFO ``fifo`` and waits there until it is
    SIGKILLed (a test holds it at that exact instant)."""
    from parallelkit._util import fuzz

    me = os.getpid()
    if (pid is not None and pid != me) or getattr(fuzz.point, "holds", None) == point:
        return

    def hold(name: str) -> None:
        if name == point and os.getpid() == me:
            with open(fifo, "w") as f:
                f.write(f"{me}\n")
            while True:  # until the test's SIGKILL (or the parent's death) ends us
                time.sleep(60)

    hold.holds = point  # type: ignore[attr-defined]
    setattr(fuzz, "ENABLED", True)  # noqa: B010  # the point's call sites check it each time
    setattr(fuzz, "point", hold)  # noqa: B010


def huge_held_at(point: str, fifo: str, i: int) -> bytes:
    """Item ``i`` as a :data:`HUGE` payload, made by a stage held at ``point`` (see
    :func:`hold_at_point`) when it next gets there: making or removing a segment."""
    hold_at_point(point, fifo)
    return payload(i, HUGE)
