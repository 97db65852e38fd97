"""How parallelkit waits for its child processes to end (``_lifecycle``).

A fork or spawn child's sentinel reads EOF when its descriptors close, before the kernel
has made it reapable; these tests make that window long on purpose (a child that closes
its descriptors and runs on) and check the wait neither spins through it nor blocks past
its deadline.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from typing import Any

import pytest

import parallelkit as pk
import tasks.basic as w
from parallelkit import StartMethod, _platform
from parallelkit._proc import child as _child
from parallelkit._proc import lifecycle as _lifecycle
from parallelkit._proc.lifecycle import describe_exit
from parallelkit._proc.wakeup import WakeUpPipe

FORK_OR_SPAWN = [m for m in ("fork", "spawn") if m in multiprocessing.get_all_start_methods()]


def _counting_waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the timeout of every ``multiprocessing.connection.wait`` call."""
    calls: list[float] = []
    real = multiprocessing.connection.wait

    def wait(objects: Any, timeout: float | None = None) -> list[Any]:
        calls.append(-1.0 if timeout is None else timeout)
        return real(objects, timeout)

    monkeypatch.setattr(multiprocessing.connection, "wait", wait)
    return calls


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "no-pidfd"])
def test_waiting_for_an_exiting_child_does_not_spin(
    start_method: StartMethod, pidfd: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if pidfd and not _platform.OFFERS.pidfd:
        pytest.skip("no pidfd here (portable mode): the no-pidfd case runs")
    ctx: Any = multiprocessing.get_context(start_method)
    process = ctx.Process(target=w.close_descriptors_then_exit, args=(0.5,))
    process.start()
    try:
        if start_method != "forkserver":  # in the window: sentinel at EOF, not reapable
            assert multiprocessing.connection.wait([process.sentinel], 30)
            assert process.exitcode is None
        if not pidfd:  # as on macOS or a kernel before 5.3: 1 ms sleeps between polls
            monkeypatch.setattr(_platform, "OFFERS", _platform.OFFERS._replace(pidfd=False))
        sleeps: list[float] = []
        real_sleep = time.sleep

        def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            real_sleep(seconds)

        monkeypatch.setattr(time, "sleep", sleep)
        calls = _counting_waits(monkeypatch)
        alive = _lifecycle.wait_exited([process], time.monotonic() + 30.0)
        assert alive == []
        assert process.exitcode == 0
        # one wait on the sentinel, one on the pidfd (or, without pidfds, 1 ms sleeps);
        # polling exitcode in the window made thousands of calls
        assert len(calls) <= 3, f"{len(calls)} waits"
        if pidfd or start_method == "forkserver":  # forkserver: the status is on the sentinel
            assert sleeps == []
        else:
            assert sleeps
            assert all(0 < s <= 0.001 for s in sleeps)  # real sleeps: no spinning between
    finally:
        process.kill()
        process.join()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", FORK_OR_SPAWN)
def test_a_child_that_closed_its_descriptors_and_runs_on_is_stopped_at_the_deadline(
    start_method: StartMethod,
) -> None:
    ctx: Any = multiprocessing.get_context(start_method)
    process = ctx.Process(target=w.close_descriptors_then_sleep, args=(120.0,))
    process.start()
    pid = process.pid
    try:
        assert multiprocessing.connection.wait([process.sentinel], 30)  # its fds closed
        assert process.exitcode is None
        # 0.5 s for it to exit, then SIGTERM ends it (a blocking waitpid would wait the
        # 120 s, past this test's timeout)
        with pytest.warns(ResourceWarning, match="did not exit within 0.5 s"):
            _lifecycle.stop_processes([process], join_timeout=0.5, close=False)
        assert process.exitcode == -15, f"pid {pid}: {process.exitcode}"
    finally:
        if process.exitcode is None:
            process.kill()
        process.join()
        process.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", FORK_OR_SPAWN)
def test_a_task_that_closes_its_workers_descriptors_fails_and_the_pool_goes_on(
    start_method: StartMethod,
) -> None:
    with pk.WorkerPool(1, start_method=start_method) as pool:
        future = pool.submit(w.close_descriptors_then_sleep, 120.0)
        # its pipe and sentinel closed, it ran on: killed after a 5 s grace to exit (a
        # blocking waitpid would wait the 120 s, past this timeout)
        with pytest.raises(pk.WorkerCrashedError) as info:
            future.result(timeout=60)
        assert info.value.signal == "SIGKILL"
        assert pool.submit(w.square, 7).result(timeout=60) == 49


def _watch_a_closed_sentinel_then_exit(seconds: float) -> None:
    """The watcher thread of a child whose task closed the parent's sentinel before the
    watcher looked at it (the order the CI run met in portable mode); we exit 0 after
    ``seconds`` unless the watcher ends us first."""
    read, _write = os.pipe()
    os.close(read)
    threading.Thread(target=_child._watch_parent, args=(read,), daemon=True).start()
    time.sleep(seconds)
    os._exit(0)


def _watch_a_closed_sentinel_of_a_parent_that_dies(report: int) -> None:
    """A middle process: its child closes its sentinel, then watches; we report the child's
    pid and exit, so the child's parent really dies."""
    middle = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(report)
        read, _write = os.pipe()
        os.close(read)
        _child._watch_parent(read, middle)  # returns never: exits 70
        os._exit(1)
    os.write(report, str(pid).encode())
    os._exit(0)


@pytest.mark.timeout(60)
def test_a_sentinel_a_task_closed_is_not_taken_for_the_parents_death() -> None:
    """Seen in CI (portable mode, no ``PR_SET_PDEATHSIG``): a task closed every descriptor,
    the parent-watch thread then woke on the closed sentinel and exited the worker with
    "parent died" (70) while its parent was alive."""
    process = multiprocessing.get_context("fork").Process(
        target=_watch_a_closed_sentinel_then_exit, args=(2.0,)
    )
    process.start()
    process.join(50)
    assert process.exitcode == 0, describe_exit(process.exitcode)
    process.close()


@pytest.mark.timeout(60)
def test_a_watcher_without_its_sentinel_still_sees_the_parent_die() -> None:
    read, write = os.pipe()
    middle = multiprocessing.get_context("fork").Process(
        target=_watch_a_closed_sentinel_of_a_parent_that_dies, args=(write,)
    )
    middle.start()
    os.close(write)
    try:
        with os.fdopen(read, "rb") as report:
            grandchild = int(report.read())
        middle.join(50)
        assert middle.exitcode == 0
        # reparented away from its dead parent, it sees so within a second and exits
        # (reaped by its new parent, it vanishes)
        while True:
            try:
                os.kill(grandchild, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
    finally:
        middle.close()


# ------------------------------------------------------------------ the wake-up pipe


def test_the_wake_up_pipe_wakes_a_waiter_and_never_blocks_the_waker() -> None:
    pipe = WakeUpPipe()
    try:
        assert multiprocessing.connection.wait([pipe.fd], 0) == []
        for _ in range(100_000):  # more than a pipe holds: the full pipe is a pending wake-up
            pipe.wake()
        assert multiprocessing.connection.wait([pipe.fd], 0) == [pipe.fd]
        while multiprocessing.connection.wait([pipe.fd], 0):
            pipe.drain()
        pipe.drain()  # nothing pending: returns at once
    finally:
        pipe.close()
    pipe.close()  # idempotent


def test_a_wake_up_after_close_writes_to_no_reused_descriptor() -> None:
    pipe = WakeUpPipe()
    pipe.close()
    read_fd, write_fd = os.pipe()  # the lowest free numbers: those the pipe had
    try:
        pipe.wake()
        pipe.drain()
        assert multiprocessing.connection.wait([read_fd], 0) == []
    finally:
        os.close(read_fd)
        os.close(write_fd)
