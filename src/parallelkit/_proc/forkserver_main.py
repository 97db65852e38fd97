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

It also takes the parent's later requests (:func:`parallelkit._proc.forkserver.want_modules`):
before each fork, the server imports the modules named in the file
``PARALLELKIT_FORKSERVER_WANTS`` names since it last looked, the same way (errors
swallowed: the worker imports the module itself, and reports what fails).
"""

from __future__ import annotations

import atexit
import importlib
import os
import sys

from parallelkit._proc.forkserver import FORKSERVER_MAIN_ENV, FORKSERVER_WANTS_ENV

# set while the server imports the main module or a module asked for: parallel work started
# at import time is refused with an exception here rather than by exiting (which would end
# the server)
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
        _flush()


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):  # children must not print it again
        if stream is not None:
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


def watch_wants() -> None:
    """Import the modules the parent asks for before each fork of the server (not of its
    children: the hook is inherited, and does nothing elsewhere)."""
    path = os.environ.pop(FORKSERVER_WANTS_ENV, None)
    if not path:
        return
    server = os.getpid()
    read = [0]  # bytes of the file taken so far

    def before_fork() -> None:
        if os.getpid() == server:
            _import_wanted(path, read)

    os.register_at_fork(before=before_fork)
    atexit.register(_remove, path, server)


def _import_wanted(path: str, read: list[int]) -> None:
    try:
        with open(path, "rb") as f:
            f.seek(read[0])
            data = f.read()
    except OSError:  # removed: the parent has exited
        return
    end = data.rfind(b"\n") + 1
    if not end:
        return
    read[0] += end
    names = [n for n in data[:end].decode(errors="replace").split() if n not in sys.modules]
    if not names:
        return
    from multiprocessing import process  # noqa: PLC0415 - only in the server

    global importing_main
    current = process.current_process()
    current._inheriting = True  # type: ignore[attr-defined]
    importing_main = True
    try:
        for name in names:
            try:
                importlib.import_module(name)
            except BaseException:  # see the module docstring
                pass
    finally:
        importing_main = False
        del current._inheriting  # type: ignore[attr-defined]
        _flush()


def _remove(path: str, server: int) -> None:
    if os.getpid() == server:
        try:
            os.unlink(path)
        except OSError:
            pass


preload_main()
watch_wants()
