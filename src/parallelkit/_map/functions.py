"""What an engine's workers are sent to run: the initializer and finalizer, the functions, an
inherited input.

::

    Job(fn) ──register(fn)──▶ (fn id, payload) ──▶ Dispatcher: the payload goes with a
                                                    worker's first chunk of fn, the id always

Each function is pickled once per engine (by reference under fork, by value otherwise) and
remembered, weakly, for as long as it lives.  Under fork the function and input of a
one-shot call are not pickled at all: the workers inherit them.  :class:`FunctionRegistry`
owns the payloads and, until :meth:`~FunctionRegistry.release`, its references to the
caller's inherited function and input.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

from parallelkit._util.types import StartMethod
from parallelkit._wire.codec import FunctionCache, dump_function, dumps
from parallelkit.errors import SerializationError

_fn_ids = itertools.count(1)  # unique in the process: a worker's cache never mixes two up


class FunctionRegistry:
    """The functions of one engine, pickled once each (see the module docstring)."""

    def __init__(
        self,
        *,
        start_method: StartMethod,
        initializer: Callable[..., object] | None,
        initargs: tuple[object, ...],
        inherit: tuple[Callable[..., object], Sequence[Any] | None] | None,
        finalizer: Callable[..., object] | None = None,
        finalargs: tuple[object, ...] = (),
    ) -> None:
        self.by_value = start_method != "fork"
        self.init_payload: bytes | None = None
        if initializer is not None or finalizer is not None:
            if initializer is not None:
                dump_function(initializer, what="initializer", by_value=self.by_value)
            if finalizer is not None:
                dump_function(finalizer, what="finalizer", by_value=self.by_value)
            try:
                self.init_payload = dumps(
                    (initializer, tuple(initargs), finalizer, tuple(finalargs))
                )
            except Exception as exc:
                raise SerializationError(
                    "cannot send initargs or finalargs to worker processes: "
                    f"{type(exc).__name__}: {exc}",
                    what="initializer",
                ) from exc
        # fork: the function (and the input) are inherited by the workers, never pickled
        self.inherited_fn: Callable[..., object] | None = None
        self.inherited_fn_id = 0
        self.inherited_items: Sequence[Any] | None = None
        if inherit is not None and start_method == "fork":
            self.inherited_fn, self.inherited_items = inherit
            self.inherited_fn_id = next(_fn_ids)
        # (id, payload) of each function sent, for as long as the function lives (weakly)
        self.cache: FunctionCache[tuple[int, bytes]] = FunctionCache()

    def register(self, fn: Callable[..., object]) -> tuple[int, bytes]:
        """``fn``'s id and what a worker is sent to load it (empty: it inherited it)."""
        if fn is self.inherited_fn:
            return self.inherited_fn_id, b""
        known = self.cache.get(fn)
        if known is not None:
            return known
        payload = dump_function(fn, by_value=self.by_value)
        fn_id = next(_fn_ids)
        self.cache.put(fn, (fn_id, payload))
        return fn_id, payload

    def inherited(self) -> tuple[dict[int, Callable[..., object]], Sequence[Any] | None] | None:
        """What a worker forked now inherits: ``({id: function}, input)``, or ``None``."""
        if self.inherited_fn is None:
            return None
        return {self.inherited_fn_id: self.inherited_fn}, self.inherited_items

    def release(self) -> None:
        """Drop the caller's inherited function and input: not ours to keep."""
        self.inherited_fn = self.inherited_items = None
