"""The stream session and supervisor, over real sockets against the simulator."""

from __future__ import annotations

import asyncio
import base64
import socket
from pathlib import Path

import orjson
import pytest
import structlog

from cometstream import stream
from cometstream.observe.metrics import StreamStats
from cometstream.protocol import totp_code
from cometstream.simulator import Simulator
from cometstream.stream import Session, Supervisor

from .conftest import (
    MEMORY,
    PASSWORD,
    USER,
    make_config,
    run_cli,
    running,
    toml_str,
    wait_until,
    write_toml,
)
from .peers import HELLO, scripted_server


async def test_handshake_sends_the_five_frames_exactly(sim: Simulator, tmp_path: Path) -> None:
    """Username, AuthType, Password (with spaces, quotes, &, =, unicode), empty SessionKey and TOTP."""
    async with running(make_config(sim.url, tmp_path)) as d:
        await wait_until(lambda: d.daemon.supervisor.connected, what="login")
        await wait_until(lambda: d.stats.received.get(4000), what="HELLO")
    assert sim.handshakes[0] == [USER, "Password", PASSWORD, "", ""]
    assert d.stats.connects["ok"] == 1


async def test_password_totp_login_sends_a_current_code(tmp_path: Path) -> None:
    """PasswordTOTP sends the password and the RFC 6238 code computed at login."""
    secret = base64.b32encode(b"cometstream-totp-secret!").decode()
    async with Simulator(username=USER, password=PASSWORD, totp_secret=secret, rate=0) as sim:
        cfg = make_config(sim.url, tmp_path, server={"auth_type": "PasswordTOTP",
                                                     "totp_secret": secret})
        async with running(cfg) as d:
            await wait_until(lambda: d.daemon.supervisor.connected, what="login")
        frames = sim.handshakes[0]
    assert frames[:4] == [USER, "PasswordTOTP", PASSWORD, ""]
    assert frames[4] in {totp_code(secret, at) for at in (__import__("time").time() + o
                                                          for o in (-60, -30, 0))}


async def test_session_key_login(tmp_path: Path) -> None:
    """SessionKey auth sends the key in the fourth frame and no password."""
    async with Simulator(username=USER, password="unused", session_keys=["sk-123"], rate=0) as sim:
        cfg = make_config(sim.url, tmp_path, server={"auth_type": "SessionKey",
                                                     "session_key": "sk-123"})
        async with running(cfg) as d:
            await wait_until(lambda: d.daemon.supervisor.connected, what="login")
        assert sim.handshakes[0] == [USER, "SessionKey", "", "sk-123", ""]


async def test_rejected_first_login_exits_3(sim: Simulator, tmp_path: Path) -> None:
    """A process whose first login gets 403 Unauth exits 3 with one clear line, no secret."""
    conf = write_toml(tmp_path / "c.toml", f"""
[server]
url = "{sim.url}"
username = "{USER}"
password = {toml_str("wrong password")}
[stream]
backoff_initial = 0.05
[http]
listen = ""
[state]
dir = "{tmp_path}"
[sinks.out]
type = "stdout"
""")
    proc = await run_cli("run", "-c", str(conf))
    _out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 3, err.decode()
    text = err.decode()
    assert "login rejected" in text and "403 Unauth" in text
    assert "wrong password" not in text and "Traceback" not in text
    assert sim.logins_rejected == 1 and sim.connections == 1


async def test_check_connect_reports_login(sim: Simulator, tmp_path: Path) -> None:
    """check --connect logs in once: ok with the version, or exit 3 when rejected."""
    base = f"""
[server]
url = "{sim.url}"
username = "{USER}"
[http]
listen = ""
[sinks.out]
type = "stdout"
"""
    conf = write_toml(tmp_path / "c.toml", base)
    from .conftest import cli_env

    proc = await run_cli("check", "-c", str(conf), "--connect",
                         env=cli_env(COMETSTREAM_PASSWORD=PASSWORD))
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    assert out.decode().startswith("ok: logged in") and "25.9.6" in out.decode()
    proc = await run_cli("check", "-c", str(conf), "--connect",
                         env=cli_env(COMETSTREAM_PASSWORD="nope"))
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 3
    assert "login rejected" in err.decode()


async def test_rejected_relogin_is_retried_with_backoff(sim: Simulator, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """After a good session, 403s (a restarting server) are retried with growing delays."""
    monkeypatch.setattr(stream, "STABLE_SESSION", 0.2)
    cfg = make_config(sim.url, tmp_path, stream={"backoff_initial": 0.05, "backoff_max": 1.0})
    with structlog.testing.capture_logs() as logs:
        async with running(cfg) as d:
            await wait_until(lambda: d.daemon.supervisor.connected, what="login")
            await wait_until(lambda: d.stats.received.get(4000), what="HELLO")
            sim.faults.reject_next = 3
            await sim.drop_clients()
            await wait_until(lambda: d.stats.received.get(4000) == 2, timeout=10,
                             what="re-login and HELLO")
            assert sim.logins_ok == 2
            assert d.stats.connects["rejected"] == 3
            assert d.stats.disconnects["closed"] + d.stats.disconnects["error"] >= 1
            await wait_until(lambda: d.daemon.supervisor.backoff.attempt == 0,
                             what="the backoff reset by the lasting session")
            await wait_until(lambda: d.daemon.supervisor.connected, what="connected again")
            assert not d.task.done()
    assert sim.logins_rejected == 3
    # rand=1.0 makes the jittered delays their ceilings: 0.05 after the drop, then doubling
    waits = [e["retry_in"] for e in logs
             if e["event"] in ("stream disconnected", "login rejected, retrying")]
    assert waits == [0.05, 0.1, 0.2, 0.4], logs


async def test_silent_peer_is_detected_and_replaced(sim: Simulator, tmp_path: Path) -> None:
    """A server that stops answering pings is dropped by the ping timeout (its pong missing,
    not the idle or any other deadline), and replaced."""
    cfg = make_config(sim.url, tmp_path, stream={"ping_interval": 0.2, "ping_timeout": 0.3})
    async with running(cfg) as d:
        await wait_until(lambda: d.stats.received.get(4000), what="HELLO")
        sim.faults.silent = True
        await wait_until(lambda: d.stats.disconnects["ping_timeout"] == 1, timeout=10,
                         what="ping timeout")
        assert dict(d.stats.disconnects) == {"ping_timeout": 1}
        assert "no pong within 0.3 s" in d.daemon.supervisor.last_error
        sim.faults.silent = False
        await wait_until(lambda: d.daemon.supervisor.connected and sim.logins_ok >= 2,
                         timeout=5, what="replacement session")
        sim.emit({"Type": 4201, "Data": {"GUID": "after-silence", "Status": 5000}})
        await wait_until(lambda: any(ev.doc.get("Data", {}).get("GUID") == "after-silence"
                                     for ev in d.sink("mem").events), what="event after reconnect")


async def test_idle_timeout_recycles_the_connection(sim: Simulator, tmp_path: Path) -> None:
    """With idle_timeout set, a stream with no events is recycled (pings do not count)."""
    cfg = make_config(sim.url, tmp_path, stream={"idle_timeout": 0.3, "ping_interval": 0.1})
    async with running(cfg) as d:
        await wait_until(lambda: d.stats.disconnects["idle_timeout"] >= 1, timeout=10,
                         what="idle recycle")
        await wait_until(lambda: sim.logins_ok >= 2, what="new session")


async def test_malformed_frames_are_skipped_and_the_stream_goes_on(sim: Simulator,
                                                                    tmp_path: Path) -> None:
    """Invalid JSON, arrays, binary frames, absurd nesting, a Type given twice: counted, logged,
    skipped; same session."""
    async with running(make_config(sim.url, tmp_path)) as d:
        await wait_until(lambda: d.stats.received.get(4000), what="HELLO")
        sim.emit(b"this is not json")
        sim.emit(b"[1,2,3]")
        sim.emit(b'{"NoType":true}')
        sim.emit(b"\x00\x01binary", binary=True)
        sim.emit(b"[" * 3000 + b"]" * 3000)
        sim.emit(b'{"Type":4201,"Data":{"GUID":"g-twice"},"Type":4103}')  # routed as which?
        good = sim.emit({"Type": 4201, "Data": {"GUID": "g-after", "Status": 5000}})
        await wait_until(lambda: len(d.sink("mem").events) == 2, what="good event")
        assert d.stats.malformed == 6
        assert dict(d.stats.malformed_by_reason) == {"invalid_json": 1, "not_object": 1,
                                                     "bad_type": 1, "binary": 1, "too_deep": 1,
                                                     "duplicate_key": 1}
        assert d.sink("mem").events[-1].raw == good
        assert d.daemon.supervisor.sessions == 1 and d.daemon.supervisor.connected


async def test_oversized_message_resets_and_recovers(sim: Simulator, tmp_path: Path) -> None:
    """A frame over max_message_bytes is counted, the connection reset, and the daemon goes on."""
    cfg = make_config(sim.url, tmp_path, stream={"max_message_bytes": 4096})
    async with running(cfg) as d:
        await wait_until(lambda: d.stats.received.get(4000), what="HELLO")
        sim.emit({"Type": 4102, "Data": {"Blob": "x" * 10000}})
        await wait_until(lambda: d.stats.disconnects["oversized"] == 1, what="oversized reset")
        await wait_until(lambda: sim.logins_ok == 2 and d.daemon.supervisor.connected,
                         what="reconnect")
        sim.emit({"Type": 4201, "Data": {"GUID": "small"}})
        await wait_until(lambda: any(ev.doc["Type"] == 4201 for ev in d.sink("mem").events),
                         what="next event")
        assert d.stats.malformed_by_reason["oversized"] == 1


async def test_unknown_types_and_fields_reach_the_file_byte_for_byte(sim: Simulator,
                                                                     tmp_path: Path) -> None:
    """Unknown SEVT numbers, unknown fields, u64+1 integers and unicode are written unchanged."""
    path = tmp_path / "events.jsonl"
    cfg = make_config(sim.url, tmp_path, sinks={"f": {"type": "file", "path": str(path),
                                                      "format": "event"}})
    frames = [
        b'{"Type":4990,"TypeString":"SEVT_FROM_THE_FUTURE","Brand":"new","Data":null}',
        '{"Actor":"zoë 👩‍💻","Type":4201,"Data":{"GUID":"g","TotalSize":18446744073709551616,'
        '"Neg":-9223372036854775809,"F":1.0e400}}'.encode(),
        b'{"Type":4101,"Data":"removed-user"}',
    ]
    async with running(cfg) as d:
        await wait_until(lambda: d.stats.received.get(4000), what="HELLO")
        for f in frames:
            sim.emit(f)
        await wait_until(lambda: d.sink_stats("f").delivered == 4, what="delivery")
    lines = path.read_bytes().splitlines()
    assert lines[1:] == frames
    assert d.stats.received[4990] == 1 and d.stats.malformed == 0


async def test_connection_refused_is_retried_not_fatal(tmp_path: Path) -> None:
    """No server listening: connect failures are counted and retried; the daemon stays up."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = make_config(f"http://127.0.0.1:{port}/", tmp_path)
    async with running(cfg) as d:
        await wait_until(lambda: d.stats.connects["error"] >= 3, what="retries")
        assert not d.task.done()
        assert "cannot connect" in d.daemon.supervisor.last_error
    d.task.result()  # a clean stop: it raises otherwise


async def test_hung_login_hits_the_connect_timeout(sim: Simulator, tmp_path: Path) -> None:
    """A server that accepts the upgrade but never answers the login times out and is retried."""
    sim.faults.hang_handshake = True
    cfg = make_config(sim.url, tmp_path, stream={"connect_timeout": 0.3})
    async with running(cfg) as d:
        await wait_until(lambda: d.stats.connects["timeout"] >= 2, timeout=5, what="timeouts")
        assert "timed out after 0.3 s while logging in" in d.daemon.supervisor.last_error
        sim.faults.hang_handshake = False
        await wait_until(lambda: d.daemon.supervisor.connected, timeout=5, what="login")


async def test_a_login_with_no_hello_after_it_is_replaced(sim: Simulator, tmp_path: Path) -> None:
    """A server that answers the login 200 OK and then sends nothing (no SEVT_META_HELLO, no
    event; pings answered): the connection is replaced after connect_timeout, counted as
    no_hello, rather than look connected forever with no remedial sync."""
    sim.faults.no_hello = True
    cfg = make_config(sim.url, tmp_path, stream={"connect_timeout": 0.3})
    async with running(cfg) as d:
        await wait_until(lambda: d.stats.disconnects["no_hello"] >= 2, timeout=10,
                         what="replaced")
        assert "no SEVT_META_HELLO within 0.3 s" in d.daemon.supervisor.last_error
        assert d.daemon.resyncs_ok == 0
        sim.faults.no_hello = False
        await wait_until(lambda: d.daemon.resyncs_ok == 1, timeout=10, what="HELLO and sync")
        n = d.stats.disconnects["no_hello"]
        await asyncio.sleep(0.6)  # (past connect_timeout: a session with its HELLO stays)
        assert d.stats.disconnects["no_hello"] == n and d.daemon.supervisor.connected


async def test_slow_sink_with_block_keeps_order(sim: Simulator, tmp_path: Path) -> None:
    """A block-policy sink slower than the stream loses nothing and keeps the server's order
    (a memory buffer: with the ledger's, a full queue overflows to the disk instead)."""
    cfg = make_config(sim.url, tmp_path, exact=True, spool=MEMORY,
                      sinks={"mem": {"type": "memory", "buffer": 8, "when_full": "block",
                                     "delay": 0.002}})
    async with running(cfg) as d:
        await d.synced()
        sent = sim.emit_many(300)
        await wait_until(lambda: d.sink_stats("mem").delivered == 301, timeout=10,
                         what="all delivered")
        got = [ev.raw for ev in d.sink("mem").events[1:]]
    assert got == sent
    assert [orjson.loads(x)["Type"] for x in got] == [orjson.loads(x)["Type"] for x in sent]


# --- against scripted Comet-like servers (not the simulator) ---------------------------------------
async def test_server_ping_before_the_login_reply_is_answered(tmp_path: Path) -> None:
    """A server (or proxy) that pings before answering the login is ponged, and the login works."""
    async def script(ws, frames, n):  # type: ignore[no-untyped-def]
        await ws.ping(b"early")
        await ws.send_str("200 OK")
        await ws.send_str(HELLO)
        await ws.send_str('{"Type":4201,"Data":{"GUID":"x"}}')
        async for _msg in ws:  # the session stays until the daemon ends it
            pass

    async with scripted_server(script) as (url, logins):
        async with running(make_config(url, tmp_path)) as d:
            await wait_until(lambda: len(d.sink("mem").events) == 2, what="events")
            assert d.stats.connects["rejected"] == 0 and len(logins) == 1


async def test_backoff_grows_until_a_session_proves_healthy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """200 OK followed by a close does not reset the backoff, nor does a HELLO; a session that
    lasted STABLE_SESSION does."""
    monkeypatch.setattr(stream, "STABLE_SESSION", 0.1)

    async def script(ws, frames, n):  # type: ignore[no-untyped-def]
        await ws.send_str("200 OK")
        if n in (5, 6):  # a HELLO
            await ws.send_str(HELLO)
        await asyncio.sleep(0.3 if n == 5 else 0)

    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)
        await asyncio.sleep(0)

    async with scripted_server(script) as (url, logins):
        cfg = make_config(url, tmp_path, stream={"backoff_initial": 0.05, "backoff_max": 0.3})
        stats = StreamStats()
        sup = Supervisor(cfg.server, cfg.stream, lambda ev: None, stats, rand=lambda: 1.0,
                         sleep=sleep)
        task = asyncio.create_task(sup.run())
        await wait_until(lambda: len(logins) >= 7, what="seven sessions")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # four sessions without an event: 0.05, 0.1, 0.2, 0.3 (capped); the fifth lasted: its
    # loss starts again at 0.05; the sixth had a HELLO but did not last
    assert delays[:6] == [0.05, 0.1, 0.2, 0.3, 0.05, 0.1]


def test_totp_code_is_computed_at_each_login(tmp_path: Path) -> None:
    """Each login computes the code for its own moment, not one cached at start-up."""
    secret = base64.b32encode(b"cometstream-totp-secret!").decode()
    cfg = make_config("http://127.0.0.1:1/", tmp_path,
                      server={"auth_type": "PasswordTOTP", "totp_secret": secret})
    now = [1_800_000_000.0]
    session = Session(cfg.server, cfg.stream, lambda ev: None, StreamStats(), clock=lambda: now[0])
    first = session.credentials().totp
    now[0] += 30
    second = session.credentials().totp
    assert first == totp_code(secret, 1_800_000_000.0)
    assert second == totp_code(secret, 1_800_000_030.0) and second != first


async def test_block_sink_slower_than_the_keepalive_does_not_drop_the_stream(
        sim: Simulator, tmp_path: Path) -> None:
    """A full `block` queue holds the read loop; its unread pongs and the unread events behind
    it are not a silent or idle server, so the stream is kept. (A memory buffer: with the
    ledger's, a full queue overflows to the disk and the read loop never waits.)"""
    cfg = make_config(sim.url, tmp_path, spool=MEMORY,
                      stream={"ping_interval": 0.1, "ping_timeout": 0.15, "idle_timeout": 0.5},
                      sinks={"mem": {"type": "memory", "buffer": 1, "when_full": "block",
                                     "delay": 0.6}})
    async with running(cfg) as d:
        await wait_until(lambda: d.stats.received.get(4000), what="HELLO")
        sim.set_rate(20)  # always more to read: the stream is never really idle
        # each send takes 0.6 s: the read loop is held far past ping_timeout and idle_timeout
        await wait_until(lambda: d.sink_stats("mem").delivered >= 4, timeout=30,
                         what="four slow sends")
        sim.set_rate(0)
        assert dict(d.stats.disconnects) == {}
        assert d.daemon.supervisor.sessions == 1
