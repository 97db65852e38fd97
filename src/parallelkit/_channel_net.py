"""Channels across hosts: :class:`ChannelListener` and :func:`connect` over TCP.

Built on :mod:`._channel` (an accepted or connected socket becomes a :class:`Channel`) and
:mod:`._handshake` (both ends prove they hold the key before anything is unpickled).
"""

from __future__ import annotations

import select
import socket
import time
import weakref
from types import TracebackType
from typing import Generic, Self

from . import _handshake
from ._channel import Channel, RecvT, SendT, _check_max, _format_address, _ms
from ._checks import check_timeout
from .errors import ChannelClosedError

__all__ = ("ChannelListener", "connect")


def connect(
    address: tuple[str, int],
    *,
    authkey: bytes,
    timeout: float | None,
    max_message_bytes: int | None,
    handshake_timeout: float,
) -> Channel[SendT, RecvT]:
    """What :meth:`Channel.connect` does."""
    key = _handshake.check_authkey(authkey)
    handshake_timeout = _handshake.check_timeout(handshake_timeout, "handshake_timeout")
    _check_max(max_message_bytes)
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
        self._key = _handshake.check_authkey(authkey)
        self._handshake_timeout = _handshake.check_timeout(handshake_timeout, "handshake_timeout")
        self._max = _check_max(max_message_bytes)
        self._sock = socket.create_server(address, backlog=backlog)
        self._closed = False
        self._finalizer = weakref.finalize(self, self._sock.close)
        host, port = self._sock.getsockname()[:2]
        self._address: tuple[str, int] = (str(host), int(port))

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)`` (the real port when 0 was asked for)."""
        return self._address

    def accept(self, timeout: float | None = None) -> Channel[SendT, RecvT]:
        """Wait for a client and authenticate it.

        Args:
            timeout: seconds to wait for a client to connect (``None``: forever).  The
                handshake itself is bounded by ``handshake_timeout``.

        Raises:
            TimeoutError: no client connected in time.
            multiprocessing.AuthenticationError: the client that connected has another key,
                sent garbage, or stayed silent past ``handshake_timeout`` (it is
                disconnected; call ``accept`` again for the next client).
            ChannelClosedError: the listener is closed.
        """
        timeout = check_timeout(timeout, zero_ok=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        while True:
            if self._closed:
                raise ChannelClosedError("the listener is closed")
            wait = 100 if deadline is None else min(100, _ms(deadline - time.monotonic()))
            if poller.poll(wait):
                try:
                    conn, address = self._sock.accept()
                except BlockingIOError:  # another thread took it
                    continue
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no client connected within {timeout:g} s")
        peer = _format_address(address)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _handshake.server_handshake(conn, self._key, self._handshake_timeout, peer)
        except BaseException:
            conn.close()
            raise
        return Channel(conn, max_message_bytes=self._max, peer=f"the client at {peer}")

    def close(self) -> None:
        """Stop listening; idempotent.  Channels already accepted stay open."""
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
