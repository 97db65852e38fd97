"""Properties of worker fan-out, checked with hypothesis under every start method.

For any list of items, worker count (1-3), chunk size (automatic or 1-20), ``ordered``,
input shape (a list, or an iterator of unknown length) and entry point (``run_parallel``,
``imap_parallel``, ``WorkerPool.imap``):

- the results equal ``list(map(fn, items))``, as a multiset when unordered;
- with ``return_exceptions=True``, failures anywhere keep every other result, and each
  failed slot holds an exception of the task's own type, message and attributes, with the
  worker's traceback as ``__cause__`` and a note naming its own item;
- with ``return_exceptions=False``, the call raises a task's exception whose note names an
  item that really fails (the lowest failing one when there is a single worker), and what
  an iterator yielded before the error is correct.

Starting processes is what makes an example expensive, so the pool-backed properties share
warm pools across examples: the ``pools`` fixture is function-scoped (the suite's leak check
runs per test, so a pool must not outlive its test) and hypothesis runs every example of a
test inside that one fixture instance.  One property starts fresh workers per example, with
few examples, to cover process start-up under each method.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, TypeAlias, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import parallelkit as pk
from parallelkit._wire.codec import RemoteTraceback
from parallelkit.testing import chunksizes, worker_counts
from tasks.props import FAILING_KINDS, KINDS, ItemError, Task, run_task, square

T = TypeVar("T")
R = TypeVar("R")

Api: TypeAlias = Literal["run_parallel", "imap_parallel", "pool.imap"]
Outcome: TypeAlias = tuple[object, ...]

MAX_WORKERS = 3
MAX_CHUNKSIZE = 20
MAX_ITEMS = 60

# The pools fixture deliberately spans all examples of a test (that is the point of it);
# keep the suite profile's other suppressions.  Warm-pool examples are cheap (a few ms), so
# these properties get at least 50 examples per start method.
shared_pools = settings(
    max_examples=max(50, settings().max_examples),
    suppress_health_check=[
        *settings().suppress_health_check,
        HealthCheck.function_scoped_fixture,
    ],
)
# A fifth of the profile's examples (5 under "ci"): each one starts its own processes.
ONE_SHOT_EXAMPLES = max(3, settings().max_examples // 5)

_ITEM_NOTE = re.compile(r"\bon item (\d+)\b")


# ------------------------------------------------------------------------------ pools


class Pools:
    """Warm ``WorkerPool``s of one start method, one per worker count, made on first use."""

    def __init__(self, start_method: pk.StartMethod) -> None:
        self.start_method: pk.StartMethod = start_method
        self._pools: dict[int, pk.WorkerPool] = {}

    def get(self, workers: int) -> pk.WorkerPool:
        pool = self._pools.get(workers)
        if pool is None:
            pool = pk.WorkerPool(workers, start_method=self.start_method)
            self._pools[workers] = pool
        return pool

    def shutdown(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=True)
        self._pools.clear()


@pytest.fixture
def pools(start_method: pk.StartMethod) -> Iterator[Pools]:
    """Pools shared by all examples of one test; shut down before the leak check runs."""
    cache = Pools(start_method)
    try:
        yield cache
    finally:
        cache.shutdown()


# ------------------------------------------------------------------------------ strategies


@dataclass(frozen=True)
class Call:
    """How to fan out: the entry point and its knobs, as hypothesis drew them."""

    api: Api
    workers: int
    chunksize: int | None
    ordered: bool
    as_iterator: bool


def calls(
    apis: tuple[Api, ...] = ("run_parallel", "imap_parallel", "pool.imap"),
) -> st.SearchStrategy[Call]:
    return st.builds(
        Call,
        api=st.sampled_from(apis),
        workers=worker_counts(max_value=MAX_WORKERS),
        chunksize=chunksizes(max_value=MAX_CHUNKSIZE),
        ordered=st.booleans(),
        as_iterator=st.booleans(),
    )


small_ints = st.lists(st.integers(min_value=-1000, max_value=1000), max_size=MAX_ITEMS)

# Mostly successes (sampled_from also shrinks towards "ok"), failures of two types anywhere.
tasks = st.lists(
    st.tuples(
        st.integers(min_value=-1000, max_value=1000),
        st.sampled_from((*KINDS[:1] * 3, *KINDS)),
    ),
    max_size=MAX_ITEMS,
)


@st.composite
def tasks_with_a_failure(draw: st.DrawFn) -> list[Task]:
    """Task lists in which at least one task fails."""
    drawn = draw(tasks.filter(bool))
    index = draw(st.integers(min_value=0, max_value=len(drawn) - 1))
    drawn[index] = (drawn[index][0], draw(st.sampled_from(FAILING_KINDS)))
    return drawn


# ------------------------------------------------------------------------------ helpers


def fan_out(
    call: Call,
    fn: Callable[[T], R],
    items: list[T],
    *,
    pool: pk.WorkerPool | None = None,
    start_method: pk.StartMethod | None = None,
    return_exceptions: bool = False,
    received: list[object] | None = None,
) -> list[object]:
    """Run ``fn`` over ``items`` the way ``call`` says, on ``pool`` or on fresh workers.

    Results an iterator yields are appended to ``received`` as they come, so that a caller
    can see what arrived before an exception.
    """
    sink: list[object] = [] if received is None else received
    source: Iterable[T] = iter(items) if call.as_iterator else items
    if call.api == "run_parallel":
        if pool is not None:
            sink.extend(
                pk.run_parallel(
                    fn,
                    source,
                    backend=pool,
                    chunksize=call.chunksize,
                    ordered=call.ordered,
                    return_exceptions=return_exceptions,
                )
            )
        else:
            sink.extend(
                pk.run_parallel(
                    fn,
                    source,
                    max_workers=call.workers,
                    start_method=start_method,
                    chunksize=call.chunksize,
                    ordered=call.ordered,
                    return_exceptions=return_exceptions,
                )
            )
        return sink
    if call.api == "pool.imap":
        assert pool is not None, "pool.imap needs a pool"
        results = pool.imap(
            fn,
            source,
            chunksize=call.chunksize,
            ordered=call.ordered,
            return_exceptions=return_exceptions,
        )
    elif pool is not None:
        results = pk.imap_parallel(
            fn,
            source,
            backend=pool,
            chunksize=call.chunksize,
            ordered=call.ordered,
            return_exceptions=return_exceptions,
        )
    else:
        results = pk.imap_parallel(
            fn,
            source,
            max_workers=call.workers,
            start_method=start_method,
            chunksize=call.chunksize,
            ordered=call.ordered,
            return_exceptions=return_exceptions,
        )
    with results:
        for result in results:
            sink.append(result)
    return sink


def outcome(result: object) -> Outcome:
    """What a result slot holds, comparable and hashable: a value, or an exception's
    exact type, message and attributes (not its notes or cause)."""
    if isinstance(result, ItemError):
        return (type(result), str(result), result.value, result.reason)
    if isinstance(result, BaseException):
        return (type(result), str(result))
    return ("ok", result)


def serial_outcomes(items: list[Task]) -> list[Outcome]:
    """The reference: ``run_task`` on each item in this process, failures caught."""
    expected: list[Outcome] = []
    for item in items:
        try:
            expected.append(outcome(run_task(item)))
        except Exception as exc:
            expected.append(outcome(exc))
    return expected


def noted_index(exc: BaseException) -> int:
    """The item index named by the engine's note on ``exc`` (there must be exactly one)."""
    notes = getattr(exc, "__notes__", [])
    indices = [int(m.group(1)) for note in notes for m in _ITEM_NOTE.finditer(note)]
    assert len(indices) == 1, f"expected one note naming the item, got {notes!r}"
    return indices[0]


def check_remote(exc: BaseException) -> None:
    """``exc`` came from a worker: its cause is the worker's traceback."""
    assert isinstance(exc.__cause__, RemoteTraceback), repr(exc.__cause__)
    assert type(exc).__name__ in str(exc.__cause__)


def check_slots(items: list[Task], results: list[object], *, ordered: bool) -> None:
    """``results`` is a ``return_exceptions=True`` run of ``run_task`` over ``items``."""
    expected = serial_outcomes(items)
    assert len(results) == len(items)
    if ordered:
        assert [outcome(r) for r in results] == expected
    else:
        assert Counter(outcome(r) for r in results) == Counter(expected)
    noted: list[int] = []
    for position, result in enumerate(results):
        if not isinstance(result, BaseException):
            continue
        check_remote(result)
        index = noted_index(result)
        assert outcome(result) == expected[index], f"slot {position} names item {index}"
        if ordered:
            assert index == position
        noted.append(index)
    assert sorted(noted) == [i for i, (_, kind) in enumerate(items) if kind != "ok"]


# ------------------------------------------------------------------------------ properties


@shared_pools
@given(items=small_ints, call=calls())
def test_fan_out_equals_map(pools: Pools, items: list[int], call: Call) -> None:
    results = fan_out(call, square, items, pool=pools.get(call.workers))
    expected = list(map(square, items))
    if call.ordered:
        assert results == expected
    else:
        assert Counter(results) == Counter(expected)


@shared_pools
@given(items=tasks, call=calls())
def test_return_exceptions_keeps_every_other_result(
    pools: Pools, items: list[Task], call: Call
) -> None:
    results = fan_out(call, run_task, items, pool=pools.get(call.workers), return_exceptions=True)
    check_slots(items, results, ordered=call.ordered)


@shared_pools
@given(items=tasks_with_a_failure(), call=calls())
def test_first_failure_raises_with_a_failing_item(
    pools: Pools, items: list[Task], call: Call
) -> None:
    pool = pools.get(call.workers)
    expected = serial_outcomes(items)
    first_failure = next(i for i, (_, kind) in enumerate(items) if kind != "ok")
    received: list[object] = []
    with pytest.raises((ValueError, ItemError)) as info:
        fan_out(call, run_task, items, pool=pool, received=received)
    exc = info.value
    check_remote(exc)
    index = noted_index(exc)
    assert 0 <= index < len(items)
    assert items[index][1] != "ok", f"the note names item {index}, which does not fail"
    assert outcome(exc) == expected[index]
    if call.workers == 1:
        assert index == first_failure
    # What an iterator yielded before the error is right: a prefix of the successes in
    # order, or some of them when unordered.
    if call.ordered:
        assert [outcome(r) for r in received] == expected[: len(received)]
        assert len(received) <= first_failure
    else:
        successes = Counter(e for e in expected if e[0] == "ok")
        assert not Counter(outcome(r) for r in received) - successes
    # The pool is still fine after a fail-fast call.
    assert pk.run_parallel(square, [1, 2, 3], backend=pool) == [1, 4, 9]


@settings(max_examples=ONE_SHOT_EXAMPLES)
@given(items=tasks, call=calls(apis=("run_parallel", "imap_parallel")))
def test_one_shot_fan_out_equals_map(
    start_method: pk.StartMethod, items: list[Task], call: Call
) -> None:
    results = fan_out(call, run_task, items, start_method=start_method, return_exceptions=True)
    check_slots(items, results, ordered=call.ordered)
