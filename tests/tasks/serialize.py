"""Functions and exceptions for test_serialize, importable by spawn and forkserver children."""

from __future__ import annotations

import threading
from multiprocessing.connection import Connection
from typing import NoReturn

from parallelkit._wire.codec import capture_exception


def double(x: int) -> int:
    return 2 * x


def raise_it(exc: BaseException) -> NoReturn:
    raise exc


class NeedsArgs(Exception):
    """Its constructor takes required arguments that are not its ``args``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"code {code}: {reason}")
        self.code = code
        self.reason = reason


class KeywordOnly(Exception):
    """Its constructor takes a keyword-only argument."""

    def __init__(self, *, limit: int) -> None:
        super().__init__(f"over the limit of {limit}")
        self.limit = limit


class HoldsLock(Exception):
    """Cannot cross processes: it holds a lock, which neither pickle nor cloudpickle sends."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class BrokenStr(Exception):
    """``str()`` of it raises."""

    def __str__(self) -> str:
        raise RuntimeError("no str for you")


def capture_in_child(conn: Connection, code: int, reason: str) -> None:
    """Raise :class:`NeedsArgs` in this (child) process and send back its record."""
    try:
        raise NeedsArgs(code, reason)
    except NeedsArgs as exc:
        conn.send(capture_exception(exc))
    finally:
        conn.close()
