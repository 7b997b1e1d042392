"""The simulated Comet Server's admin HTTP API, exercised with a plain aiohttp client over 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import orjson
import pytest

from cometstream.simulator import JOB_DETAIL_KEYS, STREAM_PATH, Simulator, totp_code

from .conftest import wait_until

AUTH = {"Username": "admin", "AuthType": "Password", "Password": "admin"}
UNAUTHORISED = {"Status": 403, "Message": "Unauthorised"}
TOTP_REQUIRED = {"Status": 403, "Message": "ERR_TOTP_REQUIRED"}
CLOSED_TYPES = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
PROFILE_KEYS_IN_ORDER = ("Username", "AccountName", "LocalTimezone", "LanguageCode")
LIVE_KEYS = (
    "Username",
    "DeviceID",
    "ReportedVersion",
    "ReportedPlatform",
    "ReportedPlatformVersion",
    "DeviceTimeZone",
    "IPAddress",
    "ConnectionTime",
    "AllowsFilenames",
)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(rate=0, seed=1) as simulator:
        yield simulator


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    server: Simulator,
    session: aiohttp.ClientSession,
    path: str,
    auth: dict[str, str] | None = None,
    **params: Any,
) -> tuple[int, Any]:
    """POST a form to ``/api/v1/<path>``; the HTTP status and the decoded JSON body."""
    form = {**(AUTH if auth is None else auth), **{k: str(v) for k, v in params.items()}}
    async with session.post(server.url + "api/v1/" + path, data=form) as resp:
        return resp.status, orjson.loads(await resp.read())


async def ok(server: Simulator, session: aiohttp.ClientSession, path: str, **params: Any) -> Any:
    """The body of a call that must succeed with HTTP 200."""
    status, body = await call(server, session, path, **params)
    assert status == 200, body
    if isinstance(body, dict) and set(body) == {"Status", "Message"}:
        assert body["Status"] == 200, body
    return body


def assert_job(job: dict[str, Any]) -> None:
    assert list(job) == [k for k in JOB_DETAIL_KEYS if k in job]
    assert list(job)[:6] == ["GUID", "Username", "Classification", "Status", "StartTime", "EndTime"]
    assert list(job)[-3:] in (
        ["Progress", "DestinationSizeStart", "DestinationSizeEnd"],
        ["DestinationSizeStart", "DestinationSizeEnd", "Tags"],
    )


@contextlib.asynccontextmanager
async def stream(
    server: Simulator, frames: Sequence[str] = ("admin", "Password", "admin", "", "")
) -> AsyncIterator[tuple[str, aiohttp.ClientWebSocketResponse]]:
    """A raw websocket on the stream, logged in with `frames`; yields (answer, ws)."""
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(server.url + STREAM_PATH.lstrip("/")) as ws,
    ):
        for frame in frames:
            await ws.send_str(frame)
        answer = await ws.receive(timeout=2)
        yield answer.data, ws


async def stream_login(server: Simulator, frames: Sequence[str]) -> str:
    async with stream(server, frames) as (answer, _):
        return str(answer)


# --------------------------------------------------------------------- endpoint shapes


async def test_meta_version_matches_the_stream_hello(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """AdminMetaVersion carries the HELLO's ServerStartHash/StartTime and the current time."""
    async with stream(sim) as (answer, ws):
        assert answer == "200 OK"
        hello = orjson.loads((await ws.receive(timeout=2)).data)["Data"]
    info = await ok(sim, http, "admin/meta/version")
    assert list(info) == list(hello)
    assert info["ServerStartHash"] == hello["ServerStartHash"] == sim.server_start_hash
    assert info["ServerStartTime"] == hello["ServerStartTime"] == sim.server_start_time
    assert abs(info["CurrentTime"] - time.time()) <= 2
    assert info["AuthenticationRole"] is True and info["Version"] == "25.9.6"
    await sim.restart()
    again = await ok(sim, http, "admin/meta/version")
    assert again["ServerStartHash"] != info["ServerStartHash"]


async def test_jobs_for_date_range_rules(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """Started-or-ended within [Start, End], Start/End swapped, (0,0) = incomplete jobs only,
    null when empty."""
    world = sim.world
    t0 = int(time.time()) + 10 * 86400  # clear of the generated history
    done = world.start_job(t0)["Data"]["GUID"]
    world.complete_job(done, t0 + 1000, status=5000)
    running = world.start_job(t0 + 2000)["Data"]["GUID"]

    async def guids(start: int, end: int) -> set[str]:
        jobs = await ok(sim, http, "admin/get-jobs-for-date-range", Start=start, End=end)
        assert jobs is not None
        for job in jobs:
            assert_job(job)
        return {job["GUID"] for job in jobs}

    assert await guids(t0 - 10, t0) == {done}  # started in range
    assert await guids(t0 + 500, t0 + 1500) == {done}  # ended in range, started before it
    assert await guids(t0 + 1500, t0 + 500) == {done}  # swapped
    assert await guids(t0 + 1900, t0 + 2100) == {running}  # running: started in range
    assert await guids(t0 - 10, t0 + 3000) == {done, running}
    incomplete = await ok(sim, http, "admin/get-jobs-for-date-range", Start=0, End=0)
    assert {j["GUID"] for j in incomplete} == set(world.running) >= {running}
    assert all(j["EndTime"] == 0 and 6000 <= j["Status"] <= 6999 for j in incomplete)
    assert done not in {j["GUID"] for j in incomplete}
    # the seeded history is found by a window over the past days
    past = await guids(t0 - 20 * 86400, t0 - 5 * 86400)
    assert len(past) > 20 and done not in past
    # nothing in range: JSON null (Comet's nil slice), or [] without the null_lists fault
    assert (
        await ok(sim, http, "admin/get-jobs-for-date-range", Start=t0 + 9000, End=t0 + 9999) is None
    )
    sim.faults.null_lists = False
    assert (
        await ok(sim, http, "admin/get-jobs-for-date-range", Start=t0 + 9000, End=t0 + 9999) == []
    )


async def test_missing_or_bad_parameters_are_http_200_status_400(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """A missing or non-integer parameter is HTTP 200 with {"Status":400,...}."""
    for path, params in (
        ("admin/get-jobs-for-date-range", {"Start": 0}),
        ("admin/get-jobs-for-date-range", {"End": 0}),
        ("admin/get-jobs-for-date-range", {"Start": "yesterday", "End": 0}),
        ("admin/get-job-properties", {}),
        ("admin/get-user-profile", {}),
        ("admin/get-jobs-for-user", {}),
    ):
        status, body = await call(sim, http, path, **params)
        assert status == 200 and list(body) == ["Status", "Message"], (path, body)
        assert body["Status"] == 400 and body["Message"], (path, body)


async def test_job_lists_and_job_properties(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """get-jobs-all/recent/for-user and get-job-properties answer from the world's jobs."""
    world = sim.world
    everything = await ok(sim, http, "admin/get-jobs-all")
    assert [j["GUID"] for j in everything] == list(world.jobs)
    recent = await ok(sim, http, "admin/get-jobs-recent")
    day_ago = time.time() - 86400 - 5
    assert set(world.running) <= {j["GUID"] for j in recent}
    assert all(j["EndTime"] == 0 or j["EndTime"] >= day_ago for j in recent)
    assert 0 < len(recent) < len(everything)
    user = next(iter(world.users))
    mine = await ok(sim, http, "admin/get-jobs-for-user", TargetUser=user)
    assert mine and all(j["Username"] == user for j in mine)
    assert len(mine) == sum(1 for j in world.jobs.values() if j["Username"] == user)
    assert await ok(sim, http, "admin/get-jobs-for-user", TargetUser="nobody") is None
    guid = next(iter(world.running))
    job = await ok(sim, http, "admin/get-job-properties", JobID=guid)
    assert_job(job)
    assert job == orjson.loads(orjson.dumps(world.job(guid)))
    assert (await call(sim, http, "admin/get-job-properties", JobID="no-such-job")) == (
        200,
        {"Status": 400, "Message": "Job not found"},
    )


async def test_users_profiles_and_hashes(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """list-users, list-users-full, get-user-profile(-hash, -and-hash); unknown user → Status 400."""
    world = sim.world
    names = await ok(sim, http, "admin/list-users")
    assert names == list(world.users)
    full = await ok(sim, http, "admin/list-users-full")
    assert list(full) == names
    user = names[0]
    profile = await ok(sim, http, "admin/get-user-profile", TargetUser=user)
    assert profile == full[user] == orjson.loads(orjson.dumps(world.users[user]))
    assert tuple(profile)[:4] == PROFILE_KEYS_IN_ORDER
    hashed = await ok(sim, http, "admin/get-user-profile-hash", TargetUser=user)
    assert list(hashed) == ["Status", "Message", "ProfileHash"]
    assert hashed["Status"] == 200 and hashed["ProfileHash"] == world.profile_hash(user)
    both = await ok(sim, http, "admin/get-user-profile-and-hash", TargetUser=user)
    assert list(both) == ["Status", "Message", "ProfileHash", "Profile"]
    assert both["ProfileHash"] == hashed["ProfileHash"] and both["Profile"] == profile
    for path in ("get-user-profile", "get-user-profile-hash", "get-user-profile-and-hash"):
        assert await call(sim, http, "admin/" + path, TargetUser="nobody") == (
            200,
            {"Status": 400, "Message": "User not found"},
        )
    world.users.clear()
    assert await ok(sim, http, "admin/list-users") is None
    assert await ok(sim, http, "admin/list-users-full") is None
    sim.faults.null_lists = False
    assert await ok(sim, http, "admin/list-users") == []
    assert await ok(sim, http, "admin/list-users-full") == {}


async def test_dispatcher_list_active(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """{live-connection GUID: LiveUserConnection}, optional UserNameFilter, null when empty."""
    live = await ok(sim, http, "admin/dispatcher/list-active")
    assert live == sim.world.live_connections() and len(live) > 3
    for guid, conn in live.items():
        assert len(guid) == 36 and tuple(conn) == LIVE_KEYS
        assert conn["DeviceID"] in sim.world.users[conn["Username"]]["Devices"]
    user = next(iter(live.values()))["Username"]
    only = await ok(sim, http, "admin/dispatcher/list-active", UserNameFilter=user)
    assert only and {c["Username"] for c in only.values()} == {user}
    sim.world.live.clear()
    assert await ok(sim, http, "admin/dispatcher/list-active") is None


async def test_unknown_path_and_wrong_method(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """Unknown /api/v1/ paths are HTTP 404 with a CometAPIResponseMessage; GET is refused."""
    status, body = await call(sim, http, "admin/get-jobs-for-custom-search")
    assert status == 404 and body["Status"] == 404 and body["Message"]
    status, body = await call(sim, http, "events/stream")  # a POST to the stream's path
    assert status == 404 and body["Status"] == 404
    async with http.get(sim.url + "api/v1/admin/list-users") as resp:
        assert resp.status == 405 and (await resp.json())["Status"] == 405
    assert sim.api_calls["/api/v1/admin/get-jobs-for-custom-search"] == 1


# --------------------------------------------------------------------- authentication


async def test_bad_credentials_are_http_200_unauthorised(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """Wrong password/user/auth type, or no auth at all: HTTP 200 {"Status":403,"Message":"Unauthorised"}."""
    for auth in (
        {**AUTH, "Password": "wrong"},
        {**AUTH, "Username": "root"},
        {**AUTH, "AuthType": "TOTP"},
        {"Username": "admin", "Password": "admin"},
        {},
        {"Username": "admin", "AuthType": "SessionKey", "SessionKey": ""},
    ):
        assert await call(sim, http, "admin/list-users", auth=auth) == (200, UNAUTHORISED)
    async with http.post(
        sim.url + "api/v1/admin/list-users",
        data=orjson.dumps(AUTH),
        headers={"Content-Type": "application/json"},
    ) as resp:  # the auth must be form fields, not JSON
        assert resp.status == 200 and await resp.json() == UNAUTHORISED


async def test_password_totp_on_the_api() -> None:
    """PasswordTOTP: no code → ERR_TOTP_REQUIRED, wrong code → Unauthorised, right code → OK."""
    secret = "JBSWY3DPEHPK3PXP"
    async with (
        Simulator(password="pw", totp_secret=secret, rate=0, seed=1) as server,
        aiohttp.ClientSession() as http,
    ):
        base = {"Username": "admin", "AuthType": "PasswordTOTP", "Password": "pw"}
        path = "admin/meta/version"
        assert await call(server, http, path, auth=base) == (200, TOTP_REQUIRED)
        assert await call(server, http, path, auth={**base, "TOTP": ""}) == (200, TOTP_REQUIRED)
        wrong = f"{(int(totp_code(secret)) + 500_000) % 1_000_000:06d}"
        assert await call(server, http, path, auth={**base, "TOTP": wrong}) == (200, UNAUTHORISED)
        bad_pw = {**base, "Password": "nope"}
        assert await call(server, http, path, auth=bad_pw) == (200, UNAUTHORISED)
        status, info = await call(server, http, path, auth={**base, "TOTP": totp_code(secret)})
        assert status == 200 and info["ServerStartHash"] == server.server_start_hash
        # without totp_required a plain Password login still works
        plain = {"Username": "admin", "AuthType": "Password", "Password": "pw"}
        assert (await call(server, http, path, auth=plain))[1]["Version"] == "25.9.6"


async def test_totp_required_refuses_password_only_logins() -> None:
    """With totp_required, AuthType=Password gets ERR_TOTP_REQUIRED on the API, 403 Unauth on the stream."""
    secret = "JBSWY3DPEHPK3PXP"
    async with (
        Simulator(password="pw", totp_secret=secret, totp_required=True, rate=0, seed=1) as server,
        aiohttp.ClientSession() as http,
    ):
        plain = {"Username": "admin", "AuthType": "Password", "Password": "pw"}
        assert await call(server, http, "admin/list-users", auth=plain) == (200, TOTP_REQUIRED)
        assert await stream_login(server, ["admin", "Password", "pw", "", ""]) == "403 Unauth"
        code = totp_code(secret)
        assert await stream_login(server, ["admin", "PasswordTOTP", "pw", "", code]) == "200 OK"


@pytest.mark.parametrize("multipart", [False, True])
async def test_tricky_password_is_form_decoded(multipart: bool) -> None:
    """Spaces, quotes, &, =, +, %, a backslash and non-ASCII survive urlencoded and multipart bodies."""
    password = " p\"a's &w=rd+1%20 \\ ünïcødé 🔑 "
    async with Simulator(username="ops@example.com", password=password, rate=0, seed=1) as server:
        auth = {"Username": "ops@example.com", "AuthType": "Password", "Password": password}
        async with aiohttp.ClientSession() as http:
            form = aiohttp.FormData(default_to_multipart=multipart)
            for key, value in auth.items():
                form.add_field(key, value)
            async with http.post(server.url + "api/v1/admin/list-users", data=form) as resp:
                assert resp.status == 200
                assert isinstance(await resp.json(), list)
            # the same with %20 instead of + for spaces (both are valid form encodings)
            body = urllib.parse.urlencode(auth, quote_via=urllib.parse.quote)
            async with http.post(
                server.url + "api/v1/admin/list-users",
                data=body.encode(),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            ) as resp:
                assert isinstance(await resp.json(), list)
            stripped = {**auth, "Password": password.strip()}
            assert await call(server, http, "admin/list-users", auth=stripped) == (
                200,
                UNAUTHORISED,
            )


async def test_session_key_works_on_the_api_and_the_stream(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """session-start issues a key accepted by the API and the stream until revoked or expired."""
    started = await ok(sim, http, "admin/account/session-start")
    assert list(started) == ["Status", "Message", "SessionKey", "SessionType"]
    assert started["Status"] == 200 and started["SessionType"] == "admin"
    key = started["SessionKey"]
    assert len(key) >= 16
    by_key = {"Username": "admin", "AuthType": "SessionKey", "SessionKey": key}
    status, names = await call(sim, http, "admin/list-users", auth=by_key)
    assert status == 200 and names == list(sim.world.users)
    assert await stream_login(sim, ["admin", "SessionKey", "", key, ""]) == "200 OK"
    revoked = await call(sim, http, "admin/account/session-revoke", auth=by_key)
    assert revoked == (200, {"Status": 200, "Message": "OK"})
    assert await call(sim, http, "admin/list-users", auth=by_key) == (200, UNAUTHORISED)
    assert await stream_login(sim, ["admin", "SessionKey", "", key, ""]) == "403 Unauth"
    # revoking needs a session key; expire_sessions() ends every session
    assert (await call(sim, http, "admin/account/session-revoke"))[1]["Status"] == 400
    second = (await ok(sim, http, "admin/account/session-start"))["SessionKey"]
    assert second != key and second in sim.session_keys
    sim.expire_sessions()
    expired = {**by_key, "SessionKey": second}
    assert await call(sim, http, "admin/list-users", auth=expired) == (200, UNAUTHORISED)


async def test_gzip_when_asked() -> None:
    """Accept-Encoding: gzip gets a gzip body; without it the body is plain."""
    async with (
        Simulator(rate=0, seed=1) as server,
        aiohttp.ClientSession(auto_decompress=False) as http,
    ):
        url = server.url + "api/v1/admin/list-users-full"
        async with http.post(url, data=AUTH, headers={"Accept-Encoding": "gzip"}) as resp:
            assert resp.status == 200 and resp.headers["Content-Encoding"] == "gzip"
            raw = await resp.read()
        full = orjson.loads(gzip.decompress(raw))
        assert list(full) == list(server.world.users)
        assert len(raw) < len(orjson.dumps(full)) / 2
        for accept in ("identity", "gzip;q=0"):
            async with http.post(url, data=AUTH, headers={"Accept-Encoding": accept}) as resp:
                assert "Content-Encoding" not in resp.headers
                assert orjson.loads(await resp.read()) == full


async def test_a_large_answer_is_one_gzip_member_deflated_in_pieces() -> None:
    """Past a megabyte the answer is gzipped in pieces on threads: still one gzip member that
    any client decodes (the standard library, aiohttp), as large as a one-piece encoding at the
    same level."""
    import zlib

    from cometstream.simulator.api import GZIP_LEVEL, PARALLEL_GZIP_MIN, gzip_parallel

    async with Simulator(rate=0, seed=1) as server:
        server.world.max_jobs = 10_000
        for _ in range(3000):
            server.world.complete_job(server.world.start_job()["Data"]["GUID"])
        url = server.url + "api/v1/admin/get-jobs-all"
        async with (aiohttp.ClientSession(auto_decompress=False) as http,
                    http.post(url, data=AUTH, headers={"Accept-Encoding": "gzip"}) as resp):
            assert resp.headers["Content-Encoding"] == "gzip"
            raw = await resp.read()
        plain = gzip.decompress(raw)
        assert len(plain) >= 2 * PARALLEL_GZIP_MIN
        assert orjson.loads(plain) == list(server.world.jobs.values())
        assert len(raw) < len(zlib.compress(plain, GZIP_LEVEL)) * 1.01
        async with (aiohttp.ClientSession() as http,
                    http.post(url, data=AUTH, headers={"Accept-Encoding": "gzip"}) as resp):
            assert orjson.loads(await resp.read()) == orjson.loads(plain)
    for body in (b"", b"x", b"ab" * (1 << 21) + b"c", bytes(range(256)) * 20_000):
        assert gzip.decompress(await gzip_parallel(body)) == body


# --------------------------------------------------------------------- world changes


async def test_cancel_silently_emits_nothing_but_the_api_shows_the_final_status(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """A job cancelled (7005) or abandoned (7007) without an event is final on the API."""
    async with stream(sim) as (answer, ws):
        assert answer == "200 OK"
        await ws.receive(timeout=2)  # HELLO
        await sim.wait_for_clients(1)
        cancelled = orjson.loads(sim.emit(sim.world.start_job()))["ResourceID"]
        abandoned = orjson.loads(sim.emit(sim.world.start_job()))["ResourceID"]
        for _ in range(2):
            assert orjson.loads((await ws.receive(timeout=2)).data)["TypeString"] == "SEVT_JOB_NEW"
        sent = len(sim.sent)
        job = sim.world.cancel_silently(cancelled)
        assert job["Status"] == 7005 and job["EndTime"] > 0
        assert sim.world.abandon(abandoned)["Status"] == 7007
        sim.emit({"marker": 1})
        assert orjson.loads((await ws.receive(timeout=2)).data) == {"marker": 1}
        assert len(sim.sent) == sent + 1
    for guid, status in ((cancelled, 7005), (abandoned, 7007)):
        job = await ok(sim, http, "admin/get-job-properties", JobID=guid)
        assert job["Status"] == status and job["EndTime"] >= job["StartTime"] > 0
        assert "CancellationID" not in job
    incomplete = await ok(sim, http, "admin/get-jobs-for-date-range", Start=0, End=0)
    assert not {cancelled, abandoned} & {j["GUID"] for j in incomplete or []}
    with pytest.raises(LookupError):
        sim.world.cancel_silently(cancelled)
    with pytest.raises(ValueError):
        sim.world.cancel_silently(next(iter(sim.world.running)), status=6001)


async def test_jobs_of_the_generator_while_no_client_listens_are_in_the_api(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """Events generated while nobody is connected still change the world: resync finds them."""
    assert sim.clients == 0
    start = int(time.time())
    sim.set_rate(400)

    def generated(type_name: str) -> int:
        return sum(1 for raw in sim.sent if type_name.encode() in raw)

    await wait_until(lambda: generated("SEVT_JOB_COMPLETED") >= 3 and generated("SEVT_JOB_NEW"),
                     what="jobs started and completed")
    sim.set_rate(0)
    events = [orjson.loads(raw) for raw in sim.sent]
    completed = {
        e["ResourceID"]: e["Data"] for e in events if e["TypeString"] == "SEVT_JOB_COMPLETED"
    }
    started = {e["ResourceID"] for e in events if e["TypeString"] == "SEVT_JOB_NEW"}
    assert len(completed) >= 3 and started
    jobs = await ok(
        sim, http, "admin/get-jobs-for-date-range", Start=start - 5, End=int(time.time()) + 5
    )
    by_guid = {j["GUID"]: j for j in jobs}
    for guid, final in completed.items():
        assert by_guid[guid]["Status"] == final["Status"] and by_guid[guid]["EndTime"] > 0
    assert started <= set(by_guid)
    running = {
        j["GUID"] for j in await ok(sim, http, "admin/get-jobs-for-date-range", Start=0, End=0)
    }
    assert running == set(sim.world.running) and started - set(completed) <= running


async def test_job_completion_changes_statistics_only(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """A finished job updates LastBackupJob and the vault size with no account event;
    update_account changes a real setting and returns SEVT_ACCOUNT_UPDATED."""
    world = sim.world
    user = next(u for u, p in world.users.items() if p["Sources"])

    def settings(profile: dict[str, Any]) -> dict[str, Any]:
        out = dict(profile)
        for key in ("Sources", "Destinations"):
            out[key] = {
                i: {k: v for k, v in c.items() if k != "Statistics"}
                for i, c in profile[key].items()
            }
        return out

    before = await ok(sim, http, "admin/get-user-profile-and-hash", TargetUser=user)
    sent = len(sim.sent)
    guid = orjson.loads(sim.emit(world.start_job(username=user)))["ResourceID"]
    job = orjson.loads(sim.emit(world.complete_job(guid, status=5000)))["Data"]
    assert [orjson.loads(r)["TypeString"] for r in sim.sent[sent:]] == [
        "SEVT_JOB_NEW",
        "SEVT_JOB_COMPLETED",
    ]
    after = await ok(sim, http, "admin/get-user-profile-and-hash", TargetUser=user)
    profile = after["Profile"]
    stats = profile["Sources"][job["SourceGUID"]]["Statistics"]
    assert stats["LastBackupJob"] == job and stats["LastSuccessfulBackupJob"] == job
    vault = profile["Destinations"][job["DestinationGUID"]]["Statistics"]
    assert vault["ClientProvidedSize"]["Size"] == job["DestinationSizeEnd"]["Size"]
    assert settings(profile) == settings(before["Profile"])
    assert after["ProfileHash"] != before["ProfileHash"]  # the hash covers statistics by default
    world.hash_statistics = False
    stable = world.profile_hash(user)
    world.complete_job(world.start_job(username=user)["ResourceID"], status=7002)
    assert world.profile_hash(user) == stable
    updated = world.update_account(user)
    assert updated["TypeString"] == "SEVT_ACCOUNT_UPDATED" and updated["ResourceID"] == user
    assert world.profile_hash(user) != stable
    now = await ok(sim, http, "admin/get-user-profile", TargetUser=user)
    assert settings(now) != settings(profile)


async def test_add_and_remove_device(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """add_device/remove_device return SEVT_DEVICE_NEW/REMOVED and change the profile."""
    world = sim.world
    user = next(u for u, p in world.users.items() if p["Sources"])
    new = world.add_device(user)
    device_id = new["ResourceID"]
    assert new["TypeString"] == "SEVT_DEVICE_NEW" and new["Type"] == 4700
    assert new["Data"]["FriendlyName"] and {"os", "arch"} <= set(new["Data"]["PlatformVersion"])
    profile = await ok(sim, http, "admin/get-user-profile", TargetUser=user)
    assert profile["Devices"][device_id] == orjson.loads(orjson.dumps(new["Data"]))
    old_device = next(d for d in profile["Devices"] if d != device_id)
    owned = {s for s, c in profile["Sources"].items() if c["OwnerDevice"] == old_device}
    removed = world.remove_device(user, old_device)
    assert removed["TypeString"] == "SEVT_DEVICE_REMOVED" and removed["ResourceID"] == old_device
    assert "Data" not in removed and removed["Actor"] == world.admin
    profile = await ok(sim, http, "admin/get-user-profile", TargetUser=user)
    assert old_device not in profile["Devices"] and not owned & set(profile["Sources"])
    live = await ok(sim, http, "admin/dispatcher/list-active")
    assert old_device not in {c["DeviceID"] for c in (live or {}).values()}
    with pytest.raises(LookupError):
        world.remove_device(user, old_device)
    for other in list(world.users[user]["Devices"]):  # a user without devices keeps working
        world.remove_device(user, other)
    for _ in range(300):
        world.next_event()


# --------------------------------------------------------------------- faults


async def test_api_down_and_fail_next(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """api_down: HTTP 503 plain text; api_fail_next=N: N times HTTP 500, then normal."""
    url = sim.url + "api/v1/admin/meta/version"
    sim.faults.api_down = True
    async with http.post(url, data=AUTH) as resp:
        assert resp.status == 503 and resp.content_type == "text/plain"
        assert "503" in await resp.text()
    sim.faults.api_down = False
    sim.faults.api_fail_next = 2
    statuses = []
    for _ in range(3):
        async with http.post(url, data=AUTH) as resp:
            statuses.append(resp.status)
            if resp.status == 500:
                assert resp.content_type == "text/plain"
    assert statuses == [500, 500, 200] and sim.faults.api_fail_next == 0
    assert sim.api_calls["/api/v1/admin/meta/version"] == 4


async def test_api_reject_refuses_the_api_while_the_stream_works(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """api_reject: every call gets HTTP 200 Unauthorised; the stream still logs in."""
    sim.faults.api_reject = True
    assert await call(sim, http, "admin/list-users") == (200, UNAUTHORISED)
    assert await call(sim, http, "admin/account/session-start") == (200, UNAUTHORISED)
    assert await stream_login(sim, ["admin", "Password", "admin", "", ""]) == "200 OK"
    sim.faults.api_reject = False
    assert isinstance(await ok(sim, http, "admin/list-users"), list)


async def test_api_delay(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """api_delay holds every answer back; a client timeout fires before it."""
    sim.faults.api_delay = 0.3
    started = time.monotonic()
    await ok(sim, http, "admin/meta/version")
    assert time.monotonic() - started >= 0.3
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(
            sim.url + "api/v1/admin/meta/version",
            data=AUTH,
            timeout=aiohttp.ClientTimeout(total=0.1),
        ):
            pass
    sim.faults.api_delay = 0
    assert sim.api_calls["/api/v1/admin/meta/version"] == 2


async def test_api_calls_are_counted_by_path(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """Every call is counted, refused and unknown ones included."""
    await ok(sim, http, "admin/list-users")
    await call(sim, http, "admin/list-users", auth={})
    await call(sim, http, "admin/nope")
    await ok(sim, http, "admin/get-jobs-for-date-range", Start=0, End=0)
    assert sim.api_calls == {
        "/api/v1/admin/list-users": 2,
        "/api/v1/admin/nope": 1,
        "/api/v1/admin/get-jobs-for-date-range": 1,
    }
