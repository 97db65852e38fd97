"""The forkserver, started with parallelkit's preloads.

:func:`start_forkserver` makes sure multiprocessing's forkserver runs; when it starts it
first (:func:`preload_forkserver`) has the server import, once for all its children, what
every child imports first (the child main and each role's loop), what unpickling a child
needs, what the main module imported, and the main module itself (see
:mod:`parallelkit._proc.forkserver_main`).

What the parent imports later (numpy, imported inside a function) would be imported again
by every worker, for every call, as it unpickles its first task: ``import numpy`` takes
longer than a whole one-call map of 32 arrays of 8 MB under fork.  So a server we started
also takes requests: before a map starts a worker, :func:`want_modules` appends the
modules of its function and of its first items' classes (those this process has imported)
to a file the server reads before each fork, and the server imports them, once, for every
worker it forks from then on::

    parent: want_modules(fn, items) ──"numpy\n"──▶ wants file ──▶ server, before its next
            fork: import numpy (once) ──▶ this worker, and every later one, has it
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import Any, Final

# What every parallelkit child imports first: the child main and each role's loop (the pool
# worker, the pipeline stage, the channel server)
CHILD_MODULES: Final = (
    "parallelkit._proc.child",
    "parallelkit._map.worker",
    "parallelkit._pipeline.stage",
    "parallelkit._channel.process",
)
# What a forkserver child imports to unpickle a worker, and what a pool worker imports at its
# first large argument or result (shared memory: each worker imported it again, in the
# middle of its first task)
SERVER_MODULES: Final = ("multiprocessing.popen_forkserver", "parallelkit._wire.arena")
# How the main module's path or name reaches the server (read by parallelkit._proc.forkserver_main)
FORKSERVER_MAIN_ENV: Final = "PARALLELKIT_FORKSERVER_MAIN"
# How the path of the file of modules to import reaches the server (forkserver_main again)
FORKSERVER_WANTS_ENV: Final = "PARALLELKIT_FORKSERVER_WANTS"
_preload_checked = False
# The wants file of the server this process started (None: no server of ours takes them),
# the pid that made it (only that process removes it), and the modules asked for so far
_wants_path: str | None = None
_wants_owner = 0
_wanted: set[str] = set()
_NOT_WANTED: Final = frozenset({"__main__", "__mp_main__", "builtins"})
_ITEMS_LOOKED_AT: Final = 4  # first items (and as many elements of each) whose classes count
_WRAPPERS_UNWRAPPED: Final = 4  # ``.func`` of a wrapper (star, partial), and of that one...


def _modules_of_main() -> list[str]:
    """The importable modules the main module imported (``import numpy as np``, or
    ``from tasks import square``: numpy, tasks), in the order they appear."""
    main = sys.modules.get("__main__")
    names: dict[str, None] = {}
    for value in list(vars(main).values()) if main is not None else ():
        name = value.__name__ if isinstance(value, type(sys)) else None
        if name is None and callable(value):
            name = getattr(value, "__module__", None)
        if not isinstance(name, str) or name in ("__main__", "__mp_main__", "builtins"):
            continue
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__spec__", None) is not None:
            names[name] = None
    return list(names)


def preload_forkserver() -> None:
    """Before multiprocessing's forkserver starts, have it import, once for all its children,
    parallelkit's child modules, what unpickling a worker needs, the modules the main module
    imported -- and the main module itself.

    Without this every forkserver child imported parallelkit by itself (tens of ms each) and
    ran the main script again: multiprocessing's own preload of ``"__main__"`` never works
    before CPython 3.13.8 (see :mod:`parallelkit._proc.forkserver_main`).  The main module is
    preloaded only when ``"__main__"`` is in the server's preload list (the default).  A
    server already running is left as it is.  A module the server cannot import is skipped
    by multiprocessing (ImportError); ``PARALLELKIT_FORKSERVER_PRELOAD=0`` turns all of this
    off.
    """
    global _preload_checked
    if _preload_checked:
        return
    _preload_checked = True
    if os.environ.get("PARALLELKIT_FORKSERVER_PRELOAD", "1") == "0":
        return
    from multiprocessing import forkserver, spawn  # noqa: PLC0415

    server = getattr(forkserver, "_forkserver", None)
    if server is None or getattr(server, "_forkserver_pid", None) is not None:
        return  # running already (or a multiprocessing we do not know): leave it
    current = list(getattr(server, "_preload_modules", None) or ["__main__"])
    wanted = [m for m in (*CHILD_MODULES, *SERVER_MODULES, *_modules_of_main()) if m not in current]
    if _make_wants_file():
        wanted.append("parallelkit._proc.forkserver_main")
    if "__main__" in current:
        data = spawn.get_preparation_data("parallelkit-forkserver")
        main = {
            key: data[key]
            for key in ("init_main_from_path", "init_main_from_name", "sys_argv")
            if key in data
        }
        if len(main) > 1:  # a path or a name to import
            import json  # noqa: PLC0415

            try:
                os.environ[FORKSERVER_MAIN_ENV] = json.dumps(main)
            except (TypeError, ValueError):  # an argv that is not text: no main preload
                pass
            else:
                if "parallelkit._proc.forkserver_main" not in wanted:
                    wanted.append("parallelkit._proc.forkserver_main")
    if wanted:
        forkserver.set_forkserver_preload(current + wanted)


def start_forkserver() -> list[str]:
    """Make sure multiprocessing's forkserver runs, started with parallelkit's preloads if it
    was not running yet (see :func:`preload_forkserver`); the modules it preloads."""
    from multiprocessing import forkserver  # noqa: PLC0415

    from parallelkit._util.threads import THREAD_BLOCKED  # noqa: PLC0415

    preload_forkserver()
    # Started from a thread of ours (which blocks signals: see THREAD_BLOCKED), the server
    # would keep that mask for good and hand it to every process it forks, the user's own
    # too: the signals are unblocked while it starts (only then: the thread must not take
    # a Ctrl-C meant for the main thread each time it starts a worker).
    server = getattr(forkserver, "_forkserver", None)
    starting = getattr(server, "_forkserver_pid", None) is None
    ours = threading.current_thread() is not threading.main_thread()
    old_mask = (
        signal.pthread_sigmask(signal.SIG_UNBLOCK, THREAD_BLOCKED) if ours and starting else None
    )
    try:
        forkserver.ensure_running()
    finally:  # read by the server as it started, if it did
        os.environ.pop(FORKSERVER_MAIN_ENV, None)
        os.environ.pop(FORKSERVER_WANTS_ENV, None)
        if old_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return list(getattr(getattr(forkserver, "_forkserver", None), "_preload_modules", []))


def _make_wants_file() -> bool:
    """Create the file the server to be started reads modules to import from; its path
    goes to the server in the environment.  False if no file could be made."""
    global _wants_path, _wants_owner
    try:
        fd, path = tempfile.mkstemp(prefix="pk-forkserver-wants-")
    except OSError:
        return False
    os.close(fd)
    _wants_path, _wants_owner = path, os.getpid()
    os.environ[FORKSERVER_WANTS_ENV] = path
    atexit.register(_remove_wants_file)
    return True


def _remove_wants_file() -> None:
    """At exit of the process that made it (the server removes it too, when it exits)."""
    if _wants_path is not None and os.getpid() == _wants_owner:
        try:
            os.unlink(_wants_path)
        except OSError:
            pass


def _module_names(fn: object, items: Sequence[Any] | None) -> list[str]:
    """The modules a worker imports to unpickle ``fn`` and ``items``, as far as the function
    (and the one it wraps: ``pk.star(f)``, ``functools.partial(f)``) and the classes of the
    first items (and of their first elements) tell."""
    objects: list[object] = [fn, type(fn)]
    for _ in range(_WRAPPERS_UNWRAPPED):
        fn = getattr(fn, "func", None)
        if fn is None:
            break
        objects += (fn, type(fn))
    if items is not None:
        try:
            first = list(items[:_ITEMS_LOOKED_AT])
        except Exception:  # a sequence that cannot be sliced: its classes do not count
            first = []
        for item in first:
            objects.append(type(item))
            if type(item) in (tuple, list):
                objects.extend(type(x) for x in item[:_ITEMS_LOOKED_AT])
    names = [_module_by_reference(o) for o in objects]
    return [n for n in dict.fromkeys(names) if n is not None]


def _module_by_reference(obj: object) -> str | None:
    """The module ``obj`` is pickled by reference from (its name finds it there), else
    ``None``: a lambda, a closure or a class made at run time travels by value, and
    unpickling it imports nothing of its module."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    found = sys.modules.get(module) if isinstance(module, str) else None
    if found is None or not isinstance(qualname, str):
        return None
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return module if found is obj else None


def want_modules(fn: object, items: Sequence[Any] | None) -> None:
    """Before a worker starts under forkserver: have the server import, before it forks,
    the modules that unpickling ``fn`` and ``items`` will import (see the module docstring).

    Only modules this process has imported (by name) and not asked for before, and only
    when the server is ours (started with a wants file); otherwise nothing happens.
    """
    if _wants_path is None:
        return
    new = []
    for name in _module_names(fn, items):
        module = sys.modules.get(name)
        if (
            name in _wanted
            or name in _NOT_WANTED
            or module is None
            or getattr(module, "__spec__", None) is None
        ):
            continue
        _wanted.add(name)
        new.append(name)
    if not new:
        return
    try:  # one write: lines of two threads asking at once do not interleave
        fd = os.open(_wants_path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, "".join(f"{name}\n" for name in new).encode())
        finally:
            os.close(fd)
    except OSError:  # gone (the server exited): the workers import what they need
        pass
