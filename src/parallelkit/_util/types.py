"""Type variables and aliases shared by the public API."""

from __future__ import annotations

from typing import Literal, ParamSpec, TypeAlias, TypeVar

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")

StartMethod: TypeAlias = Literal["fork", "forkserver", "spawn"]
"""The names of the three start methods the standard library offers on POSIX."""
