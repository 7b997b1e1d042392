"""The admin API client against a scripted Comet-like HTTP server (not the simulator)."""

from __future__ import annotations

import base64
import gzip
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from cometstream.api import AdminClient, accept_encoding, api_base_url
from cometstream.errors import ApiAuthError, ApiError, ConfigError, TotpRequired
from cometstream.protocol import totp_code
from cometstream.simulator import Simulator

from .conftest import PASSWORD, USER, make_config
from .peers import serve_app

Handler = Callable[[web.Request, dict[str, str]], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def api_server(handler: Handler, prefix: str = "") -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """An HTTP server whose every POST under PREFIX/api/v1/ goes to ``handler(request, form)``."""
    forms: list[dict[str, str]] = []

    async def route(request: web.Request) -> web.StreamResponse:
        form = {k: str(v) for k, v in (await request.post()).items()}
        form["_path"] = request.path
        forms.append(form)
        return await handler(request, form)

    app = web.Application()
    app.router.add_post(prefix + "/api/v1/{tail:.*}", route)
    async with serve_app(app) as url:
        yield f"{url.rstrip('/')}{prefix}/", forms


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _client(url: str, tmp_path: Path, **server: Any) -> AdminClient:
    cfg = make_config(url, tmp_path, server=server)
    return AdminClient(cfg.server, attempts=3, retry_initial=0.01, retry_max=0.02)


async def test_calls_post_form_auth_to_kebab_case_paths_under_the_prefix(tmp_path: Path) -> None:
    """Every call is a form POST with Username/AuthType/Password to /prefix/api/v1/admin/..."""
    async def handler(request: web.Request, form: dict[str, str]) -> web.Response:
        return _json([{"GUID": "j1", "EndTime": 0}])

    async with api_server(handler, prefix="/comet") as (url, forms):
        async with _client(url, tmp_path) as api:
            jobs = await api.jobs_for_date_range(1733390000, 1733400000)
    assert jobs == [{"GUID": "j1", "EndTime": 0}]
    f = forms[0]
    assert f["_path"] == "/comet/api/v1/admin/get-jobs-for-date-range"
    assert (f["Username"], f["AuthType"], f["Password"]) == (USER, "Password", PASSWORD)
    assert (f["Start"], f["End"]) == ("1733390000", "1733400000")


async def test_null_lists_and_maps_mean_empty(tmp_path: Path) -> None:
    """JSON null where a list or a map is expected is an empty result, not an error."""
    async def handler(request: web.Request, form: dict[str, str]) -> web.Response:
        return web.Response(body=b"null", content_type="application/json")

    async with api_server(handler) as (url, _forms):
        async with _client(url, tmp_path) as api:
            assert await api.jobs_for_date_range(0, 0) == []
            assert await api.list_users_full() == {}


@pytest.mark.parametrize(("body", "http", "exc", "words"), [
    ({"Status": 403, "Message": "Unauthorised"}, 200, ApiAuthError, "Unauthorised"),
    ({"Status": 400, "Message": "Job not found"}, 200, ApiError, "Job not found"),
    ({"Status": 403, "Message": "ERR_TOTP_REQUIRED"}, 200, TotpRequired, "PasswordTOTP"),
    ({"Status": 403, "Message": "No autorizado"}, 403, ApiAuthError, "HTTP 403"),
    (None, 404, ApiError, "HTTP 404"),
    (None, 403, ApiError, "HTTP 403"),  # a proxy's page: not Comet refusing the credentials
])
async def test_errors_in_http_200_bodies_and_http_codes_are_typed(
        tmp_path: Path, body: Any, http: int, exc: type[Exception], words: str) -> None:
    """HTTP 200 + {"Status": 4xx} and HTTP 4xx both become typed, non-retryable errors."""
    async def handler(request: web.Request, form: dict[str, str]) -> web.Response:
        if body is None:
            return web.Response(text="not here", status=http)
        return _json(body, status=http)

    async with api_server(handler) as (url, forms):
        async with _client(url, tmp_path) as api:
            with pytest.raises(exc) as info:
                await api.job_properties("j1")
    assert type(info.value) is exc
    assert words in str(info.value)
    assert not info.value.retryable  # type: ignore[attr-defined]
    assert len(forms) == 1  # not retried
    assert PASSWORD not in str(info.value)


async def test_5xx_and_transport_errors_are_retried(tmp_path: Path) -> None:
    """HTTP 500/503 are retried with backoff; a success after them is returned."""
    async def handler(request: web.Request, form: dict[str, str]) -> web.Response:
        if len(forms) < 3:
            return web.Response(text="busy", status=503 if len(forms) == 1 else 500)
        return _json({"Version": "25.9.6"})

    async with api_server(handler) as (url, forms):
        async with _client(url, tmp_path) as api:
            assert (await api.meta_version())["Version"] == "25.9.6"
    assert len(forms) == 3


async def test_gives_up_after_the_attempts(tmp_path: Path) -> None:
    """A server that keeps failing gives a retryable ApiError after `attempts` tries."""
    async def handler(request: web.Request, form: dict[str, str]) -> web.Response:
        return web.Response(text="down", status=502)

    async with api_server(handler) as (url, forms):
        async with _client(url, tmp_path) as api:
            with pytest.raises(ApiError) as info:
                await api.meta_version()
    assert info.value.retryable and len(forms) == 3


async def test_connection_refused_is_a_retryable_error(tmp_path: Path) -> None:
    """Nothing listening: a retryable ApiError naming the address."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with _client(f"http://127.0.0.1:{port}/", tmp_path) as api:
        with pytest.raises(ApiError) as info:
            await api.meta_version()
    assert info.value.retryable and "cannot connect" in str(info.value)


@pytest.mark.parametrize("api_gzip", ["always", "auto"])
async def test_gzip_and_large_responses(tmp_path: Path, api_gzip: str) -> None:
    """A gzip-encoded body of 20,000 jobs is decoded in one piece: asked for (api_gzip =
    "always"), or sent unasked (a server on this machine, api_gzip = "auto", asked for none)."""
    jobs = [{"GUID": f"job-{i}", "EndTime": 1733400000 + i, "TotalSize": 18446744073709551615}
            for i in range(20000)]
    asked: list[str] = []

    async def handler(request: web.Request, form: dict[str, str]) -> web.Response:
        asked.append(request.headers.get("Accept-Encoding", ""))
        return web.Response(body=gzip.compress(orjson.dumps(jobs)),
                            headers={"Content-Encoding": "gzip",
                                     "Content-Type": "application/json"})

    async with api_server(handler) as (url, _forms):
        async with _client(url, tmp_path, api_gzip=api_gzip) as api:
            got = await api.jobs_for_date_range(1, 2)
    assert len(got) == 20000 and got[-1]["GUID"] == "job-19999"
    assert asked == ["gzip" if api_gzip == "always" else "identity"]


async def test_answers_are_asked_for_gzip_unless_the_server_is_this_machine(
        tmp_path: Path, sim: Simulator) -> None:
    """A server on a loopback address is asked for plain answers (compressing them costs both
    sides CPU and saves nothing there); any other host is asked for gzip; api_gzip overrides
    either way. What goes on the wire, as the simulator saw it."""
    def encoding(url: str, mode: str = "auto") -> str:
        return accept_encoding(make_config(url, tmp_path, server={"api_gzip": mode}).server)

    assert encoding("http://127.0.0.1:8060/") == encoding("http://[::1]/") == "identity"
    assert encoding("http://localhost:8060/") == "identity"
    assert encoding("https://comet.example.com/") == encoding("http://10.0.0.5:8060/") == "gzip"
    assert encoding("https://comet.example.com/", "never") == "identity"
    assert encoding("http://127.0.0.1/", "always") == "gzip"
    with pytest.raises(ConfigError, match="api_gzip"):
        encoding("http://127.0.0.1/", "sometimes")
    for mode, asked in (("auto", "identity"), ("always", "gzip")):
        sim.api_encodings.clear()
        cfg = make_config(sim.url, tmp_path, server={"api_gzip": mode})
        async with AdminClient(cfg.server) as api:
            await api.meta_version()
        assert sim.api_encodings == {asked: 1}


async def test_password_totp_logs_in_once_then_uses_the_session_key(tmp_path: Path) -> None:
    """PasswordTOTP: one session-start with a code, then SessionKey auth; renewed once on 403."""
    secret = base64.b32encode(b"cometstream-totp-secret!").decode()
    issued: list[str] = []

    async def handler(request: web.Request, form: dict[str, str]) -> web.Response:
        if form["_path"].endswith("/account/session-start"):
            assert form["AuthType"] == "PasswordTOTP"
            now = time.time()
            assert form["TOTP"] in {totp_code(secret, now), totp_code(secret, now - 30)}
            issued.append(f"key-{len(issued)}")
            return _json({"Status": 200, "Message": "OK", "SessionKey": issued[-1],
                          "SessionType": "admin"})
        if form.get("SessionKey") != issued[-1] or len(forms) == 3:
            return _json({"Status": 403, "Message": "Unauthorised"})  # the 2nd call: expired
        return _json({"Version": "25.9.6"})

    async with api_server(handler) as (url, forms):
        async with _client(url, tmp_path, auth_type="PasswordTOTP", totp_secret=secret) as api:
            await api.meta_version()
            await api.meta_version()
    assert issued == ["key-0", "key-1"]
    assert [f["AuthType"] for f in forms] == ["PasswordTOTP", "SessionKey", "SessionKey",
                                              "PasswordTOTP", "SessionKey"]
    assert forms[1]["SessionKey"] == "key-0" and forms[-1]["SessionKey"] == "key-1"


def test_api_base_url() -> None:
    """The API base keeps the prefix and drops a stream path or query."""
    assert api_base_url("https://h:8060/") == "https://h:8060"
    assert api_base_url("https://h/comet/") == "https://h/comet"
    assert api_base_url("wss://h/comet/api/v1/events/stream?x=1") == "https://h/comet"


async def test_numbers_beyond_a_double_in_a_response_are_parsed(tmp_path: Path) -> None:
    """A 400-digit integer (valid JSON, refused by orjson) does not fail the call."""
    async def handler(request: web.Request, form: dict[str, str]) -> web.Response:
        return web.Response(body=b'[{"GUID":"j","EndTime":5,"TotalSize":' + b"9" * 400 + b"}]",
                            content_type="application/json")

    async with api_server(handler) as (url, _forms):
        async with _client(url, tmp_path) as api:
            jobs = await api.jobs_for_date_range(1, 2)
    assert jobs[0]["TotalSize"] == int("9" * 400)
