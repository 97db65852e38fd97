"""Messages whose large buffers travel out of band: a header, a pickle, the raw buffers.

A message is a small header, a pickle, and the pickle's large buffers (pickle protocol 5)
kept apart, so that a megabyte payload is copied by the kernel and nowhere else::

    part 0:        HEAD(kind, f1, f2, f3, f4, nbuf) + nbuf x SPEC(size, writable) + pickle
    parts 1..nbuf: the raw buffers

- What protocol 5 sends out of band on its own (numpy arrays, ``pickle.PickleBuffer``)
  and the large ``bytes`` and ``bytearray`` items of a list (the codec's
  ``mark_large_bytes``: the standard pickle copies them in band) are parts of their own.
- Buffers under ``OUT_OF_BAND_MIN`` stay in the pickle: one message beats several.

``Queue`` (``_queue``) speaks it over its datagrams; the header's four fields are the
caller's.  The pickle is ``bytes`` of its own, never a view of an ``io.BytesIO``
(``getbuffer()``): CPython 3.12.0 and 3.12.1 crash collecting such a view in a reference
cycle (gh-111049).
"""

from __future__ import annotations

import pickle
from typing import Any, Final

from parallelkit._wire import layouts
from parallelkit._wire.codec import OUT_OF_BAND_MIN_BYTES, dump_apart, dumps, mark_large_bytes

HEAD: Final = layouts.MESSAGE_HEAD  # kind, f1, f2, f3, f4, number of buffers
SPEC: Final = layouts.MESSAGE_SPEC  # size, writable
OUT_OF_BAND_MIN: Final = OUT_OF_BAND_MIN_BYTES  # the codec's one rule

Parts = list[Any]  # bytes-like objects: part 0, then the buffers


def encode(obj: object, kind: int, f1: int = 0, f2: int = 0, f3: int = 0, f4: int = 0) -> Parts:
    """The parts of a message carrying ``obj``.

    Raises:
        Exception: whatever pickling raised when neither pickle nor cloudpickle can send it.
    """
    try:
        marked = mark_large_bytes(obj, OUT_OF_BAND_MIN) if type(obj) is list else obj
        payload, raws = dump_apart(marked, OUT_OF_BAND_MIN)
    except Exception:
        payload, raws = dumps(obj), []  # cloudpickle, when plain pickle refuses; or raise
    separate = len(payload) >= OUT_OF_BAND_MIN  # don't copy a large in-band pickle
    head = bytearray(HEAD.size + SPEC.size * len(raws))
    # a negative count says: the pickle follows as its own part
    HEAD.pack_into(head, 0, kind, f1, f2, f3, f4, -1 - len(raws) if separate else len(raws))
    for i, raw in enumerate(raws):
        SPEC.pack_into(head, HEAD.size + SPEC.size * i, raw.nbytes, not raw.readonly)
    if separate:
        return [head, payload, *raws]
    return [head + payload, *raws]


def size(parts: Parts) -> int:
    """Bytes on the wire."""
    return sum(memoryview(p).nbytes for p in parts)


def decode(parts: Parts) -> Any:
    """The object a message carries."""
    first = parts[0]
    nbuf = HEAD.unpack_from(first)[5]
    if nbuf < 0:
        nbuf = -1 - nbuf
        return pickle.loads(parts[1], buffers=parts[2:])
    offset = HEAD.size + SPEC.size * nbuf
    return pickle.loads(memoryview(first)[offset:], buffers=parts[1:])
