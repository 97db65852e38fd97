"""Process targets for the Queue tests, importable by spawn and forkserver children."""

from __future__ import annotations

import parallelkit as pk


def produce(q: pk.Queue[int], start: int, stop: int) -> None:
    q.put_many(range(start, stop))
    q.close()


def produce_one_by_one(q: pk.Queue[int], start: int, stop: int) -> None:
    for i in range(start, stop):
        q.put(i)
    q.close()


def consume(q: pk.Queue[int], results: pk.Queue[list[int]]) -> None:
    results.put(list(q))
    results.close()
