"""Shared fixtures: a simulator on 127.0.0.1, configs pointing at it, a daemon running in-process."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from cometstream.config import Config, parse_config
from cometstream.daemon import Daemon
from cometstream.simulator import Simulator
from cometstream.sinks import Sink, resolve_sink_class

USER = "cometstream"
# spaces, quotes, & and = (form/frame escaping), non-ASCII, a backslash
PASSWORD = "p@ss w&rd=\"é'\\ ü"

#: fast reconnects for tests; the policy is the same as production's
FAST_STREAM = {"backoff_initial": 0.05, "backoff_max": 0.2, "connect_timeout": 2.0}


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """cli.main() configures logging for the process (onto pytest's per-test capture): undo it."""
    yield
    import logging

    import structlog

    structlog.reset_defaults()
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_cometstream", False):
            root.removeHandler(h)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(username=USER, password=PASSWORD, rate=0, seed=7) as s:
        yield s


#: ``spool=MEMORY``: tests of the memory-buffer behaviours (drop_newest, block, shutdown losses)
MEMORY: dict[str, Any] = {"buffer": "memory"}


def make_config(sim_url: str, tmp_path: Path, *, sinks: dict[str, Any] | None = None,
                stream: dict[str, Any] | None = None, server: dict[str, Any] | None = None,
                exact: bool = False, **sections: Any) -> Config:
    """A config for the daemon against ``sim_url``. ``exact=True`` turns redaction off, for
    tests that compare delivered bytes with what the simulator sent (its account events carry
    password hashes, which redaction rightly rewrites)."""
    if exact:
        sections.setdefault("redact", {"enabled": False})
    doc: dict[str, Any] = {
        "server": {"url": sim_url, "name": "sim", "username": USER, "password": PASSWORD,
                   **(server or {})},
        "stream": {**FAST_STREAM, **(stream or {})},
        "state": {"dir": str(tmp_path / "state")},
        "http": {"listen": ""},
        "sinks": sinks or {"mem": {"type": "memory"}},
        **sections,
    }
    return parse_config(doc, env={}, resolve_sink=resolve_sink_class)


async def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` until true (fails the test with ``what`` on timeout)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        await asyncio.sleep(0.01)


class RunningDaemon:
    def __init__(self, daemon: Daemon, task: asyncio.Task[int], stop: asyncio.Event) -> None:
        self.daemon = daemon
        self.task = task
        self.stop = stop

    @property
    def stats(self) -> Any:
        return self.daemon.metrics.stream

    def sink(self, name: str) -> Any:
        return self.daemon.sinks[name]

    def sink_stats(self, name: str) -> Any:
        return self.daemon.metrics.sinks[name]

    async def stopped(self, timeout: float = 10.0) -> int:
        self.stop.set()
        return await asyncio.wait_for(self.task, timeout)


@asynccontextmanager
async def running(cfg: Config, *, sinks: dict[str, Sink] | None = None,
                  rand: Callable[[], float] = lambda: 1.0) -> AsyncIterator[RunningDaemon]:
    """Run a Daemon in this event loop; stops it (and checks it did not crash) on exit."""
    stop = asyncio.Event()
    daemon = Daemon(cfg, sinks=sinks, rand=rand, resync_retry=(0.05, 0.3))
    task = asyncio.create_task(daemon.run(stop))
    rd = RunningDaemon(daemon, task, stop)
    try:
        yield rd
    finally:
        if not task.done():
            stop.set()
            await asyncio.wait_for(task, 15)


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a cometstream subprocess (no inherited COMETSTREAM_* variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMETSTREAM_")}
    env.update(extra)
    return env


async def run_cli(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    """Start ``python -m cometstream ARGS`` as a real process (stdout/stderr piped)."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cometstream", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env or cli_env(),
    )


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_config(tmp_path: Path, url: str, body: str = "") -> Path:
    """A config file for a `cometstream` subprocess: the server at ``url`` with the test
    credentials, fast reconnects, no HTTP endpoint, state under tmp_path; then ``body``
    (sinks and any other tables)."""
    conf = tmp_path / "c.toml"
    conf.write_text(f"""
[server]
url = "{url}"
username = "{USER}"
password = {toml_str(PASSWORD)}
[stream]
backoff_initial = 0.05
backoff_max = 0.5
[http]
listen = ""
[state]
dir = "{tmp_path / 'state'}"
{body}
""", encoding="utf-8")
    return conf


def toml_str(value: str) -> str:
    """A TOML basic string literal for any text (quotes, backslashes, unicode)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
