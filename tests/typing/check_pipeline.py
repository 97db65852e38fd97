"""Static checks of what users write with pipelines and queues; mypy runs this, nobody else.

mypy --strict --warn-unused-ignores tests/typing
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import assert_type

import parallelkit as pk


def parse(line: str) -> int:
    return len(line)


def words(line: str) -> list[str]:
    return line.split()


def positive(x: int) -> bool:
    return x > 0


def check_stage_types() -> None:
    lines = pk.Pipeline(["a b", "c"])
    assert_type(lines, pk.Pipeline[str])
    assert_type(lines.map(parse), pk.Pipeline[int])
    assert_type(lines.map(parse).filter(positive), pk.Pipeline[int])
    assert_type(lines.flat_map(words), pk.Pipeline[str])
    assert_type(lines.flat_map(words).map(parse).run(), list[int])
    assert_type(pk.Pipeline(range(3)).map(str), pk.Pipeline[str])
    assert_type(iter(lines.map(parse)), pk.PipelineIterator[int])
    with iter(lines) as results:
        assert_type(next(results), str)
        stats = results.stats
        assert_type(stats, pk.PipelineStats)
        assert_type(stats.stages, tuple[pk.StageStats, ...])
    assert_type(lines.stats, pk.PipelineStats | None)
    lines.map(positive)  # type: ignore[arg-type]  # a str is not an int
    lines.map(parse, max_workers="2")  # type: ignore[arg-type]


def check_queue_types() -> None:
    q: pk.Queue[int] = pk.Queue(maxsize=10, producers=2)
    q.put(1)
    q.put_many(range(3))
    assert_type(q.get(), int)
    assert_type(q.get_many(max_items=5, timeout=1.0), list[int])
    it = iter(q)
    assert_type(it, Iterator[int])
    q.put("x")  # type: ignore[arg-type]
