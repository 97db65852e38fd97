"""Several arguments per item: ``pk.star``, ``pk.star_kwargs`` and ``pk.with_args``.

The conformance part runs over every local backend (the ``backend`` fixture of
``test_backends.py``) and, through ``test_dask.py``, on Dask; the process part under every
start method.  Typing: ``tests/typing/check_args.py``.
"""

from __future__ import annotations

import gc
import pickle
import textwrap
import threading
import weakref
from collections.abc import Callable
from typing import Any

import pytest

import parallelkit as pk
import tasks.args as a
from child import run_python
from parallelkit._map.calls import ItemCall
from test_backends import Options, backend, imap, run

__all__ = ("backend",)  # the fixture, imported for the tests below

PAIRS = [(b, e) for b in range(-3, 4) for e in range(4)] * 5
RECORDS = [{"name": f"f{i}", "size": i} for i in range(40)]


def star_expected() -> list[int]:
    return [b**e for b, e in PAIRS]


# ------------------------------------------------------------------ every backend


def test_star_unpacks_each_item(backend: Options) -> None:
    assert run(pk.star(a.power), PAIRS, backend) == star_expected()
    assert list(imap(pk.star(a.power), iter(PAIRS), backend)) == star_expected()
    # tiny chunks (every item run tracked) and one chunk (the untracked fast path)
    assert run(pk.star(a.power), PAIRS, backend, chunksize=1) == star_expected()
    assert run(pk.star(a.power), PAIRS, backend, chunksize=len(PAIRS)) == star_expected()
    # with a timeout every item runs tracked, one by one
    assert run(pk.star(a.power), PAIRS, backend, timeout=30.0) == star_expected()


def test_extra_arguments_for_every_call(backend: Options) -> None:
    xs = list(range(100))
    expected = [-(x * 3 + 7) for x in xs]
    assert run(pk.with_args(a.affine, 3, 7, sign=-1), xs, backend) == expected
    assert run(pk.with_args(a.affine, 3, 7, sign=-1), xs, backend, timeout=30.0) == expected
    assert list(imap(pk.with_args(a.affine, 3, offset=7, sign=-1), iter(xs), backend)) == expected
    triples = [(x, 3) for x in xs]
    assert run(pk.star(a.affine, args=(7,), kwargs={"sign": -1}), triples, backend) == expected
    assert (
        run(pk.star(a.affine, args=(7,), kwargs={"sign": -1}), triples, backend, timeout=30.0)
        == expected
    )
    assert run(pk.star(a.affine, kwargs={"sign": -1}), [(x, 3, 7) for x in xs], backend) == expected


def test_star_kwargs_unpacks_each_mapping(backend: Options) -> None:
    expected = [f"f{i}:{i}kB" for i in range(40)]
    assert run(pk.star_kwargs(a.describe, kwargs={"unit": "kB"}), RECORDS, backend) == expected
    got = list(
        imap(pk.star_kwargs(a.describe, kwargs={"unit": "kB"}), iter(RECORDS), backend, chunksize=3)
    )
    assert got == expected
    # an item's key wins over the same keyword given for every call
    assert run(
        pk.star_kwargs(a.describe, kwargs={"unit": "kB"}),
        [{"name": "x", "size": 1, "unit": "b"}],
        backend,
    ) == ["x:1b"]


def test_a_non_tuple_item_is_a_type_error_naming_its_index(backend: Options) -> None:
    items: list[object] = [*PAIRS[:20], [2, 3], *PAIRS[20:]]
    with pytest.raises(TypeError, match=r"item 20 is 'list', not a tuple .*star\(power\)"):
        run(pk.star(a.power), items, backend)
    # return_exceptions: the item's slot holds the error, the others run
    got = run(pk.star(a.power), items, backend, return_exceptions=True)
    assert isinstance(got[20], TypeError)
    assert "item 20 is 'list'" in str(got[20])
    assert got[:20] + got[21:] == star_expected()
    # read lazily: found when its chunk is made, before it is sent (fail fast: at once)
    streamed = imap(pk.star(a.power), iter(items), backend, chunksize=4)
    with streamed, pytest.raises(TypeError, match="item 20 is 'list'"):
        list(streamed)
    got = list(imap(pk.star(a.power), iter(items), backend, return_exceptions=True, chunksize=4))
    assert isinstance(got[20], TypeError)
    with pytest.raises(
        TypeError, match=r"item 1 is 'tuple', not a mapping .*star_kwargs\(describe\)"
    ):
        run(pk.star_kwargs(a.describe), [RECORDS[0], ("f", 1)], backend)


def test_an_unpacked_calls_exception_keeps_its_type_and_names_the_item(backend: Options) -> None:
    items = [(2, 1), (3, 1), (4, 0), (5, 1)]
    with pytest.raises(ValueError, match="zero exponent for 4") as info:
        run(pk.star(a.fail_on_zero_exp), items, backend)
    assert any("on item 2" in note for note in info.value.__notes__)
    # the wrong number of arguments is the function's own TypeError, for that item
    with pytest.raises(TypeError, match="power") as bad:
        run(pk.star(a.power), [(2, 3), (2, 3, 4)], backend)
    assert any("on item 1" in note for note in bad.value.__notes__)


def test_a_pipeline_stage_unpacks_on_every_backend(backend: Options) -> None:
    pipeline = (
        pk.Pipeline(PAIRS)
        .map(pk.star(a.power))
        .map(pk.with_args(a.affine, 2, offset=1))
        .filter(pk.with_args(a.is_multiple, 3))
        .flat_map(pk.with_args(a.repeat, 2))
        .map(pk.with_args(a.to_record, unit="kB"))
        .map(pk.star_kwargs(a.describe))
    )
    kept = [y for b, e in PAIRS if (y := 2 * b**e + 1) % 3 == 0]
    expected = [f"n{y}:{y}kB" for y in kept for _ in range(2)]
    assert pipeline.run(backend=backend.get("backend")) == expected  # type: ignore[arg-type]

    # a stage's item of the wrong kind: a TypeError that says so, the stage named after it
    items: list[Any] = [*PAIRS[:5], 7, *PAIRS[5:]]
    bad = pk.Pipeline(items).map(a.unchanged).map(pk.star(a.power))  # type: ignore[arg-type]
    with pytest.raises(pk.PipelineError, match=r"stage 'map\(star\(power\)\)' failed") as info:
        bad.run(backend=backend.get("backend"))  # type: ignore[arg-type]
    assert isinstance(info.value.__cause__, TypeError)
    assert "is 'int', not a tuple of positional arguments" in str(info.value.__cause__)


# ------------------------------------------------------------------ processes, every start method


def test_every_entry_point_under_every_start_method(start_method: pk.StartMethod) -> None:
    assert pk.run_parallel(pk.star(a.power), PAIRS, start_method=start_method) == star_expected()
    with pk.imap_parallel(
        pk.with_args(a.affine, 3, sign=-1), iter(range(50)), start_method=start_method
    ) as results:
        assert list(results) == [-3 * x for x in range(50)]
    expected = [f"f{i}:{i}B" for i in range(40)]
    with pk.WorkerPool(2, start_method=start_method) as pool:
        assert list(pool.imap(pk.star_kwargs(a.describe), RECORDS)) == expected
        assert list(pool.imap(pk.star(a.power), iter(PAIRS), ordered=False, chunksize=7)) != []
        assert pk.run_parallel(pk.star(a.power), PAIRS, backend=pool) == star_expected()
        # the Executor contract: map() unpacks its iterables itself; star() still takes one
        assert list(pool.map(pk.star(a.power), PAIRS)) == star_expected()
        assert list(pool.map(pk.with_args(a.affine, 2), range(5))) == [0, 2, 4, 6, 8]
        assert pool.submit(pk.star(a.power, args=(3,)), (2,)).result(timeout=60) == 8
    pipeline = pk.Pipeline(PAIRS, start_method=start_method).map(pk.star(a.power), max_workers=2)
    assert pipeline.run() == star_expected()


def test_a_bad_item_fails_before_any_work_starts(start_method: pk.StartMethod) -> None:
    with pk.SharedCounter() as calls:
        call = pk.star(a.counted_power, args=(calls,))
        good = [(2, 3)] * 50
        items: Any = [*good, 7]  # mypy would refuse the int: the point of this test
        with pytest.raises(TypeError, match="item 50 is 'int', not a tuple"):
            pk.run_parallel(call, items, start_method=start_method)
        with pytest.raises(TypeError, match="item 50 is 'int'"):
            pk.imap_parallel(call, items, start_method=start_method)
        with pk.WorkerPool(2, start_method=start_method) as pool:
            with pytest.raises(TypeError, match="item 50 is 'int'"):
                pool.imap(call, items)
            assert pool.stats.items == 0
        assert calls.value == 0
        # the same items, good: each call counted once
        assert pk.run_parallel(call, good) == [8] * 50
        assert calls.value == 50


def test_a_timeout_names_the_unpacked_item(start_method: pk.StartMethod) -> None:
    items = [(2, 1, 0.0)] * 5 + [(2, 2, 30.0)] + [(2, 1, 0.0)] * 5
    with pytest.raises(pk.TaskTimeoutError) as info:
        pk.run_parallel(pk.star(a.slow_power), items, timeout=0.5, start_method=start_method)
    assert info.value.item_index == 5


def test_nothing_is_held_after_the_call() -> None:
    class Ballast:
        pass

    with pk.WorkerPool(2) as pool:
        ballast = Ballast()
        ref = weakref.ref(ballast)
        call = pk.with_args(a.keep_ref, ballast)
        assert list(pool.imap(call, range(20))) == list(range(20))
        assert pk.run_parallel(call, range(20), backend=pool) == list(range(20))
        del call, ballast
        gc.collect()
        assert ref() is None  # the pool (still open) holds neither the adapter nor its extras


def test_adapters_pickle_compare_and_show_what_they_call() -> None:
    for call in (
        pk.star(a.power),
        pk.star(a.affine, args=(7,), kwargs={"sign": -1}),
        pk.star_kwargs(a.describe, kwargs={"unit": "kB"}),
        pk.with_args(a.affine, 3, offset=1),
    ):
        clone = pickle.loads(pickle.dumps(call))
        assert type(clone) is type(call)
        assert isinstance(clone, ItemCall)
    assert pk.star(a.power)((2, 5)) == 32
    assert pk.star(a.affine, args=(7,), kwargs={"sign": -1})((1, 2)) == -9
    assert pk.with_args(a.affine, 3, offset=1)(2) == 7
    assert pk.star_kwargs(a.describe, kwargs={"unit": "kB"})({"name": "n", "size": 1}) == "n:1kB"
    assert (
        repr(pk.star(a.affine, args=(7,), kwargs={"sign": -1}))
        == "parallelkit.star(affine, args=(7,), kwargs={'sign': -1})"
    )
    assert repr(pk.with_args(pow, 2)) == "parallelkit.with_args(pow, 2)"


async def _coroutine(x: int) -> int:
    return x


@pytest.mark.parametrize("adapter", [pk.star, pk.star_kwargs, pk.with_args])
def test_a_bad_function_is_refused_at_once(adapter: Callable[..., object]) -> None:
    with pytest.raises(TypeError, match="must be callable"):
        adapter(42)
    with pytest.raises(TypeError, match="async function"):
        adapter(_coroutine)


def test_bad_extras_are_refused_at_once() -> None:
    with pytest.raises(TypeError, match="args must be a tuple"):
        pk.star(a.power, args=[1])  # type: ignore[call-overload]  # the error tested
    with pytest.raises(TypeError, match="kwargs must be a mapping with str keys"):
        pk.star_kwargs(a.describe, kwargs={1: 2})  # type: ignore[dict-item]


def test_a_main_module_function_wrapped_travels_by_value() -> None:
    # `python -c`: the workers cannot import __main__, so its function must be sent by value
    # (cloudpickle), also wrapped in star() or a partial.
    script = textwrap.dedent(
        """
        import functools

        import parallelkit as pk

        def mul(a, b, c=1):
            return a * b * c

        if __name__ == "__main__":
            for method in ("spawn", "forkserver"):
                call = pk.star(mul, kwargs={"c": 10})
                print(pk.run_parallel(call, [(1, 2), (3, 4)], start_method=method))
                print(pk.run_parallel(pk.with_args(mul, 5), [1, 2], start_method=method))
                part = functools.partial(mul, b=3, c=2)
                print(pk.run_parallel(part, [1, 2], start_method=method))
        """
    )
    result = run_python("-c", script, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:6] == ["[20, 120]", "[5, 10]", "[6, 12]"] * 2


@pytest.mark.parametrize("where", [{"backend": "serial"}, {"max_workers": 2}])
def test_a_finished_iterator_kept_by_its_caller_holds_no_extra_argument(
    where: dict[str, Any],
) -> None:
    class Ballast:
        pass

    ballast = Ballast()
    ref = weakref.ref(ballast)
    pairs = iter([(1, 2), (3, 4)])  # read lazily: each chunk's items are checked as made
    results = pk.imap_parallel(pk.star(a.first_of, args=(ballast,)), pairs, **where)
    assert list(results) == [1, 3]
    del ballast
    gc.collect()
    assert ref() is None  # `results` is still referenced here
    del results


def test_an_unpicklable_argument_in_a_tuple_fails_under_every_start_method(
    start_method: pk.StartMethod,
) -> None:
    # Under fork the workers inherit the tuples: a scan of their elements stands in for
    # pickling them, and must still find what forkserver and spawn could not send.
    items: list[Any] = [(2, 3), (2, threading.Lock()), ((2,), 3), (4, 1)]
    with pytest.raises(pk.SerializationError) as caught:
        pk.run_parallel(pk.star(a.power), items, max_workers=2, start_method=start_method)
    assert (caught.value.what, caught.value.item_index) == ("argument", 1)
    got = pk.run_parallel(
        pk.star(a.first_of, args=(None,)), items, start_method=start_method, return_exceptions=True
    )
    assert [got[0], got[2], got[3]] == [2, (2,), 4]
    assert isinstance(got[1], pk.SerializationError)
