"""Sphinx glue for parallelkit's docs: generated pages and private-name references.

At ``builder-inited`` it writes into ``docs/_generated/`` (not in git):

- ``exception-tree.txt``, drawn from :mod:`parallelkit.errors`;
- ``benchmarks.md`` and its SVG charts, from ``benchmarks/results/*.jsonl``.

And it resolves references to private modules (``parallelkit._map.pool.WorkerPool``, as they
appear in signatures) to the public name (``parallelkit.WorkerPool``).
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Any

from docutils import nodes
from pk_render import exception_tree, render_benchmarks
from sphinx.application import Sphinx
from sphinx.ext import intersphinx
from sphinx.util import logging

import parallelkit
import parallelkit.errors

logger = logging.getLogger(__name__)


def _generate(app: Sphinx) -> None:
    src = Path(app.srcdir)
    out = src / "_generated"
    out.mkdir(exist_ok=True)
    _write_if_changed(out / "exception-tree.txt", exception_tree(parallelkit.errors))
    results = sorted(
        (src / app.config.pk_benchmark_results)
        .resolve()
        .parent.glob(Path(app.config.pk_benchmark_results).name)
    )
    if not results:
        logger.warning(
            "no benchmark results match %s: run a benchmark with --json there",
            app.config.pk_benchmark_results,
        )
        text = "*(No benchmark results were found when these docs were built.)*\n"
    else:
        text = render_benchmarks(results, out, image_prefix="/_generated")
    _write_if_changed(out / "benchmarks.md", text)


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _public_name(target: str) -> str | None:
    """``parallelkit._map.pool.WorkerPool`` -> ``parallelkit.WorkerPool``, for public names."""
    if "." not in target and target in parallelkit.__all__:
        return f"parallelkit.{target}"  # a string annotation: ``StallReport | None``
    if not target.startswith("parallelkit._"):
        return None
    head, _, rest = target.partition(".")
    parts = rest.split(".")
    for i in range(1, len(parts)):
        if parts[i] in parallelkit.__all__:
            return ".".join([head, *parts[i:]])
    return None


def _type_variable_names() -> frozenset[str]:
    """The names of the TypeVars, ParamSpecs and TypeVarTuples in parallelkit's modules."""
    for name in parallelkit.__all__:
        getattr(parallelkit, name)  # import the lazily loaded modules
    kinds = (typing.TypeVar, typing.ParamSpec, typing.TypeVarTuple)
    return frozenset(
        name
        for module_name, module in list(sys.modules.items())
        if module_name.startswith("parallelkit")
        for name, value in vars(module).items()
        if isinstance(value, kinds)
    )


def _missing_reference(
    app: Sphinx, env: Any, node: nodes.Element, contnode: nodes.Element
) -> nodes.Element | None:
    """Resolve what signatures name in private modules, or show it as plain text.

    ``parallelkit._map.pool.WorkerPool`` links to ``parallelkit.WorkerPool``;
    ``concurrent.futures._base.Future`` to ``concurrent.futures.Future``; type variables
    (``T``, ``parallelkit._util.types.R``) and private helpers (``Backend``, ``_Slots``) have no
    page of their own and stay plain text.  Anything else is left to fail the build.
    """
    if node.get("refdomain") != "py":
        return None
    target: str = node.get("reftarget", "")
    public = _public_name(target)
    if public is not None:
        return env.get_domain("py").resolve_xref(
            env, node.get("refdoc"), app.builder, node.get("reftype"), public, node, contnode
        )
    if target.startswith("concurrent.futures._base."):
        node["reftarget"] = "concurrent.futures." + target.rpartition(".")[2]
        return intersphinx.missing_reference(app, env, node, contnode)
    last = target.rpartition(".")[2]
    in_package = target.startswith("parallelkit.") or "." not in target
    if in_package and (last in _TYPE_VARIABLES or last.startswith("_") or last in _PRIVATE):
        return contnode
    return None


def _public_bases(app: Sphinx, name: str, obj: object, options: object, bases: list[type]) -> None:
    """Leave private base classes (``_Slots``) out of "Bases:"."""
    bases[:] = [b for b in bases if not b.__name__.startswith("_")] or [object]


_TYPE_VARIABLES = _type_variable_names()
# type aliases, spelled out in the prose
_PRIVATE = frozenset({"Backend", "MapBackend", "ProgressOption"})


def setup(app: Sphinx) -> dict[str, object]:
    app.add_config_value("pk_benchmark_results", "../benchmarks/results/*.jsonl", "env")
    app.connect("builder-inited", _generate)
    app.connect("missing-reference", _missing_reference)
    app.connect("autodoc-process-bases", _public_bases)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
