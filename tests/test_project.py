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
    target.write_text(text.replace("ExecStart=/usr/local/bin/cometstream", "ExecStart=/usr/bin/true"))
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
    """A smoke run of both benchmarks at tiny sizes (their figures are not checked here: timing
    on a shared machine is noise; the point is that the benchmark itself works)."""
    import sys

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "throughput.py"), "--events", "300",
         "--repeat", "1", "--paced", "200", "--only", "naive-aiohttp,daemon,daemon-filter"],
        capture_output=True, text=True, timeout=120, check=True).stdout
    assert re.search(r"^naive aiohttp +[\d,]+ ", out, re.M), out
    assert re.search(r"^daemon, 1 file sink +[\d,]+ .* +[\d.]+x$", out, re.M), out
    assert re.search(r"^daemon, filter 10% ", out, re.M), out
    assert re.search(r"paced: 200 events .* p99 [\d.]+ ms", out), out
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "resync.py"), "--jobs", "300"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "resync of 300 job completions" in out and "300 synthesized" in out, out
