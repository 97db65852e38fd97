"""Options are checked the same way everywhere (issue 17 §4): one clear error, in the
caller's process, for a wrong type or value; infinity as a timeout means no limit."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import pytest

import parallelkit as pk

KEY = b"options-test-key"
NO_LIMITS = [math.inf, 1e300]


@pytest.mark.parametrize("timeout", NO_LIMITS)
def test_map_timeouts_without_limit(timeout: float) -> None:
    assert pk.run_parallel(abs, [-1, 2], max_workers=2, timeout=timeout) == [1, 2]
    with pk.imap_parallel(
        abs, [-1, 2], max_workers=2, timeout=timeout, stall_timeout=timeout
    ) as results:
        assert list(results) == [1, 2]
    with pk.WorkerPool(2) as pool:
        assert list(pool.map(abs, [-1, 2], timeout=timeout)) == [1, 2]
        assert list(pool.imap(abs, [-1, 2], timeout=timeout, stall_timeout=timeout)) == [1, 2]
        assert pk.run_parallel(abs, [-3], backend=pool, timeout=timeout) == [3]
    for backend in ("serial", "thread"):
        assert pk.run_parallel(abs, [-1], backend=backend, timeout=timeout) == [1]


@pytest.mark.parametrize("timeout", NO_LIMITS)
def test_queue_and_channel_timeouts_without_limit(timeout: float) -> None:
    queue: pk.Queue[int] = pk.Queue()
    try:
        queue.put(1, timeout=timeout)
        queue.put_many([2], timeout=timeout)
        assert queue.get(timeout=timeout) == 1
        assert queue.get_many(timeout=timeout) == [2]
    finally:
        queue.close()
    left, right = pk.channel_pair()
    with left, right:
        left.send("x")
        assert right.poll(timeout)
        assert right.recv(timeout=timeout) == "x"
        # the reply is what the thread that received the request sends next
        answer = threading.Thread(target=lambda: left.send(("y", left.recv(timeout=30))))
        answer.start()
        assert right.request("q", timeout=timeout) == ("y", "q")
        answer.join(30)


@pytest.mark.parametrize("timeout", NO_LIMITS)
def test_network_channel_timeouts_without_limit(timeout: float) -> None:
    accepted: list[pk.Channel[object, object]] = []
    with pk.Channel.listen(authkey=KEY) as listener:
        server = threading.Thread(target=lambda: accepted.append(listener.accept(timeout)))
        server.start()
        with pk.Channel.connect(listener.address, authkey=KEY, timeout=timeout) as client:
            server.join(30)
            assert len(accepted) == 1
            with accepted[0] as remote:
                client.send("hello")
                assert remote.recv(timeout=timeout) == "hello"
    with pytest.raises(ValueError, match="handshake_timeout must be a positive, finite"):
        pk.Channel.listen(authkey=KEY, handshake_timeout=timeout)


def test_pipeline_stall_timeout_without_limit() -> None:
    assert pk.Pipeline([-1, 2], stall_timeout=math.inf).map(abs).run() == [1, 2]


@pytest.mark.parametrize(
    ("value", "error"),
    [(math.nan, ValueError), (-1, ValueError), (True, TypeError), ("1", TypeError)],
)
def test_bad_timeouts_get_the_same_clear_error(value: Any, error: type[Exception]) -> None:
    queue: pk.Queue[int] = pk.Queue()
    left, right = pk.channel_pair()
    with pk.WorkerPool(1) as pool, left, right:
        calls: list[Callable[[], object]] = [
            lambda: pk.run_parallel(abs, [1], timeout=value),
            lambda: pk.imap_parallel(abs, [1], timeout=value),
            lambda: pk.run_parallel(abs, [1], stall_timeout=value),
            lambda: pool.map(abs, [1], timeout=value),
            lambda: pool.imap(abs, [1], timeout=value),
            lambda: queue.get(timeout=value),
            lambda: left.recv(timeout=value),
            lambda: left.poll(value),
            lambda: pk.Pipeline([1], stall_timeout=value),
        ]
        try:
            for call in calls:
                with pytest.raises(error, match="timeout must be a"):
                    call()
        finally:
            queue.close()


@pytest.mark.parametrize("option", ["ordered", "return_exceptions"])
@pytest.mark.parametrize("value", [None, 0, "yes"])
def test_boolean_options_take_bools_only(option: str, value: object) -> None:
    kwargs = {option: value}
    message = f"{option} must be True or False"
    for backend in (None, "serial", "thread"):
        with pytest.raises(TypeError, match=message):
            pk.run_parallel(abs, [1], backend=backend, **kwargs)  # type: ignore[call-overload]
        with pytest.raises(TypeError, match=message):
            pk.imap_parallel(abs, [1], backend=backend, **kwargs)  # type: ignore[call-overload]
    with pk.WorkerPool(1) as pool, pytest.raises(TypeError, match=message):
        pool.imap(abs, [1], **kwargs)  # type: ignore[call-overload]


@pytest.mark.parametrize("value", [None, 0, "yes"])
def test_pipeline_ordered_takes_bools_only(value: Any) -> None:
    with pytest.raises(TypeError, match="ordered must be True or False"):
        pk.Pipeline([1]).map(abs, ordered=value)
