"""Third-party sinks: the example plugin, installed with pip, is found by its entry point."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cometstream.simulator import Simulator

from .conftest import cli_env, run_cli, wait_until, write_config

PLUGIN = Path(__file__).resolve().parent / "plugin_example"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin, installed by pip (a real distribution with its entry point)."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--target", str(target), str(PLUGIN)],
        capture_output=True, text=True, timeout=180, env={**os.environ, "TMPDIR": str(build)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(target.glob("cometstream_example_sink-*.dist-info"))
    return target


def _conf(tmp_path: Path, sim: Simulator, extra: str) -> Path:
    return write_config(tmp_path, sim.url, extra)


async def test_plugin_sink_is_loaded_by_name_and_receives_events(
        sim: Simulator, tmp_path: Path, plugin_site: Path) -> None:
    """type = "example" finds the installed plugin; it validates its keys and gets events."""
    out = tmp_path / "plugin.txt"
    conf = _conf(tmp_path, sim, f'[redact]\nenabled = false\n[sinks.mine]\ntype = "example"\n'
                 f'path = "{out}"\nprefix = "cs"\n')
    env = cli_env(PYTHONPATH=str(plugin_site))
    proc = await run_cli("run", "-c", str(conf), env=env)
    try:
        await sim.wait_for_clients(1, timeout=10)
        sent = sim.emit_many(5)
        await wait_until(lambda: out.exists() and len(out.read_bytes().splitlines()) >= 6,
                         timeout=10, what="plugin output")
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = out.read_bytes().splitlines()
    assert all(line.startswith(b"cs {") for line in lines)
    assert [line[3:] for line in lines[1:]] == sent


async def test_plugin_config_errors_are_one_line_naming_the_key(
        sim: Simulator, tmp_path: Path, plugin_site: Path) -> None:
    """The plugin's own validation gives the same clear errors as built-in sinks."""
    conf = _conf(tmp_path, sim, '[sinks.mine]\ntype = "example"\npath = "x"\nprefix = "a b"\n')
    proc = await run_cli("check", "-c", str(conf), env=cli_env(PYTHONPATH=str(plugin_site)))
    _out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert err.decode().strip() == "cometstream: config: sinks.mine.prefix: must not contain spaces"


async def test_unknown_sink_type_lists_the_installed_ones(sim: Simulator, tmp_path: Path,
                                                          plugin_site: Path) -> None:
    """A misspelt type names what is available, plugins included."""
    conf = _conf(tmp_path, sim, '[sinks.mine]\ntype = "exampel"\n')
    proc = await run_cli("check", "-c", str(conf), env=cli_env(PYTHONPATH=str(plugin_site)))
    _out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    text = err.decode()
    assert "unknown sink type" in text and "example" in text and "kafka" in text
