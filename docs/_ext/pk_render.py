"""Build-time renderers for the docs: nothing here is typed by hand.

- :func:`exception_tree` draws the exception tree from the classes in
  :mod:`parallelkit.errors`;
- :func:`render_benchmarks` turns the benchmark suite's JSON lines
  (``benchmarks/results/*.jsonl``, written by ``bench_*.py --json``) into Markdown tables
  and one SVG bar chart per workload.

This module needs only the standard library (and parallelkit), so the test suite can run
it without Sphinx; ``pk_docs`` is the Sphinx glue around it.
"""

from __future__ import annotations

import html
import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------- exception tree


def _summary(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    first = re.sub(r":\w+:`~?(?:[\w.]+\.)?([\w]+)`", r"\1", first)  # :class:`~a.B` -> B
    return first.replace("``", "").split("; ")[0].rstrip(".")


def exception_tree_rows(module: Any) -> list[tuple[int, type, tuple[type, ...]]]:
    """``(depth, class, builtin bases)`` for every exception in ``module.__all__``.

    Depth-first from the module's root class (the one whose bases are all builtins), in
    the order of ``__all__`` sorted by source line, so the tree reads like the module.
    """
    classes = [getattr(module, name) for name in module.__all__]
    classes = [c for c in classes if isinstance(c, type) and issubclass(c, BaseException)]
    ours = set(classes)
    classes.sort(key=lambda c: inspect.getsourcelines(c)[1])
    rows: list[tuple[int, type, tuple[type, ...]]] = []

    def visit(cls: type, depth: int) -> None:
        builtins = tuple(b for b in cls.__bases__ if b not in ours and b is not Exception)
        rows.append((depth, cls, builtins))
        for child in classes:
            if cls in child.__bases__:
                visit(child, depth + 1)

    for root in classes:
        if not any(b in ours for b in root.__bases__):
            visit(root, 0)
    return rows


def exception_tree(module: Any) -> str:
    """The exception tree of ``module`` as text, one class a line with its summary."""
    rows = exception_tree_rows(module)
    labels: list[str] = []
    for i, (depth, cls, builtins) in enumerate(rows):
        name = cls.__name__ + (f"({', '.join(b.__name__ for b in builtins)})" if builtins else "")
        if depth == 0:
            labels.append(name)
            continue
        siblings_after = rows[i + 1 : _next_shallower(rows, i, depth)]
        last = all(d > depth for d, _, _ in siblings_after)
        labels.append("   " * (depth - 1) + (" └─ " if last else " ├─ ") + name)
    width = max(len(label) for label in labels) + 3
    lines = [
        f"{label:<{width}}{_summary(cls)}".rstrip()
        for label, (_, cls, _) in zip(labels, rows, strict=True)
    ]
    return "\n".join(lines) + "\n"


def _next_shallower(rows: list[tuple[int, type, tuple[type, ...]]], i: int, depth: int) -> int:
    for j in range(i + 1, len(rows)):
        if rows[j][0] < depth:
            return j
    return len(rows)


# ------------------------------------------------------------------------ benchmarks


@dataclass
class Result:
    """One (contender, mode) of one workload, from the ``seconds`` line and its companions."""

    contender: str
    mode: str
    kind: str
    median: float | None
    low: float | None
    high: float | None
    x_pool_map: float | None
    x_best_peer: float | None
    speedup: float | None = None
    error: str | None = None


@dataclass
class Run:
    """One results file: its meta line and its results by workload."""

    name: str
    meta: dict[str, Any]
    workloads: dict[str, list[Result]] = field(default_factory=dict)


def read_results(path: Path) -> Run:
    """Read one JSON-lines file written by a benchmark's ``--json`` option."""
    meta: dict[str, Any] = {}
    run = Run(path.stem, meta)
    by_key: dict[tuple[str, str, str], Result] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON: {exc}") from None
        kind = record.get("type")
        if kind == "meta":
            meta.update(record)
            continue
        if kind != "result":
            continue
        key = (record["workload"], record["contender"], record["mode"])
        metric = record.get("metric")
        if metric == "seconds":
            result = Result(
                contender=record["contender"],
                mode=record["mode"],
                kind=record.get("kind", ""),
                median=record.get("median"),
                low=record.get("min"),
                high=record.get("max"),
                x_pool_map=record.get("x_pool_map"),
                x_best_peer=record.get("x_best_peer"),
                error=record.get("error"),
            )
            by_key[key] = result
            run.workloads.setdefault(record["workload"], []).append(result)
        elif metric == "speedup" and key in by_key:
            by_key[key].speedup = record.get("median")
    if not run.workloads:
        raise ValueError(f"{path}: no result lines")
    return run


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 1:
        return f"{value * 1000:.3g} ms"
    return f"{value:.3g} s"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _is_ours(contender: str) -> bool:
    return contender.startswith("parallelkit")


def results_table(results: list[Result]) -> str:
    """A Markdown table of one workload's results."""
    speedups = any(r.speedup is not None for r in results)
    head = ["contender", "mode", "median", "min - max", "x Pool.map", "x best peer"]
    if speedups:
        head.append("speed-up")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        name = f"**{r.contender}**" if _is_ours(r.contender) else r.contender
        if r.error is not None or r.median is None:
            cells = [name, r.mode, f"failed: {r.error}", "", "", ""]
            if speedups:
                cells.append("")
        else:
            cells = [
                name,
                r.mode,
                _seconds(r.median),
                f"{_seconds(r.low)} - {_seconds(r.high)}",
                _ratio(r.x_pool_map),
                _ratio(r.x_best_peer),
            ]
            if speedups:
                cells.append(_ratio(r.speedup))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart_svg(title: str, results: list[Result]) -> str:
    """A horizontal bar chart (SVG) of the median times, parallelkit's bars highlighted."""
    rows = [r for r in results if r.median is not None and r.error is None]
    label_width, bar_width, row_height, top = 260, 380, 22, 34
    height = top + row_height * len(rows) + 28
    width = label_width + bar_width + 90
    longest = max((r.median or 0.0) for r in rows) if rows else 1.0
    longest = longest or 1.0
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12" '
        'role="img">',
        f"<title>{html.escape(title)}</title>",
        f'<text x="4" y="18" font-size="14" font-weight="bold">{html.escape(title)}</text>',
    ]
    for i, r in enumerate(rows):
        y = top + i * row_height
        length = max(1.0, bar_width * (r.median or 0.0) / longest)
        colour = "#1f77b4" if _is_ours(r.contender) else "#9a9a9a"
        label = f"{r.contender} [{r.mode}]"
        out += [
            f'<text x="{label_width - 6}" y="{y + 14}" text-anchor="end">'
            f"{html.escape(label)}</text>",
            f'<rect x="{label_width}" y="{y + 3}" width="{length:.1f}" height="{row_height - 6}" '
            f'fill="{colour}"/>',
            f'<text x="{label_width + length + 4:.1f}" y="{y + 14}">{_seconds(r.median)}</text>',
        ]
    axis_y = top + row_height * len(rows) + 4
    out += [
        f'<line x1="{label_width}" y1="{top}" x2="{label_width}" y2="{axis_y}" stroke="#444"/>',
        f'<text x="{label_width}" y="{axis_y + 16}" fill="#444">median time per call '
        "(shorter is faster); blue: parallelkit</text>",
        "</svg>",
    ]
    return "\n".join(out) + "\n"


def _ordered(results: list[Result]) -> list[Result]:
    """Group by mode (in the order the file has them), fastest first within a mode."""
    modes: dict[str, int] = {}
    for r in results:
        modes.setdefault(r.mode, len(modes))
    return sorted(
        results,
        key=lambda r: (modes[r.mode], r.median is None, r.median or 0.0),
    )


def _describe(meta: dict[str, Any]) -> str:
    parts = []
    if meta.get("workers"):
        parts.append(f"{meta['workers']} workers")
    if meta.get("python"):
        parts.append(f"Python {str(meta['python']).split()[0]}")
    if meta.get("rounds"):
        parts.append(f"{meta['rounds']} rounds")
    if meta.get("command"):
        parts.append(f"`{meta['command']}`")
    if meta.get("date"):
        parts.append(f"measured {meta['date']}")
    return ", ".join(parts)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def render_benchmarks(paths: list[Path], out_dir: Path, *, image_prefix: str) -> str:
    """Markdown for every results file (tables, and SVG charts written into ``out_dir``).

    ``image_prefix`` is how the page refers to ``out_dir`` (``/_generated`` for Sphinx).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    sections: list[str] = []
    for path in sorted(paths):
        run = read_results(path)
        title = str(run.meta.get("benchmark", run.name))
        if run.meta.get("start_method"):
            title += f", {run.meta['start_method']}"
        sections.append(f"## {title}\n\nFrom `benchmarks/results/{path.name}`.\n")
        description = _describe(run.meta)
        if description:
            sections.append(description[0].upper() + description[1:] + ".\n")
        titles = run.meta.get("workloads", {})
        for workload, unordered in run.workloads.items():
            results = _ordered(unordered)
            title = titles.get(workload, {}).get("title", "") if isinstance(titles, dict) else ""
            heading = f"**{workload}**" + (f" — {title}" if title else "")
            svg_name = f"bench-{_slug(run.name)}-{_slug(workload)}.svg"
            chart_title = f"{run.name}: {workload}"
            (out_dir / svg_name).write_text(bar_chart_svg(chart_title, results))
            sections += [
                heading + "\n",
                results_table(results),
                f"![{chart_title}: median times]({image_prefix}/{svg_name})\n",
            ]
    return "\n".join(sections)
