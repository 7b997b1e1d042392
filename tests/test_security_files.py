"""Bounded memory, truthful reports, and files a local user must not read or redirect.

- A full state disk (a 2 MiB tmpfs): the real error is reported, what waits in memory for the
  disk stays bounded, and the figures at shutdown are what the ledger really holds.
- Memory bounded in bytes, not only in events: a route's queue, what waits for a commit, a
  chunk, a read from disk, an admin API answer.
- Every state file is private (0600) whatever the umask; a state dir others can write to is
  reported at start.
- Nothing is written through a symbolic link planted in advance.
- A 0-byte ledger is reported and moved aside like any damaged one.
- The documented logrotate stanza works with the units' dynamic user.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
import structlog
from aiohttp import web

from cometstream import health
from cometstream.api import AdminClient
from cometstream.delivery import ledger as ledger_mod
from cometstream.delivery.ledger import Ledger
from cometstream.errors import ApiError, SinkError
from cometstream.events import Event
from cometstream.pipeline import DeadLetters
from cometstream.protocol import decode_frame
from cometstream.simulator import Simulator
from cometstream.sinks.file import FileSink
from cometstream.store import StateLock, migrate, schema
from cometstream.store import store as store_mod
from cometstream.tap import TapServer, socket_path

from .conftest import make_config, running, wait_until, write_config
from .ledger_client import Client
from .peers import serve_app
from .test_dlq import URL, add, dead, sinks_toml
from .test_dlq import dlq as run_dlq
from .test_spool import Hook, _fast

ROOT = Path(__file__).resolve().parent.parent
KIB = 1024
MIB = 1024 * 1024


# --- helpers -----------------------------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a state disk that fills up."""
    where = tmp_path / "small"
    where.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
                              capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=20, check=False)


def _fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last byte; returns the filler."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for piece in (64 * KIB, 4 * KIB, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * piece)
    return filler


def _event(i: int, size: int, type_: int = 4100) -> Event:
    doc = {"Type": type_, "Timestamp": 1733400000 + i, "Data": {"i": i, "Note": "x" * size}}
    ev = decode_frame(orjson.dumps(doc), received_at=time.time(), server="s")
    assert isinstance(ev, Event)
    ev.seq = i
    return ev


def _ledger(directory: Path, sinks: list[str] | None = None,
            client: Client | None = None) -> Ledger:
    return Ledger(directory, sinks or ["a"], server="s", max_bytes=1 << 30, max_age=86400,
                  fsync_interval=0.05, client=client)


def _mode(path: Path | str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# --- 1. a full state disk ------------------------------------------------------------------------
async def test_a_full_disk_reports_the_real_error_not_a_failed_rollback(tmpfs: Path) -> None:
    """On a full disk SQLite ends the transaction itself; the ROLLBACK after it must not
    replace "database or disk is full" with "cannot rollback - no transaction is active":
    dead letters, commits and the tools' deletes say what is wrong. Once space is back, the
    ledger commits again."""
    state = tmpfs / "state"
    lg = _ledger(state, client=Client({"a": 0}))
    lg.open()
    filler = _fill(tmpfs)
    with pytest.raises(sqlite3.Error) as info:
        await lg.add_dead_letters("a", [_event(i, 64 * KIB) for i in range(1, 40)], "refused")
    assert "full" in str(info.value) and "rollback" not in str(info.value), info.value
    for i in range(1, 20):
        lg.append(_event(i, 32 * KIB))
    with pytest.raises(sqlite3.Error) as info:
        await lg.commit()
    assert "full" in str(info.value) and "rollback" not in str(info.value), info.value
    assert len(lg.pending) == 19  # nothing leaves memory that is not on disk
    filler.unlink()
    await lg.commit()
    assert not lg.pending and lg.pending_bytes == 0 and lg.events == 19
    await lg.close()


async def test_a_full_disk_keeps_memory_bounded_and_the_shutdown_figures_true(
        sim: Simulator, tmpfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """State on a full tmpfs, a webhook down: commits fail with the real error, the events
    waiting for the disk stop at the byte bound (the read loop waits), and at shutdown the
    figures per sink are the ledger's: what it holds for each (counted in the file) and what
    is lost (never committed), not "events stay in the ledger" for events that never got
    there."""
    monkeypatch.setattr(ledger_mod, "PENDING_MAX_BYTES", 1 * MIB)
    hook = Hook()
    await hook.start()
    path = tmp_path / "ev.jsonl"
    cfg = make_config(sim.url, tmp_path, exact=True, state={"dir": str(tmpfs / "state")},
                      resync={"enabled": False}, shutdown={"timeout": 0.5},
                      spool={"fsync_interval": 0.05},
                      sinks={"file": {"type": "file", "path": str(path), "format": "event"},
                             "hook": {"type": "webhook", "url": hook.url, "max_retries": -1,
                                      "format": "event", "batch": 10}})
    big = 8 * KIB
    sent = 300  # 2.4 MB: more than the disk, more than the bound in memory
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(cfg) as d:
                _fast(d)
                await wait_until(lambda: len(hook.events) == 1, what="HELLO")
                lg = d.daemon.ledger
                await wait_until(lambda: lg.cursors.get("hook", 0) >= 1, what="a commit")
                hook.down = True
                filler = _fill(tmpfs)
                peak = 0
                for i in range(sent):
                    sim.emit({"Type": 4100, "Timestamp": 1733400000 + i,
                              "Data": {"i": i, "Note": "x" * big}})
                    peak = max(peak, lg.pending_bytes)
                    if i % 20 == 0:
                        await asyncio.sleep(0.02)
                        peak = max(peak, lg.pending_bytes)
                # the commits fail on the full disk, and the read loop waits for room
                await wait_until(lambda: lg.write_errors > 0 and "full" in lg.last_error,
                                 what="a commit failing")
                sup = d.daemon.supervisor
                await wait_until(lambda: sup.session is not None and sup.session.blocked,
                                 timeout=10, what="the read loop waiting")
                peak = max(peak, lg.pending_bytes)
                # the read loop waited: memory stopped at the bound, not at 300 events
                assert peak <= 1 * MIB + 2 * big, peak
                received = d.stats.events_received
                assert received < sent, received
                hook_missing = received - 1  # (the HELLO got there)
                # not ready once the commits have failed for a while (the clock moved on)
                assert not any(r.startswith("ledger:") for r in d.daemon.not_ready_reasons())
                lg.failing_since -= health.LEDGER_UNREADY_AFTER
                (why,) = [r for r in d.daemon.not_ready_reasons() if r.startswith("ledger:")]
                assert "writes failing for" in why and "full" in why, why
        assert filler.exists()
    finally:
        await hook.stop()
    errors = [e for e in logs if e["log_level"] == "error" and "ledger write failed" in e["event"]]
    assert errors and all("rollback" not in e["error"] for e in errors), errors
    assert "full" in errors[0]["error"]
    # what the ledger really holds for the webhook, read back from the file
    db = sqlite3.connect(f"file:{tmpfs / 'state' / 'ledger.db'}?mode=ro", uri=True)
    cursor = dict(db.execute("SELECT sink, seq FROM cursors")).get("hook", 0)
    on_disk = sum(1 for (seqs,) in db.execute("SELECT seqs FROM chunks")
                  for q in memoryview(seqs).cast("q") if q > cursor)
    db.close()
    stay = {e["sink"]: e["events"] for e in logs
            if e["event"] == "events stay in the ledger for the next start"}
    lost = {e["sink"]: e["events"] for e in logs
            if e["event"].startswith("events lost for this sink")}
    assert stay.get("hook", 0) == on_disk, (stay, on_disk)
    assert stay.get("hook", 0) + lost.get("hook", 0) == hook_missing, (stay, lost, hook_missing)
    assert lost.get("hook", 0) > 0
    assert "file" not in lost  # the file sink has every event: nothing lost for it


# --- 2. memory bounded in bytes -------------------------------------------------------------------
def test_what_waits_for_the_disk_is_bounded_in_bytes(tmp_path: Path) -> None:
    """300 events of 256 KiB (75 MB) behind a disk: the read loop is told to wait at 64 MiB,
    not at 6,144 events (1.5 GB of them)."""
    from cometstream.pipeline import DiskBuffer

    lg = _ledger(tmp_path / "state")
    buffer = DiskBuffer(lg)
    waits = [buffer.append(_event(i, 256 * KIB)) for i in range(1, 301)]
    first = waits.index(True)
    assert first * 256 * KIB <= 64 * MIB + 256 * KIB, first
    assert lg.pending_bytes == sum(len(ev.raw) for ev in lg.pending)
    lg.release(150)
    assert lg.pending_bytes == sum(len(ev.raw) for ev in lg.pending)


async def test_chunks_and_reads_from_disk_are_bounded_in_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit of large events writes chunks of 4 MiB at most (not 256 events of them, 64 MB
    a row), and a lagging sink reads back 16 MiB at most at a time (here: 1 MiB)."""
    lg = _ledger(tmp_path / "state", client=Client({"a": 0}))
    lg.open()
    for i in range(1, 101):
        lg.append(_event(i, 256 * KIB))
    await lg.commit()
    db = sqlite3.connect(f"file:{lg.path}?mode=ro", uri=True)  # what the commit wrote
    try:
        rows = [r[0] for r in db.execute("SELECT bytes FROM chunks")]
        assert db.execute("SELECT sum(count) FROM chunks").fetchone()[0] == 100
    finally:
        db.close()
    assert max(rows) <= 4 * MIB, rows
    monkeypatch.setattr(store_mod, "READ_MAX_BYTES", 1 * MIB)
    got = await lg.read(1, 1024, "s", "a")
    assert 1 <= len(got) <= 4 and got[0].seq == 1, len(got)
    await lg.close()


async def test_a_route_queue_overflows_to_the_ledger_by_bytes(sim: Simulator,
                                                              tmp_path: Path) -> None:
    """A webhook that is down, events of 16 KiB: its memory queue overflows to the ledger once
    it holds its byte bound (here 256 KiB), far below its 10,000 events; the webhook still gets
    every event, in order, once it is back."""
    hook = Hook()
    await hook.start()
    cfg = make_config(sim.url, tmp_path, exact=True, resync={"enabled": False},
                      sinks={"hook": {"type": "webhook", "url": hook.url, "max_retries": -1,
                                      "format": "event", "batch": 10}})
    try:
        async with running(cfg) as d:
            _fast(d)
            route = d.daemon.pipeline.routes[0]
            route.max_bytes = 256 * KIB
            await wait_until(lambda: len(hook.events) == 1, what="HELLO")
            hook.down = True
            sent = [sim.emit({"Type": 4100, "Timestamp": 1733400000 + i,
                              "Data": {"i": i, "Note": "x" * (16 * KIB)}}) for i in range(100)]
            await wait_until(lambda: d.stats.events_received == 101, what="received")
            assert not route.live  # overflowed to the ledger
            assert len(route.queue) <= 17 and route.queued_bytes <= 256 * KIB + 16 * KIB
            hook.down = False
            await wait_until(lambda: len(hook.events) == 101, timeout=20, what="caught up")
    finally:
        await hook.stop()
    # every event once (several POSTs in flight: in order per resource, these have none)
    assert sorted(orjson.loads(e)["Data"]["i"] for e in hook.events[1:]) == list(range(100))
    assert len(sent) == 100


async def test_an_api_answer_is_read_up_to_a_bound(tmp_path: Path) -> None:
    """An answer beyond the client's bound (here 1 MiB; 256 MiB by default) is a clear,
    non-retried error, read no further; a smaller one is read whole."""
    size = {"n": 3 * MIB}

    async def handler(request: web.Request) -> web.StreamResponse:
        body = orjson.dumps([{"GUID": "j", "Note": "x" * size["n"]}])
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/api/v1/{tail:.*}", handler)
    async with serve_app(app) as url:
        cfg = make_config(url, tmp_path)
        async with AdminClient(cfg.server, attempts=3, retry_initial=0.01,
                               retry_max=0.02) as api:
            api.max_response = 1 * MIB
            with pytest.raises(ApiError) as info:
                await api.jobs_for_date_range(1, 2)
            assert "larger than 1 MiB" in str(info.value) and not info.value.retryable
            assert api.calls == 1  # not retried
            size["n"] = 1000
            assert len(await api.jobs_for_date_range(1, 2)) == 1


# --- 3. private files ------------------------------------------------------------------------------
async def test_every_state_file_is_private_whatever_the_umask(tmp_path: Path) -> None:
    """umask 0: ledger.db, -wal, -shm, daemon.lock, tap.sock and the replay lock are 0600; a
    ledger.db of ours left readable by others (restored from a backup) is made 0600."""
    state = tmp_path / "state"
    with _umask(0):
        lock = StateLock(state)
        state.mkdir(mode=0o750)
        lock.acquire()
        lg = _ledger(state, client=Client({"a": 0}))
        lg.open()
        lg.append(_event(1, 100))
        await lg.commit()
        for name in ("ledger.db", "ledger.db-wal", "ledger.db-shm", "daemon.lock"):
            assert _mode(state / name) == 0o600, name
        # `dlq replay` (a process of its own, with this umask) takes the replay lock
        await lg.add_dead_letters("a", [_event(2, 100)], "refused")
        conf = write_config(tmp_path, URL, f'[sinks.a]\ntype = "file"\n'
                                           f'path = "{tmp_path / "a.jsonl"}"\n')
        code, _out, err = await run_dlq(conf, "replay", "--sink", "a")
        assert code == 0, err
        assert _mode(state / "ledger.db.replay-lock") == 0o600
        tap = TapServer(socket_path(state), SimpleNamespace(taps=[]),  # type: ignore[arg-type]
                        server="s")
        assert await tap.start()
        try:
            assert _mode(socket_path(state)) == 0o600
            assert not list(state.glob(".tap-*"))  # its private directory is gone
        finally:
            await tap.stop()
        await lg.close()
        lock.release()
        for name in ("ledger.db", "ledger.db-wal", "ledger.db-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(state / name, 0o644)
        lock = StateLock(state)
        os.chmod(state / "daemon.lock", 0o644)
        lock.acquire()
        lg = _ledger(state)
        lg.open()
        await lg.close()
        lock.release()
    assert _mode(state / "ledger.db") == 0o600
    assert _mode(state / "daemon.lock") == 0o600


def test_a_state_dir_others_can_write_to_is_reported_at_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o777)
    with structlog.testing.capture_logs() as logs:
        lg = _ledger(state)
        lg.open()
    asyncio.run(lg.close())
    warned = [e for e in logs if e["event"] == "state.dir is not private"]
    assert warned and "writable by everyone" in warned[0]["problem"], logs
    os.chmod(state, 0o750)
    with structlog.testing.capture_logs() as logs:
        lg = _ledger(state)
        lg.open()
    asyncio.run(lg.close())
    assert not [e for e in logs if e["event"] == "state.dir is not private"], logs


# --- 4. no write through a planted symbolic link ----------------------------------------------------
async def test_a_link_planted_at_the_replay_lock_is_not_followed(tmp_path: Path) -> None:
    """``dlq replay`` (run as root) would create the link's target and give it the ledger's
    owner: it refuses instead, sends nothing, and the target is untouched."""
    conf = write_config(tmp_path, URL, sinks_toml(tmp_path))
    add(tmp_path, [dead("archive", 1)])
    victim = tmp_path / "victim"
    os.symlink(victim, tmp_path / "state" / "ledger.db.replay-lock")
    code, _out, err = await run_dlq(conf, "replay", "--sink", "archive")
    assert code != 0 and "symbolic link" in err, err
    assert not victim.exists()
    victim.write_bytes(b"precious")
    os.chmod(victim, 0o600)
    code, _out, err = await run_dlq(conf, "replay", "--sink", "archive")
    assert code != 0 and "symbolic link" in err, err
    assert victim.read_bytes() == b"precious" and _mode(victim) == 0o600
    assert not (tmp_path / "archive.jsonl").exists()  # nothing replayed


async def test_a_link_planted_at_a_file_sink_path_is_not_followed(tmp_path: Path) -> None:
    """Events are never appended to where a link planted at the sink's path points (a folder
    others can write to, after a rotation); the sink fails with a clear error instead. The same
    for a dead-letter file."""
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, 0o1777)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    os.symlink(victim, folder / "events.jsonl")
    sink = FileSink("f", folder / "events.jsonl", format="event")
    with pytest.raises(SinkError) as info:
        await sink.open()
    assert "symbolic link" in str(info.value)
    await sink.aclose()
    assert victim.read_bytes() == b"precious\n"

    os.symlink(victim, folder / "dead.jsonl")
    DeadLetters("f", folder / "dead.jsonl").write([_event(1, 10)], "refused")
    assert victim.read_bytes() == b"precious\n"


async def test_a_file_another_user_planted_in_a_shared_folder_is_not_written(
        tmp_path: Path) -> None:
    """In a folder everyone can write to, a file at the sink's path that belongs to another
    user (who could read what we write) is refused; our own is appended to."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a file of another user")
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, 0o1777)
    planted = folder / "events.jsonl"
    planted.write_bytes(b"")
    os.chown(planted, 65534, 65534)
    sink = FileSink("f", planted, format="event")
    with pytest.raises(SinkError) as info:
        await sink.open()
    assert "not ours" in str(info.value)
    await sink.aclose()
    assert planted.read_bytes() == b""


def test_a_link_planted_at_the_ledger_is_moved_aside_not_followed(tmp_path: Path) -> None:
    """A (dangling) link at ledger.db: SQLite would create the ledger where it points. It is
    moved aside like a damaged ledger and a new one is created in its place."""
    state = tmp_path / "state"
    state.mkdir()
    victim = tmp_path / "victim.db"
    os.symlink(victim, state / "ledger.db")
    with structlog.testing.capture_logs() as logs:
        lg = _ledger(state)
        lg.open()
    asyncio.run(lg.close())
    assert not victim.exists()
    assert not (state / "ledger.db").is_symlink() and _mode(state / "ledger.db") == 0o600
    aside = list(state.glob("ledger.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].is_symlink()
    assert any("symbolic link" in str(e.get("reason")) for e in logs), logs


def test_links_planted_at_the_ledgers_wal_and_shm_are_moved_aside(tmp_path: Path) -> None:
    """Links at ledger.db-wal and -shm (SQLite refuses to open a database through them, which
    would stop the daemon for good): moved aside at start, nothing written where they point,
    and the ledger opens and commits."""
    state = tmp_path / "state"
    state.mkdir()
    lg = _ledger(state)
    lg.open()
    asyncio.run(lg.close())
    victims = []
    for suffix in ("-wal", "-shm"):
        victim = tmp_path / f"victim{suffix}"
        victim.write_bytes(b"root's file")
        victims.append(victim)
        (state / f"ledger.db{suffix}").unlink(missing_ok=True)
        os.symlink(victim, state / f"ledger.db{suffix}")
    with structlog.testing.capture_logs() as logs:
        lg = _ledger(state)
        lg.open()
        asyncio.run(lg.close())
    assert all(v.read_bytes() == b"root's file" for v in victims)
    assert len(list(state.glob("ledger.db-*.link-*"))) == 2
    assert sum("moved aside" in e["event"] for e in logs) == 2, logs


def test_the_migration_builds_the_ledger_in_a_private_directory(tmp_path: Path) -> None:
    """A link planted at the old temporary name (ledger.db.migrating) is not written through;
    the migration builds the new ledger in a private directory and leaves none behind."""
    state = tmp_path / "state"
    state.mkdir()
    old = sqlite3.connect(state / "spool.db")
    old.executescript(schema.SCHEMA)
    old.execute("INSERT INTO meta VALUES ('format', '2')")
    old.commit()
    old.close()
    victim = tmp_path / "victim"
    os.symlink(victim, state / "ledger.db.migrating")
    with _umask(0):
        assert migrate(state, "s")
    assert not victim.exists()
    assert _mode(state / "ledger.db") == 0o600
    assert not list(state.glob("ledger.db.migrating*"))


# --- 5. a 0-byte ledger -----------------------------------------------------------------------------
def test_an_empty_ledger_is_reported_and_moved_aside(tmp_path: Path) -> None:
    """A ledger.db of 0 bytes (truncated by something else) is not silently taken for a new
    one: it is moved aside with an error line, like any damaged ledger. One that did not exist
    is simply created."""
    state = tmp_path / "state"
    state.mkdir()
    with structlog.testing.capture_logs() as logs:
        lg = _ledger(state)
        lg.open()
    asyncio.run(lg.close())
    assert lg.quarantined is None and not [e for e in logs if e["log_level"] == "error"]
    for name in ("ledger.db", "ledger.db-wal", "ledger.db-shm"):
        with contextlib.suppress(FileNotFoundError):
            (state / name).unlink()
    (state / "ledger.db").write_bytes(b"")
    with structlog.testing.capture_logs() as logs:
        lg = _ledger(state)
        lg.open()
    asyncio.run(lg.close())
    assert lg.quarantined is not None and lg.quarantined.stat().st_size == 0
    errors = [e for e in logs if e["log_level"] == "error"]
    assert errors and "damaged" in errors[0]["event"] and "0 bytes" in errors[0]["reason"]
    assert (state / "ledger.db").stat().st_size > 0


# --- 6. logrotate and the units' dynamic user ---------------------------------------------------------
def _stanza() -> list[str]:
    text = (ROOT / "docs" / "operations.md").read_text()
    block = re.search(r"```\n(/var/lib/cometstream/events\.jsonl \{.*?\})\n```", text, re.DOTALL)
    assert block, "the logrotate stanza is in docs/operations.md"
    return [line.strip() for line in block.group(1).splitlines()]


_CHILD = r"""
import asyncio, os, sys
from pathlib import Path
from cometstream.sinks.file import FileSink
from cometstream.protocol import decode_frame

async def main():
    os.umask(int(sys.argv[2], 8))  # the unit's UMask=
    sink = FileSink("f", Path(sys.argv[1]), format="event")
    await sink.open()
    ev = decode_frame(b'{"Type":4100,"Data":{"n":1}}', received_at=0.0, server="s")
    await sink.send([ev])
    print("written", flush=True)
    sys.stdin.readline()           # logrotate ran
    sink.reopen()                  # SIGHUP (systemctl reload)
    try:
        await sink.send([ev])
        print("written", flush=True)
    except Exception as exc:
        print("failed", exc, flush=True)
    await sink.aclose()

asyncio.run(main())
"""


def test_the_documented_logrotate_stanza_works_with_the_dynamic_user(tmp_path: Path) -> None:
    """The units run as a DynamicUser= (not root) and reload with SIGHUP; the documented
    stanza, applied as logrotate would, leaves the sink writing after the rotation (with
    ``create 0640 root root`` it could never open the new file again)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the sink as another user, as the unit does")
    for unit in ("cometstream.service", "cometstream@.service"):
        text = (ROOT / "systemd" / unit).read_text()
        assert "DynamicUser=yes" in text and "ExecReload=/bin/kill -HUP $MAINPID" in text
        umask = re.search(r"^UMask=(\d+)$", text, re.MULTILINE)
        assert umask
    stanza = _stanza()
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all"]
    probe = subprocess.run([*drop, sys.executable, "-c", "pass"], capture_output=True,
                           text=True, timeout=30, check=False, cwd="/")
    if probe.returncode != 0:
        pytest.skip("an unprivileged user cannot run this Python interpreter (it lives under "
                    f"a private folder): {probe.stderr.strip()[:120]}")
    folder = Path(tempfile.mkdtemp(prefix="cometstream-logrotate-"))
    try:
        os.chown(folder, 65534, 65534)
        os.chmod(folder, 0o750)
        path = folder / "events.jsonl"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        child = subprocess.Popen(
            [*drop, sys.executable, "-c", _CHILD, str(path),
             umask.group(1)], stdin=subprocess.PIPE,  # type: ignore[union-attr]
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd="/")
        try:
            assert child.stdout is not None and child.stdin is not None
            first = child.stdout.readline()
            assert first.strip() == "written", first + (child.stderr.read() if child.stderr
                                                        else "")
            # logrotate: rename, then "create MODE OWNER GROUP" unless "nocreate"
            os.rename(path, folder / "events.jsonl.1")
            create = next((line.split() for line in stanza if line.startswith("create")), None)
            if create is not None and "nocreate" not in stanza:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, int(create[1], 8))
                os.close(fd)
                import grp
                import pwd
                owner = pwd.getpwnam(create[2]).pw_uid if len(create) > 2 else 0
                group = grp.getgrnam(create[3]).gr_gid if len(create) > 3 else 0
                os.chown(path, owner, group)
                os.chmod(path, int(create[1], 8))
            child.stdin.write("\n")
            child.stdin.flush()
            second = child.stdout.readline()
            child.wait(20)
        finally:
            if child.poll() is None:
                child.kill()
            child.communicate(timeout=20)  # (closes the pipes)
        assert second.strip() == "written", second
        st = os.stat(path)
        assert st.st_uid == 65534 and stat.S_IMODE(st.st_mode) == 0o640
        assert path.read_bytes().count(b"\n") == 1
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=False)


def test_the_documented_logrotate_stanza_lets_the_daemon_create_the_file() -> None:
    """The units run as a DynamicUser= (a UID chosen at each start) and reopen on SIGHUP: the
    documented stanza must not have logrotate create the new file (as root: the daemon could
    not open it), nor copy and truncate (lines lost); "nocreate" and a SIGHUP to the main
    process straight (not ``systemctl reload``, whose config check would keep the files open
    while the config file is being edited)."""
    stanza = _stanza()
    assert "nocreate" in stanza, stanza
    assert not [line for line in stanza if line.startswith(("create ", "copytruncate"))]
    assert any("systemctl kill --kill-whom=main -s HUP cometstream" in line for line in stanza)
    for unit in ("cometstream.service", "cometstream@.service"):
        text = (ROOT / "systemd" / unit).read_text()
        assert "DynamicUser=yes" in text and "ExecReload=/bin/kill -HUP $MAINPID" in text
