"""End-to-end commands as a user runs them: demo, simulate + run, systemd notification."""

from __future__ import annotations

import asyncio
import io
import signal
import socket
from pathlib import Path

import orjson
import pytest

from cometstream.cli import main
from cometstream.observe.systemd import Notifier

from .conftest import cli_env, run_cli, toml_str, wait_until, write_config
from .peers import run_cli_with_stdout


async def _read_until(stream: asyncio.StreamReader, predicate, timeout: float) -> list[bytes]:  # type: ignore[no-untyped-def]
    lines: list[bytes] = []
    async with asyncio.timeout(timeout):
        while True:
            line = await stream.readline()
            if not line:
                return lines
            lines.append(line)
            if predicate(lines):
                return lines


async def test_demo_shows_events_within_seconds_and_ctrl_c_exits_0() -> None:
    """cometstream demo prints events from the built-in simulator; SIGINT exits 0."""
    proc = await run_cli("demo", "--rate", "50")
    try:
        assert proc.stdout is not None
        lines = await _read_until(proc.stdout, lambda ls: len(ls) >= 5, timeout=15)
        assert len(lines) >= 5
        docs = [orjson.loads(x) for x in lines]  # not a TTY here: JSON Lines envelopes
        assert docs[0]["type_name"] == "SEVT_META_HELLO"
        # a job that ends while the first sync runs may be reported by it (origin resync)
        assert all(d["server"] == "demo" and d["origin"] in ("stream", "resync") for d in docs)
        proc.send_signal(signal.SIGINT)
        _out, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_simulate_and_run_as_two_processes_with_systemd_notify(tmp_path: Path) -> None:
    """The simulator and the daemon as separate processes; the daemon tells systemd READY,
    STATUS, WATCHDOG and STOPPING over $NOTIFY_SOCKET (an abstract socket here)."""
    port = _free_port()
    sim = await run_cli("simulate", "--listen", f"127.0.0.1:{port}", "--username", "ops",
                        "--password", "s3cret & co", "--rate", "20")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind("\0cometstream-test-" + str(port))
    notify.setblocking(False)
    out_path = tmp_path / "events.jsonl"
    conf = tmp_path / "c.toml"
    conf.write_text(f"""
[server]
url = "http://127.0.0.1:{port}/"
username = "ops"
password = {toml_str("s3cret & co")}
[stream]
backoff_initial = 0.1
[http]
listen = ""
[state]
dir = "{tmp_path}"
[sinks.f]
type = "file"
path = "{out_path}"
""")
    env = cli_env(NOTIFY_SOCKET="@cometstream-test-" + str(port), WATCHDOG_USEC="200000")
    daemon = await run_cli("run", "-c", str(conf), env=env)
    messages: list[str] = []
    loop = asyncio.get_running_loop()

    stamps: list[float] = []

    async def collect() -> None:
        while True:
            messages.append((await loop.sock_recv(notify, 4096)).decode())
            stamps.append(loop.time())

    collector = asyncio.create_task(collect())
    try:
        await wait_until(lambda: out_path.exists()
                         and len(out_path.read_bytes().splitlines()) >= 10, timeout=20,
                         what="events in the file")
        # the watchdog keeps pinging while it runs
        await wait_until(lambda: messages.count("WATCHDOG=1") >= 5, timeout=20, what="pings")
        daemon.send_signal(signal.SIGTERM)
        _o, err = await asyncio.wait_for(daemon.communicate(), 15)
        await wait_until(lambda: "STOPPING=1" in messages, what="STOPPING")
    finally:
        collector.cancel()
        for p in (daemon, sim):
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
                await asyncio.wait_for(p.wait(), 10)
        notify.close()
    assert daemon.returncode == 0, err.decode()
    assert messages[0] == "READY=1" or "READY=1" in messages
    assert any(m.startswith("STATUS=connected to 127.0.0.1") for m in messages)
    # WATCHDOG_USEC=200000: a ping every 0.1 s, from READY until STOPPING (and never more often:
    # a slow machine only spaces them out)
    ready, stopping = messages.index("READY=1"), messages.index("STOPPING=1")
    pings = [i for i, m in enumerate(messages) if m == "WATCHDOG=1" and i < stopping]
    assert len(pings) >= 5 and ready < pings[0], messages
    span = stamps[stopping] - stamps[ready]
    assert len(pings) <= span / 0.1 + 3, (span, len(pings))
    assert Notifier(env={"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "200000"}
                    ).watchdog_interval == 0.1
    assert sim.returncode == 0
    assert b"s3cret" not in err


async def test_demo_ends_quietly_when_its_output_is_closed() -> None:
    """`cometstream demo | head -2`: once the reader is gone the demo stops, exit 0, without
    dead letters or a traceback."""
    proc, stdout, hang_up = await run_cli_with_stdout("demo", "--rate", "50", "--listen",
                                                      "127.0.0.1:0")
    try:
        assert proc.stderr is not None
        lines = await _read_until(stdout, lambda ls: len(ls) >= 2, timeout=15)
        assert len(lines) == 2
        hang_up.close()  # head exits
        err = await asyncio.wait_for(proc.stderr.read(), 15)
        await asyncio.wait_for(proc.wait(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    text = err.decode()
    assert "stdout closed: stopping" in text and '"reason":"stdout closed"' in text
    assert "Traceback" not in text and "refused" not in text and "dead" not in text


async def test_a_busy_listen_port_is_exit_2_for_demo_and_simulate() -> None:
    """One rule for a port that cannot be bound, as for run's [http] listen: exit 2, one line
    naming the option."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        listen = f"127.0.0.1:{busy.getsockname()[1]}"
        for command in ("demo", "simulate"):
            proc = await run_cli(command, "--listen", listen)
            _out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 2, err.decode()
            lines = [ln for ln in err.decode().splitlines() if ln.startswith("cometstream:")]
            assert len(lines) == 1 and lines[0].startswith(
                f"cometstream: --listen: cannot listen on {listen}: Address already in use")
            assert "Traceback" not in err.decode()


@pytest.mark.parametrize("rate", ["-1", "nan", "inf", "1e9", "often"])
@pytest.mark.parametrize("command", ["demo", "simulate"])
def test_a_rate_that_is_not_a_rate_is_a_usage_error(
        command: str, rate: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--rate takes 0 to 100,000 events per second; anything else is exit 2 naming the option
    (not a traceback, nor a demo that runs on without events)."""
    assert main([command, "--rate", rate]) == 2
    err = capsys.readouterr().err
    assert f"argument --rate: expected events per second from 0 to 100000, got '{rate}'" in err


def test_every_command_has_a_description_and_shows_its_defaults(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`COMMAND --help` starts with a sentence about the command, and options with a default
    say it (simulate's credentials, demo's rate and port)."""
    for command in ("run", "check", "backfill", "tap", "demo", "simulate", "dlq"):
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        usage, description = out.split("\n\n")[:2]
        assert usage.startswith(f"usage: cometstream {command}") and description[0].isupper()
    assert main(["simulate", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default admin)" in out and "that user's password (default admin)" in out
    assert main(["demo", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "events per second (default 4)" in out and "(default 127.0.0.1:9780;" in out


@pytest.mark.parametrize(("args", "line"), [
    (["--since", "yesterday"],
     ('cometstream: --since: expected a date like 2026-11-01 or 2026-11-01T12:30, '
      'or Unix seconds like 1733400000, got "yesterday"')),
    (["--since", "2999-01-01"],
     'cometstream: --since: "2999-01-01" is in the future: nothing to backfill'),
    (["--since", "2020-01-02", "--until", "2020-01-01"],
     "cometstream: --until: must be after --since"),
    (["--since", "2020-01-01", "--sink", "nope"],
     'cometstream: --sink: no sink named "nope" (configured: out)'),
])
def test_backfill_argument_errors_are_about_the_argument(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], line: str) -> None:
    """A wrong argument is exit 2 with one line naming the option, not a "config:" error; a
    --since in the future says so."""
    conf = write_config(tmp_path, "http://127.0.0.1:9/", '[sinks.out]\ntype = "stdout"\n')
    conf.chmod(0o600)
    assert main(["backfill", "-c", str(conf), *args]) == 2
    assert capsys.readouterr().err == line + "\n"


def test_the_backfill_bar_leaves_no_stale_characters() -> None:
    """Each redraw of the progress line erases what a longer one left after it."""
    from cometstream.backfill import _Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    bar = _Progress(100, out=term)
    bar.update(50, 123456, "2026-11-01 (a long label)")
    bar.update(100, 7, "done", final=True)
    screen: list[str] = []
    for line in term.getvalue().split("\n"):
        shown = ""
        for i, part in enumerate(line.split("\r")):  # a carriage return: write over
            erase = part.find("\x1b[K")
            text = part if erase < 0 else part[:erase]
            shown = text + ("" if erase >= 0 else shown[len(text):]) if i else text
        screen.append(shown)
    assert screen == ["backfill [##############################] 100%  7 jobs  done", ""]


def test_only_the_daemon_s_commands_tune_the_interpreter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A command that runs an event loop without the daemon (check --connect) keeps CPython's
    collector and switch interval; the daemon's settings are for run and demo only."""
    import sys

    from cometstream import runtime

    calls: list[str] = []
    monkeypatch.setattr(runtime, "tune_for_daemon", lambda: calls.append("tuned"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # (closed: nothing listens)
    conf = write_config(tmp_path, f"http://127.0.0.1:{port}/", '[sinks.out]\ntype = "stdout"',
                        stream="connect_timeout = 1.0", mode=0o600)
    interval = sys.getswitchinterval()
    assert main(["check", "-c", str(conf), "--connect"]) == 1
    assert calls == [] and sys.getswitchinterval() == interval
    capsys.readouterr()
