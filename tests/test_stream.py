"""_wire.stream: FrameStream's outbox mode (post / flush), as an event loop over peers uses it."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator

import pytest

from parallelkit._wire.stream import ID_FLAGS, FrameStream, StreamEnd, widen

KINDS = frozenset({1, 2 | ID_FLAGS})


@pytest.fixture
def pair() -> Iterator[tuple[FrameStream, FrameStream]]:
    left, right = socket.socketpair()
    a, b = FrameStream(left, kinds=KINDS), FrameStream(right, kinds=KINDS)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(60)
def test_post_never_waits_and_the_outbox_keeps_frames_whole_and_in_order(
    pair: tuple[FrameStream, FrameStream],
) -> None:
    a, b = pair
    room = widen(a.sock)
    sent = []
    for i in range(2 * room // 50_000 + 4):  # more than the socket takes while b reads nothing
        body = bytes([i % 256]) * (50_000 + i)
        buffers = [b"x" * 70_000] if i % 3 == 0 else []
        a.post(2 | ID_FLAGS, i, body, buffers)
        sent.append((2 | ID_FLAGS, i, body, buffers))
    a.post(1, 0, b"last")
    sent.append((1, 0, b"last", []))
    assert a.out, "everything fitted: the test did not fill the socket"
    assert not a.flush()  # nobody reads: the socket stays full
    got: list[tuple[int, int, bytes, list[bytes]]] = []

    def reader() -> None:
        for _ in sent:
            kind, ident, body, buffers = b.read(None)
            got.append((kind, ident, bytes(body), [bytes(x) for x in buffers or []]))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        poller = select.poll()
        poller.register(a.fileno(), select.POLLOUT)
        while not a.flush():
            poller.poll(1000)
    finally:
        thread.join(30)
    assert got == sent


@pytest.mark.timeout(60)
def test_an_event_loop_posting_and_a_peer_sending_both_large_frames_do_not_deadlock(
    pair: tuple[FrameStream, FrameStream],
) -> None:
    """Each side writes a frame far larger than the socket holds before it reads: the
    poster's loop reads while its outbox waits; the sender drains while it waits."""
    a, b = pair
    big = b"a" * (8 << 20)
    peer_got: list[bytes] = []

    def peer() -> None:
        b.send(1, 0, b"b" * (8 << 20))
        _, _, body, _ = b.read(None)
        peer_got.append(bytes(body))

    thread = threading.Thread(target=peer)
    thread.start()
    try:
        a.post(1, 0, big)
        got: list[bytes] = []
        poller = select.poll()
        while a.out or not got:
            poller.register(a.fileno(), select.POLLIN | (select.POLLOUT if a.out else 0))
            for _, event in poller.poll(1000):
                if event & select.POLLOUT:
                    a.flush()
                if event & select.POLLIN:
                    _, _, body, _ = a.read(None)
                    got.append(bytes(body))
    finally:
        thread.join(30)
    assert got == [b"b" * (8 << 20)]
    assert peer_got == [big]


def test_posting_to_a_peer_that_has_gone_drops_the_frame_and_reading_ends(
    pair: tuple[FrameStream, FrameStream],
) -> None:
    a, b = pair
    b.close()
    a.post(1, 0, b"x" * 100_000)
    assert not a.out
    with pytest.raises(StreamEnd):
        a.read(None)


def test_widen_gives_room_that_a_silent_peer_can_be_sent_without_waiting() -> None:
    left, right = socket.socketpair()
    with left, right:
        room = widen(left)
        left.setblocking(False)
        sent = 0
        block = b"x" * 65536
        while sent < room:  # BlockingIOError would fail the test
            sent += left.send(block[: room - sent])


@pytest.mark.timeout(60)
def test_a_peer_posts_end_sends_a_frame_larger_than_the_socket_to_a_posting_loop() -> None:
    """The worker's side of the pool: its send waits in the kernel, while the loop at the
    other end posts a large frame too and reads whenever it can."""
    left, right = socket.socketpair()
    loop, worker = FrameStream(left, kinds=KINDS), FrameStream(right, kinds=KINDS, peer_posts=True)
    got: list[bytes] = []

    def work() -> None:
        worker.send(1, 0, b"r" * (8 << 20))
        _, _, body, _ = worker.read(None)
        got.append(bytes(body))

    thread = threading.Thread(target=work)
    try:
        loop.post(2 | ID_FLAGS, 7, b"t" * (8 << 20))
        thread.start()
        received: list[bytes] = []
        poller = select.poll()
        while loop.out or not received:
            poller.register(loop.fileno(), select.POLLIN | (select.POLLOUT if loop.out else 0))
            for _, event in poller.poll(1000):
                if event & select.POLLOUT:
                    loop.flush()
                if event & select.POLLIN:
                    _, _, body, _ = loop.read(None)
                    received.append(bytes(body))
        thread.join(30)
        assert received == [b"r" * (8 << 20)]
        assert got == [b"t" * (8 << 20)]
    finally:
        if thread.ident is not None:
            thread.join(30)
        loop.close()
        worker.close()
