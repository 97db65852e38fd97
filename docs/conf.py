"""Sphinx configuration for parallelkit's documentation.

Build it from the repository root with ``python -m sphinx -n -W --keep-going docs docs/_build``
(``pip install -e '.[docs]'`` first); the doctests run with ``-b doctest``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent / "src"))  # document this checkout, not an installed copy

import parallelkit  # noqa: E402

project = "parallelkit"
author = "parallelkit developers"
copyright = "parallelkit developers"
release = parallelkit.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.doctest",
    "pk_docs",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_generated/*.md"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"parallelkit {release}"

# Signatures read as users write them: ``T``, ``Callable[[T], R]``, no module prefixes.
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

# The Python 3.11 inventory ships in the repository (docs/_intersphinx, from Debian's
# python3.11-doc package), so the build needs no network; links go to docs.python.org.
intersphinx_mapping = {
    "python": ("https://docs.python.org/3.11", str(HERE / "_intersphinx" / "python-3.11.inv")),
}

nitpicky = True
# Third-party types in signatures that have no inventory here (numpy, hypothesis) and a
# standard-library class the Python docs do not index.
nitpick_ignore_regex = [
    ("py:class", r"(numpy|npt)\..*"),
    ("py:class", r"(hypothesis\.strategies\.)?SearchStrategy"),
    ("py:class", r"multiprocessing\.process\.BaseProcess"),
]

# Docstring examples use the names of their own module, as if written inside it.
doctest_global_setup = "import parallelkit as pk\nfrom parallelkit import *"
