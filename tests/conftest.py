"""Shared fixtures: a simulator on 127.0.0.1, configs pointing at it, a daemon running in-process,
a private PostgreSQL server."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from cometstream.config import Config, parse_config
from cometstream.daemon import Daemon
from cometstream.simulator import Simulator
from cometstream.sinks import Sink, resolve_sink_class

from .pgserver import Pg, bindir, private_postgres

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


@pytest.fixture(scope="session")
def pg() -> Iterator[Pg]:
    """A private PostgreSQL server (tests/pgserver.py) shared by the session: each module keeps
    to tables or a schema of its own."""
    where = bindir()
    if where is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt install postgresql")
    with private_postgres(where) as server:
        yield server


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
        # (gzip'd API answers, as from a server elsewhere: the timing the tests that emit world
        # events right after the HELLO were written against; see RunningDaemon.synced)
        "server": {"url": sim_url, "name": "sim", "username": USER, "password": PASSWORD,
                   "api_gzip": "always", **(server or {})},
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

    async def synced(self, timeout: float = 5.0) -> None:
        """Until the HELLO is in and the first remedial sync is over: world events emitted
        before then may also be read by that sync, which then reports them (and the stream's
        copies are duplicates), as it rightly does, but not what a test of the stream path
        counts on."""
        daemon = self.daemon
        await wait_until(lambda: self.stats.received.get(4000)
                         and (daemon.resyncs_ok >= 1 or not daemon.cfg.resync.enabled),
                         timeout=timeout, what="HELLO and the first sync")

    async def stopped(self, timeout: float = 10.0) -> None:
        """Stop the daemon and wait for it; raises what stopped it if that was not ``stop``."""
        self.stop.set()
        await asyncio.wait_for(self.task, timeout)


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


def write_config(tmp_path: Path, url: str, body: str = "", *, name: str = "",
                 password: str = PASSWORD, server: str = "", stream: str = "",
                 backoff_max: float = 0.5, listen: str = "", state: Path | None = None,
                 json_logs: bool = False, mode: int | None = None) -> Path:
    """The config file (``tmp_path/c.toml``) for a `cometstream` subprocess: the server at
    ``url`` with the test credentials (``name``, ``password`` and any ``server`` lines), fast
    reconnects (``backoff_max``, any ``stream`` lines), the HTTP endpoint on ``listen`` (""
    = none), state in ``state`` (default ``tmp_path/state``), JSON logs when a harness reads
    them; then ``body`` (sinks and any other tables). ``mode``: the file's (0o600 when it
    must not be warned about as readable)."""
    lines = ["[server]", f'url = "{url}"', *([f'name = "{name}"'] if name else []),
             f'username = "{USER}"', f"password = {toml_str(password)}",
             *([] if "api_gzip" in server else ['api_gzip = "always"']), server,
             "[stream]", "backoff_initial = 0.05", f"backoff_max = {backoff_max}", stream,
             "[http]", f'listen = "{listen}"',
             "[state]", f'dir = "{state if state is not None else tmp_path / "state"}"',
             *(["[log]", 'format = "json"'] if json_logs else []), body]
    conf = tmp_path / "c.toml"
    conf.write_text("\n".join(line for line in lines if line) + "\n", encoding="utf-8")
    if mode is not None:
        conf.chmod(mode)
    return conf


def toml_str(value: str) -> str:
    """A TOML basic string literal for any text (quotes, backslashes, unicode)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- CI refuses skips ----------------------------------------------------------------------------
# Under CI=true (.ci/run exports it) a skipped test counts as a failure unless
# tests/allowed_skips.txt lists it with its reason: a missing peer (promtool, systemd-analyze,
# openssl, root, user namespaces...) must never let CI pass by skipping what the tests promise.

ALLOWED_SKIPS = Path(__file__).with_name("allowed_skips.txt")
_REFUSED_SKIPS = pytest.StashKey[list[tuple[str, str]]]()


def in_ci() -> bool:
    """True when the run is CI's (``CI=true``, as .ci/run exports it, or 1/yes)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def allowed_skips() -> list[tuple[str, str]]:
    """(pattern, reason) for each entry of tests/allowed_skips.txt: one ``PATTERN REASON`` a
    line, PATTERN a test id where ``*`` stands for any text (``tests/test_x.py::test_y[*]``);
    blank lines and ``#`` comments are ignored. An entry without a reason is refused."""
    if not ALLOWED_SKIPS.exists():
        return []
    entries: list[tuple[str, str]] = []
    for n, line in enumerate(ALLOWED_SKIPS.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) < 2:
            raise pytest.UsageError(f"{ALLOWED_SKIPS.name}:{n}: {line.strip()!r} has no reason; "
                                    "each entry is a test id or pattern, then why CI may skip it")
        entries.append((parts[0], parts[1].strip()))
    return entries


def _skip_reason(config: pytest.Config, longrepr: Any) -> str:
    """'message (path:line)' of a skip report's (path, line, 'Skipped: message')."""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        path, line, message = longrepr
        where = Path(path)
        if where.is_relative_to(config.rootpath):
            where = where.relative_to(config.rootpath)
        return f"{str(message).removeprefix('Skipped: ')} ({where}:{line})"
    return str(longrepr)


def _refused(config: pytest.Config, nodeid: str, longrepr: Any) -> str | None:
    """Under CI, the reason of a skip that the allow-list does not excuse (recorded for the
    summary); None if the skip is allowed or the run is not CI's."""
    if not in_ci():
        return None
    for pattern, _ in allowed_skips():  # "*" stands for any text; "[...]" is a literal id
        if re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), nodeid):
            return None
    reason = _skip_reason(config, longrepr)
    config.stash.setdefault(_REFUSED_SKIPS, []).append((nodeid or "(collection)", reason))
    return reason


def pytest_sessionstart(session: pytest.Session) -> None:
    if in_ci():
        allowed_skips()  # a malformed allow-list stops the run before any test


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under CI, a skip (a skipif mark, pytest.skip in a fixture or the test) that the
    allow-list does not excuse becomes this test's failure, with the skip's reason."""
    report = yield
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _refused(item.config, report.nodeid, report.longrepr)
        if reason is not None:
            report.outcome = "failed"
            report.longrepr = (
                f"CI=true refuses this skip: {reason}\n"
                "Make the peer it needs available on CI (.ci/run installs what Debian has), or, "
                "if no CI machine can ever have it, list the test in "
                f"tests/{ALLOWED_SKIPS.name} with the reason.")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector
                               ) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """A whole module skipped at collection (pytest.skip(allow_module_level=True),
    importorskip): under CI, refused at the end of the run."""
    report = yield
    if report.skipped:
        _refused(collector.config, report.nodeid, report.longrepr)
    return report


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    refused = config.stash.get(_REFUSED_SKIPS, [])
    if not refused:
        return
    tr = terminalreporter
    tr.section("skips CI refuses", sep="=", red=True, bold=True)
    tr.line(f"CI=true: {len(refused)} skip(s) not in tests/{ALLOWED_SKIPS.name}; "
            "each fails the run:", red=True)
    for nodeid, reason in refused:
        tr.line(f"  {nodeid}: {reason}")
    tr.line("Install the missing peer (.ci/run installs what Debian has), or, if no CI machine can "
            f"ever have it, list the test in tests/{ALLOWED_SKIPS.name} with the reason.")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI, the run fails if anything was skipped that the allow-list does not excuse."""
    if session.config.stash.get(_REFUSED_SKIPS, []) and session.exitstatus in (0, 5):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
