"""Log records from workers reach the parent's handlers (issue 20, part 3).

Every role (pool workers, pipeline stages, processes serving channels), under every start
method: the parent's handlers as configured when a record arrives (pytest's ``caplog``,
a handler added after the workers started), with the worker's name and the item's index;
records logged right before a real crash (``os._exit``, SIGKILL, a segfault) arrive;
levels the parent would drop are not even sent; records from several threads of a worker
arrive whole.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import pytest

import parallelkit as pk
import tasks.logs as L
from parallelkit import StartMethod

NAME = "tests.tasks.logs"


@pytest.fixture
def info(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=NAME)
    return caplog


def _from_workers(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == NAME and r.process != os.getpid()]


@pytest.mark.timeout(60)
def test_records_reach_the_parents_handlers(
    start_method: StartMethod, info: pytest.LogCaptureFixture
) -> None:
    assert pk.run_parallel(
        L.log_levels, range(10), max_workers=2, start_method=start_method
    ) == list(range(10))
    records = _from_workers(info)
    got = sorted((r.levelname, r.getMessage()) for r in records)
    want = sorted(
        [("INFO", f"info {i}") for i in range(10)]
        + [("WARNING", f"warning {i}") for i in range(10)]
    )
    assert got == want  # DEBUG: below the parent's level
    for r in records:
        assert (r.processName or "").startswith("parallelkit-worker-")
        assert r.item_index == int(r.getMessage().split()[1])  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_a_record_comes_before_the_result_logged_after_it(
    start_method: StartMethod, info: pytest.LogCaptureFixture
) -> None:
    seen = []
    for x in pk.imap_parallel(
        L.log_info, range(30), max_workers=2, start_method=start_method, chunksize=1
    ):
        seen.append(x)
        assert f"item {x}" in [r.getMessage() for r in _from_workers(info)]
    assert sorted(seen) == list(range(30))


@pytest.mark.timeout(60)
def test_a_handler_added_after_the_pool_started_sees_records(start_method: StartMethod) -> None:
    logger = logging.getLogger(NAME)
    got: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record)

    handler = Keep()
    logger.setLevel(logging.INFO)
    try:
        with pk.WorkerPool(2, start_method=start_method) as pool:
            assert list(pool.map(L.square, range(4))) == [0, 1, 4, 9]  # workers started
            logger.addHandler(handler)
            assert list(pool.map(L.log_info, range(4))) == [0, 1, 2, 3]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    assert sorted(r.getMessage() for r in got) == [f"item {i}" for i in range(4)]


@pytest.mark.timeout(60)
def test_levels_lowered_after_the_pool_started_reach_its_workers(
    start_method: StartMethod, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=NAME)
    with pk.WorkerPool(2, start_method=start_method) as pool:
        assert list(pool.map(L.debug_enabled, range(4))) == [False] * 4  # not even formatted
        caplog.set_level(logging.DEBUG, logger=NAME)
        assert list(pool.map(L.debug_enabled, range(4))) == [True] * 4
        assert list(pool.map(L.log_levels, range(2))) == [0, 1]
        caplog.set_level(logging.WARNING, logger=NAME)
        assert pool.submit(L.debug_enabled, 0).result(timeout=30) is False
    debug = [r.getMessage() for r in _from_workers(caplog) if r.levelno == logging.DEBUG]
    assert sorted(debug) == ["debug 0", "debug 1"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("task", [L.log_then_exit, L.log_then_sigkill, L.log_then_segfault])
def test_records_logged_right_before_a_crash_arrive(
    start_method: StartMethod, info: pytest.LogCaptureFixture, task: Callable[[int], int]
) -> None:
    with pytest.raises(pk.WorkerCrashedError):
        pk.run_parallel(task, [7], start_method=start_method)
    assert [r.getMessage() for r in _from_workers(info)] == ["last words 7"]


@pytest.mark.timeout(60)
def test_an_exception_arrives_as_text(
    start_method: StartMethod, info: pytest.LogCaptureFixture
) -> None:
    pk.run_parallel(L.log_exception, [3], start_method=start_method)
    (record,) = _from_workers(info)
    assert record.getMessage() == "failed on 3"
    assert record.exc_info is None
    assert record.exc_text is not None
    assert "Traceback" in record.exc_text
    assert "ValueError: bad 3" in record.exc_text
    assert "ValueError: bad 3" in info.text


@pytest.mark.timeout(60)
def test_records_from_several_threads_of_a_worker_arrive_whole(
    start_method: StartMethod, info: pytest.LogCaptureFixture
) -> None:
    pk.run_parallel(L.log_from_thread, range(2), max_workers=2, start_method=start_method)
    records = _from_workers(info)
    assert len(records) == 2 * 250
    for r in records:
        kind, x, _, _, pad = r.getMessage().split()
        assert pad == ("y" if kind == "thread" else "z") * 3000
        # the task's own thread names its item; the other threads, none
        assert r.item_index == (int(x) if kind == "task" else None)  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_tiny_items_that_log_rarely_name_their_item(
    start_method: StartMethod, info: pytest.LogCaptureFixture
) -> None:
    pk.run_parallel(L.log_rarely, range(6000), max_workers=2, start_method=start_method)
    records = _from_workers(info)
    assert sorted(r.item_index for r in records) == [999, 1999, 2999, 3999, 4999, 5999]  # type: ignore[attr-defined]
    assert all(r.getMessage() == f"rare {r.item_index}" for r in records)  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_the_initializers_records_and_unpicklable_extras_arrive(
    start_method: StartMethod, info: pytest.LogCaptureFixture
) -> None:
    pk.run_parallel(
        L.log_unpicklable_extra, [1], start_method=start_method, initializer=L.log_in_initializer
    )
    records = _from_workers(info)
    assert [r.getMessage() for r in records] == ["initializer ran", "extra 1"]
    assert records[0].item_index is None  # type: ignore[attr-defined]
    assert "lock" in repr(records[1].lock)  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_forwarding_can_be_turned_off(
    start_method: StartMethod, info: pytest.LogCaptureFixture
) -> None:
    pk.run_parallel(L.log_info, range(3), start_method=start_method, forward_logs=False)
    with pk.WorkerPool(1, start_method=start_method, forward_logs=False) as pool:
        assert list(pool.map(L.log_info, range(3))) == [0, 1, 2]
    assert _from_workers(info) == []


# ------------------------------------------------------------------ pipelines


@pytest.mark.timeout(60)
def test_pipeline_stages_records_reach_the_parent(
    start_method: StartMethod, info: pytest.LogCaptureFixture
) -> None:
    for first in ("map", "filter", "flat_map"):
        info.clear()
        source = pk.Pipeline(range(12), start_method=start_method)
        if first == "map":
            pipeline = source.map(L.log_info, max_workers=2)
        elif first == "filter":
            pipeline = source.filter(L.keep_even_logged, max_workers=2)
        else:
            pipeline = source.flat_map(L.twice_logged, max_workers=2)
        pipeline.map(L.log_info).run()
        records = _from_workers(info)
        firsts = [r for r in records if r.processName.startswith("parallelkit-stage0-")]  # type: ignore[union-attr]
        seconds = [r for r in records if r.processName.startswith("parallelkit-stage1-")]  # type: ignore[union-attr]
        assert len(firsts) == 12
        assert len(firsts) + len(seconds) == len(records)
        for r in firsts:  # the first stage's records name their source item
            assert r.item_index == int(r.getMessage().split()[1])  # type: ignore[attr-defined]
        assert {r.item_index for r in seconds} == {None}  # type: ignore[attr-defined]
        assert seconds


@pytest.mark.timeout(60)
def test_pipeline_records_logged_right_before_a_crash_arrive(
    start_method: StartMethod, info: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(pk.PipelineError):
        pk.Pipeline([5], start_method=start_method).map(L.log_then_sigkill).run()
    assert [r.getMessage() for r in _from_workers(info)] == ["last words 5"]


@pytest.mark.timeout(60)
def test_pipeline_forwarding_can_be_turned_off(
    start_method: StartMethod, info: pytest.LogCaptureFixture
) -> None:
    pipeline = pk.Pipeline(range(3), start_method=start_method, forward_logs=False)
    assert pipeline.map(L.log_info).run() == [0, 1, 2]
    assert _from_workers(info) == []


# ------------------------------------------------------------------ channels


@pytest.mark.timeout(60)
def test_a_channel_servers_records_reach_the_parent(
    start_method: StartMethod, info: pytest.LogCaptureFixture
) -> None:
    with pk.start_process(L.log_server, start_method=start_method) as child:
        for text in ("a", "b", "c"):
            assert child.request(text, timeout=30) == text.upper()
            # handled before the reply it logged before was received
            assert _from_workers(info)[-1].getMessage() == f"server got {text}"
    records = _from_workers(info)
    assert [r.getMessage() for r in records] == ["server got a", "server got b", "server got c"]
    assert all(r.processName == "parallelkit-channel-log_server" for r in records)
    assert all(r.item_index is None for r in records)  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_a_channel_servers_records_arrive_while_nobody_receives(
    start_method: StartMethod, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=NAME)
    arrived = threading.Event()

    class Signal(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            arrived.set()

    handler = Signal()
    logging.getLogger(NAME).addHandler(handler)
    try:
        with pk.start_process(L.log_server_quietly, start_method=start_method):
            assert arrived.wait(30)  # the hub thread handled it: we never called recv
            assert [t.name for t in threading.enumerate()].count("parallelkit-logs") == 1
    finally:
        logging.getLogger(NAME).removeHandler(handler)
    assert "parallelkit-logs" not in [t.name for t in threading.enumerate()]


@pytest.mark.timeout(60)
def test_a_channel_servers_last_records_before_a_crash_arrive(
    start_method: StartMethod, info: pytest.LogCaptureFixture
) -> None:
    with pk.start_process(L.log_server_then_crash, start_method=start_method) as child:
        with pytest.raises(pk.ChannelClosedError):
            child.recv(timeout=30)
        child.join(30)
    assert [r.getMessage() for r in _from_workers(info)] == ["server last words"]


@pytest.mark.timeout(60)
def test_channel_forwarding_can_be_turned_off(
    start_method: StartMethod, info: pytest.LogCaptureFixture
) -> None:
    with pk.start_process(L.log_server, start_method=start_method, forward_logs=False) as child:
        assert child.request("x", timeout=30) == "X"
    assert _from_workers(info) == []
