"""Imported by a forkserver test's parent only after the server started: which process
imported it (the server, once for all workers, or each worker)."""

from __future__ import annotations

import os

IMPORTED_IN = os.getpid()


class Box:
    """An item whose class comes from this module (unpickling it imports the module)."""

    def __init__(self, value: int) -> None:
        self.value = value


def imported_here(_: object) -> bool:
    """True if this process imported the module itself (the server had not)."""
    return os.getpid() == IMPORTED_IN


def imported_here_of_two(_a: object, _b: object) -> bool:
    """:func:`imported_here`, for ``pk.star``."""
    return os.getpid() == IMPORTED_IN


def by_value() -> object:
    """A function that travels by value (a closure): unpickling it imports nothing of this
    module."""
    pid = os.getpid()
    return lambda _: pid
