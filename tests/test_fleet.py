"""The fleet on /metrics: the figures Comet's exporter would scrape, from memory, kept current by
the stream; over real sockets against the simulator (its clock frozen and moved by the tests, so
the 24-hour window has no race with the wall clock)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
import subprocess
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from cometstream.cli import main
from cometstream.config import FleetConfig
from cometstream.daemon import Daemon
from cometstream.errors import ConfigError
from cometstream.fleet import Model
from cometstream.fleet.model import block_of
from cometstream.fleet.render import BlockCache, edges, render
from cometstream.simulator import Simulator

from .conftest import PASSWORD, USER, make_config, wait_until
from .test_monitoring import _port

ROOT = Path(__file__).resolve().parent.parent
MON = ROOT / "docs" / "monitoring"
T0 = 1_796_000_000
CATEGORIES = ("success", "running", "warning", "quota_exceeded", "error")
#: what Comet's exporter serves (and so what the comparison covers)
EXPORTER = ("cometserver_users_total", "cometserver_storagevault_size_bytes",
            "cometserver_storagevault_quota_bytes", "cometserver_lastbackup_start_time",
            "cometserver_lastbackup_end_time", "cometserver_lastbackup_file_count",
            "cometserver_lastbackup_file_size_bytes", "cometserver_lastbackup_upload_size_bytes",
            "cometserver_lastbackup_download_size_bytes", "cometserver_lastbackup_status",
            "cometserver_recentjobs_total", "cometserver_device_is_online",
            "cometserver_device_is_current", "cometserver_selfbackup_time_since",
            "cometserver_selfbackup_filesize", "cometserver_selfbackup_success")

Figures = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Clock:
    """The server's clock and the daemon's: frozen, moved by the test."""

    def __init__(self) -> None:
        self.now = float(T0)

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def fsim(clock: Clock) -> AsyncIterator[Simulator]:
    async with Simulator(username=USER, password=PASSWORD, rate=0, seed=11, clock=clock) as s:
        yield s


class Running:
    def __init__(self, daemon: Daemon, url: str) -> None:
        self.daemon = daemon
        self.url = url

    @property
    def fleet(self) -> Any:
        return self.daemon.fleet

    async def scrape(self) -> str:
        async with aiohttp.ClientSession() as http, http.get(self.url + "/metrics") as r:
            assert r.status == 200
            return await r.text()

    async def figures(self, prefix: str = "cometserver_") -> Figures:
        return parse(await self.scrape(), prefix)

    async def quiet(self, received: int | None = None) -> None:
        """Every event sent so far has arrived (``received``), the seed and the live
        connection refreshes it caused are done."""
        d = self.daemon
        if received is not None:
            await wait_until(lambda: d.metrics.stream.events_received >= received,
                             what="the events")
        await wait_until(lambda: d.fleet.model is not None and not d.fleet.busy, what="quiet")


@asynccontextmanager
async def fleet_daemon(sim: Simulator, tmp_path: Path, clock: Clock, *,
                       fleet: dict[str, Any] | None = None,
                       fleet_config: FleetConfig | None = None) -> AsyncIterator[Running]:
    port = _port()
    cfg = make_config(sim.url, tmp_path, http={"listen": f"127.0.0.1:{port}"},
                      fleet={"enabled": True, **(fleet or {})})
    if fleet_config is not None:
        cfg = dataclasses.replace(cfg, fleet=fleet_config)
    stop = asyncio.Event()
    daemon = Daemon(cfg, rand=lambda: 1.0, resync_retry=(0.05, 0.3), clock=clock)
    task = asyncio.create_task(daemon.run(stop))
    try:
        running = Running(daemon, f"http://127.0.0.1:{port}")
        await wait_until(lambda: daemon.http is not None or task.done(), what="http")
        yield running
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)  # a clean stop: it raises otherwise


def parse(text: str, prefix: str = "cometserver_") -> Figures:
    out: Figures = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(prefix):
                key = (s.name, frozenset(s.labels.items()))
                assert key not in out, f"duplicate series {key}"
                out[key] = s.value
    return out


# --- the exporter's rules, written from its source, independently of cometstream's ------------
def categorise(status: Any) -> str:
    if 5000 <= status <= 5999:
        return "success"
    if 6000 <= status <= 6999:
        return "running"
    return {7001: "warning", 7003: "quota_exceeded"}.get(status, "error")


def exporter(users: dict[str, Any], live: dict[str, Any], jobs: list[Any],
             meta: dict[str, Any], now: int, names: bool) -> Figures:
    """What the exporter computes from these answers (with ``names``: its v0.5.1+ labels)."""
    out: Figures = {}
    version = meta["Version"]

    def put(name: str, labels: dict[str, Any], value: float) -> None:
        out[(name, frozenset((k, str(v)) for k, v in labels.items()))] = value

    put("cometserver_users_total", {}, len(users))
    for user in users.values():
        for vault_id, vault in user["Destinations"].items():
            labels = {"username": user["Username"], "vault_id": vault_id,
                      "vault_name": vault["Description"], "vault_type": vault["DestinationType"]}
            put("cometserver_storagevault_size_bytes", labels,
                vault["Statistics"]["ClientProvidedSize"]["Size"])
            if vault["StorageLimitEnabled"]:
                put("cometserver_storagevault_quota_bytes", labels, vault["StorageLimitBytes"])
        for item_id, item in user["Sources"].items():
            last = item["Statistics"].get("LastBackupJob", {})
            if not last.get("StartTime", 0) > 0:
                continue
            labels = {"username": user["Username"], "protected_item_id": item_id}
            if names:
                labels.update(protected_item_name=item["Description"],
                              device_id=item["OwnerDevice"],
                              device_name=user["Devices"].get(item["OwnerDevice"], {}).get(
                                  "FriendlyName", ""))
            for metric, field in (("start_time", "StartTime"), ("end_time", "EndTime"),
                                  ("file_count", "TotalFiles"), ("file_size_bytes", "TotalSize"),
                                  ("upload_size_bytes", "UploadSize"),
                                  ("download_size_bytes", "DownloadSize")):
                put(f"cometserver_lastbackup_{metric}", labels, last[field])
            for cat in CATEGORIES:
                put("cometserver_lastbackup_status", {**labels, "status": cat},
                    1 if cat == categorise(last["Status"]) else 0)
    counts = dict.fromkeys(CATEGORIES, 0)
    for job in jobs:
        counts[categorise(job["Status"])] += 1
    for cat, n in counts.items():
        put("cometserver_recentjobs_total", {"status": cat}, n)
    online = {(c["Username"], c["DeviceID"]) for c in live.values()}
    for username, user in users.items():
        for device_id, device in user["Devices"].items():
            labels = {"username": username, "device_id": device_id}
            if names:
                labels["device_name"] = device["FriendlyName"]
            put("cometserver_device_is_online", labels,
                1 if (username, device_id) in online else 0)
    for conn in live.values():
        labels = {"username": conn["Username"], "device_id": conn["DeviceID"]}
        if names:
            labels["device_name"] = users.get(conn["Username"], {}).get("Devices", {}).get(
                conn["DeviceID"], {}).get("FriendlyName", "")
        put("cometserver_device_is_current", labels,
            1 if conn["ReportedVersion"] == version else 0)
    for i, run in enumerate(meta.get("SelfBackup") or []):
        labels = {"selfbackup_index": i}
        put("cometserver_selfbackup_time_since", labels,
            now - run["LastRunEnd"] if run["LastRunEnd"] > 0 else -1)
        put("cometserver_selfbackup_filesize", labels, run["LastRunSize"])
        put("cometserver_selfbackup_success", labels, 1 if run["LastRunSuccess"] else 0)
    return out


def extras(users: dict[str, Any], names: bool) -> Figures:
    """The series the exporter lacks: last success, item and device info (with ``names``,
    the item's and the device's labels as on the exporter's series)."""
    out: Figures = {}
    for username, user in users.items():
        for item_id, item in user["Sources"].items():
            base = {"username": username, "protected_item_id": item_id}
            owner = item["OwnerDevice"]
            if names:
                base.update(protected_item_name=item["Description"], device_id=owner,
                            device_name=user["Devices"].get(owner, {}).get("FriendlyName", ""))
            info = {**base, "description": item["Description"], "engine": item["Engine"],
                    "device_id": owner}
            out[("cometserver_protected_item_info", frozenset(info.items()))] = 1
            end = item["Statistics"].get("LastSuccessfulBackupJob", {}).get("EndTime", 0)
            if end:
                out[("cometserver_lastsuccessfulbackup_end_time", frozenset(base.items()))] = end
        for device_id, device in user["Devices"].items():
            osinfo = device["PlatformVersion"]
            info = {"username": username, "device_id": device_id,
                    "friendly_name": device["FriendlyName"],
                    "platform": f"{osinfo['os']}/{osinfo['arch']}",
                    "version": device["ClientVersion"]}
            if names:
                info["device_name"] = device["FriendlyName"]
            out[("cometserver_device_info", frozenset(info.items()))] = 1
    return out


async def api(sim: Simulator, path: str, **params: Any) -> Any:
    form = {"Username": USER, "AuthType": "Password", "Password": PASSWORD,
            **{k: str(v) for k, v in params.items()}}
    async with aiohttp.ClientSession() as http, \
            http.post(f"{sim.url}api/v1/admin/{path}", data=form) as r:
        body = await r.read()
    return orjson.loads(body) or ({} if path != "get-jobs-for-date-range" else [])


async def expected(sim: Simulator, clock: Clock, names: bool) -> tuple[Figures, Figures]:
    """The exporter's figures from the simulator's own answers, now, and the extras."""
    users = await api(sim, "list-users-full")
    live = await api(sim, "dispatcher/list-active")
    now = int(clock())
    jobs = await api(sim, "get-jobs-for-date-range", Start=now - 86400, End=now)
    meta = await api(sim, "meta/version")
    return exporter(users, live, jobs, meta, now, names), extras(users, names)


def same(actual: Figures, wanted: Figures) -> None:
    missing = {k: v for k, v in wanted.items() if k not in actual}
    extra = {k: v for k, v in actual.items() if k not in wanted}
    differ = {k: (actual[k], v) for k, v in wanted.items() if k in actual and actual[k] != v}
    assert not (missing or extra or differ), (
        f"missing {list(missing.items())[:3]} ({len(missing)}), extra {list(extra.items())[:3]} "
        f"({len(extra)}), differ {list(differ.items())[:3]} ({len(differ)})")


async def compare(d: Running, sim: Simulator, clock: Clock, names: bool) -> Figures:
    wanted, more = await expected(sim, clock, names)
    actual = await d.figures()
    same({k: v for k, v in actual.items() if k[0] in EXPORTER}, wanted)
    same({k: v for k, v in actual.items() if k[0] not in EXPORTER}, more)
    return actual


# --- tests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("names", [True, False], ids=["default-labels", "name_labels-false"])
async def test_same_figures_as_the_exporter(fsim: Simulator, tmp_path: Path, clock: Clock,
                                            names: bool) -> None:
    """After the seed, live jobs, device connects and disconnects, account changes, a reconnect
    gap with changes nobody was told of, and time passing, every cometserver_* value equals
    what the exporter computes from the simulator's answers at that moment: by default with
    the exporter's own labels (a drop-in), with ``name_labels = false`` without the names."""
    world = fsim.world
    async with fleet_daemon(fsim, tmp_path, clock,
                            fleet={} if names else {"name_labels": False}) as d:
        await d.quiet()
        first = await compare(d, fsim, clock, names)
        assert sum(v for (n, _), v in first.items() if n == "cometserver_recentjobs_total") > 5
        assert any(n == "cometserver_device_is_current" and v == 0 for (n, _), v in first.items())
        assert any(n == "cometserver_storagevault_quota_bytes" for n, _ in first)

        sent = d.daemon.metrics.stream.events_received
        statuses = iter([5000, 7001, 7003, 7002, 7005, 5000])
        for _ in range(6):
            clock.now += 300
            guid = orjson.loads(fsim.emit(world.start_job()))["ResourceID"]
            clock.now += 600
            fsim.emit(world.complete_job(guid, status=next(statuses)))
            fsim.emit(world.toggle_device())
            sent += 3
        for _ in range(4):
            clock.now += 60
            fsim.emit(world.toggle_device())
            sent += 1
        user = next(iter(world.users))
        for change in (world.update_account, world.new_account,
                       lambda: world.add_device(user), lambda: world.update_account(user),
                       lambda: world.remove_account(list(world.users)[-2])):
            clock.now += 30
            fsim.emit(change())
            sent += 1
        dev = next(iter(world.users[user]["Devices"]))
        fsim.emit(world.remove_device(user, dev))
        sent += 1
        await d.quiet(sent)
        await compare(d, fsim, clock, names)

        # a gap: what happens meanwhile is told to nobody; the reconnect's seed reads it
        fsim.faults.reject_logins = True
        await fsim.drop_clients()
        await wait_until(lambda: not d.daemon.supervisor.connected, what="disconnect")
        clock.now += 3600
        running = list(world.running)
        world.complete_job(running[0], status=7003)
        guid = world.start_job()["ResourceID"]
        world.cancel_silently(guid)
        world.update_account()
        world.new_account()
        world.remove_account(next(u for u in world.users if u != user))
        for _ in range(5):
            world.toggle_device()
        seeds = d.fleet.seeds["ok"]
        fsim.faults.reject_logins = False
        await wait_until(lambda: d.fleet.seeds["ok"] > seeds, timeout=10, what="reseed")
        await d.quiet()
        await compare(d, fsim, clock, names)

        # time alone moves the 24-hour window
        clock.now += 20 * 3600
        await compare(d, fsim, clock, names)


async def test_events_during_a_seed_are_applied_to_its_result(
        fsim: Simulator, tmp_path: Path, clock: Clock) -> None:
    """Events that arrive while the reconnect's seed is reading the API (slowly) are applied
    to the seed's figures once they are in: nothing they said is lost."""
    world = fsim.world
    async with fleet_daemon(fsim, tmp_path, clock) as d:
        await d.quiet()
        seeds = d.fleet.seeds["ok"]
        fsim.faults.api_delay = 0.3
        await fsim.drop_clients()
        active = fsim.api_calls["/api/v1/admin/dispatcher/list-active"]
        # its last call asked (and answered after api_delay): the profiles and jobs it read
        # are older than what follows
        await wait_until(lambda: fsim.api_calls["/api/v1/admin/dispatcher/list-active"] > active,
                         what="the seed's last call")
        received = d.daemon.metrics.stream.events_received
        for status in (7002, 5000, 7003):
            clock.now += 120
            guid = orjson.loads(fsim.emit(world.start_job()))["ResourceID"]
            fsim.emit(world.complete_job(guid, status=status))
        fsim.emit(world.update_account())
        fsim.emit(world.toggle_device())
        await wait_until(lambda: d.daemon.metrics.stream.events_received >= received + 8,
                         what="the events")
        assert d.fleet.seeding  # (they came during the seed)
        await wait_until(lambda: d.fleet.seeds["ok"] > seeds, timeout=10, what="the seed")
        fsim.faults.api_delay = 0.0
        await d.quiet()
        await compare(d, fsim, clock, True)


async def test_a_scrape_makes_no_api_call(fsim: Simulator, tmp_path: Path, clock: Clock) -> None:
    """10 scrapes, 0 admin API requests counted by the simulator."""
    async with fleet_daemon(fsim, tmp_path, clock) as d:
        await d.quiet()
        # (the remedial sync reads the API too: done before counting)
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="the sync")
        before = sum(fsim.api_calls.values())
        for _ in range(10):
            assert "cometserver_users_total 20" in await d.scrape()
        assert sum(fsim.api_calls.values()) == before


async def test_the_sync_and_the_seed_share_list_users_full(fsim: Simulator, tmp_path: Path,
                                                           clock: Clock) -> None:
    """At start and after a reconnect, one list-users-full request serves the remedial sync and
    the fleet's seed."""
    async with fleet_daemon(fsim, tmp_path, clock) as d:
        await d.quiet()
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="the sync")
        assert fsim.api_calls["/api/v1/admin/list-users-full"] == 1
        await fsim.drop_clients()
        await wait_until(lambda: d.fleet.seeds["ok"] == 2 and d.daemon.resyncs_ok == 2,
                         what="the second sync and seed")
        assert fsim.api_calls["/api/v1/admin/list-users-full"] == 2


async def test_a_completion_shows_from_its_event_without_an_api_call(
        fsim: Simulator, tmp_path: Path, clock: Clock) -> None:
    """A job completion's figures reach /metrics from the event itself: no seed, no admin API
    request between the event and the scrape that shows it."""
    world = fsim.world
    async with fleet_daemon(fsim, tmp_path, clock) as d:
        await d.quiet()
        guid = world.start_job()["ResourceID"]
        clock.now += 1234
        event = world.complete_job(guid, status=7001)
        job = event["Data"]
        mine = {("username", job["Username"]), ("protected_item_id", job["SourceGUID"])}
        key = next(k for k in await d.figures()
                   if k[0] == "cometserver_lastbackup_end_time" and mine <= k[1])
        # (the remedial sync reads the API too: done before counting)
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="the sync")
        calls, seeds = sum(fsim.api_calls.values()), dict(d.fleet.seeds)
        fsim.emit(event)
        async with asyncio.timeout(10):  # (only a hang fails here)
            while (await d.figures()).get(key) != job["EndTime"]:
                await asyncio.sleep(0.01)
        assert sum(fsim.api_calls.values()) == calls and dict(d.fleet.seeds) == seeds
        status = await d.figures()
        assert status[("cometserver_lastbackup_status", frozenset(
            {**dict(key[1]), "status": "warning"}.items()))] == 1


async def test_data_age_counts_from_a_disconnect(fsim: Simulator, tmp_path: Path,
                                                 clock: Clock) -> None:
    """The data age is 0 while connected and seeded, counts from the disconnect while the
    stream is down, and is 0 again once the reconnect's seed is in."""
    async with fleet_daemon(fsim, tmp_path, clock) as d:
        age = ("cometstream_fleet_data_age_seconds", frozenset({("server", "sim")}))
        await d.quiet()
        assert (await d.figures("cometstream_fleet"))[age] == 0
        fsim.faults.reject_logins = True
        await fsim.drop_clients()
        await wait_until(lambda: not d.fleet.connected, what="disconnect")
        clock.now += 90
        assert (await d.figures("cometstream_fleet"))[age] == 90
        fsim.faults.reject_logins = False
        await wait_until(lambda: d.fleet.current, timeout=10, what="reseed")
        assert (await d.figures("cometstream_fleet"))[age] == 0


async def test_max_series_refuses_and_says_so_once(fsim: Simulator, tmp_path: Path,
                                                   clock: Clock) -> None:
    """Beyond max_series entities are not created; a counter says how many series were
    refused, and one log line says so, however many refusals follow."""
    with structlog.testing.capture_logs() as logs:
        async with fleet_daemon(fsim, tmp_path, clock, fleet={"max_series": 100}) as d:
            await d.quiet()
            for _ in range(3):
                fsim.emit(fsim.world.new_account())
            await d.quiet(4)
            own = await d.figures("cometstream_fleet")
            server = frozenset({("server", "sim")})
            assert own[("cometstream_fleet_series", server)] <= 100
            refused = own[("cometstream_fleet_series_refused_total", server)]
            assert refused > 0
            per_entity = sum(1 for (n, _) in await d.figures()
                             if n not in ("cometserver_users_total",
                                          "cometserver_recentjobs_total"))
            assert per_entity <= 100
    said = [e for e in logs if "max_series" in e["event"]]
    assert len(said) == 1 and said[0]["log_level"] == "warning"


async def test_server_quirks_are_taken_in_stride(fsim: Simulator, tmp_path: Path,
                                                 clock: Clock) -> None:
    """Errors as HTTP 200 bodies fail the seed (retried, counted), null lists are empty,
    integers beyond 64 bits and odd label text come out right, unknown event types and
    Data of the wrong shape are ignored."""
    fsim.faults.api_reject = True  # {"Status":403,...} with HTTP 200
    fsim.world.live.clear()  # list-active answers null
    async with fleet_daemon(fsim, tmp_path, clock) as d:
        await wait_until(lambda: d.fleet.seeds["error"] >= 1, what="a failed seed")
        assert "cometserver_users_total" not in await d.scrape()  # nothing before a seed
        fsim.faults.api_reject = False
        await d.quiet()
        world = fsim.world
        user = next(iter(world.users))
        profile = world.users[user]
        item_id = next(iter(profile["Sources"]))
        profile["Sources"][item_id]["Description"] = 'a "quoted" \\ back\nslash'
        fsim.emit(orjson.dumps({"Type": 4999, "Data": [1, 2]}))
        fsim.emit({"Type": 4201, "Data": "not a job"})
        fsim.emit({"Type": 4102, "Data": None})
        account = {"Actor": "admin", "OwnerOrganizationID": "", "ResourceID": user,
                   "Type": 4102, "Timestamp": int(clock()), "TypeString": "SEVT_ACCOUNT_UPDATED",
                   "Data": profile}
        fsim.emit(account)
        guid = world.start_job(username=user)["ResourceID"]
        job = dict(world.complete_job(guid, status=5000)["Data"])
        job["TotalSize"] = 2**70
        fsim.emit(json.dumps({"Type": 4201, "Data": job}))
        await d.quiet(6)
        text = await d.scrape()
        figures = parse(text)
        size = [v for (n, lab), v in figures.items()
                if n == "cometserver_lastbackup_file_size_bytes"
                and ("protected_item_id", job["SourceGUID"]) in lab]
        assert size == [float(2**70)]  # (a float64 in Prometheus, as in any exposition)
        info = [dict(lab) for (n, lab) in figures
                if n == "cometserver_protected_item_info" and ("protected_item_id", item_id) in lab]
        assert info[0]["description"] == 'a "quoted" \\ back\nslash'
        # an account change whose Data is an empty map (a Go zero value) is not a profile: the
        # user's series stay
        mine = {k for k in figures if ("username", user) in k[1]}
        assert mine
        fsim.emit({**account, "Data": {}})
        await d.quiet(7)
        assert {k for k in parse(await d.scrape()) if ("username", user) in k[1]} == mine


def test_a_lone_surrogate_in_a_name_does_not_break_the_scrape() -> None:
    """A profile read from the API (the standard library's JSON parser keeps a lone surrogate
    that orjson refuses) renders as valid UTF-8, the surrogate as "?"."""
    model = Model(max_series=100)
    model.put_user("u\ud800", {"Sources": {"s": {"Description": "x\udfff", "Engine": "e"}}})
    text = render(model, T0).decode("utf-8")
    info = [dict(lab) for (n, lab) in parse(text) if n == "cometserver_protected_item_info"]
    assert info == [{"username": "u?", "protected_item_id": "s", "description": "x?",
                     "engine": "e", "device_id": "", "protected_item_name": "x?",
                     "device_name": ""}]


def _small_fleet(users: int) -> Model:
    model = Model(max_series=10**6)
    model.version = "25.9.6"
    for u in range(users):
        model.put_user(f"user{u}", {
            "Sources": {f"s{u}-{i}": {"Description": f"item {i}", "Engine": "engine1/file",
                                      "OwnerDevice": f"d{u}"} for i in range(2)},
            "Devices": {f"d{u}": {"FriendlyName": f"PC {u}", "ClientVersion": "25.9.6"}},
            "Destinations": {f"v{u}": {"Description": "vault", "StorageLimitEnabled": True,
                                       "StorageLimitBytes": 10**12}}})
    return model


def _done(user: str, item: str, at: int, status: int = 5000) -> dict[str, Any]:
    return {"GUID": f"{user}-{at}", "Username": user, "SourceGUID": item, "Status": status,
            "StartTime": at - 60, "EndTime": at, "TotalFiles": 3, "TotalSize": 4,
            "UploadSize": 5, "DownloadSize": 6}


async def test_what_scrapes_keep_between_them_follows_every_change() -> None:
    """The blocks kept between scrapes (compressed, and as text while plain scrapes come)
    give, after each kind of change, exactly the text a full render gives; the text is let
    go once no plain scrape has come for keep_text seconds, and taken up again by the next."""
    now = [0.0]
    cache = BlockCache(keep_text=600, clock=lambda: now[0])
    model = _small_fleet(80)

    def plain() -> bytes:
        return b"".join(cache.plain(model, *edges(model, T0, ())))

    async def gzipped() -> bytes:
        head, tail = edges(model, T0, ())
        body = await cache.update(model, head, tail)
        assert body is not None
        return zlib.decompress(body, 31)

    def lines(text: bytes) -> list[bytes]:  # (the blocks order users by block, not by name)
        return sorted(text.splitlines())

    async def both_right() -> None:
        text = plain()
        assert lines(text) == lines(render(model, T0))
        assert await gzipped() == text

    assert lines(await gzipped()) == lines(render(model, T0))
    assert not cache.keeps_text
    await both_right()
    assert cache.keeps_text
    model.job_completed(_done("user3", "s3-0", T0 - 100))  # one block changed
    await both_right()
    model.job_completed(_done("user5", "s5-1", T0 - 50, status=7001))  # gzip first, then plain
    assert lines(await gzipped()) == lines(render(model, T0))
    assert lines(plain()) == lines(render(model, T0))
    model.put_user("newcomer", {"Devices": {"dn": {"FriendlyName": "new"}}})
    model.remove_user("user7")
    model.connect("user9", "d9", "25.9.6")
    await both_right()
    now[0] += 601  # no plain scrape for longer than keep_text
    assert lines(await gzipped()) == lines(render(model, T0))
    assert not cache.keeps_text
    once = b"".join(cache.plain(model, *edges(model, T0, ()), keep=False))  # (a HEAD request)
    assert lines(once) == lines(render(model, T0)) and not cache.keeps_text
    model.job_completed(_done("user11", "s11-0", T0 - 10))
    await both_right()
    assert cache.keeps_text
    model = _small_fleet(40)  # a new seed's model: nothing kept is used
    await both_right()


async def test_seeds_again_every_reseed_interval(fsim: Simulator, tmp_path: Path,
                                                 clock: Clock) -> None:
    """While connected the fleet is read again every reseed_interval: a change no event told
    of (a job cancelled from the web UI) is corrected."""
    cfg = FleetConfig(enabled=True, reseed_interval=0.3)
    async with fleet_daemon(fsim, tmp_path, clock, fleet_config=cfg) as d:
        await d.quiet()
        guid = next(iter(fsim.world.running))
        fsim.world.cancel_silently(guid)  # no event
        seeds = d.fleet.seeds["ok"]
        await wait_until(lambda: d.fleet.seeds["ok"] > seeds, timeout=5, what="a reseed")
        await d.quiet()
        await compare(d, fsim, clock, True)


async def test_the_check_finds_what_no_event_tells(fsim: Simulator, tmp_path: Path,
                                                   clock: Clock) -> None:
    """A running job abandoned without an event, a device an administrator registered (its
    live connection told to nobody) and a self-backup run show on /metrics as the exporter
    shows them once the periodic check has run (check_interval short here), without a full
    read: the job's final state in its item's last backup and in the recent jobs."""
    cfg = FleetConfig(enabled=True, check_interval=0.2)
    world = fsim.world
    async with fleet_daemon(fsim, tmp_path, clock, fleet_config=cfg) as d:
        await d.quiet()
        seeds = d.fleet.seeds["ok"]
        guid = next(iter(world.running))
        assert guid in d.fleet.model.running
        job = world.jobs[guid]
        clock.now += 600
        world.abandon(guid)  # (no event)
        user = next(iter(world.users))
        registered = world.add_device(user, actor=world.admin)
        device = registered["ResourceID"]
        received = d.daemon.metrics.stream.events_received
        fsim.emit(registered)
        world.connect_device(user, device)  # (its event told to nobody)
        world.run_self_backup(success=False, size=12345)
        await d.quiet(received + 1)
        await wait_until(lambda: guid not in d.fleet.model.running
                         and not d.fleet.model.unplaced
                         and d.fleet.model.self_backups[0][1] == 12345, what="a check")
        assert d.fleet.seeds["ok"] == seeds  # (no full read did it)
        figures = await compare(d, fsim, clock, True)
        status = {dict(lab)["status"]: v for (n, lab), v in figures.items()
                  if n == "cometserver_lastbackup_status"
                  and ("protected_item_id", job["SourceGUID"]) in lab}
        assert status["error"] == 1
        assert [v for (n, lab), v in figures.items() if n == "cometserver_device_is_online"
                and ("device_id", device) in lab] == [1]
        assert figures[("cometserver_selfbackup_success",
                        frozenset({("selfbackup_index", "0")}))] == 0


async def test_events_held_during_a_seed_are_bounded_in_bytes(
        fsim: Simulator, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past HOLD_MAX_BYTES of events kept for the replay while a (slow) seed reads, they are
    let go, said once, and the fleet is read again once that seed is in: the figures are
    still the exporter's."""
    from cometstream.fleet import service

    monkeypatch.setattr(service, "HOLD_MAX_BYTES", 20_000)
    world = fsim.world
    with structlog.testing.capture_logs() as logs:
        async with fleet_daemon(fsim, tmp_path, clock) as d:
            await d.quiet()
            seeds = d.fleet.seeds["ok"]
            stalled = "/api/v1/admin/dispatcher/list-active"  # (the seed's last call)
            asked = fsim.api_calls[stalled]
            fsim.faults.api_stall = frozenset({stalled})
            await fsim.drop_clients()
            await wait_until(lambda: fsim.api_calls[stalled] > asked, what="the seed's last call")
            received = d.daemon.metrics.stream.events_received
            sent = sum(len(fsim.emit(world.update_account())) for _ in range(20))
            assert sent > 20_000
            await wait_until(lambda: d.daemon.metrics.stream.events_received >= received + 20,
                             what="the events")
            assert d.fleet.seeding  # (they came during the seed)
            fsim.faults.api_stall = frozenset()
            await wait_until(lambda: d.fleet.seeds["ok"] >= seeds + 2, timeout=10,
                             what="the seed and the one made again")
            await d.quiet()
            await compare(d, fsim, clock, True)
    said = [e for e in logs if "too many events" in e["event"]]
    assert len(said) == 1


def test_users_and_running_jobs_count_against_max_series() -> None:
    """A user (items or not) and a running job reserve a series each: past max_series they
    are refused (and counted), and a job's ends when it completes."""
    refused: list[int] = []
    model = Model(max_series=10, refused=refused.append)
    for i in range(20):
        model.put_user(f"u{i}", {"Username": f"u{i}", "Sources": None})
    assert len(model.users) == 10 and sum(refused) == 10 and model.series == 10
    model = Model(max_series=5, refused=refused.append)
    for i in range(8):
        model.recent_job({"GUID": f"j{i}", "StartTime": T0, "EndTime": 0, "Status": 6001})
    assert len(model.running) == 5 and model.series == 5
    model.recent_job({"GUID": "j0", "StartTime": T0, "EndTime": T0 + 9, "Status": 5000})
    assert "j0" not in model.running and model.series == 4
    model.recent_job({"GUID": "j7", "StartTime": T0, "EndTime": 0, "Status": 6001})
    assert "j7" in model.running and model.series == 5


def test_a_device_an_administrator_registered_waits_to_be_placed() -> None:
    """SEVT_DEVICE_NEW by an administrator keeps the device aside (reserving its series) until
    a live connection names its user; revoked or in its user's profile meanwhile, it goes."""
    model = Model(max_series=100)
    model.put_user("ann", {"Username": "ann", "Devices": {}})
    config = {"FriendlyName": "WS-1", "PlatformVersion": {"os": "windows", "arch": "amd64"}}
    for device in ("d1", "d2", "d3"):
        model.device_new("admin", device, config)
    assert set(model.unplaced) == {"d1", "d2", "d3"} and model.series == 1 + 3 * 3
    model.connect("ann", "d1", "25.9.6")
    assert [d.id for d in model.users["ann"].devices] == ["d1"] and "d1" not in model.unplaced
    model.remove_device(model.owner_of("d2"), "d2")
    model.put_user("ann", {"Username": "ann", "Devices": {"d1": config, "d3": config}})
    assert model.unplaced == {} and model.series == 1 + 2 * 3
    online = [v for (n, lab), v in parse(render(model, T0).decode()).items()
              if n == "cometserver_device_is_online" and ("device_id", "d1") in lab]
    assert online == [1]


async def test_hostile_figures_keep_the_exposition_parseable(
        fsim: Simulator, tmp_path: Path, clock: Clock) -> None:
    """Figures beyond a double (10^400, 1e400, -10^400, -1e400), NaN-ish strings and null
    lists, from the API and from the stream: the whole exposition parses (prometheus-client's
    parser, and promtool's when installed: no parse error), the out-of-range ones written
    +Inf/-Inf, never as digits, counted, and logged once."""
    world = fsim.world
    user, other = list(world.users)[:2]
    profile = world.users[user]
    item_id = next(iter(profile["Sources"]))
    last = profile["Sources"][item_id]["Statistics"]["LastBackupJob"]
    last.update(TotalSize=10**400, UploadSize=-(10**400), DownloadSize="NaN",
                TotalFiles="Infinity")
    vault = next(iter(profile["Destinations"].values()))
    vault["Statistics"]["ClientProvidedSize"]["Size"] = 10**400
    vault.update(StorageLimitEnabled=True, StorageLimitBytes=-(10**400))
    world.users[other]["Devices"] = None  # (null lists)
    world.self_backups[0].update(LastRunSize=10**400, LastRunEnd="NaN")
    with structlog.testing.capture_logs() as logs:
        async with fleet_daemon(fsim, tmp_path, clock) as d:
            await d.quiet()
            guid = world.start_job(username=user)["ResourceID"]
            clock.now += 60
            job = dict(world.complete_job(guid, status=5000)["Data"])
            raw = json.dumps({"Type": 4201, "Data": {**job, "TotalSize": 1, "UploadSize": 2,
                                                     "TotalFiles": None}}, separators=(",", ":"))
            raw = raw.replace('"TotalSize":1', '"TotalSize":1e400').replace(
                '"UploadSize":2', '"UploadSize":-1e400')
            received = d.daemon.metrics.stream.events_received
            fsim.emit(raw)
            await d.quiet(received + 1)
            text = await d.scrape()
    assert not re.search(r" [-+]?\d{310,}$", text, re.MULTILINE)
    figures = parse(text)
    mine = [(n, v) for (n, lab), v in figures.items() if ("username", user) in lab]
    assert ("cometserver_lastbackup_file_size_bytes", float("inf")) in mine
    assert ("cometserver_lastbackup_upload_size_bytes", float("-inf")) in mine
    assert ("cometserver_storagevault_quota_bytes", float("-inf")) in mine
    assert figures[("cometserver_selfbackup_filesize",
                    frozenset({("selfbackup_index", "0")}))] == float("inf")
    assert " +Inf\n" in text and " -Inf\n" in text
    out_of_range = parse(text, "cometstream_fleet_values")
    assert out_of_range[("cometstream_fleet_values_out_of_range_total",
                         frozenset({("server", "sim")}))] >= 5
    assert len([e for e in logs if "beyond a double" in e["event"]]) == 1
    if shutil.which("promtool"):  # (CI installs it)
        proc = await asyncio.create_subprocess_exec(
            "promtool", "check", "metrics", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(text.encode()), 60)
        said = out.decode()
        assert proc.returncode != 1 and "error while linting" not in said, said[:500]


def test_fleet_config_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """[fleet] is off by default; unknown keys and bad values are one-line errors naming the
    key; enabling it without an HTTP endpoint is an error."""
    assert make_config("http://127.0.0.1:1/", tmp_path).fleet == FleetConfig(enabled=False)
    for fleet, http, key, words in (
            ({"enabled": True, "max_seris": 5}, "127.0.0.1:0", "fleet.max_seris",
             'did you mean "max_series"'),
            ({"max_series": "lots"}, "127.0.0.1:0", "fleet.max_series", "expected an integer"),
            ({"max_series": 0}, "127.0.0.1:0", "fleet.max_series", "between 1 and"),
            ({"reseed_interval": 5}, "127.0.0.1:0", "fleet.reseed_interval", ">= 60"),
            ({"check_interval": 5}, "127.0.0.1:0", "fleet.check_interval", ">= 10"),
            ({"check_interval": -1}, "127.0.0.1:0", "fleet.check_interval", "must be >= 0"),
            ({"enabled": True}, "", "fleet.enabled", "[http] listen")):
        with pytest.raises(ConfigError) as err:
            make_config("http://127.0.0.1:1/", tmp_path, http={"listen": http}, fleet=fleet)
        assert err.value.key == key and words in str(err.value)
    conf = tmp_path / "c.toml"
    conf.write_text(f'[server]\nurl = "http://127.0.0.1:1/"\nusername = "u"\npassword = "p"\n'
                    f'[state]\ndir = "{tmp_path}"\n[sinks.o]\ntype = "stdout"\n'
                    '[fleet]\nenabled = "yes"\n')
    assert main(["check", "-c", str(conf)]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "fleet.enabled" in err_lines[0]


# --- the operator kit -------------------------------------------------------------------------
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not installed (Debian package prometheus; "
                                    ".ci/run installs it)")


@needs_promtool
@pytest.mark.parametrize("args", [["check", "rules", "fleet-alerts.yml"],
                                  ["test", "rules", "fleet-alerts_test.yml"]])
def test_promtool_accepts_the_fleet_rules(args: list[str]) -> None:
    """promtool checks the fleet alert rules, and their unit tests pass."""
    proc = subprocess.run(["promtool", *args], cwd=MON, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_shipped_prometheus_config_loads_every_rule_file() -> None:
    """docs/monitoring/prometheus.yml loads the fleet's alert rules as well as cometstream's."""
    config = (MON / "prometheus.yml").read_text()
    listed = set(re.findall(r"^\s*-\s*([\w-]+\.yml)", config.partition("rule_files:")[2]
                            .partition("scrape_configs:")[0], re.MULTILINE))
    assert listed == {p.name for p in MON.glob("*alerts.yml")} == {"alerts.yml",
                                                                    "fleet-alerts.yml"}


@needs_promtool
def test_every_fleet_dashboard_query_parses(tmp_path: Path) -> None:
    """Each query of the fleet dashboard is valid PromQL (promtool parses it as a rule)."""
    dash = json.loads((MON / "fleet-dashboard.json").read_text())
    exprs = [t["expr"].replace("$user", ".*") for p in dash["panels"] for t in p["targets"]]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    (tmp_path / "queries.yml").write_text(json.dumps(rules))
    proc = subprocess.run(["promtool", "check", "rules", "queries.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
async def test_promtool_lints_the_fleet_exposition(fsim: Simulator, tmp_path: Path,
                                                   clock: Clock) -> None:
    """promtool check metrics finds nothing in the fleet's exposition but three names Comet's
    exporter chose (gauges ending in _total and _count, kept for compatibility)."""
    async with fleet_daemon(fsim, tmp_path, clock) as d:
        await d.quiet()
        text = await d.scrape()
    proc = await asyncio.create_subprocess_exec(
        "promtool", "check", "metrics", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    said, _ = await asyncio.wait_for(proc.communicate(text.encode()), 60)
    problems = [ln for ln in said.decode().splitlines()
                if ln.startswith(("cometserver_", "cometstream_fleet"))]
    assert {p.split()[0] for p in problems} <= {"cometserver_users_total",
                                                "cometserver_recentjobs_total",
                                                "cometserver_lastbackup_file_count"}, problems


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="prometheus not installed (.ci/run installs it)")
async def test_a_real_prometheus_scrapes_the_fleet_with_its_rules(
        fsim: Simulator, tmp_path: Path, clock: Clock) -> None:
    """Prometheus itself scrapes the fleet from /metrics and loads the fleet rules healthy."""
    prom_port = _port()
    (tmp_path / "fleet-alerts.yml").write_text((MON / "fleet-alerts.yml").read_text())
    async with fleet_daemon(fsim, tmp_path, clock) as d:
        await d.quiet()
        (tmp_path / "prom.yml").write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [fleet-alerts.yml]
scrape_configs:
  - job_name: comet
    static_configs:
      - targets: ["{d.url.removeprefix('http://')}"]
""")
        prom = await asyncio.create_subprocess_exec(
            "prometheus", f"--config.file={tmp_path / 'prom.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{prom_port}/api/v1"
            async with aiohttp.ClientSession() as http:
                async def query(q: str) -> list[Any]:
                    try:
                        async with http.get(f"{base}/query", params={"query": q}) as r:
                            return (await r.json())["data"]["result"]  # type: ignore[no-any-return]
                    except (aiohttp.ClientError, KeyError):
                        return []

                items, users = 0, []
                for _ in range(300):
                    users = await query("cometserver_users_total")
                    found = await query("count(cometserver_lastbackup_status)")
                    if users and found:
                        items = int(found[0]["value"][1])
                        break
                    await asyncio.sleep(0.1)
                assert users[0]["value"][1] == "20" and items > 0
                async with http.get(f"{base}/rules") as r:
                    groups = (await r.json())["data"]["groups"]
            rules = [rule for g in groups for rule in g["rules"]]
            defined = (MON / "fleet-alerts.yml").read_text().count("- alert:")
            assert len(rules) == defined >= 8 and all(r["health"] == "ok" for r in rules)
        finally:
            prom.terminate()
            await prom.wait()


async def test_fleet_rules_and_dashboard_use_only_exported_metrics(
        fsim: Simulator, tmp_path: Path, clock: Clock) -> None:
    """Every cometserver_* and cometstream_fleet_* name in the fleet rules and the fleet
    dashboard is served by /metrics."""
    async with fleet_daemon(fsim, tmp_path, clock) as d:
        await d.quiet()
        text = await d.scrape()
    exported = set(re.findall(r"^((?:cometserver|cometstream_fleet)_\w+?)(?:\{| )", text, re.MULTILINE))
    pattern = r"(?:cometserver|cometstream_fleet)_\w+"
    used = set(re.findall(pattern, (MON / "fleet-alerts.yml").read_text()))
    dash = json.loads((MON / "fleet-dashboard.json").read_text())
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            used |= set(re.findall(pattern, target["expr"]))
    missing = {u for u in used if u not in exported}
    assert not missing, missing
    assert len(dash["panels"]) >= 6


def test_the_fleet_benchmark_runs_and_prints_its_table() -> None:
    """A smoke run of benchmarks/fleet.py at a tiny size (its figures are not checked: timing
    on a shared machine is noise)."""
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fleet.py"), "--users", "50",
                          "--items", "150", "--scrapes", "2"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert re.search(r"^default labels +[\d.]+ +[\d.]+ +[\d.]+ +\d+ .* [\d.]+$", out, re.MULTILINE), out
    assert re.search(r"^name_labels=false ", out, re.MULTILINE), out


async def test_a_fresh_seed_is_compressed_before_the_first_gzip_scrape(
        fsim: Simulator, tmp_path: Path, clock: Clock) -> None:
    """The first gzip scrape after a seed would otherwise compress the whole exposition: the
    seed's text is compressed ahead, on a thread, and kept; a scrape finds nothing to redo."""
    async with fleet_daemon(fsim, tmp_path, clock) as d:
        await d.quiet()
        warm = d.fleet._warm_task
        assert warm is not None
        await asyncio.wait_for(warm, 30)
        cache = d.fleet._cache
        assert all(block is not None for block in cache._blocks)
        assert not cache.keeps_text  # (no plain scrape came: no text kept)
        assert cache.texts(d.fleet.model) == {}  # nothing left for the scrape to compress


async def test_the_gzip_answer_is_one_member_kept_compressed_between_scrapes(
        fsim: Simulator, tmp_path: Path, clock: Clock) -> None:
    """A scrape that asks for gzip (Prometheus always does) gets one gzip member (what every
    client reads: curl stops after the first of several) with the same series as the plain
    answer; after a job completion only that user's block is compressed again."""
    world = fsim.world

    async def raw(encoding: str) -> bytes:
        async with aiohttp.ClientSession(auto_decompress=False) as http, \
                http.get(d.url + "/metrics", headers={"Accept-Encoding": encoding}) as r:
            assert r.status == 200
            assert (r.headers.get("Content-Encoding") == "gzip") == (encoding == "gzip")
            return await r.read()

    def one_member(body: bytes) -> str:
        inflate = zlib.decompressobj(31)
        text = inflate.decompress(body) + inflate.flush()
        assert inflate.eof and not inflate.unused_data  # a single, complete member
        return text.decode()

    async with fleet_daemon(fsim, tmp_path, clock) as d:
        await d.quiet()
        first = one_member(await raw("gzip"))
        assert parse(first) == parse((await raw("identity")).decode())
        assert len(parse(first)) > 100
        guid = world.start_job()["ResourceID"]
        clock.now += 60
        event = world.complete_job(guid, status=5000)
        fsim.emit(event)
        await d.quiet(d.daemon.metrics.stream.events_received + 1)
        dirty = set(d.fleet.model.dirty)
        assert dirty == {block_of(event["Data"]["Username"])}
        second = one_member(await raw("gzip"))
        assert parse(second) == parse((await raw("identity")).decode()) != parse(first)


async def test_the_plain_answer_is_the_daemons_text_then_the_fleets_as_one_body(
        fsim: Simulator, tmp_path: Path, clock: Clock) -> None:
    """A plain scrape (written in pieces, the fleet's text not copied into one body) is one
    body of the length it announces, the daemon's series then the fleet's; HEAD announces the
    same length and sends nothing. The fleet's text, kept for the next plain scrape, is let go
    when they stop, even if no other scrape comes; a HEAD request keeps none."""
    async with fleet_daemon(fsim, tmp_path, clock) as d:
        await d.quiet()
        cache = d.fleet._cache
        cache.keep_text = 0.2
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            async with http.get(d.url + "/metrics",
                                headers={"Accept-Encoding": "identity"}) as r:
                assert r.status == 200 and "Content-Encoding" not in r.headers
                body = await r.read()
                assert int(r.headers["Content-Length"]) == len(body)
            async with http.head(d.url + "/metrics",
                                 headers={"Accept-Encoding": "identity"}) as h:
                assert h.status == 200 and await h.read() == b""
                assert abs(int(h.headers["Content-Length"]) - len(body)) < len(body) // 10
            assert cache.keeps_text
            # no scrape at all since: the kept text goes on its own
            await wait_until(lambda: not cache.keeps_text, timeout=5, what="text let go")
            async with http.head(d.url + "/metrics",
                                 headers={"Accept-Encoding": "identity"}) as h:
                assert h.status == 200 and await h.read() == b""
            assert not cache.keeps_text  # (a HEAD request keeps nothing)
        text = body.decode()
        assert text.index("cometstream_") < text.index("cometserver_")
        assert len(parse(text)) > 100


@pytest.mark.skipif(shutil.which("curl") is None,
                    reason="curl not installed (Debian package curl; .ci/run installs it)")
async def test_curl_reads_the_whole_gzip_answer(fsim: Simulator, tmp_path: Path,
                                                clock: Clock) -> None:
    """curl (which stops after the first gzip member) reads every series of the gzip answer,
    after a job completion had one block compressed again."""
    world = fsim.world
    async with fleet_daemon(fsim, tmp_path, clock) as d:
        await d.quiet()
        guid = world.start_job()["ResourceID"]
        clock.now += 60
        fsim.emit(world.complete_job(guid, status=5000))
        await d.quiet(d.daemon.metrics.stream.events_received + 1)
        curl = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--fail", "--compressed", d.url + "/metrics",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(curl.communicate(), 30)
        assert curl.returncode == 0, err.decode()
        async with aiohttp.ClientSession() as http, \
                http.get(d.url + "/metrics", headers={"Accept-Encoding": "identity"}) as r:
            assert "Content-Encoding" not in r.headers
            plain = parse(await r.text())
        assert len(plain) > 100
        assert parse(out.decode()) == plain


async def test_a_seed_that_dies_of_a_bug_is_said_once_and_shown_on_readyz(
        fsim: Simulator, tmp_path: Path, clock: Clock) -> None:
    """A fleet seed whose task dies of an unexpected error is logged once with its traceback,
    counted as a failed seed, named on /readyz, and waits on nothing (the fleet is not busy);
    the next connection's seed clears it."""
    async with fleet_daemon(fsim, tmp_path, clock) as d:
        await d.quiet()
        fleet = d.fleet
        swap = fleet._swap

        def broken(*_args: Any) -> None:
            raise RuntimeError("a bug in the swap")

        fleet._swap = broken
        errors = fleet.seeds["error"]
        with structlog.testing.capture_logs() as logs:
            await fsim.drop_clients()
            await wait_until(lambda: fleet.seeds["error"] > errors, timeout=10, what="death")
        died = [e for e in logs if e["event"] == "background task died"]
        assert [(e["task"], e["log_level"]) for e in died] == [("fleet-seed", "error")]
        assert isinstance(died[0]["exc_info"], RuntimeError)
        assert not fleet.busy
        async with aiohttp.ClientSession() as http, http.get(d.url + "/readyz") as r:
            body = await r.text()
        assert r.status == 503 and "background task fleet-seed died: RuntimeError" in body
        fleet._swap = swap
        await fsim.drop_clients()
        await wait_until(lambda: not d.daemon.not_ready_reasons(), timeout=10, what="healed")
