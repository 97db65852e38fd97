"""Targets for ``start_process`` in the channel tests (importable under spawn/forkserver)."""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
from multiprocessing.synchronize import Event

from parallelkit import Channel


class Blob:
    """Bytes that pickle protocol 5 sends out of band (as numpy arrays do)."""

    def __init__(self, data: bytearray | memoryview) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: object) -> tuple[object, ...]:
        return (Blob, (pickle.PickleBuffer(self.data),))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Blob) and bytes(self.data) == bytes(other.data)

    __hash__ = None  # type: ignore[assignment]  # mutable, like its bytearray


def echo(channel: Channel[object, object]) -> None:
    """Send back every message until the parent closes the channel."""
    for message in channel:
        channel.send(message)


def echo_closing(channel: Channel[object, object], other: Channel[object, object]) -> None:
    """Close our copy of the parent's end (as with a Pipe), then echo."""
    other.close()
    echo(channel)


def close_inherited(channel: Channel[object, object]) -> None:
    """Close an end inherited through fork (a thread of the parent was receiving on it)."""
    channel.close()


def count_to(channel: Channel[int, object], n: int) -> None:
    """Send 0 .. n-1, then return (which closes the channel)."""
    for i in range(n):
        channel.send(i)


def exit_with(channel: Channel[str, object], code: int) -> None:
    """Say hello, then exit at once without closing anything."""
    channel.send("ready")
    os._exit(code)


def send_forever(channel: Channel[bytes, object], size: int) -> None:
    """Send messages of ``size`` bytes until killed."""
    payload = b"k" * size
    while True:
        channel.send(payload)


def exchange(channel: Channel[bytes, bytes], size: int) -> None:
    """Send ``size`` bytes while the parent sends as many to us; then check and confirm."""
    channel.send(bytes([7]) * size)
    got = channel.recv()
    channel.send(b"ok" if got == bytes([9]) * size else b"corrupt")


def check_threaded(channel: Channel[object, tuple[int, int, bytes]]) -> None:
    """Receive (sender, seq, payload) until closed; reply with a summary (or a problem)."""
    seen: dict[int, int] = {}
    for sender, seq, payload in channel:
        if sender == -1:
            channel.send(seen)
            continue
        expected = seen.get(sender, 0)
        if seq != expected:
            channel.send(f"sender {sender}: seq {seq}, expected {expected}")
            return
        if payload != bytes([sender]) * len(payload):
            channel.send(f"sender {sender}: message {seq} corrupt")
            return
        seen[sender] = seq + 1


def fail(channel: Channel[str, object], message: str) -> None:
    """Send one message, then raise."""
    channel.send("before the error")
    raise ValueError(message)


def ignore_sigterm(channel: Channel[str, object]) -> None:
    """Ignore SIGTERM and never finish, even after the channel closes."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel.send("ignoring SIGTERM")
    while True:
        time.sleep(0.05)


def connect_and_echo(channel: Channel[str, object], address: tuple[str, int], key: bytes) -> None:
    """Connect to a listener over TCP, echo everything it sends, report success."""
    with Channel[object, object].connect(address, authkey=key, timeout=5) as remote:
        channel.send("connected")
        for message in remote:
            remote.send(message)


def answer_held(channel: Channel[object, object], release: Event) -> None:
    """Answer every message; hold the answer to ``"slow"`` until ``release`` is set."""
    for message in channel:
        if message == "slow":
            release.wait(60)
        channel.send(f"reply to {message}")


def answer_in_two_threads(channel: Channel[object, object], release: Event) -> None:
    """Two threads each receive and answer (the one that gets ``"slow"`` waits for
    ``release`` first): the replies leave in another order than the requests came."""

    def serve() -> None:
        for message in channel:
            if message == "slow":
                release.wait(60)
            channel.send(("answer", message))

    threads = [threading.Thread(target=serve) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _refuse_to_load() -> object:
    raise ValueError("this target cannot be loaded here")


class Unloadable:
    """A target that pickles but cannot be unpickled (in the child)."""

    def __call__(self, channel: Channel[object, object]) -> None:
        channel.send("loaded")

    def __reduce__(self) -> tuple[object, ...]:
        return (_refuse_to_load, ())
