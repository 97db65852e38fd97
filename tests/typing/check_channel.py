"""Static checks of what users write with channels; mypy runs this, nobody else.

    mypy --strict --warn-unused-ignores tests/typing

``assert_type`` pins each inference; each ``# type: ignore[code]`` marks a call that must
stay a type error.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import assert_type

import parallelkit as pk
from parallelkit import Channel, ChannelListener, ProcessChannel

KEY = b"0123456789abcdef"


def serve(channel: Channel[str, int], scale: int) -> None:
    """Receives ints, sends strs."""
    for n in channel:
        channel.send(str(n * scale))


def serve_pair(channel: Channel[bytes, tuple[int, str]], a: int, b: str) -> None:
    del channel, a, b


def check_channel_pair() -> None:
    # Annotate the two ends, which mirror each other...
    left: Channel[int, str]
    right: Channel[str, int]
    left, right = pk.channel_pair()
    assert_type(left.recv(), str)
    assert_type(right.recv(timeout=1.0), int)
    # ... or name what the first end sends and receives.
    a, b = pk.channel_pair(send_type=int, recv_type=str)
    assert_type(a, Channel[int, str])
    assert_type(b, Channel[str, int])
    assert_type(a.request(1, timeout=2.0), str)
    assert_type(iter(b), Iterator[int])
    for message in b:
        assert_type(message, int)
    # Untyped ends carry objects.
    x, y = pk.channel_pair()
    assert_type(x, Channel[object, object])
    assert_type(y.recv(), object)
    assert_type(a.poll(), bool)
    with a as same:
        assert_type(same, Channel[int, str])


def check_channel_pair_errors() -> None:
    a, b = pk.channel_pair(send_type=int, recv_type=str)
    a.send("not an int")  # type: ignore[arg-type]
    b.send(3)  # type: ignore[arg-type]
    wrong: int = a.recv()  # type: ignore[assignment]
    del wrong
    a.recv(timeout="1")  # type: ignore[arg-type]
    pk.channel_pair(int, str)  # type: ignore[call-overload]


def check_variance() -> None:
    # An end that sends objects may stand where one sending ints is expected; an end that
    # receives bools where one receiving ints is expected.
    sends_anything: Channel[object, bool] = pk.channel_pair(send_type=object, recv_type=bool)[0]
    narrower: Channel[int, int] = sends_anything
    del narrower
    ints: Channel[int, int] = pk.channel_pair(send_type=int, recv_type=int)[0]
    wider: Channel[object, int] = ints  # type: ignore[assignment]
    del wider


def check_start_process(method: pk.StartMethod) -> None:
    child = pk.start_process(serve, 3)
    assert_type(child, ProcessChannel[int, str])
    assert_type(child.request(2), str)
    assert_type(child.pid, int)
    assert_type(child.exitcode, int | None)
    child.join(1.0)
    child.close(timeout=2.0)
    with pk.start_process(serve_pair, 1, "b", start_method=method) as other:
        assert_type(other, ProcessChannel[tuple[int, str], bytes])
        assert_type(other.recv(), bytes)
    as_channel: Channel[int, str] = child
    del as_channel


def check_start_process_errors() -> None:
    pk.start_process(serve, "3")  # type: ignore[arg-type]
    pk.start_process(serve)  # type: ignore[arg-type]
    pk.start_process(serve, 1, 2)  # type: ignore[arg-type]
    pk.start_process(serve, 1, start_method="threads")  # type: ignore[arg-type]
    child = pk.start_process(serve, 1)
    child.send("x")  # type: ignore[arg-type]


def check_across_hosts() -> None:
    with Channel[int, str].listen(("0.0.0.0", 0), authkey=KEY, max_message_bytes=1 << 20) as lis:
        assert_type(lis, ChannelListener[int, str])
        assert_type(lis.address, tuple[str, int])
        remote = lis.accept(timeout=5.0)
        assert_type(remote, Channel[int, str])
        assert_type(remote.recv(), str)
    client = Channel[str, int].connect(("127.0.0.1", 1234), authkey=KEY, timeout=3.0)
    assert_type(client, Channel[str, int])
    assert_type(client.request("x"), int)
    untyped = Channel.listen(authkey=KEY)
    assert_type(untyped, ChannelListener[object, object])


def check_across_hosts_errors() -> None:
    Channel.listen(("127.0.0.1", 0))  # type: ignore[call-arg]
    Channel.listen(authkey="text")  # type: ignore[arg-type]
    Channel.connect(("127.0.0.1", 1), b"0123456789abcdef")  # type: ignore[call-arg]
    Channel.connect(("127.0.0.1", 1), authkey=KEY, timeout="1")  # type: ignore[arg-type]
