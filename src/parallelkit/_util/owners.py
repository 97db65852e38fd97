"""Who owns which processes, threads and segments: the leak check's ownership rule.

A pool starts its workers when it is first used, not when it is created.  A block checked by
``parallelkit.testing.check_no_leaks`` that uses a pool created before it sees the workers
appear, but they are the pool's, not the block's.  Objects that start processes or threads
after their creation register here, with a function that lists what they own at the
moment it is called.  Each registration gets a serial number: the check takes a
:func:`mark` on entry, and what belongs to an owner registered before the mark
(:func:`owned_before`) is not the block's.

Registering costs one weak reference; nothing here keeps an owner alive.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

__all__ = ("Owned", "mark", "owned_before", "register")

_O = TypeVar("_O")


class Owned(NamedTuple):
    """What one owner holds now: process ids, threads, ``/dev/shm`` segment names.

    ``complete`` is false when an owner could not say (it raised): then nobody may act on
    the assumption that what is not listed is not owned.
    """

    pids: tuple[int, ...] = ()
    threads: tuple[threading.Thread, ...] = ()
    segments: tuple[str, ...] = ()
    complete: bool = True


_Entry = tuple["weakref.ref[Any]", int, Callable[[Any], Owned]]

_lock = threading.Lock()
_next_serial = 1
_owners: dict[int, _Entry] = {}  # id(owner) -> (weak reference, serial, resources)


def register(owner: _O, resources: Callable[[_O], Owned]) -> None:
    """Record that ``owner`` (created now) owns what ``resources(owner)`` lists.

    Registering the same object again keeps its first serial.
    """
    global _next_serial
    with _lock:
        known = _owners.get(id(owner))
        if known is not None and known[0]() is owner:
            return
        for key in [key for key, entry in _owners.items() if entry[0]() is None]:
            del _owners[key]  # dead owners (no weakref callback: it could run under _lock)
        _owners[id(owner)] = (weakref.ref(owner), _next_serial, resources)
        _next_serial += 1


def mark() -> int:
    """A mark: owners registered from now on have a serial at least this large."""
    with _lock:
        return _next_serial


def owned_before(serial: int) -> Owned:
    """Everything owned now by the living owners registered before ``serial``."""
    with _lock:
        entries = list(_owners.values())
    pids: list[int] = []
    threads: list[threading.Thread] = []
    segments: list[str] = []
    complete = True
    for ref, registered, resources in entries:
        owner = ref()
        if owner is None or registered >= serial:
            continue
        try:
            owned = resources(owner)
        except Exception:  # whatever it was, what it owns is unknown
            complete = False
            continue
        pids += owned.pids
        threads += owned.threads
        segments += owned.segments
    return Owned(tuple(pids), tuple(threads), tuple(segments), complete)
