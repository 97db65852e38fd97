"""One conformance suite, run over every backend: same results, order, errors and validation.

The ``backend`` fixture gives the keyword arguments that select a backend; every test here
runs once per backend.  ``tests/test_dask.py`` runs these same tests on Dask clusters (it
imports them and overrides the fixture), so that Dask's threads never overlap the
fork-based backends here.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import itertools
import multiprocessing
import threading
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

import parallelkit as pk
import tasks.basic as w
import tasks.pipeline as wp

LOCAL_BACKENDS = (
    "process",
    "pool",
    "serial",
    "thread",
    "thread-executor",
    "process-executor",
)

Options = dict[str, object]


def make_backend(name: str) -> tuple[Options, cf.Executor | None]:
    """The run_parallel keywords that select backend ``name``, and what to shut down."""
    if name == "process":
        return {"max_workers": 2}, None
    if name == "pool":
        pool = pk.WorkerPool(2)
        return {"backend": pool}, pool
    if name in ("serial", "thread"):
        return {"backend": name}, None
    if name == "thread-executor":
        executor: cf.Executor = cf.ThreadPoolExecutor(3)
        return {"backend": executor}, executor
    if name == "process-executor":
        executor = cf.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver"))
        return {"backend": executor}, executor
    raise AssertionError(name)


@pytest.fixture(params=LOCAL_BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Options]:
    """Every local backend, one test run each."""
    options, owned = make_backend(request.param)
    try:
        yield options
    finally:
        if owned is not None:
            owned.shutdown(wait=True)


def run(fn: object, items: object, options: Options, **kwargs: object) -> list[object]:
    got: list[object] = pk.run_parallel(fn, items, **options, **kwargs)  # type: ignore[call-overload]
    return got


def imap(
    fn: object, items: object, options: Options, **kwargs: object
) -> pk.ResultIterator[object]:
    got: pk.ResultIterator[object] = pk.imap_parallel(fn, items, **options, **kwargs)  # type: ignore[call-overload]
    return got


# ------------------------------------------------------------------ results and order


def test_results_equal_map(backend: Options) -> None:
    for items in (list(range(300)), tuple(range(7)), range(50)):
        assert run(w.square, items, backend) == [x * x for x in items]


def test_unordered_is_the_same_multiset(backend: Options) -> None:
    items = [x % 13 for x in range(200)]
    got = run(w.square, items, backend, ordered=False, chunksize=3)
    assert Counter(got) == Counter(x * x for x in items)
    streamed = list(imap(w.square, iter(items), backend, ordered=False))
    assert Counter(streamed) == Counter(x * x for x in items)


def test_generators_and_explicit_chunksizes(backend: Options) -> None:
    for chunksize in (None, 1, 4, 1000):
        got = run(w.square, (x for x in range(37)), backend, chunksize=chunksize)
        assert got == [x * x for x in range(37)]
        streamed = list(imap(w.square, (x for x in range(37)), backend, chunksize=chunksize))
        assert streamed == [x * x for x in range(37)]


def test_empty_input(backend: Options) -> None:
    assert run(w.square, [], backend) == []
    assert run(w.square, iter(()), backend) == []
    assert list(imap(w.square, [], backend)) == []
    assert list(imap(w.square, iter(()), backend)) == []


# ------------------------------------------------------------------ errors


def test_exception_keeps_type_and_names_the_item(backend: Options) -> None:
    with pytest.raises(ValueError, match="bad item 7") as info:
        run(w.fail_on_multiples_of_seven, range(1, 14), backend, chunksize=4)
    assert any("on item 6" in note for note in info.value.__notes__)  # 7 is at index 6


def test_exception_with_constructor_arguments_arrives_intact(backend: Options) -> None:
    with pytest.raises(w.NeedsArgs) as info:
        run(w.raise_needs_args, [41], backend)
    assert (info.value.code, info.value.reason) == (41, "because")
    assert str(info.value) == "code 41: because"
    assert any("on item 0" in note for note in info.value.__notes__)


def test_return_exceptions_fills_the_failed_slots(backend: Options) -> None:
    items = list(range(1, 40))
    got = run(w.fail_on_multiples_of_seven, items, backend, return_exceptions=True, chunksize=4)
    for x, value in zip(items, got, strict=True):
        if x % 7 == 0:
            assert isinstance(value, ValueError)
            assert str(value) == f"bad item {x}"
            assert any(f"on item {x - 1}" in note for note in value.__notes__)
        else:
            assert value == x


def test_system_exit_is_the_items_exception(backend: Options) -> None:
    got = run(w.exit_in_task, range(6), backend, return_exceptions=True)
    assert isinstance(got[3], SystemExit)
    assert got[3].code == 5
    assert [v for i, v in enumerate(got) if i != 3] == [0, 1, 2, 4, 5]


def test_imap_raises_the_items_exception(backend: Options) -> None:
    got: list[object] = []

    def consume() -> None:
        for value in imap(w.fail_on_multiples_of_seven, iter(range(1, 8)), backend, chunksize=1):
            got.append(value)

    with pytest.raises(ValueError, match="bad item 7"):
        consume()
    assert set(got) <= {1, 2, 3, 4, 5, 6}


def test_timeout_fails_exactly_the_late_item(backend: Options) -> None:
    # A late item fails with TaskTimeoutError on every backend.  Processes stop it at the
    # deadline; a thread finishes it in the background; serial, executors and Dask report
    # it when it has finished (see README "Backends").
    items = [0.0, 0.0, 0.6, 0.0]
    got = run(w.sleep_for, items, backend, timeout=0.3, return_exceptions=True, chunksize=1)
    err = got[2]
    assert isinstance(err, pk.TaskTimeoutError)
    assert (err.item_index, err.timeout) == (2, 0.3)
    assert [v for i, v in enumerate(got) if i != 2] == [0.0, 0.0, 0.0]
    with pytest.raises(pk.TaskTimeoutError) as info:
        run(w.sleep_for, items, backend, timeout=0.3, chunksize=4)
    assert info.value.item_index == 2


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"chunksize": 0}, ValueError, "chunksize"),
        ({"chunksize": 1.5}, TypeError, "chunksize"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"timeout": "1"}, TypeError, "timeout"),
        ({"initargs": [1]}, TypeError, "initargs"),
    ],
)
def test_bad_options_raise_the_same_error(
    backend: Options, kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        run(w.square, [1], backend, **kwargs)
    with pytest.raises(error, match=match):
        imap(w.square, [1], backend, **kwargs)
    with pytest.raises(TypeError, match="callable"):
        run(3, [1], backend)


def test_start_method_and_initializer_only_where_there_are_processes(backend: Options) -> None:
    if backend.get("backend") is None:  # our own processes: both are welcome
        assert run(w.square, [2], backend, start_method="spawn") == [4]
        return
    with pytest.raises(ValueError, match="start_method"):
        run(w.square, [1], backend, start_method="spawn")
    with pytest.raises(ValueError, match="initializer"):
        imap(w.square, [1], backend, initializer=w.failing_initializer)


def test_serial_refuses_max_workers() -> None:
    with pytest.raises(ValueError, match="max_workers cannot be used with backend='serial'"):
        pk.run_parallel(w.square, [1], backend="serial", max_workers=2)
    assert pk.run_parallel(w.square, [3], backend="thread", max_workers=2) == [9]
    with pytest.raises(ValueError, match="max_workers"):
        pk.run_parallel(w.square, [1], backend="thread", max_workers=0)


def test_unknown_backend_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="'thread', 'serial'") as info:
        pk.run_parallel(w.square, [1], backend="threads")  # type: ignore[call-overload]
    assert "Executor" in str(info.value)
    with pytest.raises(ValueError, match="unknown backend"):
        pk.imap_parallel(w.square, [1], backend=object())  # type: ignore[call-overload]


# ------------------------------------------------------------------ streaming


def test_imap_streams_an_endless_generator_and_closes_early(backend: Options) -> None:
    pulled = itertools.count()

    def source() -> Iterator[int]:
        for x in itertools.count():
            next(pulled)
            yield x

    # Chunks of 10: with adaptive chunks, how far the input is read ahead depends on how
    # fast the items ran (the chunks grow with it), which no test should assert.
    with imap(w.square, source(), backend, chunksize=10) as it:
        first = list(itertools.islice(it, 300))
    assert first == [x * x for x in range(300)]
    # read ahead: at most a window of chunks (4 x workers + 2) beyond the 30 taken, and
    # the chunk being read
    workers = max(3, pk.usable_cpu_count())  # the thread executor has 3
    assert next(pulled) <= (30 + 4 * workers + 2 + 1) * 10
    with pytest.raises(StopIteration):
        next(it)


def test_breaking_out_of_imap_stops_promptly(backend: Options) -> None:
    for value in imap(w.sleep_for, itertools.repeat(0.05), backend):
        assert value == 0.05
        break  # over an endless input: only stopping the work lets the test end
    # the autouse leak check proves that no process or thread is left running


# ------------------------------------------------------------------ properties


@given(
    items=st.lists(st.integers(-1000, 1000), max_size=60),
    chunksize=st.none() | st.integers(1, 20),
    ordered=st.booleans(),
)
def test_any_input_gives_map(
    backend: Options, items: list[int], chunksize: int | None, ordered: bool
) -> None:
    got = run(w.square, items, backend, chunksize=chunksize, ordered=ordered)
    expected = [x * x for x in items]
    assert got == expected if ordered else Counter(got) == Counter(expected)


# ------------------------------------------------------------------ backend specifics


def test_serial_runs_in_the_calling_thread_in_order() -> None:
    seen: list[tuple[int, str]] = []

    def record(x: int) -> int:
        seen.append((x, threading.current_thread().name))
        return x

    assert pk.run_parallel(record, range(100), backend="serial") == list(range(100))
    assert seen == [(x, threading.current_thread().name) for x in range(100)]


def test_serial_exception_is_the_original_object() -> None:
    error = KeyError("k")

    def boom(x: int) -> int:
        raise error

    with pytest.raises(KeyError) as info:
        pk.run_parallel(boom, [1], backend="serial")
    assert info.value is error  # the traceback reaches into boom(); a debugger stops there


def test_serial_ctrl_c_is_not_an_items_exception() -> None:
    def interrupt(x: int) -> int:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pk.run_parallel(interrupt, [1, 2], backend="serial", return_exceptions=True)


def test_thread_timeout_returns_at_the_deadline() -> None:
    done = threading.Event()
    finished = threading.Event()

    def late(x: int) -> int:
        if x == 1:
            done.wait(5)
            finished.set()
        return x

    with pytest.raises(pk.TaskTimeoutError, match="thread cannot be stopped") as info:
        pk.run_parallel(late, range(4), backend="thread", timeout=0.2, chunksize=4)
    assert not finished.is_set()  # raised at the deadline, not when the item ended
    assert info.value.item_index == 1
    done.set()  # lets the abandoned thread finish, so the leak check sees it gone


def test_thread_timeout_with_return_exceptions_runs_the_rest() -> None:
    release = threading.Event()

    def late(x: int) -> int:
        if x == 3:
            release.wait(5)
        return x

    got = pk.run_parallel(
        late, range(10), backend="thread", timeout=0.2, chunksize=10, return_exceptions=True
    )
    release.set()
    assert isinstance(got[3], pk.TaskTimeoutError)
    assert [v for i, v in enumerate(got) if i != 3] == [0, 1, 2, 4, 5, 6, 7, 8, 9]


def test_threads_share_memory() -> None:
    lock = threading.Lock()
    total: list[int] = []

    def add(x: int) -> None:
        with lock:
            total.append(x)

    pk.run_parallel(add, range(100), backend="thread", max_workers=4)
    assert sorted(total) == list(range(100))


def test_a_broken_process_executor_names_the_item() -> None:
    context = multiprocessing.get_context("forkserver")
    with (
        cf.ProcessPoolExecutor(1, mp_context=context) as ex,
        pytest.raises(pk.WorkerCrashedError, match="item 13") as info,
    ):
        pk.run_parallel(w.kill_13, range(20), backend=ex, chunksize=1)
    assert info.value.item_index == 13


class _BreaksOnThirteen(cf.Executor):
    """Runs calls on a thread; the call holding item 13 breaks it, as a dying process
    breaks a ProcessPoolExecutor: that call's future fails a little later, and every
    ``submit`` from the moment of the break raises ``BrokenExecutor`` at once."""

    def __init__(self) -> None:
        self.threads = cf.ThreadPoolExecutor(1)
        self.broken = threading.Event()
        self.refused: list[range] = []

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        items = args[1]
        if self.broken.is_set():
            self.refused.append(items)
            raise cf.BrokenExecutor("a worker died")
        if 13 in items:
            self.broken.set()
            future: cf.Future[object] = cf.Future()

            def fail_later() -> None:
                self.broken.wait()
                threading.Event().wait(0.3)  # the driver tries to submit more meanwhile
                future.set_exception(cf.BrokenExecutor("a worker died"))

            threading.Thread(target=fail_later).start()
            return future
        return self.threads.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.threads.shutdown(wait=wait, cancel_futures=cancel_futures)


def test_an_executor_refusing_work_after_a_crash_still_names_the_item() -> None:
    # Seen under load with a real ProcessPoolExecutor: the next chunk's submit() raised
    # BrokenProcessPool before the crashed chunk's future was settled, and the map failed
    # with the bare BrokenProcessPool.
    ex = _BreaksOnThirteen()
    try:
        with pytest.raises(pk.WorkerCrashedError, match="item 13") as info:
            pk.run_parallel(w.square, range(20), backend=ex, chunksize=1)
        assert info.value.item_index == 13
        assert ex.refused, "the driver never tried to submit after the break"
    finally:
        ex.shutdown()


# ------------------------------------------------------------------ pipelines


def test_a_pipeline_runs_on_every_backend(backend: Options) -> None:
    pipeline = (
        pk.Pipeline(range(40)).map(wp.square).filter(wp.is_even).flat_map(wp.twice).map(wp.plus_one)
    )
    expected = [y + 1 for x in range(40) if (x * x) % 2 == 0 for y in (x * x, x * x)]
    assert pipeline.run(backend=backend.get("backend")) == expected  # type: ignore[arg-type]
    source = (x for x in range(40))
    assert pk.Pipeline(source).map(wp.square).run(backend=backend.get("backend")) == [  # type: ignore[arg-type]
        x * x for x in range(40)
    ]


def test_a_pipeline_stage_error_names_the_stage_and_item(backend: Options) -> None:
    pipeline = pk.Pipeline(range(20)).map(wp.plus_one).map(wp.fail_on_13, name="picky")
    with pytest.raises(pk.PipelineError, match="stage 'picky' failed on item 13") as info:
        pipeline.run(backend=backend.get("backend"))  # type: ignore[arg-type]
    assert info.value.stage == "picky"
    assert info.value.item == 13
    assert info.value.item_index is None  # not the first stage: the source never held 13
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(pk.PipelineError) as first:
        pk.Pipeline(range(20)).map(wp.fail_on_13).run(backend=backend.get("backend"))  # type: ignore[arg-type]
    assert (first.value.item, first.value.item_index) == (13, 13)


def test_a_pipeline_source_error_is_reported_as_the_sources() -> None:
    def source() -> Iterator[int]:
        yield 1
        raise OSError("disk gone")

    with pytest.raises(pk.PipelineError, match="source raised OSError") as info:
        pk.Pipeline(source()).map(wp.square).run(backend="serial")
    assert info.value.stage == "source"
    assert isinstance(info.value.__cause__, OSError)


def test_shared_objects_work_with_local_backends() -> None:
    with pk.SharedCounter() as counter:
        pk.run_parallel(functools.partial(wp.count_into, counter), range(10), backend="thread")
        assert counter.value == sum(range(10))
