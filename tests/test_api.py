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

from cometstream.api import AdminClient, ProfileMap, accept_encoding, api_base_url
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


# --- list-users-full, one profile at a time --------------------------------------------------
_PROFILES = (
    b'{\n  "alice" : {"Username":"alice","OrganizationID":"","Sources":{"s1":{"Description":'
    b'"a } and a ] and a \\" and a {[","Statistics":{"LastBackupJob":{"Status":5000}}}},'
    b'"Devices":{"d1":{"FriendlyName":"PC"}},"Tags":[[1,2],[{"x":[]}]]},\n'
    b'  "b\\"ob" :{"Username":"b\\"ob","Note":"\\ud800 alone"},'
    b'"caf\\u00e9":{},"x\\\\y":{"Quota":1e400}\n}\n'
)


async def _users_answer(tmp_path: Path, body: bytes, then: Callable[[Any], Any] | None = None
                        ) -> Any:
    """``list_users_full()`` of a server that answers ``body`` (in pieces, as a stream: the
    server holds no copy of it), and ``then(users)`` while the client is open."""
    async def handler(request: web.Request, form: dict[str, str]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(body)
        await resp.prepare(request)
        view = memoryview(body)
        for at in range(0, len(body), 1 << 16):
            await resp.write(view[at:at + (1 << 16)])
        return resp

    async with api_server(handler) as (url, _forms):
        async with _client(url, tmp_path) as api:
            users = await api.list_users_full()
            return then(users) if then is not None else users


async def test_the_users_answer_is_read_one_profile_at_a_time(tmp_path: Path) -> None:
    """``list-users-full`` comes back as a map over the answer's bytes whose profiles are each
    parsed when read: names and values exactly as a parser of the whole answer gives them
    (escapes, brackets and quotes inside strings, numbers beyond 64 bits and beyond a double,
    a lone surrogate made U+FFFD, spaces and line breaks)."""
    import json

    users = await _users_answer(tmp_path, _PROFILES)
    assert isinstance(users, ProfileMap)
    whole = json.loads(_PROFILES)
    assert list(users) == list(whole) == ["alice", 'b"ob', "café", "x\\y"]
    assert users["alice"]["Devices"] == {"d1": {"FriendlyName": "PC"}}
    assert users['b"ob']["Note"] == "\ufffd alone"
    assert users["x\\y"] == {"Quota": float("inf")}
    assert "café" in users and "nobody" not in users and users.get("nobody") is None
    assert dict(users.items()) == {**whole, 'b"ob': {"Username": 'b"ob', "Note": "\ufffd alone"}}
    assert users["alice"] is not users["alice"]  # each reader gets profiles of its own


async def test_reading_the_users_answer_holds_its_bytes_and_one_profile(tmp_path: Path) -> None:
    """Reading every profile of a large answer, one at a time, costs its bytes and a profile
    (a parse of the whole answer costs several times its bytes, all at once)."""
    import tracemalloc

    profile = {"Sources": {f"s{i}": {"Description": "x" * 8, "Statistics": {"Size": i}}
                           for i in range(40)}, "Devices": {f"d{i}": {} for i in range(10)}}
    body = orjson.dumps({f"user{i}": profile for i in range(2_000)})
    def read(users: Any) -> int:
        return sum(len(p["Sources"]) for p in users.values())

    tracemalloc.start()
    try:
        sources = await _users_answer(tmp_path, body, read)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sources == 80_000
    # its bytes (a bytearray grown as they come, by up to an eighth) and the rest: a parse
    # of the whole answer alone is about three times its bytes here
    assert peak < 1.6 * len(body), (peak, len(body))


@pytest.mark.parametrize(("body", "expected", "scanned"), [
    (b'{"a":' + b'{"b":' * 31 + b"{}" + b"}" * 32, None, True),  # as deep as the scan follows
    (b'{"a":' + b'{"b":' * 32 + b"{}" + b"}" * 33, None, False),  # deeper
    (b'{"a":{"x":1},"b":null,"c":[1]}', {"a": {"x": 1}}, False),  # not objects: left out
    (b'{"a":{"x":1},"c":[1]}', {"a": {"x": 1}}, False),
    (b'{"a":{"x":1},"a":{"x":2}}', {"a": {"x": 2}}, False),  # a name twice: the last
    (b'{"a":{"x":1}}  ', {"a": {"x": 1}}, True),
    (b" { } ", {}, True),
])
async def test_other_users_answers_are_parsed_whole(tmp_path: Path, body: bytes,
                                                    expected: Any, scanned: bool) -> None:
    """An answer the scan does not take (nesting beyond it, a value that is not a profile, a
    name given twice) is parsed whole, as any answer."""
    users = await _users_answer(tmp_path, body)
    assert isinstance(users, ProfileMap) is scanned
    if expected is None:
        expected = {k: v for k, v in orjson.loads(body).items() if isinstance(v, dict)}
    assert dict(users.items()) == expected


@pytest.mark.parametrize(("body", "when"), [
    (b'{"a":{"x":1}} trailing', "call"),
    (b'{"a":{"x":1},"b":{"x":tru}}', "read"),
    (b'{"a":{"x":1},"b":{"x":1]}', "read"),
    (b'{"a":{"x":1},"b":{"x":1}', "call"),  # cut short
    (b'{"a":{"x":tru},"a":{"x":1}}', "call"),  # given twice, the first not JSON
    (b'{"a":{"x":"\xff"},"a":{"x":1}}', "call"),
])
async def test_a_users_answer_that_is_not_json_is_an_error(tmp_path: Path, body: bytes,
                                                           when: str) -> None:
    """Not JSON: an ApiError (not retried) at the call, or, inside a profile (the scan checks
    its strings and brackets, the parse the rest), when that profile is read."""
    if when == "call":
        with pytest.raises(ApiError, match="not JSON") as info:
            await _users_answer(tmp_path, body)
    else:
        users = await _users_answer(tmp_path, body)
        assert users["a"] == {"x": 1}
        with pytest.raises(ApiError, match="not JSON") as info:
            users["b"]
    assert not info.value.retryable


async def test_a_users_answer_that_is_an_error_is_typed(tmp_path: Path) -> None:
    with pytest.raises(ApiAuthError, match="Unauthorised"):
        await _users_answer(tmp_path, orjson.dumps({"Status": 403, "Message": "Unauthorised"}))


def _random_text(rng: Any) -> str:
    alphabet = 'ab{}[]"\\,:/ \n\t\u00e9\u20ac\U0001f600'
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))


def _random_value(rng: Any, depth: int) -> Any:
    kind = rng.randrange(8 if depth < 6 else 4)
    if kind == 0:
        return rng.choice([None, True, False, 0, -1, 2**63 - 1, 1.5e-7, -0.0])
    if kind in (1, 2, 3):
        return _random_text(rng)
    if kind in (4, 5):
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {_random_text(rng): _random_value(rng, depth + 1) for _ in range(rng.randrange(5))}


async def test_random_users_answers_read_one_profile_at_a_time_as_parsed_whole(
        tmp_path: Path) -> None:
    """Profiles of random JSON (strings full of brackets, quotes, backslashes and non-ASCII,
    nested lists and objects), written compact and spaced out: each reads back as a parse of
    the whole answer gives it."""
    import json
    import random

    rng = random.Random(7)
    users = {f"u{i}{_random_text(rng)}": {"P": _random_value(rng, 0)} for i in range(300)}
    for body in (orjson.dumps(users), json.dumps(users, indent=1, ensure_ascii=True).encode()):
        read = await _users_answer(tmp_path, body)
        assert isinstance(read, ProfileMap)
        assert list(read) == list(users)
        assert dict(read.items()) == orjson.loads(body)
