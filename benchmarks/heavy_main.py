"""Stands in for a user's ``__main__`` that imports numpy (the "heavy main" start-up runs).

During those runs ``sys.modules["__main__"]`` is this module, so a spawn child re-imports
it -- and numpy with it -- as it would re-import a user's script.
"""

from __future__ import annotations

import numpy  # noqa: F401  (the point of this module: a heavy import)
