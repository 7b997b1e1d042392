"""Every wait has a deadline: a slow or stalled Comet Server, and local clients of the metrics
port, cannot hold the daemon.

Over real sockets on 127.0.0.1: the simulator's admin API made to dribble its answers a byte at a
time (``Faults.api_dribble``), a `cometstream run` process killed (SIGKILL) while its remedial
sync dribbles, hundreds of slow raw TCP connections to the metrics port, /readyz and /metrics
fetched with aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from prometheus_client import CollectorRegistry

from cometstream.api import AdminClient
from cometstream.errors import ApiError, ConfigError
from cometstream.observe import http as http_mod
from cometstream.observe.http import HttpServer, is_loopback
from cometstream.simulator import Simulator

from .conftest import (
    cli_env,
    make_config,
    running,
    wait_until,
    write_config,
)

# --------------------------------------------------------------------------- helpers


async def _get(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http, \
            http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
        return r.status, await r.read()


def _gauge(text: str, name: str) -> float | None:
    m = re.search(rf'^{name}{{server="sim"}} (\S+)$', text, re.MULTILINE)
    return float(m.group(1)) if m else None


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _until_closed(r: asyncio.StreamReader, timeout: float = 10) -> bytes:
    """What the server sent on a connection until it closed it; ``b"reset"`` if it reset it
    (the peer had sent something it did not read). Fails the test if it stays open."""
    try:
        return await asyncio.wait_for(r.read(), timeout)
    except ConnectionResetError:
        return b"reset"


def _resync_reasons(d: Any) -> list[str]:
    """The /readyz reasons about the remedial sync."""
    return [r for r in d.not_ready_reasons() if r.startswith("resync: ")]


# --------------------------------------------------------------------------- the API client


async def test_an_api_call_that_dribbles_is_cut_off_at_its_deadline(sim: Simulator,
                                                                    tmp_path: Path) -> None:
    """A server that sends its answer a byte every 20 ms never trips a 30 s per-read timeout;
    the call's total deadline (call_timeout) ends it, as a retryable error naming the key."""
    sim.faults.api_dribble = 0.02  # list-users-full: kilobytes, so minutes at this pace
    cfg = make_config(sim.url, tmp_path)
    async with AdminClient(cfg.server, read_timeout=30.0, call_timeout=0.5, attempts=1) as api:
        t0 = time.monotonic()
        # (the outer deadline only stops a hang: without call_timeout this takes minutes)
        with pytest.raises(ApiError, match=r"call_timeout") as info:
            async with asyncio.timeout(20):
                await api.list_users_full()
        elapsed = time.monotonic() - t0
    assert elapsed > 0.45, elapsed  # ended by its deadline, not before
    assert info.value.retryable
    sim.faults.api_dribble = 0.0
    async with AdminClient(cfg.server, call_timeout=5.0) as api:  # an honest server: answered
        assert await api.list_users_full()


# --------------------------------------------------------------------------- the whole resync


async def test_a_dribbling_resync_is_cancelled_at_its_deadline_and_readyz_says_why(
        sim: Simulator, tmp_path: Path) -> None:
    """The admin API dribbles: each sync is cancelled at resync.timeout, counted as an error,
    logged with the reason, and retried; the live events held behind it are released within
    hold_timeout, while the sync still runs; its age is a metric; after 2 failures /readyz is
    503 with the reason; once the API answers again a sync succeeds and /readyz is 200."""
    sim.faults.api_dribble = 0.05
    cfg = make_config(sim.url, tmp_path, http={"listen": "127.0.0.1:0"},
                      resync={"call_timeout": 1.0, "timeout": 1.0, "hold_timeout": 0.5,
                              "unready_after_failures": 2, "unready_after_seconds": 600.0})
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        async with running(cfg) as d:
            stats = d.stats
            await wait_until(lambda: stats.resync_started > 0, timeout=10,
                             what="a sync running")
            assert d.daemon.http is not None
            base = d.daemon.http.url
            live = sim.emit(sim.world.login())
            # released by hold_timeout (0.5 s), not by the sync's end or failure (1 s): the
            # order of the log lines, below
            await wait_until(lambda: any(ev.raw == live for ev in d.sink("mem").events),
                             what="the held live event delivered")

            async def running_age() -> float:
                _s, body = await _get(base + "/metrics")
                return _gauge(body.decode(), "cometstream_resync_running_seconds") or 0.0

            deadline = time.monotonic() + 10
            age = await running_age()
            while age <= 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                age = await running_age()
            # seconds since a sync started: no older than the daemon (not a timestamp)
            assert 0 < age <= time.monotonic() - started

            await wait_until(lambda: stats.resync_runs["error"] >= 2, timeout=10,
                             what="two syncs cancelled at their deadline")
            status, body = await _get(base + "/readyz")
            doc = orjson.loads(body)
            assert status == 503 and doc["ready"] is False, doc
            why = [r for r in doc["reasons"] if r.startswith("resync: ")]
            assert why and "failed runs since the last good one" in why[0], doc
            assert "resync.timeout" in why[0], doc
            assert stats.resync_failures >= 2

            sim.faults.api_dribble = 0.0
            await wait_until(lambda: d.daemon.resyncs_ok >= 1, timeout=10, what="a good sync")
            status, body = await _get(base + "/readyz")
            assert (status, orjson.loads(body)) == (200, {"ready": True, "reasons": []})
            _s, text = await _get(base + "/metrics")
            assert _gauge(text.decode(), "cometstream_resync_consecutive_failures") == 0
            assert _gauge(text.decode(), "cometstream_resync_running_seconds") == 0
    failed = [e for e in logs if e.get("event") == "resync failed"]
    assert failed and all("resync.timeout" in e["error"] for e in failed), failed
    assert all(e["log_level"] == "warning" and e.get("retry_in") is not None for e in failed)
    said = [e["event"] for e in logs]
    released = said.index("resync still running: releasing the held live events")
    assert logs[released]["held"] == 1
    assert released < said.index("resync failed"), said  # before the first sync's deadline


# --------------------------------------------------------------------------- SIGKILL


class _Proc:
    """`cometstream run -c CONF` as a real process, its JSON log in a file per run."""

    def __init__(self, conf: Path, logdir: Path) -> None:
        self.conf = conf
        self.logdir = logdir
        self.runs = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path = logdir / "run-0.log"

    async def start(self) -> None:
        self.runs += 1
        self.log_path = self.logdir / f"run-{self.runs}.log"
        with self.log_path.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cometstream", "run", "-c", str(self.conf),
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                env=cli_env())

    def events(self) -> list[str]:
        out = []
        for line in self.log_path.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                doc = orjson.loads(line)
                if isinstance(doc, dict):
                    out.append(str(doc.get("event")))
        return out

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    def tail(self) -> str:
        return self.log_path.read_bytes()[-3000:].decode(errors="replace")


async def test_live_events_held_behind_a_dribbling_resync_survive_sigkill(
        sim: Simulator, tmp_path: Path) -> None:
    """A reconnect whose remedial sync dribbles (it would take minutes): live logins arrive
    behind it, the daemon is SIGKILLed while the sync still runs. They were released into the
    ledger after hold_timeout, so the next run has them in the file sink. (Logins are the kind
    no sync can recover: held only in memory, they were lost.)"""
    path = tmp_path / "events.jsonl"
    conf = write_config(tmp_path, sim.url, f"""[resync]
call_timeout = 60.0
timeout = 120.0
hold_timeout = 0.3
[spool]
fsync_interval = 0.05
[sinks.f]
type = "file"
path = "{path}"
format = "event"
""", name="sim", backoff_max=0.3, stream="connect_timeout = 2.0", json_logs=True)
    daemon = _Proc(conf, tmp_path)
    try:
        await daemon.start()
        await wait_until(lambda: "resync done" in daemon.events(), timeout=20,
                         what="the baseline sync")
        calls = sum(sim.api_calls.values())
        sim.faults.api_dribble = 0.05
        await sim.drop_clients()
        await wait_until(lambda: sim.clients >= 1 and sum(sim.api_calls.values()) > calls,
                         timeout=10, what="reconnected, the dribbling sync started")
        logins = [sim.emit(sim.world.login()) for _ in range(3)]
        # released after hold_timeout into the pipeline, and so the ledger: the file has them
        await wait_until(lambda: path.exists()
                         and set(logins) <= set(path.read_bytes().splitlines()),
                         timeout=10, what="the held logins released")
        assert daemon.events().count("resync done") == 1, daemon.tail()  # still dribbling
        await daemon.kill()

        sim.faults.api_dribble = 0.0
        await daemon.start()
        await wait_until(lambda: "resync done" in daemon.events(), timeout=20,
                         what="the sync after the restart")
        await wait_until(lambda: path.exists()
                         and set(logins) <= set(path.read_bytes().splitlines()),
                         timeout=10, what="the held logins in the file")
    finally:
        await daemon.kill()


# --------------------------------------------------------------------------- the metrics port


async def test_slow_connections_to_the_metrics_port_are_capped_and_timed_out() -> None:
    """300 raw TCP connections that send half a request and wait: at most 64 are served (the
    rest get a 503 and are closed at once), the file descriptors they cost the daemon are
    bounded, and after header_timeout the slow ones are closed and a scrape answers."""
    server = HttpServer(CollectorRegistry(), list, host="127.0.0.1", port=0,
                        header_timeout=1.0)
    await server.start()
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    ends: list[asyncio.Future[bytes]] = []
    try:
        before = _fds()
        for _ in range(300):
            r, w = await asyncio.open_connection("127.0.0.1", server.port)
            w.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # the headers never end
            conns.append((r, w))
        ends.extend(asyncio.ensure_future(_until_closed(r, timeout=30)) for r, _w in conns)
        # the 236 beyond the cap: answered 503 and closed at once (or reset: they sent data)
        await wait_until(lambda: sum(e.done() for e in ends) >= 300 - 64, what="236 refused")
        refused_ends = [e for e in ends if e.done()]
        refused = [e.result() for e in refused_ends]
        assert len(refused) == 300 - 64
        assert all(x.startswith(b"HTTP/1.1 503 ") or x == b"reset" for x in refused), refused
        assert server.connections == 64
        # ours are 300 (the client ends); the server's: 64 and no more
        assert _fds() - before <= 300 + 64 + 10, _fds() - before
        # one more, which sends nothing (a refused one that did may see a reset instead)
        r, w = await asyncio.open_connection("127.0.0.1", server.port)
        conns.append((r, w))
        refused_now = await asyncio.wait_for(r.read(), 5)
        assert refused_now.startswith(b"HTTP/1.1 503 "), refused_now

        # header_timeout: the slow ones are closed by the server, having been sent nothing
        await wait_until(lambda: server.connections == 0, timeout=10, what="slow ones closed")
        served = await asyncio.gather(*(e for e in ends if e not in refused_ends))
        assert len(served) == 64 and set(served) <= {b"", b"reset"}, served
        status, _body = await _get(server.url + "/metrics")
        assert status == 200
        status, body = await _get(server.url + "/readyz")
        assert (status, orjson.loads(body)) == (200, {"ready": True, "reasons": []})
    finally:
        for e in ends:
            e.cancel()
        for _r, w in conns:
            w.close()
        await server.stop()


async def test_a_keepalive_scraper_is_served_and_an_idle_connection_closed() -> None:
    """A client on one keep-alive connection gets every answer; left idle past
    header_timeout, the connection is closed by the server."""
    server = HttpServer(CollectorRegistry(), list, host="127.0.0.1", port=0,
                        header_timeout=0.5)
    await server.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", server.port)
        for _ in range(3):
            w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 2)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert await asyncio.wait_for(r.readexactly(3), 2) == b"ok\n"
            await asyncio.sleep(0.2)
        assert server.connections == 1
        assert await _until_closed(r) in (b"", b"reset")  # closed by the server, idle
        await wait_until(lambda: server.connections == 0, what="the idle one closed")
        w.close()
        status, _b = await _get(server.url + "/nope")
        assert status == 404
    finally:
        await server.stop()


async def test_a_listen_address_that_is_not_loopback_is_warned_about(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """At start, a warning names the address when it is not a loopback one (bound here on
    127.0.0.1 with the check made to say otherwise: the test opens no public port)."""
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    for host in ("0.0.0.0", "::", "10.1.2.3", "metrics.example.com"):
        assert not is_loopback(host)
    with structlog.testing.capture_logs() as logs:
        server = HttpServer(CollectorRegistry(), list, host="127.0.0.1", port=0)
        await server.start()
        await server.stop()
    assert not [e for e in logs if e["log_level"] == "warning"]
    monkeypatch.setattr(http_mod, "is_loopback", lambda host: False)
    with structlog.testing.capture_logs() as logs:
        server = HttpServer(CollectorRegistry(), list, host="127.0.0.1", port=0)
        await server.start()
        await server.stop()
    warned = [e for e in logs if e["log_level"] == "warning"]
    assert len(warned) == 1 and "non-loopback" in warned[0]["event"], logs
    assert warned[0]["listen"].startswith("http://127.0.0.1:")


# --------------------------------------------------------------------------- configuration


def _resync_error(tmp_path: Path, **resync: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        make_config("http://127.0.0.1:1/", tmp_path, resync=resync)
    return info.value


def test_the_deadline_keys_have_defaults_and_are_validated(tmp_path: Path) -> None:
    rs = make_config("http://127.0.0.1:1/", tmp_path).resync
    assert (rs.call_timeout, rs.timeout, rs.hold_timeout) == (60.0, 300.0, 2.0)
    assert (rs.unready_after_failures, rs.unready_after_seconds) == (3, 300.0)
    err = _resync_error(tmp_path, call_timeout=30, timeout=10)
    assert err.key == "resync.timeout" and ">= call_timeout" in str(err)
    assert _resync_error(tmp_path, call_timeout=0).key == "resync.call_timeout"
    assert _resync_error(tmp_path, hold_timeout=-1).key == "resync.hold_timeout"
    assert _resync_error(tmp_path, unready_after_failures=0).key == \
        "resync.unready_after_failures"
    assert _resync_error(tmp_path, unready_after_seconds="5m").key == \
        "resync.unready_after_seconds"
    # config.example.toml documents each key, with its default
    from cometstream.config import load_config
    from cometstream.sinks import resolve_sink_class

    example = Path(__file__).resolve().parent.parent / "config.example.toml"
    assert load_config(example, env={"COMETSTREAM_PASSWORD": "x"},
                       resolve_sink=resolve_sink_class).resync == rs


async def test_a_sync_past_its_deadline_is_a_readyz_reason_and_its_age_a_metric(
        tmp_path: Path) -> None:
    """Should a sync outlive its deadline (its cancellation held up), /readyz says so; its
    age is served either way. (No server: the daemon is built, not run.)"""
    from prometheus_client import generate_latest

    from cometstream.daemon import Daemon

    cfg = make_config("http://127.0.0.1:1/", tmp_path,
                      resync={"call_timeout": 1.0, "timeout": 5.0})
    d = Daemon(cfg, registry=CollectorRegistry())
    assert _resync_reasons(d) == []
    t = time.monotonic()
    d.metrics.stream.resync_started = t - 3
    assert _resync_reasons(d) == []
    age = _gauge(generate_latest(d.registry).decode(), "cometstream_resync_running_seconds")
    assert age is not None and 3 <= age <= 3 + (time.monotonic() - t)
    t = time.monotonic()
    d.metrics.stream.resync_started = t - 7
    (why,) = _resync_reasons(d)
    said = re.fullmatch(r"resync: running for (\d+) s, past its deadline "
                        r"\(resync\.timeout = 5 s\)", why)
    assert said is not None, why
    assert 7 <= int(said.group(1)) <= 8 + (time.monotonic() - t), why  # (rounded)


async def test_held_live_events_are_released_at_a_byte_bound(
        sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hold behind a running sync is bounded in bytes too: a few large live events (each
    keeps its parsed document) are released before the sync ends or hold_timeout passes."""
    from cometstream.delivery import gate
    monkeypatch.setattr(gate, "HOLD_MAX_BYTES", 256 * 1024)
    sim.faults.api_delay = 30.0  # the sync runs on (until the test ends)
    cfg = make_config(sim.url, tmp_path, resync={"hold_timeout": 60.0, "timeout": 900.0,
                                                 "call_timeout": 600.0})
    with structlog.testing.capture_logs() as logs:
        async with running(cfg) as d:
            await wait_until(lambda: d.stats.resync_started > 0, timeout=10,
                             what="a sync running")
            big = [sim.emit({"Type": 4100, "Data": {"i": i, "Note": "x" * 100_000}})
                   for i in range(4)]
            await wait_until(lambda: len(d.sink("mem").events) >= 4, timeout=5,
                             what="the held events released")
            assert d.stats.resync_started > 0  # the sync still runs
            sim.faults.api_delay = 0.0
    assert [ev.raw for ev in d.sink("mem").events if ev.type == 4100] == big
    (warn,) = [e for e in logs if e["event"].startswith("resync is slow: releasing")]
    assert warn["held"] == 3 and warn["held_bytes"] > 256 * 1024
