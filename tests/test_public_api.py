"""The public surface: ``__all__`` stays true, sorted and complete."""

from __future__ import annotations
import __future__

import importlib
import inspect
import typing
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import parallelkit
import parallelkit.errors
import parallelkit.testing

PUBLIC_MODULES = [parallelkit, parallelkit.errors, parallelkit.testing]


def _public_names(module: ModuleType) -> set[str]:
    """Names a user may reach in ``module``: no underscore, not a submodule, not imported."""
    names = set()
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        if isinstance(value, ModuleType):
            continue  # submodules (parallelkit.errors, parallelkit.testing, ...)
        if isinstance(value, __future__._Feature):
            continue  # `from __future__ import annotations`
        names.add(name)
    return names


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_all_is_a_sorted_tuple_without_duplicates(module: ModuleType) -> None:
    exported = module.__all__
    assert isinstance(exported, tuple)
    assert list(exported) == sorted(exported)
    assert len(set(exported)) == len(exported)


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_every_name_in_all_exists(module: ModuleType) -> None:
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing


def test_every_public_name_of_the_package_is_in_all() -> None:
    # Names imported only for internal use must start with an underscore.
    assert _public_names(parallelkit) - set(parallelkit.__all__) == set()


@pytest.mark.parametrize(
    "module", [parallelkit.errors, parallelkit.testing], ids=lambda m: m.__name__
)
def test_every_public_name_defined_in_a_public_module_is_in_all(module: ModuleType) -> None:
    defined_here = {
        name
        for name in _public_names(module)
        if getattr(getattr(module, name), "__module__", None) == module.__name__
    }
    assert defined_here - set(module.__all__) == set()


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from parallelkit import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(parallelkit.__all__)


def test_the_map_api_is_public() -> None:
    for name in ("run_parallel", "imap_parallel", "WorkerPool"):
        assert name in parallelkit.__all__
        assert callable(getattr(parallelkit, name))


def test_the_shared_memory_api_is_public() -> None:
    for name in ("SharedAccumulator", "SharedArray", "SharedCounter"):
        assert name in parallelkit.__all__
        assert isinstance(getattr(parallelkit, name), type)
    assert "remove_stale_segments" in parallelkit.testing.__all__
    assert callable(parallelkit.testing.remove_stale_segments)


def test_the_channel_api_is_public() -> None:
    for name in ("Channel", "ChannelListener", "ProcessChannel", "channel_pair", "start_process"):
        assert name in parallelkit.__all__
        assert callable(getattr(parallelkit, name))
    assert callable(parallelkit.Channel.listen)
    assert callable(parallelkit.Channel.connect)


def test_version_is_a_string() -> None:
    assert isinstance(parallelkit.__version__, str)
    assert parallelkit.__version__[0].isdigit()


def test_package_is_typed() -> None:
    assert (Path(parallelkit.__file__).parent / "py.typed").is_file()


def test_private_modules_are_private() -> None:
    package_dir = Path(parallelkit.__file__).parent
    public = {"__init__", "__main__", "errors", "testing"}
    for path in package_dir.glob("*.py"):
        assert path.stem in public or path.stem.startswith("_"), (
            f"{path.name}: new modules are private (a leading underscore) unless they are "
            "a public module with a real audience; re-export from __init__ instead"
        )


def test_public_modules_import_cleanly() -> None:
    for name in ("parallelkit", "parallelkit.errors", "parallelkit.testing"):
        assert importlib.import_module(name).__doc__


def test_result_iterators_come_from_imap_only() -> None:
    # Its constructor would otherwise expose the engine's private types (pyright
    # --verifytypes); imap_parallel and WorkerPool.imap make them.
    with pytest.raises(TypeError, match="imap_parallel"):
        parallelkit.ResultIterator()
    with parallelkit.imap_parallel(abs, [-1, -2], backend="serial") as results:
        assert isinstance(results, parallelkit.ResultIterator)
        assert list(results) == [1, 2]


def test_the_progress_and_insights_api_is_public() -> None:
    for name in (
        "MapStats",
        "Progress",
        "StageProgress",
        "StallReport",
        "WorkerStack",
        "WorkerStats",
    ):
        assert name in parallelkit.__all__
        assert isinstance(getattr(parallelkit, name), type)


@pytest.mark.parametrize(
    "function",
    [parallelkit.run_parallel, parallelkit.imap_parallel, parallelkit.WorkerPool.imap],
    ids=lambda f: f.__qualname__,
)
def test_the_map_overloads_mirror_the_implementation(function: Any) -> None:
    # The overloads exist only to type the result by `return_exceptions`; every other
    # parameter (name, kind, default, annotation) is the implementation's, so a map option
    # added to the implementation but not to an overload (which type checkers would then
    # refuse) fails here.
    implementation = inspect.signature(function).parameters
    overloads = typing.get_overloads(function)
    assert len(overloads) == 3
    seen = set()
    for overload in overloads:
        parameters = inspect.signature(overload).parameters
        assert list(parameters) == list(implementation)
        for name, parameter in parameters.items():
            if name == "return_exceptions":
                seen.add((parameter.annotation, parameter.default))
                continue
            assert parameter == implementation[name], name
    assert seen == {
        ("Literal[False]", False),
        ("Literal[True]", inspect.Parameter.empty),
        ("bool", False),
    }


def test_the_executor_map_overloads_share_its_options() -> None:
    implementation = inspect.signature(parallelkit.WorkerPool.map).parameters
    options = [p for p in implementation.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    overloads = typing.get_overloads(parallelkit.WorkerPool.map)
    assert overloads
    for overload in overloads:
        parameters = inspect.signature(overload).parameters.values()
        assert [p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY] == options
