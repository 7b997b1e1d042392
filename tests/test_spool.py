"""The durable spool: a sink that is down lags on disk, a restart resumes every sink from its
cursor, SIGKILL loses nothing the remedial sync cannot bring back, damage is quarantined."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from cometstream.simulator import Simulator

from .conftest import make_config, running, wait_until
from .kafka_broker import Broker


class Hook:
    """A webhook receiver on 127.0.0.1 that answers 503 while ``down``, else records the events."""

    def __init__(self) -> None:
        self.down = False
        self.events: list[bytes] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=1 << 26)
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.down:
            return web.Response(status=503)
        docs = orjson.loads(body)
        self.events.extend(orjson.dumps(d) for d in (docs if isinstance(docs, list) else [docs]))
        return web.Response(text="ok")


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines() if path.exists() else []


def _metrics(d: Any) -> dict[tuple[str, str], float]:
    """The daemon's exposition, as Prometheus would scrape it: (name, sink or server) -> value."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(generate_latest(d.daemon.registry).decode()):
        for sample in fam.samples:
            label = sample.labels.get("sink") or sample.labels.get("server", "")
            out[(sample.name, label)] = sample.value
    return out


def guids(lines: list[bytes]) -> list[str]:
    return [orjson.loads(x)["Data"]["GUID"] for x in lines]


def _file_and_hook(path: Path, hook: Hook, **hook_options: Any) -> dict[str, Any]:
    """A file sink that keeps pace and a webhook that retries for ever (it lags when down),
    one POST at a time unless told (these tests compare the webhook's order with the file's)."""
    return {"file": {"type": "file", "path": str(path), "format": "event"},
            "hook": {"type": "webhook", "url": hook.url, "max_retries": -1, "format": "event",
                     "concurrency": 1, **hook_options}}


def _spool(tmp_path: Path) -> Path:
    return tmp_path / "state" / "ledger.db"


def _fast(d: Any) -> None:
    d.daemon.pipeline.retry_initial = 0.01
    d.daemon.pipeline.retry_max = 0.1


async def test_a_webhook_down_for_a_burst_lags_on_disk_then_catches_up(sim: Simulator,
                                                                       tmp_path: Path) -> None:
    """The receiver refuses (503) while 3,000 events arrive: the file sink beside it keeps pace,
    the webhook's small memory queue overflows to the spool (nothing blocks, nothing is dropped),
    the lag shows in the metrics; once the receiver is back it gets every event, in order, once."""
    hook = Hook()
    await hook.start()
    path = tmp_path / "ev.jsonl"
    cfg = make_config(sim.url, tmp_path, exact=True, spool={"fsync_interval": 0.05},
                      sinks=_file_and_hook(path, hook, batch=200, buffer=100))
    try:
        async with running(cfg) as d:
            _fast(d)
            await wait_until(lambda: len(hook.events) == 1, what="HELLO at the webhook")
            await d.synced()
            hook.down = True
            sent = sim.emit_many(3000)
            await wait_until(lambda: d.sink_stats("file").delivered == 3001, timeout=20,
                             what="the file sink keeps pace")
            route = next(r for r in d.daemon.pipeline.routes if r.name == "hook")
            assert not route.live and len(route.queue) <= 100  # behind, reading from disk
            scraped = _metrics(d)
            assert scraped[("cometstream_sink_lag_events", "hook")] > 2800
            assert scraped[("cometstream_sink_lag_events", "file")] == 0
            assert scraped[("cometstream_sink_lag_seconds", "hook")] > 0
            await wait_until(lambda: d.daemon.ledger.durable_seq >= 3001, what="spooled")
            on_disk = sqlite3.connect(_spool(tmp_path)).execute(
                "SELECT coalesce(sum(count), 0) FROM chunks").fetchone()[0]
            assert on_disk >= 2800  # kept for the webhook (the file sink is done with them)
            scraped = _metrics(d)
            assert scraped[("cometstream_spool_events", "sim")] >= 2800
            assert scraped[("cometstream_spool_bytes", "sim")] > 2800 * 500
            assert scraped[("cometstream_spool_oldest_age_seconds", "sim")] > 0
            hook.down = False
            await wait_until(lambda: len(hook.events) == 3001, timeout=30, what="catch-up")
            await wait_until(lambda: route.live, what="live again")
            assert hook.events[1:] == sent
            assert d.sink_stats("hook").dropped == {} or not any(
                d.sink_stats("hook").dropped.values())
            sim.emit_many(10)
            await wait_until(lambda: len(hook.events) == 3011, what="live events after")

            def left() -> int:
                db = sqlite3.connect(_spool(tmp_path))
                try:
                    return int(db.execute(
                        "SELECT coalesce(sum(count), 0) FROM chunks").fetchone()[0])
                finally:
                    db.close()

            # everyone is done with everything: deleted (by the commits that follow)
            await wait_until(lambda: left() == 0, what="the spool emptied")
    finally:
        await hook.stop()
    assert _lines(path)[1:3001] == sent


async def test_a_stopped_kafka_broker_lags_on_disk_then_catches_up(sim: Simulator,
                                                                   tmp_path: Path) -> None:
    """The broker is down during a burst: the file sink keeps pace; the Kafka sink resumes from
    the spool when the broker is back and delivers every event of the burst."""
    broker = Broker()
    await broker.start()
    path = tmp_path / "ev.jsonl"
    cfg = make_config(sim.url, tmp_path, exact=True, sinks={
        "file": {"type": "file", "path": str(path), "format": "event"},
        "bus": {"type": "kafka", "bootstrap_servers": broker.bootstrap, "topic": "comet",
                "format": "event", "buffer": 50, "request_timeout_ms": 1000},
    })
    try:
        async with running(cfg) as d:
            _fast(d)
            await wait_until(lambda: d.sink_stats("bus").delivered == 1, timeout=15,
                             what="HELLO to Kafka")
            await broker.stop()
            sent = sim.emit_many(1500)
            await wait_until(lambda: d.sink_stats("file").delivered == 1501, timeout=20,
                             what="the file sink keeps pace")
            assert d.sink_stats("bus").delivered < 1501, d.sink_stats("bus").delivered
            await wait_until(lambda: d.sink_stats("bus").failing, timeout=10, what="failing")
            await broker.start()  # empty (memory storage): what it gets now is the catch-up
            await wait_until(lambda: d.sink_stats("bus").delivered >= 1501, timeout=60,
                             what="Kafka catches up")
        msgs = await broker.consume(["comet"], expect=1500, timeout=20)
    finally:
        await broker.stop()
    got = {m.value for m in msgs}
    assert len(msgs) >= 1500, (len(msgs), d.sink_stats("bus").delivered, d.sink_stats("bus").errors)
    assert set(sent) <= got  # every event of the burst (those in flight at the stop may repeat)


async def test_a_restart_resumes_a_lagging_sink_from_its_cursor(sim: Simulator,
                                                                tmp_path: Path) -> None:
    """Stopped while the webhook is down: the events it has not got stay in the spool; the next
    run delivers them first, then the new live ones; the file sink gets nothing twice."""
    hook = Hook()
    await hook.start()
    path = tmp_path / "ev.jsonl"
    cfg = make_config(sim.url, tmp_path, exact=True, shutdown={"timeout": 0.5},
                      resync={"enabled": False}, sinks=_file_and_hook(path, hook, batch=100))
    try:
        async with running(cfg) as d:
            _fast(d)
            await wait_until(lambda: len(hook.events) == 1, what="HELLO")
            hook.down = True
            first = sim.emit_many(500)
            await wait_until(lambda: d.sink_stats("file").delivered == 501, what="file")
        assert len(hook.events) == 1
        hook.down = False
        async with running(cfg) as d:
            _fast(d)
            await wait_until(lambda: len(hook.events) >= 502, timeout=20, what="backlog")
            await wait_until(lambda: d.sink_stats("file").delivered == 1, what="2nd HELLO")
            second = sim.emit_many(50)
            await wait_until(lambda: len(hook.events) == 552, what="live after the backlog")
    finally:
        await hook.stop()
    assert hook.events[1:501] == first
    assert hook.events[501] == _lines(path)[501]  # the second HELLO
    assert hook.events[502:] == second
    lines = _lines(path)
    assert lines[1:501] == first and lines[502:] == second and len(lines) == 552


async def test_the_spool_limit_drops_the_oldest_for_the_lagging_sink_only(
        sim: Simulator, tmp_path: Path) -> None:
    """Over max_bytes, the oldest events go for the sink that has not read them: counted as
    dropped (spool_limit) for it alone; the file sink misses nothing."""
    hook = Hook()
    await hook.start()
    path = tmp_path / "ev.jsonl"
    cfg = make_config(sim.url, tmp_path, exact=True,
                      spool={"max_bytes": 1 << 20, "fsync_interval": 0.05},
                      sinks=_file_and_hook(path, hook, batch=100, buffer=50))
    try:
        async with running(cfg) as d:
            _fast(d)
            await wait_until(lambda: len(hook.events) == 1, what="HELLO")
            # (events during the first sync are held, and a JOB_NEW of a job it reported
            # completed is not repeated: the burst must come after it to arrive whole)
            await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
            hook.down = True
            sent = sim.emit_many(4000)  # ~3.5 MB: well over the limit
            await wait_until(lambda: d.sink_stats("file").delivered == 4001, timeout=20,
                             what="file")
            await wait_until(lambda: d.sink_stats("hook").dropped["spool_limit"] > 0,
                             timeout=10, what="the limit applied")
            assert d.daemon.ledger.bytes <= (1 << 20) + 200_000
            # what is left is what the webhook waits for: its age is still known
            assert _metrics(d)[("cometstream_spool_oldest_age_seconds", "sim")] > 0
            hook.down = False
            dropped = d.sink_stats("hook").dropped
            await wait_until(lambda: len(hook.events) - 1 + dropped["spool_limit"] >= 4000,
                             timeout=30, what="the rest delivered")
            assert not d.sink_stats("file").dropped.get("spool_limit")
    finally:
        await hook.stop()
    got = hook.events[1:]
    # what it had in hand (its memory queue, a batch read from the spool), then the newest
    # (about 1 MB): in the stream's order, none twice
    rest = iter(sent)
    assert all(any(frame == candidate for candidate in rest) for frame in got)  # a subsequence
    assert got[-1] == sent[-1] and len(got) > 500  # the newest (about 1 MB of them) arrived
    assert len(got) + dropped["spool_limit"] == 4000  # and every other one is counted
    assert _lines(path)[1:] == sent


async def test_a_corrupt_spool_is_quarantined_and_the_daemon_runs(sim: Simulator,
                                                                  tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    _spool(tmp_path).write_bytes(b"SQLite format 3\x00" + b"\xde\xad" * 4000)
    path = tmp_path / "ev.jsonl"
    cfg = make_config(sim.url, tmp_path, exact=True,
                      sinks={"file": {"type": "file", "path": str(path), "format": "event"}})
    async with running(cfg) as d:
        await wait_until(lambda: d.sink_stats("file").delivered == 1, what="HELLO")
        await d.synced()
        sent = sim.emit_many(20)
        await wait_until(lambda: d.sink_stats("file").delivered == 21, what="events")
        assert d.daemon.metrics.stream.spool_quarantined == 1
        assert d.daemon.ledger.quarantined is not None
    aside = list(state.glob("ledger.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"SQLite format 3\x00\xde\xad")
    assert _lines(path)[1:] == sent
    db = sqlite3.connect(_spool(tmp_path))
    assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"


async def test_events_read_back_from_disk_keep_their_dedup_keys_and_a_format_1_spool_migrates(
        tmp_path: Path) -> None:
    """A lagging sink reads job events back with the dedup keys the pipeline computed (its
    webhook Idempotency-Key then parses nothing); a spool.db of format 1 (an earlier version,
    without that column) is migrated into the ledger at start and its events read (their keys
    computed when asked)."""
    import shutil

    from cometstream.delivery.identity import job_event
    from cometstream.delivery.ledger import Ledger
    from cometstream.protocol import decode_frame
    from cometstream.store.schema import connect, transaction, upgrade

    def job(i: int) -> Any:
        ev = decode_frame(orjson.dumps({"Type": 4201, "Data": {"GUID": f"g{i}", "EndTime": i}}),
                          received_at=time.time(), server="s")
        ev.seq = i  # type: ignore[union-attr]
        return ev

    def login(i: int) -> Any:
        ev = decode_frame(orjson.dumps({"Type": 4100, "Data": {"Username": "u"}}),
                          received_at=time.time(), server="s")
        ev.seq = i  # type: ignore[union-attr]
        return ev

    def ledger() -> Ledger:
        return Ledger(state, ["slow"], server="s", max_bytes=1 << 30, max_age=86400,
                      fsync_interval=0.05)

    state = tmp_path / "state"
    lg = ledger()
    lg.open()
    events = [job(1), login(2), job(3)]
    for ev in events[::2]:
        job_event(ev)  # as the gate does: computes and keeps the key
        ev.release_doc()
    lg.pending.extend(events)
    lg.cursors["slow"] = 0
    await lg.commit()
    lg.pending.clear()
    back = await lg.read(1, 10, "s")
    assert [ev.dedup_key() for ev in back] == ["4201:g1:1", None, "4201:g3:3"]
    # nothing parsed for them (no public view tells whether an Event holds its document)
    assert all(ev._doc is None for ev in back)
    await lg.close()

    # what an earlier version wrote: spool.db of format 1 (no keys, no positions, no state)
    shutil.move(_spool(tmp_path), state / "spool.db")
    db = sqlite3.connect(state / "spool.db")
    db.executescript("ALTER TABLE chunks DROP COLUMN keys; ALTER TABLE cursors DROP COLUMN "
                     "position; DROP TABLE dedup; DROP TABLE running_jobs; DROP TABLE accounts; "
                     "DROP TABLE devices; DELETE FROM meta WHERE key != 'format'; "
                     "UPDATE meta SET value = '1' WHERE key = 'format';")
    db.close()
    # a tool (dlq, tap) reads an older format and leaves its tables alone
    connect(state / "spool.db", check=False).close()
    assert sqlite3.connect(state / "spool.db").execute(
        "SELECT value FROM meta WHERE key = 'format'").fetchone()[0] == "1"
    lg = ledger()
    assert lg.open() == 3 and lg.quarantined is None and lg.migrated
    assert not (state / "spool.db").exists()
    back = await lg.read(1, 10, "s")
    assert [ev.raw for ev in back] == [ev.raw for ev in events]
    # (that format kept no keys: they are computed from the bytes when asked for)
    assert [ev.dedup_key() for ev in back] == ["4201:g1:1", None, "4201:g3:3"]
    assert sqlite3.connect(_spool(tmp_path)).execute(
        "SELECT value FROM meta WHERE key = 'format'").fetchone()[0] == "3"
    await lg.close()
    # two upgrades racing (both read the old format before either took the write lock): the
    # second finds the work done, rather than failing on a duplicate column
    db = sqlite3.connect(_spool(tmp_path))
    db.executescript("ALTER TABLE cursors DROP COLUMN position; "
                     "UPDATE meta SET value = '2' WHERE key = 'format';")
    db.close()
    first, second = connect(_spool(tmp_path), check=False), connect(_spool(tmp_path), check=False)
    transaction(first, lambda: upgrade(first))
    transaction(second, lambda: upgrade(second))
    first.close()
    second.close()
    assert sqlite3.connect(_spool(tmp_path)).execute(
        "SELECT value FROM meta WHERE key = 'format'").fetchone()[0] == "3"
