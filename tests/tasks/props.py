"""Task functions for the property tests in ``test_properties.py``.

They live at module level in their own module so that spawn and forkserver workers can
import them by name (pytest puts ``tests/`` on ``sys.path``, and multiprocessing passes
``sys.path`` on to the children it starts).

A *task* is ``(value, kind)``: ``kind`` says whether :func:`run_task` returns
``square(value)`` or raises, and which exception, so a test can place failures at any
position and know exactly what each slot must hold.
"""

from __future__ import annotations

from typing import Final, Literal, TypeAlias

Kind: TypeAlias = Literal["ok", "value", "custom"]
Task: TypeAlias = tuple[int, Kind]

KINDS: Final[tuple[Kind, ...]] = ("ok", "value", "custom")
FAILING_KINDS: Final[tuple[Kind, ...]] = ("value", "custom")


class ItemError(Exception):
    """A task failure whose constructor takes required arguments besides the message.

    The engine must rebuild it faithfully in the parent: same type, message and
    attributes, although ``ItemError(*exc.args)`` would not work.
    """

    def __init__(self, value: int, reason: str) -> None:
        super().__init__(f"item {value} failed: {reason}")
        self.value = value
        self.reason = reason


def square(x: int) -> int:
    """``x * x``: the plain function the fan-out properties map."""
    return x * x


def value_error_message(value: int) -> str:
    """The message of the ``ValueError`` that a ``(value, "value")`` task raises."""
    return f"bad value {value}"


CUSTOM_REASON: Final = "custom failure"
"""The ``reason`` of the :class:`ItemError` that a ``(value, "custom")`` task raises."""


def run_task(task: Task) -> int:
    """``square(value)`` for an ``"ok"`` task; raise the task's exception otherwise."""
    value, kind = task
    if kind == "value":
        raise ValueError(value_error_message(value))
    if kind == "custom":
        raise ItemError(value, CUSTOM_REASON)
    return square(value)
