"""The forkserver, started with parallelkit's preloads.

:func:`start_forkserver` makes sure multiprocessing's forkserver runs; when it starts it
first (:func:`preload_forkserver`) has the server import, once for all its children, what
every child imports first (the child main and each role's loop), what unpickling a child
needs, what the main module imported, and the main module itself (see
:mod:`parallelkit._proc.forkserver_main`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Final

# What every parallelkit child imports first: the child main and each role's loop (the pool
# worker, the pipeline stage, the channel server)
CHILD_MODULES: Final = (
    "parallelkit._proc.child",
    "parallelkit._map.worker",
    "parallelkit._pipeline.stage",
    "parallelkit._channel.process",
)
# What a forkserver child imports to unpickle a worker
SERVER_MODULES: Final = ("multiprocessing.popen_forkserver",)
# How the main module's path or name reaches the server (read by parallelkit._proc.forkserver_main)
FORKSERVER_MAIN_ENV: Final = "PARALLELKIT_FORKSERVER_MAIN"
_preload_checked = False


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
        if old_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return list(getattr(getattr(forkserver, "_forkserver", None), "_preload_modules", []))
