"""The exceptions parallelkit raises.

Every exception is a :class:`ParallelKitError` and, where a builtin fits, that builtin
too, so ``except ValueError`` or ``except TimeoutError`` keeps working::

    ParallelKitError
     ├─ StartMethodError(ValueError)     unknown or unavailable start method
     ├─ SerializationError(TypeError)    .what ("function" | "argument" | "result"), .item_index
     ├─ WorkerCrashedError               .item_index, .pid, .exitcode, .signal
     ├─ TaskTimeoutError(TimeoutError)   .item_index, .timeout
     ├─ RemoteError                      .type_name, .remote_traceback
     ├─ PipelineError                    .stage, .item, .item_index; __cause__ is the stage's error
     ├─ ChannelClosedError(EOFError)     the other end is gone
     └─ QueueClosedError(EOFError)       every producer closed the queue and it is empty

A task's own exception is *not* wrapped: it is re-raised in the caller with its own type,
the worker's traceback attached as ``__cause__`` and a note naming the item.  Only an
exception that cannot cross the process boundary arrives as :class:`RemoteError`.

All of them pickle faithfully (attributes kept), so they may themselves cross processes.
"""

from __future__ import annotations

from typing import Literal

__all__ = (
    "ChannelClosedError",
    "ParallelKitError",
    "PipelineError",
    "QueueClosedError",
    "RemoteError",
    "SerializationError",
    "StartMethodError",
    "TaskTimeoutError",
    "WorkerCrashedError",
)

SerializedWhat = Literal["function", "argument", "result", "initializer", "finalizer"]


class ParallelKitError(Exception):
    """Base class of every exception parallelkit raises itself."""

    def __reduce__(self) -> tuple[object, ...]:
        # Rebuild without calling __init__ (subclasses take keyword-only arguments),
        # then restore the attributes; the default reduce would call cls(*args).
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(
    cls: type[ParallelKitError], args: tuple[object, ...], state: dict[str, object]
) -> ParallelKitError:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class StartMethodError(ParallelKitError, ValueError):
    """An unknown start method, or one this platform does not offer.

    The message lists the valid choices.
    """


class SerializationError(ParallelKitError, TypeError):
    """An object could not be pickled or unpickled on its way between processes.

    Attributes:
        what: which object failed: ``"function"``, ``"argument"``, ``"result"``,
            ``"initializer"`` or ``"finalizer"``.
        item_index: the position of the item in the input, or ``None`` when the
            failure is not tied to one item (the function itself).
    """

    def __init__(self, message: str, *, what: SerializedWhat, item_index: int | None = None):
        super().__init__(message)
        self.what: SerializedWhat = what
        self.item_index = item_index


class WorkerCrashedError(ParallelKitError):
    """A worker process died while it was running an item.

    Attributes:
        item_index: the item the worker was running, or ``None`` if it held none.
        pid: the dead worker's process id.
        exitcode: its exit code (negative: killed by that signal), or ``None``.
        signal: the name of the signal that killed it (``"SIGKILL"``), or ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        item_index: int | None = None,
        pid: int | None = None,
        exitcode: int | None = None,
        signal: str | None = None,
    ):
        super().__init__(message)
        self.item_index = item_index
        self.pid = pid
        self.exitcode = exitcode
        self.signal = signal


class TaskTimeoutError(ParallelKitError, TimeoutError):
    """An item ran longer than its ``timeout``; its worker was stopped and replaced.

    Attributes:
        item_index: the item that ran too long.
        timeout: the limit in seconds.
    """

    def __init__(self, message: str, *, item_index: int | None, timeout: float):
        super().__init__(message)
        self.item_index = item_index
        self.timeout = timeout


class RemoteError(ParallelKitError):
    """A task's exception that could not be sent back or rebuilt in this process.

    Attributes:
        type_name: the qualified name of the original exception's class.
        remote_traceback: the traceback text from the worker.
    """

    def __init__(self, message: str, *, type_name: str, remote_traceback: str):
        super().__init__(message)
        self.type_name = type_name
        self.remote_traceback = remote_traceback


class PipelineError(ParallelKitError):
    """A pipeline stage failed; ``__cause__`` is the stage's own error.

    Attributes:
        stage: the name of the stage that failed (``"source"`` when the source iterator
            raised or held an item that cannot be sent).
        item: the item the stage failed on, when it is known and could be sent back
            (``None`` otherwise).
        item_index: the item's position in the source, when the first stage failed on it
            (later stages see items the source never held, so ``None`` there).
    """

    def __init__(
        self,
        message: str,
        *,
        stage: str,
        item: object = None,
        item_index: int | None = None,
    ):
        super().__init__(message)
        self.stage = stage
        self.item = item
        self.item_index = item_index


class ChannelClosedError(ParallelKitError, EOFError):
    """The other end of a channel is gone (closed, exited or killed)."""


class QueueClosedError(ParallelKitError, EOFError):
    """Every producer closed the :class:`~parallelkit.Queue`, and it is empty."""
