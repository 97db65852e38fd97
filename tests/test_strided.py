"""Arrays in any shape: non-contiguous numpy views (tiles of an image, reversed, transposed,
views of views) travel out of band through the arena with one strided copy, arrive with
their values, dtype and shape (C-contiguous, writable: as numpy's own pickle rebuilds
them), and chunks of large items pickled in band are sized by bytes too."""

from __future__ import annotations

import gc
import os
import pickle
import tracemalloc
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import parallelkit as pk
import tasks.arena as wa
from parallelkit import StartMethod, _platform
from parallelkit._map.job import Job
from parallelkit._wire import arena as _arena
from parallelkit._wire import codec as _codec

ARG = _arena.ARG_MIN_BYTES
SHM = _platform.SEGMENT_DIR


def _views() -> list[np.ndarray[Any, Any]]:
    """Non-contiguous views of every kind, and the edge cases next to them."""
    rng = np.random.default_rng(3)
    image = rng.random((300, 400))
    rgb = rng.integers(0, 255, size=(200, 300, 3), dtype=np.uint8)
    fortran = np.asfortranarray(rng.random((200, 300)))
    record = np.dtype([("x", "<f8"), ("n", "<i4"), ("tag", "S3")], align=True)
    records = np.zeros(9000, dtype=record)
    records["x"] = rng.random(9000)
    records["n"] = np.arange(9000)
    records["tag"] = b"abc"
    readonly = rng.random((300, 400))
    readonly.flags.writeable = False
    objects = np.empty((80, 80), dtype=object)
    objects[:] = [[(i, j) for j in range(80)] for i in range(80)]
    return [
        image[40:240, 50:350],  # a tile: rows strided
        image[::-1],  # negative strides
        image[:, ::-2],  # every other column, backwards
        image.T[10:],  # transposed and sliced
        image[::2][:, 1:][5:, ::-3],  # a view of a view of a view
        rgb[20:180, 30:280, :],  # a 3-D tile
        rgb[..., 1],  # one channel of three
        fortran[1:, :],  # Fortran order, sliced: neither C nor F contiguous
        records[::2],  # structured dtype with padding
        readonly[10:, 10:],  # read-only, non-contiguous
        rng.random(30_000).astype(np.float16)[::3],  # 2-byte items
        (rng.random(20_000) + 1j * rng.random(20_000))[1::2],  # complex
        image[:8, :8],  # non-contiguous but small: in band
        np.float64(2.5) * np.ones(()),  # 0-d (always contiguous)
        image[:0, ::2],  # empty
        objects[::2, 1::2],  # object dtype: pickled element by element, in band
        image.copy(),  # contiguous: numpy's own out-of-band path
        fortran,  # F-contiguous: stays F-contiguous
    ]


def _expected(a: np.ndarray[Any, Any]) -> tuple[Any, ...]:
    """How an array arrives: the same values, dtype and shape; F-contiguous if it was (and
    not C), else C-contiguous; writable (a copy), except a read-only contiguous array that
    numpy itself sends as it is."""
    if a.flags.f_contiguous and not a.flags.c_contiguous:
        like = a.copy(order="F")
    else:
        like = a.copy(order="C")
    return wa.array_facts(like)


def test_dump_items_leaves_non_contiguous_arrays_out_of_band() -> None:
    views = [v for v in _views() if v.nbytes >= ARG and not v.dtype.hasobject]
    strided = [v for v in views if not (v.flags.c_contiguous or v.flags.f_contiguous)]
    payload, raws = _arena.dump_items([(i, v) for i, v in enumerate(views)])
    # only their dtypes and shapes are in the pickle, not their data
    assert len(payload) < 4096
    assert sum(type(r) is _codec.Strided for r in raws) == len(strided)
    assert sum(r.nbytes for r in raws) == sum(v.nbytes for v in views)


def test_a_strided_copy_writes_what_pickle_would_have() -> None:
    views = _views()
    payload, raws = _arena.dump_items(views)
    buffers = []
    for raw in raws:
        target = bytearray(raw.nbytes)
        if isinstance(raw, _codec.Strided):
            raw.copy_into(memoryview(target))
        else:
            target[:] = raw
        buffers.append(target)
    back = pickle.loads(payload, buffers=buffers)
    assert [wa.array_facts(b) for b in back] == [_expected(v) for v in views]


def test_long_chunks_of_small_tuples_are_not_looked_into() -> None:
    # the look costs a call per container: a long chunk without arrays goes by plain pickle
    items = [(i, str(i)) for i in range(_codec.SCAN_LIMIT + 1)]
    assert _arena.dump_items(items)[1] == []
    big = np.zeros((300, 300))[:, ::2]
    payload, raws = _arena.dump_items([(0, big)] + [(i, None) for i in range(1, 100)])
    assert [type(r) for r in raws] == [_codec.Strided]
    assert len(payload) < 4096


def _ours() -> set[str]:
    return {name for name in os.listdir(SHM) if name.startswith(f"pk_{os.getpid()}_")}


@pytest.mark.timeout(240)
def test_views_of_every_kind_round_trip(start_method: StartMethod) -> None:
    views = _views()
    want = [_expected(v) for v in views]
    items = list(enumerate(views))

    def generator() -> Iterator[tuple[int, np.ndarray[Any, Any]]]:
        yield from items

    got = pk.run_parallel(wa.array_facts, views, max_workers=2, start_method=start_method)
    # under fork, run_parallel's workers inherit the list: each view is the view itself
    assert got == ([wa.array_facts(v) for v in views] if start_method == "fork" else want)
    with pk.imap_parallel(
        wa.facts_of_item, generator(), max_workers=2, start_method=start_method
    ) as ordered:
        assert [facts for _, facts in ordered] == want
    with pk.imap_parallel(
        wa.facts_of_item, generator(), max_workers=2, start_method=start_method, ordered=False
    ) as unordered:
        assert dict(unordered) == dict(enumerate(want))
    with pk.WorkerPool(2, start_method=start_method) as pool:
        assert list(pool.imap(wa.array_facts, views, chunksize=1)) == want
        assert pk.run_parallel(wa.array_facts, views, backend=pool, ordered=False) != []
        echoed = list(pool.imap(wa.echo, generator()))
        assert pool._engine.arena is not None
    assert [wa.array_facts(b) for _, b in echoed] == want
    assert not _ours()


def test_views_round_trip_through_a_pipeline(start_method: StartMethod) -> None:
    views = _views()
    facts = (
        pk.Pipeline(iter(views), start_method=start_method).map(wa.array_facts, max_workers=2).run()
    )
    assert facts == [_expected(v) for v in views]


def test_the_parent_holds_no_tile_after_its_result(start_method: StartMethod) -> None:
    image = np.random.default_rng(5).random((512, 2048))
    refs: list[weakref.ref[np.ndarray[Any, Any]]] = []

    def tile(i: int) -> tuple[int, np.ndarray[Any, Any]]:
        view = image[:, i * 128 : (i + 1) * 128]  # 512 KB, not contiguous
        refs.append(weakref.ref(view))
        return i, view

    def tiles() -> Iterator[tuple[int, np.ndarray[Any, Any]]]:
        # no local holds the last tile read (the engine may have read no further yet)
        for i in range(16):
            yield tile(i)

    with pk.imap_parallel(
        wa.facts_of_item, tiles(), max_workers=2, start_method=start_method
    ) as results:
        for i, facts in results:
            assert facts[1] == (512, 128)
            del facts
            gc.collect()
            assert refs[i]() is None, f"tile {i} is still held after its result"
    assert len(refs) == 16


def _job_over(pool: pk.WorkerPool, items: Iterator[Any]) -> Job:
    return Job(
        pool._engine,
        wa.echo,
        items,
        length=None,
        chunksize=None,
        ordered=True,
        return_exceptions=False,
        fail_fast=True,
        timeout=None,
    )


@pytest.mark.parametrize("kind", ["strided arrays", "large strings"])
def test_a_generators_chunks_of_large_items_stay_small(kind: str) -> None:
    """Items pickled in band (large strings), or not contiguous, count towards a chunk's
    bytes too: a generator's chunks doubled towards 16 items of 2 MB, pickled, sent and
    read whole while the workers waited."""
    image = np.zeros((2048, 4096))

    def items() -> Iterator[Any]:
        for i in range(64):
            if kind == "large strings":
                yield f"{i:02d}" * (1 << 20)  # 2 MB each
            else:
                yield image[:512, (i % 8) * 512 : (i % 8 + 1) * 512]  # 2 MB each

    with pk.WorkerPool(2, start_method="fork") as pool:
        job = _job_over(pool, items())
        sizes, starts = [], []
        for _ in range(12):
            chunk = job.next_chunk()
            if chunk is None:
                break
            sizes.append(chunk.stop - chunk.start)
            starts.append(chunk.start)
            job.in_flight = 0  # as if its result came back at once, fast
            job._adapt(chunk.stop - chunk.start, 1e-5)
        job.cancel()
    # one item each: a chunk of two (over the cap by its pickle's few bytes) made the
    # parent's arena grow into a second segment; cut again, nothing lost or repeated
    assert sizes == [1] * 12, sizes
    assert starts == list(range(12))


@pytest.mark.parametrize("ordered", [True, False])
def test_a_generator_cut_at_the_byte_cap_loses_nothing_and_says_where_it_failed(
    start_method: StartMethod, ordered: bool
) -> None:
    """A chunk read from a generator and cut again at the byte cap keeps the rest for the
    next chunks: every item comes back once, and a generator that then raises is
    reported after the last item it gave."""
    image = np.arange(2048 * 4096, dtype=np.float64).reshape(2048, 4096)

    def items() -> Iterator[tuple[int, Any]]:
        for i in range(9):
            yield i, image[:512, (i % 8) * 512 : (i % 8 + 1) * 512]  # 2 MB, not contiguous
        raise RuntimeError("the input broke")

    got: list[tuple[int, Any]] = []
    with (
        pytest.raises(RuntimeError, match="the input broke") as raised,
        pk.imap_parallel(
            wa.facts_of_item, items(), max_workers=2, start_method=start_method, ordered=ordered
        ) as it,
    ):
        got.extend(it)
    assert sorted(i for i, _ in got) == list(range(9))
    if ordered:
        assert [i for i, _ in got] == list(range(9))
    want = [(i, _expected(image[:512, (i % 8) * 512 : (i % 8 + 1) * 512])) for i in range(9)]
    assert sorted(got, key=lambda r: r[0]) == want
    assert "after item 8" in "".join(raised.value.__notes__)


def test_fork_checks_inherited_views_without_copying_them() -> None:
    """Under fork, run_parallel's workers inherit a list; the parent only checks that each
    item could be pickled -- without pickling a non-contiguous view's data in band."""
    image = np.random.default_rng(9).random((1024, 2048))
    views = [image[:, i * 256 : (i + 1) * 256] for i in range(8)]  # 2 MB each, strided
    with pk.WorkerPool(2, start_method="fork") as pool:
        job = Job(
            pool._engine,
            wa.array_facts,
            views,
            length=len(views),
            chunksize=len(views),
            ordered=True,
            return_exceptions=False,
            fail_fast=True,
            timeout=None,
            inherited=True,
        )
        tracemalloc.start()
        try:
            chunk = job.next_chunk()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        job.cancel()
    assert chunk is not None
    assert chunk.items is None  # checked, not sent
    assert peak < views[0].nbytes // 4, f"{peak} bytes allocated to check 8 views"


@pytest.mark.parametrize("via", ["segments", "direct"])
def test_non_contiguous_results_go_through_the_workers_segment(
    start_method: StartMethod, via: str
) -> None:
    if via == "direct" and not _platform.OFFERS.process_vm:
        pytest.skip("portable mode: no process_vm_readv")
    options: dict[str, Any] = {} if via == "segments" else {"initializer": wa.no_result_segments}
    sizes = [300, 301, 302, 303]
    with pk.WorkerPool(2, start_method=start_method, **options) as pool:
        crops = list(pool.imap(wa.crop_of, sizes, chunksize=1))
        pairs = list(pool.imap(wa.crop_pair, sizes, chunksize=2))
        used_segments = any(w.results is not None for w in pool._engine.workers)
    # with /dev/shm full in the worker, the parent copies them out of its memory, in band
    assert used_segments is (via == "segments")
    for n, crop, (m, again) in zip(sizes, crops, pairs, strict=True):
        assert m == n
        for got in (crop, again):
            assert wa.array_facts(got) == _expected(wa.crop_of(n))


def test_a_strided_result_that_finds_no_room_goes_in_band() -> None:
    writer = _arena.ResultWriter()
    results = [wa.crop_of(300)]
    try:
        writer.retry_at = float("inf")  # as if /dev/shm had been full a moment ago
        with pytest.raises(_codec.NoRoom):
            writer.dump((0, 1, results, None, 0.0), results, strict=True)
        payload, specs = writer.dump((0, 1, results, None, 0.0), results)
        assert specs == []
        back = pickle.loads(payload)[2][0]
        assert wa.array_facts(back) == _expected(results[0])
        writer.retry_at = 0.0
        payload, specs = writer.dump((0, 1, results, None, 0.0), results)
        assert len(specs) == 1
        assert len(payload) < 4096
    finally:
        writer.close()
        for name in _ours():
            os.unlink(SHM / name)


class _Held:
    """An object to pickle and watch with a weakref."""

    def __init__(self) -> None:
        self.data = np.arange(10)


def test_what_the_array_pickler_pickled_is_let_go_without_a_garbage_collection() -> None:
    # The pickler's buffer callback was its own bound method: a reference cycle that kept
    # its memo, so every object it pickled (a task's arguments), until a collection.
    obj = _Held()
    ref = weakref.ref(obj)
    gc.disable()
    try:
        payload, buffers = _codec.dump_apart_arrays((obj, np.ones((64, 64))[::2]), 1000)
        assert [type(b) for b in buffers] == [_codec.Strided]
        del obj
        assert ref() is None
    finally:
        gc.enable()
    assert pickle.loads(payload, buffers=[bytearray(b.nbytes) for b in buffers])[0].data[3] == 3
