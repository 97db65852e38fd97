"""The schedule fuzzer: random short delays at the points where processes race.

Off unless the environment variable ``PARALLELKIT_FUZZ`` is set (children inherit it), and
then free at every call site that guards itself with ``if ENABLED:``::

    from parallelkit._util import fuzz as _fuzz
    ...
    if _fuzz.ENABLED:
        _fuzz.point("engine.before_read")

``PARALLELKIT_FUZZ=SEED[:MAX_MS[:PERCENT]]`` -- for example ``7``, ``7:5`` or ``7:5:30``:
at each call of :func:`point`, with probability ``PERCENT`` (default 25) the calling
thread sleeps for up to ``MAX_MS`` milliseconds (default 3). Whether and how long is a
pure function of the seed, the process's name (``ForkProcess-2``, ``MainProcess``), the
thread's name, the point's name and how many times this thread of this process has passed
that point. So a run with the same seed makes the same decisions at the same places: a
failing schedule replays exactly as far as the program's own order of events is the same
(the operating system's scheduling still varies around the delays).

``PARALLELKIT_FUZZ_LOG=PATH`` appends one line per delay taken (pid, process, thread,
point, occurrence, milliseconds) to ``PATH``, to see which schedule a failure ran.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Final

ENV: Final = "PARALLELKIT_FUZZ"
LOG_ENV: Final = "PARALLELKIT_FUZZ_LOG"
DEFAULT_MAX_MS: Final = 3.0
DEFAULT_PERCENT: Final = 25.0


def parse(spec: str) -> tuple[str, float, float]:
    """``"SEED[:MAX_MS[:PERCENT]]"`` -> ``(seed, max_ms, percent)``; ValueError if malformed."""
    parts = spec.split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(f"{ENV}={spec!r}: expected SEED[:MAX_MS[:PERCENT]], e.g. '7:5:30'")
    try:
        max_ms = float(parts[1]) if len(parts) > 1 else DEFAULT_MAX_MS
        percent = float(parts[2]) if len(parts) > 2 else DEFAULT_PERCENT
    except ValueError:
        raise ValueError(
            f"{ENV}={spec!r}: in SEED[:MAX_MS[:PERCENT]], MAX_MS and PERCENT are numbers"
        ) from None
    if not (max_ms >= 0 and 0 <= percent <= 100):
        raise ValueError(
            f"{ENV}={spec!r}: in SEED[:MAX_MS[:PERCENT]], MAX_MS must be >= 0 "
            "and PERCENT within 0..100"
        )
    return parts[0], max_ms, percent


_spec = os.environ.get(ENV, "")
ENABLED: Final = bool(_spec)
_seed, _max_ms, _percent = parse(_spec) if ENABLED else ("", 0.0, 0.0)
_log_path = os.environ.get(LOG_ENV) or None
_counts: dict[tuple[int, str], int] = {}  # (thread id, point) -> occurrences so far
_counts_lock = threading.Lock()


def _reset_after_fork() -> None:
    global _counts_lock
    _counts.clear()
    _counts_lock = threading.Lock()


if ENABLED:
    os.register_at_fork(after_in_child=_reset_after_fork)


def delay_for(
    seed: str,
    process: str,
    thread: str,
    name: str,
    occurrence: int,
    *,
    max_ms: float = DEFAULT_MAX_MS,
    percent: float = DEFAULT_PERCENT,
) -> float:
    """Seconds to sleep at this passing of a point (0.0: none); deterministic."""
    import hashlib  # noqa: PLC0415 - only when fuzzing: a spawned worker imports this module

    key = f"{seed}|{process}|{thread}|{name}|{occurrence}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    draw = int.from_bytes(digest[:4], "little") / 2**32  # uniform in [0, 1)
    if draw * 100 >= percent:
        return 0.0
    size = int.from_bytes(digest[4:], "little") / 2**32
    return size * max_ms / 1000


def point(name: str) -> None:
    """A race point: when the fuzzer is on, maybe sleep a little here (see the module doc)."""
    if not ENABLED:
        return
    import multiprocessing  # noqa: PLC0415 - only when fuzzing; already loaded by callers

    thread = threading.current_thread()
    key = (thread.ident or 0, name)
    with _counts_lock:
        occurrence = _counts.get(key, 0)
        _counts[key] = occurrence + 1
    process = multiprocessing.current_process().name
    seconds = delay_for(
        _seed, process, thread.name, name, occurrence, max_ms=_max_ms, percent=_percent
    )
    if seconds <= 0:
        return
    if _log_path is not None:
        line = f"{os.getpid()} {process} {thread.name} {name} {occurrence} {seconds * 1000:.3f}\n"
        with open(_log_path, "a", encoding="utf-8") as log:
            log.write(line)
    time.sleep(seconds)
