"""Imported by multiprocessing's forkserver (one of its preload modules): import the parent's
main module there once, so that the server's children need not each run it again.

multiprocessing means to do this itself when ``"__main__"`` is in the preload list, but up
to CPython 3.13.7 (and in 3.11 and 3.12) the server never receives the main module's path
(it looks for a key that ``spawn.get_preparation_data()`` stopped writing in 3.4), so every
forkserver child re-ran the whole main script with ``runpy`` -- milliseconds for a short
script, far more for one with work at the top level.  See CPython issues gh-126631 and
gh-137996 (fixed in 3.13.8 and 3.14).

The parent (:func:`parallelkit._proc.forkserver.preload_forkserver`) puts the main module's path
or name and ``sys.argv`` in the environment variable ``PARALLELKIT_FORKSERVER_MAIN`` just
before the server starts; this module reads it once, as the server starts, and does what
the fixed CPython does: import the main module as ``__mp_main__`` with the process marked
as bootstrapping.  Each child's ``spawn.prepare()`` then finds ``__main__`` in place and
skips it.

Anything the main module raises here (it starts parallel work at import, calls
``sys.exit()``, fails) is swallowed: the server goes on without it and its children run
the main module themselves, as before, where the error is reported as usual.
"""

from __future__ import annotations

import os
import sys

from parallelkit._proc.forkserver import FORKSERVER_MAIN_ENV

# set while the server imports the main module: parallel work started at import time is
# refused with an exception here rather than by exiting (which would end the server)
importing_main = False


def preload_main() -> None:
    raw = os.environ.pop(FORKSERVER_MAIN_ENV, None)
    if not raw:
        return
    import json  # noqa: PLC0415 - only in the server, once
    from multiprocessing import process, spawn  # noqa: PLC0415

    global importing_main
    try:
        data = json.loads(raw)
        path, name = data.get("init_main_from_path"), data.get("init_main_from_name")
        main = sys.modules.get("__main__")
        if path is not None and getattr(main, "__file__", None) == path:
            return  # a multiprocessing that preloads the main module itself
        argv = data.get("sys_argv")
        if isinstance(argv, list):
            sys.argv[:] = argv
        current = process.current_process()
        current._inheriting = True  # type: ignore[attr-defined]
        importing_main = True
        try:
            if path is not None:
                spawn.import_main_path(path)
            elif name is not None:
                spawn._fixup_main_from_name(name)  # type: ignore[attr-defined]
        finally:
            importing_main = False
            del current._inheriting  # type: ignore[attr-defined]
    except BaseException:  # see the module docstring
        pass
    finally:
        for stream in (sys.stdout, sys.stderr):  # children must not print it again
            if stream is not None:
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass


preload_main()
