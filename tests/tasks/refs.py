"""Task functions for the reference tests (tests/test_references.py), importable by workers."""

from __future__ import annotations

import gc
import weakref
from collections.abc import AsyncIterator

# the copies of Tracked objects this worker has unpickled (weakly)
_SEEN: list[weakref.ref[Tracked]] = []


class Tracked:
    """A user object; in a worker, each unpickled copy is noted (weakly) in ``_SEEN``."""

    def __init__(self, size: int = 0) -> None:
        self.data = bytearray(size)

    def method(self, x: int = 0) -> int:
        return x + 1

    def __call__(self, x: int = 0) -> int:
        return x + 2

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        _SEEN.append(weakref.ref(self))


class TrackedError(Exception):
    """An exception that carries a user object."""


def ident(x: object) -> int:
    return 1


def make_tracked(_: object) -> Tracked:
    return Tracked()


def fail_with_tracked(x: int) -> int:
    if x == 3:
        raise TrackedError(Tracked())
    return x


def value_of(x: object) -> object:
    return x


class CountOnArrival:
    """Unpickled in a worker as the number of Tracked copies it still holds, counted while
    the task is being received (before a new task's arguments replace the last ones)."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return copies_alive_here, ()


def copies_alive_here(_: object = None) -> int:
    """How many Tracked copies this worker still holds (after a collection)."""
    gc.collect()
    return sum(1 for ref in _SEEN if ref() is not None)


async def async_double(x: int) -> int:
    return 2 * x


async def async_numbers(x: int) -> AsyncIterator[int]:
    yield x


class AsyncCallable:
    async def __call__(self, x: int) -> int:
        return x
