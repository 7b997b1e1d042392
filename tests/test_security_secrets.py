"""Secrets outside the masked logs: every string that leaves the process with text a peer wrote
(the server's login reply, an admin API error, a webhook receiver's answer) goes through the same
masking as the logs, or carries no peer text at all.

Peers are real sockets on 127.0.0.1: a scripted Comet-like server that echoes the password it was
sent, an admin API that echoes its session key, a webhook receiver that echoes the request's
Authorization header, path and query. Commands run as subprocesses where a user would run them.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import signal
import socket
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from aiohttp import web

from cometstream.cli import main
from cometstream.observe import logging as obslog
from cometstream.observe.logging import MASK, configure_logging, register_secret, scrub
from cometstream.observe.systemd import Notifier
from cometstream.simulator import Simulator

from .conftest import (
    PASSWORD,
    USER,
    cli_env,
    make_config,
    run_cli,
    running,
    toml_str,
    wait_until,
    write_config,
)
from .peers import HELLO, scripted_server

#: what of the test password may show: its distinctive start, in any form
PW_HEAD = "p@ss w&rd"
TOTP_SECRET = "JBSWY3DPEHPK3PXP"


@pytest.fixture(autouse=True)
def _forget_secrets() -> Iterator[None]:
    """Each test registers its own secrets (they are process-wide)."""
    obslog._clear_secrets()
    yield
    obslog._clear_secrets()


def _conf(tmp_path: Path, url: str, *, password: str = PASSWORD, server: str = "",
          body: str = "", mode: int = 0o600) -> Path:
    return write_config(tmp_path, url, body or '[sinks.out]\ntype = "stdout"', password=password,
                        server=server, backoff_max=0.2, stream="connect_timeout = 3", mode=mode)


async def _communicate(proc: asyncio.subprocess.Process, timeout: float = 30) -> tuple[str, str]:
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return out.decode(), err.decode()


def _echo_password(prefix: str = "403 Unauth: wrong password "):  # type: ignore[no-untyped-def]
    """A server script: answer the login with ``prefix`` + the password frame it was sent."""
    async def script(ws: web.WebSocketResponse, frames: list[str], n: int) -> None:
        await ws.send_str(prefix + frames[2])
    return script


# --- 1. the exits: check --connect, /readyz, STATUS=, dead letters -------------------------------------
async def test_check_connect_masks_the_password_a_server_echoes(tmp_path: Path) -> None:
    """A server answering a bad login with the password it was sent: ``check --connect`` says the
    login was rejected, and the password is nowhere in what it prints."""
    async with scripted_server(_echo_password()) as (url, logins):
        proc = await run_cli("check", "-c", str(_conf(tmp_path, url)), "--connect")
        out, err = await _communicate(proc)
    assert logins and logins[0][2] == PASSWORD  # the server did get the password
    assert proc.returncode == 3, err
    assert "login rejected" in err and MASK in err
    assert PW_HEAD not in err + out


async def test_readyz_and_systemd_status_mask_the_servers_echo(tmp_path: Path) -> None:
    """After a good session, the server refuses the next logins quoting the password: /readyz
    and systemd's STATUS= (readable by every local user) say why, with the password masked."""
    async def script(ws: web.WebSocketResponse, frames: list[str], n: int) -> None:
        if n == 1:
            await ws.send_str("200 OK")
            await ws.send_str(HELLO)
            await asyncio.sleep(0.2)
            return
        # a newline too: STATUS= must stay one line (a second line would be another command)
        await ws.send_str(f"403 Unauth: wrong password {frames[2]}\nREADY=1")

    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.setblocking(False)
    messages: list[str] = []
    async with scripted_server(script) as (url, _logins):
        cfg = make_config(url, tmp_path, resync={"enabled": False},
                          http={"listen": "127.0.0.1:0"})
        notifier = Notifier(env={"NOTIFY_SOCKET": str(notify_path)})
        async with running(cfg) as d:
            d.daemon.notifier = notifier  # (before the daemon's task has started)
            await wait_until(lambda: "login rejected" in d.daemon.status[1], timeout=10,
                             what="a rejected re-login")
            assert d.daemon.http is not None
            async with aiohttp.ClientSession() as http, \
                    http.get(d.daemon.http.url + "/readyz") as resp:
                status, body = resp.status, await resp.text()
            while True:
                try:
                    messages.append(notify.recv(4096).decode())
                except BlockingIOError:
                    break
    notify.close()
    assert status == 503
    reasons = orjson.loads(body)["reasons"]
    assert any("login rejected" in r and MASK in r for r in reasons), reasons
    assert PW_HEAD not in body
    statuses = [m for m in messages if m.startswith("STATUS=")]
    assert any("login rejected" in m for m in statuses), messages
    assert not any(PW_HEAD in m for m in messages), messages
    assert all("\n" not in m for m in statuses), statuses


class EchoReceiver:
    """A webhook receiver that answers every POST with ``status`` and a body quoting the request's
    Authorization header, path and query (as careless receivers do in their error pages)."""

    def __init__(self) -> None:
        self.url = ""
        self.posts = 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.posts += 1
        status = 500 if request.path.startswith("/fail") else 400
        text = (f"denied: Authorization={request.headers.get('Authorization', '')} "
                f"at {request.path_qs}")
        return web.Response(status=status, text=text)

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[EchoReceiver]:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        try:
            yield self
        finally:
            await self._runner.cleanup()


def _files_bytes(*roots: Path) -> bytes:
    data = b""
    for root in roots:
        paths = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for p in paths:
            data += p.read_bytes()
    return data


async def test_a_receiver_echoing_secrets_reaches_readyz_and_dead_letters_masked(
        tmp_path: Path) -> None:
    """Two webhook sinks whose receiver echoes the Authorization header and the URL (a
    Slack-style token in the path, a key in the query): one failing (500, /readyz says why), one
    refused (400, dead-lettered in the ledger and the dead-letter file). The token, the path
    secret and the query key are masked in /readyz and never written to disk."""
    token = "tok-9f8e7d6c5b4a39281706"  # from a file
    bearer = "Bearer " + "zq-1a2b3c4d5e6f7a8b9c0d"  # inline, under a sensitive header name
    path_secret = "T0123ABCD/B0456EFGH/XyZ123abc456DEF789ghi0"
    query_key = "qk-55aa66bb77cc88dd"
    (tmp_path / "token").write_text(token + "\n")
    (tmp_path / "token").chmod(0o600)
    dl = tmp_path / "refused.dead.jsonl"
    async with Simulator(username=USER, password=PASSWORD, rate=0, seed=7) as sim, \
            EchoReceiver().serving() as rx:
        cfg = make_config(sim.url, tmp_path, http={"listen": "127.0.0.1:0"},
                          shutdown={"timeout": 0.5}, sinks={
            "failing": {"type": "webhook", "url": f"{rx.url}/fail/{path_secret}",
                        "timeout": 2.0, "headers": {"Authorization": bearer}},
            "refused": {"type": "webhook", "url": f"{rx.url}/refuse/hook?key={query_key}",
                        "timeout": 2.0, "dead_letter": str(dl),
                        "headers": {"Authorization": {"file": str(tmp_path / "token")}}},
        })
        async with running(cfg) as d:
            d.daemon.pipeline.retry_initial = 0.01
            d.daemon.pipeline.retry_max = 0.05
            await wait_until(lambda: d.daemon.supervisor.connected, timeout=10, what="login")
            sim.emit({"Actor": "a", "Type": 4100, "Timestamp": 1733400000, "Data": {}})
            await wait_until(lambda: d.daemon.metrics.sinks["refused"].dropped["rejected"] >= 1
                             and d.daemon.metrics.sinks["failing"].failing,
                             timeout=15, what="one refused, one failing")
            assert d.daemon.http is not None
            async with aiohttp.ClientSession() as http, \
                    http.get(d.daemon.http.url + "/readyz") as resp:
                body = await resp.text()
        ledger_rows = _dead_letter_errors(tmp_path / "state")
    reasons = orjson.loads(body)["reasons"]
    assert any(r.startswith("sink failing:") and "denied" in r and MASK in r for r in reasons), \
        reasons
    secrets = (token, bearer.split()[1], "XyZ123abc456DEF789ghi0", query_key)
    for s in secrets:
        assert s not in body, s
    assert ledger_rows and all("denied" in e and MASK in e for e in ledger_rows), ledger_rows
    letters = [orjson.loads(line) for line in dl.read_bytes().splitlines()]
    assert letters and all(MASK in x["error"] for x in letters)
    on_disk = _files_bytes(tmp_path / "state", dl)
    for s in secrets:
        assert s.encode() not in on_disk, s


def _dead_letter_errors(state: Path) -> list[str]:
    db = sqlite3.connect(state / "ledger.db")
    try:
        return [row[0] for row in db.execute("SELECT error FROM dead_letters")]
    finally:
        db.close()


# --- 2. what else is masked -------------------------------------------------------------------------------
async def test_the_session_key_of_a_password_totp_login_is_masked(tmp_path: Path) -> None:
    """PasswordTOTP: the admin API's session key (obtained at the first call) is as secret as
    the password: an API error quoting it reaches ``check --connect``'s stderr masked."""
    session_key = "sess-4c1e9a77b2d84f0e9d3b6a51"
    calls: list[str] = []

    async def stream(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        for _ in range(5):
            await ws.receive_str()
        await ws.send_str("200 OK")
        await ws.send_str(HELLO)
        await asyncio.sleep(1)
        await ws.close()
        return ws

    async def api(request: web.Request) -> web.Response:
        calls.append(request.path)
        if request.path.endswith("/account/session-start"):
            return web.json_response({"SessionKey": session_key})
        form = await request.post()
        return web.Response(status=500, text=f"internal error in session {form.get('SessionKey')}")

    app = web.Application()
    app.router.add_get("/api/v1/events/stream", stream)
    app.router.add_post("/api/v1/{tail:.*}", api)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
    try:
        conf = _conf(tmp_path, url, server=f'auth_type = "PasswordTOTP"\n'
                                           f'totp_secret = "{TOTP_SECRET}"')
        proc = await run_cli("check", "-c", str(conf), "--connect")
        out, err = await _communicate(proc)
    finally:
        await runner.cleanup()
    assert any(c.endswith("/session-start") for c in calls), calls
    assert proc.returncode == 1, err
    assert "internal error in session" in err and MASK in err
    assert session_key not in err + out


async def test_a_password_of_three_characters_is_masked_with_its_line(tmp_path: Path) -> None:
    """A 1-3 character password cannot be masked inside words (every "ab1" in every line, and
    the masks would spell it out); the line holding it as a token is masked whole."""
    async with scripted_server(_echo_password()) as (url, _logins):
        proc = await run_cli("check", "-c", str(_conf(tmp_path, url, password="ab1")),
                             "--connect")
        out, err = await _communicate(proc)
    assert proc.returncode == 3, err
    assert not re.search(r"(?<!\w)ab1(?!\w)", err + out), err
    assert MASK in err
    # in the logs: an exact field, and a line that holds it; never inside a word
    register_secret("ab1")
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    structlog.get_logger("t").warning("login rejected", reply="ab1", note="tab1e stays",
                                      detail="403 Unauth: ab1")
    line = orjson.loads(buf.getvalue())
    assert line["reply"] == MASK and line["detail"] == MASK and line["note"] == "tab1e stays"


def test_secrets_in_rendered_tracebacks_are_masked() -> None:
    """The traceback structlog renders (JSON field and console) is masked like the message."""
    secret = "hunter2-is-long-enough"
    register_secret(secret)
    for fmt in ("json", "console"):
        buf = io.StringIO()
        configure_logging("info", fmt, stream=buf)
        try:
            raise RuntimeError(f"cannot open https://ops:{secret}@backup.example/")
        except RuntimeError:
            structlog.get_logger("t").exception("unexpected failure")
        text = buf.getvalue()
        assert "RuntimeError" in text and "Traceback" in text, text
        assert secret not in text, (fmt, text)
        assert MASK in text


async def test_library_tracebacks_are_one_json_line_masked(tmp_path: Path) -> None:
    """A library logging through the stdlib (aiohttp here) with a traceback: in JSON logs it is
    one JSON object per line, the traceback a field, masked like the rest."""
    secret = "qv-81c0ffee52d15ea5e"
    register_secret(secret)

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=403, text="no")

    app = web.Application()
    app.router.add_get("/{tail:.*}", refuse)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook?token={secret}"
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    try:
        async with aiohttp.ClientSession(raise_for_status=True) as http:
            try:
                async with http.get(url):
                    pass
            except aiohttp.ClientResponseError as exc:
                # as aiohttp and aiokafka log: the stdlib, exc_info, a multi-line traceback
                logging.getLogger("aiohttp.client").error("request to %s failed", url,
                                                          exc_info=exc)
    finally:
        await runner.cleanup()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1, lines
    rec = orjson.loads(lines[0])
    assert rec["logger"] == "aiohttp.client" and rec["level"] == "error"
    assert "ClientResponseError" in rec["exception"] and "403" in rec["exception"]
    assert secret not in buf.getvalue() and MASK in rec["exception"]


async def test_webhook_url_path_and_query_secrets_are_registered(tmp_path: Path) -> None:
    """A webhook sink's URL carries secrets in its path or query: once the sink is configured
    and opened they are masked wherever they would be shown."""
    from cometstream.sinks import build_sink

    path_token = "B07Q2K1LMNOP/AbCdEf0123456789ghIJklMN"
    cfg = make_config("http://127.0.0.1:1/", tmp_path, sinks={
        "slack": {"type": "webhook", "url": f"https://hooks.example/services/T0ABC1234/{path_token}"},
        "q": {"type": "webhook", "url": "https://collector.example/in?sig=9z8y7x6w5v4u&v=1"},
    })
    sinks = [build_sink(sc) for sc in cfg.sinks]
    for sink in sinks:
        await sink.open()
        await sink.aclose()
    text = scrub(f"HTTP 404 for /services/T0ABC1234/{path_token} and /in?sig=9z8y7x6w5v4u&v=1")
    assert "AbCdEf0123456789ghIJklMN" not in text and "9z8y7x6w5v4u" not in text, text
    assert "T0ABC1234" not in text and text.startswith("HTTP 404 for /services/")


@pytest.mark.parametrize("url", [
    "http://admin:hunter2zz@comet.example:port/",     # a bad port
    "http://admin:hunter2zz/x@comet.example/",        # a "/" in the password ends the host
    "ftp://admin:hunter2zz@comet.example/",           # a bad scheme
])
def test_a_config_error_never_echoes_userinfo(tmp_path: Path, url: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid server URL is shown in the error without its ``user:password@``."""
    conf = _conf(tmp_path, url)
    assert main(["check", "-c", str(conf)]) == 2
    err = capsys.readouterr().err
    assert "server.url" in err
    assert "hunter2" not in err, err


# --- 3. files others can read; tools that need no secrets -------------------------------------------------
def test_check_warns_once_about_secret_files_others_can_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An inline password in a config file others can read, a password_file its group can read:
    ``check`` says so once each, naming the file and its mode; private files say nothing."""
    conf = _conf(tmp_path, "http://127.0.0.1:1/", mode=0o644)
    assert main(["check", "-c", str(conf)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "ok"
    assert err.strip() == (f"cometstream: warning: {conf.resolve()} is readable by others "
                           "(mode 0644) and holds the password: chmod 600")
    conf.chmod(0o600)
    assert main(["check", "-c", str(conf)]) == 0
    assert capsys.readouterr().err == ""
    # a password_file (the config itself holding no secret) readable by its group
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o640)
    text = conf.read_text().replace(f"password = {toml_str(PASSWORD)}", 'password_file = "pw"')
    conf.write_text(text)
    conf.chmod(0o644)
    assert main(["check", "-c", str(conf)]) == 0
    err = capsys.readouterr().err.strip()
    assert err == (f"cometstream: warning: {pw.resolve()} is readable by its group (mode 0640) and holds "
                   "the password: chmod 600")


def test_a_webhook_url_holding_a_token_counts_as_a_secret_in_the_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Slack-style webhook URL (the token in its path) written in a config others can read
    gets the same warning as an inline password; a plain URL does not."""
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    hook = "https://hooks.example.com/services/T0001/B0002/XXXXXXXXXXXXXXXXXXXXXXXX"
    conf = _conf(tmp_path, "http://127.0.0.1:1/", mode=0o644,
                 body=f'[sinks.hook]\ntype = "webhook"\nurl = "{hook}"')
    conf.write_text(conf.read_text().replace(f"password = {toml_str(PASSWORD)}",
                                             'password_file = "pw"'))
    assert main(["check", "-c", str(conf)]) == 0
    err = capsys.readouterr().err.strip()
    assert err == (f"cometstream: warning: {conf.resolve()} is readable by others (mode 0644) "
                   "and holds secrets (sinks.hook.url): chmod 600")
    conf.write_text(conf.read_text().replace(hook, "https://receiver.example.com/comet"))
    assert main(["check", "-c", str(conf)]) == 0
    assert capsys.readouterr().err == ""


async def test_run_warns_once_in_its_log(tmp_path: Path) -> None:
    """``run`` logs the same warning once, at start."""
    conf = _conf(tmp_path, "http://127.0.0.1:9/", mode=0o604,
                 body='[log]\nformat = "json"\n[sinks.out]\ntype = "stdout"')
    proc = await run_cli("run", "-c", str(conf))
    assert proc.stderr is not None
    lines: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(20):
            while not any(x.get("event") == "starting" for x in lines):
                raw = await proc.stderr.readline()
                assert raw, "the daemon ended"
                lines.append(orjson.loads(raw))
        proc.send_signal(signal.SIGTERM)
        _rest, _ = await _communicate(proc, 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    warned = [x for x in lines if x.get("event") == "secret readable by others"]
    assert len(warned) == 1, lines
    assert warned[0]["file"] == str(conf.resolve()) and warned[0]["mode"] == "0604"
    assert warned[0]["fix"] == "chmod 600"


async def test_tap_and_dlq_list_do_not_read_secret_files(tmp_path: Path) -> None:
    """``tap`` and ``dlq list`` need neither the server's nor the sinks' secrets: they open no
    secret file (here none exists: the files are the unit's credentials, out of reach)."""
    body = """
[sinks.hook]
type = "webhook"
url = "https://receiver.example/in"
secret_file = "missing-signing-key"
headers = { Authorization = { file = "missing-token" }, X-Api-Key = { env = "HOOK_KEY_UNSET" } }
"""
    conf = _conf(tmp_path, "http://127.0.0.1:9/", body=body)
    text = conf.read_text().replace(f"password = {toml_str(PASSWORD)}",
                                    'password_file = "missing-password"')
    conf.write_text(text)
    env = cli_env()
    tap = await run_cli("tap", "-c", str(conf), env=env)
    _out, tap_err = await _communicate(tap)
    dlq = await run_cli("dlq", "list", "-c", str(conf), env=env)
    _out, dlq_err = await _communicate(dlq)
    assert tap.returncode == 1 and "no running daemon" in tap_err, tap_err
    assert dlq.returncode == 1 and "no ledger" in dlq_err, dlq_err
    for err in (tap_err, dlq_err):
        assert "missing-" not in err and "HOOK_KEY_UNSET" not in err and "config:" not in err
    # run and check do need them: there the missing file is an error naming the key
    chk = await run_cli("check", "-c", str(conf), env=env)
    _out, chk_err = await _communicate(chk)
    assert chk.returncode == 2 and "file not found" in chk_err


def test_scrub_masks_escaped_and_truncated_forms() -> None:
    """The forms a secret takes inside other text: repr and JSON escaping, percent-encoding,
    and cut short by an excerpt."""
    register_secret(PASSWORD)
    assert scrub(repr(f"x {PASSWORD} y")).count(MASK) == 1
    assert PW_HEAD not in scrub(json.dumps({"m": PASSWORD}))
    from urllib.parse import quote_plus

    assert scrub("Password=" + quote_plus(PASSWORD) + "&x=1") == f"Password={MASK}&x=1"
    cut = f"wrong password {PASSWORD}"[:25]
    assert scrub(cut + "...") == "wrong password " + MASK + "..."
    assert scrub("nothing secret here") == "nothing secret here"


def test_a_lone_surrogate_from_a_peer_is_escaped_in_every_outward_string(
        tmp_path: Path) -> None:
    """A hostile server's ``"\\ud800"`` (which no UTF-8 encoder takes) in an error message: the
    JSON log line, systemd's STATUS= (over a real datagram socket) and scrub() carry it as the
    escape ``\\ud800`` instead of raising (which killed the task that logged it)."""
    text = "list-users-full: 500 bad \ud800 reply"
    assert scrub(text) == "list-users-full: 500 bad \\ud800 reply"
    register_secret("a-registered-secret")  # (scrub's masking path too)
    assert scrub(text + " a-registered-secret").endswith(f"\\ud800 reply {MASK}")
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    structlog.get_logger("t").warning("resync failed", error=text, raw={"k\udc00": 2**70})
    line = orjson.loads(buf.getvalue())
    assert line["error"] == "list-users-full: 500 bad \\ud800 reply"
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notifier = Notifier(env={"NOTIFY_SOCKET": str(notify_path)})
    try:
        notifier.status("resync failed: " + text)
        assert notify.recv(4096) == b"STATUS=resync failed: list-users-full: 500 bad \\ud800 reply"
    finally:
        notifier.close()
        notify.close()
