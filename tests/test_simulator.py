"""The simulated Comet Server, exercised with a plain aiohttp websocket client over 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import orjson
import pytest

from cometstream.constants import SEVT
from cometstream.simulator import (
    EVENT_KEYS,
    JOB_DETAIL_KEYS,
    STREAM_PATH,
    Simulator,
    World,
    totp_code,
    totp_matches,
)

from .conftest import wait_until

GOOD = ["admin", "Password", "admin", "", ""]
CLOSED_TYPES = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
FIXED_NOW = 1733400000


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(rate=0, seed=1) as simulator:
        yield simulator


@contextlib.asynccontextmanager
async def connect(
    server: Simulator, **kwargs: Any
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A raw aiohttp websocket on the simulator's stream endpoint."""
    url = server.url + STREAM_PATH.lstrip("/")
    async with aiohttp.ClientSession() as session, session.ws_connect(url, **kwargs) as ws:
        yield ws


async def handshake(
    ws: aiohttp.ClientWebSocketResponse, frames: Sequence[str] = GOOD
) -> aiohttp.WSMessage:
    """Send the five frames and return the server's answer."""
    for frame in frames:
        await ws.send_str(frame)
    return await ws.receive(timeout=2)


def assert_event(raw: bytes | str) -> dict[str, Any]:
    """Parse one StreamableEvent and check its keys are in wire order."""
    ev = orjson.loads(raw)
    assert isinstance(ev, dict)
    assert list(ev) == [k for k in EVENT_KEYS if k in ev]
    for key in ("Actor", "OwnerOrganizationID", "Type", "Timestamp", "TypeString"):
        assert key in ev
    assert SEVT[ev["TypeString"]] == ev["Type"]
    assert isinstance(ev["Timestamp"], int) and ev["Timestamp"] > 1_600_000_000
    return ev


async def test_login_gets_200_ok_then_hello_then_events(sim: Simulator) -> None:
    """A good login is answered by `200 OK`, a HELLO with ServerMetaVersionInfo, then the live events."""
    async with connect(sim) as ws:
        answer = await handshake(ws)
        assert answer.type == aiohttp.WSMsgType.TEXT and answer.data == "200 OK"
        hello = assert_event((await ws.receive(timeout=2)).data)
        assert hello["Type"] == SEVT["SEVT_META_HELLO"] and "ResourceID" not in hello
        assert hello["Data"]["ServerStartHash"] == sim.server_start_hash
        assert hello["Data"]["Version"] == "25.9.6"
        assert hello["Data"]["ServerStartTime"] <= hello["Data"]["CurrentTime"]
        await sim.wait_for_clients(1)
        sent = sim.emit_many(30)
        for expected in sent:
            msg = await ws.receive(timeout=2)
            assert msg.type == aiohttp.WSMsgType.TEXT
            assert msg.data.encode() == expected
            assert_event(msg.data)
    assert sim.handshakes == [GOOD]
    assert sim.sent == sent
    assert (sim.connections, sim.logins_ok, sim.logins_rejected) == (1, 1, 0)


async def test_wrong_password_gets_403_unauth_and_close(sim: Simulator) -> None:
    """A bad password is answered by `403 Unauth`, then the server closes the connection."""
    async with connect(sim) as ws:
        answer = await handshake(ws, ["admin", "Password", "nope", "", ""])
        assert answer.data == "403 Unauth"
        assert (await ws.receive(timeout=2)).type in CLOSED_TYPES
    assert sim.logins_rejected == 1 and sim.logins_ok == 0 and sim.clients == 0


async def test_unknown_user_and_unknown_auth_type_are_rejected(sim: Simulator) -> None:
    """The username must match, and only Password, PasswordTOTP and SessionKey are accepted."""
    for frames in (["root", "Password", "admin", "", ""], ["admin", "WebAuthn", "admin", "", ""]):
        async with connect(sim) as ws:
            assert (await handshake(ws, frames)).data == "403 Unauth"
    assert sim.logins_rejected == 2


async def test_reject_faults(sim: Simulator) -> None:
    """`reject_next` refuses the next N logins; `reject_logins` refuses every login."""
    sim.faults.reject_next = 1
    async with connect(sim) as ws:
        assert (await handshake(ws)).data == "403 Unauth"
    async with connect(sim) as ws:
        assert (await handshake(ws)).data == "200 OK"
    assert sim.faults.reject_next == 0
    sim.faults.reject_logins = True
    async with connect(sim) as ws:
        assert (await handshake(ws)).data == "403 Unauth"
    assert (sim.logins_ok, sim.logins_rejected) == (1, 2)


async def test_password_with_special_characters_is_compared_exactly() -> None:
    """Spaces, quotes, &, = and non-ASCII characters are part of the password, byte for byte."""
    password = " p\"a's &w=rd ünïcødé 🔑 "
    async with Simulator(password=password, rate=0) as server:
        async with connect(server) as ws:
            assert (await handshake(ws, ["admin", "Password", password, "", ""])).data == "200 OK"
        async with connect(server) as ws:
            assert (
                await handshake(ws, ["admin", "Password", password.strip(), "", ""])
            ).data == "403 Unauth"


def test_totp_code_matches_rfc6238_vectors() -> None:
    """The TOTP helper reproduces RFC 6238's SHA1 test vectors (last six digits)."""
    secret = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"  # base32 of "12345678901234567890"
    assert totp_code(secret, 59) == "287082"
    assert totp_code(secret, 1111111109) == "081804"
    assert totp_code(secret, 2000000000) == "279037"
    assert totp_matches(secret, "287082", at=59 + 30)  # one step late is accepted
    assert not totp_matches(secret, "287082", at=59 + 90)


async def test_password_totp_login() -> None:
    """PasswordTOTP needs the password and a current TOTP code."""
    secret = "JBSWY3DPEHPK3PXP"
    async with Simulator(password="pw", totp_secret=secret, rate=0) as server:
        async with connect(server) as ws:
            frames = ["admin", "PasswordTOTP", "pw", "", totp_code(secret)]
            assert (await handshake(ws, frames)).data == "200 OK"
        wrong = f"{(int(totp_code(secret)) + 1) % 1_000_000:06d}"
        async with connect(server) as ws:
            assert (
                await handshake(ws, ["admin", "PasswordTOTP", "pw", "", wrong])
            ).data == "403 Unauth"
        async with connect(server) as ws:
            frames = ["admin", "PasswordTOTP", "bad", "", totp_code(secret)]
            assert (await handshake(ws, frames)).data == "403 Unauth"


async def test_session_key_login() -> None:
    """SessionKey logins succeed only with a configured key."""
    async with Simulator(session_keys={"sk-123"}, rate=0) as server:
        async with connect(server) as ws:
            assert (await handshake(ws, ["admin", "SessionKey", "", "sk-123", ""])).data == "200 OK"
        async with connect(server) as ws:
            assert (
                await handshake(ws, ["admin", "SessionKey", "", "sk-999", ""])
            ).data == "403 Unauth"


async def test_binary_handshake_frame_is_rejected(sim: Simulator) -> None:
    """A binary frame during the handshake gets `403 Unauth` and a close."""
    async with connect(sim) as ws:
        await ws.send_str("admin")
        await ws.send_bytes(b"Password")
        assert (await ws.receive(timeout=2)).data == "403 Unauth"
        assert (await ws.receive(timeout=2)).type in CLOSED_TYPES
    assert sim.logins_rejected == 1 and sim.handshakes == []


async def test_handshake_timeout() -> None:
    """After `handshake_timeout`, a silent client is closed and an incomplete login refused."""
    async with Simulator(rate=0, handshake_timeout=0.2) as server:
        async with connect(server) as ws:
            assert (await ws.receive(timeout=2)).type in CLOSED_TYPES
        async with connect(server) as ws:
            await ws.send_str("admin")
            await ws.send_str("Password")
            assert (await ws.receive(timeout=2)).data == "403 Unauth"
            assert (await ws.receive(timeout=2)).type in CLOSED_TYPES
        assert (server.connections, server.logins_ok, server.logins_rejected) == (2, 0, 1)
        assert server.handshakes == []


async def test_emit_sends_malformed_frames_verbatim(sim: Simulator) -> None:
    """emit() sends bytes and str unchanged, as TEXT or (binary=True) BINARY frames."""
    async with connect(sim) as ws:
        await handshake(ws)
        await ws.receive(timeout=2)  # HELLO
        assert sim.emit(b'{"Type": 4200, "Data": {') == b'{"Type": 4200, "Data": {'
        sim.emit("not json at all")
        sim.emit(b"\x00\xffbinary", binary=True)
        sim.emit({"Type": 4999, "Extra": [1, 2]})
        first = await ws.receive(timeout=2)
        assert (first.type, first.data) == (aiohttp.WSMsgType.TEXT, '{"Type": 4200, "Data": {')
        assert (await ws.receive(timeout=2)).data == "not json at all"
        third = await ws.receive(timeout=2)
        assert (third.type, third.data) == (aiohttp.WSMsgType.BINARY, b"\x00\xffbinary")
        assert (await ws.receive(timeout=2)).data == '{"Type":4999,"Extra":[1,2]}'
    assert len(sim.sent) == 4


async def test_drop_clients_aborts_without_close_frame(sim: Simulator) -> None:
    """drop_clients() cuts the TCP connection: the client sees the end but no close frame."""
    async with connect(sim) as ws:
        await handshake(ws)
        await sim.wait_for_clients(1)
        await sim.drop_clients()
        assert sim.clients == 0
        msgs = []
        while True:
            msg = await ws.receive(timeout=2)
            msgs.append(msg)
            if msg.type in CLOSED_TYPES:
                break
        assert msg.type != aiohttp.WSMsgType.CLOSE
        assert all(m.type == aiohttp.WSMsgType.TEXT for m in msgs[:-1])  # at most the HELLO


async def test_silent_fault_stops_pongs_and_events_but_keeps_tcp(sim: Simulator) -> None:
    """With `silent` on, a ping gets no pong and events stop; clearing it brings both back."""
    async with connect(sim, autoping=False) as ws:
        await handshake(ws)
        await ws.receive(timeout=2)  # HELLO
        await ws.ping(b"before")
        pong = await ws.receive(timeout=2)
        assert (pong.type, pong.data) == (aiohttp.WSMsgType.PONG, b"before")
        sim.faults.silent = True
        await ws.ping(b"during")
        sim.emit({"lost": True})
        with pytest.raises(asyncio.TimeoutError):
            await ws.receive(timeout=1.0)
        assert sim.clients == 1 and not ws.closed
        sim.faults.silent = False
        pong = await ws.receive(timeout=2)
        assert (pong.type, pong.data) == (aiohttp.WSMsgType.PONG, b"during")
        sim.emit({"back": True})
        assert (await ws.receive(timeout=2)).data == '{"back":true}'


async def test_silent_fault_ignores_new_clients(sim: Simulator) -> None:
    """A client arriving while `silent` is on gets its upgrade but no answer to its login."""
    sim.faults.silent = True
    async with connect(sim) as ws:
        for frame in GOOD:
            await ws.send_str(frame)
        with pytest.raises(asyncio.TimeoutError):
            await ws.receive(timeout=0.3)
    assert sim.connections == 1 and sim.logins_ok == 0


async def test_hang_handshake_fault(sim: Simulator) -> None:
    """With `hang_handshake` on, the upgrade succeeds but the five frames get no answer."""
    sim.faults.hang_handshake = True
    async with connect(sim) as ws:
        for frame in GOOD:
            await ws.send_str(frame)
        with pytest.raises(asyncio.TimeoutError):
            await ws.receive(timeout=0.3)
    assert sim.connections == 1 and sim.handshakes == []


async def test_slow_client_is_dropped_and_counted() -> None:
    """A client that stops reading is dropped once its queue overflows; broadcasting never blocks."""
    async with Simulator(rate=0, queue_limit=50) as server, connect(server) as ws:
        await handshake(ws)
        await ws.receive(timeout=2)  # HELLO; from here on the client reads nothing
        big = b"x" * 65536
        for i in range(2000):
            server.emit(big)
            if server.slow_drops:
                break
            if i % 20 == 19:
                await asyncio.sleep(0.005)
        assert server.slow_drops == 1
        assert server.clients == 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3
        while loop.time() < deadline:
            msg = await ws.receive(timeout=3)
            if msg.type in CLOSED_TYPES:
                break
        assert msg.type in CLOSED_TYPES and msg.type != aiohttp.WSMsgType.CLOSE


async def test_stop_sends_going_away_and_is_idempotent() -> None:
    """stop() closes clients with code 1001 and may be called twice."""
    server = Simulator(rate=0)
    await server.start()
    async with connect(server) as ws:
        await handshake(ws)
        await server.wait_for_clients(1)
        await server.stop()
        msg = await ws.receive(timeout=2)
        while msg.type == aiohttp.WSMsgType.TEXT:  # the HELLO may still be queued
            msg = await ws.receive(timeout=2)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1001
    await server.stop()


async def test_restart_drops_clients_and_changes_server_start_hash(sim: Simulator) -> None:
    """restart() drops the clients; the next HELLO carries a new ServerStartHash."""
    async with connect(sim) as ws:
        await handshake(ws)
        first = orjson.loads((await ws.receive(timeout=2)).data)["Data"]["ServerStartHash"]
        await sim.restart()
        assert (await ws.receive(timeout=2)).type in CLOSED_TYPES
    async with connect(sim) as ws:
        await handshake(ws)
        second = orjson.loads((await ws.receive(timeout=2)).data)["Data"]["ServerStartHash"]
    assert first != second == sim.server_start_hash


async def test_plain_http_get_is_refused(sim: Simulator) -> None:
    """A GET without the websocket upgrade is answered with an HTTP error, not a crash."""
    url = sim.url + STREAM_PATH.lstrip("/")
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert 400 <= resp.status < 500
    assert sim.connections == 0


async def test_wait_helpers(sim: Simulator) -> None:
    """wait_for_clients raises TimeoutError; wait_for_connections counts rejected logins too."""
    with pytest.raises(TimeoutError):
        await sim.wait_for_clients(1, timeout=0.1)
    sim.faults.reject_logins = True
    async with connect(sim) as ws:
        await handshake(ws)
        await sim.wait_for_connections(1, timeout=1)
    assert sim.clients == 0


async def test_generator_follows_rate_pause_and_resume() -> None:
    """The generator emits at `rate`; pause() stops it, resume() restarts it."""
    async with Simulator(rate=200, seed=3) as server, connect(server) as ws:
        await handshake(ws)
        await ws.receive(timeout=2)  # HELLO
        for _ in range(10):
            assert_event((await ws.receive(timeout=2)).data)
        server.pause()
        count = len(server.sent)
        await asyncio.sleep(0.15)
        assert len(server.sent) == count
        server.resume()
        await wait_until(lambda: len(server.sent) > count, what="events again")
        server.set_rate(0)
        count = len(server.sent)
        await asyncio.sleep(0.1)
        assert len(server.sent) == count


def _events(world: World, n: int) -> list[dict[str, Any]]:
    return [orjson.loads(orjson.dumps(world.next_event())) for _ in range(n)]


def test_backup_job_detail_keys_in_documented_order() -> None:
    """Job events carry BackupJobDetail with keys in the serializer's order and sane values."""
    world = World(seed=5)
    new = completed = 0
    for ev in _events(world, 3000):
        if ev["Type"] not in (SEVT["SEVT_JOB_NEW"], SEVT["SEVT_JOB_COMPLETED"]):
            continue
        job = ev["Data"]
        keys = list(job)
        assert keys == [k for k in JOB_DETAIL_KEYS if k in job]
        for key in (
            "GUID",
            "Username",
            "Classification",
            "Status",
            "StartTime",
            "EndTime",
            "RetryCount",
            "SourceGUID",
            "DestinationGUID",
            "DeviceID",
            "ClientVersion",
            "TotalDirectories",
            "TotalFiles",
            "TotalSize",
            "TotalChunks",
            "UploadSize",
            "DownloadSize",
            "Progress",
            "DestinationSizeStart",
            "DestinationSizeEnd",
        ):
            assert key in job
        assert list(job["Progress"]) == [
            "Counter",
            "SentTime",
            "RecievedTime",
            "BytesDone",
            "ItemsDone",
            "ItemsTotal",
        ]
        assert list(job["DestinationSizeEnd"]) == ["Size", "MeasureStarted", "MeasureCompleted"]
        assert ev["ResourceID"] == job["GUID"] and ev["Actor"] == job["Username"]
        assert job["ClientVersion"] == "25.9.6" and 4000 <= job["Classification"] <= 4999
        if ev["Type"] == SEVT["SEVT_JOB_NEW"]:
            new += 1
            assert job["EndTime"] == 0 and job["Status"] == 6001
        else:
            completed += 1
            assert job["EndTime"] > job["StartTime"]
            assert job["Status"] in (5000, 7001, 7002, 7005)
            assert "CancellationID" not in job
    assert new > 100 and completed > 100


def test_world_is_deterministic_for_a_seed() -> None:
    """The same seed and clock give byte-identical events; another seed gives others."""

    def run(seed: int) -> list[bytes]:
        world = World(seed=seed, clock=lambda: FIXED_NOW)
        return [orjson.dumps(world.next_event()) for _ in range(500)]

    assert run(42) == run(42)
    assert run(42) != run(43)


async def test_simulators_with_one_seed_emit_the_same_events() -> None:
    """Two simulators with one seed emit the same events, timestamps aside."""

    def shape(raw: bytes) -> tuple[Any, ...]:
        ev = orjson.loads(raw)
        return ev["Type"], ev["Actor"], ev.get("ResourceID"), ev["OwnerOrganizationID"]

    a, b = Simulator(rate=0, seed=9), Simulator(rate=0, seed=9)
    assert [shape(x) for x in a.emit_many(200)] == [shape(x) for x in b.emit_many(200)]
    assert a.world.users.keys() == b.world.users.keys()


def test_event_mix_and_payload_shapes() -> None:
    """The generator mixes job, login, device and account events of about 800 bytes on average."""
    world = World(seed=1)
    raws = [orjson.dumps(world.next_event()) for _ in range(4000)]
    events = [assert_event(raw) for raw in raws]
    seen = {ev["TypeString"] for ev in events}
    assert seen >= {
        "SEVT_JOB_NEW",
        "SEVT_JOB_COMPLETED",
        "SEVT_ACCOUNT_LOGIN",
        "SEVT_ACCOUNT_UPDATED",
        "SEVT_DEVICE_LIVE_CONNECT",
        "SEVT_DEVICE_LIVE_DISCONNECT",
        "SEVT_ACCOUNT_NEW",
        "SEVT_ACCOUNT_REMOVED",
    }
    assert 500 < sum(map(len, raws)) / len(raws) < 1300
    for ev in events:
        name = ev["TypeString"]
        if name == "SEVT_ACCOUNT_REMOVED":
            assert ev["Data"] == ev["ResourceID"]
        elif name in ("SEVT_ACCOUNT_UPDATED", "SEVT_ACCOUNT_NEW"):
            profile = ev["Data"]
            assert profile["Username"] == ev["ResourceID"]
            assert profile.get("OrganizationID", "") == ev["OwnerOrganizationID"]
            for device in profile["Devices"].values():
                assert {"os", "arch"} <= set(device["PlatformVersion"])
                assert all(k.islower() for k in device["PlatformVersion"])
            for source in profile["Sources"].values():
                assert source["OwnerDevice"] in profile["Devices"]
        elif name == "SEVT_ACCOUNT_LOGIN":
            assert ev["ResourceID"].startswith("/api/v1/") and "Data" not in ev
        elif name.startswith("SEVT_DEVICE_LIVE"):
            assert len(ev["ResourceID"]) >= 40 and "Data" not in ev


def test_world_queries_answer_from_the_same_state() -> None:
    """Running jobs, date ranges and profiles come from the state the events were made from."""
    world = World(seed=2, running=0, clock=lambda: FIXED_NOW)
    assert world.incomplete_jobs() == [] and len(world.jobs) > 20
    started = world.start_job()
    guid = started["ResourceID"]
    assert world.jobs_for_date_range(0, 0) == [world.jobs[guid]]
    assert guid in {j["GUID"] for j in world.jobs_for_date_range(FIXED_NOW, FIXED_NOW - 60)}
    job: dict[str, Any] = world.complete_job(guid, FIXED_NOW + 600)["Data"]
    assert world.incomplete_jobs() == [] and world.job(guid) == job
    assert job["EndTime"] == FIXED_NOW + 600
    profile = world.profile(job["Username"])
    assert profile is not None
    assert profile["Sources"][job["SourceGUID"]]["Statistics"]["LastBackupJob"] is job
    assert set(world.list_users_full()) == set(world.users)
    before = world.profile_hash(profile["Username"])
    world.update_account(profile["Username"])
    assert world.profile_hash(profile["Username"]) != before
