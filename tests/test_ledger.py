"""The ledger: one store for delivery, written incrementally; a file sink exactly once across a
crash; one daemon per state dir."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path

import orjson
import pytest
import structlog

from cometstream.delivery.identity import job_event
from cometstream.delivery.ledger import Ledger
from cometstream.delivery.tracker import Tracker
from cometstream.errors import LedgerError
from cometstream.events import Event
from cometstream.protocol import decode_frame
from cometstream.simulator import Simulator
from cometstream.sinks.file import FileSink

from .conftest import run_cli, wait_until, write_config
from .ledger_client import Client


def _job(guid: str, end: int, *, extra: str = "") -> Event:
    doc = {"Actor": "u", "Type": 4201, "Timestamp": end, "TypeString": "SEVT_JOB_COMPLETED",
           "Data": {"GUID": guid, "EndTime": end, "Username": "u", "Note": extra}}
    ev = decode_frame(orjson.dumps(doc), received_at=time.time(), server="s")
    assert ev is not None
    return ev


def _account(name: str, secret: str, *, stats: int = 0, origin: str = "stream") -> Event:
    doc = {"Type": 4102, "Timestamp": 1733400000 + stats, "Data": {
        "Username": name, "CreationGUID": "c", "Note": secret,
        "Sources": {"s": {"Statistics": {"LastStartTime": stats}}}}}
    ev = decode_frame(orjson.dumps(doc), received_at=time.time(), server="s")
    assert ev is not None
    ev.origin = origin
    return ev


def _device(dev: str, ts: int, *, origin: str = "stream") -> Event:
    doc = {"Actor": "u", "ResourceID": dev, "Type": 4700, "Timestamp": ts,
           "TypeString": "SEVT_DEVICE_NEW", "Data": {"FriendlyName": dev}}
    ev = decode_frame(orjson.dumps(doc), received_at=time.time(), server="s")
    assert ev is not None
    ev.origin = origin
    return ev


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


async def test_a_file_sink_recognises_what_it_wrote_after_its_last_commit(tmp_path: Path) -> None:
    """The position committed with the cursor is where recovery starts: the lines past it (a
    job completion, an account change) are not written again when their events come back, from
    the store or synthesized by a resync with other bytes; a torn last line is cut off and its
    event written whole; other events go through; once recovery is over nothing is skipped."""
    for fmt in ("event", "envelope"):
        path = tmp_path / f"{fmt}.jsonl"
        sink = FileSink("f", path, format=fmt)
        await sink.open()
        a, b, acct = _job("a", 100), _job("b", 200), _account("u", "x", stats=1)
        await sink.send([a])
        committed = sink.position()
        await sink.send([b, acct, _device("d1", 1733400000)])
        await sink.aclose()
        with open(path, "ab") as fh:  # a write cut short by the crash
            fh.write(_job("c", 300).raw[:20])

        sink = FileSink("f", path, format=fmt)
        sink.recover(committed)
        await sink.open()
        assert path.read_bytes().endswith(b"\n")  # the torn line is gone
        # b again with other bytes (a resync's copy), the same account change reported by a
        # resync (other statistics), then c (torn before) and d (new)
        await sink.send([_job("b", 200, extra="resync"), _account("u", "x", stats=9,
                                                                    origin="resync"),
                         _device("d1", 1733400999, origin="resync")])
        await sink.send([_job("c", 300), _job("d", 400)])
        assert sink.recognised == 3
        sink.end_recovery()
        await sink.send([_job("b", 200)])  # recovery over: a repeat is the dedup window's job
        await sink.aclose()
        docs = [orjson.loads(x) for x in _lines(path)]
        if fmt == "envelope":
            docs = [d["event"] for d in docs]
        names = [d["Data"].get("GUID") or d["Data"].get("Username") or d["ResourceID"]
                 for d in docs]
        assert names == ["a", "b", "u", "d1", "c", "d", "b"], (fmt, names)


async def test_recovery_follows_a_rotation_after_the_commit(tmp_path: Path) -> None:
    """The file was rotated after the last commit: the rest of the committed file (now
    ``PATH.1``) and the whole new file are read back."""
    path = tmp_path / "r.jsonl"
    one = len(_job("a", 100).raw) + 1
    sink = FileSink("f", path, format="event", rotate_bytes=4096, keep=3)
    await sink.open()
    events = [_job(f"g{i:03d}", 1000 + i) for i in range(60)]
    await sink.send(events[:10])
    committed = sink.position()
    for ev in events[10:]:
        await sink.send([ev])
    await sink.aclose()
    assert (tmp_path / "r.jsonl.1").exists() and one * 60 > 4096

    sink = FileSink("f", path, format="event", rotate_bytes=4096, keep=3)
    sink.recover(committed)
    await sink.open()
    await sink.send([*events[10:], _job("new", 5000)])
    assert sink.recognised == 50
    await sink.aclose()
    written = []
    for name in ("r.jsonl.3", "r.jsonl.2", "r.jsonl.1", "r.jsonl"):
        if (tmp_path / name).exists():
            written += [orjson.loads(x)["Data"]["GUID"] for x in _lines(tmp_path / name)]
    assert written[-1] == "new" and len(written) == len(set(written))


async def test_a_commit_writes_what_changed_not_the_window(tmp_path: Path) -> None:
    """With 200,000 keys in the window, a commit of 100 new job completions writes a few pages
    to the WAL, not the window; the window, jobs and watermark read back at the next open."""
    state = tmp_path / "state"

    def ledger(client: Client | None = None) -> Ledger:
        return Ledger(state, ["f"], server="s", max_bytes=1 << 30, max_age=86400,
                      fsync_interval=1.0, client=client)

    client = Client({"f": 0}, through=0)
    lg = ledger(client)
    lg.open()
    tr = Tracker(lg.state)
    tr.frozen = False
    now = int(time.time())
    for i in range(200_000):
        tr.dedup.acked(f"4201:old{i}:{now - 3600}", now - 3600)
    tr.set_running("r1", "u", now - 10)
    client.tracker = tr
    await lg.commit()
    wal = Path(f"{lg.path}-wal")
    db = sqlite3.connect(lg.path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert wal.stat().st_size == 0
    seq = 0
    for i in range(100):
        seq += 1
        ev = _job(f"new{i}", now)
        fp, ts, act = job_event(ev)
        tr.published_job(seq, fp, ts, act)  # type: ignore[arg-type]
    client.cursor_values, client.through = {"f": seq}, seq
    await lg.commit()
    frames = (wal.stat().st_size - 32) // (4096 + 24)
    assert 0 < frames <= 24, frames  # the window is 200,000 rows in ~1,000 pages
    await lg.close()
    db.close()

    lg = ledger()
    lg.open()
    back = Tracker(lg.state)
    await lg.close()
    # the window's size holds (the oldest keys gave way to the newest)
    assert len(back.dedup) == 200_000 and back.dedup.seen(f"4201:new99:{now}")
    assert not back.dedup.seen(f"4201:old0:{now - 3600}")
    assert back.dedup.seen(f"4201:old100:{now - 3600}")
    assert back.running_jobs == {"r1": ["u", now - 10]} and back.watermark > 0


async def test_a_second_daemon_on_the_same_state_dir_exits_2(sim: Simulator,
                                                           tmp_path: Path) -> None:
    """One daemon per state dir: the second exits 2 with one line naming the directory and
    the PID that holds it; the first runs on, and the tools still work beside it."""
    conf = write_config(tmp_path, sim.url, f"""
[sinks.f]
type = "file"
path = "{tmp_path / 'f.jsonl'}"
""")
    conf.chmod(0o600)  # (it holds the password: a readable one is warned about)
    first = await run_cli("run", "-c", str(conf))
    try:
        await sim.wait_for_clients(1, timeout=10)
        await wait_until((tmp_path / "state" / "ledger.db").exists, what="ledger")
        second = await run_cli("run", "-c", str(conf))
        _out, err = await asyncio.wait_for(second.communicate(), 20)
        assert second.returncode == 2
        lines = err.decode().strip().splitlines()
        assert len(lines) == 1, lines
        assert str(tmp_path / "state") in lines[0] and f"pid {first.pid}" in lines[0], lines
        tool = await run_cli("dlq", "list", "-c", str(conf))
        _o, terr = await asyncio.wait_for(tool.communicate(), 20)
        assert tool.returncode == 0, terr
        assert first.returncode is None and sim.clients == 1
    finally:
        first.send_signal(signal.SIGTERM)
        await asyncio.wait_for(first.wait(), 20)
    assert first.returncode == 0
    assert os.stat(tmp_path / "state" / "ledger.db").st_mode & 0o077 == 0




async def test_a_file_sinks_committed_position_waits_for_what_is_kept(sim: Simulator,
                                                                    tmp_path: Path) -> None:
    """With the memory buffer an event is kept once every sink has it: while a webhook beside
    it is down, the file sink's committed cursor and position stay before the lines it wrote
    since (a crash then finds them past the position, and recognises them), and move on once
    the webhook has the events."""
    from .conftest import MEMORY, make_config, running
    from .test_spool import Hook

    hook = Hook()
    await hook.start()
    path = tmp_path / "f.jsonl"
    cfg = make_config(sim.url, tmp_path, spool={**MEMORY, "fsync_interval": 0.05}, sinks={
        "f": {"type": "file", "path": str(path), "format": "event"},
        "w": {"type": "webhook", "url": hook.url, "format": "event", "max_retries": -1}})
    db_path = tmp_path / "state" / "ledger.db"

    def committed() -> tuple[int, list[int]]:
        """The file sink's committed cursor and position ((0, [0, 0]): none committed yet)."""
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT seq, position FROM cursors WHERE sink = 'f'").fetchone()
        finally:
            db.close()
        if row is None or row[1] is None:
            return 0, [0, 0]
        return row[0], orjson.loads(row[1])

    try:
        async with running(cfg) as d:
            d.daemon.pipeline.retry_initial = d.daemon.pipeline.retry_max = 0.05
            await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
            await wait_until(lambda: len(hook.events) >= 1 and committed()[1][1]
                             == path.stat().st_size, what="caught up")
            before = path.stat().st_size
            hook.down = True
            sim.emit_many(20)
            await wait_until(lambda: len(_lines(path)) >= 21
                             and d.sink_stats("f").delivered >= 21, what="file has them")
            await d.daemon.ledger.commit()  # (what a commit makes of it: one now)
            seq, pos = committed()
            assert pos[1] <= before < path.stat().st_size, (pos, before)
            hook.down = False
            await wait_until(lambda: committed()[1][1] == path.stat().st_size, timeout=10,
                             what="position moves once the webhook has them")
            assert committed()[0] > seq
    finally:
        await hook.stop()


async def test_recovery_keeps_its_start_position_and_idle_commits_write_nothing(
        tmp_path: Path) -> None:
    """While a file sink recovers, the position it reports is where recovery started (a second
    crash reads the same lines back); and a ledger with nothing new makes no commit."""
    path = tmp_path / "f.jsonl"
    sink = FileSink("f", path, format="event")
    await sink.open()
    await sink.send([_job("a", 1)])
    committed = sink.position()
    await sink.send([_job("b", 2)])
    await sink.aclose()
    sink = FileSink("f", path, format="event")
    sink.recover(committed)
    await sink.open()
    await sink.send([_job("c", 3)])
    assert sink.position() == committed
    sink.end_recovery()
    assert sink.position()[1] == path.stat().st_size
    await sink.aclose()

    client = Client({"f": 0}, through=0)
    lg = Ledger(tmp_path / "state", ["f"], server="s", max_bytes=1 << 20, max_age=3600,
                fsync_interval=1.0, client=client)
    lg.open()
    tr = Tracker(lg.state)
    client.tracker = tr
    await lg.commit()
    first = lg.commits
    for _ in range(3):
        await lg.commit()
    assert lg.commits == first
    tr.set_running("j", "u", 5)
    await lg.commit()
    assert lg.commits == first + 1
    await lg.close()


class _Broken(Client):
    """A client with a bug: asking for the cursors raises until ``fixed``."""

    fixed = False

    def cursors(self) -> dict[str, int]:
        if not self.fixed:
            raise RuntimeError("a bug in the cursors")
        return super().cursors()


def _fill(lg: Ledger) -> None:
    """Job completions appended until the ledger has no room: the read loop would wait now."""
    seq = 0
    while not lg.full:
        seq += 1
        ev = _job(f"g{seq}", seq)
        ev.seq = seq
        lg.append(ev)


async def test_an_unexpected_commit_failure_fails_the_waiters_and_is_logged_once(
        tmp_path: Path) -> None:
    """A commit that fails on something other than the disk (a bug) is logged once with its
    traceback, counts as a failing ledger (what /readyz reads), and the read loop waiting for
    room gets the error instead of waiting for ever; once commits work again, room comes."""
    client = _Broken({"f": 0})
    lg = Ledger(tmp_path / "state", ["f"], server="s", max_bytes=1 << 30, max_age=86400,
                fsync_interval=0.01, client=client)
    lg.open()
    _fill(lg)
    with structlog.testing.capture_logs() as logs:
        runner = asyncio.create_task(lg.run())
        with pytest.raises(LedgerError, match="a bug in the cursors"):
            await asyncio.wait_for(lg.wait_for_room(), 10)
        with pytest.raises(LedgerError):
            await asyncio.wait_for(lg.wait_for_room(), 10)  # the next attempt fails it again
    assert lg.write_errors >= 2 and "RuntimeError: a bug in the cursors" in lg.last_error
    assert lg.failing_since > 0
    errors = [e for e in logs if e["log_level"] == "error"]
    assert len(errors) == 1 and errors[0]["event"].startswith("ledger commit failed"), errors
    assert isinstance(errors[0]["exc_info"], RuntimeError)
    client.fixed = True
    await asyncio.wait_for(lg.wait_for_room(), 10)
    assert not lg.full and lg.last_error == "" and lg.failing_since == 0.0
    lg.stop()
    await asyncio.wait_for(runner, 10)
    await lg.close()


async def test_a_dead_commit_loop_fails_whatever_waits_for_room(tmp_path: Path) -> None:
    """Once the commit loop is gone (cancelled), waiting for room raises at once rather than
    waiting for a commit that will never come."""
    lg = Ledger(tmp_path / "state", ["f"], server="s", max_bytes=1 << 30, max_age=86400,
                fsync_interval=60.0, client=Client({"f": 0}))
    lg.open()
    _fill(lg)
    runner = asyncio.create_task(lg.run())
    await asyncio.sleep(0)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    with pytest.raises(LedgerError, match="commit loop stopped"):
        await asyncio.wait_for(lg.wait_for_room(), 10)
    await lg.close()
