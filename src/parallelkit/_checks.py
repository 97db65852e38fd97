"""Validation of arguments shared by the public API: clear errors, in the caller's process."""

from __future__ import annotations


def check_callable(fn: object, what: str = "fn") -> None:
    """Raise ``TypeError`` unless ``fn`` is callable."""
    if not callable(fn):
        raise TypeError(f"{what} must be callable, got {type(fn).__name__}: {fn!r}")


def check_positive_int(value: object, what: str, *, none_means: str | None = None) -> None:
    """Raise ``TypeError`` / ``ValueError`` unless ``value`` is an int of at least 1.

    ``none_means``: when given, ``None`` is accepted too and the message says what it means.
    """
    if value is None and none_means is not None:
        return
    choices = f"a positive int or None ({none_means})" if none_means else "a positive int"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be {choices}, not {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{what} must be {choices}, got {value}")
