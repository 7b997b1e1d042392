"""Seven promises of docs/security.md, docs/operations.md and docs/resync.md, each proved over
the path an operator sees: the Kafka SASL password masked, the mode warning for a sink's secret
file or TLS key, the warning about a state.dir of another user, one malformed-frame warning a
minute per reason, the 1,024-type cap of the per-type counts, the 32 MiB per-transaction bound
of the ledger, and /readyz turning 503 once remedial syncs have failed for
``unready_after_seconds``.

Peers are real sockets on 127.0.0.1: the simulator, a scripted Kafka broker that answers the
SASL login by quoting the password it was sent (as a careless broker's error message may),
/readyz and /metrics over HTTP, ``cometstream check`` and ``run`` as subprocesses.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import struct
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from cometstream.constants import SEVT_NAMES
from cometstream.delivery.ledger import Ledger
from cometstream.events import Event
from cometstream.observe import logging as obslog
from cometstream.observe.logging import MASK
from cometstream.protocol import decode_frame
from cometstream.simulator import Simulator
from cometstream.sinks import build_sink
from cometstream.store import plan as plan_mod

from .conftest import (
    PASSWORD,
    make_config,
    run_cli,
    running,
    wait_until,
    write_config,
)
from .ledger_client import Client

KIB = 1024
MIB = 1024 * 1024
#: the Kafka password: quotes, a backslash and a non-ASCII letter (escaped in JSON logs), and a
#: tail that shows in every form it could take
KAFKA_PASSWORD = 'kafka "pw"\\ é-7c1e9a4f'
KAFKA_TAIL = "7c1e9a4f"


@pytest.fixture(autouse=True)
def _forget_secrets() -> Iterator[None]:
    """Registered secrets are process-wide: each test starts and ends without any."""
    obslog._clear_secrets()
    yield
    obslog._clear_secrets()


def _conf(tmp_path: Path, url: str, body: str, *, listen: str = "") -> Path:
    """A config file for a `cometstream` subprocess (mode 0600): the server at ``url``, JSON
    logs, the metrics port on ``listen``, then ``body`` (the sinks)."""
    return write_config(tmp_path, url, body, backoff_max=0.2, listen=listen, json_logs=True,
                        mode=0o600)


async def _get(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http, \
            http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
        return r.status, await r.read()


class _Run:
    """`cometstream run -c CONF` as a real process; its JSON log lines as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self.text = ""  # everything it wrote to stderr, as text

    async def until(self, what: str, predicate: Any, timeout: float = 20.0) -> dict[str, Any]:
        """Read log lines until one satisfies ``predicate`` (fails the test on a timeout or if
        the process ends first)."""
        assert self.proc.stderr is not None
        for line in self.lines:
            if predicate(line):
                return line
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stderr.readline()
                assert raw, f"the daemon ended before {what}: {self.text}"
                self.text += raw.decode()
                try:
                    line = orjson.loads(raw)
                except orjson.JSONDecodeError:  # (not a log line: an interpreter's warning)
                    line = {"raw": raw.decode()}
                self.lines.append(line)
                if predicate(line):
                    return line

    async def stop(self) -> tuple[str, int]:
        """SIGTERM, then the rest of its output (stdout, stderr) and its exit code."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = await asyncio.wait_for(self.proc.communicate(), 20)
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
        self.text += err.decode()
        return out.decode(), self.proc.returncode or 0


@asynccontextmanager
async def _daemon(conf: Path) -> AsyncIterator[_Run]:
    run = _Run(await run_cli("run", "-c", str(conf)))
    try:
        yield run
    finally:
        if run.proc.returncode is None:
            run.proc.kill()
            await run.proc.wait()


# --- 1. the Kafka SASL password -----------------------------------------------------------------
class EchoingKafkaBroker:
    """Speaks just enough of the Kafka protocol for a SASL PLAIN login (ApiVersions v0,
    SaslHandshake v1, SaslAuthenticate v0) and refuses it with an error message quoting the
    credentials it was sent, as a careless broker or proxy may."""

    def __init__(self) -> None:
        self.tokens: list[bytes] = []
        self.bootstrap = ""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from aiokafka.protocol.admin import (  # type: ignore[import-untyped]
            ApiVersionResponse_v0,
            SaslAuthenticateResponse_v0,
            SaslHandShakeResponse_v1,
        )

        try:
            while True:
                (size,) = struct.unpack(">i", await reader.readexactly(4))
                request = await reader.readexactly(size)
                # request header v1: api_key, api_version, correlation_id, client_id
                api_key, _version, correlation = struct.unpack(">hhi", request[:8])
                (client_len,) = struct.unpack(">h", request[8:10])
                body = request[10 + max(client_len, 0):]
                response: Any
                if api_key == 18:  # ApiVersions
                    response = ApiVersionResponse_v0(0, [(18, 0, 0), (17, 0, 1), (36, 0, 0)])
                elif api_key == 17:  # SaslHandshake
                    response = SaslHandShakeResponse_v1(0, ["PLAIN"])
                elif api_key == 36:  # SaslAuthenticate: b"authzid\0user\0password"
                    (n,) = struct.unpack(">i", body[:4])
                    token = body[4:4 + n]
                    self.tokens.append(token)
                    _authz, user, password = token.decode("utf-8").split("\0")
                    response = SaslAuthenticateResponse_v0(
                        58, f"authentication failed for {user} with password {password}", b"")
                else:
                    return
                out = struct.pack(">i", correlation) + response.encode()
                writer.write(struct.pack(">i", len(out)) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[EchoingKafkaBroker]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.bootstrap = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            yield self
        finally:
            server.close()
            await server.wait_closed()


def _kafka_sink(bootstrap: str, password_file: Path) -> str:
    return f"""
[sinks.bus]
type = "kafka"
bootstrap_servers = "{bootstrap}"
topic = "comet.events"
request_timeout_ms = 2000
security_protocol = "SASL_PLAINTEXT"
sasl_mechanism = "PLAIN"
sasl_username = "relay"
sasl_password_file = "{password_file}"
"""


async def test_a_kafka_password_a_broker_echoes_is_masked_in_the_log_and_readyz(
        sim: Simulator, tmp_path: Path) -> None:
    """A broker refuses the SASL login quoting the password it was sent: aiokafka logs that
    (through the standard library), the sink fails and /readyz says why. Everything the daemon
    writes out has the password masked, in any escaped form."""
    pw_file = tmp_path / "kafka-password"
    pw_file.write_text(KAFKA_PASSWORD + "\n", encoding="utf-8")
    pw_file.chmod(0o600)
    async with EchoingKafkaBroker().serving() as broker:
        conf = _conf(tmp_path, sim.url, _kafka_sink(broker.bootstrap, pw_file),
                     listen="127.0.0.1:0")
        async with _daemon(conf) as run:
            endpoints = await run.until("the HTTP endpoints",
                                        lambda x: x.get("event") == "http endpoints")
            refused = await run.until(
                "aiokafka's line about the refused login",
                lambda x: x.get("logger", "").startswith("aiokafka")
                and "authentication failed for relay" in x.get("event", ""))
            await wait_until(lambda: bool(broker.tokens), what="the broker got the password")
            deadline = time.monotonic() + 20
            while True:
                status, body = await _get(endpoints["url"] + "/readyz")
                reasons = orjson.loads(body)["reasons"]
                if any(r.startswith("sink bus:") for r in reasons) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            out, _code = await run.stop()
    # the broker did get (and quote) the real password: what follows is the masking's doing
    assert broker.tokens[0] == b"relay\0relay\0" + KAFKA_PASSWORD.encode()
    assert MASK in refused["event"], refused
    assert status == 503 and any(r.startswith("sink bus: cannot connect to Kafka")
                                 for r in reasons), reasons
    for text in (run.text, out, body.decode()):
        assert KAFKA_TAIL not in text, text


def test_a_kafka_password_is_in_no_repr_of_the_config_or_the_sink(tmp_path: Path) -> None:
    """An inline sasl_password: neither the parsed config's repr (a Config holds every sink's
    options) nor the sink's shows it, like the server's password."""
    cfg = make_config("http://127.0.0.1:1/", tmp_path, sinks={"bus": {
        "type": "kafka", "bootstrap_servers": "127.0.0.1:1", "topic": "t",
        "security_protocol": "SASL_PLAINTEXT", "sasl_username": "relay",
        "sasl_password": KAFKA_PASSWORD}})
    sink = build_sink(cfg.sinks[0])
    assert sink.security["sasl_plain_password"] == KAFKA_PASSWORD  # type: ignore[attr-defined]
    for text in (repr(cfg), str(cfg), repr(cfg.sinks), repr(sink), str(sink)):
        assert KAFKA_TAIL not in text, text
        assert PASSWORD not in text


# --- 2. a sink's secret file or TLS key that others can read -------------------------------------
async def test_check_warns_about_a_sinks_secret_file_and_tls_key_others_can_read(
        tmp_path: Path) -> None:
    """A webhook's signing key file readable by everyone, a Kafka TLS private key readable by
    its group: ``check`` warns once for each, naming the file, its mode and the option. The CA
    and the certificate (not secrets) are not warned about; once the two are chmod 600,
    nothing is."""
    secret = tmp_path / "hook-signing-key"
    secret.write_text("sign-8d2f0c6b1e\n")
    key = tmp_path / "kafka-client.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    ca, cert = tmp_path / "kafka-ca.pem", tmp_path / "kafka-client.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    for path, mode in ((secret, 0o644), (key, 0o640), (ca, 0o644), (cert, 0o644)):
        path.chmod(mode)
    conf = _conf(tmp_path, "http://127.0.0.1:9/", f"""
[sinks.hook]
type = "webhook"
url = "http://127.0.0.1:9/in"
secret_file = "{secret}"
[sinks.bus]
type = "kafka"
bootstrap_servers = "127.0.0.1:9"
topic = "t"
security_protocol = "SSL"
ssl_cafile = "{ca}"
ssl_certfile = "{cert}"
ssl_keyfile = "{key}"
""")

    async def check() -> tuple[int, str, str]:
        proc = await run_cli("check", "-c", str(conf))
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        return proc.returncode or 0, out.decode(), err.decode()

    code, out, err = await check()
    assert (code, out.strip()) == (0, "ok"), err
    assert sorted(err.splitlines()) == sorted([
        (f"cometstream: warning: {secret} is readable by others (mode 0644) and holds secrets "
         "(sinks.hook.secret_file): chmod 600"),
        (f"cometstream: warning: {key} is readable by its group (mode 0640) and holds secrets "
         "(sinks.bus.ssl_keyfile): chmod 600"),
    ]), err
    secret.chmod(0o600)
    key.chmod(0o600)
    assert await check() == (0, "ok\n", "")


# --- 3. a state.dir of another user -------------------------------------------------------------
async def test_run_warns_when_state_dir_belongs_to_another_user(sim: Simulator,
                                                                 tmp_path: Path) -> None:
    """state.dir owned by another uid (mode 0700: only the owner-check can fire): ``run`` logs
    one warning naming the directory and both uids; a directory of our own is not warned
    about."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give the state dir to another user")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chmod(state, 0o700)
    os.chown(state, 65534, 65534)
    conf = _conf(tmp_path, sim.url, '[sinks.mem]\ntype = "memory"')
    async with _daemon(conf) as run:
        await run.until("starting", lambda x: x.get("event") == "starting")
        await run.stop()
    warned = [x for x in run.lines if x.get("event") == "state.dir is not private"]
    assert len(warned) == 1, run.text
    assert warned[0]["level"] == "warning"
    assert warned[0]["problem"] == (f"{state} is owned by uid 65534, not by this process (uid 0): "
                                    "that user can replace the daemon's files"), warned

    os.chown(state, 0, 0)  # ours, 0700: nothing to say
    with structlog.testing.capture_logs() as logs:
        async with running(make_config(sim.url, tmp_path)) as d:
            await wait_until(lambda: d.daemon.supervisor.connected, timeout=10, what="login")
    assert not [e for e in logs if e["event"] == "state.dir is not private"], logs


# --- 4. one malformed-frame warning a minute per reason ------------------------------------------
async def test_malformed_frames_log_one_warning_a_minute_per_reason(sim: Simulator,
                                                                    tmp_path: Path) -> None:
    """40 frames that are not JSON and 40 binary frames: each is counted by reason, but the log
    gets one line per reason. Once the minute has passed (the seam below), the next bad frame
    of a reason logs again, with the number suppressed since the last line.

    Seam: the rate limiter reads ``time.monotonic()`` itself and no clock is injected, so
    "a minute later" is made by setting its ``interval`` (a public attribute of the
    ``RateLimitedLog`` the connected session holds as ``malformed_log``) to 0 after checking
    that it is the documented 60 s."""
    n = 40
    with structlog.testing.capture_logs() as logs:
        async with running(make_config(sim.url, tmp_path)) as d:
            await wait_until(lambda: d.daemon.resyncs_ok >= 1, timeout=10, what="first sync")
            for i in range(n):
                sim.emit(b"{not json %d" % i)
                sim.emit(b"\x00\x01binary", binary=True)
            by_reason = d.stats.malformed_by_reason
            await wait_until(lambda: by_reason["invalid_json"] == n and by_reason["binary"] == n,
                             what="every bad frame counted")
            lines = [e for e in logs if e["event"] == "malformed frame skipped"]
            assert sorted(e["reason"] for e in lines) == ["binary", "invalid_json"], lines
            assert all(e["log_level"] == "warning" and "suppressed_since_last" not in e
                       for e in lines), lines

            session = d.daemon.supervisor.session
            assert session is not None
            rate_log = session.malformed_log
            assert rate_log.interval == 60.0  # "one warning a minute"
            rate_log.interval = 0.0  # the minute has passed, for every reason
            sim.emit(b"{not json again")
            await wait_until(lambda: by_reason["invalid_json"] == n + 1, what="one more")
            lines = [e for e in logs if e["event"] == "malformed frame skipped"]
    # the next invalid_json frame logs, with the n - 1 suppressed since the first line; no new
    # binary frame came, so no new binary line
    assert [e["reason"] for e in lines[2:]] == ["invalid_json"], lines
    assert lines[2]["suppressed_since_last"] == n - 1, lines[2]


# --- 5. the per-type counts are capped at 1,024 types ---------------------------------------------
def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_the_per_type_event_counts_keep_at_most_1024_types(sim: Simulator,
                                                                 tmp_path: Path) -> None:
    """A server sends 1,100 event types nobody knows, then a known type first seen after them:
    the daemon's per-type counts keep at most 1,024 unknown types (the rest under one key), no
    event goes uncounted, and /metrics still shows the known type under its name and the
    unknown ones as ``other``."""
    unknown = 1100
    cfg = make_config(sim.url, tmp_path, http={"listen": "127.0.0.1:0"})
    async with running(cfg) as d:
        await wait_until(lambda: d.daemon.resyncs_ok >= 1, timeout=10, what="first sync")
        for i in range(unknown):
            sim.emit({"Type": 100_000 + i, "Timestamp": 1733400000})
        sim.emit({"Type": 4103, "Actor": "u", "ResourceID": "late-login",
                  "Timestamp": 1733400001})
        await wait_until(lambda: d.sink_stats("mem").delivered == unknown + 2, timeout=20,
                         what="every event delivered")
        assert d.daemon.http is not None
        status, body = await _get(d.daemon.http.url + "/metrics")
        received = dict(d.stats.received)
    assert status == 200
    kept_unknown = [t for t in received if t not in SEVT_NAMES]
    # (the 1,024 slots hold unknown types and one key for the rest)
    assert len(kept_unknown) <= 1024 + 1, len(kept_unknown)
    assert sum(received.values()) == unknown + 2  # nothing uncounted
    m = _samples(body.decode())

    def count(type_name: str) -> float:
        return m[("cometstream_events_received_total", (("server", "sim"), ("type", type_name)))]

    assert count("other") == unknown
    assert count("SEVT_ACCOUNT_LOGIN") == 1
    assert count("SEVT_META_HELLO") == 1


# --- 6. a ledger transaction holds 32 MiB at most -----------------------------------------------
def _event(i: int, size: int) -> Event:
    doc = {"Type": 4100, "Timestamp": 1733400000 + i, "Data": {"i": f"{i:06d}", "Note": "x" * size}}
    ev = decode_frame(orjson.dumps(doc), received_at=time.time(), server="s")
    assert isinstance(ev, Event)
    ev.seq = i
    return ev


async def test_a_ledger_transaction_holds_32_mib_of_events_at_most(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-transaction bound is 32 MiB; lowered to 1 MiB here (as the other byte bounds'
    tests do), 40 events of 100 KiB waiting for the disk are committed in 4 transactions of 10,
    each within the bound, never in one. (The ledger directly: the bound is the ledger's, and
    a daemon's commits cannot be counted from outside.)"""
    assert plan_mod.COMMIT_MAX_BYTES == 32 * MIB
    budget = 1 * MIB
    monkeypatch.setattr(plan_mod, "COMMIT_MAX_BYTES", budget)
    lg = Ledger(tmp_path / "state", ["a"], server="s", max_bytes=1 << 30, max_age=86400,
                fsync_interval=0.05, client=Client({"a": 0}))  # a sink that has read nothing yet
    lg.open()
    events = [_event(i, 100 * KIB) for i in range(1, 41)]
    size = len(events[0].raw)
    assert all(len(ev.raw) == size for ev in events)
    for ev in events:
        lg.append(ev)
    per_commit: list[int] = []
    try:
        while lg.pending:
            before, commits = lg.events, lg.commits
            await lg.commit()
            assert lg.commits == commits + 1  # one transaction (less than 16 MiB waiting)
            per_commit.append(lg.events - before)
    finally:
        await lg.close()
    fits = budget // size  # events of this size a transaction may hold
    assert fits == 10
    assert len(per_commit) == math.ceil(len(events) / fits) == 4, per_commit
    assert per_commit == [fits] * 4
    assert all(n * size <= budget for n in per_commit)
    assert lg.events == 40 and lg.durable_seq == 40


# --- 7. /readyz after unready_after_seconds of failed syncs --------------------------------------
async def test_readyz_turns_503_once_syncs_have_failed_for_unready_after_seconds(
        sim: Simulator, tmp_path: Path) -> None:
    """The admin API refuses every call, so every remedial sync fails (retried in tenths of a
    second), while the stream stays connected. With unready_after_failures out of reach, /readyz
    says 503 only once the syncs have failed for ``unready_after_seconds`` (1 s): not before,
    with the reason and how long; and 200 again once a sync succeeds."""
    threshold = 1.0
    cfg = make_config(sim.url, tmp_path, http={"listen": "127.0.0.1:0"},
                      resync={"unready_after_failures": 1_000_000,
                              "unready_after_seconds": threshold})
    sim.faults.api_reject = True
    t0 = time.monotonic()  # before the first sync can start, let alone fail
    async with running(cfg) as d:
        stats = d.stats
        await wait_until(lambda: d.daemon.http is not None and d.daemon.supervisor.connected,
                         timeout=10, what="logged in")
        assert d.daemon.http is not None
        url = d.daemon.http.url + "/readyz"
        deadline = time.monotonic() + 20
        while True:
            status, body = await _get(url)
            doc = orjson.loads(body)
            why = [r for r in doc["reasons"] if r.startswith("resync: ")]
            if why:
                break
            assert time.monotonic() < deadline, "never unready"
            await asyncio.sleep(0.02)
        became_unready = time.monotonic()
        failed_runs = stats.resync_failures
        assert d.daemon.resyncs_ok == 0
        sim.faults.api_reject = False
        await wait_until(lambda: d.daemon.resyncs_ok == 1, timeout=10, what="a good sync")
        status_after, body_after = await _get(url)
    # not before unready_after_seconds of failures (measured from before the first one)
    assert became_unready - t0 >= threshold
    assert status == 503 and doc["ready"] is False, doc
    assert 1 <= failed_runs < 1_000_000
    assert "failed run" in why[0] and "since the last good one, failing for" in why[0], why
    failing_for = re.search(r"failing for (\d+) s", why[0])
    assert failing_for is not None and int(failing_for.group(1)) >= threshold, why
    assert (status_after, orjson.loads(body_after)["ready"]) == (200, True), body_after
