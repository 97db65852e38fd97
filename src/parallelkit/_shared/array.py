"""SharedArray: a numpy array in shared memory, passed to other processes by reference.

Split from ``_shared`` (counters and accumulators) for size; it shares that module's
segment header (magic, kind) and closed-object error, and ``_shm`` for the segment::

    bytes 0..63   header: magic, kind (array), the data's size in bytes
    bytes 64..    the array's data, C order

The shape and dtype travel in the pickle with the segment's name; attaching checks them
against the header's size.  numpy is an optional extra, imported when first needed.
"""

from __future__ import annotations

import errno
import math
import operator
import weakref
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self, SupportsIndex, TypeVar

from parallelkit._shared.counters import (
    KIND_ARRAY,
    MAGIC,
    W_KIND,
    W_MAGIC,
    _closed_error,
    _out_of_descriptors,
)
from parallelkit._wire.codec import check_single_host
from parallelkit._wire.shm import Segment

if TYPE_CHECKING:
    from types import ModuleType

    import numpy
    import numpy.typing as npt

__all__ = ("SharedArray",)

W_NBYTES: Final = 2  # header word: the data's size in bytes
ARRAY_OFFSET: Final = 64  # bytes before the data: one cache line, aligned for any dtype
_A = TypeVar("_A")


def _numpy() -> ModuleType:
    try:
        import numpy  # noqa: PLC0415 - an optional extra, imported when first needed
    except ImportError as exc:
        raise ImportError(
            "SharedArray needs numpy, which is not installed; install it with: "
            "pip install 'parallelkit[numpy]' (or pip install numpy)"
        ) from exc
    module: ModuleType = numpy
    return module


def _map(how: Callable[[_A], Segment], arg: _A) -> Segment:
    """``how(arg)``, with running out of file descriptors said in words."""
    try:
        return how(arg)
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise _out_of_descriptors(exc, "map another SharedArray") from exc
        raise


class SharedArray:
    """A numpy array in shared memory, passed to other processes by reference.

    Create it with :meth:`zeros` or :meth:`from_array`; :attr:`array` is a numpy view of
    the shared memory (no copy).  Send the ``SharedArray`` itself (not ``.array``) to
    tasks and processes: it pickles as the segment's name, so a worker that writes
    ``shared.array[i] = x`` writes where the parent reads.  Writers to the same elements
    must coordinate themselves; writers to different slices need not.

    The creator owns the memory: :meth:`close` or ``with`` free it.  Arrays obtained
    from :attr:`array` stay valid until they are dropped (the memory is returned then).
    Needs numpy: ``pip install 'parallelkit[numpy]'``.

    Example:
        >>> import parallelkit as pk
        >>> with pk.SharedArray.zeros((2, 3), dtype="int64") as shared:
        ...     shared.array[1] = 7
        ...     int(shared.array.sum())
        21

    .. versionadded:: 0.1
    """

    __slots__ = ("__weakref__", "_array", "_dtype", "_finalizer", "_segment", "_shape")

    _segment: Segment
    _shape: tuple[int, ...]
    _dtype: numpy.dtype[Any]
    _array: numpy.ndarray[Any, Any] | None
    _finalizer: weakref.finalize[..., SharedArray]

    def __init__(self) -> None:
        raise TypeError("create a SharedArray with SharedArray.zeros() or .from_array()")

    @classmethod
    def zeros(
        cls, shape: SupportsIndex | Sequence[SupportsIndex], dtype: npt.DTypeLike = "float64"
    ) -> SharedArray:
        """A new shared array of ``shape`` filled with zeros.

        Raises:
            ImportError: numpy is not installed.
            ValueError: ``dtype`` holds Python objects (they cannot be shared).
            OSError: no room in ``/dev/shm`` (``errno.ENOSPC``; the message says how much
                was asked for and how much is free); no file descriptor to spare
                (``errno.EMFILE``; the message names the limit).
        """
        np = _numpy()
        dt = np.dtype(dtype)
        if dt.hasobject:
            raise ValueError(f"dtype {dt} holds Python objects, which cannot be shared")
        dims = (
            (operator.index(shape),)
            if isinstance(shape, SupportsIndex)
            else tuple(operator.index(d) for d in shape)
        )
        if any(d < 0 for d in dims):
            raise ValueError(f"negative dimensions are not allowed: {dims}")
        nbytes = math.prod(dims) * dt.itemsize
        segment = _map(Segment.create, ARRAY_OFFSET + nbytes)
        words = memoryview(segment.mm).cast("q")
        words[W_KIND], words[W_NBYTES], words[W_MAGIC] = KIND_ARRAY, nbytes, MAGIC
        words.release()
        return cls._wrap(segment, dims, dt)

    @classmethod
    def from_array(cls, array: npt.ArrayLike) -> SharedArray:
        """A new shared array holding a copy of ``array`` (same shape and dtype).

        Raises:
            ImportError: numpy is not installed.
            ValueError: the dtype holds Python objects.
            OSError: no room in ``/dev/shm``.
        """
        np = _numpy()
        source = np.asarray(array)
        shared = cls.zeros(source.shape, source.dtype)
        shared.array[...] = source
        return shared

    @classmethod
    def _wrap(cls, segment: Segment, shape: tuple[int, ...], dtype: Any) -> SharedArray:
        segment.drop_fd()  # an array needs no lock
        obj = cls.__new__(cls)
        obj._segment, obj._shape, obj._dtype, obj._array = segment, shape, dtype, None
        obj._finalizer = weakref.finalize(obj, segment.close)
        return obj

    @property
    def array(self) -> numpy.ndarray[Any, Any]:
        """The shared memory as a numpy array, a view of it rather than a copy.

        Raises:
            ValueError: the shared array is closed.
        """
        array = self._array
        if array is None:
            if self._segment.closed:
                raise _closed_error(self)
            np = _numpy()
            count = math.prod(self._shape)
            flat = np.frombuffer(self._segment.mm, self._dtype, count, ARRAY_OFFSET)
            array = self._array = flat.reshape(self._shape)
        return array

    @property
    def name(self) -> str:
        """The segment's name in ``/dev/shm`` (``pk_<creator pid>_<random>``)."""
        return self._segment.name

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (in this process)."""
        return self._segment.closed

    def close(self) -> None:
        """Free the shared memory (the creator) or unmap it (a process that attached).

        Idempotent.  Arrays taken from :attr:`array` keep their memory until they are
        dropped.
        """
        self._array = None
        self._finalizer()

    def __enter__(self) -> Self:
        if self._segment.closed:
            raise _closed_error(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __reduce__(self) -> tuple[Callable[..., SharedArray], tuple[object, ...]]:
        if self._segment.closed:
            raise _closed_error(self)
        check_single_host(self)
        return (_attach_array, (self._segment.name, self._shape, self._dtype))

    def __repr__(self) -> str:
        state = "closed" if self._segment.closed else f"shape={self._shape} dtype={self._dtype}"
        return f"<SharedArray {self._segment.name} {state}>"


def _attach_array(name: str, shape: tuple[int, ...], dtype: Any) -> SharedArray:
    np = _numpy()
    segment = _map(Segment.attach, name)
    words = memoryview(segment.mm).cast("q")
    try:
        ok = words[W_MAGIC] == MAGIC and words[W_KIND] == KIND_ARRAY
        ok = ok and words[W_NBYTES] == math.prod(shape) * np.dtype(dtype).itemsize
    finally:
        words.release()
    if not ok:
        segment.close()
        raise ValueError(f"shared-memory segment {name!r} does not hold this array")
    return SharedArray._wrap(segment, shape, dtype)
