"""Tasks and process targets of the stress run (tests/stress/), importable by spawn and
forkserver children.

Every task is a pure function of its argument, so the stress run computes what to expect
by calling the same function in its own process.
"""

from __future__ import annotations

import time
from typing import Any

import parallelkit as pk
from parallelkit import Channel


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


def blob_of(i: int, size: int) -> bytes:
    """The payload of item ``i`` of a queue round with ``size``-byte payloads."""
    return bytes([i % 251]) * size


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


# ------------------------------------------------------------------ processes over channels


def produce(
    channel: Channel[object, object],
    q: pk.Queue[tuple[object, ...]],
    producer: int,
    plan: list[int],
    blob: int,
) -> None:
    """Put ``(producer, i)`` (and ``blob_of(i, blob)`` if ``blob``) for ``i`` in order;
    ``plan`` holds batch sizes (1: ``put``, more: ``put_many``)."""

    def item(i: int) -> tuple[object, ...]:
        return (producer, i, blob_of(i, blob)) if blob else (producer, i)

    i = 0
    for size in plan:
        if size == 1:
            q.put(item(i))
        else:
            q.put_many([item(i + k) for k in range(size)])
        i += size
    q.close()
    channel.send(i)


def consume(
    channel: Channel[object, object], q: pk.Queue[tuple[object, ...]], limit: int, batch: int
) -> None:
    """Take up to ``limit`` items (``-1``: until the end), one ``get`` at a time or in
    ``get_many`` batches of at most ``batch``, then send them to the parent and stop."""
    taken: list[tuple[object, ...]] = []
    try:
        while limit < 0 or len(taken) < limit:
            if batch == 1:
                taken.append(q.get())
            else:
                want = batch if limit < 0 else min(batch, limit - len(taken))
                taken.extend(q.get_many(want))
    except pk.QueueClosedError:
        pass
    channel.send(taken)


def serve(channel: Channel[object, Any]) -> None:
    """Answer ``(request id, delay in ms, payload)`` with ``(request id, transform(payload))``
    after the delay, until the parent closes its end."""
    for request in channel:
        ident, delay_ms, payload = request
        if delay_ms:
            time.sleep(delay_ms / 1000)
        channel.send((ident, transform(payload)))
