"""The benchmark harness, for the scripts in this folder.

It lives in the package (``parallelkit._bench.harness``) so that ``python -m parallelkit
bench`` can run from an installed wheel; this module only gives it its old name here.
"""

from parallelkit._bench.harness import *  # noqa: F403
from parallelkit._bench.harness import children as _children  # noqa: F401
