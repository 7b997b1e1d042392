"""The static checks: ``mypy --strict`` and ``ruff`` are clean, run as part of the test suite.

Both tools come with the ``test`` extra, pinned, and read their settings from pyproject.toml, so
that the README's one test command (and CI, which runs it) checks the types and the lint rules
of the whole package, tests, benchmarks and scripts included for ruff. A failure shows the tool's
own output: each finding with its file, line and code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)


def test_the_package_type_checks_with_mypy_strict(tmp_path: Path) -> None:
    """mypy (strict, per pyproject.toml) finds nothing in the package."""
    # a cache of its own: no .mypy_cache left in the tree, no stale one trusted
    proc = _run("mypy", "--cache-dir", str(tmp_path / "mypy-cache"), "cometstream")
    assert proc.returncode == 0, f"mypy:\n{proc.stdout}{proc.stderr}"


def test_the_code_is_lint_clean_with_ruff() -> None:
    """ruff (the rules chosen in pyproject.toml) finds nothing in the code, the tests, the
    benchmarks or the scripts."""
    proc = _run("ruff", "check", "--no-cache", "--output-format", "concise",
                "cometstream", "tests", "benchmarks", "scripts")
    assert proc.returncode == 0, f"ruff:\n{proc.stdout}{proc.stderr}"
