"""How each item is passed to the function: :func:`star`, :func:`star_kwargs`, :func:`with_args`.

Each returns an :class:`ItemCall`: a picklable callable of one item, so it works wherever a
function of one item does (every map entry point, every backend, pipeline stages,
``submit``).  The loops that run chunks (the process worker, ``run_chunk`` of the other
backends, a pipeline's map stage) ask :func:`each` for the calls over a slice of items: a
C-level iterator (``itertools.starmap``, ``map`` over ``repeat``\\ ed extras) where one
exists, so that unpacking costs no Python frame per item.  A job checks the kind of its
items (:meth:`ItemCall.bad_item`) in the caller's process, before they are sent.
"""

from __future__ import annotations

import functools
import itertools
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Concatenate, Final, TypeVarTuple, overload

from parallelkit._util.checks import check_callable
from parallelkit._util.types import P, R, T

__all__ = ("ItemCall", "each", "explain", "star", "star_kwargs", "with_args")

Ts = TypeVarTuple("Ts")

_repeat = itertools.repeat


class ItemCall:
    """``func`` adapted to take one item (see the subclasses); picklable by its parts."""

    # __qualname__: what a pipeline stage is named after ("map(star(power))")
    __slots__ = ("__qualname__", "__weakref__", "args", "func", "keywords", "target")

    kind: str = ""  # what each item must be, for the error message
    expects: type | tuple[type, ...] = object

    def __init__(
        self, func: Callable[..., object], args: tuple[object, ...], keywords: dict[str, object]
    ) -> None:
        self.func = func
        self.args = args
        self.keywords = keywords
        # the keywords bound once, C-level: partial passes them on each call
        self.target: Callable[..., object] = (
            functools.partial(func, **keywords) if keywords else func
        )
        self.__qualname__ = f"{_NAMES[type(self)]}({_name_of(func)})"

    def __call__(self, item: Any, /) -> Any:
        raise NotImplementedError

    def map(self, items: Iterable[Any]) -> Iterator[Any]:
        """The calls over ``items``, lazily: ``map(self, items)``, faster."""
        return map(self, items)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.func, self.args, self.keywords))

    def __repr__(self) -> str:
        name = _name_of(self.func)
        return f"parallelkit.{_NAMES[type(self)]}({', '.join([name, *self._extras_repr()])})"

    def _extras_repr(self) -> list[str]:
        shown = []
        if self.args:
            shown.append(f"args={self.args!r}")
        if self.keywords:
            shown.append(f"kwargs={self.keywords!r}")
        return shown

    def bad_item(self, items: Sequence[Any]) -> int | None:
        """The position of the first item this call cannot take (not a tuple for
        :func:`star`, not a mapping for :func:`star_kwargs`), or ``None``."""
        expects = self.expects
        if expects is object:
            return None
        kinds = set(map(type, items))  # C-level: the common case costs no Python per item
        if kinds <= _EXACT[type(self)]:
            return None
        for pos, item in enumerate(items):
            if not isinstance(item, expects):
                return pos
        return None

    def item_error(self, item: object, index: int | None) -> TypeError:
        """The error for item ``index`` (``None``: not known here), which :meth:`bad_item`
        found of the wrong kind."""
        name = _name_of(self.func)
        which = "an item" if index is None else f"item {index}"
        return TypeError(
            f"{which} is {type(item).__name__!r}, not {self.kind}: "
            f"{_NAMES[type(self)]}({name}) calls {self._shape(name)} for each item"
        )

    def _shape(self, name: str) -> str:
        raise NotImplementedError


class _Star(ItemCall):
    __slots__ = ()
    kind = "a tuple of positional arguments"
    expects = tuple

    def __call__(self, item: Any, /) -> Any:
        return self.target(*item, *self.args)

    def map(self, items: Iterable[Any]) -> Iterator[Any]:
        if self.args:  # item + extras: a tuple concatenation in C
            items = map(operator.add, items, _repeat(self.args))
        return itertools.starmap(self.target, items)

    def _shape(self, name: str) -> str:
        return f"{name}(*item{', ...' if self.args or self.keywords else ''})"


class _StarKwargs(ItemCall):
    __slots__ = ()
    kind = "a mapping of keyword arguments"
    expects = Mapping

    def __call__(self, item: Any, /) -> Any:
        return self.target(*self.args, **item)

    def map(self, items: Iterable[Any]) -> Iterator[Any]:
        # no C-level form of f(**item): a generator at least resumes one frame per item
        # instead of calling __call__ (a new frame and two attribute reads)
        target, args = self.target, self.args
        if args:
            return (target(*args, **item) for item in items)
        return (target(**item) for item in items)

    def _shape(self, name: str) -> str:
        return f"{name}({'..., ' if self.args or self.keywords else ''}**item)"


class _WithArgs(ItemCall):
    __slots__ = ()

    def __call__(self, item: Any, /) -> Any:
        return self.target(item, *self.args)

    def map(self, items: Iterable[Any]) -> Iterator[Any]:
        # map() over several iterables: target(item, a1, a2, ...) in C
        return map(self.target, items, *map(_repeat, self.args))

    def _shape(self, name: str) -> str:
        return f"{name}(item, ...)"

    def _extras_repr(self) -> list[str]:
        return [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.keywords.items()]


_NAMES: Final[dict[type[ItemCall], str]] = {
    _Star: "star",
    _StarKwargs: "star_kwargs",
    _WithArgs: "with_args",
}
_EXACT: Final[dict[type[ItemCall], frozenset[type]]] = {
    _Star: frozenset({tuple}),
    _StarKwargs: frozenset({dict}),
    _WithArgs: frozenset(),
}


def _name_of(func: Callable[..., object]) -> str:
    return getattr(func, "__qualname__", None) or repr(func)


def explain(fn: object, item: object, exc: BaseException) -> BaseException:
    """``exc``, raised by ``fn(item)``; or, if ``fn`` is an :class:`ItemCall` and ``item``
    is not of the kind it takes, the clearer ``TypeError`` that says so.  For the loops
    that run items the caller could not check first (a pipeline's later stages)."""
    if isinstance(fn, ItemCall) and not isinstance(item, fn.expects):
        error = fn.item_error(item, None)
        error.__cause__ = exc
        return error
    return exc


def each(fn: Callable[[Any], object], items: Iterable[Any]) -> Iterator[Any]:
    """``map(fn, items)``; for an :class:`ItemCall`, its C-level form."""
    if isinstance(fn, ItemCall):
        return fn.map(items)
    return map(fn, items)


_NO_KEYWORDS: Final[Mapping[str, object]] = MappingProxyType({})


def _extras(
    args: tuple[object, ...], kwargs: Mapping[str, object]
) -> tuple[tuple[object, ...], dict[str, object]]:
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple, got {type(args).__name__}: {args!r}")
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError(f"kwargs must be a mapping with str keys, got {kwargs!r}")
    return args, dict(kwargs)


# Why keyword options here and not `star(fn, *args, **kwargs)`: mypy cannot type the item
# tuple and extra arguments together (one TypeVarTuple per signature), so the extras need an
# overload of their own; with varargs it would also match `star(fn)` and mypy would fall
# back to it, silently, whenever the item type does not fit -- the check would be lost.
@overload
def star(fn: Callable[[*Ts], R], /) -> Callable[[tuple[*Ts]], R]: ...
@overload
def star(
    fn: Callable[..., R],
    /,
    *,
    args: tuple[object, ...],
    kwargs: Mapping[str, object] = ...,
) -> Callable[[tuple[Any, ...]], R]: ...
@overload
def star(
    fn: Callable[..., R],
    /,
    *,
    args: tuple[object, ...] = ...,
    kwargs: Mapping[str, object],
) -> Callable[[tuple[Any, ...]], R]: ...
def star(
    fn: Callable[..., R],
    /,
    *,
    args: tuple[object, ...] = (),
    kwargs: Mapping[str, object] = _NO_KEYWORDS,
) -> Callable[[Any], R]:
    """``fn`` adapted to take each item as a tuple of positional arguments.

    ``star(fn, args=args, kwargs=kwargs)(item)`` is ``fn(*item, *args, **kwargs)``: the
    extra arguments, the same for every call, come after the item's.  Like
    :meth:`multiprocessing.pool.Pool.starmap`, for every map entry point
    (:func:`run_parallel`, :func:`imap_parallel`, :meth:`WorkerPool.imap`,
    :meth:`Pipeline.map` ...) and every backend.

    Without extra arguments, mypy checks ``fn`` against the item type: ``star(power)`` of
    ``def power(base: int, exp: int) -> int`` takes ``tuple[int, int]`` (with parameters
    that have defaults, mypy fits the tuple to the items when it can).  With ``args`` or
    ``kwargs``, the items are ``tuple[Any, ...]`` to mypy.

    Each item must be a tuple (a named tuple too): any other item fails with a
    ``TypeError`` naming its index, before it is sent anywhere -- for a list input, before
    any work starts.

    Args:
        fn: the function; ``fn`` and the extras are sent to each worker once.
        args: positional arguments after each item's.
        kwargs: keyword arguments for every call.

    Returns:
        A picklable callable of one item.

    Example:
        >>> run_parallel(star(pow), [(2, 3), (4, 2)], backend="serial")
        [8, 16]
        >>> run_parallel(star(pow, args=(5,)), [(2, 3), (4, 2)], backend="serial")
        [3, 1]

    .. versionadded:: 0.1
    """
    check_callable(fn)
    return _Star(fn, *_extras(args, kwargs))


def star_kwargs(
    fn: Callable[..., R],
    /,
    *,
    args: tuple[object, ...] = (),
    kwargs: Mapping[str, object] = _NO_KEYWORDS,
) -> Callable[[Mapping[str, Any]], R]:
    """``fn`` adapted to take each item as a mapping of keyword arguments.

    ``star_kwargs(fn, args=args, kwargs=kwargs)(item)`` is ``fn(*args, **kwargs, **item)``,
    where a key of the item wins over the same key in ``kwargs`` (defaults that items may
    override, as with :func:`functools.partial`).  The item type is not checked against
    ``fn`` by mypy (a ``TypeVar`` cannot stand for keyword parameters).  Each item must be
    a mapping: any other item fails with a ``TypeError`` naming its index, before it is
    sent anywhere.

    Example:
        >>> run_parallel(star_kwargs("{x}-{y}".format, kwargs={"y": 0}),
        ...              [{"x": 1}, {"x": 2, "y": 3}], backend="serial")
        ['1-0', '2-3']

    .. versionadded:: 0.1
    """
    check_callable(fn)
    return _StarKwargs(fn, *_extras(args, kwargs))


def with_args(
    fn: Callable[Concatenate[T, P], R], /, *args: P.args, **kwargs: P.kwargs
) -> Callable[[T], R]:
    """``fn`` with the same extra arguments for every item.

    ``with_args(fn, *args, **kwargs)(item)`` is ``fn(item, *args, **kwargs)`` -- the item
    first, unlike :func:`functools.partial`, which binds the first arguments.  mypy checks
    the extra arguments against ``fn`` and the item against its first parameter.

    Example:
        >>> run_parallel(with_args(round, 1), [1.25, 2.75], backend="serial")
        [1.2, 2.8]
        >>> run_parallel(with_args(int, base=2), ["101", "11"], backend="serial")
        [5, 3]

    .. versionadded:: 0.1
    """
    check_callable(fn)
    return _WithArgs(fn, args, dict(kwargs))
