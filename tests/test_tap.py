"""``cometstream tap``: the daemon's live view on a Unix socket, and the command that reads it.

Everything runs over real sockets: the simulator on 127.0.0.1, the daemon in this event loop,
tap clients on ``state.dir/tap.sock`` (raw protocol here, or the real command in a subprocess).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from cometstream.cli import main
from cometstream.events import Event
from cometstream.simulator import Simulator
from cometstream.sinks.stdout import pretty_line
from cometstream.tap import TapServer

from .conftest import (
    RunningDaemon,
    cli_env,
    make_config,
    run_cli,
    running,
    wait_until,
    write_config,
)
from .peers import run_cli_with_stdout

ALL: dict[str, Any] = {"sink": None, "types": None, "format": "envelope"}


class Tap:
    """A raw protocol client: the answer line, then event lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 answer: dict[str, Any]) -> None:
        self.reader = reader
        self.writer = writer
        self.answer = answer

    async def lines(self, n: int, timeout: float = 5.0) -> list[bytes]:
        out: list[bytes] = []
        async with asyncio.timeout(timeout):
            for _ in range(n):
                line = await self.reader.readline()
                assert line.endswith(b"\n"), f"connection ended after {len(out)} lines"
                out.append(line[:-1])
        return out


@asynccontextmanager
async def tap(d: RunningDaemon, request: dict[str, Any] | bytes) -> AsyncIterator[Tap]:
    reader, writer = await asyncio.open_unix_connection(str(d.daemon.tap.path))
    try:
        writer.write(request if isinstance(request, bytes) else orjson.dumps(request) + b"\n")
        answer = orjson.loads(await asyncio.wait_for(reader.readline(), 5))
        yield Tap(reader, writer, answer)
    finally:
        writer.transport.abort()


async def _ready(d: RunningDaemon) -> None:
    """The HELLO is through and the first (baseline) sync done: what follows is only ours."""
    await wait_until(lambda: d.daemon.resyncs_ok >= 1 and d.daemon.tap.serving,
                     what="first resync")


async def test_a_tap_client_sees_live_events_in_order(sim: Simulator, tmp_path: Path) -> None:
    """Envelopes of every published event, in order, the server's bytes inside; the callback
    is registered only while the client is connected."""
    cfg = make_config(sim.url, tmp_path, exact=True)
    async with running(cfg) as d:
        await _ready(d)
        assert d.daemon.pipeline.taps == []
        async with tap(d, ALL) as t:
            assert t.answer == {"ok": True, "server": "sim", "sinks": ["mem"], "types": None,
                                "format": "envelope"}
            assert len(d.daemon.pipeline.taps) == 1
            sent = sim.emit_many(300)
            lines = await t.lines(300)
        for line, original in zip(lines, sent, strict=True):
            env = orjson.loads(line)
            assert env["server"] == "sim" and env["origin"] == "stream"
            assert env["type_name"].startswith("SEVT_")
            assert line.endswith(b',"event":' + original + b"}")
        await wait_until(lambda: not d.daemon.pipeline.taps, what="the tap callback removed")
        assert d.daemon.tap.clients == []
        # and the sink got the same events
        await wait_until(lambda: len(d.sink("mem").events) >= 301, what="delivery")
        assert [ev.raw for ev in d.sink("mem").events[-300:]] == sent


async def test_tap_of_a_sink_shows_exactly_what_its_filter_lets_through(
        sim: Simulator, tmp_path: Path) -> None:
    """``sink``: that route's filter; ``types`` on top of it narrows further."""
    cfg = make_config(sim.url, tmp_path, exact=True, sinks={
        "jobs": {"type": "memory", "types": ["SEVT_JOB_COMPLETED", 4999]},
        "all": {"type": "memory"},
    })
    async with running(cfg) as d:
        await _ready(d)
        req = {"sink": "jobs", "types": None, "format": "event"}
        narrow = {"sink": "jobs", "types": [4201, 4102], "format": "event"}
        async with tap(d, req) as t, tap(d, narrow) as t2:
            assert t.answer["ok"] and t.answer["sinks"] == ["jobs", "all"]
            assert t.answer["types"] == [4201, 4999]
            assert t2.answer["types"] == [4201]
            before = len(d.sink("jobs").events)
            for i, typ in enumerate((4200, 4201, 4102, 4999, 4201, 4998)):
                sim.emit({"Type": typ, "Data": {"GUID": f"g{i}"}})
            await wait_until(lambda: len(d.sink("jobs").events) == before + 3, what="jobs")
            got = await t.lines(3)
            assert got == [ev.raw for ev in d.sink("jobs").events[before:]]
            assert [orjson.loads(x)["Type"] for x in got] == [4201, 4999, 4201]
            assert [orjson.loads(x)["Data"]["GUID"] for x in await t2.lines(2)] == ["g1", "g4"]
            # nothing else was queued between them: the next line is the next matching event
            last = sim.emit({"Type": 4201, "Data": {"GUID": "last"}})
            assert await t.lines(1) == [last]
            assert await t2.lines(1) == [last]


async def test_tap_types_filter(sim: Simulator, tmp_path: Path) -> None:
    """``types`` without a sink: only those event types, whatever the sinks take."""
    cfg = make_config(sim.url, tmp_path, exact=True)
    async with running(cfg) as d:
        await _ready(d)
        async with tap(d, {"sink": None, "types": [4102, 4998], "format": "event"}) as t:
            assert t.answer["types"] == [4102, 4998]
            sent = [sim.emit({"Type": typ, "Data": {"GUID": f"g{i}"}})
                    for i, typ in enumerate((4200, 4102, 4201, 4998, 4100, 4102))]
            assert await t.lines(3) == [sent[1], sent[3], sent[5]]
            await wait_until(lambda: len(d.sink("mem").events) >= 7, what="delivery")
            last = sim.emit({"Type": 4998, "Data": {"GUID": "last"}})
            assert await t.lines(1) == [last]


@pytest.mark.parametrize(("request_line", "error"), [
    (orjson.dumps({"sink": "nope", "types": None, "format": "event"}) + b"\n",
     'no sink named "nope" (configured: mem, archive)'),
    (b"hello\n", "bad request: not a JSON line"),
    (orjson.dumps({"sink": None, "types": ["SEVT_JOB_NEW"]}) + b"\n",
     "bad request: types must be null or a list of event type numbers"),
    (orjson.dumps({"format": "yaml"}) + b"\n",
     "bad request: format must be one of event, envelope"),
])
async def test_a_bad_request_is_refused_with_a_clear_error(
        sim: Simulator, tmp_path: Path, request_line: bytes, error: str) -> None:
    cfg = make_config(sim.url, tmp_path, sinks={
        "mem": {"type": "memory"},
        "archive": {"type": "file", "path": str(tmp_path / "a.jsonl")},
    })
    async with running(cfg) as d:
        await _ready(d)
        async with tap(d, request_line) as t:
            assert t.answer == {"ok": False, "error": error}
            assert await asyncio.wait_for(t.reader.read(), 5) == b""  # and closed
        assert d.daemon.pipeline.taps == [] and d.daemon.tap.clients == []


async def test_a_client_that_never_reads_does_not_block_the_daemon(
        sim: Simulator, tmp_path: Path) -> None:
    """The tap's queue is bounded: the file sink gets every event, the tap loses some, and is
    told how many at the place of the gap once it reads again."""
    path = tmp_path / "ev.jsonl"
    cfg = make_config(sim.url, tmp_path, exact=True, sinks={
        "file": {"type": "file", "path": str(path), "format": "event"}})
    n = 3000
    async with running(cfg) as d:
        await _ready(d)
        await wait_until(lambda: d.sink_stats("file").delivered == 1, what="the HELLO written")
        d.daemon.tap.max_events = 50
        async with tap(d, {"sink": None, "types": None, "format": "event"}) as t:
            client = d.daemon.tap.clients[0]
            sent = sim.emit_many(n)
            await wait_until(lambda: d.sink_stats("file").delivered == 1 + n, timeout=20,
                             what="every event in the file")
            assert len(client.queue) <= 51  # (the one marker line may sit beyond the bound)
            assert path.read_bytes().splitlines()[-n:] == sent
            # now read: events in order, with the gaps reported, until all are accounted for
            events: list[bytes] = []
            dropped: list[int] = []
            async with asyncio.timeout(10):
                while len(events) + sum(dropped) < n:
                    line = (await t.reader.readline()).rstrip(b"\n")
                    assert line, "the tap ended"
                    doc = orjson.loads(line)
                    if "tap_dropped" in doc:
                        assert set(doc) == {"tap_dropped"} and doc["tap_dropped"] > 0
                        dropped.append(doc["tap_dropped"])
                    else:
                        events.append(line)
            assert len(events) + sum(dropped) == n
            assert sum(dropped) > 0 and events
            it = iter(sent)
            assert all(e in it for e in events)  # a subsequence of what was sent, in order
            assert client.dropped_total == sum(dropped)
        await wait_until(lambda: not d.daemon.pipeline.taps, what="the tap callback removed")


async def test_clients_leaving_at_any_moment_log_no_traceback(
        sim: Simulator, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before the request, mid-request, right after it, mid-stream with data queued, by reset:
    the daemon logs no error, keeps delivering, and unregisters the callback."""
    caplog.set_level(logging.WARNING)
    cfg = make_config(sim.url, tmp_path)
    path = tmp_path / "state" / "tap.sock"
    with structlog.testing.capture_logs() as logs:
        async with running(cfg) as d:
            await _ready(d)
            for _ in range(3):
                _r, w = await asyncio.open_unix_connection(str(path))  # says nothing
                w.transport.abort()
                _r, w = await asyncio.open_unix_connection(str(path))
                w.write(b'{"sink": nu')  # half a request
                await w.drain()
                w.transport.abort()
                _r, w = await asyncio.open_unix_connection(str(path))
                w.write(orjson.dumps(ALL) + b"\n")  # gone before the answer
                await w.drain()
                w.close()
                await w.wait_closed()
                async with tap(d, ALL) as t:  # mid-stream, lots unread
                    sim.emit_many(500)
                    await t.lines(3)
                async with tap(d, ALL) as t:  # a clean end
                    sim.emit_many(5)
                    await t.lines(5)
                    t.writer.write_eof()
            sim.emit_many(10)
            await wait_until(lambda: not d.daemon.tap.clients and not d.daemon.pipeline.taps,
                             what="every tap gone")
            await wait_until(lambda: len(d.sink("mem").events) == 1 + 3 * 505 + 10,
                             what="delivery")
            async with tap(d, ALL) as t:  # and one still connected when the daemon stops
                await d.stopped()  # a clean stop: it raises otherwise
                assert await asyncio.wait_for(t.reader.read(), 5) is not None
    bad = [e for e in logs if e["log_level"] in ("error", "critical", "exception")
           or e.get("exc_info")]
    assert bad == []
    assert [e for e in logs if e["event"] == "tap connected"]  # (the capture works)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert not path.exists()  # removed at stop


async def test_tap_socket_is_private_replaces_a_stale_one_and_never_steals_a_live_one(
        tmp_path: Path) -> None:
    class Pipe:  # what TapServer uses of a Pipeline
        def __init__(self) -> None:
            self.routes: list[Any] = []
            self.taps: list[Any] = []

        def add_tap(self, tap: Any) -> None:
            if tap not in self.taps:
                self.taps.append(tap)

        def remove_tap(self, tap: Any) -> None:
            if tap in self.taps:
                self.taps.remove(tap)

    path = tmp_path / "tap.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a socket file nobody listens on: a daemon that crashed
    stale.close()
    first = TapServer(path, Pipe(), server="x")  # type: ignore[arg-type]
    second = TapServer(path, Pipe(), server="x")  # type: ignore[arg-type]
    try:
        assert await first.start()
        mode = path.lstat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        assert not await second.start()  # another daemon serves it: leave it alone
        r, w = await asyncio.open_unix_connection(str(path))
        w.write(orjson.dumps(ALL) + b"\n")
        assert orjson.loads(await r.readline())["ok"] is True
        w.transport.abort()
        await second.stop()  # must not remove the first one's socket
        assert path.exists()
    finally:
        await first.stop()
    assert not path.exists()
    path.write_text("not mine")
    assert not await TapServer(path, Pipe(), server="x").start()  # type: ignore[arg-type]
    assert path.read_text() == "not mine"


# --- the command --------------------------------------------------------------------------------
def _conf(tmp_path: Path, url: str) -> Path:
    return write_config(tmp_path, url, '[sinks.mem]\ntype = "memory"\n'
                        '[sinks.jobs]\ntype = "memory"\ntypes = ["SEVT_JOB_COMPLETED"]\n')


async def _finish(proc: asyncio.subprocess.Process, timeout: float = 15) -> tuple[bytes, bytes]:
    try:
        return await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_cli_tap_count_prints_n_json_lines_and_exits_0(sim: Simulator,
                                                            tmp_path: Path) -> None:
    conf = _conf(tmp_path, sim.url)
    cfg = make_config(sim.url, tmp_path, exact=True,
                      sinks={"mem": {"type": "memory"},
                             "jobs": {"type": "memory", "types": ["SEVT_JOB_COMPLETED"]}})
    async with running(cfg) as d:
        await _ready(d)
        proc = await run_cli("tap", "-c", str(conf), "--count", "5", "--format", "event")
        await wait_until(lambda: d.daemon.tap.clients or proc.returncode is not None,
                         timeout=15, what="the tap connected")
        sent = sim.emit_many(8)
        out, err = await _finish(proc)
        assert proc.returncode == 0, err.decode()
        assert err == b""
        assert out.splitlines() == sent[:5]
        # --types (names or numbers) and --sink, envelopes
        proc = await run_cli("tap", "-c", str(conf), "--count", "2", "--sink", "jobs",
                             "--types", "SEVT_JOB_COMPLETED,4100")
        await wait_until(lambda: d.daemon.tap.clients or proc.returncode is not None,
                         timeout=15, what="the tap connected")
        for i, typ in enumerate((4100, 4201, 4200, 4201)):
            sim.emit({"Type": typ, "Data": {"GUID": f"t{i}"}})
        out, err = await _finish(proc)
        assert proc.returncode == 0, err.decode()
        envs = [orjson.loads(x) for x in out.splitlines()]
        assert [e["type_name"] for e in envs] == ["SEVT_JOB_COMPLETED"] * 2
        assert [e["event"]["Data"]["GUID"] for e in envs] == ["t1", "t3"]
        assert all(e["server"] == "sim" for e in envs)


async def test_cli_tap_ctrl_c_exits_0_quietly(sim: Simulator, tmp_path: Path) -> None:
    conf = _conf(tmp_path, sim.url)
    async with running(make_config(sim.url, tmp_path,
                                   sinks={"mem": {"type": "memory"}, "jobs": {"type": "memory"}}
                                   )) as d:
        await _ready(d)
        proc = await run_cli("tap", "-c", str(conf))
        await wait_until(lambda: d.daemon.tap.clients or proc.returncode is not None,
                         timeout=15, what="the tap connected")
        sim.emit_many(3)
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 5)
        assert orjson.loads(first)["server"] == "sim"
        proc.send_signal(signal.SIGINT)
        _out, err = await _finish(proc)
        assert proc.returncode == 0 and err == b""
        await wait_until(lambda: not d.daemon.tap.clients, what="the daemon saw it leave")


async def test_cli_tap_ends_quietly_when_its_output_is_closed(sim: Simulator,
                                                             tmp_path: Path) -> None:
    """`cometstream tap | head -1`: once the reader is gone the tap ends at its next write,
    exit 0, nothing on stderr; the daemon sees it leave."""
    conf = _conf(tmp_path, sim.url)
    async with running(make_config(sim.url, tmp_path,
                                   sinks={"mem": {"type": "memory"}, "jobs": {"type": "memory"}}
                                   )) as d:
        await _ready(d)
        proc, stdout, hang_up = await run_cli_with_stdout("tap", "-c", str(conf))
        await wait_until(lambda: d.daemon.tap.clients or proc.returncode is not None,
                         timeout=15, what="the tap connected")
        sim.emit_many(1)
        first = await asyncio.wait_for(stdout.readline(), 5)
        assert orjson.loads(first)["server"] == "sim"
        hang_up.close()  # head exits
        async with asyncio.timeout(15):
            while proc.returncode is None:  # the tap notices at its next write
                sim.emit_many(1)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 0.2)
        _out, err = await _finish(proc)
        assert proc.returncode == 0 and err == b""
        await wait_until(lambda: not d.daemon.tap.clients, what="the daemon saw it leave")


async def test_cli_tap_prints_readable_lines_on_a_terminal(sim: Simulator,
                                                           tmp_path: Path) -> None:
    """On a TTY: the stdout sink's readable lines (its own formatting function)."""
    conf = _conf(tmp_path, sim.url)
    cfg = make_config(sim.url, tmp_path, exact=True,
                      sinks={"mem": {"type": "memory"}, "jobs": {"type": "memory"}})
    async with running(cfg) as d:
        await _ready(d)
        master, slave = os.openpty()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cometstream", "tap", "-c", str(conf), "--count", "4",
                stdout=slave, stderr=asyncio.subprocess.PIPE, env=cli_env(NO_COLOR="1"))
            os.close(slave)
            slave = -1
            await wait_until(lambda: d.daemon.tap.clients or proc.returncode is not None,
                             timeout=15, what="the tap connected")
            before = len(d.sink("mem").events)
            sim.emit_many(4)
            _out, err = await _finish(proc)
            assert proc.returncode == 0, err.decode()
            text = b""
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the terminal's other end is closed and drained
                    break
                if not chunk:
                    break
                text += chunk
        finally:
            os.close(master)
            if slave >= 0:
                os.close(slave)
        await wait_until(lambda: len(d.sink("mem").events) >= before + 4, what="delivery")
        expected = [pretty_line(ev, colour=False) for ev in d.sink("mem").events[before:]]
        assert text.decode().split("\r\n")[:-1] == expected
        assert b"tapping sim (all events)" in err


async def test_cli_tap_without_a_daemon_exits_1_with_one_line(tmp_path: Path) -> None:
    conf = write_config(tmp_path, "http://127.0.0.1:9/", '[sinks.mem]\ntype = "memory"\n')
    sock_path = tmp_path / "state" / "tap.sock"
    proc = await run_cli("tap", "-c", str(conf))
    out, err = await _finish(proc)
    assert proc.returncode == 1 and out == b""
    assert err.decode() == (f'cometstream tap: no running daemon for server "127.0.0.1" '
                            f"(no socket at {sock_path})\n")
    # a socket file left by a daemon that died: nothing listens
    sock_path.parent.mkdir()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_path))
    s.close()
    proc = await run_cli("tap", "-c", str(conf))
    out, err = await _finish(proc)
    assert proc.returncode == 1
    assert err.decode() == (f'cometstream tap: no running daemon for server "127.0.0.1" '
                            f"(nothing listens on {sock_path})\n")


@pytest.mark.parametrize(("args", "message"), [
    (["--types", "SEVT_JOB_COMPLETD"],
     ('cometstream tap: --types: unknown event type "SEVT_JOB_COMPLETD" '
      '(did you mean "SEVT_JOB_COMPLETED"?)')),
    (["--types", "4201,17"],
     "cometstream tap: --types: event type numbers are 4000-4999, got 17"),
    (["--sink", "mme"], 'cometstream tap: --sink: no sink named "mme" (configured: mem, jobs)'),
])
def test_cli_tap_usage_errors_exit_2_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
        message: str) -> None:
    conf = _conf(tmp_path, "http://127.0.0.1:9/")
    assert main(["tap", "-c", str(conf), *args]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == message + "\n"


def test_cli_tap_needs_no_password(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Under systemd the password is the unit's credential: the tap (run by root, outside the
    unit) must not need it, nor read a password file."""
    for var in ("CREDENTIALS_DIRECTORY", "COMETSTREAM_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    conf = tmp_path / "c.toml"
    conf.write_text(f"""
[server]
url = "http://127.0.0.1:9/"
name = "comet1"
username = "admin"
password_file = "{tmp_path / 'unreadable'}"
[state]
dir = "{tmp_path / 'state'}"
[sinks.out]
type = "stdout"
""")
    assert main(["tap", "-c", str(conf)]) == 1
    err = capsys.readouterr().err
    assert err.startswith('cometstream tap: no running daemon for server "comet1"'), err


def test_pretty_line_of_a_tapped_envelope_matches_the_sink() -> None:
    """The command rebuilds an Event from the envelope; an unknown type keeps its TypeString."""
    from cometstream.cli import _tap_pretty

    ev = Event(orjson.dumps({"Type": 4777, "TypeString": "SEVT_FUTURE", "Timestamp": 1733400000,
                             "Actor": "ops", "Data": "x"}), {}, 4777, origin="resync",
               received_at=1733400000.5, server="s")
    ev.doc = orjson.loads(ev.raw)
    assert _tap_pretty(ev.envelope(), colour=True) == (pretty_line(ev) + "\n").encode()
    assert b"SEVT_FUTURE" in _tap_pretty(ev.envelope(), colour=False)
    assert _tap_pretty(b'{"not": "an envelope"}', colour=False) == b'{"not": "an envelope"}\n'
