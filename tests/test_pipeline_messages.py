"""_pipeline.messages: a pipeline's messages as frames of the wire's duplex stream."""

from __future__ import annotations

import socket
import textwrap
import threading
from collections.abc import Iterator

import pytest

from child import run_python
from parallelkit._pipeline import messages
from parallelkit._pipeline.messages import DONE, TASK, Message
from parallelkit._wire.stream import FrameStream


@pytest.fixture
def ends() -> Iterator[tuple[FrameStream, FrameStream]]:
    a, b = socket.socketpair()
    left = FrameStream(a, kinds=messages.KINDS)
    right = FrameStream(b, kinds=messages.KINDS)
    yield left, right
    left.close()
    right.close()


def test_a_message_keeps_its_kind_batch_and_fields(ends: tuple[FrameStream, FrameStream]) -> None:
    left, right = ends
    sent = messages.encode([1, "two", (3.0,)], DONE, 12, 3)
    messages.set_fields(sent, 3, 40, 50)
    messages.send(left, sent)
    got = messages.read(right)
    assert (got.kind, got.batch) == (DONE, 12)
    assert messages.fields(got) == (3, 40, 50)
    assert messages.decode(got) == [1, "two", (3.0,)]
    assert got.size() == sent.size()


def test_a_received_small_message_owns_its_memory(ends: tuple[FrameStream, FrameStream]) -> None:
    # the router holds a message between stages while it reads others from the same stream
    left, right = ends
    for i in range(3):
        messages.send(left, messages.encode([i] * 10, DONE, i, 10))
    held = [messages.read(right) for _ in range(3)]
    assert [messages.decode(m) for m in held] == [[i] * 10 for i in range(3)]


def test_large_bytes_travel_out_of_band_and_stay_bytes(
    ends: tuple[FrameStream, FrameStream],
) -> None:
    left, right = ends
    big, array = bytes(range(256)) * 1024, bytearray(200_000)
    sent = messages.encode([big, array, b"small"], TASK, 1, 3)
    assert len(sent.buffers) == 2
    thread = threading.Thread(target=messages.send, args=(left, sent))  # more than the socket holds
    thread.start()
    got = messages.read(right)
    thread.join(10)
    assert messages.decode(got) == [big, array, b"small"]
    assert [type(x) for x in messages.decode(got)] == [bytes, bytearray, bytes]


def test_a_posting_router_and_a_sending_worker_both_send_large_messages(
    ends: tuple[FrameStream, FrameStream],
) -> None:
    # the router posts (never waits) and reads; the worker sends (draining while it waits):
    # neither waits for the other to read
    router, worker = ends
    payload = [bytes(4 << 20)]
    got: list[Message] = []

    def work() -> None:
        messages.send(worker, messages.encode(payload, DONE, 0, 1))
        got.append(messages.read(worker))

    thread = threading.Thread(target=work)
    thread.start()
    messages.post(router, messages.encode(payload, TASK, 1, 1))
    reply = messages.read(router)
    while router.out:
        router.flush()
    thread.join(30)
    assert not thread.is_alive()
    assert messages.decode(reply) == payload
    assert messages.decode(got[0]) == payload


# A message held by a frame that an exception's traceback holds (the router's frames when a
# run fails), collected as one garbage cycle.  With the body a view of an io.BytesIO
# (getbuffer()), CPython 3.12.1 segfaulted here (gh-111049) and 3.13 reported an ignored
# BufferError; a fresh interpreter, so that a crash fails this test, not the whole run.
_COLLECT_A_HELD_MESSAGE = textwrap.dedent(
    """
    import gc
    from parallelkit._pipeline import messages

    def fail_holding(obj):
        message = messages.encode(obj, messages.TASK, 1, 3)
        try:
            raise RuntimeError("a stage failed")
        except RuntimeError as exc:
            error = exc  # this frame holds the error, the error's traceback this frame

    gc.disable()  # one collection, below, with everything in it
    fail_holding([1, "two", (3.0,)])
    fail_holding([b"x" * (1 << 20), bytearray(1 << 20)])  # buffers out of band
    fail_holding([f"{i:0100}" for i in range(1000)])  # a large in-band pickle
    print("collected", gc.collect() > 0)
    """
)


@pytest.mark.timeout(60)
def test_a_message_in_a_garbage_cycle_is_collected_cleanly() -> None:
    done = run_python("-X", "faulthandler", "-c", _COLLECT_A_HELD_MESSAGE, timeout=50)
    assert (done.returncode, done.stdout.strip()) == (0, "collected True"), done.stderr
    assert "Exception ignored" not in done.stderr
