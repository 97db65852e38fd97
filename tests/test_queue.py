"""Queue: typed, batched, closed by its producers, shared by processes at start."""

from __future__ import annotations

import gc
import threading
import time
from collections import Counter

import pytest

import parallelkit as pk
import workers_pipeline
import workers_queue as w
from parallelkit import _frames
from parallelkit._context import get_context
from parallelkit._types import StartMethod


def test_put_get_in_order() -> None:
    q: pk.Queue[str] = pk.Queue()
    q.put("a")
    q.put_many(["b", "c", "d"])
    assert q.get(timeout=1) == "a"
    assert q.get_many(max_items=2, timeout=1) == ["b", "c"]
    assert q.get_many(timeout=1) == ["d"]
    q.close()
    assert list(q) == []
    with pytest.raises(pk.QueueClosedError):
        q.get(timeout=1)
    with pytest.raises(EOFError):  # a QueueClosedError is an EOFError
        q.get_many()


def test_large_and_numpy_items_arrive_intact() -> None:
    np = pytest.importorskip("numpy")
    q: pk.Queue[object] = pk.Queue()
    blob = bytes(range(256)) * 4096  # 1 MiB: sent out of band
    array = np.arange(100_000, dtype="float64")
    reader = threading.Thread(target=lambda: got.extend(q))
    got: list[object] = []
    reader.start()
    q.put_many([blob, array, "small"])
    q.close()
    reader.join(10)
    assert got[0] == blob
    assert (got[1] == array).all()
    assert got[1].flags.writeable  # type: ignore[attr-defined]
    assert got[2] == "small"


def test_two_producers_one_consumer(start_method: StartMethod) -> None:
    ctx = get_context(start_method)
    q: pk.Queue[int] = pk.Queue(producers=2, start_method=start_method)
    producers = [
        ctx.Process(target=w.produce, args=(q, 0, 5000)),  # type: ignore[attr-defined]
        ctx.Process(target=w.produce_one_by_one, args=(q, 5000, 5100)),  # type: ignore[attr-defined]
    ]
    for p in producers:
        p.start()
    got = list(q)  # ends once both producers have closed
    for p in producers:
        p.join(10)
        assert p.exitcode == 0
    assert sorted(got) == list(range(5100))
    # each producer's items keep their order
    assert [x for x in got if x < 5000] == list(range(5000))


def test_two_consumers_share_the_items(start_method: StartMethod) -> None:
    ctx = get_context(start_method)
    q: pk.Queue[int] = pk.Queue(maxsize=100, start_method=start_method)
    results: pk.Queue[list[int]] = pk.Queue(producers=2, start_method=start_method)
    consumers = [
        ctx.Process(target=w.consume, args=(q, results))  # type: ignore[attr-defined]
        for _ in range(2)
    ]
    for p in consumers:
        p.start()
    q.put_many(range(3000))  # more than maxsize: waits for the consumers to make room
    q.close()
    parts = list(results)
    for p in consumers:
        p.join(10)
        assert p.exitcode == 0
    assert len(parts) == 2
    assert Counter(x for part in parts for x in part) == Counter(range(3000))


def test_an_unpicklable_item_fails_in_put_and_sends_nothing() -> None:
    q: pk.Queue[object] = pk.Queue()
    with pytest.raises(pk.SerializationError, match="item 0") as caught:
        q.put(threading.Lock())
    assert caught.value.what == "argument"
    with pytest.raises(pk.SerializationError) as caught:
        q.put_many([1, 2, threading.Lock()])
    assert caught.value.item_index == 2
    with pytest.raises(TimeoutError):
        q.get(timeout=0.05)  # nothing of either call was sent


def test_a_full_queue_makes_put_wait() -> None:
    q: pk.Queue[int] = pk.Queue(maxsize=3)
    q.put_many([1, 2, 3])
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="no room"):
        q.put(4, timeout=0.1)
    assert time.monotonic() - started >= 0.09
    assert q.get(timeout=1) == 1
    q.put(4, timeout=1)  # room again
    assert q.get_many(timeout=1) == [2, 3]
    assert q.get(timeout=1) == 4


def test_get_times_out() -> None:
    q: pk.Queue[int] = pk.Queue()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        q.get(timeout=0.1)
    assert time.monotonic() - started >= 0.09  # it waited the timeout out


def test_closing() -> None:
    q: pk.Queue[int] = pk.Queue(producers=1)
    q.close()
    q.close()  # idempotent for one handle
    with pytest.raises(ValueError, match="closed"):
        q.put(1)
    other: pk.Queue[int] = pk.Queue(producers=1)
    other.close()
    import pickle

    with pytest.raises(RuntimeError):  # like multiprocessing.Queue: shared at start only
        pickle.dumps(other)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"maxsize": -1}, "maxsize"),
        ({"maxsize": 1.5}, "maxsize"),
        ({"producers": 0}, "producers"),
        ({"start_method": "frok"}, "frok"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pk.Queue(**kwargs)  # type: ignore[arg-type]


def test_bad_max_items_and_timeout() -> None:
    q: pk.Queue[int] = pk.Queue()
    with pytest.raises(ValueError, match="max_items"):
        q.get_many(max_items=0)
    with pytest.raises(ValueError, match="timeout"):
        q.get(timeout=-1)


def test_producers_sharing_a_small_bound_never_hold_room_for_each_other() -> None:
    # Two producers each putting batches as large as the bound: when both took room item
    # by item at once, each could hold part of what its batch needed and wait forever for
    # the rest (seen as a hang in the docs' two-producer example).
    ctx = get_context("fork")
    for _ in range(10):
        q: pk.Queue[int] = pk.Queue(maxsize=50, producers=2, start_method="fork")
        producers = [
            ctx.Process(target=w.produce, args=(q, 0, 200)),  # type: ignore[attr-defined]
            ctx.Process(target=w.produce, args=(q, 200, 400)),  # type: ignore[attr-defined]
        ]
        for p in producers:
            p.start()
        got: list[int] = []
        try:
            while True:
                got.extend(q.get_many(timeout=10))  # TimeoutError: the producers are stuck
        except pk.QueueClosedError:
            pass
        finally:
            for p in producers:
                p.join(5)
                if p.exitcode is None:
                    p.kill()
                    p.join()
        assert sorted(got) == list(range(400))


@pytest.mark.timeout(60)
def test_a_large_item_is_not_kept_by_the_consumer_after_it_is_dropped() -> None:
    size = 160 << 20
    q: pk.Queue[bytes] = pk.Queue()
    producer = threading.Thread(target=lambda: q.put(b"z" * size))  # blocks until read
    before = workers_pipeline.rss_bytes()
    producer.start()
    item = q.get(timeout=30)
    producer.join(30)
    assert len(item) == size
    del item
    gc.collect()
    grown = workers_pipeline.rss_bytes() - before
    assert len(getattr(_frames._scratch, "buffer", b"")) < size // 4  # not the item's size
    assert grown < size // 3, f"the consumer kept {grown >> 20} MiB"
    q.close()
