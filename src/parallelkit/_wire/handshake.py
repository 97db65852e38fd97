"""Mutual challenge/response authentication for channels across hosts.

Both ends prove that they hold the same key before a single byte of pickle is read::

    listener ──MAGIC + server nonce (32 B)──────────────────────────▶ client
    listener ◀──HMAC(key, "client" + server nonce) + client nonce── client
    listener ──OK + HMAC(key, "server" + client nonce)─────────────▶ client   (or FAIL)

Every message has a fixed size, so nothing a peer sends before it is authenticated is
parsed as a length or allocated; every read has a deadline, so a silent or wrong peer is
an :class:`multiprocessing.AuthenticationError` within ``timeout`` seconds on both sides,
never a hang.  The digests are HMAC-SHA256 compared in constant time.  The key is never
sent, but nothing is encrypted: the connection itself can be read by anyone on the path.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import socket
import time
from multiprocessing import AuthenticationError
from typing import Final

DEFAULT_HANDSHAKE_TIMEOUT: Final = 5.0
# The protocol's version is in the greeting: 2 tags requests and replies with an id; 3
# sends the codec's out-of-band buffers (a list of large bytes among them) apart.
MAGIC_PREFIX: Final = b"parallelkit-channel-"
MAGIC: Final = MAGIC_PREFIX + b"3\n"
NONCE_BYTES: Final = 32
DIGEST_BYTES: Final = 32
OK: Final = b"OK\x00\x00"
FAIL: Final = b"FAIL"


def _digest(key: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.digest(key, role + nonce, "sha256")


def _recv_exact(sock: socket.socket, size: int, deadline: float, timeout: float) -> bytes:
    data = bytearray()
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)


def _failed(what: str, timeout: float, exc: BaseException) -> AuthenticationError:
    if isinstance(exc, TimeoutError):
        return AuthenticationError(f"{what} did not complete the handshake within {timeout:g} s")
    if isinstance(exc, EOFError):
        return AuthenticationError(f"{what} closed the connection during the handshake")
    return AuthenticationError(f"{what}: handshake failed: {type(exc).__name__}: {exc}")


def server_handshake(sock: socket.socket, key: bytes, timeout: float, peer: str) -> None:
    """Authenticate the client on ``sock`` (listener side); leaves ``sock`` blocking.

    Raises:
        multiprocessing.AuthenticationError: a wrong key, garbage, or no answer in time.
    """
    deadline = time.monotonic() + timeout
    nonce = os.urandom(NONCE_BYTES)
    try:
        sock.settimeout(timeout)
        sock.sendall(MAGIC + nonce)
        answer = _recv_exact(sock, DIGEST_BYTES + NONCE_BYTES, deadline, timeout)
    except (OSError, EOFError) as exc:
        raise _failed(f"the client {peer}", timeout, exc) from None
    if not hmac.compare_digest(answer[:DIGEST_BYTES], _digest(key, b"client", nonce)):
        try:
            sock.settimeout(1.0)
            sock.sendall(FAIL)
        except OSError:
            pass
        raise AuthenticationError(
            f"the client {peer} did not prove that it holds the key (a wrong authkey, or not "
            "a parallelkit channel client); connection refused"
        )
    try:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        sock.sendall(OK + _digest(key, b"server", answer[DIGEST_BYTES:]))
    except OSError as exc:
        raise _failed(f"the client {peer}", timeout, exc) from None
    sock.settimeout(None)


class ServerHandshake:
    """The listener's side of the handshake with one client, on a non-blocking socket.

    :meth:`step` moves it on as far as the socket allows without waiting, so that one
    thread can run the handshakes of many clients side by side (see ``ChannelListener``).
    """

    def __init__(self, sock: socket.socket, key: bytes, timeout: float, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.deadline = time.monotonic() + timeout
        self._key = key
        self._timeout = timeout
        self._nonce = os.urandom(NONCE_BYTES)
        self._out = bytearray(MAGIC + self._nonce)
        self._answer = bytearray()
        self._accepted = False

    @property
    def wants_write(self) -> bool:
        """Whether what we send is not all out yet (wait for room, not for data)."""
        return bool(self._out)

    def step(self) -> bool:
        """Send and receive what can be, without waiting; True once the client is in.

        Raises:
            multiprocessing.AuthenticationError: a wrong key, garbage, or the client left.
        """
        what = f"the client {self.peer}"
        try:
            if self._out:
                del self._out[: self.sock.send(self._out)]
                if self._out:
                    return False
                if self._accepted:
                    return True
            need = DIGEST_BYTES + NONCE_BYTES - len(self._answer)
            chunk = self.sock.recv(need)
            if not chunk:
                raise EOFError
            self._answer += chunk
        except BlockingIOError:
            return False
        except (OSError, EOFError) as exc:
            raise _failed(what, self._timeout, exc) from None
        if len(self._answer) < DIGEST_BYTES + NONCE_BYTES:
            return False
        answer = bytes(self._answer)
        if not hmac.compare_digest(
            answer[:DIGEST_BYTES], _digest(self._key, b"client", self._nonce)
        ):
            with contextlib.suppress(OSError):
                self.sock.send(FAIL)
            raise AuthenticationError(
                f"{what} did not prove that it holds the key (a wrong authkey, or not "
                "a parallelkit channel client); connection refused"
            )
        self._accepted = True
        self._out = bytearray(OK + _digest(self._key, b"server", answer[DIGEST_BYTES:]))
        return self.step()

    def timed_out(self) -> AuthenticationError:
        """The error for a client that did not complete the handshake in time."""
        return _failed(f"the client {self.peer}", self._timeout, TimeoutError())


def client_handshake(sock: socket.socket, key: bytes, timeout: float, peer: str) -> None:
    """Authenticate the listener on ``sock`` (client side); leaves ``sock`` blocking.

    Raises:
        multiprocessing.AuthenticationError: a wrong key, not a parallelkit listener, or no
            answer in time.
    """
    deadline = time.monotonic() + timeout
    what = f"the listener at {peer}"
    try:
        hello = _recv_exact(sock, len(MAGIC) + NONCE_BYTES, deadline, timeout)
        if not hello.startswith(MAGIC):
            if hello.startswith(MAGIC_PREFIX):
                version = hello[len(MAGIC_PREFIX) :].split(b"\n")[0].decode("ascii", "replace")
                raise AuthenticationError(
                    f"{what} speaks version {version} of the channel protocol, we speak "
                    f"{MAGIC[len(MAGIC_PREFIX) :].strip().decode()}: use the same parallelkit "
                    "version on both ends"
                )
            raise AuthenticationError(f"{what} is not a parallelkit channel listener")
        nonce = os.urandom(NONCE_BYTES)
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        sock.sendall(_digest(key, b"client", hello[len(MAGIC) :]) + nonce)
        reply = _recv_exact(sock, len(OK), deadline, timeout)
        if reply != OK:
            raise AuthenticationError(f"{what} refused our key (the authkeys differ)")
        proof = _recv_exact(sock, DIGEST_BYTES, deadline, timeout)
    except (OSError, EOFError) as exc:
        raise _failed(what, timeout, exc) from None
    if not hmac.compare_digest(proof, _digest(key, b"server", nonce)):
        raise AuthenticationError(f"{what} did not prove that it holds the key")
    sock.settimeout(None)
