"""Remedial sync, checkpoint and dedup, against the simulator's stream and admin API."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import structlog

from cometstream.simulator import Simulator

from .conftest import (
    PASSWORD,
    USER,
    make_config,
    run_cli,
    running,
    toml_str,
    wait_until,
    write_config,
)
from .peers import read_log

COMPLETED, NEW = 4201, 4200


def _lines(path: Path) -> list[dict[str, Any]]:
    """The file's complete lines (not one the sink is writing meanwhile), parsed."""
    if not path.exists():
        return []
    return [orjson.loads(x) for x in path.read_bytes().split(b"\n")[:-1] if x.strip()]


def _completions(path: Path) -> list[tuple[str, str]]:
    """(job GUID, origin) of every SEVT_JOB_COMPLETED line of an envelope file, in order."""
    return [(e["event"]["Data"]["GUID"], e["origin"]) for e in _lines(path)
            if e["event"]["Type"] == COMPLETED]


def _file_cfg(sim: Simulator, tmp_path: Path, path: Path, **kw: Any) -> Any:
    return make_config(sim.url, tmp_path, sinks={"f": {"type": "file", "path": str(path),
                                                       "fsync": "always"}}, **kw)


def _gap_jobs(sim: Simulator, n: int) -> list[str]:
    """Start and complete n jobs in the world without any event reaching a client."""
    guids = []
    for _ in range(n):
        guid = sim.world.start_job()["Data"]["GUID"]
        sim.world.complete_job(guid)
        guids.append(guid)
    return guids


async def _open_gap(sim: Simulator, d: Any) -> None:
    """Drop the client and refuse logins until _close_gap."""
    sim.faults.reject_logins = True
    await sim.drop_clients()
    await wait_until(lambda: d.stats.connects["rejected"] >= 1, what="gap open")


async def test_jobs_completed_during_a_drop_are_delivered_once_before_newer_live_events(
        sim: Simulator, tmp_path: Path) -> None:
    """30 jobs complete while we are disconnected: after the reconnect all 30 arrive once,
    marked resync, before the live events of the new connection."""
    path = tmp_path / "events.jsonl"
    async with running(_file_cfg(sim, tmp_path, path)) as d:
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        await _open_gap(sim, d)
        gap = _gap_jobs(sim, 30)
        sim.faults.reject_logins = False
        await wait_until(lambda: d.daemon.resyncs_ok == 2, timeout=10, what="resync")
        live_new = sim.world.start_job()
        sim.emit(live_new)
        live = sim.world.complete_job(live_new["Data"]["GUID"])
        sim.emit(live)
        await wait_until(lambda: (live["Data"]["GUID"], "stream") in _completions(path),
                         what="live completion")
    done = _completions(path)
    resynced = [g for g, origin in done if origin == "resync"]
    assert sorted(resynced) == sorted(gap)
    assert len(done) == len({g for g, _o in done}) == 31
    assert done[-1] == (live["Data"]["GUID"], "stream")
    assert d.stats.resync_events["job_completed"] == 30
    assert d.stats.resync_runs["ok"] == 1 and d.stats.resync_runs["baseline"] == 1


async def test_a_finished_job_with_an_odd_end_time_is_reported_completed(
        sim: Simulator, tmp_path: Path) -> None:
    """Jobs that finished in a gap (Status 5000, 7001) but whose EndTime is not a plain positive
    integer (a float, -1, beyond 64 bits): the status says they are done, so the sync reports
    each as a completion (not as a start) and does not believe them running."""
    path = tmp_path / "events.jsonl"
    async with running(_file_cfg(sim, tmp_path, path)) as d:
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        await _open_gap(sim, d)
        gap = _gap_jobs(sim, 3)
        for guid, end in zip(gap, [float(sim.world.jobs[gap[0]]["EndTime"]), -1, 2**64 + 1],
                             strict=True):
            sim.world.jobs[guid]["EndTime"] = end
        sim.world.jobs[gap[1]]["Status"] = 7001
        sim.faults.reject_logins = False
        await wait_until(lambda: d.daemon.resyncs_ok == 2, timeout=10, what="resync")
        await wait_until(lambda: len(_completions(path)) == 3, what="delivery")
        assert not set(gap) & set(d.daemon.tracker.running_jobs)
    assert sorted(g for g, o in _completions(path) if o == "resync") == sorted(gap)
    starts = [e for e in _lines(path) if e["event"]["Type"] == 4200
              and e["event"]["Data"]["GUID"] in gap]
    assert starts == []


async def test_a_job_time_beyond_64_bits_is_not_a_sync_s_timestamp(
        sim: Simulator, tmp_path: Path) -> None:
    """A gap job started at 2^63 + 5 (and one ended then): the sync still reports both, with a
    timestamp the ledger can keep, and the next sync succeeds too."""
    path = tmp_path / "events.jsonl"
    async with running(_file_cfg(sim, tmp_path, path)) as d:
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        await _open_gap(sim, d)
        running_guid = sim.world.start_job()["Data"]["GUID"]
        (done_guid,) = _gap_jobs(sim, 1)
        sim.world.jobs[running_guid]["StartTime"] = 2**63 + 5  # (an integer to orjson too)
        sim.world.jobs[done_guid]["EndTime"] = 2**63 + 5
        sim.faults.reject_logins = False
        await wait_until(lambda: d.daemon.resyncs_ok == 2, timeout=10, what="resync")
        await wait_until(lambda: len(_lines(path)) >= 3, what="delivery")
        got = {e["event"]["Data"]["GUID"]: e["event"] for e in _lines(path)
               if e["event"]["Type"] in (4200, 4201)}
        assert set(got) == {running_guid, done_guid}
        assert all(0 < ev["Timestamp"] < 2**63 for ev in got.values())
        await sim.drop_clients()
        await wait_until(lambda: d.daemon.resyncs_ok == 3, timeout=10, what="next resync")


async def test_silent_peer_is_replaced_and_resynced(sim: Simulator, tmp_path: Path) -> None:
    """Jobs that complete while the server is silent arrive through the resync that follows."""
    path = tmp_path / "events.jsonl"
    cfg = _file_cfg(sim, tmp_path, path, stream={"ping_interval": 0.2, "ping_timeout": 0.3})
    async with running(cfg) as d:
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        sim.faults.silent = True
        gap = _gap_jobs(sim, 5)
        await wait_until(lambda: d.stats.disconnects["ping_timeout"] == 1, what="detected")
        sim.faults.silent = False
        await wait_until(lambda: d.daemon.resyncs_ok == 2, timeout=10, what="resync")
        await wait_until(lambda: len(_completions(path)) == 5, what="delivery")
    assert sorted(g for g, o in _completions(path) if o == "resync") == sorted(gap)


async def test_a_silently_cancelled_job_is_found_by_rechecking_running_jobs(
        sim: Simulator, tmp_path: Path) -> None:
    """A job cancelled without any event, outside the resync window, is re-checked by GUID."""
    path = tmp_path / "events.jsonl"
    async with running(_file_cfg(sim, tmp_path, path)) as d:
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        old = int(time.time()) - 20000
        started = sim.world.start_job(now=old)
        sim.emit(started)
        guid = started["Data"]["GUID"]
        await wait_until(lambda: guid in d.daemon.tracker.running_jobs, what="tracked")
        sim.world.cancel_silently(guid, now=old + 60)  # ended long before the overlap window
        await sim.drop_clients()
        await wait_until(lambda: d.daemon.resyncs_ok == 2, timeout=10, what="resync")
        await wait_until(lambda: (guid, "resync") in _completions(path), what="delivered")
    line = next(e for e in _lines(path) if e["event"]["Type"] == COMPLETED)
    assert line["event"]["Data"]["Status"] == 7005
    assert sim.api_calls["/api/v1/admin/get-job-properties"] >= 1
    assert guid not in d.daemon.tracker.running_jobs


def _conf(sim: Simulator, tmp_path: Path, path: Path) -> Path:
    return write_config(tmp_path, sim.url, f"""
[log]
format = "json"
[sinks.f]
type = "file"
path = "{path}"
fsync = "always"
""")


async def _start(conf: Path) -> asyncio.subprocess.Process:
    return await run_cli("run", "-c", str(conf))


def ledger_state(state_dir: Path) -> dict[str, Any]:
    """What the ledger in ``state_dir`` holds of the delivery state (read-only, beside a running
    daemon, as an operator's tool would)."""
    db = sqlite3.connect(f"file:{state_dir / 'ledger.db'}?mode=ro", uri=True)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta"))
        return {"server": meta.get("server", ""),
                "watermark": int(meta.get("watermark", "0")),
                "server_start_hash": meta.get("server_start_hash", ""),
                "accounts_baseline": meta.get("accounts_baseline") == "1",
                "running_jobs": {g: [u, t] for g, u, t in db.execute(
                    "SELECT guid, username, start FROM running_jobs")},
                "accounts": {n: [d, c] for n, d, c in db.execute(
                    "SELECT username, digest, creation_guid FROM accounts")},
                "dedup": db.execute("SELECT coalesce(sum(count), 0) FROM dedup").fetchone()[0]}
    finally:
        db.close()


async def _checkpointed(tmp_path: Path, predicate: Any) -> None:
    def ok() -> bool:
        try:
            return bool(predicate(ledger_state(tmp_path / "state")))
        except sqlite3.Error:
            return False
    await wait_until(ok, timeout=10, what="ledger")


async def test_sigkill_then_jobs_while_down_then_restart_loses_and_repeats_nothing(
        sim: Simulator, tmp_path: Path) -> None:
    """Killed with -9; jobs complete (and a running one ends) while it is down; after the
    restart every completion is in the file exactly once."""
    path = tmp_path / "events.jsonl"
    conf = _conf(sim, tmp_path, path)
    proc = await _start(conf)
    try:
        await sim.wait_for_clients(1, timeout=10)
        await _checkpointed(tmp_path, lambda c: c["watermark"] > 0)
        live = []
        for _ in range(10):
            ev = sim.world.start_job()
            sim.emit(ev)
            sim.emit(sim.world.complete_job(ev["Data"]["GUID"]))
            live.append(ev["Data"]["GUID"])
        running_then = sim.world.start_job()
        sim.emit(running_then)
        await wait_until(lambda: len(_completions(path)) == 10, what="live delivery")
        rj = running_then["Data"]["GUID"]
        await _checkpointed(tmp_path, lambda c: rj in c["running_jobs"])
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        down = _gap_jobs(sim, 10)
        sim.world.complete_job(rj)
        proc = await _start(conf)
        # every synthesized event is published once the sync says it is done: a repeat would
        # be among them (the drain at SIGTERM writes whatever is still queued)
        assert (await read_log(proc.stderr, "resync done"))["events"] >= 11
        await wait_until(lambda: len(_completions(path)) == 21, timeout=15, what="catch-up")
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    done = _completions(path)
    counts = Counter(g for g, _o in done)
    assert set(counts) == set(live) | set(down) | {rj}
    assert max(counts.values()) == 1
    assert {g for g, o in done if o == "resync"} == set(down) | {rj}


async def test_sigterm_during_a_burst_and_restart_loses_and_repeats_nothing(
        sim: Simulator, tmp_path: Path) -> None:
    """SIGTERM while jobs stream in, jobs go on while it is down, restart: every job that
    completed after the first start is delivered exactly once."""
    path = tmp_path / "events.jsonl"
    conf = _conf(sim, tmp_path, path)
    proc = await _start(conf)
    try:
        await sim.wait_for_clients(1, timeout=10)
        await _checkpointed(tmp_path, lambda c: c["watermark"] > 0)
        t0 = int(time.time())
        sim.set_rate(400)
        await wait_until(lambda: len(_completions(path)) >= 30, timeout=15,
                         what="the burst streaming in")
        proc.send_signal(signal.SIGTERM)
        _o, err = await asyncio.wait_for(proc.communicate(), 15)
        assert proc.returncode == 0, err.decode()[-2000:]

        def ended() -> int:  # (what the end counts: completions after the first start's second)
            return sum(1 for j in sim.world.jobs.values() if j["EndTime"] > t0)

        down = ended()
        await wait_until(lambda: ended() >= down + 30, timeout=15,
                         what="jobs ending while it is down")
        proc = await _start(conf)
        await read_log(proc.stderr, "resync done")
        live = sum(1 for _g, o in _completions(path) if o == "stream")
        await wait_until(lambda: sum(1 for _g, o in _completions(path) if o == "stream")
                         >= live + 30, timeout=15, what="live completions after the restart")
        sim.set_rate(0)
        expected = {g for g, j in sim.world.jobs.items() if j["EndTime"] > t0}
        await wait_until(lambda: {g for g, _o in _completions(path)} >= expected, timeout=15,
                         what="all completions")
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    counts = Counter(g for g, _o in _completions(path))
    assert len(expected) > 50
    assert max(counts.values()) == 1, [g for g, n in counts.items() if n > 1][:5]
    # nothing delivered that did not complete after the first start (or in its very second)
    assert all(sim.world.jobs[g]["EndTime"] >= t0 for g in counts)


async def test_each_profile_is_parsed_at_most_twice_by_a_sync(
        sim: Simulator, tmp_path: Path, monkeypatch: Any) -> None:
    """The sync reads the accounts' answer one profile at a time (each read parses it): once
    for the survey, once more for a profile whose events carry it, however many devices
    it gained (40 here, one event each)."""
    from cometstream.api import ProfileMap

    reads: Counter[str] = Counter()
    read = ProfileMap.__getitem__

    def counted(self: ProfileMap, name: str) -> dict[str, Any]:
        reads[name] += 1
        return read(self, name)

    monkeypatch.setattr(ProfileMap, "__getitem__", counted)
    path = tmp_path / "events.jsonl"
    async with running(_file_cfg(sim, tmp_path, path)) as d:
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        assert reads and max(reads.values()) == 1
        await _open_gap(sim, d)
        owner = min(sim.world.users)
        added = {sim.world.add_device(owner)["ResourceID"] for _ in range(40)}
        reads.clear()
        sim.faults.reject_logins = False
        await wait_until(lambda: d.daemon.resyncs_ok == 2, timeout=10, what="resync")
    new = {e["event"]["ResourceID"] for e in _lines(path)
           if e["origin"] == "resync" and e["type_name"] == "SEVT_DEVICE_NEW"}
    assert new == added
    assert reads[owner] == 2, reads[owner]
    assert set(reads) == set(sim.world.users) and max(reads.values()) == 2


async def test_account_changes_during_a_gap_become_the_right_events(
        sim: Simulator, tmp_path: Path) -> None:
    """New, updated, re-created and removed accounts and added/removed devices are synthesized;
    accounts whose only change is job statistics are not reported as updated."""
    path = tmp_path / "events.jsonl"
    async with running(_file_cfg(sim, tmp_path, path)) as d:
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        await _open_gap(sim, d)
        users = sorted(sim.world.users)
        updated = sim.world.update_account(users[0])["Data"]["Username"]
        created_profile = sim.world.new_account()["Data"]
        created = created_profile["Username"]
        removed_devices = set(sim.world.users[users[1]]["Devices"])
        sim.world.remove_account(users[1])
        dev_new = sim.world.add_device(users[2])["ResourceID"]
        victim = users[3]
        dev_gone = min(sim.world.users[victim]["Devices"])
        sim.world.remove_device(victim, dev_gone)
        stats_only = {sim.world.jobs[g]["Username"] for g in _gap_jobs(sim, 10)}
        sim.faults.reject_logins = False
        await wait_until(lambda: d.daemon.resyncs_ok == 2, timeout=10, what="resync")
        await wait_until(lambda: d.stats.resync_events["account_removed"] >= 1, what="events")
    got: dict[str, set[str]] = {}
    for e in _lines(path):
        if e["origin"] == "resync" and e["event"]["Type"] not in (COMPLETED, NEW):
            got.setdefault(e["type_name"], set()).add(e["event"].get("ResourceID", ""))
    assert got["SEVT_ACCOUNT_NEW"] == {created}
    assert got["SEVT_ACCOUNT_REMOVED"] == {users[1]}
    # devices are tracked on their own: a new account's devices are new devices, a removed
    # account's devices are removed devices
    assert got["SEVT_DEVICE_NEW"] == {dev_new} | set(created_profile.get("Devices") or {})
    assert got["SEVT_DEVICE_REMOVED"] == {dev_gone} | removed_devices
    # a changed profile is an update (removing a device also removed its Protected Items);
    # a new device alone, or job statistics alone, are not
    assert got["SEVT_ACCOUNT_UPDATED"] == {updated, victim}
    assert stats_only - {updated, victim}, "some accounts only had job statistics"


async def test_secrets_in_account_and_server_events_never_reach_a_sink(
        sim: Simulator, tmp_path: Path) -> None:
    """PasswordHash, TOTPKey, recovery codes, server passwords and keys are redacted, live
    and synthesized; other values (a 2**64 integer) survive."""
    path = tmp_path / "events.jsonl"
    async with running(_file_cfg(sim, tmp_path, path)) as d:
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        user = min(sim.world.users)
        sim.world.users[user]["PasswordHash"] = "LIVE-HASH-SECRET"
        sim.world.users[user]["TOTPKey"] = "LIVE-TOTP-SECRET"
        sim.emit(sim.world.update_account(user))
        sim.emit(b'{"Type":4403,"TypeString":"SEVT_SERVER_UPDATED","Data":{"Email":'
                 b'{"SMTPPassword":"SMTP-SECRET","Port":587},"Big":18446744073709551616,'
                 b'"S3":[{"AccessKey":"AK-SECRET","SecretKey":"SK-SECRET","Bucket":"b"}],'
                 b'"Storage":{"CometBucketKey":"CB-SECRET","AZBAccountKey":"AZ-SECRET",'
                 b'"B2":{"AccountID":"acct","Key":"B2-SECRET"},'
                 b'"EncryptionKeyEncryptionMethod":2},'
                 b'"WebhookOptions":{"w":{"URL":"https://h/","CustomHeaders":'
                 b'{"Authorization":"Bearer HDR-SECRET"}}}}}')
        await wait_until(lambda: d.stats.events_received == 3, what="live events")
        await _open_gap(sim, d)
        other = sorted(sim.world.users)[1]
        sim.world.users[other]["PasswordRecovery"] = "RECOVERY-SECRET"
        sim.world.update_account(other)
        sim.faults.reject_logins = False
        await wait_until(lambda: d.stats.resync_events["account_updated"] >= 1, timeout=10,
                         what="synthesized update")
        await wait_until(lambda: d.sink_stats("f").delivered >= d.stats.events_received,
                         what="delivery")
    text = path.read_bytes()
    for secret in (b"HASH-SECRET", b"TOTP-SECRET", b"SMTP-SECRET", b"AK-SECRET", b"SK-SECRET",
                   b"RECOVERY-SECRET", b"CB-SECRET", b"AZ-SECRET", b"B2-SECRET", b"HDR-SECRET"):
        assert secret not in text
    assert b'"EncryptionKeyEncryptionMethod":2' in text and b'"AccountID":"acct"' in text
    assert b'"SMTPPassword":"[REDACTED]"' in text and b'"Bucket":"b"' in text
    assert b'"Big":18446744073709551616' in text and b'"Port":587' in text
    assert b'"PasswordFormat"' in text  # not a secret: kept


async def test_a_failing_api_is_retried_while_live_events_flow(sim: Simulator,
                                                                tmp_path: Path) -> None:
    """API down after a gap: resync retries with backoff, live events are delivered meanwhile,
    the watermark stays before the gap; when the API is back the gap is filled."""
    path = tmp_path / "events.jsonl"
    async with running(_file_cfg(sim, tmp_path, path)) as d:
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        await _open_gap(sim, d)
        await d.daemon.ledger.commit()
        before = d.daemon.tracker.watermark
        # the gap's jobs end in a later second than the watermark
        await wait_until(lambda: time.time() >= before + 2, what="a later second")
        gap = _gap_jobs(sim, 5)
        sim.faults.api_down = True
        sim.faults.reject_logins = False
        await wait_until(lambda: d.stats.resync_runs["error"] >= 2, timeout=10, what="retries")
        live = sim.world.start_job()
        sim.emit(live)
        await wait_until(lambda: any(e["event"].get("ResourceID") == live["Data"]["GUID"]
                                     for e in _lines(path)), what="live event during outage")
        pipeline = d.daemon.pipeline
        await wait_until(lambda: pipeline.delivered_through() == pipeline.seq, what="its ack")
        await d.daemon.ledger.commit()
        assert d.daemon.tracker.watermark == before
        sim.faults.api_down = False
        await wait_until(lambda: d.daemon.resyncs_ok == 2, timeout=10, what="resync")
        await wait_until(lambda: len(_completions(path)) == 5, what="gap filled")
        # written is not yet acknowledged (the sink's ack follows its write by a loop turn or
        # two): until it is, the watermark waits before the oldest unacknowledged event
        await wait_until(lambda: pipeline.delivered_through() == pipeline.seq, what="acks")
        await d.daemon.ledger.commit()
        assert d.daemon.tracker.watermark > before
    assert sorted(g for g, _o in _completions(path)) == sorted(gap)


async def test_corrupt_checkpoint_is_moved_aside_and_the_daemon_runs(sim: Simulator,
                                                                     tmp_path: Path) -> None:
    """A torn checkpoint of an earlier version is reported, kept for inspection, and the
    migration goes on without it: a fresh baseline, in the ledger."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "checkpoint.json").write_bytes(b'{"version": 1, "watermark": 17')
    path = tmp_path / "events.jsonl"
    async with running(_file_cfg(sim, tmp_path, path)) as d:
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        assert d.stats.resync_runs["baseline"] == 1
    aside = list(state.glob("checkpoint.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b'{"version": 1')
    assert not (state / "checkpoint.json").exists()
    fresh = ledger_state(state)
    assert fresh["watermark"] > 17 and fresh["accounts_baseline"]


async def test_a_checkpoint_of_either_format_migrates_into_the_ledger(tmp_path: Path) -> None:
    """A format-2 checkpoint (fingerprints) and a format-1 one ([key, timestamp]) migrate into
    the ledger with every key of their window: after the migration the same keys are seen, the
    old file is gone, and a damaged compact form is moved aside like any corrupt checkpoint."""
    import base64
    from array import array

    from cometstream.delivery.identity import fingerprint
    from cometstream.delivery.ledger import Ledger
    from cometstream.delivery.tracker import Tracker

    keys = [f"4201:{i:08d}-guid:{1733400000 + i}" for i in range(1000)]
    fps = array("q", [fingerprint(k) for k in keys])
    stamps = array("q", range(1733400000, 1733401000))

    async def migrated(doc: dict[str, Any]) -> Tracker:
        d = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        (d / "checkpoint.json").write_bytes(orjson.dumps(doc))
        ledger = Ledger(d, ["a"], server="sim", max_bytes=1 << 20, max_age=3600,
                        fsync_interval=1.0)
        ledger.open()
        await ledger.close()
        assert ledger.migrated and not (d / "checkpoint.json").exists()
        return Tracker(ledger.state)

    tr = await migrated({"version": 2, "server": "sim", "watermark": 1733401000,
                         "running_jobs": {"j": ["u", 5]},
                         "dedup": {"fingerprints": base64.b64encode(fps.tobytes()).decode(),
                                   "timestamps": base64.b64encode(stamps.tobytes()).decode()}})
    assert all(tr.dedup.seen(k) for k in keys) and not tr.dedup.seen("4201:other:1")
    assert list(tr.dedup.delivered.values()) == list(stamps)
    assert tr.watermark == 1733401000 and tr.running_jobs == {"j": ["u", 5]}

    old = await migrated({"version": 1, "server": "sim", "watermark": 1733400005,
                          "dedup": [[k, 1733400000 + i] for i, k in enumerate(keys[:3])]})
    assert old.dedup.seen(keys[0]) and old.dedup.seen(keys[2]) and not old.dedup.seen(keys[3])

    bad = await migrated({"version": 2, "server": "sim", "watermark": 1733400005,
                          "dedup": {"fingerprints": "AAAAAAAAAAA=", "timestamps": ""}})
    assert bad.watermark == 0
    assert len(list(tmp_path.glob("*/checkpoint.json.corrupt-*"))) == 1


async def test_checkpoint_survives_a_restart(sim: Simulator, tmp_path: Path) -> None:
    """The second run loads the checkpoint and resyncs from it instead of a new baseline."""
    path = tmp_path / "events.jsonl"
    cfg = _file_cfg(sim, tmp_path, path)
    async with running(cfg) as d:
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
    cp = ledger_state(tmp_path / "state")
    assert cp["server"] == "sim" and cp["server_start_hash"] == sim.server_start_hash
    assert len(cp["accounts"]) == len(sim.world.users)
    async with running(cfg) as d2:
        await wait_until(lambda: d2.daemon.resyncs_ok == 1, what="resync")
        assert d2.stats.resync_runs == {"ok": 1}


async def test_server_restart_widens_the_window(sim: Simulator, tmp_path: Path) -> None:
    """A new ServerStartHash reaches back further than the overlap."""
    path = tmp_path / "events.jsonl"
    cfg = _file_cfg(sim, tmp_path, path, resync={"overlap": 10})
    async with running(cfg) as d:
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        await sim.restart()
        await wait_until(lambda: d.daemon.resyncs_ok == 2, timeout=10, what="resync")
    assert d.daemon.tracker.server_start_hash == sim.server_start_hash
    # the window asked for started an hour before the watermark, not 10 s (the watermark may
    # move on with live events until the drop: the window's length says it)
    assert d.daemon.last_resync is not None
    since, end = d.daemon.last_resync.window
    assert end - since >= 3600


async def test_backfill_replays_history_to_the_chosen_sink(sim: Simulator, tmp_path: Path) -> None:
    """cometstream backfill sends the job completions of a past period, origin backfill."""
    path = tmp_path / "history.jsonl"
    other = tmp_path / "other.jsonl"
    conf = tmp_path / "c.toml"
    conf.write_text(f"""
[server]
url = "{sim.url}"
username = "{USER}"
password = {toml_str(PASSWORD)}
[http]
listen = ""
[sinks.hist]
type = "file"
path = "{path}"
[sinks.other]
type = "file"
path = "{other}"
""", encoding="utf-8")
    now = int(time.time())
    since, until = now - 2 * 86400, now - 3600
    proc = await run_cli("backfill", "-c", str(conf), "--since", str(since), "--until",
                         str(until), "--sink", "hist")
    _out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    expected = sorted((j["EndTime"], g) for g, j in sim.world.jobs.items()
                      if j["EndTime"] and since <= j["EndTime"] < until)
    lines = _lines(path)
    assert [(e["event"]["Data"]["EndTime"], e["event"]["Data"]["GUID"]) for e in lines] == expected
    assert len(expected) > 10
    assert {e["origin"] for e in lines} == {"backfill"}
    assert not other.exists() or other.read_bytes() == b""


async def test_a_repeated_job_event_is_delivered_once_but_identical_logins_twice(
        sim: Simulator, tmp_path: Path) -> None:
    """Dedup is by job identity: a replayed SEVT_JOB_COMPLETED is dropped (and counted), two
    byte-identical login events (same user, path and second) are two real events."""
    async with running(make_config(sim.url, tmp_path)) as d:
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        job = b'{"Type":4201,"Timestamp":1733400000,"Data":{"GUID":"same-job","Status":5000}}'
        login = b'{"Actor":"u","Type":4103,"Timestamp":1733400000,"ResourceID":"/api/v1/x"}'
        for frame in (job, login, job, login):
            sim.emit(frame)
        await wait_until(lambda: d.stats.events_received == 5, what="received")
        await wait_until(lambda: d.sink_stats("mem").delivered == 4, what="delivered")
        assert [ev.type for ev in d.sink("mem").events[1:]] == [4201, 4103, 4103]
        assert d.stats.duplicates == 1


# --- review regressions: each of these once lost or repeated an event --------------------------
def _job_ev(type_: int, guid: str, end: int = 0, *, origin: str = "stream") -> Any:
    from cometstream.protocol import decode_frame

    raw = orjson.dumps({"Type": type_, "Timestamp": end or 1733400000,
                        "Data": {"GUID": guid, "Username": "u", "StartTime": 1733390000,
                                 "EndTime": end, "Status": 5000 if end else 6001}})
    ev = decode_frame(raw, received_at=time.time(), server="s")
    ev.origin = origin  # type: ignore[union-attr]
    return ev


async def test_a_cancelled_blocked_publish_still_delivers_and_holds_the_watermark() -> None:
    """A producer waiting on a full `block` queue that is cancelled has still queued its event:
    it is delivered, and the watermark never passes it before that."""
    import asyncio as aio

    from cometstream.config import SinkConfig
    from cometstream.observe.metrics import Metrics
    from cometstream.pipeline import Pipeline
    from cometstream.sinks.memory import MemorySink

    sink = MemorySink("m")
    sink.hang.clear()
    cfg = SinkConfig(name="m", type="memory", types=None, format="event", buffer=1,
                     when_full="block", options={})
    p = Pipeline([(cfg, sink)], Metrics("s"))
    p.start()
    evs = [_job_ev(COMPLETED, f"j{i}", 1733400000 + i) for i in range(3)]
    assert p.publish(evs[0]) is None
    await wait_until(lambda: p.routes[0].inflight == 1, what="j0 in flight, hanging")
    assert p.publish(evs[1]) is None
    waiting = p.publish(evs[2])
    assert waiting is not None
    task = aio.ensure_future(waiting)
    await aio.sleep(0)
    task.cancel()
    assert p.delivered_through() == 0
    sink.hang.set()
    await wait_until(lambda: len(sink.events) == 3, what="all three")
    assert [e.doc["Data"]["GUID"] for e in sink.events] == ["j0", "j1", "j2"]
    assert p.delivered_through() == 3
    await p.drain(1.0)


def test_job_and_account_state_change_only_when_delivered() -> None:
    """A completion published but not kept keeps its job 'running' for the ledger; a resync's
    account snapshot is applied only once its events are kept; each diff for the ledger holds
    what changed since the last one, and only that."""
    from cometstream.delivery.identity import job_event
    from cometstream.delivery.tracker import Tracker

    tr = Tracker()
    tr.set_running("j1", "u", 1)
    assert tr.diff().running_jobs == {"j1": ["u", 1]}
    done = _job_ev(COMPLETED, "j1", 1733400000)
    done.seq = 7
    tr.published_job(7, *job_event(done))  # type: ignore[arg-type]
    tr.stage_accounts(7, {"u": ["digest", "guid"]}, {"dev": "u"})
    tr.settle(6, live_until=None)
    diff = tr.diff()
    assert "j1" in tr.running_jobs and tr.accounts == {}
    assert diff.running_jobs == {} and diff.accounts == {} and diff.dedup == []
    assert tr.dedup.seen(done.dedup_key())  # in flight: a resync must not synthesize it again
    tr.settle(7, live_until=None)
    assert "j1" not in tr.running_jobs
    assert tr.accounts == {"u": ["digest", "guid"]} and tr.devices == {"dev": "u"}
    diff = tr.diff()
    assert diff.running_jobs == {"j1": None} and diff.accounts == {"u": ["digest", "guid"]}
    assert diff.devices == {"dev": "u"} and [fp for fp, _ts in diff.dedup] == [
        job_event(done)[0]]
    tr.restore(diff)  # a failed commit: its changes go with the next one
    again = tr.diff()
    assert again.running_jobs == diff.running_jobs and again.dedup == diff.dedup


def test_an_account_is_digested_from_its_last_delivered_unredacted_profile() -> None:
    """The stream's account events reach the checkpoint as the digest of the newest delivered
    profile, as the server sent it (a password change is a change, though sinks see it
    redacted), however many updates came between two checkpoints."""
    from cometstream.delivery.identity import account_entry, action
    from cometstream.delivery.tracker import Tracker
    from cometstream.protocol import decode_frame
    from cometstream.redact import Redactor

    tr = Tracker()
    redactor = Redactor()
    profiles = [{"Username": "u", "CreationGUID": "g", "PasswordHash": f"hash-{i}",
                 "Sources": {"s1": {"Statistics": {"LastStartTime": i}}}} for i in range(3)]
    for seq, profile in enumerate(profiles, 1):
        ev = decode_frame(orjson.dumps({"Type": 4102, "Timestamp": 1733400000 + seq,
                                        "Data": profile}), received_at=time.time(), server="s")
        ev.seq = seq  # type: ignore[union-attr]
        act = action(ev)  # type: ignore[arg-type]
        redactor.apply(ev)  # type: ignore[arg-type]
        assert b"hash-" not in ev.raw  # type: ignore[union-attr]
        tr.published(ev, act)  # type: ignore[arg-type]
    tr.settle(2, live_until=None)
    assert tr.diff().accounts == {"u": account_entry(profiles[1])}
    tr.settle(3, live_until=None)
    entry = tr.diff().accounts["u"]
    assert entry == account_entry(profiles[2]) and entry[1] == "g"
    assert entry != account_entry(profiles[1])  # only the password changed
    # statistics alone are not a change
    assert account_entry(dict(profiles[2], Sources={"s1": {"Statistics": {"x": 1}}})) == entry


def test_a_profile_digested_in_place_gives_the_digest_of_a_copy() -> None:
    """The checkpoint digests the profiles it parsed for that alone in place (``owned``); the
    digest must be the one the resync takes of the API's profiles, which it keeps using (so
    it copies, and leaves them as they were): ``Statistics`` at any depth and the top-level
    ``Devices`` left out, whatever the nesting. Seeded random profiles and the simulator's."""
    import copy
    import random

    from cometstream.delivery.identity import profile_digest
    from cometstream.simulator.world import World

    rng = random.Random(5)

    def value(depth: int) -> Any:
        r = rng.random()
        if depth > 5 or r < 0.4:
            return rng.choice([1, "x", None, 2.5, True, "é"])
        if r < 0.6:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {rng.choice(["Statistics", "Devices", "A", "B", "C"]): value(depth + 1)
                for _ in range(rng.randrange(5))}

    world = World(seed=3)
    profiles = [p for p in (value(0) for _ in range(2000)) if isinstance(p, dict)]
    profiles += [world.update_account()["Data"] for _ in range(50)]
    differ = 0
    for profile in profiles:
        kept = copy.deepcopy(profile)
        digest = profile_digest(profile)
        assert profile == kept
        assert profile_digest(copy.deepcopy(profile), owned=True) == digest
        differ += digest != profile_digest({})
    assert differ > 500


def test_the_watermark_stays_before_the_oldest_unacknowledged_timestamp() -> None:
    """Timestamps do not rise with the publish order: the watermark waits for the oldest event
    still unacknowledged, whichever was published first."""
    from cometstream.delivery.identity import job_event
    from cometstream.delivery.tracker import Tracker

    tr = Tracker()
    tr.frozen = False
    for seq, (guid, end) in enumerate((("a", 1733400100), ("b", 1733400050),
                                       ("c", 1733400080), ("d", 1733400090)), 1):
        ev = _job_ev(COMPLETED, guid, end)
        ev.seq = seq
        tr.published_job(seq, *job_event(ev))  # type: ignore[arg-type]
    tr.settle(1, live_until=None)
    assert tr.watermark == 1733400049
    tr.settle(2, live_until=None)
    assert tr.watermark == 1733400079
    tr.settle(3, live_until=None)
    assert tr.watermark == 1733400089
    tr.settle(4, live_until=None)
    assert tr.watermark == 1733400100


def test_a_revived_job_completing_again_is_not_a_duplicate() -> None:
    """Abandoned then revived, a job completes twice with two EndTimes: both are delivered."""
    from cometstream.delivery.identity import job_event
    from cometstream.delivery.tracker import Tracker

    tr = Tracker()
    first, again, replay = (_job_ev(COMPLETED, "j", 100), _job_ev(COMPLETED, "j", 200),
                            _job_ev(COMPLETED, "j", 100))
    for seq, ev in enumerate((first, again), 1):
        ev.seq = seq
        fp, ts, act = job_event(ev)
        assert fp is not None and not tr.dedup.seen(fp)
        tr.published_job(seq, fp, ts, act)
    assert tr.dedup.seen(job_event(replay)[0])  # type: ignore[arg-type]


async def test_live_events_held_during_a_slow_resync_come_after_it_without_repeats(
        sim: Simulator, tmp_path: Path) -> None:
    """While a slow sync runs, a job starts and ends live: the sync leaves it to the held live
    events (the server's own bytes), which follow the sync's events in order, each once.
    (The hold is bounded by resync.hold_timeout; this sync takes about 1.6 s: the bound is
    set well above it.)"""
    path = tmp_path / "events.jsonl"
    async with running(_file_cfg(sim, tmp_path, path, resync={"hold_timeout": 30.0})) as d:
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        await _open_gap(sim, d)
        gap = _gap_jobs(sim, 3)
        sim.faults.api_delay = 0.4
        sim.faults.reject_logins = False
        await wait_until(lambda: d.daemon.gate.holding, timeout=10, what="holding")
        started = sim.world.start_job()
        sim.emit(started)
        guid = started["Data"]["GUID"]
        sim.emit(sim.world.complete_job(guid))
        await wait_until(lambda: d.daemon.resyncs_ok == 2, timeout=15, what="resync")
        after = sim.world.start_job()
        sim.emit(after)
        await wait_until(lambda: any(e["event"].get("ResourceID") == after["Data"]["GUID"]
                                     for e in _lines(path)), what="later live event")
        await wait_until(lambda: guid not in d.daemon.tracker.running_jobs, what="settled")
    events = [(e["event"]["Type"], e["event"].get("ResourceID"), e["origin"])
              for e in _lines(path) if e["event"]["Type"] in (NEW, COMPLETED)]
    completions = [r for t, r, _o in events if t == COMPLETED]
    assert sorted(completions) == sorted([*gap, guid])  # each once
    assert [e for e in events if e[1] == guid] == [(NEW, guid, "stream"),
                                                   (COMPLETED, guid, "stream")]
    first_live = events.index((NEW, guid, "stream"))
    assert {e[2] for e in events[:first_live]} == {"resync"}  # the gap came first
    assert events[-1] == (NEW, after["Data"]["GUID"], "stream")


async def test_a_sync_that_dies_of_a_bug_lets_the_held_events_go_and_says_so(
        sim: Simulator, tmp_path: Path) -> None:
    """A sync whose task dies of an unexpected error (not an API failure: those are retried)
    is logged once with its traceback, counted as a failed run, named on /readyz, and the
    live events it held are delivered rather than held for ever; the next sync clears it."""
    path = tmp_path / "events.jsonl"
    async with running(_file_cfg(sim, tmp_path, path, resync={"hold_timeout": 60.0})) as d:
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        stats = d.daemon.metrics.stream
        histogram = stats.resync_duration

        class Broken:
            def observe(self, _value: float) -> None:
                raise RuntimeError("a bug after the sync")

        stats.resync_duration = Broken()
        await _open_gap(sim, d)
        sim.faults.api_delay = 0.3
        with structlog.testing.capture_logs() as logs:
            sim.faults.reject_logins = False
            await wait_until(lambda: d.daemon.gate.holding, timeout=10, what="holding")
            live = sim.world.start_job()
            sim.emit(live)
            await wait_until(lambda: stats.resync_runs["error"] == 1, timeout=10, what="death")
            await wait_until(lambda: any(e["event"].get("ResourceID") == live["Data"]["GUID"]
                                         for e in _lines(path)), what="held event delivered")
        died = [e for e in logs if e["event"] == "background task died"]
        assert [(e["task"], e["log_level"]) for e in died] == [("resync", "error")]
        assert isinstance(died[0]["exc_info"], RuntimeError)
        assert any("background task resync died: RuntimeError" in r
                   for r in d.daemon.not_ready_reasons())
        stats.resync_duration = histogram
        sim.faults.api_delay = 0.0
        await sim.drop_clients()
        await wait_until(lambda: d.daemon.resyncs_ok == 2, timeout=10, what="the next sync")
        assert not any("background task" in r for r in d.daemon.not_ready_reasons())


async def test_a_daemon_clock_ten_minutes_ahead_loses_nothing(sim: Simulator,
                                                              tmp_path: Path) -> None:
    """Synthesized events and the watermark follow the server's clock, not ours."""
    from cometstream.daemon import Daemon

    path = tmp_path / "events.jsonl"
    cfg = _file_cfg(sim, tmp_path, path)
    stop = asyncio.Event()
    daemon = Daemon(cfg, rand=lambda: 1.0, resync_retry=(0.05, 0.3),
                    clock=lambda: time.time() + 600)
    task = asyncio.create_task(daemon.run(stop))
    try:
        await wait_until(lambda: daemon.resyncs_ok == 1, what="baseline")
        sim.faults.reject_logins = True
        await sim.drop_clients()
        await wait_until(lambda: daemon.metrics.stream.connects["rejected"] >= 1, what="gap")
        await daemon.ledger.commit()
        assert daemon.tracker.watermark <= time.time() + 1
        gap = _gap_jobs(sim, 5)
        sim.faults.reject_logins = False
        await wait_until(lambda: daemon.resyncs_ok == 2, timeout=10, what="resync")
        await wait_until(lambda: len(_completions(path)) == 5, what="delivery")
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
    assert sorted(g for g, _o in _completions(path)) == sorted(gap)


async def test_a_failed_first_sync_does_not_turn_the_gap_into_history(
        sim: Simulator, tmp_path: Path) -> None:
    """No checkpoint, the API down at the first connect, a drop, jobs in the gap, the API back:
    the baseline covers only what ended before the first connect, so the gap is delivered."""
    path = tmp_path / "events.jsonl"
    sim.faults.api_down = True
    async with running(_file_cfg(sim, tmp_path, path)) as d:
        await wait_until(lambda: d.stats.resync_runs["error"] >= 1, timeout=10, what="failure")
        first_hello = d.daemon.tracker.baseline_before
        assert first_hello > 0
        # the gap happens in a later second than the first HELLO
        await wait_until(lambda: int(time.time()) > first_hello, what="a later second")
        await _open_gap(sim, d)
        gap = _gap_jobs(sim, 4)
        sim.faults.api_down = False
        sim.faults.reject_logins = False
        await wait_until(lambda: d.daemon.resyncs_ok >= 1, timeout=15, what="baseline")
        await wait_until(lambda: len(_completions(path)) == 4, timeout=10, what="gap delivered")
    assert sorted(g for g, _o in _completions(path)) == sorted(gap)


async def test_a_checkpoint_with_wrong_entries_is_moved_aside(sim: Simulator,
                                                              tmp_path: Path) -> None:
    """Valid JSON with a malformed entry is treated as corrupt, not trusted."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "checkpoint.json").write_bytes(orjson.dumps({
        "version": 1, "server": "sim", "watermark": 1733400000, "accounts": {"u": 5}}))
    async with running(_file_cfg(sim, tmp_path, tmp_path / "e.jsonl")) as d:
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        assert d.stats.resync_runs == {"baseline": 1}
    assert len(list(state.glob("checkpoint.json.corrupt-*"))) == 1


async def _syncer(sim: Simulator, tmp_path: Path, *, watermark: int) -> Any:
    """A Resyncer on the simulator's admin API, as the daemon builds one, after a checkpoint
    at ``watermark`` (a sync, not a baseline); the caller closes its ``api``."""
    from cometstream.api import AdminClient
    from cometstream.delivery.tracker import Tracker
    from cometstream.redact import Redactor
    from cometstream.resync import Resyncer

    tr = Tracker()
    tr.has_checkpoint, tr.watermark = True, watermark
    api = AdminClient(make_config(sim.url, tmp_path).server)
    await api.__aenter__()
    return Resyncer(api, tr, server="s", overlap=0, redactor=Redactor())


def _hello(sim: Simulator) -> dict[str, Any]:
    return {"ServerStartHash": sim.server_start_hash}


def _no_emit(_ev: Any) -> None:
    return None


async def test_the_collector_is_paused_only_while_a_sync_synthesizes_never_across_an_await(
        sim: Simulator, tmp_path: Path) -> None:
    """A sync turns the cyclic collector off while it builds a span's events, never while the
    loop's other tasks run (a sink's turn, a wait for room, however long), leaves it as it
    found it when cancelled mid-wait, and never turns on one that was off."""
    import gc

    now = int(time.time())
    _gap_jobs(sim, 4)
    rs = await _syncer(sim, tmp_path, watermark=now - 5)
    others: list[bool] = []  # what another task of the loop sees while the sync runs
    running = True

    async def other_task() -> None:
        while running:
            others.append(gc.isenabled())
            await asyncio.sleep(0)

    try:
        assert gc.isenabled()
        while_making: list[bool] = []
        while_waiting: list[bool] = []
        third = asyncio.Event()

        async def wait(seconds: float) -> None:  # a sink's queue getting room after ``seconds``
            await asyncio.sleep(seconds)
            while_waiting.append(gc.isenabled())

        def emit_job(_ev: Any, _fp: int, _ts: int, _action: Any) -> Any:
            while_making.append(gc.isenabled())
            if len(while_making) == 1:
                return wait(0.01)
            if len(while_making) == 2:
                return wait(0.2)
            if len(while_making) == 3:
                third.set()
                return wait(30)  # a sink down: the sync is cancelled meanwhile
            return None

        watcher = asyncio.ensure_future(other_task())
        task = asyncio.ensure_future(rs.run(_hello(sim), _no_emit, emit_job))
        await asyncio.wait_for(third.wait(), 20)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        running = False
        await watcher
        assert while_making == [False, False, False] and while_waiting == [True, True]
        assert len(others) > 3 and all(others) and gc.isenabled()

        gc.disable()
        try:
            off: list[bool] = []

            def off_emit(_ev: Any, _fp: int, _ts: int, _action: Any) -> Any:
                off.append(gc.isenabled())
                return asyncio.sleep(0.01) if len(off) == 1 else None  # (a wait for room)

            await asyncio.wait_for(rs.run(_hello(sim), _no_emit, off_emit), 20)
            assert len(off) >= 3 and not any(off) and not gc.isenabled()
        finally:
            gc.enable()
    finally:
        await rs.api.__aexit__(None, None, None)


async def test_synthesized_job_events_are_the_documents_orjson_would_encode(
        sim: Simulator, tmp_path: Path) -> None:
    """The job events a sync assembles around the job's encoding are byte for byte
    ``orjson.dumps`` of the event document (unicode, escapes, large integers, odd names and
    organizations), started and completed, the second of a kind from the cached head too."""
    now = int(time.time())
    odd_user = "zoë \"q\" \u2028 😀"
    sim.world.users[odd_user] = {"Username": odd_user, "OrganizationID": "org-1"}
    sim.world.users["u"] = {"Username": "u", "OrganizationID": "ørg"}
    sim.world.users["n"] = {"Username": "n", "OrganizationID": 7}  # (a server's odd ID)
    extra = {"TotalSize": 18446744073709551615, "Tags": "<&>\\",
             "Progress": {"BytesDone": -1, "Ratio": 0.5}, "Nothing": None, "Empty": []}
    want: dict[str, tuple[str, Any]] = {}  # GUID -> (user, organization)
    for user, org in ((odd_user, "org-1"), ("", ""), ("u", "ørg"), ("n", 7)):
        for done in (True, True, False, False):  # twice each: the second from the cached head
            guid = sim.world.start_job()["Data"]["GUID"]
            if done:
                sim.world.complete_job(guid)
            sim.world.jobs[guid].update(extra, Username=user)
            want[guid] = (user, org)
    rs = await _syncer(sim, tmp_path, watermark=now - 5)
    got: list[Any] = []

    def emit_job(ev: Any, _fp: int, _ts: int, _action: Any) -> None:
        got.append(ev)

    try:
        await rs.run(_hello(sim), _no_emit, emit_job)
    finally:
        await rs.api.__aexit__(None, None, None)
    mine = {ev.doc["ResourceID"]: ev for ev in got if ev.doc["ResourceID"] in want}
    assert set(mine) == set(want)
    for guid, ev in mine.items():
        user, org = want[guid]
        job = orjson.loads(orjson.dumps(sim.world.jobs[guid]))
        type_ = COMPLETED if job["EndTime"] else NEW
        ts = job["EndTime"] or job["StartTime"]
        ref = {"Actor": user, "OwnerOrganizationID": org, "ResourceID": guid, "Type": type_,
               "Timestamp": ts, "TypeString": "SEVT_JOB_COMPLETED" if type_ == COMPLETED
               else "SEVT_JOB_NEW", "Data": job}
        assert ev.raw == orjson.dumps(ref) == orjson.dumps(ev.doc)
        assert ev.doc == ref and list(ev.doc) == list(ref)
        assert (ev.type, ev.origin, ev.server) == (type_, "resync", "s")
    assert all(ev.raw == orjson.dumps(ev.doc) for ev in got)  # the world's own jobs too


async def test_synthesized_job_events_keep_their_dedup_key_without_their_document(
        sim: Simulator, tmp_path: Path) -> None:
    """A sink that reads only the dedup key (webhook) gets it from a synthesized job event whose
    parsed document was released, without parsing its bytes again."""
    now = int(time.time())
    (done,) = _gap_jobs(sim, 1)
    running = sim.world.start_job()["Data"]["GUID"]
    end = sim.world.jobs[done]["EndTime"]
    rs = await _syncer(sim, tmp_path, watermark=now - 5)
    got: list[Any] = []

    def emit_job(ev: Any, _fp: int, _ts: int, _action: Any) -> None:
        ev.release_doc()
        got.append(ev)

    try:
        await rs.run(_hello(sim), _no_emit, emit_job)
    finally:
        await rs.api.__aexit__(None, None, None)
    keys = [ev.dedup_key() for ev in got]
    assert f"{NEW}:{running}" in keys and f"{COMPLETED}:{done}:{end}" in keys
    assert all(k is not None and k.startswith(f"{ev.type}:") for k, ev in zip(keys, got,
                                                                             strict=True))
    # not parsed again (no public view tells whether an Event holds its parsed document)
    assert all(ev._doc is None for ev in got)


async def test_huge_integers_and_lone_surrogates_in_api_answers_are_synthesized(
        sim: Simulator, tmp_path: Path) -> None:
    """What a server may put in an admin API answer and orjson refuses: an integer beyond 64
    bits and a lone surrogate (``"\\ud800"``) in a job and in a
    profile. The sync synthesizes both events (the integer kept exactly, the surrogate as
    U+FFFD) instead of failing at every reconnect."""
    path = tmp_path / "events.jsonl"
    async with running(_file_cfg(sim, tmp_path, path, redact={"enabled": False})) as d:
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        await _open_gap(sim, d)
        (guid,) = _gap_jobs(sim, 1)
        job = sim.world.jobs[guid]
        job["TotalSize"] = 2**64 + 1  # (orjson takes up to 2**64 - 1)
        job["Tags"] = "nightly-\ud800"
        user = min(sim.world.users)
        sim.world.users[user]["Sources"]["weird-\udc00"] = {"Description": "x\ud801",
                                                             "Big": 2**64 + 5}
        sim.world.update_account(user)
        sim.faults.reject_logins = False
        await wait_until(lambda: d.daemon.resyncs_ok == 2, timeout=10, what="resync")
        await wait_until(lambda: d.sink_stats("f").delivered >= d.stats.events_received
                         + d.stats.resync_events["job_completed"], what="delivery")
    lines = path.read_bytes().splitlines()
    (done,) = [line for line in lines if guid.encode() in line and b'"origin":"resync"' in line
               and b'"Type":4201' in line]
    assert b'"TotalSize":18446744073709551617' in done
    assert '"nightly-\ufffd"'.encode() in done
    (acct,) = [line for line in lines if b'"Type":4102' in line and b'"origin":"resync"' in line
               and user.encode() in line]
    assert b'"Big":18446744073709551621' in acct
    assert '"weird-\ufffd"'.encode() in acct and '"x\ufffd"'.encode() in acct


async def test_a_job_list_too_large_for_one_answer_is_read_in_shorter_spans(
        sim: Simulator, tmp_path: Path) -> None:
    """A day of jobs whose answer passes the client's bound for a job list is asked for again in
    halves, then quarters, ...: every completion of the window once, in time order, and no
    answer read past the bound."""
    from cometstream.api import AdminClient
    from cometstream.delivery.tracker import Tracker
    from cometstream.redact import Redactor
    from cometstream.resync import Resyncer

    now = int(time.time())
    since = now - 86_400
    done = []
    for i in range(600):  # spread over the day, 144 s apart
        t = since + 60 + i * 144
        guid = sim.world.start_job(now=t)["Data"]["GUID"]
        sim.world.complete_job(guid, now=t + 30)
        done.append(guid)
    tr = Tracker()
    tr.has_checkpoint, tr.watermark = True, since
    async with AdminClient(make_config(sim.url, tmp_path).server) as api:
        day = len(await api.call("admin/get-jobs-for-date-range", {"Start": since, "End": now}))
        assert day >= 600  # (and the world's own history)
        whole = sim.api_calls["/api/v1/admin/get-jobs-for-date-range"]
        api.max_jobs_response = 150 * 1024  # about 100 of these jobs
        rs = Resyncer(api, tr, server="s", overlap=0, redactor=Redactor(),
                      clock=lambda: float(now))
        got: list[tuple[int, str]] = []

        def emit_job(ev: Any, fp: int, ts: int, action: Any) -> None:
            if ev.type == COMPLETED:
                got.append((ts, ev.doc["Data"]["GUID"]))

        res = await rs.run(_hello(sim), _no_emit, emit_job)
    guids = [g for _ts, g in got]
    assert len(guids) == len(set(guids)) and [g for g in guids if g in set(done)] == done
    assert [ts for ts, _g in got] == sorted(ts for ts, _g in got)
    assert res.split >= 3  # a day > half > quarter > eighth (~80 jobs) fits
    # (one more call: the incomplete jobs)
    calls = sim.api_calls["/api/v1/admin/get-jobs-for-date-range"] - whole - 1
    assert res.split < calls <= res.split + 16


def test_the_completed_guids_a_sync_keeps_answer_exactly_in_8_bytes_each() -> None:
    """What the repeat filter asks at the release (was this job reported completed?) is
    answered exactly, before and after more GUIDs come, at 8 bytes a GUID."""
    import uuid

    from cometstream.resync import GuidSet

    done = GuidSet()
    guids = [str(uuid.UUID(int=i * 7919 + 1)) for i in range(5000)]
    for g in guids[:4000]:
        done.add(g)
    assert all(g in done for g in guids[:4000])
    assert not any(g in done for g in guids[4000:])
    assert 12345 not in done  # (not a GUID)
    for g in guids[4000:4500]:  # (more after a lookup: asked again, sorted again)
        done.add(g)
    assert all(g in done for g in guids[:4500]) and guids[4999] not in done
    assert len(done) == 4500 and done._fps.itemsize == 8


async def test_the_account_survey_leaves_a_shared_answer_as_it_was() -> None:
    """A parsed answer (not read one profile at a time) is shared with the fleet's read: the
    survey digests copies of its profiles, never the profiles themselves."""
    import copy

    from cometstream.resync import _survey

    users = {"a": {"OrganizationID": "o", "Devices": {"d": {"FriendlyName": "PC"}},
                   "Sources": {"s": {"Statistics": {"LastStartTime": 1}}}}}
    before = copy.deepcopy(users)
    orgs, entries, devices = await _survey(users)
    assert users == before
    assert (orgs, devices) == ({"a": "o"}, {"d": "a"})
    assert list(entries) == ["a"]
