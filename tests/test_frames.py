"""_frames: messages with large buffers out of band, over a real pipe."""

from __future__ import annotations

import multiprocessing
import threading
from typing import Any

import pytest

from parallelkit._wire import frames


def _roundtrip(obj: object, *fields: int) -> tuple[frames.Parts, Any]:
    reader, writer = multiprocessing.Pipe(duplex=False)
    parts = frames.encode(obj, 7, *fields)
    sender = threading.Thread(target=frames.send, args=(writer, parts))  # may not fit the pipe
    sender.start()
    try:
        got = frames.recv(reader)
    finally:
        sender.join(10)
        reader.close()
        writer.close()
    return got, frames.decode(got)


def test_small_objects_travel_in_one_part() -> None:
    got, value = _roundtrip([1, "two", (3.0,)], 1, 2, 3, 4)
    assert value == [1, "two", (3.0,)]
    assert frames.header(got) == (7, 1, 2, 3, 4)
    assert len(got) == 1


def test_large_bytes_items_go_out_of_band_and_stay_bytes() -> None:
    big = bytes(range(256)) * 1024  # 256 KiB
    got, value = _roundtrip([big, b"small", 3])
    assert value == [big, b"small", 3]
    assert type(value[0]) is bytes
    assert len(got) == 2  # part 0 and one buffer: the small bytes stayed in the pickle
    assert frames.size(got) > len(big)


def test_large_bytearray_items_go_out_of_band_and_stay_bytearrays() -> None:
    # the codec's one rule, as through the pool: bytearray items are not copied in band
    big = bytearray(range(256)) * 512  # 128 KiB
    got, value = _roundtrip([big, bytearray(b"small"), b"x" * 100_000])
    assert value == [big, bytearray(b"small"), b"x" * 100_000]
    assert [type(x) for x in value] == [bytearray, bytearray, bytes]
    assert len(got) == 3
    assert frames.HEAD.unpack_from(got[0])[5] == 2  # two buffers, the pickle in part 0
    assert len(got[0]) < 1000


def test_numpy_arrays_arrive_writable_without_a_copy_of_the_pickle() -> None:
    np = pytest.importorskip("numpy")
    array = np.arange(200_000, dtype="int64").reshape(400, 500)
    got, value = _roundtrip({"a": array, "t": array.T})  # C- and F-contiguous
    assert (value["a"] == array).all()
    assert (value["t"] == array.T).all()
    assert value["a"].flags.writeable
    assert len(got) == 3


def test_a_large_in_band_pickle_is_its_own_part() -> None:
    items = list(range(50_000))  # ~250 KB of pickle, no buffers
    got, value = _roundtrip(items)
    assert value == items
    assert len(got) == 2


def test_set_header_changes_only_the_fields() -> None:
    parts = frames.encode([bytes(100_000)], 1, 2)
    frames.set_header(parts, 3, 4, 5, 6, 7)
    assert frames.header(parts) == (3, 4, 5, 6, 7)
    assert frames.decode(parts) == [bytes(100_000)]


def test_unpicklable_objects_raise_in_encode() -> None:
    with pytest.raises(TypeError):
        frames.encode([threading.Lock()], 1)


def test_the_writer_keeps_messages_to_one_connection_in_order() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    out = frames.Writer()
    messages = [[i, bytes(100_000) if i % 2 else b""] for i in range(20)]
    got: list[Any] = []
    receiver = threading.Thread(
        target=lambda: got.extend(frames.decode(frames.recv(reader)) for _ in messages)
    )
    receiver.start()
    for message in messages:
        out.send(writer, frames.encode(message, 1))
    out.close()
    receiver.join(10)
    reader.close()
    writer.close()
    assert got == messages


def test_a_peer_that_hangs_up_mid_message_is_an_eof() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    parts = frames.encode([bytes(200_000)], 1)
    writer.send_bytes(parts[0])  # the header announces a buffer that never comes
    writer.close()
    with pytest.raises(EOFError):
        frames.recv(reader)
    reader.close()


# ------------------------------------------------------------------ what a reader keeps


def _scratch_after(item: bytes) -> tuple[int, bool]:
    """Receive ``[item]`` in a fresh thread: that thread's kept read buffer, and whether
    the item arrived intact."""
    out: list[tuple[int, bool]] = []

    def receive() -> None:
        _, value = _roundtrip([item])
        out.append((len(getattr(frames._scratch, "buffer", b"")), value == [item]))

    thread = threading.Thread(target=receive)
    thread.start()
    thread.join(60)
    return out[0]


@pytest.mark.timeout(60)
def test_a_reader_does_not_keep_a_large_message_buffer() -> None:
    big = b"x" * (64 << 20)
    kept, intact = _scratch_after(big)
    assert intact
    assert kept < len(big) // 2


def test_a_reader_keeps_its_buffer_for_messages_up_to_the_cap() -> None:
    # the fast path: a buffer reused from one message to the next
    kept, intact = _scratch_after(b"y" * (3 << 20))
    assert intact
    assert kept == 3 << 20
