"""An RPC worker over a channel: a child process that serves calls, one at a time.

The parent sends ``(method, args)`` requests and gets ``("ok", result)`` or
``("error", message)`` replies; the worker keeps its state (here, a key-value store)
between calls.  Closing the channel ends the worker.  Run it with
``python examples/rpc_worker.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import parallelkit as pk

Request = tuple[str, tuple[object, ...]]
Reply = tuple[str, object]


def serve(channel: pk.Channel[Reply, Request]) -> None:
    """The worker: answer each request until the parent closes the channel."""
    store: dict[str, object] = {}

    def put(key: str, value: object) -> None:
        store[key] = value

    def get(key: str) -> object:
        return store[key]

    methods: dict[str, Callable[..., object]] = {"put": put, "get": get, "pid": os.getpid}
    for method, args in channel:
        try:
            channel.send(("ok", methods[method](*args)))
        except Exception as exc:  # a failed call is a reply, not the end of the worker
            channel.send(("error", f"{type(exc).__name__}: {exc}"))


class Client:
    """The parent's side: each method is one round trip."""

    def __init__(self, channel: pk.ProcessChannel[Request, Reply]) -> None:
        self._channel = channel

    def call(self, method: str, *args: object) -> object:
        status, value = self._channel.request((method, args), timeout=10)
        if status == "error":
            raise RuntimeError(f"remote {method}() failed: {value}")
        return value


def main() -> None:
    with pk.start_process(serve) as channel:
        client = Client(channel)
        print(f"worker pid differs from ours: {client.call('pid') != os.getpid()}")
        client.call("put", "answer", 42)
        client.call("put", "items", [1, 2, 3])
        print(f"get('answer') -> {client.call('get', 'answer')}")
        print(f"get('items') -> {client.call('get', 'items')}")
        try:
            client.call("get", "missing")
        except RuntimeError as exc:
            print(exc)
        pid = channel.pid
    print(f"worker {'exited' if channel.exitcode is not None else 'still running'}")
    assert pid is not None


if __name__ == "__main__":
    main()
