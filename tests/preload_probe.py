"""Imported by the main module of a forkserver test: records which process imported it."""

from __future__ import annotations

import os

IMPORTED_IN = os.getpid()


def imported_here(_: object) -> bool:
    """True if this process imported the module itself (it was not preloaded)."""
    return os.getpid() == IMPORTED_IN
