"""The docs tell the truth: their programs run and print what the pages show.

- Every ```python block in ``docs/*.md`` that is a whole program (it has its imports) and
  is followed right away by a ```text block is run as a script, and its standard output
  must match that block line by line (``...`` matches any text: a pid, a duration).  Every
  other block (a fragment, or a program whose output the page describes in prose first)
  must at least compile.
- The exception tree the docs draw from :mod:`parallelkit.errors` matches the tree in that
  module's docstring, and the benchmark tables and charts render from every committed
  ``benchmarks/results/*.jsonl``.
- The API page documents every public name.

Sphinx itself (``-n -W`` and the doctest builder) runs in ``.ci/run``, not here.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

import parallelkit
import parallelkit.errors
import parallelkit.testing
from child import run_python

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"

pytestmark = pytest.mark.skipif(not DOCS.is_dir(), reason="docs/ not beside tests/")

_FENCE = re.compile(r"^```(\w+)\n(.*?)^```\n", re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class Example:
    page: str
    number: int
    code: str
    expected: str | None  # the ```text block right after it, if any

    @property
    def id(self) -> str:
        return f"{self.page}-{self.number}"


def _examples() -> list[Example]:
    examples: list[Example] = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        fences = list(_FENCE.finditer(text))
        number = 0
        for i, fence in enumerate(fences):
            if fence.group(1) != "python":
                continue
            number += 1
            expected = None
            if i + 1 < len(fences):
                following = fences[i + 1]
                between = text[fence.end() : following.start()]
                whole = re.search(r"^(?:import|from) \w", fence.group(2), re.MULTILINE)
                if following.group(1) == "text" and not between.strip() and whole:
                    expected = following.group(2)
            examples.append(Example(page.stem, number, fence.group(2), expected))
    return examples


EXAMPLES = _examples()
RUN = [e for e in EXAMPLES if e.expected is not None]
COMPILE_ONLY = [e for e in EXAMPLES if e.expected is None]


def _matches(pattern: str, line: str) -> bool:
    regex = ".*?".join(re.escape(part) for part in pattern.split("..."))
    return re.fullmatch(regex, line) is not None


def test_the_pages_have_programs_with_output() -> None:
    pages = {e.page for e in RUN}
    for page in ("quickstart", "parallel-map", "pipelines", "channels", "shared-memory"):
        assert page in pages
    assert {"backends", "errors", "testing"} <= pages
    assert len(RUN) >= 15


@pytest.mark.parametrize("example", RUN, ids=[e.id for e in RUN])
def test_a_docs_program_prints_what_the_page_shows(example: Example, tmp_path: Path) -> None:
    script = tmp_path / f"{example.page.replace('-', '_')}_{example.number}.py"
    script.write_text(example.code)
    result = run_python("-W", "error", str(script), timeout=100, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert example.expected is not None
    expected = example.expected.rstrip("\n").splitlines()
    got = result.stdout.rstrip("\n").splitlines()
    assert len(got) == len(expected), result.stdout
    for want, line in zip(expected, got, strict=True):
        assert _matches(want.rstrip(), line.rstrip()), (want, line)


@pytest.mark.parametrize("example", COMPILE_ONLY, ids=[e.id for e in COMPILE_ONLY])
def test_a_docs_fragment_compiles(example: Example) -> None:
    compile(example.code, f"{example.id}.py", "exec")


def _pk_render() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pk_render", DOCS / "_ext" / "pk_render.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pk_render"] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["pk_render"]
    return module


def test_the_generated_exception_tree_matches_the_errors_docstring() -> None:
    tree = _pk_render().exception_tree(parallelkit.errors)
    doc = parallelkit.errors.__doc__
    assert doc is not None
    drawn = re.search(r"::\n\n(.*?)\n\n", doc, re.DOTALL)
    assert drawn is not None

    def shape(text: str) -> list[str]:
        # The class, its builtin bases and its depth; not the descriptions.
        rows = []
        for line in text.splitlines():
            match = re.match(r"^([\s│├└─]*)(\w+(?:\([\w, ]+\))?)", line)
            assert match is not None, line
            rows.append(f"{len(match.group(1).strip())}:{match.group(2)}")
        return rows

    assert shape(tree) == shape(drawn.group(1))
    every = set(parallelkit.errors.__all__)
    assert every == {row.split(":")[1].split("(")[0] for row in shape(tree)}
    assert "ChannelClosedError(EOFError)" in tree


def test_the_benchmark_results_render_as_tables_and_svg_charts(tmp_path: Path) -> None:
    paths = sorted(RESULTS.glob("*.jsonl"))
    assert paths, "no benchmarks/results/*.jsonl: the performance page would be empty"
    markdown = _pk_render().render_benchmarks(paths, tmp_path, image_prefix="/_generated")
    charts = sorted(tmp_path.glob("*.svg"))
    assert charts
    for chart in charts:
        svg = ET.parse(chart).getroot()
        assert svg.tag == "{http://www.w3.org/2000/svg}svg"
        assert svg.findall("{http://www.w3.org/2000/svg}rect")
        assert f"(/_generated/{chart.name})" in markdown
    assert "| **parallelkit." in markdown
    assert "| Pool.map |" in markdown


def test_the_benchmark_renderer_reads_the_suite_format(tmp_path: Path) -> None:
    # The shape bench_*.py --json writes: a meta line, then one line per metric.
    results = tmp_path / "bench_x-fork.jsonl"
    results.write_text(
        '{"type": "meta", "benchmark": "bench_x", "start_method": "fork", "workers": 2,'
        ' "workloads": {"cpu": {"title": "CPU work"}}}\n'
        '{"type": "result", "workload": "cpu", "contender": "Pool.map", "mode": "warm",'
        ' "metric": "seconds", "median": 2.0, "min": 1.5, "max": 2.5, "x_pool_map": 1.0}\n'
        '{"type": "result", "workload": "cpu", "contender": "parallelkit.WorkerPool",'
        ' "mode": "warm", "metric": "seconds", "median": 0.5, "min": 0.4, "max": 0.6,'
        ' "x_pool_map": 0.25}\n'
        '{"type": "result", "workload": "cpu", "contender": "parallelkit.WorkerPool",'
        ' "mode": "warm", "metric": "speedup", "median": 3.5}\n'
    )
    markdown = _pk_render().render_benchmarks([results], tmp_path / "out", image_prefix="/g")
    assert "## bench_x, fork" in markdown
    assert "**cpu** — CPU work" in markdown
    ours = "| **parallelkit.WorkerPool** | warm | 500 ms | 400 ms - 600 ms | 0.25x | — | 3.50x |"
    assert ours in markdown
    assert "| Pool.map | warm | 2 s | 1.5 s - 2.5 s | 1.00x | — | — |" in markdown
    svg = (tmp_path / "out" / "bench-bench-x-fork-cpu.svg").read_text()
    assert "parallelkit.WorkerPool [warm]" in svg


def test_the_api_page_documents_every_public_name() -> None:
    api = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"^\.\. (?:auto\w+|data):: ([\w.]+)", api, re.MULTILINE))
    for name in parallelkit.__all__:
        if name != "errors":
            assert f"parallelkit.{name}" in documented, name
    for name in parallelkit.testing.__all__:
        assert f"parallelkit.testing.{name}" in documented, name


def test_every_page_is_in_the_table_of_contents() -> None:
    index = (DOCS / "index.md").read_text()
    for page in DOCS.glob("*.md"):
        if page.stem != "index":
            assert f"\n{page.stem}\n" in index, page.stem
