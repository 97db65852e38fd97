"""Nothing the pool, an iterator or a job holds outlives its use (DESIGN.md, Resources).

Each test hands the library a user object, lets the work finish, drops its own reference
and checks with ``weakref`` that the object is gone: functions (a bound method's object
too), arguments (in the parent and in the worker), results handed out by an iterator, and
exceptions.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator

import pytest

import parallelkit as pk
from parallelkit import StartMethod
from tasks.refs import (
    CountOnArrival,
    Tracked,
    TrackedError,
    fail_with_tracked,
    ident,
    make_tracked,
    value_of,
)


@pytest.fixture
def pool(start_method: StartMethod) -> Iterator[pk.WorkerPool]:
    with pk.WorkerPool(1, start_method=start_method) as pool:
        yield pool


def _gone(ref: weakref.ref[Tracked]) -> bool:
    return ref() is None


def test_bound_method_submitted_is_not_kept(pool: pk.WorkerPool) -> None:
    # CPython gh-16284 (test_no_stale_references): nothing but the caller holds obj
    obj = Tracked(1_000_000)
    ref = weakref.ref(obj)
    assert pool.submit(obj.method, 1).result() == 2
    del obj
    assert _gone(ref)


def test_bound_method_cache_still_finds_a_live_object(pool: pk.WorkerPool) -> None:
    # the function cache is weak, not useless: obj.method read again is the same entry
    obj = Tracked()
    engine = pool._engine
    assert pool.submit(obj.method, 1).result() == 2
    first = engine.functions.cache.get(obj.method)
    assert first is not None
    assert pool.submit(obj.method, 2).result() == 3
    assert engine.functions.cache.get(obj.method) == first
    ref = weakref.ref(obj)
    del obj
    assert _gone(ref)
    assert len(engine.functions.cache) == 0


@pytest.mark.parametrize("how", ["submit", "map", "imap", "run_parallel"])
def test_callable_object_is_not_kept(pool: pk.WorkerPool, how: str) -> None:
    fn = Tracked()
    ref = weakref.ref(fn)
    if how == "submit":
        assert pool.submit(fn, 1).result() == 3
    elif how == "map":
        assert list(pool.map(fn, [1, 2])) == [3, 4]
    elif how == "imap":
        assert list(pool.imap(fn, [1, 2])) == [3, 4]
    else:
        assert pk.run_parallel(fn, [1, 2], backend=pool) == [3, 4]
    del fn
    assert _gone(ref)


@pytest.mark.parametrize("how", ["submit", "map", "imap", "run_parallel"])
def test_arguments_are_not_kept(pool: pk.WorkerPool, how: str) -> None:
    obj = Tracked(1_000_000)
    ref = weakref.ref(obj)
    if how == "submit":
        assert pool.submit(ident, obj).result() == 1
    elif how == "map":
        assert list(pool.map(ident, [obj])) == [1]
    elif how == "imap":
        assert list(pool.imap(ident, [obj])) == [1]
    else:
        assert pk.run_parallel(ident, [obj], backend=pool) == [1]
    del obj
    assert _gone(ref)
    # ... nor by the worker, between tasks (CPython's test_ressources_gced_in_workers):
    # counted as the next task arrives, before its arguments replace anything
    assert pool.submit(value_of, CountOnArrival()).result() == 0


def _map(pool: pk.WorkerPool) -> Iterator[Tracked]:
    return pool.map(make_tracked, range(10))


def _imap(pool: pk.WorkerPool) -> Iterator[Tracked]:
    return pool.imap(make_tracked, range(10), chunksize=5)


def _imap_unordered(pool: pk.WorkerPool) -> Iterator[Tracked]:
    return pool.imap(make_tracked, range(10), chunksize=5, ordered=False)


def _imap_parallel(pool: pk.WorkerPool) -> Iterator[Tracked]:
    return pk.imap_parallel(
        make_tracked, range(10), max_workers=1, chunksize=5, start_method=pool.start_method
    )


@pytest.mark.parametrize("start", [_map, _imap, _imap_unordered, _imap_parallel])
def test_results_are_not_kept_once_handed_out(
    pool: pk.WorkerPool, start: Callable[[pk.WorkerPool], Iterator[Tracked]]
) -> None:
    # CPython gh-14406 (test_free_reference): the iterator holds no result it handed out
    results = start(pool)
    seen = 0
    for obj in results:
        ref = weakref.ref(obj)
        del obj
        assert _gone(ref)
        seen += 1
    assert seen == 10


@pytest.mark.parametrize("how", ["submit", "imap"])
def test_exceptions_are_not_kept(pool: pk.WorkerPool, how: str) -> None:
    if how == "submit":
        future = pool.submit(fail_with_tracked, 3)
        exc = future.exception()
        assert isinstance(exc, TrackedError)
        del future
    else:
        try:
            list(pool.imap(fail_with_tracked, range(6), chunksize=1))
        except TrackedError as caught:
            exc = caught
        else:
            pytest.fail("no error")
    payload = exc.args[0]
    assert isinstance(payload, Tracked)
    refs: list[weakref.ref[object]] = [weakref.ref(exc), weakref.ref(payload)]
    del exc, payload
    gc.collect()  # a raised exception's traceback and its frames form cycles
    assert [r() for r in refs] == [None, None]
    assert pool.submit(ident, 0).result() == 1  # the pool still works


def test_closed_iterator_lets_go_of_function_and_input(pool: pk.WorkerPool) -> None:
    fn, item = Tracked(), Tracked()
    refs: list[weakref.ref[object]] = [weakref.ref(fn), weakref.ref(item)]
    results = pool.imap(fn, [1, 2, 3], chunksize=1)
    items = [item]
    kept = pool.imap(ident, items)
    assert next(results) == 3
    results.close()
    assert list(kept) == [1]
    del fn, item, items
    assert [r() for r in refs] == [None, None]
