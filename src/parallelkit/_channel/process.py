"""Processes that serve a channel: :func:`start_process` and :class:`ProcessChannel`.

Built on :mod:`._channel` (the parent's end is a :class:`Channel` that also owns the
child).  The child starts like every parallelkit worker (``_proc.lifecycle.start_child``
and the child main ``_proc.child.child_main``: SIGINT ignored, dies with its parent, stack
dump armed), runs :func:`serve`: ``target(channel, *args)``, and reports an exception from
it as a FAILED frame that the parent's ``recv`` turns into :class:`ChannelClosedError`
caused by that exception.
"""

from __future__ import annotations

import multiprocessing.util
import pickle
import socket
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Final, TypeVarTuple

from parallelkit._channel.channel import A, B, Channel, RecvT, SendT
from parallelkit._proc.child import EXIT_MAIN_GUARD, main_guard_note
from parallelkit._proc.lifecycle import close_process, describe_exit, start_child, stop_processes
from parallelkit._proc.logs import LogPipe, forwarded, unwatch, watch
from parallelkit._util.checks import check_callable, check_timeout, resolve_start_method
from parallelkit._util.context import get_context
from parallelkit._wire.codec import ExceptionRecord, capture_exception, dump_function
from parallelkit.errors import ChannelClosedError, SerializationError

if TYPE_CHECKING:
    from parallelkit._proc.child import StartupFailure
    from parallelkit._util.types import StartMethod

__all__ = ("ProcessChannel", "start_process")

Ts = TypeVarTuple("Ts")
CLOSE_TIMEOUT: Final = 3.0  # seconds a start_process child gets to exit after close()


class ProcessChannel(Channel[SendT, RecvT]):
    """The parent's channel to a process started by :func:`start_process`.

    Closing it (or leaving its ``with`` block) closes the channel, which the child sees as
    the end of its messages, then waits up to ``timeout`` seconds for the child to exit
    before terminating it (SIGTERM, then SIGKILL, with a :class:`ResourceWarning`).

    If the target raises, its exception reaches the parent: once the messages sent before
    it are received, ``recv()`` (and iteration) raise :class:`ChannelClosedError` whose
    ``__cause__`` is the target's exception with its own type (the child's traceback as
    *its* ``__cause__``), and :attr:`exitcode` is 1.

    .. versionadded:: 0.1
    """

    def __init__(self, sock: socket.socket, process: BaseProcess) -> None:
        super().__init__(sock, peer=f"the child process (pid {process.pid})")
        self._logs: LogPipe | None = None  # the child's log records (see _read_logs)
        self._process = process
        self._pid: int = process.pid  # type: ignore[assignment]
        self._exitcode: int | None = None
        self._stopped = False
        # fork: children started later must not keep our end open, or this child would
        # never see the end of its messages
        multiprocessing.util.register_after_fork(self, ProcessChannel._close_in_fork_child)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._pid

    @property
    def exitcode(self) -> int | None:
        """The child's exit code, ``None`` while it runs (minus the signal number if killed)."""
        if self._stopped:
            return self._exitcode
        return self._process.exitcode

    def join(self, timeout: float | None = None) -> None:
        """Wait (up to ``timeout`` seconds) for the child to exit."""
        timeout = check_timeout(timeout, zero_ok=True)
        if not self._stopped:
            self._process.join(timeout)

    def close(self, *, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close the channel and end the child: wait ``timeout`` s, then SIGTERM, SIGKILL.

        Idempotent.  Warns with :class:`ResourceWarning` when it had to terminate.
        """
        super().close()
        if self._stopped:
            return
        self._stopped = True
        process = self._process
        stop_processes([process], join_timeout=timeout, what="channel", close=False)
        if self._logs is not None:
            unwatch(self._logs)  # what it logged last
        self._exitcode = process.exitcode
        if self._exitcode is not None:
            close_process(process)

    def _read_logs(self, logs: LogPipe) -> None:
        """Pass the child's log records on: read by the hub thread as they come, and by
        ``recv`` before it returns a message the child flagged LOGGED (it sent records
        since its previous message) or says that the child ended or failed: what the
        child logged before comes first.  Not at other messages: that would be a system
        call each."""
        self._logs = logs
        watch(logs)

    def _records_first(self) -> None:
        if self._logs is not None:
            self._logs.flush()

    def _exit_note(self) -> str:
        if not self._stopped:
            self._process.join(0.2)
        code = self._exitcode if self._stopped else self._process.exitcode
        if code == EXIT_MAIN_GUARD:  # as the map engine and pipelines say it
            return f", which {main_guard_note()}"
        return f", {describe_exit(code)}"

    @staticmethod
    def _close_in_fork_child(channel: ProcessChannel[SendT, RecvT]) -> None:
        channel._closed = True
        channel._stopped = True
        channel._stream.abort()


def start_process(
    target: Callable[[Channel[B, A], *Ts], object],
    *args: *Ts,
    start_method: StartMethod | None = None,
    forward_logs: bool = True,
) -> ProcessChannel[A, B]:
    """Run ``target(channel, *args)`` in a new process; return the parent's end.

    The child starts like every parallelkit worker: it ignores SIGINT (the parent handles
    Ctrl-C) and exits when the parent dies.  ``target`` may be a lambda or a closure under
    every start method when cloudpickle is installed; ``args`` travel as
    :class:`multiprocessing.Process` arguments do (so locks and queues may be passed).

    Args:
        target: called in the child with its end of the channel, then ``args``.
        *args: further arguments for ``target``.
        start_method: ``"fork"``, ``"forkserver"``, ``"spawn"`` or ``None`` (default).
        forward_logs: the child's log records go to this process's handlers (``True``,
            the default; see :doc:`logging`); ``False`` leaves its logging alone.

    Returns:
        The parent's end; also ``.pid``, ``.exitcode`` and ``.join()``; closing it ends the
        child (see :class:`ProcessChannel`).

    Raises:
        StartMethodError: an unknown start method.
        SerializationError: ``target`` or ``args`` cannot be sent to the child.

    Example:
        A server that answers until the parent closes its end (``shout`` must be
        importable by the child under spawn and forkserver, or cloudpickle installed)::

            def shout(channel: Channel[str, str], suffix: str) -> None:
                for text in channel:
                    channel.send(text.upper() + suffix)

            with start_process(shout, "!") as child:   # ProcessChannel[str, str]
                assert child.request("hi", timeout=5) == "HI!"
    """
    check_callable(target, "target")
    method = resolve_start_method(start_method)
    context = get_context(method)
    fork = method == "fork"
    payload = None if fork else dump_function(target, what="function", by_value=True)
    parent_sock, child_sock = socket.socketpair()
    started: list[BaseProcess] = []
    logs = LogPipe() if forward_logs else None
    try:
        start_child(
            context,
            method,
            serve,
            child_sock,
            args=(args,),
            name=f"parallelkit-channel-{getattr(target, '__name__', 'target')}",
            parent_end=parent_sock,
            fn=target if fork else None,
            fn_payload=payload,
            report=report_startup_failure,
            on_started=started.append,
            logs=logs,
        )
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        parent_sock.close()
        if logs is not None:
            logs.close()
        raise SerializationError(
            f"cannot send the arguments of {getattr(target, '__qualname__', target)!r} to "
            f"the child process: {type(exc).__name__}: {exc}",
            what="argument",
        ) from exc
    except BaseException:
        if not started:
            parent_sock.close()
            if logs is not None:
                logs.close()
        raise
    finally:
        child_sock.close()
    channel: ProcessChannel[A, B] = ProcessChannel(parent_sock, started[0])
    if logs is not None:
        channel._read_logs(logs)
    return channel


def serve(
    sock: socket.socket, target: Callable[..., object], dump_fd: int, args: tuple[object, ...]
) -> None:
    """A :func:`start_process` child's role loop (run by
    :func:`parallelkit._proc.child.child_main`): ``target(channel, *args)``."""
    channel: Channel[object, object] = Channel(sock, peer="the parent process")
    records = forwarded()
    if records is not None:  # our records go to the parent: it reads them when told
        channel._announce_records(records)
    try:
        target(channel, *args)
    except SystemExit:
        channel.close()
        raise
    except ChannelClosedError:
        if not (channel._eof or channel._broken is not None):
            raise
        # the parent closed the channel (or died) while the target used it: a normal end
    except BaseException as exc:
        _send_failure(channel, capture_exception(exc))
        raise SystemExit(1) from None
    channel.close()


def report_startup_failure(sock: socket.socket, failure: StartupFailure) -> None:
    """How a :func:`start_process` child tells the parent it could not start (``target``
    cannot be unpickled): as the target's own failure, which ``recv`` raises."""
    _send_failure(Channel(sock, peer="the parent process"), failure[1])


def _send_failure(channel: Channel[object, object], record: ExceptionRecord) -> None:
    try:
        channel._send_failure(record)
    except (ChannelClosedError, OSError):
        pass  # the parent is gone or closed its end: nobody to tell
    channel.close()
