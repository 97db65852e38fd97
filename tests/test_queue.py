"""Queue: typed, batched, closed by its producers, shared by processes at start."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import parallelkit as pk
import tasks.pipeline as wp
import tasks.queue as w
from parallelkit import StartMethod
from parallelkit._queue import datagrams as _datagrams
from parallelkit._queue.state import UNBOUNDED_LARGE_BYTES
from parallelkit._util.context import get_context


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


def test_every_way_an_item_is_encoded_gives_it_back_as_it_was() -> None:
    # small pickles, a large one, large bytes and bytearrays out of band, and what only
    # cloudpickle can send: each takes its own path through put and get
    np = pytest.importorskip("numpy")
    q: pk.Queue[object] = pk.Queue()
    reader = threading.Thread(target=lambda: got.extend(q))
    got: list[object] = []
    reader.start()
    many = list(range(30_000))  # a pickle larger than the out-of-band threshold
    blob = bytes(range(256)) * 400  # 100 KiB
    buffer = bytearray(blob[:70_000])
    small_array = np.arange(10)
    q.put(7)
    q.put(bytearray(b"ab"))
    q.put(many)
    q.put(blob)
    q.put_many([blob, buffer, "x"])
    q.put(small_array)
    q.put(lambda x: x + 1)
    q.close()
    reader.join(10)
    assert got[:7] == [7, bytearray(b"ab"), many, blob, blob, buffer, "x"]
    assert type(got[1]) is bytearray
    assert type(got[5]) is bytearray
    assert (got[7] == small_array).all()
    assert got[7].flags.writeable  # type: ignore[attr-defined]
    assert got[8](1) == 2  # type: ignore[operator]
    assert len(got) == 9


def test_put_many_batches_large_items_by_their_size() -> None:
    # a batch ends near BATCH_BYTES by the items' sizes, so a generator of large objects is
    # not read far ahead of what is sent: when it fails, the batches before are in
    size = 300_000  # 4 of them make a batch

    def items() -> Iterator[bytes]:
        for i in range(10):
            yield bytes([i]) * size
        raise RuntimeError("the source failed")

    q: pk.Queue[bytes] = pk.Queue()
    with pytest.raises(RuntimeError, match="the source failed"):
        q.put_many(items())
    q.close()
    assert [b[0] for b in q] == list(range(8))


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
    before = wp.rss_bytes()
    producer.start()
    item = q.get(timeout=30)
    producer.join(30)
    assert len(item) == size
    del item
    gc.collect()
    grown = wp.rss_bytes() - before
    assert len(getattr(_datagrams._scratch_local, "buffer", b"")) < size // 4  # not the item's size
    assert grown < size // 3, f"the consumer kept {grown >> 20} MiB"
    q.close()


# ------------------------------------------------------------------ no item hoarded or lost


def test_a_consumer_that_takes_one_item_leaves_the_rest_of_the_batch(
    start_method: StartMethod,
) -> None:
    ctx = get_context(start_method)
    q: pk.Queue[int] = pk.Queue(start_method=start_method)
    q.put_many(range(10))  # one message
    q.close()
    out, theirs = ctx.Pipe(duplex=False)
    consumer = ctx.Process(target=w.take_one, args=(q, theirs))  # type: ignore[attr-defined]
    consumer.start()
    theirs.close()
    assert out.recv() == 0
    consumer.join(10)
    assert consumer.exitcode == 0
    assert list(q) == list(range(1, 10))  # the rest stayed in the queue
    out.close()


def test_two_consumers_taking_one_at_a_time_share_one_batch(start_method: StartMethod) -> None:
    ctx = get_context(start_method)
    q: pk.Queue[int] = pk.Queue(start_method=start_method)
    q.put_many(range(200))  # one message of 200 items
    q.close()
    barrier = ctx.Barrier(2)
    pipes = [ctx.Pipe(duplex=False) for _ in range(2)]
    consumers = [
        ctx.Process(target=w.take_one_then_all, args=(q, barrier, theirs))  # type: ignore[attr-defined]
        for _, theirs in pipes
    ]
    for p in consumers:
        p.start()
    for _, theirs in pipes:
        theirs.close()
    parts: list[list[int]] = [mine.recv() for mine, _ in pipes]
    for p in consumers:
        p.join(10)
        assert p.exitcode == 0
    assert all(parts)  # both got some
    assert Counter(x for part in parts for x in part) == Counter(range(200))  # each once
    for part in parts:
        assert part == sorted(part)  # in the order they were put
    for mine, _ in pipes:
        mine.close()


def test_get_many_takes_at_most_max_items_and_get_one() -> None:
    q: pk.Queue[int] = pk.Queue()
    q.put_many(range(10))
    assert q.get_many(3, timeout=1) == [0, 1, 2]
    assert q.get(timeout=1) == 3
    assert q.get_many(100, timeout=1) == [4, 5, 6, 7, 8, 9]
    with pytest.raises(TimeoutError):
        q.get(timeout=0.01)


def test_threads_taking_one_at_a_time_get_every_item_once() -> None:
    q: pk.Queue[int] = pk.Queue()
    q.put_many(range(5000))
    q.close()
    got: list[list[int]] = [[], [], []]

    def take(into: list[int]) -> None:
        while True:
            try:
                into.append(q.get(timeout=10))
            except pk.QueueClosedError:
                return

    threads = [threading.Thread(target=take, args=(part,)) for part in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert Counter(x for part in got for x in part) == Counter(range(5000))


@pytest.mark.parametrize("point", ["queue.get.locked", "queue.get.before_commit"])
def test_a_consumer_killed_in_the_middle_of_taking_loses_nothing_it_did_not_get(
    start_method: StartMethod, point: str
) -> None:
    ctx = get_context(start_method)
    q: pk.Queue[int] = pk.Queue(maxsize=20, start_method=start_method)
    q.put_many(range(10))
    q.close()
    consumer = ctx.Process(target=w.take_dying_at, args=(q, point, 3))  # type: ignore[attr-defined]
    consumer.start()
    consumer.join(30)
    assert consumer.exitcode == -signal.SIGKILL
    # it died holding the read lock, before it had any item: all are still there
    assert q.get_many(5, timeout=10) == [0, 1, 2, 3, 4]
    assert list(q) == [5, 6, 7, 8, 9]


# ------------------------------------------------------------------ put with a timeout


def _put_until_no_room(q: pk.Queue[bytes], item: Callable[[int], bytes]) -> tuple[int, Exception]:
    """Put ``item(0)``, ``item(1)``... with a timeout until one fails: (how many, the error)."""
    put = 0
    while True:
        try:
            q.put(item(put), timeout=0.2)
        except TimeoutError as exc:
            return put, exc
        put += 1


@pytest.mark.parametrize(("size", "maxsize"), [(1024, 50), (8192, 10), (1024, 0)])
def test_a_put_with_a_timeout_never_hangs_in_a_write(size: int, maxsize: int) -> None:
    q: pk.Queue[bytes] = pk.Queue(maxsize=maxsize)
    put, error = _put_until_no_room(q, lambda i: bytes([i % 251]) * size)  # nobody reads
    assert "no room" in str(error)
    if maxsize:
        assert put == maxsize
        assert f"maxsize {maxsize}" in str(error)
    q.close()
    got = list(q)  # what was put arrives whole and in order; nothing of the failed put
    assert [(len(x), x[0]) for x in got] == [(size, i % 251) for i in range(put)]


def test_a_4_mib_put_with_a_timeout_and_no_consumer_returns() -> None:
    q: pk.Queue[bytes] = pk.Queue()
    blob = os.urandom(4 << 20)
    q.put(blob, timeout=1.0)  # a message larger than any pipe or socket buffer
    bounded: pk.Queue[bytes] = pk.Queue(maxsize=1)
    bounded.put(blob, timeout=1.0)
    with pytest.raises(TimeoutError, match="maxsize 1"):
        bounded.put(blob, timeout=0.2)
    q.close()
    bounded.close()
    assert list(q) == [blob]
    assert list(bounded) == [blob]


def test_an_unbounded_queue_holds_a_bounded_amount_of_large_items() -> None:
    q: pk.Queue[bytes] = pk.Queue()
    blob = bytes(4 << 20)
    put, error = _put_until_no_room(q, lambda i: blob)
    assert "no room" in str(error)
    assert put * len(blob) <= UNBOUNDED_LARGE_BYTES
    assert q.get(timeout=1) == blob
    q.put(blob, timeout=10)  # room again once one was taken


def test_put_many_with_a_timeout_says_how_many_were_put() -> None:
    q: pk.Queue[int] = pk.Queue(maxsize=4)
    with pytest.raises(TimeoutError) as caught:
        q.put_many(range(10), timeout=0.2)
    assert "the first 4 items were put" in str(caught.value.__notes__)
    assert q.get_many(timeout=1) == [0, 1, 2, 3]


# ------------------------------------------------------------------ killed while waiting


def _wait_blocked(pid: int) -> None:
    """Wait until process ``pid`` sleeps in a system call that waits (poll or a futex)."""
    waits = {"x86_64": {"7", "271", "202"}, "aarch64": {"73", "98"}}[os.uname().machine]
    while True:
        try:
            number = Path(f"/proc/{pid}/syscall").read_text().split()[0]
        except (OSError, IndexError):
            number = ""
        if number in waits:
            return
        time.sleep(0.001)


def test_a_consumer_killed_while_waiting_in_get_leaves_the_queue_usable(
    start_method: StartMethod,
) -> None:
    ctx = get_context(start_method)
    q: pk.Queue[int] = pk.Queue(start_method=start_method)
    ready, theirs = ctx.Pipe(duplex=False)
    consumer = ctx.Process(target=w.announce_then_get, args=(q, theirs))  # type: ignore[attr-defined]
    consumer.start()
    theirs.close()
    assert ready.recv() == "waiting"
    _wait_blocked(consumer.pid or 0)  # idle in get(): the queue is empty
    consumer.kill()
    consumer.join(10)
    q.put(1)
    assert q.get(timeout=10) == 1
    q.put(2)
    assert q.get() == 2  # no timeout: would hang on a lock the dead consumer kept
    ready.close()


def test_a_producer_killed_while_waiting_for_room_leaves_the_room(
    start_method: StartMethod,
) -> None:
    ctx = get_context(start_method)
    q: pk.Queue[int] = pk.Queue(maxsize=2, producers=2, start_method=start_method)
    q.put_many([1, 2])  # full
    ready, theirs = ctx.Pipe(duplex=False)
    producer = ctx.Process(target=w.announce_then_put, args=(q, theirs, 3))  # type: ignore[attr-defined]
    producer.start()
    theirs.close()
    assert ready.recv() == "waiting"
    _wait_blocked(producer.pid or 0)
    producer.kill()
    producer.join(10)
    assert q.get_many(timeout=10) == [1, 2]
    q.put(4, timeout=10)  # the queue is empty: there is room
    q.put(5, timeout=10)
    with pytest.raises(TimeoutError, match="maxsize 2"):
        q.put(6, timeout=0.1)
    assert q.get(timeout=10) == 4
    assert q.get(timeout=10) == 5
    ready.close()


@pytest.mark.parametrize("point", ["queue.put.before_send"])
def test_a_producer_killed_in_the_middle_of_a_put_leaves_the_queue_usable(
    start_method: StartMethod, point: str
) -> None:
    ctx = get_context(start_method)
    q: pk.Queue[int] = pk.Queue(maxsize=1, producers=2, start_method=start_method)
    producer = ctx.Process(target=w.put_dying_at, args=(q, point, 1))  # type: ignore[attr-defined]
    producer.start()
    producer.join(30)
    assert producer.exitcode == -signal.SIGKILL
    q.put(2, timeout=10)  # it held the counters' lock when it died
    assert q.get(timeout=10) == 2


def test_a_thread_waiting_for_a_lock_another_thread_of_ours_holds_is_no_deadlock() -> None:
    # Record locks belong to processes: a child holding the read lock and waiting for the
    # counters' lock, which a thread of ours holds, while another thread of ours asks for
    # the read lock, looks to the kernel like a deadlock (EDEADLK); it is none.
    ctx = get_context("fork")
    q: pk.Queue[int] = pk.Queue(start_method="fork")
    assert q._count_lock.acquire(None)  # "thread 2" of this process
    ready, theirs = ctx.Pipe(duplex=False)
    child = ctx.Process(target=w.hold_read_then_wait_for_count, args=(q._state.fd, theirs))  # type: ignore[attr-defined]
    child.start()
    theirs.close()
    assert ready.recv() == "holding"
    _wait_blocked_in_fcntl(child.pid or 0)
    got: list[object] = []
    taker = threading.Thread(target=lambda: got.append(q._read_lock.acquire(None)))
    taker.start()  # asks for the read lock: the cycle the kernel sees
    _wait_thread_blocked(taker)
    q._count_lock.release()  # the child goes on, then lets go of the read lock
    taker.join(30)
    child.join(30)
    assert got == [True]
    q._read_lock.release()
    q.put(1)
    assert q.get(timeout=10) == 1
    ready.close()


def _wait_blocked_in_fcntl(pid: int) -> None:
    number = {"x86_64": "72", "aarch64": "25"}[os.uname().machine]
    while Path(f"/proc/{pid}/syscall").read_text().split()[0] != number:
        time.sleep(0.001)


def _wait_thread_blocked(thread: threading.Thread) -> None:
    """Wait until ``thread`` asked for the lock: it waits in fcntl, or sleeps between
    tries, or it ended (with the answer or an error)."""
    waits = {"x86_64": {"72", "35", "230"}, "aarch64": {"25", "101", "115"}}[os.uname().machine]
    task = Path(f"/proc/self/task/{thread.native_id}/syscall")
    while thread.is_alive():
        with contextlib.suppress(OSError, IndexError):
            if task.read_text().split()[0] in waits:
                return
        time.sleep(0.001)
