"""The project's own promises: README's commands, CI running them, the unit files."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```sh\n(python3 -m venv[^\n]*)\n```", text)


def test_readme_has_exactly_two_setup_commands() -> None:
    """One command installs and runs the demo, one installs and runs the tests."""
    cmds = _readme_commands()
    assert len(cmds) == 2
    assert cmds[0].endswith("cometstream demo")
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run runs the README's test command verbatim."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert _readme_commands()[1].replace(" -q", "") in ci.replace(" -q", "")


@pytest.mark.parametrize("unit", ["cometstream.service", "cometstream@.service"])
def test_systemd_units_verify_and_are_hardened(tmp_path: Path, unit: str) -> None:
    """systemd-analyze verify is clean and the offline security exposure is <= 2.0."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd; .ci/run installs it)")
    text = (ROOT / "systemd" / unit).read_text()
    assert "Type=notify" in text and "RestartPreventExitStatus=2 3" in text
    name = unit.replace("@.", "@comet1.")
    target = tmp_path / name
    # (ExecStart= and the check of ExecReload=: the installed command may not be here)
    target.write_text(text.replace("=/usr/local/bin/cometstream ", "=/usr/bin/true "))
    verify = subprocess.run(["systemd-analyze", "verify", str(target)], capture_output=True,
                            text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == "", verify.stderr
    sec = subprocess.run(["systemd-analyze", "security", "--offline=true", str(target)],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", sec.stdout + sec.stderr)
    assert m, sec.stdout + sec.stderr
    assert float(m.group(1)) <= 2.0


def test_the_benchmarks_run_and_print_their_tables() -> None:
    """A smoke run of the benchmarks at tiny sizes (their figures are not checked here: timing
    on a shared machine is noise; the point is that the benchmark itself works)."""
    import sys

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "throughput.py"), "--events", "300",
         "--repeat", "2", "--paced", "200", "--only", "naive-aiohttp,daemon,daemon-filter"],
        capture_output=True, text=True, timeout=120, check=True).stdout
    assert re.search(r"^naive aiohttp +[\d,]+ ", out, re.MULTILINE), out
    # the best of the rounds, and the median of each round's ratio to naive aiohttp
    assert re.search(r"^daemon, 1 file sink +[\d,]+ .* +[\d.]+x  median [\d.]+x "
                     r"\([\d.]+-[\d.]+\)$", out, re.MULTILINE), out
    assert "2 rounds)" in out, out
    assert re.search(r"^daemon, filter 10% ", out, re.MULTILINE), out
    assert re.search(r"paced: 200 events .* p99 [\d.]+ ms", out), out
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "resync.py"), "--jobs", "300"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "resync of 300 job completions" in out and "300 synthesized" in out, out
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "reload.py"), "--reloads",
                          "1"], capture_output=True, text=True, timeout=120, check=True).stdout
    assert re.search(r"a file sink added +median +[\d.]+ ms", out), out
    assert "stream logins during the run: 1;" in out, out


def _operator_texts() -> dict[str, str]:
    """What an operator reads: the README, docs/, the example config, the units."""
    files = [ROOT / "README.md", ROOT / "config.example.toml", *sorted((ROOT / "docs").rglob("*")),
             *sorted((ROOT / "systemd").glob("*"))]
    return {str(f.relative_to(ROOT)): f.read_text() for f in files
            if f.is_file() and f.suffix in (".md", ".toml", ".yml", ".json", ".service", "")}


def test_the_docs_stand_on_their_own() -> None:
    """The docs cite only files of the repository, and no issue tracker or outside target."""
    repo_md = {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts}
    for name, text in _operator_texts().items():
        for bad in ("ARCHITECTURE.md", "STYLE.md", "TESTING.md", "comet-api.md", "/work/"):
            assert bad not in text, (name, bad)
        assert not re.search(r"\b[Ii]ssue(?:'s| \d| #)", text), name
        for cited in set(re.findall(r"\b([\w-]+\.md)\b", text)):
            assert cited in repo_md, (name, cited)


@pytest.mark.parametrize("unit", ["cometstream.service", "cometstream@.service"])
def test_the_units_documentation_exists(unit: str) -> None:
    """A Documentation= of a unit points at something that exists: the project declares no web
    page, so the units point at none (their header names docs/operations.md)."""
    text = (ROOT / "systemd" / unit).read_text()
    project_urls = re.findall(r"^\s*\w+ = \"(https?://[^\"]+)\"", (ROOT / "pyproject.toml")
                              .read_text().partition("[project.urls]")[2], re.MULTILINE)
    for line in re.findall(r"^Documentation=(.*)$", text, re.MULTILINE):
        for url in line.split():
            assert url in project_urls, url
    assert "docs/operations.md" in text


def test_every_built_in_sink_type_is_named_where_an_operator_looks() -> None:
    """README's first paragraph and the example's `type =` list name every built-in sink."""
    from cometstream.sinks import _BUILTINS

    intro = (ROOT / "README.md").read_text().split("\n\n")[1].lower()
    example = (ROOT / "config.example.toml").read_text()
    type_line = re.search(r"#   type\s+=([^\n]*\n#\s{10,}[^\n]*)", example)
    assert type_line is not None
    for sink in _BUILTINS:
        if sink != "memory":
            assert re.search(rf"\b{sink}", intro.replace("json lines files", "file")), sink
        assert f'"{sink}"' in type_line.group(1), sink
    assert "(soon)" not in intro


def test_the_declared_aiohttp_floor_has_decode_text() -> None:
    """The session passes ``decode_text=False`` to ``ws_connect``, which aiohttp 3.14 added:
    the dependency floor must be at least that, or an install that pip finds valid retries a
    ``TypeError`` as a connection failure forever."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    assert "decode_text=False" in (ROOT / "cometstream" / "stream.py").read_text()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (aiohttp,) = [r for r in map(Requirement, deps) if r.name == "aiohttp"]
    floors = [Version(s.version) for s in aiohttp.specifier if s.operator == ">="]
    assert floors and min(floors) >= Version("3.14"), aiohttp
