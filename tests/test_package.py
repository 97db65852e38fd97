"""The wheel works on its own: built from this tree, installed into a fresh virtual
environment, it runs ``python -m parallelkit demo``.

The fresh environment has no pip, no site packages and no ``PYTHONPATH``, and the wheel is
installed with ``--no-deps``: parallelkit needs nothing at run time (``typing-extensions``
is imported only by type checkers), so what runs there is the wheel and nothing else.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

import parallelkit

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not (ROOT / "pyproject.toml").is_file(), reason="not run from a source tree"
)


def _source_version() -> str:
    text = (ROOT / "src" / "parallelkit" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    assert match is not None
    return match.group(1)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(args: list[str], *, cwd: Path, timeout: float = 120) -> str:
    result = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_clean_env(),
        cwd=cwd,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_wheel_installs_into_a_fresh_venv_and_runs_the_demo(tmp_path: Path) -> None:
    version = _source_version()
    wheels = tmp_path / "wheels"
    # --no-build-isolation: the build backend (hatchling) comes with the test extra, so no
    # download; the result is the same wheel `python -m build` makes (CI builds that too).
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(wheels),
            str(ROOT),
        ],
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("*.whl")
    assert wheel.name == f"parallelkit-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"parallelkit-{version}.dist-info/METADATA").decode()
    assert "parallelkit/py.typed" in names
    assert "parallelkit/__main__.py" in names
    assert not any(
        name.startswith(("tests/", "docs/", "examples/", "benchmarks/")) for name in names
    )
    # the peer comparison stays in the repository; the quick stdlib one ships
    assert "parallelkit/_bench.py" in names
    assert not any(name.startswith("parallelkit/_bench/") for name in names)
    assert "Classifier: Typing :: Typed" in metadata
    assert re.search(r"^Requires-Python: >=3\.11$", metadata, re.MULTILINE)

    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            str(wheel),
        ],
        cwd=tmp_path,
    )

    where = _run(
        [
            str(python),
            "-c",
            "import parallelkit; print(parallelkit.__file__, parallelkit.__version__)",
        ],
        cwd=tmp_path,
    ).split()
    assert Path(where[0]).is_relative_to(env_dir)
    assert where[1] == version == parallelkit.__version__

    out = _run(
        [str(python), "-m", "parallelkit", "demo", "--items", "4", "--item-seconds", "0.02"],
        cwd=tmp_path,
    )
    assert "speed-up" in out
    assert "WorkerCrashedError" in out
    assert out.rstrip().endswith("All good.")

    # the quick comparison needs nothing but the standard library (none else is here)
    tiny = ["--items", "100", "--tasks", "2", "--task-seconds", "0.002", "--rounds", "1"]
    out = _run([str(python), "-m", "parallelkit", "bench", "--workers", "1", *tiny], cwd=tmp_path)
    for workload in ("**tiny**", "**cpu**", "**startup-1**"):
        assert workload in out
    assert "| error |" not in out
    assert "`python -m benchmarks` in a checkout" in out


_LINT = (
    "import sys\n"
    "from importlinter.cli import lint_imports\n"
    "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))\n"
)


def _lint_imports(package_parent: Path) -> subprocess.CompletedProcess[str]:
    """import-linter's layer contract (pyproject.toml) over the package under ``package_parent``."""
    env = {**_clean_env(), "PYTHONPATH": str(package_parent)}
    return subprocess.run(
        [sys.executable, "-c", _LINT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.timeout(180)
def test_the_layers_import_only_downwards() -> None:
    result = _lint_imports(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Layers: imports go only downwards KEPT" in result.stdout


@pytest.mark.timeout(180)
def test_the_layer_contract_catches_an_upward_import(tmp_path: Path) -> None:
    copy = tmp_path / "parallelkit"
    shutil.copytree(
        ROOT / "src" / "parallelkit", copy, ignore=shutil.ignore_patterns("__pycache__")
    )
    codec = copy / "_wire" / "codec.py"
    codec.write_text(codec.read_text() + "\nfrom parallelkit._map import pool as _pool\n")
    result = _lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "parallelkit._wire is not allowed to import parallelkit._map" in result.stdout
