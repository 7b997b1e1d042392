"""What docs/guarantees.md, docs/design.md and docs/sinks.md promise about the ledger and
delivery, each proved over the real path: the daemon against the simulator, `cometstream run`
as a process, the ledger file on disk, a webhook receiver and the Kafka broker on 127.0.0.1.

- A ledger written for another ``server.name`` is moved aside (``ledger.db.foreign-<time>``),
  not used.
- ``[spool] max_age``: events older than it are deleted for the sink that lags, counted and
  logged; the other sinks lose nothing.
- A file sink's file shorter than at the last commit (a power failure) is reported at the next
  start; a committed file moved away is warned about.
- A failed migration of an earlier version's files leaves them as they were, exit 2, one line.
- Keys survive a crash: a Kafka message key of a job event synthesized again after a SIGKILL,
  a webhook ``Idempotency-Key`` of another event read back from the ledger (``batch = 1``).
- Back-pressure: the read loop waits once 6,144 events wait for the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
from aiohttp import web

from cometstream.delivery.ledger import Ledger
from cometstream.events import Event
from cometstream.protocol import decode_frame
from cometstream.simulator import Simulator

from .conftest import (
    cli_env,
    make_config,
    run_cli,
    running,
    wait_until,
    write_config,
)
from .kafka_broker import Broker
from .ledger_client import Client
from .test_spool import Hook, _fast

KIB = 1024
LOGIN = 4103  # SEVT_ACCOUNT_LOGIN: not a job, so its keys follow its arrival and bytes


# --- helpers -------------------------------------------------------------------------------------
def _login(i: int, *, received_at: float | None = None, note: str = "") -> Event:
    doc = {"Actor": f"user{i % 7}", "OwnerOrganizationID": "", "Type": LOGIN,
           "Timestamp": 1733400000 + i, "TypeString": "SEVT_ACCOUNT_LOGIN",
           "Data": {"RemoteAddress": f"10.0.{i // 250}.{i % 250}", "Note": note}}
    ev = decode_frame(orjson.dumps(doc), received_at=received_at or time.time(), server="sim")
    assert isinstance(ev, Event)
    return ev


async def _spooled(state: Path, server: str, cursors: dict[str, int],
                   events: list[Event]) -> None:
    """A ledger in ``state`` as a daemon for ``server`` leaves it: ``events`` committed (seq 1..)
    with each sink's cursor."""
    lg = Ledger(state, list(cursors), server=server, max_bytes=1 << 30, max_age=365 * 86400,
                fsync_interval=1.0, client=Client(cursors))
    lg.open()
    for seq, ev in enumerate(events, 1):
        ev.seq = seq
        lg.append(ev)
    await lg.commit()
    await lg.close()


def _query(db_path: Path, sql: str, *args: Any) -> list[Any]:
    """Rows from a ledger file, read only (as an operator's ``sqlite3`` would)."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def _sample(d: Any, name: str, **labels: str) -> float | None:
    """One sample of the daemon's exposition, as Prometheus would scrape it."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(generate_latest(d.daemon.registry).decode()):
        for sample in fam.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines() if path.exists() else []


def _file_sink(path: Path) -> dict[str, Any]:
    return {"type": "file", "path": str(path), "format": "event"}


def _conf(tmp_path: Path, url: str, state: Path, body: str) -> Path:
    """A config for a `cometstream run` process: the server at ``url``, state in ``state``,
    JSON logs, no HTTP endpoint; then ``body``. (It holds the password: mode 0600, as a
    readable one is warned about.)"""
    return write_config(tmp_path, url, body, name="sim", backoff_max=0.3, state=state,
                        json_logs=True, mode=0o600)


class _Process:
    """`cometstream run -c CONF` as a real process; each run's output in its own file (a pipe
    nobody reads would fill up and stall it)."""

    def __init__(self, conf: Path, logdir: Path) -> None:
        self.conf = conf
        self.logdir = logdir
        self.runs = 0
        self.proc: asyncio.subprocess.Process | None = None

    def _open_log(self) -> Any:
        return open(self.logdir / f"run-{self.runs}.log", "wb")  # closed by the caller's with

    async def start(self) -> None:
        self.runs += 1
        with self._open_log() as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cometstream", "run", "-c", str(self.conf),
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                env=cli_env())

    async def stop(self, sig: int) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), 20)

    def log(self) -> str:
        return (self.logdir / f"run-{self.runs}.log").read_text(errors="replace")[-4000:]

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@contextlib.contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at ``where``: a state disk that fills up (skips without the right to
    mount one)."""
    where.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=20, check=False)


def _fill(directory: Path, leave: int) -> Path:
    """Fill the file system of ``directory`` to the last byte, then free ``leave`` bytes."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for piece in (64 * KIB, 4 * KIB, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * piece)
    if leave:
        os.truncate(filler, filler.stat().st_size - leave)
    return filler


# --- 1. a ledger that is not ours ----------------------------------------------------------------
async def test_a_ledger_written_for_another_server_is_moved_aside_not_used(
        sim: Simulator, tmp_path: Path) -> None:
    """ledger.db was written for server "other" and holds three events its file sink had not
    got: at start it is moved to ledger.db.foreign-<time> as it was (reported at error level,
    counted), the daemon goes on with an empty ledger of its own, and none of the other
    server's events reaches the sink."""
    state = tmp_path / "state"
    theirs = [_login(i, note="the other server's") for i in range(1, 4)]
    await _spooled(state, "other", {"file": 0}, theirs)
    original = (state / "ledger.db").read_bytes()
    path = tmp_path / "ev.jsonl"
    cfg = make_config(sim.url, tmp_path, exact=True, resync={"enabled": False},
                      sinks={"file": _file_sink(path)})
    with structlog.testing.capture_logs() as logs:
        async with running(cfg) as d:
            await wait_until(lambda: len(_lines(path)) >= 1, what="the HELLO in the file")
            sent = sim.emit_many(5)
            await wait_until(lambda: len(_lines(path)) >= 6, what="the live events")
            assert _sample(d, "cometstream_spool_quarantined_total", server="sim") == 1
    (aside,) = state.glob("ledger.db.foreign-*")
    assert aside.read_bytes() == original  # moved, not changed
    assert _query(aside, "SELECT value FROM meta WHERE key = 'server'") == [("other",)]
    assert _query(state / "ledger.db", "SELECT value FROM meta WHERE key = 'server'") == \
        [("sim",)]
    lines = _lines(path)
    assert lines[1:] == sent and len(lines) == 6
    assert not any(b"the other server" in line for line in lines)
    reported = [e for e in logs if e["log_level"] == "error" and "not ours" in e["event"]]
    assert len(reported) == 1 and "'other'" in reported[0]["reason"], [e["event"] for e in logs]
    assert reported[0]["moved_to"] == str(aside)


# --- 2. [spool] max_age ----------------------------------------------------------------------------
async def test_events_older_than_max_age_are_deleted_for_the_lagging_sink_only(
        sim: Simulator, tmp_path: Path) -> None:
    """The daemon starts on a ledger holding 3,000 events received two hours ago that its
    webhook (down) has not got, with max_age = 1 hour: they are deleted from the ledger, those
    the webhook had not read yet counted as dropped (spool_limit) for it alone and logged at
    error level; once it is back it gets what it held and the new events, nothing else; the
    file sink beside it (done with them) loses nothing."""
    n = 3000
    two_hours_ago = time.time() - 7200
    old = [_login(i, received_at=two_hours_ago + i / 1000) for i in range(1, n + 1)]
    old_raws = [ev.raw for ev in old]
    state = tmp_path / "state"
    await _spooled(state, "sim", {"hook": 0, "file": n}, old)
    hook = Hook()
    await hook.start()
    hook.down = True
    path = tmp_path / "ev.jsonl"
    cfg = make_config(sim.url, tmp_path, exact=True, resync={"enabled": False},
                      shutdown={"timeout": 0.5},
                      spool={"max_age": 3600, "fsync_interval": 0.05},
                      sinks={"file": _file_sink(path),
                             "hook": {"type": "webhook", "url": hook.url, "max_retries": -1,
                                      "format": "event", "types": ["SEVT_ACCOUNT_LOGIN"]}})
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(cfg) as d:
                _fast(d)

                def dropped() -> float:
                    return _sample(d, "cometstream_events_dropped_total", sink="hook",
                                   reason="spool_limit") or 0

                await wait_until(lambda: dropped() > 0, timeout=10, what="the age limit")
                lost = int(dropped())
                # (the HELLO of this run may be there: the lagging webhook reads it from disk)
                assert _query(state / "ledger.db",
                              "SELECT count(*) FROM chunks WHERE first_seq <= ?", n) == [(0,)]
                assert not _sample(d, "cometstream_events_dropped_total", sink="file",
                                   reason="spool_limit")
                hook.down = False
                await wait_until(lambda: len(hook.events) + lost >= n, timeout=20,
                                 what="what the webhook held")
                new = [sim.emit(orjson.loads(_login(n + i).raw)) for i in range(1, 4)]
                await wait_until(lambda: len(hook.events) + lost >= n + 3, what="new events")
                assert int(dropped()) == lost
    finally:
        await hook.stop()
    held = hook.events[:-3]
    assert len(held) + lost == n and lost > 0
    # what it had read before the limit applied: the oldest, each once (in any order: the
    # webhook has 16 POSTs in flight)
    assert sorted(held) == sorted(old_raws[:len(held)])
    assert sorted(hook.events[-3:]) == sorted(new)
    assert len(_lines(path)) == 4  # the file sink: the HELLO and the new events only
    errors = [e for e in logs if e["log_level"] == "error" and e["event"].startswith(
        "spool limit reached")]
    assert [(e["sink"], e["events"]) for e in errors] == [("hook", lost)], errors


# --- 3 and 4. a file sink's file, changed behind its back -----------------------------------------
async def _two_runs(sim: Simulator, tmp_path: Path, path: Path,
                    between: Any) -> tuple[list[bytes], list[bytes], list[Any]]:
    """A daemon with a file sink writes 10 events and stops (its position committed at the end
    of the file); ``between(lines)`` changes the file; a second daemon writes 3 more. Returns
    (the lines of the first run, the events of the second, the second run's log entries)."""
    cfg = make_config(sim.url, tmp_path, exact=True, resync={"enabled": False},
                      spool={"fsync_interval": 0.05}, sinks={"file": _file_sink(path)})
    async with running(cfg) as d:
        await wait_until(lambda: d.sink_stats("file").delivered == 1, what="the HELLO")
        sim.emit_many(10)
        await wait_until(lambda: d.sink_stats("file").delivered == 11, what="10 events")
    ((position,),) = _query(tmp_path / "state" / "ledger.db",
                            "SELECT position FROM cursors WHERE sink = 'file'")
    assert orjson.loads(position) == [path.stat().st_ino, path.stat().st_size]
    first = _lines(path)
    between(first)
    with structlog.testing.capture_logs() as logs:
        async with running(cfg) as d:
            await wait_until(lambda: d.sink_stats("file").delivered == 1, what="the 2nd HELLO")
            more = sim.emit_many(3)
            await wait_until(lambda: d.sink_stats("file").delivered == 4, what="3 more events")
    return first, more, logs


async def test_a_file_shorter_than_at_the_last_commit_is_reported_and_written_on(
        sim: Simulator, tmp_path: Path) -> None:
    """A power failure took the last 5 lines the ledger counted as written (fsync = "batch"):
    the next start says so at error level ("the file is shorter than at the last commit", with
    both sizes), the lost lines stay lost (the sink had acknowledged them), and the sink writes
    on after what is left."""
    path = tmp_path / "ev.jsonl"
    kept = 6
    size = {}

    def power_failure(lines: list[bytes]) -> None:
        size["committed"] = path.stat().st_size
        size["left"] = sum(len(line) + 1 for line in lines[:kept])
        os.truncate(path, size["left"])

    first, more, logs = await _two_runs(sim, tmp_path, path, power_failure)
    lines = _lines(path)
    assert lines[:kept] == first[:kept] and lines[kept + 1:] == more and len(lines) == kept + 4
    reported = [e for e in logs if "shorter than at the last commit" in e["event"]]
    assert len(reported) == 1, [e["event"] for e in logs]
    assert reported[0]["log_level"] == "error" and reported[0]["sink"] == "file"
    assert (reported[0]["size"], reported[0]["committed"]) == (size["left"], size["committed"])


async def test_a_committed_file_moved_away_is_warned_about_and_a_new_one_started(
        sim: Simulator, tmp_path: Path) -> None:
    """Another program moved the file away (not a rotation of cometstream's own): the next
    start warns that the file of the last commit is gone, leaves the moved file alone and
    writes on into a new file at the path."""
    path = tmp_path / "ev.jsonl"
    moved = tmp_path / "elsewhere.jsonl"
    first, more, logs = await _two_runs(sim, tmp_path, path, lambda lines: path.rename(moved))
    assert _lines(moved) == first
    assert len(_lines(path)) == 4 and _lines(path)[1:] == more
    warned = [e for e in logs if "the file of the last commit is gone" in e["event"]]
    assert len(warned) == 1, [e["event"] for e in logs]
    assert warned[0]["log_level"] == "warning" and warned[0]["sink"] == "file"
    assert not any("shorter than" in e["event"] for e in logs)


# --- 5. a failed migration -----------------------------------------------------------------------
@pytest.mark.parametrize("room", [64 * KIB, 0], ids=["room-for-small-files", "no-room-at-all"])
async def test_a_failed_migration_leaves_the_old_files_and_exits_2(tmp_path: Path,
                                                                  room: int) -> None:
    """An earlier version's spool.db (1.3 MB, format 2) and checkpoint.json on a state disk
    that is full: `cometstream run` exits 2 with one line saying the migration failed and the
    old files are left as they were; they are byte for byte what they were, no half-built
    ledger is left, and once there is room they migrate."""
    with _tmpfs(tmp_path / "small", "4m") as disk:
        state = disk / "state"
        events = [_login(i, note="x" * 8 * KIB) for i in range(1, 151)]
        await _spooled(state, "sim", {"hook": 0}, events)
        (state / "ledger.db").rename(state / "spool.db")
        db = sqlite3.connect(state / "spool.db")
        db.executescript("ALTER TABLE cursors DROP COLUMN position; DROP TABLE dedup; "
                         "DROP TABLE running_jobs; DROP TABLE accounts; DROP TABLE devices; "
                         "DELETE FROM meta WHERE key != 'format'; "
                         "UPDATE meta SET value = '2' WHERE key = 'format';")
        db.close()
        (state / "checkpoint.json").write_bytes(orjson.dumps(
            {"version": 2, "server": "sim", "watermark": 1733400000,
             "running_jobs": {"g1": ["user1", 1733399000]}}))
        (state / "daemon.lock").write_text("1\n")  # (the daemon writes its PID over it)
        old = {name: (state / name).read_bytes() for name in ("spool.db", "checkpoint.json")}
        conf = _conf(tmp_path, "http://127.0.0.1:9/", state, f"""
[sinks.hook]
type = "file"
path = "{tmp_path / 'ev.jsonl'}"
""")
        filler = _fill(disk, room)
        proc = await run_cli("run", "-c", str(conf))
        _out, err = await asyncio.wait_for(proc.communicate(), 30)
        lines = err.decode().strip().splitlines()
        assert proc.returncode == 2, lines
        assert len(lines) == 1, lines
        assert "migrating spool.db and checkpoint.json" in lines[0] and \
            "the old files are left as they were" in lines[0], lines
        assert {name: (state / name).read_bytes() for name in old} == old
        left = set(os.listdir(state))
        assert not {name for name in left if name.startswith("ledger.db")}, left
        filler.unlink()
        lg = Ledger(state, ["hook"], server="sim", max_bytes=1 << 30, max_age=365 * 86400,
                    fsync_interval=1.0)
        assert lg.open() == 150 and lg.migrated
        assert lg.state.watermark == 1733400000 and "g1" in lg.state.running_jobs
        await lg.close()
        assert not (state / "spool.db").exists() and not (state / "checkpoint.json").exists()


# --- 6. Kafka keys across a crash ------------------------------------------------------------------
async def test_kafka_keys_of_job_events_sent_again_after_a_sigkill_are_the_same(
        sim: Simulator, tmp_path: Path) -> None:
    """Job completions delivered to Kafka (key template "{ResourceID}"), then SIGKILL before the
    next commit: at the restart the remedial sync brings them back (their dedup keys were not
    committed) and each is sent again with the message key of its first delivery."""
    broker = Broker()
    jobs = 20
    state = tmp_path / "state"
    conf = _conf(tmp_path, sim.url, state, f"""
[spool]
fsync_interval = 60.0
[sinks.bus]
type = "kafka"
bootstrap_servers = "{broker.bootstrap}"
topic = "jobs"
key = "{{ResourceID}}"
types = ["SEVT_JOB_COMPLETED"]
linger_ms = 1
request_timeout_ms = 2000
""")
    daemon = _Process(conf, tmp_path)

    def watermark() -> int:
        try:
            rows = _query(state / "ledger.db",
                          "SELECT value FROM meta WHERE key = 'watermark'")
        except sqlite3.OperationalError:  # not there yet, or not its tables yet
            return 0
        return int(rows[0][0]) if rows else 0

    try:
        await broker.start()
        await daemon.start()
        # the baseline sync, committed (the next commit is due in 60 s)
        await wait_until(lambda: watermark() > 0, timeout=20, what="the baseline commit")
        for _ in range(jobs):
            sim.emit(sim.world.complete_job(sim.world.start_job()["Data"]["GUID"]))
        first = await broker.consume(["jobs"], expect=jobs)
        assert len(first) == jobs, daemon.log()
        assert await daemon.stop(signal.SIGKILL) == -signal.SIGKILL
        await daemon.start()
        msgs = await broker.consume(["jobs"], expect=2 * jobs, timeout=20)
        assert await daemon.stop(signal.SIGTERM) == 0, daemon.log()
    finally:
        await daemon.close()
        await broker.stop()
    keys: dict[tuple[str, int], list[tuple[bytes | None, str]]] = {}
    for m in msgs:
        doc = orjson.loads(m.value)
        origin = dict(m.headers)["cometstream-origin"].decode()
        keys.setdefault((doc["Data"]["GUID"], doc["Data"]["EndTime"]), []).append((m.key, origin))
    assert len(keys) == jobs
    for (guid, _end), sent in keys.items():
        # the live event and the copy the sync synthesized: the same key
        assert sorted(origin for _k, origin in sent) == ["resync", "stream"], sent
        assert {k for k, _o in sent} == {guid.encode()}, sent


# --- 7. webhook keys of events read back from the ledger -------------------------------------------
class _KeyedHook:
    """A webhook receiver recording every POST (body, Idempotency-Key, accepted or not); it
    answers 503 while ``down``."""

    def __init__(self) -> None:
        self.down = False
        self.posts: list[tuple[bytes, str, bool]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def accepted(self) -> list[tuple[bytes, str]]:
        return [(body, key) for body, key, ok in self.posts if ok]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.posts.append((body, request.headers["Idempotency-Key"], not self.down))
        return web.Response(status=503 if self.down else 200)


async def test_webhook_keys_of_other_events_read_back_from_the_ledger_are_the_same(
        tmp_path: Path, sim: Simulator) -> None:
    """Logins (not jobs: their key follows their arrival time and bytes), two of them byte for
    byte the same, POSTed one per request while the receiver is down; the daemon stops and they
    stay in the ledger. The next run reads them back and delivers them, and is SIGKILLed before
    it commits; the run after reads them back again. Every POST of one event, in the three
    runs, carries the same Idempotency-Key, and the two identical logins keep two keys."""
    hook = _KeyedHook()
    await hook.start()
    state = tmp_path / "state"
    conf = _conf(tmp_path, sim.url, state, f"""
[resync]
enabled = false
[spool]
fsync_interval = 60.0
[shutdown]
timeout = 0.5
[sinks.hook]
type = "webhook"
url = "{hook.url}"
batch = 1
max_retries = -1
format = "event"
types = ["SEVT_ACCOUNT_LOGIN"]
""")
    daemon = _Process(conf, tmp_path)
    logins = [orjson.loads(_login(i).raw) for i in range(1, 7)]
    logins.append(logins[-1])  # the same user, address and second: two events, one body
    try:
        hook.down = True
        await daemon.start()
        await sim.wait_for_clients(1, timeout=20)
        for doc in logins:
            sim.emit(doc)
        await wait_until(lambda: len({k for _b, k, _ok in hook.posts}) == len(logins),
                         timeout=20, what="a POST of each login")
        assert await daemon.stop(signal.SIGTERM) == 0, daemon.log()
        first = {key: body for body, key, _ok in hook.posts}
        assert len(first) == len(logins)
        on_disk = _query(state / "ledger.db", "SELECT coalesce(sum(count), 0) FROM chunks")
        assert on_disk[0][0] >= len(logins)
        hook.down = False
        runs = []
        for sig in (signal.SIGKILL, signal.SIGTERM):
            done = len(hook.accepted())
            await daemon.start()
            await wait_until(lambda: len(hook.accepted()) >= done + len(logins),  # noqa: B023
                             timeout=20, what="the logins read back from the ledger")
            runs.append(hook.accepted()[done:])
            assert await daemon.stop(sig) == (0 if sig == signal.SIGTERM else -sig), daemon.log()
    finally:
        await daemon.close()
        await hook.stop()
    for delivered in runs:
        assert {key: body for body, key in delivered} == first
        assert len(delivered) == len(first)
    assert len({first[k] for k in first}) == len(logins) - 1  # two keys for the same bytes


# --- 8. back-pressure ------------------------------------------------------------------------------
async def test_the_read_loop_waits_once_6144_events_wait_for_the_disk(
        sim: Simulator, tmp_path: Path) -> None:
    """The disk takes no commit (another process holds the ledger's write lock) while 10,000
    events arrive for a webhook that is down: the read loop stops taking events once 6,144 wait
    in memory for the disk (the 6,145th makes it wait), and goes on once the disk takes
    commits again: every event is received."""
    hook = Hook()
    await hook.start()
    hook.down = True
    cfg = make_config(sim.url, tmp_path, exact=True, resync={"enabled": False},
                      shutdown={"timeout": 0.5}, spool={"fsync_interval": 0.05},
                      sinks={"hook": {"type": "webhook", "url": hook.url, "max_retries": -1,
                                      "format": "event"}})
    n = 10_000
    try:
        async with running(cfg) as d:
            lg = d.daemon.ledger
            await wait_until(lambda: lg.commits > 0 and not lg.pending, what="the HELLO committed")
            waiting: list[int] = []
            # (a tap sees each event as it is published, after it joined what waits for the disk)
            d.daemon.pipeline.taps.append(lambda ev: waiting.append(len(lg.pending)))
            blocker = sqlite3.connect(lg.path, timeout=20, isolation_level=None)
            try:
                blocker.execute("BEGIN IMMEDIATE")  # the disk takes no commit
                for i in range(1, n + 1):
                    sim.emit({"Type": LOGIN, "Timestamp": 1733400000, "Data": {"i": i}})
                await wait_until(lambda: lg.full, timeout=20, what="6,145 events waiting")
                received = d.stats.events_received
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            await wait_until(lambda: len(waiting) == n, timeout=30, what="every event")
    finally:
        await hook.stop()
    assert max(waiting) == 6_145, max(waiting)
    assert received == 1 + 6_145  # the HELLO, then what the read loop took before it waited


async def test_a_ledger_a_newer_version_wrote_stops_run_with_exit_2_and_is_left_alone(
        tmp_path: Path) -> None:
    """A rollback after an upgrade: the ledger says format 99. `cometstream run` exits 2 with
    one line naming the newer format, and the file is not moved aside nor written to (its
    events and state are the newer version's to use)."""
    state = tmp_path / "state"
    await _spooled(state, "sim", {"hook": 0}, [_login(i) for i in range(1, 6)])
    db = sqlite3.connect(state / "ledger.db")
    db.execute("UPDATE meta SET value = '99' WHERE key = 'format'")
    db.commit()
    db.close()
    before = {p.name: p.read_bytes() for p in state.iterdir() if p.name.startswith("ledger.db")}
    conf = _conf(tmp_path, "http://127.0.0.1:9/", state, f"""
[sinks.hook]
type = "file"
path = "{tmp_path / 'ev.jsonl'}"
""")
    proc = await run_cli("run", "-c", str(conf))
    _out, err = await asyncio.wait_for(proc.communicate(), 30)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2, lines
    assert len(lines) == 1 and "written by a newer cometstream (format 99" in lines[0], lines
    after = {p.name: p.read_bytes() for p in state.iterdir() if p.name.startswith("ledger.db")}
    assert after == before  # nothing moved aside, nothing written
    assert _query(state / "ledger.db", "SELECT count(*) FROM chunks")[0][0] > 0
