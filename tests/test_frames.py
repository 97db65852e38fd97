"""_frames: messages with large buffers out of band (Queue's message format)."""

from __future__ import annotations

import textwrap
import threading
from typing import Any

import pytest

from child import run_python
from parallelkit._wire import frames


def _roundtrip(obj: object, *fields: int) -> tuple[frames.Parts, Any]:
    """Encode, then decode what a receiver would have: each part in memory of its own (a
    writable buffer as a ``bytearray``, the others as ``bytes``)."""
    parts = frames.encode(obj, 7, *fields)
    got: frames.Parts = [bytes(parts[0])]
    nbuf = frames.HEAD.unpack_from(got[0])[5]
    if nbuf < 0:
        nbuf = -1 - nbuf
        got.append(bytes(parts[1]))
    for i in range(nbuf):
        _, writable = frames.SPEC.unpack_from(got[0], frames.HEAD.size + frames.SPEC.size * i)
        raw = parts[len(got)]
        got.append(bytearray(raw) if writable else bytes(raw))
    return got, frames.decode(got)


def test_small_objects_travel_in_one_part() -> None:
    got, value = _roundtrip([1, "two", (3.0,)], 1, 2, 3, 4)
    assert value == [1, "two", (3.0,)]
    assert frames.HEAD.unpack_from(got[0])[:5] == (7, 1, 2, 3, 4)
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


def test_unpicklable_objects_raise_in_encode() -> None:
    with pytest.raises(TypeError):
        frames.encode([threading.Lock()], 1)


# A message's parts held by a frame that an exception's traceback holds, collected as one
# garbage cycle.  With the pickle a view of an io.BytesIO (getbuffer()), CPython 3.12.1
# segfaulted here (gh-111049) and 3.13 reported an ignored BufferError; a fresh interpreter,
# so that a crash fails this test, not the whole run.
_COLLECT_HELD_PARTS = textwrap.dedent(
    """
    import gc
    from parallelkit._wire import frames

    def fail_holding(obj):
        parts = frames.encode(obj, 1)
        try:
            raise RuntimeError("a put failed")
        except RuntimeError as exc:
            error = exc  # this frame holds the error, the error's traceback this frame

    gc.disable()  # one collection, below, with everything in it
    fail_holding([1, "two", (3.0,)])
    fail_holding([f"{i:0100}" for i in range(1000)])  # a large in-band pickle: a part of its own
    print("collected", gc.collect() > 0)
    """
)


@pytest.mark.timeout(60)
def test_parts_in_a_garbage_cycle_are_collected_cleanly() -> None:
    done = run_python("-X", "faulthandler", "-c", _COLLECT_HELD_PARTS, timeout=50)
    assert (done.returncode, done.stdout.strip()) == (0, "collected True"), done.stderr
    assert "Exception ignored" not in done.stderr
