"""Imported by the main module of a forkserver test: records which process imported it."""

from __future__ import annotations

import os

IMPORTED_IN = os.getpid()


def imported_here(_: object) -> bool:
    """True if this process imported the module itself (it was not preloaded)."""
    return os.getpid() == IMPORTED_IN


def loaded(names: list[str]) -> list[str]:
    """Which of ``names`` this process has imported."""
    import sys

    return [name for name in names if name in sys.modules]


def class_module_imported_here(item: object) -> bool:
    """True if this process imported the module of ``item``'s class itself."""
    import sys

    imported_in: int = sys.modules[type(item).__module__].IMPORTED_IN
    return os.getpid() == imported_in
