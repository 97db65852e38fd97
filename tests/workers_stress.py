"""Tasks and process targets of the stress run (tests/stress/), importable by spawn and
forkserver children.

Every task is a pure function of its argument, so the stress run computes what to expect
by calling the same function in its own process.
"""

from __future__ import annotations

import time
from typing import Any

import parallelkit as pk


class StressTaskError(ValueError):
    """The error :func:`transform` raises for items marked to fail."""


def transform(item: object) -> object:
    """A deterministic result for every kind of payload the stress run sends.

    ``("fail", n)`` raises :class:`StressTaskError`; an int ``n`` gives ``n * n + 1``;
    bytes come back reversed; a numpy array (or a non-contiguous view of one) comes back
    doubled, as a new array; ``("view", a)`` comes back as a strided view of ``a``, which
    travels non-contiguous; a tuple is transformed element by element.
    """
    if isinstance(item, bool):
        return not item
    if isinstance(item, int):
        return item * item + 1
    if isinstance(item, bytes):
        return item[::-1]
    if isinstance(item, str):
        return item.upper()
    if isinstance(item, tuple):
        if len(item) == 2 and item[0] == "fail":
            raise StressTaskError(f"item {item[1]} fails on purpose")
        if len(item) == 2 and item[0] == "view":
            array = item[1]
            return array[::2, ::-1]
        return tuple(transform(part) for part in item)
    module = type(item).__module__
    if module == "numpy":
        return item * 2  # type: ignore[operator]  # a numpy array: numpy is not imported here
    raise TypeError(f"the stress run does not send {type(item).__name__}")


def tagged(item: tuple[int, object]) -> tuple[int, object]:
    """``(index, payload)`` -> ``(index, transform(payload))``: a result names its item."""
    index: int = item[0]
    return index, transform(item[1])


def nap(item: tuple[int, float]) -> int:
    """Sleep ``item[1]`` seconds, then give the index back."""
    time.sleep(item[1])
    return item[0]


def keep(item: tuple[int, object]) -> bool:
    """The pipeline's filter: drops every third item."""
    return item[0] % 3 != 2


def split(item: tuple[int, object]) -> list[tuple[int, int, object]]:
    """The pipeline's flat_map: items whose index is a multiple of 5 come out twice,
    multiples of 7 not at all."""
    index, value = item
    if index % 7 == 6:
        return []
    return [(index, k, value) for k in range(2 if index % 5 == 0 else 1)]


def key_of(result: Any) -> tuple[int, int]:
    """The index and copy number of a pipeline result (to compare unordered results)."""
    return result[0], result[1]


class Holder:
    """An object whose bound method travels by value (``payload`` is large)."""

    def __init__(self, size: int) -> None:
        self.payload = bytearray(size)

    def size_plus(self, x: int = 0) -> int:
        return len(self.payload) + x


def make_holder(size: int) -> Holder:
    """A large result: an object holding ``size`` bytes."""
    return Holder(size)


def holder_size(holder: Holder) -> int:
    return len(holder.payload)


def count(item: tuple[pk.SharedCounter, int]) -> int:
    """Add 1 to the counter ``n`` times, one add at a time."""
    counter, n = item
    for _ in range(n):
        counter.add(1)
    return n


def accumulate(
    item: tuple[
        pk.SharedAccumulator[int], pk.SharedAccumulator[float], pk.SharedCounter, list[int]
    ],
) -> int:
    """Add each value to an int sum, a float max and a counter (by value)."""
    total, largest, counter, values = item
    for value in values:
        total.add(value)
        largest.add(float(value) / 2)
        counter.add(value)
    return len(values)


def write_rows(item: tuple[pk.SharedArray, int, int, float]) -> int:
    """Fill rows ``start..stop`` of a shared array with ``row index * scale``."""
    shared, start, stop, scale = item
    array = shared.array
    for row in range(start, stop):
        array[row, :] = row * scale
    return stop - start
