"""Channels: pairs, processes that serve them, and authenticated connections across hosts."""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import pickle
import re
import signal
import socket
import struct
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any

import pytest

import parallelkit as pk
import tasks.channel as wc
from child import run_python
from parallelkit import StartMethod

KEY = b"k" * 16 + os.urandom(16)
MB = 1 << 20


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run ``fn`` in a thread; its result or exception lands in the returned list."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


# ------------------------------------------------------------------ pairs


def test_pair_carries_any_picklable_object_in_order() -> None:
    left, right = pk.channel_pair()
    with left, right:
        blob = wc.Blob(bytearray(os.urandom(300_000)))
        messages: list[object] = [
            1,
            "two",
            (3, [4.0], {"five": None}),
            b"small",
            b"b" * (2 * MB),
            bytearray(b"a" * (MB + 3)),
            blob,
            {"nested": [b"x" * 100_000, wc.Blob(bytearray(b"tiny"))]},
        ]

        def send_all() -> None:
            for m in messages:
                left.send(m)

        thread, _ = _in_thread(send_all)
        received = [right.recv(timeout=5) for _ in messages]
        thread.join(5)
        assert received[:5] == messages[:5]
        assert type(received[4]) is bytes
        assert type(received[5]) is bytearray
        assert received[5] == messages[5]
        assert received[6] == blob
        assert isinstance(received[6], wc.Blob)
        assert isinstance(received[6].data, bytearray)  # received in place, out of band
        nested = received[7]
        assert isinstance(nested, dict)
        assert nested["nested"][0] == b"x" * 100_000


def _frame_head(sock: socket.socket) -> tuple[int, int, int]:
    """The next frame's (kind, out-of-band buffers, pickle length), left on the socket."""
    head = sock.recv(16, socket.MSG_PEEK | socket.MSG_WAITALL)
    kind, nbufs, plen = struct.unpack("<BxxxIQ", head)
    return kind, nbufs, plen


@pytest.mark.timeout(30)
def test_a_list_of_large_bytes_travels_apart_from_the_pickle() -> None:
    # As through the pool and Queue: each large bytes item is written from its own memory
    # (an out-of-band buffer of the frame), not copied into the pickle.
    a, b = socket.socketpair()
    with pk.Channel(a) as left, pk.Channel(b) as right:
        batch = [b"a" * 100_000, 7, b"b" * 200_000, b"small"]
        thread, _ = _in_thread(lambda: left.send(batch))  # more than the socket buffer
        _, nbufs, plen = _frame_head(b)
        assert nbufs == 2
        assert plen < 1000
        received = right.recv(timeout=5)
        thread.join(5)
        assert received == batch
        assert isinstance(received, list)
        assert [type(x) for x in received] == [bytes, int, bytes, bytes]


@pytest.mark.timeout(30)
def test_small_buffers_stay_in_the_pickle() -> None:
    # The codec's one rule: only buffers of 64 KiB or more travel apart.
    a, b = socket.socketpair()
    with pk.Channel(a) as left, pk.Channel(b) as right:
        message = (bytearray(b"x" * 1000), pickle.PickleBuffer(bytearray(2000)))
        left.send(message)
        assert _frame_head(b)[1] == 0
        received = right.recv(timeout=5)
        assert isinstance(received, tuple)
        small, buffer = received
        assert small == bytearray(b"x" * 1000)
        assert type(small) is bytearray
        assert bytes(buffer) == bytes(2000)
        left.send(wc.Blob(bytearray(70_000)))
        assert _frame_head(b)[1] == 1
        assert right.recv(timeout=5) == wc.Blob(bytearray(70_000))


def test_recv_timeout_leaves_the_channel_usable() -> None:
    left, right = pk.channel_pair()
    with left, right:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            right.recv(timeout=0.1)
        assert time.monotonic() - start >= 0.09  # it waited the timeout out
        with pytest.raises(TimeoutError):
            right.recv(timeout=0)
        assert not right.poll()
        left.send("late")
        assert right.poll(timeout=5)
        assert right.recv(timeout=5) == "late"


def test_a_timeout_in_the_middle_of_a_large_message_keeps_what_arrived() -> None:
    left, right = pk.channel_pair()
    with left, right:
        payload = os.urandom(20 * MB)
        thread, _ = _in_thread(lambda: left.send(payload))
        timeouts = 0
        while True:
            try:
                got = right.recv(timeout=0.0005)
                break
            except TimeoutError:
                timeouts += 1
        thread.join(5)
        assert got == payload
        assert timeouts > 0


def test_close_is_idempotent_and_misuse_after_close_is_clear() -> None:
    left, right = pk.channel_pair()
    left.close()
    left.close()
    assert left.closed
    calls: list[Callable[[], object]] = [lambda: left.send(1), left.recv, left.poll]
    for call in calls:
        with pytest.raises(pk.ChannelClosedError, match=r"close\(\) was called"):
            call()
    with pytest.raises(pk.ChannelClosedError, match="closed the channel") as info:
        right.recv(timeout=5)
    assert isinstance(info.value, EOFError)
    with pytest.raises(pk.ChannelClosedError):
        right.send("to nobody")
    right.close()


def test_close_from_another_thread_wakes_a_blocked_recv() -> None:
    left, right = pk.channel_pair()
    with left:
        thread, out = _in_thread(right.recv)
        time.sleep(0.1)  # let it block in recv(); nothing to wait on instead
        right.close()
        thread.join(5)
        assert not thread.is_alive()
        assert isinstance(out[0], pk.ChannelClosedError)


def test_close_from_another_thread_wakes_a_sender_blocked_on_a_full_buffer() -> None:
    left, right = pk.channel_pair()
    with right:
        thread, out = _in_thread(lambda: left.send(b"f" * (20 * MB)))  # nobody reads it
        thread.join(0.3)
        assert thread.is_alive()  # blocked: the socket buffer is full
        left.close()
        thread.join(5)
        assert not thread.is_alive()
        assert isinstance(out[0], pk.ChannelClosedError)


def test_poll_is_true_when_the_other_end_has_closed() -> None:
    left, right = pk.channel_pair()
    with right:
        left.close()
        assert right.poll(timeout=5)
        with pytest.raises(pk.ChannelClosedError):
            right.recv()
        assert right.poll()


def test_unpicklable_message_raises_and_sends_nothing() -> None:
    left, right = pk.channel_pair()
    with left, right:
        with pytest.raises(pk.SerializationError, match="cannot send a"):
            left.send(threading.Lock())
        left.send("next")
        assert right.recv(timeout=5) == "next"


def test_several_receiving_threads_each_get_whole_messages() -> None:
    left, right = pk.channel_pair()
    with left, right:
        sizes = [10, 100_000, 300_000, 5] * 25
        got: list[object] = []
        lock = threading.Lock()

        def receive() -> None:
            while True:
                message = right.recv(timeout=10)
                if message is None:
                    return
                with lock:
                    got.append(message)

        threads = [threading.Thread(target=receive) for _ in range(4)]
        for t in threads:
            t.start()
        for i, size in enumerate(sizes):
            left.send(bytes([i % 256]) * size)
        for _ in threads:
            left.send(None)
        for t in threads:
            t.join(10)
        expected = sorted(bytes([i % 256]) * s for i, s in enumerate(sizes))
        assert sorted(got, key=repr) == sorted(expected, key=repr)


# ------------------------------------------------------------------ processes


def test_an_end_is_an_argument_of_a_multiprocessing_process(start_method: StartMethod) -> None:
    left, right = pk.channel_pair()
    context: Any = multiprocessing.get_context(start_method)
    process = context.Process(target=wc.echo_closing, args=(right, left))
    with left:
        process.start()
        right.close()  # the child has its own copy now
        assert left.request("ping", timeout=10) == "ping"
    process.join(10)
    assert process.exitcode == 0
    process.close()


def test_a_forked_child_closing_its_copy_leaves_the_parents_end_working() -> None:
    left, right = pk.channel_pair()
    with left, right:
        receiver, out = _in_thread(lambda: right.recv(timeout=10))  # holds right's lock
        context: Any = multiprocessing.get_context("fork")
        process = context.Process(target=wc.close_inherited, args=(right,))
        # Python 3.12+ warns about forking while a thread runs: that is the point here.
        threads_warning: contextlib.AbstractContextManager[object] = (
            pytest.warns(DeprecationWarning, match="fork")
            if sys.version_info >= (3, 12)
            else contextlib.nullcontext()
        )
        with threads_warning:
            process.start()
        process.join(10)
        assert process.exitcode == 0
        left.send("still connected")
        receiver.join(10)
        assert out == ["still connected"]
    process.close()


def test_plain_pickle_refuses_a_channel() -> None:
    left, right = pk.channel_pair()
    with left, right, pytest.raises(TypeError, match="socket"):
        pickle.dumps(left)


def test_request_response_server(start_method: StartMethod) -> None:
    with pk.start_process(wc.echo, start_method=start_method) as child:
        assert isinstance(child, pk.ProcessChannel)
        assert child.pid > 0
        assert child.exitcode is None
        assert [child.request(i, timeout=10) for i in range(50)] == list(range(50))
        assert child.request({"a": [1, 2]}, timeout=10) == {"a": [1, 2]}
    assert child.exitcode == 0  # the child's loop ended when the channel closed


def test_after_a_request_times_out_each_request_gets_its_own_reply(
    start_method: StartMethod,
) -> None:
    release = multiprocessing.get_context(start_method).Event()
    with pk.start_process(wc.answer_held, release, start_method=start_method) as child:
        with pytest.raises(TimeoutError, match="no reply"):
            child.request("slow", timeout=0.2)
        release.set()  # the late reply is sent now, before the next one
        assert child.request("fast", timeout=10) == "reply to fast"
        assert child.request("next", timeout=10) == "reply to next"
        with pytest.raises(TimeoutError):
            child.recv(timeout=0.2)  # the late reply was discarded, not kept for recv
        child.send("plain")  # a message sent with send(): its answer is for recv()
        assert child.recv(timeout=10) == "reply to plain"


def test_threads_requesting_on_one_channel_each_get_their_own_reply(
    start_method: StartMethod,
) -> None:
    release = multiprocessing.get_context(start_method).Event()
    with pk.start_process(wc.answer_in_two_threads, release, start_method=start_method) as child:
        slow, slow_out = _in_thread(lambda: child.request("slow", timeout=30))
        # the server holds "slow" in one thread; the other answers these meanwhile
        fast = [_in_thread(functools.partial(child.request, i, timeout=30)) for i in range(20)]
        for thread, _ in fast:
            thread.join(30)
        assert [out for _, out in fast] == [[("answer", i)] for i in range(20)]
        release.set()
        slow.join(30)
        assert slow_out == [("answer", "slow")]


def test_a_late_reply_never_reaches_another_threads_request() -> None:
    client, server = pk.channel_pair()
    with client, server:
        first, first_out = _in_thread(lambda: client.request("a", timeout=0.2))
        first.join(10)
        assert isinstance(first_out[0], TimeoutError)
        assert server.recv(timeout=10) == "a"
        second, second_out = _in_thread(lambda: client.request("b", timeout=10))
        assert server.recv(timeout=10) == "b"  # two requests received, in order
        server.send("answer to a")  # late: discarded
        server.send("answer to b")
        second.join(10)
        assert second_out == ["answer to b"]


def test_iteration_ends_when_the_child_closes(start_method: StartMethod) -> None:
    with pk.start_process(wc.count_to, 10, start_method=start_method) as child:
        assert list(child) == list(range(10))
        child.join(10)
        assert child.exitcode == 0
        with pytest.raises(pk.ChannelClosedError, match="closed the channel, exited with code 0"):
            child.recv(timeout=5)


def test_a_lambda_target(start_method: StartMethod) -> None:
    offset = 40
    with pk.start_process(lambda ch, k: ch.send(k + offset), 2, start_method=start_method) as c:
        assert c.recv(timeout=10) == 42


def test_peer_that_exits_is_channel_closed(start_method: StartMethod) -> None:
    with pk.start_process(wc.exit_with, 3, start_method=start_method) as child:
        assert child.recv(timeout=10) == "ready"
        with pytest.raises(pk.ChannelClosedError, match="exited with code 3"):
            child.recv(timeout=10)
        child.join(5)
        assert child.exitcode == 3
        with pytest.raises(pk.ChannelClosedError):
            child.send("anyone?")
    assert child.exitcode == 3


def test_peer_killed_in_the_middle_of_a_message(start_method: StartMethod) -> None:
    with pk.start_process(wc.send_forever, 64 * MB, start_method=start_method) as child:
        # The first message has begun to arrive; at 64 MB, far more than a socket buffer
        # holds, the child is blocked in the middle of sending it.
        assert child.poll(timeout=10)
        os.kill(child.pid, signal.SIGKILL)
        child.join(5)
        with pytest.raises(pk.ChannelClosedError, match="in the middle of a message") as info:
            child.recv(timeout=10)
        assert "killed by SIGKILL" in str(info.value)
        with pytest.raises(pk.ChannelClosedError):  # it stays broken
            child.recv(timeout=1)
    assert child.exitcode == -signal.SIGKILL


def test_both_ends_send_10_mb_at_once(start_method: StartMethod) -> None:
    with pk.start_process(wc.exchange, 10 * MB, start_method=start_method) as child:
        child.send(bytes([9]) * (10 * MB))  # the child is sending to us meanwhile
        assert child.recv(timeout=10) == bytes([7]) * (10 * MB)
        assert child.recv(timeout=10) == b"ok"


def test_several_threads_sending_on_one_end_keep_messages_intact(
    start_method: StartMethod,
) -> None:
    with pk.start_process(wc.check_threaded, start_method=start_method) as child:
        sizes = [1, 50_000, 200, 300_000, 70_000]

        def send_all(sender: int) -> None:
            for seq in range(40):
                child.send((sender, seq, bytes([sender]) * sizes[seq % len(sizes)]))

        threads = [threading.Thread(target=send_all, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert child.request((-1, 0, b""), timeout=10) == dict.fromkeys(range(4), 40)


def test_100_mb_round_trip(start_method: StartMethod) -> None:
    payload = wc.Blob(bytearray(os.urandom(100 * MB)))
    with pk.start_process(wc.echo, start_method=start_method) as child:
        back = child.request(payload, timeout=20)
    assert isinstance(back, wc.Blob)
    assert back == payload


def test_exception_in_the_target_reaches_the_parent(start_method: StartMethod) -> None:
    with pk.start_process(wc.fail, "bad input", start_method=start_method) as child:
        messages: list[object] = []
        with pytest.raises(pk.ChannelClosedError, match="raised ValueError: bad input") as info:
            messages.extend(child)  # iteration does not hide the failure
        assert messages == ["before the error"]
        cause = info.value.__cause__
        assert isinstance(cause, ValueError)
        assert str(cause) == "bad input"
        assert "in fail" in str(cause.__cause__)  # the child's traceback
        with pytest.raises(pk.ChannelClosedError, match="bad input"):
            child.recv(timeout=1)
        child.join(10)
        assert child.exitcode == 1


def test_close_escalates_on_a_child_that_ignores_sigterm(start_method: StartMethod) -> None:
    child = pk.start_process(wc.ignore_sigterm, start_method=start_method)
    assert child.recv(timeout=10) == "ignoring SIGTERM"
    with pytest.warns(ResourceWarning, match="did not exit within 0.2 s"):
        child.close(timeout=0.2)
    assert child.exitcode == -signal.SIGKILL
    child.close()  # idempotent


def test_the_child_ignores_sigint_like_every_worker() -> None:
    with pk.start_process(wc.echo, start_method="fork") as child:
        assert child.request("up", timeout=10) == "up"
        os.kill(child.pid, signal.SIGINT)
        assert child.request("still up", timeout=10) == "still up"


def test_start_process_argument_errors() -> None:
    with pytest.raises(TypeError, match="target must be callable"):
        pk.start_process(42)  # type: ignore[arg-type]
    with pytest.raises(pk.StartMethodError):
        pk.start_process(wc.echo, start_method="frok")  # type: ignore[arg-type]
    with pytest.raises(pk.SerializationError, match="arguments"):
        pk.start_process(wc.count_to, threading.Lock(), start_method="spawn")  # type: ignore[arg-type]


# ------------------------------------------------------------------ across hosts


def test_listen_and_connect(start_method: StartMethod) -> None:
    with pk.Channel.listen(authkey=KEY) as listener:
        host, port = listener.address
        assert host == "127.0.0.1"  # loopback by default
        assert port > 0
        with (
            pk.start_process(
                wc.connect_and_echo, listener.address, KEY, start_method=start_method
            ) as child,
            listener.accept(timeout=10) as remote,
        ):
            assert child.recv(timeout=10) == "connected"
            assert remote.request(("over", "tcp"), timeout=10) == ("over", "tcp")
            big = wc.Blob(bytearray(os.urandom(MB)))
            back = remote.request(big, timeout=10)
            assert back == big


def test_connect_to_nobody_is_an_os_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = probe.getsockname()  # bound, not listening: refused
        with pytest.raises(ConnectionRefusedError):
            pk.Channel.connect(address, authkey=KEY, timeout=5)


def test_accept_timeout() -> None:
    with pk.Channel.listen(authkey=KEY) as listener, pytest.raises(TimeoutError):
        listener.accept(timeout=0.1)


def _connect_in_thread(
    address: tuple[str, int], key: bytes
) -> tuple[threading.Thread, list[object]]:
    return _in_thread(lambda: pk.Channel.connect(address, authkey=key, timeout=5))


def test_wrong_key_is_an_authentication_error_on_both_sides() -> None:
    with pk.Channel.listen(authkey=KEY) as listener:
        thread, out = _connect_in_thread(listener.address, b"w" * 32)
        with pytest.raises(multiprocessing.AuthenticationError, match="did not prove"):
            listener.accept(timeout=10)
        thread.join(10)
        assert isinstance(out[0], multiprocessing.AuthenticationError)
        assert "refused our key" in str(out[0])
        # the listener keeps serving: the next, right client gets in
        thread, out = _connect_in_thread(listener.address, KEY)
        with listener.accept(timeout=10) as remote:
            thread.join(10)
            client = out[0]
            assert isinstance(client, pk.Channel)
            with client:
                client.send("hello")
                assert remote.recv(timeout=5) == "hello"


@pytest.mark.parametrize(
    ("key", "error"),
    [(b"short", ValueError), ("a" * 32, TypeError), (None, TypeError), (bytearray(32), TypeError)],
)
def test_authkey_must_be_bytes_of_at_least_16(key: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="authkey"):
        pk.Channel.listen(authkey=key)  # type: ignore[arg-type]
    with pytest.raises(error, match="authkey"):
        pk.Channel.connect(("127.0.0.1", 9), authkey=key)  # type: ignore[arg-type]


def test_authkey_is_required() -> None:
    with pytest.raises(TypeError, match="authkey"):
        pk.Channel.listen(("127.0.0.1", 0))  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="authkey"):
        pk.Channel.connect(("127.0.0.1", 9))  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "junk",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 64,
        struct.pack("!Q", 1 << 60) * 16,  # a huge length prefix, then padding
        pickle.dumps(print) * 4,
    ],
    ids=["garbage", "huge-length", "pickle"],
)
def test_raw_client_sending_junk_is_rejected_without_allocating(junk: bytes) -> None:
    with pk.Channel.listen(authkey=KEY, handshake_timeout=1.0) as listener:
        raw = socket.create_connection(listener.address, timeout=5)
        with raw:
            raw.sendall(junk)
            tracemalloc.start()
            try:
                with pytest.raises(multiprocessing.AuthenticationError):
                    listener.accept(timeout=5)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak < MB


def test_a_silent_client_is_dropped_after_the_handshake_timeout() -> None:
    with (
        pk.Channel.listen(authkey=KEY, handshake_timeout=0.3) as listener,
        socket.create_connection(listener.address, timeout=5),
        # the message names the handshake's 0.3 s, not accept's 5 s
        pytest.raises(multiprocessing.AuthenticationError, match=r"within 0\.3 s"),
    ):
        listener.accept(timeout=5)


@pytest.mark.timeout(90)
def test_silent_and_garbage_clients_do_not_lock_good_clients_out() -> None:
    # The listener gives each client 30 s; the good clients allow the listener 3 s: a
    # listener that served one handshake at a time would keep them behind a silent one.
    with pk.Channel.listen(authkey=KEY, handshake_timeout=30) as listener:
        silent = [socket.create_connection(listener.address, timeout=5) for _ in range(4)]
        garbage = [socket.create_connection(listener.address, timeout=5) for _ in range(3)]
        for raw in garbage:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 64)
        good = [
            _in_thread(
                functools.partial(
                    pk.Channel[object, object].connect,
                    listener.address,
                    authkey=KEY,
                    timeout=5,
                    handshake_timeout=3,
                )
            )
            for _ in range(4)
        ]
        accepted: list[pk.Channel[object, object]] = []
        refused: list[Exception] = []
        while len(accepted) < len(good):
            try:
                accepted.append(listener.accept(timeout=60))
            except multiprocessing.AuthenticationError as exc:
                refused.append(exc)
        for thread, _ in good:
            thread.join(10)
        clients = [out[0] for _, out in good]
        assert all(isinstance(c, pk.Channel) for c in clients), clients
        assert len(refused) <= len(garbage)  # the silent ones have 30 s left
        assert all("did not prove" in str(exc) for exc in refused)
        for i, client in enumerate(clients):
            assert isinstance(client, pk.Channel)
            client.send(i)
        assert {end.recv(timeout=10) for end in accepted} == set(range(len(good)))
        for channel in [*accepted, *clients]:
            assert isinstance(channel, pk.Channel)
            channel.close()
        for raw in silent + garbage:
            raw.close()


def test_connecting_to_a_listener_without_our_handshake_fails_in_time() -> None:
    with Listener(("127.0.0.1", 0)) as stdlib_listener:  # no authkey: it waits for pickles
        thread, out = _in_thread(stdlib_listener.accept)
        with pytest.raises(multiprocessing.AuthenticationError, match=r"within 0\.3 s"):
            pk.Channel.connect(stdlib_listener.address, authkey=KEY, handshake_timeout=0.3)
        thread.join(5)
        conn = out[0]
        assert isinstance(conn, multiprocessing.connection.Connection)
        conn.close()


def test_max_message_bytes_closes_the_channel_instead_of_wedging_the_sender() -> None:
    with pk.Channel.listen(authkey=KEY, max_message_bytes=10_000) as listener:
        thread, out = _connect_in_thread(listener.address, KEY)
        with listener.accept(timeout=10) as remote:
            thread.join(10)
            client = out[0]
            assert isinstance(client, pk.Channel)
            with client:
                client.send(b"x" * 5000)
                assert remote.recv(timeout=5) == b"x" * 5000
                sender, result = _in_thread(lambda: client.send(b"y" * (20 * MB)))
                with pytest.raises(pk.ChannelClosedError, match="max_message_bytes=10000"):
                    remote.recv(timeout=5)
                assert remote.closed
                sender.join(10)
                assert not sender.is_alive()
                assert isinstance(result[0], pk.ChannelClosedError)


def test_max_message_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_message_bytes"):
        pk.Channel.listen(authkey=KEY, max_message_bytes=0)


# ------------------------------------------------------------------ the README


def test_the_readme_example_runs(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", readme, re.DOTALL | re.MULTILINE)
    example = next(b for b in blocks if "start_process" in b)
    script = tmp_path / "channel_example.py"
    script.write_text(example)
    result = run_python("-W", "error", str(script), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "HELLO!\n"


# ------------------------------------------------------------------ the child main


def test_a_channel_child_has_a_stack_dump(start_method: StartMethod) -> None:
    # Pool workers and pipeline stages armed theirs; a start_process child did not (one
    # child main now does it for every role).
    from parallelkit._observe.stalls import dump_stack

    with pk.start_process(wc.echo, start_method=start_method) as child:
        assert child.request("started", timeout=10) == "started"
        stack, note = dump_stack(child.pid)
        assert note == ""
        assert "in echo" in stack
        assert child.request("still serving", timeout=10) == "still serving"


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_target_that_cannot_be_unpickled_reaches_the_parent(method: StartMethod) -> None:
    # (under fork the target is inherited, not unpickled)
    from parallelkit._proc.child import EXIT_INIT_FAILED

    with pk.start_process(wc.Unloadable(), start_method=method) as child:
        with pytest.raises(pk.ChannelClosedError) as caught:
            child.recv(timeout=10)
        cause = caught.value.__cause__
        assert isinstance(cause, ValueError)
        assert str(cause) == "this target cannot be loaded here"
        child.join(10)
        assert child.exitcode == EXIT_INIT_FAILED
