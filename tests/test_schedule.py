"""``WorkerPool.schedule``: a task with its own timeout, and a cancel that stops it running.

A running task is cancelled or times out for real: its worker is stopped (the test checks
that its pid is gone) and a new one, which runs the pool's initializer, serves the tasks
queued behind it.  The race of a task finishing as it is cancelled is held at each point
where it is decided (the future's state, the engine's stop request), so that each outcome
is tested, not hoped for.  Tests learn that a task runs, and let it return, through FIFOs
(tasks/schedule.py), so nothing polls.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, as_completed, wait
from pathlib import Path
from typing import Any

import pytest

import parallelkit as pk
import tasks.schedule as s
from parallelkit import StartMethod
from parallelkit._map import futures as futures_module
from parallelkit._map import pool as pool_module
from parallelkit._map.futures import StopRequests
from tasks.refs import Tracked, ident

HOLD: float = 60.0  # seconds: how long a held side waits at most (far beyond the test)


@pytest.fixture
def fifo(tmp_path: Path) -> Callable[[str], str]:
    """Make a FIFO in the test's directory; its path."""

    def make(name: str) -> str:
        path = tmp_path / name
        os.mkfifo(path)
        return str(path)

    return make


@pytest.fixture
def pool(start_method: StartMethod) -> Iterator[pk.WorkerPool]:
    with pk.WorkerPool(1, start_method=start_method, initializer=s.initialize) as pool:
        yield pool


def running_in(started: str) -> int:
    """Wait until the task writes its worker's pid to ``started``; the pid."""
    with open(started) as f:
        return int(f.read())


def let_go(go: str) -> None:
    with open(go, "w") as f:
        f.write("go")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def counting_callbacks(future: Future[Any]) -> list[Future[Any]]:
    calls: list[Future[Any]] = []
    future.add_done_callback(calls.append)
    return calls


# ------------------------------------------------------------------------------ cancel


def test_cancel_stops_a_running_task(pool: pk.WorkerPool, fifo: Callable[[str], str]) -> None:
    started = fifo("started")
    task = pool.schedule(s.run_until_stopped, args=(started,))
    calls = counting_callbacks(task)
    behind = [pool.submit(s.worker_info), pool.schedule(s.worker_info)]  # queued behind it
    pid = running_in(started)
    assert task.running()
    assert task.cancel()
    assert task.cancelled()
    assert task.done()
    assert not task.running()
    with pytest.raises(CancelledError):
        task.result()
    assert task.cancel()  # again: still cancelled
    for future in behind:  # the pool goes on, on a new worker that ran the initializer
        new_pid, initialized = future.result(timeout=HOLD)
        assert new_pid != pid
        assert initialized
    # with one worker, the task behind ran only once the stopped one was reaped
    assert not alive(pid)
    assert calls == [task]


def test_cancel_tells_waiters_already_waiting(
    pool: pk.WorkerPool, fifo: Callable[[str], str]
) -> None:
    done_first = pool.schedule(s.worker_info)
    done_first.result(timeout=HOLD)
    started = fifo("started")
    task = pool.schedule(s.run_until_stopped, args=(started,))
    running_in(started)
    watched: list[Future[Any]] = [done_first, task]
    completed = as_completed(watched)
    assert next(completed) is done_first  # as_completed now waits on `task`
    assert task.cancel()
    assert next(completed) is task  # would wait for ever if the waiter were not told
    assert wait([task]).done == {task}


def test_cancel_kills_a_task_that_ignores_sigterm(
    pool: pk.WorkerPool, fifo: Callable[[str], str]
) -> None:
    started = fifo("started")
    task = pool.schedule(s.ignore_sigterm_and_run, args=(started,))
    pid = running_in(started)
    assert task.cancel()
    new_pid, initialized = pool.schedule(s.worker_info).result(timeout=HOLD)
    assert new_pid != pid
    assert initialized
    assert not alive(pid)


@pytest.mark.parametrize("first_by", ["schedule", "submit"])
def test_cancel_a_queued_task(
    pool: pk.WorkerPool, fifo: Callable[[str], str], tmp_path: Path, first_by: str
) -> None:
    # A scheduled task waits for an idle worker: it is never queued in a busy worker's pipe
    # (where it could not be cancelled without stopping the task ahead of it).
    started, go = fifo("started"), fifo("go")
    first: Future[int]
    if first_by == "schedule":
        first = pool.schedule(s.announce_then_return, args=(started, go))
    else:
        first = pool.submit(s.announce_then_return, started, go)
    pid = running_in(started)
    mark = tmp_path / "ran"
    queued = pool.schedule(s.leave_mark, args=(str(mark),))
    engine = pool._engine
    try:
        with engine.mutex:  # a dispatch now, as the driver would make at any moment
            engine.dispatcher.dispatch()
        assert not queued.running()  # still queued: not sent to the busy worker
        assert queued.cancel()
        assert wait([queued]).done == {queued}  # done once the pool has dropped it
    finally:
        let_go(go)
    assert first.result(timeout=HOLD) == pid
    assert pool.schedule(s.worker_info).result(timeout=HOLD) == (pid, True)  # not stopped
    assert queued.cancelled()
    assert not mark.exists()


def test_nothing_waits_behind_a_scheduled_task(
    pool: pk.WorkerPool, fifo: Callable[[str], str]
) -> None:
    # Its worker may be stopped by a cancel: a call queued in that worker's pipe behind it
    # might have started by then (the task just finished), and would be stopped too.
    started, go = fifo("started"), fifo("go")
    task = pool.schedule(s.announce_then_return, args=(started, go))
    pid = running_in(started)
    behind = pool.submit(s.worker_info)
    engine = pool._engine
    try:
        with engine.mutex:  # a dispatch now, as the driver would make at any moment
            engine.dispatcher.dispatch()
        assert not behind.running()
    finally:
        let_go(go)
    assert (task.result(timeout=HOLD), behind.result(timeout=HOLD)) == (pid, (pid, True))


# ------------------------------------------------------------------------------ the race


def test_race_result_first_cancel_says_no(pool: pk.WorkerPool) -> None:
    task = pool.schedule(s.worker_info)
    calls = counting_callbacks(task)
    pid, _ = task.result(timeout=HOLD)
    assert not task.cancel()
    assert not task.cancelled()
    assert task.result() == (pid, True)
    assert pool.schedule(s.worker_info).result(timeout=HOLD) == (pid, True)  # not stopped
    assert calls == [task]


def test_race_cancel_first_result_dropped(
    pool: pk.WorkerPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine has the result and is about to set it (outside its mutex) when the task is
    # cancelled: held right there, cancel() wins and the late result is dropped quietly.
    pid, _ = pool.schedule(s.worker_info).result(timeout=HOLD)
    arrived, release = threading.Event(), threading.Event()
    real = futures_module.set_result

    def held(future: Future[Any], value: Any) -> None:
        arrived.set()
        release.wait(HOLD)
        real(future, value)

    monkeypatch.setattr(pool_module, "set_result", held)
    try:
        task = pool.schedule(s.worker_info)
        calls = counting_callbacks(task)
        assert arrived.wait(HOLD)
        assert task.running()
        assert task.cancel()
    finally:
        release.set()
    monkeypatch.undo()
    with pytest.raises(CancelledError):
        task.result()
    # the task had finished: its worker is not stopped
    assert pool.schedule(s.worker_info).result(timeout=HOLD) == (pid, True)
    assert calls == [task]


def test_race_cancel_first_result_before_the_stop(
    pool: pk.WorkerPool, fifo: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # cancel() has cancelled the future, but its stop request has not reached the engine
    # when the result does: the engine drops the result and, told later, stops nothing.
    started, go = fifo("started"), fifo("go")
    entered, release = threading.Event(), threading.Event()
    real = StopRequests.request

    def held(self: StopRequests, job: Any) -> None:
        entered.set()
        release.wait(HOLD)
        real(self, job)

    monkeypatch.setattr(StopRequests, "request", held)
    task = pool.schedule(s.announce_then_return, args=(started, go))
    calls = counting_callbacks(task)
    pid = running_in(started)
    answers: list[bool] = []
    canceller = threading.Thread(target=lambda: answers.append(task.cancel()))
    canceller.start()
    try:
        assert entered.wait(HOLD)
        assert task.cancelled()
        let_go(go)  # the task returns; its result reaches the engine
        helper = pool._engine.helper_thread
        assert helper is not None
        helper.join(HOLD)  # it exits once the engine has settled the task
        assert not helper.is_alive()
    finally:
        release.set()
        canceller.join(HOLD)
    assert answers == [True]
    with pytest.raises(CancelledError):
        task.result()
    assert pool.schedule(s.worker_info).result(timeout=HOLD) == (pid, True)  # not stopped
    assert calls == [task]


# ------------------------------------------------------------------------------ timeouts


def test_timeout_stops_a_late_task(pool: pk.WorkerPool, fifo: Callable[[str], str]) -> None:
    started = fifo("started")
    late = pool.schedule(s.run_until_stopped, args=(started,), timeout=0.5)
    behind = pool.submit(s.worker_info)
    pid = running_in(started)
    error = late.exception(timeout=HOLD)
    assert isinstance(error, pk.TaskTimeoutError)
    assert isinstance(error, TimeoutError)
    assert (error.timeout, error.item_index) == (0.5, None)
    assert f"ran longer than its timeout of 0.5 s; its worker (pid {pid}) was stopped" in str(error)
    with pytest.raises(pk.TaskTimeoutError):
        late.result()
    assert not late.cancel()
    assert not late.cancelled()
    new_pid, initialized = behind.result(timeout=HOLD)
    assert new_pid != pid
    assert initialized
    assert not alive(pid)


def test_timeout_counts_from_the_start_not_the_wait(pool: pk.WorkerPool) -> None:
    first = pool.schedule(s.nap, args=(1.0, 1))
    second = pool.schedule(s.nap, args=(0.0, 2), timeout=0.5)  # waits 1 s for the worker
    assert (first.result(timeout=HOLD), second.result(timeout=HOLD)) == (1, 2)


@pytest.mark.timeout(120)
def test_many_timeouts_at_once(start_method: StartMethod) -> None:
    with pk.WorkerPool(2, start_method=start_method, initializer=s.initialize) as pool:
        tasks = [
            pool.schedule(s.nap, args=(600.0 if i % 2 else 0.0, i), timeout=2.0) for i in range(8)
        ]
        behind = [pool.submit(s.nap, 0.0, 100 + i) for i in range(4)]
        for i, task in enumerate(tasks):
            if i % 2:
                error = task.exception(timeout=HOLD)
                assert isinstance(error, pk.TaskTimeoutError)
                assert error.timeout == 2.0
            else:
                assert task.result(timeout=HOLD) == i
        assert [f.result(timeout=HOLD) for f in behind] == [100, 101, 102, 103]
        infos = [pool.schedule(s.worker_info).result(timeout=HOLD) for _ in range(4)]
        assert all(initialized for _, initialized in infos)


# ------------------------------------------------------------------------------ references


@pytest.mark.parametrize("where", ["running", "queued"])
def test_cancelled_task_lets_go_of_its_arguments(
    pool: pk.WorkerPool, fifo: Callable[[str], str], where: str
) -> None:
    started, go = fifo("started"), fifo("go")
    obj = Tracked(1_000_000)
    ref = weakref.ref(obj)
    if where == "running":
        task = pool.schedule(s.run_until_stopped, args=(started, obj))
        running_in(started)
        assert task.cancel()
        pool.schedule(s.worker_info).result(timeout=HOLD)  # the engine is done with it
    else:
        first = pool.schedule(s.announce_then_return, args=(started, go))
        running_in(started)
        task = pool.schedule(ident, args=(obj,))
        try:
            assert task.cancel()
            wait([task])  # the pool has dropped it
        finally:
            let_go(go)
        first.result(timeout=HOLD)
    del obj
    assert ref() is None  # while the caller still holds the future
    assert task.cancelled()


# ------------------------------------------------------------------------------ the API


def test_schedule_passes_args_and_kwargs(pool: pk.WorkerPool) -> None:
    # `timeout` is schedule's own option; in kwargs, it is the function's argument
    got = pool.schedule(s.keywords, args=(1,), kwargs={"b": 2, "timeout": 3.0}).result()
    assert got == (1, 2, 3.0)
    assert pool.schedule(s.keywords, kwargs={"a": 4}).result() == (4, 0, 0.0)
    assert pool.schedule(s.worker_info).result()[1] is True
    # submit keeps the Executor contract: every keyword goes to the function
    assert pool.submit(s.keywords, 1, timeout=0.5).result() == (1, 0, 0.5)


def test_schedule_task_raises_its_own_error(pool: pk.WorkerPool) -> None:
    with pytest.raises(ZeroDivisionError):
        pool.schedule(divmod, args=(1, 0), timeout=30).result(timeout=HOLD)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda p: p.schedule(42), TypeError, "callable"),
        (lambda p: p.schedule(pow, args=[2, 3]), TypeError, "args must be a tuple"),
        (lambda p: p.schedule(pow, kwargs=[("a", 1)]), TypeError, "kwargs must be a mapping"),
        (lambda p: p.schedule(pow, kwargs={1: 2}), TypeError, "keys must be strings"),
        (lambda p: p.schedule(pow, args=(2, 3), timeout=-1), ValueError, "timeout"),
        (lambda p: p.schedule(pow, args=(2, 3), timeout="1"), TypeError, "timeout"),
    ],
)
def test_schedule_refuses_bad_arguments(
    call: Callable[[Any], object], error: type[Exception], match: str
) -> None:
    with pk.WorkerPool(1) as pool, pytest.raises(error, match=match):
        call(pool)
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.schedule(pow, args=(2, 3))
