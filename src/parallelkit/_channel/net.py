"""Channels across hosts: :class:`ChannelListener` and :func:`connect` over TCP.

Built on ``channel.py`` (an accepted or connected socket becomes a :class:`Channel`) and
``_wire/handshake.py`` (both ends prove they hold the key before anything is unpickled).
"""

from __future__ import annotations

import select
import socket
import threading
import time
import weakref
from types import TracebackType
from typing import Final, Generic, Self

from parallelkit._channel.channel import Channel, RecvT, SendT, _format_address
from parallelkit._util import fuzz as _fuzz
from parallelkit._util.checks import (
    check_authkey,
    check_handshake_timeout,
    check_max_message_bytes,
    check_timeout,
)
from parallelkit._wire import handshake as _handshake
from parallelkit._wire.stream import ms
from parallelkit.errors import ChannelClosedError

__all__ = ("ChannelListener", "connect")

MAX_PENDING_HANDSHAKES: Final = 256  # clients in the middle of a handshake, at most
MAX_ACCEPTS_AT_ONCE: Final = 64  # connections taken per wake-up of the listening socket


def _close_all(sock: socket.socket, pending: dict[int, _handshake.ServerHandshake]) -> None:
    sock.close()
    for shake in pending.values():
        shake.sock.close()
    pending.clear()


def connect(
    address: tuple[str, int],
    *,
    authkey: bytes,
    timeout: float | None,
    max_message_bytes: int | None,
    handshake_timeout: float,
) -> Channel[SendT, RecvT]:
    """What :meth:`Channel.connect` does."""
    key = check_authkey(authkey)
    handshake_timeout = check_handshake_timeout(handshake_timeout, "handshake_timeout")
    check_max_message_bytes(max_message_bytes)
    sock = socket.create_connection(address, timeout=check_timeout(timeout))
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = _format_address(sock.getpeername())
        _handshake.client_handshake(sock, key, handshake_timeout, peer)
    except BaseException:
        sock.close()
        raise
    return Channel(sock, max_message_bytes=max_message_bytes, peer=f"the listener at {peer}")


class ChannelListener(Generic[SendT, RecvT]):
    """A TCP listening socket that hands out authenticated :class:`Channel` ends.

    Made by :meth:`Channel.listen`; a context manager.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        address: tuple[str, int],
        *,
        authkey: bytes,
        max_message_bytes: int | None,
        handshake_timeout: float,
        backlog: int,
    ) -> None:
        self._key = check_authkey(authkey)
        self._handshake_timeout = check_handshake_timeout(handshake_timeout, "handshake_timeout")
        self._max = check_max_message_bytes(max_message_bytes)
        self._sock = socket.create_server(address, backlog=backlog)
        self._sock.setblocking(False)
        self._closed = False
        # clients whose handshake is under way, by file descriptor: accept() moves all of
        # them on at once, so a silent or slow one holds up nobody else
        self._pending: dict[int, _handshake.ServerHandshake] = {}
        self._lock = threading.Lock()  # one thread at a time drives the handshakes
        self._finalizer = weakref.finalize(self, _close_all, self._sock, self._pending)
        host, port = self._sock.getsockname()[:2]
        self._address: tuple[str, int] = (str(host), int(port))

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)`` (the real port when 0 was asked for)."""
        return self._address

    def accept(self, timeout: float | None = None) -> Channel[SendT, RecvT]:
        """Wait for a client and authenticate it.

        Handshakes run side by side: while ``accept`` waits, it accepts every client that
        connects and moves all their handshakes on at once, so a client that stays silent
        or speaks slowly holds up no other client, and each client's
        ``handshake_timeout`` measures only what the listener does for it.  Clients whose
        handshake is still under way when ``accept`` returns carry on in the next call.

        Args:
            timeout: seconds to wait for an authenticated client (``None``: forever).
                Each client's handshake is bounded by ``handshake_timeout`` on its own.

        Raises:
            TimeoutError: no client completed the handshake in time.
            multiprocessing.AuthenticationError: a client that connected has another key,
                sent garbage, or stayed silent past ``handshake_timeout`` (it is
                disconnected; the others carry on: call ``accept`` again).
            ChannelClosedError: the listener is closed.
        """
        timeout = check_timeout(timeout, zero_ok=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError(f"no client connected within {timeout:g} s")
        try:
            return self._accept(deadline, timeout)
        finally:
            self._lock.release()

    def _accept(self, deadline: float | None, timeout: float | None) -> Channel[SendT, RecvT]:
        pending = self._pending
        while True:
            if self._closed:
                raise ChannelClosedError("the listener is closed")
            now = time.monotonic()
            for fd, shake in list(pending.items()):  # silent past their own deadline
                if shake.deadline <= now:
                    del pending[fd]
                    shake.sock.close()
                    raise shake.timed_out()
            wake = min((s.deadline for s in pending.values()), default=now + 0.1)
            wake = min(wake, now + 0.1)  # and look at _closed now and then
            if deadline is not None:
                wake = min(wake, deadline)
            poller = select.poll()
            poller.register(self._sock.fileno(), select.POLLIN)
            for fd, shake in pending.items():
                poller.register(fd, select.POLLOUT if shake.wants_write else select.POLLIN)
            if _fuzz.ENABLED:
                _fuzz.point("listener.poll")
            ready = [fd for fd, _ in poller.poll(ms(wake - now))]
            if self._sock.fileno() in ready:
                ready.remove(self._sock.fileno())
                ready.extend(self._take_new_clients())  # greet them now
            for fd in ready:
                shake = pending[fd]
                try:
                    done = shake.step()
                except BaseException:
                    del pending[fd]
                    shake.sock.close()
                    raise
                if done:
                    del pending[fd]
                    conn = shake.sock
                    conn.setblocking(True)
                    return Channel(
                        conn, max_message_bytes=self._max, peer=f"the client at {shake.peer}"
                    )
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no client connected within {timeout:g} s")

    def _take_new_clients(self) -> list[int]:
        """Accept the clients that connected; their file descriptors."""
        new: list[int] = []
        for _ in range(MAX_ACCEPTS_AT_ONCE):
            if len(self._pending) >= MAX_PENDING_HANDSHAKES:
                break  # the others wait in the kernel's backlog
            try:
                conn, address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # e.g. the connection was reset before we took it
                continue
            try:
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                address_text = _format_address(address)
            except OSError:
                conn.close()
                continue
            shake = _handshake.ServerHandshake(
                conn, self._key, self._handshake_timeout, address_text
            )
            self._pending[conn.fileno()] = shake
            new.append(conn.fileno())
        return new

    def close(self) -> None:
        """Stop listening; idempotent.  Channels already accepted stay open; clients in
        the middle of their handshake are disconnected."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "listening"
        return f"<ChannelListener {state} on {_format_address(self._address)}>"
