"""The PostgreSQL sink against a real PostgreSQL: a private instance (initdb + pg_ctl) on a free
127.0.0.1 port for the session, driven through the daemon with events from the simulator."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from cometstream.config import Section
from cometstream.errors import ConfigError, SinkError
from cometstream.events import Event
from cometstream.simulator import Simulator
from cometstream.sinks.postgres import SCHEMA_VERSION, PostgresSink

from .conftest import PASSWORD, USER, make_config, run_cli, running, wait_until, write_config
from .pgserver import PG_PASSWORD, Pg

psycopg = pytest.importorskip("psycopg", reason="the postgres extra (psycopg) is not installed")

SERVER = "sim"
LOGIN = 4103  # SEVT_ACCOUNT_LOGIN
_prefixes = itertools.count(1)


@pytest.fixture
def prefix() -> str:
    """Tables of their own for each test (the server is shared by the session)."""
    return f"t{next(_prefixes)}_"


@pytest.fixture
def pwfile(tmp_path: Path) -> Path:
    path = tmp_path / "pgpass.txt"
    path.write_text(PG_PASSWORD + "\n")
    path.chmod(0o600)
    return path


def _options(pg: Pg, prefix: str, pwfile: Path, **extra: Any) -> dict[str, Any]:
    return {"type": "postgres", "dsn": pg.dsn, "password_file": str(pwfile),
            "table_prefix": prefix, **extra}


def _sink(pg: Pg, prefix: str, pwfile: Path, **extra: Any) -> PostgresSink:
    opts = _options(pg, prefix, pwfile, **extra)
    opts.pop("type")
    opts.setdefault("format", "event")
    return PostgresSink.from_config("pg", Section(opts, "sinks.pg"))


def _event(doc: dict[str, Any], received_at: float = 1733400000.5) -> Event:
    raw = orjson.dumps(doc)
    return Event(raw, orjson.loads(raw), doc["Type"], received_at=received_at, server=SERVER)


def _counts(pg: Pg, prefix: str) -> tuple[int, int]:
    ev = pg.query(f"SELECT count(*) FROM {prefix}events")[0][0]
    jobs = pg.query(f"SELECT count(*) FROM {prefix}jobs")[0][0]
    return ev, jobs


def _rows(pg: Pg, prefix: str) -> int:
    try:
        return int(pg.query(f"SELECT count(*) FROM {prefix}events")[0][0])
    except psycopg.errors.UndefinedTable:
        return 0
    except psycopg.OperationalError:
        return -1


def _actors(pg: Pg, prefix: str) -> set[str]:
    try:
        return {r[0] for r in pg.query(f"SELECT actor FROM {prefix}events WHERE actor <> ''")}
    except (psycopg.errors.UndefinedTable, psycopg.OperationalError):
        return set()


async def test_jobs_started_and_completed_are_one_row_each_with_the_final_status(
        sim: Simulator, tmp_path: Path, pg: Pg, prefix: str, pwfile: Path) -> None:
    """Jobs started and completed through the daemon are one row each in jobs, finished, and
    each completion is in events once; a restart over the same state adds nothing."""
    cfg = make_config(sim.url, tmp_path, sinks={"pg": _options(pg, prefix, pwfile)})
    guids = []
    async with running(cfg) as rd:
        await wait_until(lambda: sim.clients, what="daemon connected")
        for _ in range(5):
            new = sim.world.start_job()
            guids.append(new["Data"]["GUID"])
            sim.emit(new)
        sim.emit(sim.world.complete_job(guids[0]))
        await wait_until(lambda: rd.sink_stats("pg").delivered >= 6, 30, "6 delivered")
        running_now = pg.query(f"SELECT count(*) FROM {prefix}jobs WHERE end_time IS NULL")
        assert running_now[0][0] == 4
        for g in guids[1:]:
            sim.emit(sim.world.complete_job(g))
        await wait_until(lambda: rd.sink_stats("pg").delivered >= 10, 30, "10 delivered")
    rows = pg.query(f"SELECT job_id, status, status_name, end_time, username FROM {prefix}jobs")
    assert sorted(r[0] for r in rows) == sorted(guids)
    assert all(r[3] is not None and r[1] >= 5000 and r[2] and r[4] for r in rows)
    completions = pg.query(f"SELECT count(*), count(DISTINCT event_key) FROM {prefix}events "
                           "WHERE type = 4201")
    assert completions[0] == (5, 5)
    jobs_before = pg.query(f"SELECT * FROM {prefix}jobs ORDER BY job_id")
    events_before = pg.query(f"SELECT * FROM {prefix}events ORDER BY id")
    async with running(cfg) as rd:  # the same state dir: whatever it replays changes nothing
        await wait_until(lambda: sim.clients, what="daemon reconnected")
        sim.emit({"Type": LOGIN, "Timestamp": 1733400000, "Actor": "marker"})
        await wait_until(lambda: pg.query(f"SELECT count(*) FROM {prefix}events "
                                          "WHERE actor = 'marker'")[0][0] == 1, 30, "marker")
    assert pg.query(f"SELECT * FROM {prefix}jobs ORDER BY job_id") == jobs_before
    after = pg.query(f"SELECT * FROM {prefix}events ORDER BY id")
    assert after[:len(events_before)] == events_before
    assert not [r for r in after[len(events_before):] if r[3] in (4200, 4201)]


async def test_a_replayed_batch_changes_nothing(pg: Pg, prefix: str, pwfile: Path) -> None:
    """The same events sent again by a new sink (a crash before the ack) add no row and change
    none; duplicates inside one batch are one row."""
    world = Simulator(username="u", password="p", rate=0, seed=3).world
    new = world.start_job()
    done = world.complete_job(new["Data"]["GUID"])
    login = {"Type": LOGIN, "Timestamp": 1733400000, "Actor": "alice"}
    batch = [_event(new), _event(done), _event(login), _event(done)]
    sink = _sink(pg, prefix, pwfile)
    await sink.open()
    await sink.send(batch)
    await sink.aclose()
    first = pg.query(f"SELECT * FROM {prefix}jobs")
    devices = pg.query(f"SELECT * FROM {prefix}devices")
    assert _counts(pg, prefix) == (3, 1) and len(devices) == 1
    again = _sink(pg, prefix, pwfile)
    await again.open()
    await again.send(batch)
    await again.aclose()
    assert _counts(pg, prefix) == (3, 1)
    assert pg.query(f"SELECT * FROM {prefix}jobs") == first
    assert pg.query(f"SELECT * FROM {prefix}devices") == devices
    assert pg.query(f"SELECT value FROM {prefix}meta WHERE name = 'schema_version'") == [
        (str(SCHEMA_VERSION),)]


async def test_a_late_job_new_never_turns_a_finished_job_back_to_running(
        pg: Pg, prefix: str, pwfile: Path) -> None:
    """A JOB_NEW after its completion, in a later batch or in the same one, leaves the job
    finished with its final status."""
    world = Simulator(username="u", password="p", rate=0, seed=4).world
    sink = _sink(pg, prefix, pwfile)
    await sink.open()
    try:
        for together in (False, True):
            new = world.start_job()
            guid = new["Data"]["GUID"]
            done = world.complete_job(guid)
            if together:
                await sink.send([_event(done), _event(new)])
            else:
                await sink.send([_event(done)])
                await sink.send([_event(new)])
            row = pg.query(f"SELECT status, end_time FROM {prefix}jobs WHERE job_id = %s", guid)
            assert row == [(done["Data"]["Status"], row[0][1])] and row[0][1] is not None
    finally:
        await sink.aclose()


def _job(kind: int, guid: str, device: str, end: int, status: int = 5000,
         classification: int = 4001) -> Event:
    data = {"GUID": guid, "Username": "alice", "DeviceID": device,
            "Status": status if kind == 4201 else 6001,
            "Classification": classification, "StartTime": end - 600,
            "EndTime": end if kind == 4201 else 0}
    return _event({"Type": kind, "Timestamp": end, "Actor": "alice", "ResourceID": guid,
                   "Data": data})


async def test_devices_keep_their_last_job_and_last_success_whatever_the_order(
        pg: Pg, prefix: str, pwfile: Path) -> None:
    """One row per device: the latest end, the latest successful backup, the status of the job
    that ended last; events in another order, or replayed, give the same row."""
    t = 1733400000
    events = [
        _job(4201, "a", "dev1", t, 5000),
        _job(4201, "b", "dev1", t + 100, 7003),  # failed, later: last status, not a success
        _job(4201, "c", "dev1", t + 50, 5000, classification=4002),  # a restore: no success
        _job(4200, "d", "dev1", t + 200),  # running: a later start, no end
        _job(4201, "e", "dev2", t + 10, 7001),  # warnings only: never a success
    ]
    rows = []
    for order in (events, events[::-1], [*events[2:], *events[:2]]):
        p = f"{prefix}{len(rows)}_"
        sink = _sink(pg, p, pwfile)
        await sink.open()
        try:
            await sink.send(order)  # all in one batch,
            for ev in order:  # then replayed one per batch: the merge is the database's
                await sink.send([ev])
        finally:
            await sink.aclose()
        rows.append(pg.query(
            f"SELECT device_id, extract(epoch FROM last_start)::bigint, "
            f"extract(epoch FROM last_end)::bigint, extract(epoch FROM last_success)::bigint, "
            f"last_status FROM {p}devices ORDER BY device_id"))
    assert rows[0] == [("dev1", t + 200 - 600, t + 100, t, 7003),
                       ("dev2", t + 10 - 600, t + 10, None, 7001)]
    assert rows[1] == rows[0] and rows[2] == rows[0]


async def test_tables_of_schema_1_are_upgraded_in_place(
        pg: Pg, prefix: str, pwfile: Path) -> None:
    """Tables a version-1 sink made (no devices table) get it, filled from the jobs there; the
    rows already there are untouched. Tables of a newer version are written as they are."""
    t = 1733400000
    sink = _sink(pg, prefix, pwfile)
    await sink.open()
    await sink.send([_job(4201, "a", "dev1", t), _job(4201, "b", "dev1", t + 60, 7003),
                     _job(4200, "c", "dev2", t + 30)])
    await sink.aclose()
    pg.query(f"DROP TABLE {prefix}devices")  # (as version 1 left them)
    pg.query(f"UPDATE {prefix}meta SET value = '1' WHERE name = 'schema_version'")
    jobs = pg.query(f"SELECT * FROM {prefix}jobs ORDER BY job_id")
    again = _sink(pg, prefix, pwfile)
    await again.open()
    await again.aclose()
    assert pg.query(f"SELECT value FROM {prefix}meta WHERE name = 'schema_version'") == [
        (str(SCHEMA_VERSION),)]
    assert pg.query(f"SELECT * FROM {prefix}jobs ORDER BY job_id") == jobs
    assert pg.query(f"SELECT device_id, extract(epoch FROM last_success)::bigint, last_status "
                    f"FROM {prefix}devices ORDER BY device_id") == [
        ("dev1", t, 7003), ("dev2", None, None)]
    pg.query(f"UPDATE {prefix}meta SET value = '99' WHERE name = 'schema_version'")
    newer = _sink(pg, prefix, pwfile)
    await newer.open()
    try:
        await newer.send([_job(4201, "c", "dev2", t + 90)])
    finally:
        await newer.aclose()
    assert pg.query(f"SELECT value FROM {prefix}meta WHERE name = 'schema_version'") == [("99",)]
    assert pg.query(f"SELECT last_status FROM {prefix}devices WHERE device_id = 'dev2'") == [
        (5000,)]


async def test_an_event_postgres_refuses_is_refused_alone(
        pg: Pg, prefix: str, pwfile: Path) -> None:
    """A ``\\u0000`` in an event (jsonb refuses it) refuses that event only: the events before
    it are committed and reported accepted, the ones after go in with the next send."""
    sink = _sink(pg, prefix, pwfile)
    await sink.open()
    good = [_event({"Type": LOGIN, "Timestamp": 1733400000, "Actor": f"u{i}"}) for i in range(6)]
    bad = _event({"Type": LOGIN, "Timestamp": 1733400000, "Actor": "nul\u0000here"})
    try:
        with pytest.raises(SinkError) as err:
            await sink.send([*good[:3], bad, *good[3:]])
        assert (err.value.retryable, err.value.accepted, err.value.failed) == (False, 3, 1)
        assert _rows(pg, prefix) == 3
        await sink.send(good[3:])
        assert _rows(pg, prefix) == 6
        raw = b'{"Type":4103,"Timestamp":1733400000,"Actor":"half \\ud800 a pair"}'
        lone = Event(raw, json.loads(raw), LOGIN, received_at=1.0, server=SERVER)
        with pytest.raises(SinkError) as err:
            await sink.send([lone, good[0]])
        assert (err.value.retryable, err.value.accepted, err.value.failed) == (False, 0, 1)
    finally:
        await sink.aclose()


async def test_a_nul_event_does_not_wedge_the_daemon(
        sim: Simulator, tmp_path: Path, pg: Pg, prefix: str, pwfile: Path) -> None:
    """Through the daemon, the refused event is dead-lettered and the next events arrive."""
    dl = tmp_path / "dead.jsonl"
    cfg = make_config(sim.url, tmp_path, exact=True,
                      sinks={"pg": _options(pg, prefix, pwfile, dead_letter=str(dl))})
    async with running(cfg) as rd:
        await wait_until(lambda: sim.clients, what="daemon connected")
        sim.emit({"Type": LOGIN, "Timestamp": 1733400000, "Actor": "before"})
        sim.emit(b'{"Type":4103,"Timestamp":1733400000,"Actor":"a\\u0000b"}')
        sim.emit({"Type": LOGIN, "Timestamp": 1733400000, "Actor": "after"})
        await wait_until(lambda: rd.sink_stats("pg").dropped["rejected"] == 1, 30, "1 refused")
        await wait_until(lambda: _actors(pg, prefix) >= {"before", "after"}, 30, "the others")
    assert not any("a" in actor and "b" in actor for actor in _actors(pg, prefix))
    assert b"\\u0000" in dl.read_bytes()


async def test_a_database_restart_delays_events_and_loses_none(
        sim: Simulator, tmp_path: Path, pg: Pg, prefix: str, pwfile: Path) -> None:
    """PostgreSQL stopped while events arrive: the sink fails as a whole, the events wait in the
    ledger, none is dead-lettered, and all arrive once it is back."""
    dl = tmp_path / "dead.jsonl"
    cfg = make_config(sim.url, tmp_path,
                      sinks={"pg": _options(pg, prefix, pwfile, dead_letter=str(dl))})
    async with running(cfg) as rd:
        await wait_until(lambda: sim.clients, what="daemon connected")
        sim.emit({"Type": LOGIN, "Timestamp": 1733400000, "Actor": "first"})
        await wait_until(lambda: "first" in _actors(pg, prefix), 30, "the first event")
        pg.stop()
        try:
            for i in range(20):
                sim.emit({"Type": LOGIN, "Timestamp": 1733400000, "Actor": f"during{i}"})
            await wait_until(lambda: rd.sink_stats("pg").errors >= 2, 30, "failed sends")
            assert rd.sink_stats("pg").failing
        finally:
            pg.start()
        want = {"first"} | {f"during{i}" for i in range(20)}
        await wait_until(lambda: _actors(pg, prefix) >= want, 60, "all 21 events")
        await wait_until(lambda: not rd.sink_stats("pg").failing, 30, "sink healthy")
        assert sum(rd.sink_stats("pg").dropped.values()) == 0
    assert not dl.exists() or dl.read_bytes() == b""


async def test_a_refused_password_is_a_sink_wide_retryable_failure(
        pg: Pg, prefix: str, tmp_path: Path) -> None:
    """A wrong password: retryable, about the sink (nothing dead-lettered), and not logged."""
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    sink = _sink(pg, prefix, wrong)
    with pytest.raises(SinkError) as err:
        await sink.open()
    assert err.value.retryable and err.value.sink_wide
    assert "not-the-password" not in str(err.value)


def test_a_password_in_the_dsn_is_refused() -> None:
    """Credentials inline in the dsn are refused, naming the key."""
    with pytest.raises(ConfigError, match=r"sinks\.pg\.dsn.*password"):
        PostgresSink.from_config("pg", Section(
            {"dsn": "postgresql://u:hunter2@localhost/db", "format": "event"}, "sinks.pg"))


async def test_the_reporting_queries_of_the_docs_run(pg: Pg, pwfile: Path) -> None:
    """Every SQL query in docs/reporting.md runs against the tables the sink creates."""
    world = Simulator(username="u", password="p", rate=0, seed=5).world
    batch = []
    for _ in range(4):
        new = world.start_job()
        batch += [_event(new), _event(world.complete_job(new["Data"]["GUID"]))]
    batch.append(_event(world.start_job()))
    sink = _sink(pg, "cometstream_", pwfile, schema="docs_check")
    await sink.open()
    try:
        await sink.send(batch)
    finally:
        await sink.aclose()
    text = (Path(__file__).parent.parent / "docs" / "reporting.md").read_text()
    queries = [block.split("```", 1)[0] for block in text.split("```sql\n")[1:]]
    assert len(queries) >= 4
    with psycopg.connect(pg.dsn, password=PG_PASSWORD, autocommit=True) as conn:
        conn.execute("SET search_path TO docs_check")
        for sql in queries:
            conn.execute(sql.encode()).fetchall()
        failed = conn.execute(queries[0].encode()).fetchall()
        assert sum(r[1] for r in failed) == conn.execute(
            "SELECT count(*) FROM cometstream_jobs WHERE status BETWEEN 7000 AND 7999 "
            "AND end_time >= now() - interval '24 hours'").fetchone()[0]


# --- TLS, check --------------------------------------------------------------------------------
@pytest.mark.parametrize(("dsn", "env", "extra", "warned"), [
    ("postgresql://u@127.0.0.1/db", {}, {}, None),
    ("host=/run/postgresql dbname=db", {}, {}, None),
    ("postgresql://u@localhost,[::1]/db", {}, {}, None),
    ("postgresql://u@db.example.com/db", {}, {"sslmode": "verify-full"}, None),
    ("postgresql://u@db.example.com/db?sslrootcert=/etc/ca.pem", {},
     {"sslmode": "verify-full"}, None),
    ("postgresql://u@db.example.com/db", {"PGSSLROOTCERT": "/etc/ca.pem"},
     {"sslmode": "verify-full"}, None),
    ("dbname=db", {"PGHOST": "10.0.0.5"}, {"sslmode": "verify-full"}, None),
    ("postgresql://u@db.example.com/db?sslmode=verify-full", {}, {}, None),
    ("postgresql://u@db.example.com/db?sslmode=disable", {}, {}, "without TLS"),
    ("postgresql://u@db.example.com/db?sslmode=require", {}, {}, "without checking"),
    ("postgresql://u@localhost,db.example.com/db?sslmode=prefer", {}, {}, "unverified"),
    ("postgresql://u@db.example.com/db", {"PGSSLMODE": "verify-ca"}, {}, "not its name"),
])
def test_a_remote_database_is_reached_with_verified_tls_by_default(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, dsn: str, env: dict[str, str],
        extra: dict[str, str], warned: str | None) -> None:
    """A host other than this machine: sslmode=verify-full unless the DSN or PGSSLMODE says
    otherwise (then a warning when the host is not verified); the system's CAs unless a root
    certificate is named. A Unix socket or loopback: libpq's defaults, no warning."""
    for var in ("PGHOST", "PGSSLMODE", "PGSSLROOTCERT"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("HOME", str(tmp_path))  # (no ~/.postgresql/root.crt)
    sink = PostgresSink.from_config("pg", Section({"dsn": dsn, "format": "event"}, "sinks.pg"))
    got, warning = sink._tls()
    if extra.get("sslmode") == "verify-full" and "sslrootcert" not in dsn and not env.get(
            "PGSSLROOTCERT"):
        extra = {**extra, "sslrootcert": "system"}
    assert got == extra
    if warned is None:
        assert warning is None and sink.warnings() == []
    else:
        assert warning is not None and warned in warning and "db.example.com" in warning
        assert sink.warnings() == [warning] and warning.startswith("sinks.pg.dsn: sslmode=")


async def test_a_remote_name_at_a_local_address_still_requires_tls(
        pg: Pg, prefix: str, pwfile: Path) -> None:
    """host names the server (its certificate), hostaddr where to connect: a name that is not
    this machine gets verify-full, and a server without TLS is refused, not used in clear."""
    dsn = f"host=db.example.com hostaddr=127.0.0.1 port={pg.port} user=cometstream dbname=postgres"
    sink = PostgresSink.from_config("pg", Section(
        {"dsn": dsn, "password_file": str(pwfile), "table_prefix": prefix, "format": "event"},
        "sinks.pg"))
    with pytest.raises(SinkError) as err:
        await sink.open()
    assert err.value.retryable and "SSL" in str(err.value)


def _check_conf(tmp_path: Path, sim: Simulator, pg_opts: dict[str, Any]) -> Path:
    body = "[sinks.pg]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in pg_opts.items())
    return write_config(tmp_path, sim.url, body, mode=0o600)


async def test_check_connect_tries_the_database(sim: Simulator, tmp_path: Path, pg: Pg,
                                                prefix: str, pwfile: Path) -> None:
    """check --connect logs in to the database as the sink would and says what answered; a
    wrong password is one line naming the sink, exit 1, the password nowhere."""
    conf = _check_conf(tmp_path, sim, _options(pg, prefix, pwfile))
    proc = await run_cli("check", "-c", str(conf), "--connect")
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    line = out.decode().splitlines()[-1]
    assert line.startswith("ok: sink pg: PostgreSQL "), out.decode()
    assert "database postgres as cometstream (no TLS); the tables will be created" in line
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not-the-pw-4213\n")
    wrong.chmod(0o600)
    conf = _check_conf(tmp_path, sim, _options(pg, prefix, wrong))
    proc = await run_cli("check", "-c", str(conf), "--connect")
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert err.decode().startswith("cometstream: sink pg: cannot connect to PostgreSQL: "), err
    assert "password authentication failed" in err.decode()
    assert "not-the-pw-4213" not in (out + err).decode()


async def test_check_warns_of_a_remote_database_without_verified_tls(
        sim: Simulator, tmp_path: Path) -> None:
    """Offline check: the warning is printed and the config is still ok (it works)."""
    conf = _check_conf(tmp_path, sim, {"type": "postgres",
                                       "dsn": "postgresql://u@db.example.com/r?sslmode=require"})
    proc = await run_cli("check", "-c", str(conf))
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0 and out.decode() == "ok\n"
    assert err.decode() == ("cometstream: warning: sinks.pg.dsn: sslmode=require: db.example.com "
                            "is reached with TLS but without checking the server's certificate; "
                            "the events and the password cross the network where others may "
                            "read or alter them (sslmode=verify-full checks the server)\n")


async def test_run_warns_of_a_database_reached_in_clear(
        sim: Simulator, tmp_path: Path, pg: Pg, prefix: str, pwfile: Path) -> None:
    """The operator's choice (sslmode=disable to a remote name) is followed, and logged once at
    start with the key to change."""
    dsn = (f"host=db.example.com hostaddr=127.0.0.1 port={pg.port} user=cometstream "
           "dbname=postgres sslmode=disable")
    cfg = make_config(sim.url, tmp_path, sinks={"pg": {**_options(pg, prefix, pwfile),
                                                       "dsn": dsn}})
    with structlog.testing.capture_logs() as logs:
        async with running(cfg) as rd:
            await wait_until(lambda: rd.sink_stats("pg").delivered >= 1, 30, "the HELLO")
    warned = [e for e in logs if e["event"] == "sink setting to review"]
    assert len(warned) == 1 and warned[0]["sink"] == "pg"
    assert warned[0]["warning"].startswith("sinks.pg.dsn: sslmode=disable: db.example.com is "
                                           "reached without TLS;")


async def test_the_password_can_come_from_the_units_credential(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pg: Pg, prefix: str) -> None:
    """Without password_file, the systemd credential NAME.password (as LoadCredentialEncrypted
    gives it) is the password; without either, libpq's own sources (none here: refused)."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "pg.password").write_text(PG_PASSWORD + "\n")
    opts = {"dsn": pg.dsn, "table_prefix": prefix, "format": "event"}
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    sink = PostgresSink.from_config("pg", Section(dict(opts), "sinks.pg"))
    await sink.open()
    await sink.aclose()
    (creds / "pg.password").write_bytes(b"\xff\xfe not text")  # one line, naming the key
    with pytest.raises(ConfigError) as bad:
        PostgresSink.from_config("pg", Section(dict(opts), "sinks.pg"))
    assert str(bad.value).startswith('sinks.pg.password_file: the systemd credential "pg.password"')
    assert "not UTF-8 text" in str(bad.value)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    without = PostgresSink.from_config("pg", Section(dict(opts), "sinks.pg"))
    with pytest.raises(SinkError) as err:
        await without.open()
    assert "password" in str(err.value)


# --- a database restart and a SIGKILL, as a real process ------------------------------------------
@pytest.mark.timeout(180)
async def test_jobs_through_a_database_restart_and_a_sigkill_are_each_once(
        tmp_path: Path, pg: Pg, prefix: str, pwfile: Path) -> None:
    """`cometstream run` with the postgres sink while jobs start and complete: the database
    restarts (down 3 s), the daemon is SIGKILLed and started again, and an event with a
    ``\\u0000`` passes by. Every job is one row with its final status and end, every completion
    one event; the NUL event alone is dead-lettered."""
    from .test_faults import DaemonProcess, _config

    dl = tmp_path / "dead.jsonl"
    done: dict[str, tuple[int, int]] = {}  # GUID -> (Status, EndTime) of its completion
    async with Simulator(username=USER, password=PASSWORD, rate=0, seed=11) as sim:
        conf = _config(tmp_path, sim.url, "[sinks.pg]\n" + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in
            _options(pg, prefix, pwfile, dead_letter=str(dl)).items()))
        daemon = DaemonProcess(conf, tmp_path)
        world = sim.world
        started: list[str] = []

        async def jobs(n: int) -> None:  # n job starts, each completed 5 starts later
            for _ in range(n):
                new = world.start_job()
                started.append(new["Data"]["GUID"])
                if sim.clients:
                    sim.emit(new)
                if len(started) > 5:
                    ev = world.complete_job(started[-6])
                    done[ev["Data"]["GUID"]] = (ev["Data"]["Status"], ev["Data"]["EndTime"])
                    if sim.clients:
                        sim.emit(ev)
                await asyncio.sleep(0.004)

        try:
            await daemon.start()
            await wait_until(daemon.settled_since, timeout=20, what="the baseline resync")
            await jobs(300)
            sim.emit(b'{"Type":4103,"Timestamp":1733400000,"Actor":"nul\\u0000here"}')
            stopped = asyncio.create_task(asyncio.to_thread(pg.stop))
            await jobs(300)  # while the database goes down
            await stopped
            await jobs(600)  # ~3 s without a database
            await asyncio.to_thread(pg.start)
            await jobs(300)
            await daemon.kill()
            await jobs(200)  # no daemon: these completions come back by the remedial sync
            offset = 0
            await daemon.start("after sigkill")
            await jobs(300)
            for guid in started[-5:]:
                ev = world.complete_job(guid)
                done[guid] = (ev["Data"]["Status"], ev["Data"]["EndTime"])
                sim.emit(ev)
            await wait_until(lambda: daemon.settled_since(offset), timeout=30, what="resync")

            def finished() -> int:
                try:
                    return int(pg.query(f"SELECT count(*) FROM {prefix}jobs "
                                        "WHERE end_time IS NOT NULL")[0][0])
                except psycopg.OperationalError:
                    return -1

            await wait_until(lambda: finished() >= len(done), timeout=60,
                             what="every completion in the database")
            assert await daemon.terminate() == 0, daemon.tail()
        except BaseException:
            daemon.report()
            raise
        finally:
            await daemon.close()
    rows = pg.query(f"SELECT job_id, status, extract(epoch FROM end_time)::bigint "
                    f"FROM {prefix}jobs WHERE end_time IS NOT NULL")
    assert {r[0]: (r[1], r[2]) for r in rows} == done and len(rows) == len(done)
    per_job = pg.query(f"SELECT resource_id, count(*) FROM {prefix}events WHERE type = 4201 "
                       "GROUP BY resource_id")
    assert {r[0] for r in per_job} == set(done) and {r[1] for r in per_job} == {1}
    assert pg.query(f"SELECT count(*) FROM {prefix}jobs WHERE end_time IS NULL")[0][0] == 0
    (letter,) = [json.loads(line) for line in dl.read_text().splitlines()]
    assert letter["event"]["Actor"] == "nul\u0000here"
    # what was proven: the outage was seen (and not dead-lettered), the gap came by the sync
    first_run = (tmp_path / "run-1.log").read_text()
    assert "cannot connect to PostgreSQL" in first_run or "PostgreSQL failed" in first_run
    assert pg.query(f"SELECT count(*) FROM {prefix}events WHERE origin = 'resync'")[0][0] > 0
