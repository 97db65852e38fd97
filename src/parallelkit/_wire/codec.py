"""Everything that crosses a process boundary goes through here.

- :func:`dumps` pickles with the highest protocol and falls back to cloudpickle (when
  installed) for what the standard pickle cannot send: lambdas, closures, local classes.
- :func:`dump_function` is the pre-flight check of a task's function, run in the caller
  before any worker starts; it raises :class:`SerializationError` that says how to fix it.
- :class:`ExceptionRecord` carries a task's exception and its traceback text from a
  worker to the parent, where :func:`rebuild_exception` restores it with its own type
  (or as :class:`RemoteError` when that is impossible).
"""

from __future__ import annotations

import contextlib
import io
import pickle
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, Generic, NamedTuple, TypeVar, cast

from parallelkit.errors import RemoteError, SerializationError, SerializedWhat

PROTOCOL: Final = pickle.HIGHEST_PROTOCOL
# The one rule for what travels out of band (see dump_apart): contiguous buffers this large
# go apart from the pickle -- through shared memory, read from the peer, or written to the
# socket from their own memory -- instead of being copied into it.
OUT_OF_BAND_MIN_BYTES: Final = 64 * 1024
ARENA_MIN_BYTES: Final = OUT_OF_BAND_MIN_BYTES
SCAN_LIMIT: Final = 64  # items: large bytes are looked for only in lists this short


class NoRoom(Exception):
    """A large buffer found no room in shared memory (``_wire.arena.ResultWriter.dump``)."""


FUNCTION_CACHE_SIZE: Final = 256  # callables whose pickle a FunctionCache keeps, at most
_V = TypeVar("_V")

_CLOUDPICKLE_HINT = (
    "install cloudpickle (pip install 'parallelkit[cloudpickle]') to send it by value, "
    "or define it at the top level of an importable module"
)


def _cloudpickle() -> Any | None:
    try:
        import cloudpickle  # noqa: PLC0415 - optional extra, imported lazily
    except ImportError:
        return None
    return cloudpickle


def dumps(obj: object) -> bytes:
    """Pickle ``obj``; fall back to cloudpickle for what plain pickle refuses.

    Raises:
        Exception: whatever pickling raised when neither serializer can send ``obj``.
    """
    try:
        return pickle.dumps(obj, PROTOCOL)
    except Exception:
        cp = _cloudpickle()
        if cp is None:
            raise
        return bytes(cp.dumps(obj, PROTOCOL))


# ---------------------------------------------------------------- out of band


class _LargeBytes:
    """Stands for a large ``bytes`` / ``bytearray`` item, to send its data out of band.

    (Protocol 5 hands out a ``bytearray``'s memory but copies a ``bytes`` into the pickle;
    a list of large ``bytes`` -- a batch of payloads -- would be copied whole.)
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: object) -> tuple[Any, ...]:
        rebuild = _as_bytes if type(self.data) is bytes else _as_bytearray
        return (rebuild, (pickle.PickleBuffer(self.data),))


def _as_bytes(buffer: Any) -> bytes:
    return buffer if type(buffer) is bytes else bytes(buffer)


def _as_bytearray(buffer: Any) -> bytearray:
    return buffer if type(buffer) is bytearray else bytearray(buffer)


def mark_large_bytes(values: Sequence[Any], limit: int) -> Sequence[Any]:
    """``values`` with its ``bytes``/``bytearray`` items of ``limit`` bytes or more marked
    to travel out of band through :func:`dump_apart` (lists of ``SCAN_LIMIT`` items at most)."""
    if not has_large_bytes(values, limit):
        return values
    return [
        _LargeBytes(x) if (type(x) is bytes or type(x) is bytearray) and len(x) >= limit else x
        for x in values
    ]


def has_large_bytes(values: Sequence[Any], limit: int) -> bool:
    """Whether ``values`` has a ``bytes``/``bytearray`` item of ``limit`` bytes or more.

    Only lists of ``SCAN_LIMIT`` items at most are looked at (longer ones: ``False``): the
    look would cost more than it saves on a long list of small items.
    """
    if len(values) > SCAN_LIMIT:
        return False
    for x in values:  # noqa: SIM110 - a plain loop costs less than any() over a generator
        if (type(x) is bytes or type(x) is bytearray) and len(x) >= limit:
            return True
    return False


def dump_apart(obj: Any, limit: int) -> tuple[bytes, list[memoryview]]:
    """Pickle ``obj`` with protocol 5; contiguous buffers of ``limit`` bytes or more are left
    out and returned (views of ``obj``'s own memory), in the unpickler's order.

    Raises:
        Exception: whatever pickling raised (no cloudpickle fallback here).
    """
    raws: list[memoryview] = []
    return pickle.dumps(obj, 5, buffer_callback=keep_apart(raws, limit)), raws


class Strided:
    """A non-contiguous numpy array of ``limit`` bytes or more, to travel out of band like a
    contiguous buffer: whoever places the buffers copies it with one strided copy
    (:meth:`copy_into`) instead of pickling it in band, and the receiver rebuilds it
    C-contiguous (:func:`_rebuild_array`), as numpy's own in-band pickle would."""

    __slots__ = ("array", "nbytes")

    def __init__(self, array: Any) -> None:
        self.array = array
        self.nbytes: int = array.nbytes

    def copy_into(self, target: memoryview) -> None:
        """Write the array's elements, in C order, into ``target`` (``nbytes`` long)."""
        np = sys.modules["numpy"]  # loaded: the array is numpy's
        array = self.array
        np.copyto(np.ndarray(array.shape, array.dtype, buffer=target), array, casting="no")


def _rebuild_array(buffer: Any, dtype: Any, shape: tuple[int, ...]) -> Any:
    import numpy as np  # noqa: PLC0415 - a numpy array arrived: numpy is there

    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


class _ArrayPickler(pickle.Pickler):
    """Protocol 5, where non-contiguous numpy arrays of ``limit`` bytes or more are offered
    out of band too (as :class:`Strided`); numpy pickles them in band.  ``take(buffer)``
    says whether it took a buffer (a contiguous ``memoryview`` of ``limit`` bytes or more,
    or a ``Strided``) out of band; a ``Strided`` it refuses raises :class:`NoRoom`."""

    def __init__(
        self,
        file: io.BytesIO,
        limit: int,
        take: Callable[[memoryview | Strided], bool],
        ndarray: type[Any],
    ) -> None:
        self._limit = limit
        self._ndarray = ndarray
        self._strided: dict[int, tuple[pickle.PickleBuffer, Any]] = {}
        # The callback is a closure, not a bound method: the pickler holding its own method
        # would be a reference cycle, and its memo (every object pickled) would outlive the
        # dump until a garbage collection -- a submitted argument kept alive after its task.
        super().__init__(file, 5, buffer_callback=_array_buffers(self._strided, limit, take))

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is not self._ndarray:  # not a subclass: its own state may not go
            return NotImplemented
        flags = obj.flags
        if flags.c_contiguous or flags.f_contiguous or obj.nbytes < self._limit:
            return NotImplemented  # numpy's own reduction: out of band already, or small
        if obj.dtype.hasobject:
            return NotImplemented  # objects are pickled one by one
        # Pickle refuses a PickleBuffer of non-contiguous memory before it asks the
        # callback: an empty one stands in for the array, and always goes out of band
        # (writable: the array is rebuilt on a copy, writable as numpy's in-band one is).
        marker = pickle.PickleBuffer(bytearray())
        self._strided[id(marker)] = (marker, obj)  # held: its id stays unique
        return _rebuild_array, (marker, obj.dtype, obj.shape)


def _array_buffers(
    strided: dict[int, tuple[pickle.PickleBuffer, Any]],
    limit: int,
    take: Callable[[memoryview | Strided], bool],
) -> Callable[[pickle.PickleBuffer], bool]:
    """:class:`_ArrayPickler`'s ``buffer_callback``: a stand-in for a strided array goes to
    ``take`` as a :class:`Strided` (or raises :class:`NoRoom`), other buffers by the rule."""

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        held = strided.pop(id(buffer), None)
        if held is not None and held[0] is buffer:
            if not take(Strided(held[1])):
                raise NoRoom  # the stand-in cannot go in band
            return False
        raw = _apart(buffer, limit)
        return raw is None or not take(raw)

    return out_of_band


def numpy_array_type() -> type[Any] | None:
    """``numpy.ndarray`` if numpy is loaded (it is never imported here), else ``None``."""
    return getattr(sys.modules.get("numpy"), "ndarray", None)


def has_strided_array(values: Sequence[Any], limit: int) -> bool:
    """Whether ``values`` (``SCAN_LIMIT`` items at most, else ``False``) has a non-contiguous
    numpy array of ``limit`` bytes or more, as an item or in a tuple item."""
    ndarray = numpy_array_type()
    if ndarray is None or len(values) > SCAN_LIMIT:
        return False
    for value in values:
        for part in value if type(value) is tuple else (value,):
            if type(part) is ndarray and part.nbytes >= limit and not part.dtype.hasobject:
                flags = part.flags
                if not (flags.c_contiguous or flags.f_contiguous):
                    return True
    return False


def dump_arrays(
    obj: Any, limit: int, take: Callable[[memoryview | Strided], bool], ndarray: type[Any]
) -> bytes:
    """Pickle ``obj`` with protocol 5, offering ``take`` every buffer of ``limit`` bytes or
    more, non-contiguous numpy arrays (``ndarray``) as :class:`Strided`.

    Raises:
        NoRoom: ``take`` refused a ``Strided`` (which cannot go in band this way).
        Exception: whatever pickling raised.
    """
    out = io.BytesIO()
    _ArrayPickler(out, limit, take, ndarray).dump(obj)
    return out.getvalue()


def dump_apart_arrays(obj: Any, limit: int) -> tuple[bytes, list[memoryview | Strided]]:
    """:func:`dump_apart`, where non-contiguous numpy arrays of ``limit`` bytes or more also
    go apart, as :class:`Strided` (when numpy is loaded; it is never imported here).

    Raises:
        Exception: whatever pickling raised (no cloudpickle fallback here).
    """
    ndarray = numpy_array_type()
    if ndarray is None:  # no numpy array can be in ``obj``
        payload, plain = dump_apart(obj, limit)
        return payload, cast("list[memoryview | Strided]", plain)
    raws: list[memoryview | Strided] = []

    def take(raw: memoryview | Strided) -> bool:
        raws.append(raw)
        return True

    return dump_arrays(obj, limit, take, ndarray), raws


def keep_apart(raws: list[memoryview], limit: int) -> Callable[[pickle.PickleBuffer], bool]:
    """The one rule as a protocol-5 ``buffer_callback``: a contiguous buffer of ``limit``
    bytes or more is appended to ``raws`` (a view of its memory) and left out of the
    pickle; the others stay in it."""

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        raw = _apart(buffer, limit)
        if raw is None:
            return True
        raws.append(raw)
        return False

    return out_of_band


def _apart(buffer: pickle.PickleBuffer, limit: int) -> memoryview | None:
    """The one rule: a view of ``buffer``'s memory if it goes out of band (contiguous and
    ``limit`` bytes or more), else ``None`` (it stays in the pickle)."""
    try:
        raw = buffer.raw()
    except BufferError:  # not contiguous: in band
        return None
    return raw if raw.nbytes >= limit else None


def _main_is_importable() -> bool:
    main = sys.modules.get("__main__")
    return bool(getattr(main, "__file__", None)) or bool(getattr(main, "__spec__", None))


def dump_function(
    fn: object, *, what: SerializedWhat = "function", by_value: bool = False
) -> bytes:
    """Pickle a task's callable for the workers, or say clearly why it cannot be sent.

    Args:
        fn: the callable.
        what: how the error names it (``"function"`` or ``"initializer"``).
        by_value: the workers cannot import ``__main__`` (spawn or forkserver from an
            interactive session), so a ``__main__`` function must travel by value.

    Raises:
        SerializationError: ``fn`` cannot be pickled (with a hint to fix it).
    """
    # a partial or a parallelkit.star(...) of a __main__ function is as much __main__'s
    modules = (
        getattr(fn, "__module__", None),
        getattr(getattr(fn, "func", None), "__module__", None),
    )
    needs_value = by_value and "__main__" in modules and not _main_is_importable()
    if not needs_value:
        try:
            return pickle.dumps(fn, PROTOCOL)
        except Exception as exc:
            first_error: Exception | None = exc
    else:
        first_error = None
    cp = _cloudpickle()
    name = getattr(fn, "__qualname__", None) or repr(fn)
    if cp is None:
        reason = (
            f"{type(first_error).__name__}: {first_error}"
            if first_error is not None
            else "it is defined in __main__, which the worker processes cannot import"
        )
        raise SerializationError(
            f"cannot send the {what} {name!r} to worker processes: {reason}; {_CLOUDPICKLE_HINT}",
            what=what,
        ) from first_error
    try:
        return bytes(cp.dumps(fn, PROTOCOL))
    except Exception as exc:
        raise SerializationError(
            f"cannot send the {what} {name!r} to worker processes, even with cloudpickle: "
            f"{type(exc).__name__}: {exc}",
            what=what,
        ) from exc


class FunctionCache(Generic[_V]):
    """What was made of each callable (its pickle), for as long as the callable lives.

    It holds no strong reference to a callable: an entry goes when what it was made from is
    collected, so a pool that served a function does not keep it (or anything it refers
    to) alive.  A bound method is a new object each time ``obj.method`` is read: its entry
    is keyed by ``obj`` and the function, both weakly, so reading it again finds the entry
    and the entry does not keep ``obj`` alive.  Callables that cannot be referenced weakly
    (``operator.itemgetter(1)``) are not cached: they are pickled again for each call.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[int, ...], tuple[tuple[weakref.ref[Any], ...], _V]] = {}

    @staticmethod
    def _parts(fn: Callable[..., object]) -> tuple[object, ...]:
        if isinstance(fn, types.MethodType):
            return (fn.__self__, fn.__func__)
        return (fn,)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, fn: Callable[..., object]) -> _V | None:
        parts = self._parts(fn)
        entry = self._entries.get(tuple(map(id, parts)))
        if entry is None:
            return None
        refs, value = entry
        if all(ref() is part for ref, part in zip(refs, parts, strict=True)):
            return value
        return None

    def put(self, fn: Callable[..., object], value: _V) -> None:
        parts = self._parts(fn)
        key = tuple(map(id, parts))
        entries = self._entries

        def forget(ref: weakref.ref[Any]) -> None:
            # runs when a part is collected (any thread); its id may be reused afterwards
            entry = entries.get(key)
            if entry is not None and any(r is ref for r in entry[0]):
                entries.pop(key, None)

        try:
            refs = tuple(weakref.ref(part, forget) for part in parts)
        except TypeError:
            return
        if len(entries) >= FUNCTION_CACHE_SIZE:
            entries.pop(next(iter(entries)), None)
        entries[key] = (refs, value)


# ---------------------------------------------------------------- exceptions across processes


class RemoteTraceback(Exception):
    """The traceback of an exception raised in another process (set as ``__cause__``)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class ExceptionRecord(NamedTuple):
    """A picklable account of an exception raised in a worker.

    (A NamedTuple, not a dataclass: every worker imports this module, and dataclasses
    pulls in inspect and ast, milliseconds of start-up for each spawn worker.)
    """

    type_name: str
    message: str
    traceback: str
    payload: bytes | None  # dumps((cls, args, state, notes)), or None if it cannot be sent


def _qualified_name(cls: type) -> str:
    module = cls.__module__
    # __mp_main__: the user's main module in a spawned child (a spawn worker, a Dask
    # worker process): the same class the caller knows as __main__'s
    if module in ("builtins", "__main__", "__mp_main__", None):
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


def capture_exception(exc: BaseException) -> ExceptionRecord:
    """Record ``exc`` (and its traceback) so that the parent can rebuild it."""
    import traceback  # noqa: PLC0415 - only when something failed: keeps worker start-up lean

    tb = "".join(traceback.format_exception(exc))
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not break error reporting
        message = f"<{type(exc).__name__}: str() failed>"
    payload: bytes | None
    try:
        state = dict(getattr(exc, "__dict__", {}))
        notes = state.pop("__notes__", None)
        payload = dumps((type(exc), exc.args, state, notes))
        # Prove it can be rebuilt here, so that the parent does not fail on it.
        _rebuild_from_payload(payload)
    except Exception:
        payload = None
    return ExceptionRecord(_qualified_name(type(exc)), message, tb, payload)


def _rebuild_from_payload(payload: bytes) -> BaseException:
    cls, args, state, notes = pickle.loads(payload)
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        raise TypeError("not an exception class")
    exc: BaseException
    try:
        exc = cls(*args)  # as pickle would: keeps C-level fields (SystemExit.code, errno)
    except Exception:
        # A constructor that takes other arguments than .args (a common pattern): create
        # the exception without calling __init__, then restore its attributes.
        exc = cls.__new__(cls, *args)
    exc.args = tuple(args)
    if state:
        exc.__dict__.update(state)
    if notes:
        for note in notes:
            exc.add_note(note)
    return exc


def rebuild_exception(record: ExceptionRecord, *, where: str) -> BaseException:
    """The worker's exception, with its own type, remote traceback as ``__cause__``.

    Args:
        record: what the worker captured.
        where: a note to add, such as ``"in worker pid 123 on item 7"``.
    """
    exc: BaseException
    try:
        if record.payload is None:
            raise ValueError("not sendable")
        exc = _rebuild_from_payload(record.payload)
    except Exception:
        exc = RemoteError(
            f"{record.type_name}: {record.message}",
            type_name=record.type_name,
            remote_traceback=record.traceback,
        )
    exc.__cause__ = RemoteTraceback(record.traceback)
    exc.add_note(f"parallelkit: raised {where}")
    return exc


def locate_unpicklable(items: Sequence[Any]) -> tuple[int, Exception] | None:
    """The position of the first item that cannot be pickled, and why; ``None`` if all can."""
    for position, item in enumerate(items):
        try:
            dumps(item)
        except Exception as exc:
            return position, exc
    return None


# ---------------------------------------------------------------- single-host objects

_destination = threading.local()


@contextlib.contextmanager
def pickling_for_another_host(where: str) -> Iterator[None]:
    """While active in this thread, single-host objects refuse to be pickled.

    Args:
        where: names the destination in the error, such as ``"a Dask cluster"``.
    """
    previous = getattr(_destination, "where", None)
    _destination.where = where
    try:
        yield
    finally:
        _destination.where = previous


def check_single_host(obj: object) -> None:
    """Called by the ``__reduce__`` of objects that live in this machine's memory.

    Raises:
        SerializationError: ``obj`` is being pickled for another host.
    """
    where = getattr(_destination, "where", None)
    if where is not None:
        raise SerializationError(
            f"a {type(obj).__name__} lives in this machine's memory and cannot be sent to "
            f"{where}; use it with processes, threads or the serial backend (or send plain "
            "values and combine the results)",
            what="argument",
        )
