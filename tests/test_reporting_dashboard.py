"""docs/monitoring/reporting-dashboard.json: a Grafana dashboard on the PostgreSQL data source.

It must import (its data source an ``__inputs`` entry, every panel on it), and every query in it,
its variables' too, must run against the tables the postgres sink creates and find the jobs and
events the sink wrote: the queries are expanded as Grafana's PostgreSQL data source expands them
(variables with All selected, then ``$__interval``, then the ``$__time*`` macros) and run, as a
read-only role made as docs/reporting.md says, on the private server of the session."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from cometstream.events import Event
from cometstream.sinks.postgres import PostgresSink

from .pgserver import PG_PASSWORD, Pg

psycopg = pytest.importorskip("psycopg", reason="the postgres extra (psycopg) is not installed")

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "monitoring" / "reporting-dashboard.json"
DS = {"type": "grafana-postgresql-datasource", "uid": "${DS_POSTGRES}"}
SCHEMA = "grafana_check"  # tables of this module's own; the queries find them on search_path
READER, READER_PASSWORD = "grafana_reader", "reader-pw"

JOB_NEW, JOB_COMPLETED, LOGIN = 4200, 4201, 4103
BACKUP, RESTORE = 4001, 4002
SUCCESS, WARNING, TIMEOUT, ERROR, QUOTA, MISSED = 5000, 7001, 7000, 7002, 7003, 7004
NOW = int(datetime.now(UTC).timestamp())
H, D = 3600, 86400
GIB = 2**30


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def _panels() -> dict[str, dict[str, Any]]:
    return {p["title"]: p for p in _dashboard()["panels"]}


# --- the jobs and events written -----------------------------------------------------------------
@dataclass
class Job:
    server: str
    user: str
    device: str
    start: int
    end: int | None = None  # None: still running
    status: int = SUCCESS
    classification: int = BACKUP
    upload: int = 0
    download: int = 0


JOBS = [
    # eu/alice: dev-a1 backs up fine (and restored once); dev-a2's last success is 10 days old
    Job("eu", "alice", "dev-a1", NOW - 1 * D - H, NOW - 1 * D, upload=3 * GIB),
    Job("eu", "alice", "dev-a1", NOW - 3 * D - H, NOW - 3 * D, upload=2 * GIB),
    Job("eu", "alice", "dev-a1", NOW - 20 * D - H, NOW - 20 * D, upload=5 * GIB),
    Job("eu", "alice", "dev-a1", NOW - 2 * D - H, NOW - 2 * D, classification=RESTORE,
        download=GIB),
    Job("eu", "alice", "dev-a2", NOW - 10 * D - H, NOW - 10 * D, upload=GIB),
    Job("eu", "alice", "dev-a2", NOW - 2 * D - H, NOW - 2 * D, ERROR, upload=100),
    # eu/bob: dev-b1 has never succeeded (a warning is not a success)
    Job("eu", "bob", "dev-b1", NOW - 6 * D - H, NOW - 6 * D, WARNING, upload=GIB),
    Job("eu", "bob", "dev-b1", NOW - 4 * D - H, NOW - 4 * D, TIMEOUT),
    Job("eu", "bob", "dev-b1", NOW - 1 * D - H, NOW - 1 * D, QUOTA, upload=10),
    # us/carol: a 10-hour job, one running for 3 hours, one before the time range
    Job("us", "carol", "dev-c1", NOW - 2 * D - 10 * H, NOW - 2 * D, upload=4 * GIB),
    Job("us", "carol", "dev-c1", NOW - 3 * H),
    Job("us", "carol", "dev-c1", NOW - 40 * D - H, NOW - 40 * D, upload=9 * GIB),
    # us/o'neil: a quote in a username, a missed schedule, a job running for 30 minutes
    Job("us", "o'neil", "dev-o1", NOW - 1 * D - H, NOW - 1 * D, upload=GIB),
    Job("us", "o'neil", "dev-o1", NOW - 12 * H, NOW - 12 * H, MISSED),
    Job("us", "o'neil", "dev-o1", NOW - 30 * 60),
]
LOGINS = [("eu", "alice", NOW - H), ("us", "carol", NOW - 5 * D), ("us", "carol", NOW - 35 * D)]


def _event(server: str, doc: dict[str, Any]) -> Event:
    raw = orjson.dumps(doc)
    return Event(raw, orjson.loads(raw), doc["Type"], received_at=NOW, server=server)


def _events() -> list[Event]:
    """SEVT_JOB_NEW for every job, then SEVT_JOB_COMPLETED for those that ended; the logins."""
    events = []
    for n, job in enumerate(JOBS):
        guid = f"00000000-0000-4000-8000-{n:012d}"
        data = {"GUID": guid, "Username": job.user, "DeviceID": job.device,
                "SourceGUID": f"src-{job.device}", "Classification": job.classification,
                "Status": 6001, "StartTime": job.start, "EndTime": 0, "TotalSize": 0,
                "UploadSize": 0, "DownloadSize": 0, "TotalFiles": 0, "TotalDirectories": 0}
        events.append(_event(job.server, {"Actor": job.user, "Type": JOB_NEW,
                                          "Timestamp": job.start, "ResourceID": guid,
                                          "Data": data}))
        if job.end is not None:
            done = {**data, "Status": job.status, "EndTime": job.end, "TotalSize": 20 * GIB,
                    "UploadSize": job.upload, "DownloadSize": job.download, "TotalFiles": 1200,
                    "TotalDirectories": 80}
            events.append(_event(job.server, {"Actor": job.user, "Type": JOB_COMPLETED,
                                              "Timestamp": job.end, "ResourceID": guid,
                                              "Data": done}))
    for server, user, ts in LOGINS:
        events.append(_event(server, {"Actor": user, "Type": LOGIN, "Timestamp": ts}))
    return events


async def _write(pg: Pg) -> None:
    sink = PostgresSink("pg", dsn=pg.dsn, password=PG_PASSWORD, schema=SCHEMA)
    await sink.open()
    try:
        await sink.send(_events())
    finally:
        await sink.aclose()


def _reader_statements() -> list[str]:
    """The statements docs/reporting.md gives for Grafana's read-only role (in a plain code
    block: test_postgres.py runs each ``sql`` block there as a report query)."""
    text = (ROOT / "docs" / "reporting.md").read_text(encoding="utf-8")
    found = re.findall(rf"^(?:CREATE ROLE|GRANT) [^;\n]*\b{READER}\b[^;\n]*;$", text, re.MULTILINE)
    assert len(found) == 2, found
    return found


@pytest.fixture(scope="module")
def reader(pg: Pg) -> Iterator[Any]:
    """A connection as the read-only role of docs/reporting.md (with a password, and USAGE on
    this module's schema, which public does not need), after the sink wrote the jobs."""
    asyncio.run(_write(pg))
    with psycopg.connect(pg.dsn, password=PG_PASSWORD, autocommit=True) as admin:
        admin.execute(f"SET search_path TO {SCHEMA}")
        for stmt in _reader_statements():
            admin.execute(stmt)
        admin.execute(f"ALTER ROLE {READER} PASSWORD '{READER_PASSWORD}'")
        admin.execute(f"GRANT USAGE ON SCHEMA {SCHEMA} TO {READER}")
    with psycopg.connect(pg.dsn, user=READER, password=READER_PASSWORD, autocommit=True,
                         options=f"-c search_path={SCHEMA}") as conn:
        yield conn


# --- Grafana's expansion of a query ---------------------------------------------------------------
_VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)")
_MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^)]*)\)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def _seconds(interval: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d|w|y)", interval.strip("'"))
    assert m, f"not an interval Grafana parses: {interval!r}"
    return int(m[1]) * _UNITS[m[2]]


def _number(seconds: float) -> str:
    return str(int(seconds)) if seconds == int(seconds) else repr(seconds)


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def expand_variables(sql: str, values: dict[str, list[str]]) -> str:
    """The dashboard's variables, as the front end replaces them for the SQL data sources: a
    multi-value or All variable becomes its values quoted (``'`` doubled) and comma-separated,
    plain or with ``:sqlstring``. ``$__`` names are left to the data source; a variable the
    dashboard does not define, or another format, fails."""

    def replace(m: re.Match[str]) -> str:
        name = m[1] or m[3]
        if name.startswith("__"):
            return m[0]
        assert name in values, f"{m[0]} is not a variable of the dashboard"
        assert m[2] in (None, "sqlstring"), f"{m[0]}: use $name or ${{name:sqlstring}}"
        return ",".join(_literal(v) for v in values[name])

    return _VARIABLE.sub(replace, sql)


def expand_macros(sql: str, interval: str = "1h", days: int = 30) -> str:
    """What Grafana's PostgreSQL data source does to a query before it runs it, for the time
    range of the last ``days`` and an ``interval`` (``1h``: what Grafana picks for 30 days,
    the panels' minimum): ``$__interval`` (and ``_ms``), ``$__unixEpochFrom()``/``To()``, then
    each ``$__name(args)`` macro; an unknown macro is an error there and fails here."""
    now = datetime.now(UTC)
    since = now - timedelta(days=days)
    start, end = (t.strftime("%Y-%m-%dT%H:%M:%S.%fZ") for t in (since, now))
    sql = sql.replace("$__interval_ms", str(int(_seconds(interval) * 1000)))
    sql = sql.replace("$__interval", interval)
    sql = sql.replace("$__unixEpochFrom()", str(int(since.timestamp())))
    sql = sql.replace("$__unixEpochTo()", str(int(now.timestamp())))

    def replace(m: re.Match[str]) -> str:
        name, args = m[1], [a.strip() for a in m[2].split(",")]
        if name == "__timeGroup" and sql[m.end():m.end() + 1] == ",":
            name = "__timeGroupAlias"  # Grafana's pre-5.3 compatibility: a column, aliased
        if name == "__time":
            return f'{args[0]} AS "time"'
        if name == "__timeEpoch":
            return f'extract(epoch from {args[0]}) as "time"'
        if name == "__timeFilter":
            return f"{args[0]} BETWEEN '{start}' AND '{end}'"
        if name == "__timeFrom":
            return f"'{start}'"
        if name == "__timeTo":
            return f"'{end}'"
        if name in ("__timeGroup", "__timeGroupAlias"):
            assert 2 <= len(args) <= 3, f"{m[0]}: a column, an interval and a fill value at most"
            secs = _number(_seconds(args[1]))
            group = f"floor(extract(epoch from {args[0]})/{secs})*{secs}"
            return group + (' AS "time"' if name == "__timeGroupAlias" else "")
        raise AssertionError(f"{m[0]}: not a macro of Grafana's PostgreSQL data source")

    return _MACRO.sub(replace, sql)


def _variable_sql(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return query if isinstance(query, str) else query["rawSql"]  # type: ignore[no-any-return]


def variable_values(conn: Any, picked: dict[str, list[str]] | None = None
                    ) -> dict[str, list[str]]:
    """Each variable's values with All selected (its query run, after the variables before it),
    unless ``picked`` names some."""
    values: dict[str, list[str]] = {}
    for variable in _dashboard()["templating"]["list"]:
        sql = expand_macros(expand_variables(_variable_sql(variable), values))
        options = [r[0] for r in conn.execute(sql.encode()).fetchall()]
        values[variable["name"]] = (picked or {}).get(variable["name"], options)
    return values


def _execute(conn: Any, panel: dict[str, Any], values: dict[str, list[str]]) -> Any:
    """A cursor on the panel's one query, expanded as Grafana would for the last 30 days at the
    panel's minimum interval; PostgreSQL's error fails the test with the panel's name."""
    (target,) = panel["targets"]
    sql = expand_macros(expand_variables(target["rawSql"], values), panel.get("interval", "1h"))
    try:
        return conn.execute(sql.encode())
    except psycopg.Error as exc:
        raise AssertionError(f"panel {panel['title']!r}: {exc}\n{sql}") from None


def run_panel(conn: Any, panel: dict[str, Any], values: dict[str, list[str]]
              ) -> list[tuple[Any, ...]]:
    return _execute(conn, panel, values).fetchall()  # type: ignore[no-any-return]


def rows_of(conn: Any, panel: dict[str, Any], values: dict[str, list[str]]
            ) -> list[dict[str, Any]]:
    """The panel's rows as {column: value}."""
    cur = _execute(conn, panel, values)
    names = [c.name for c in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _found(panel: dict[str, Any], rows: list[tuple[Any, ...]]) -> list[Any]:
    """What a panel shows in ``rows``: a table's values that are not NULL, 0 or empty, a time
    series' numbers (its time and series names aside) that are not 0 or NULL."""
    if panel["targets"][0]["format"] == "time_series":
        return [v for row in rows for v in row[1:] if isinstance(v, int | float | Decimal) and v]
    return [v for row in rows for v in row if v not in (None, 0, "")]


# --- the tests ------------------------------------------------------------------------------------
def test_the_dashboard_imports_with_a_postgresql_data_source() -> None:
    """An export Grafana imports: one DS_POSTGRES input of the PostgreSQL plugin, required in
    __requires with every panel type used; every panel, target and variable on that input;
    unique ids, a place on the grid, one raw SQL query in a format Grafana knows."""
    dash = _dashboard()
    (ds_input,) = dash["__inputs"]
    assert ds_input["name"] == "DS_POSTGRES" and ds_input["type"] == "datasource"
    assert ds_input["pluginId"] == "grafana-postgresql-datasource"
    required = {(r["type"], r["id"]) for r in dash["__requires"]}
    assert ("datasource", "grafana-postgresql-datasource") in required
    assert ("grafana", "grafana") in required
    assert dash["uid"] == "cometstream-reporting" and "cometstream" in dash["tags"]
    assert 36 <= dash["schemaVersion"] <= 41
    assert "table_prefix" in dash["description"]
    panels = dash["panels"]
    assert len(panels) >= 10
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert ("panel", panel["type"]) in required, panel["type"]
        assert panel["datasource"] == DS, panel["title"]
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys(), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        (target,) = panel["targets"]
        assert target["datasource"] == DS, panel["title"]
        assert target["rawQuery"] is True and target["rawSql"].strip(), panel["title"]
        assert target["format"] in ("table", "time_series"), panel["title"]
        if target["format"] == "time_series":
            assert '$__timeGroupAlias(' in target["rawSql"], panel["title"]
    cells = {(x, y) for p in panels for x in range(p["gridPos"]["x"], p["gridPos"]["x"]
                                                   + p["gridPos"]["w"])
             for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])}
    assert len(cells) == sum(p["gridPos"]["w"] * p["gridPos"]["h"] for p in panels), "overlap"
    names = []
    for variable in dash["templating"]["list"]:
        assert variable["datasource"] == DS and variable["type"] == "query"
        assert variable["multi"] and variable["includeAll"], variable["name"]
        names.append(variable["name"])
    assert names == ["server", "username"]


def test_every_query_runs_and_finds_what_the_sink_wrote(reader: Any) -> None:
    """Every panel's query, with All servers and users over the last 30 days, runs as the
    read-only role and returns at least one row with a value that is neither NULL nor 0 (a
    misspelt column fails with PostgreSQL's error and the panel's name; a filter that matches
    nothing fails too)."""
    values = variable_values(reader)
    assert values == {"server": ["eu", "us"], "username": ["alice", "bob", "carol", "o'neil"]}
    for panel in _dashboard()["panels"]:
        rows = run_panel(reader, panel, values)
        assert _found(panel, rows), f"panel {panel['title']!r} found nothing in {rows}"


def _in_range(job: Job) -> bool:
    return job.end is not None and job.end >= NOW - 30 * D


def test_the_panels_report_the_jobs_written(reader: Any) -> None:
    """What the main panels say of the jobs written: failures per user (7001 is not one),
    uploads per user and month, devices without a success, running and longest jobs, jobs by
    status, events by type; the time range leaves out the job 40 days old."""
    p = _panels()
    values = variable_values(reader)
    failed = {(r["server"], r["username"]): r["failed"]
              for r in rows_of(reader, p["Failed jobs per user"], values)}
    assert failed == {("eu", "bob"): 2, ("eu", "alice"): 1, ("us", "o'neil"): 1}
    assert rows_of(reader, p["Failed jobs"], values) == [{"failed": 4}]

    uploaded = {(r["server"], r["username"]): (r["jobs"], r["uploaded"], r["downloaded"])
                for r in rows_of(reader, p["Uploaded per user"], values)}
    want: dict[tuple[str, str], tuple[int, int, int]] = {}
    for job in filter(_in_range, JOBS):
        n, up, down = want.get((job.server, job.user), (0, 0, 0))
        want[(job.server, job.user)] = (n + 1, up + job.upload, down + job.download)
    assert uploaded == want and uploaded[("us", "carol")] == (1, 4 * GIB, 0)
    monthly: dict[tuple[str, str], int] = {}
    for r in rows_of(reader, p["Uploaded per user per month"], values):
        assert re.fullmatch(r"\d{4}-\d\d", r["month"]), r
        who = (r["server"], r["username"])
        monthly[who] = monthly.get(who, 0) + r["uploaded"]
    assert monthly == {who: up for who, (_, up, _) in want.items()}
    total = sum(up for _, up, _ in want.values())
    assert rows_of(reader, p["Uploaded"], values) == [{"uploaded": total}]

    stale = rows_of(reader, p["Devices without a successful backup in 7 days"], values)
    assert [(r["server"], r["username"], r["device_id"]) for r in stale] == [
        ("eu", "bob", "dev-b1"), ("eu", "alice", "dev-a2")]
    assert stale[0]["last_success"] is None
    assert stale[1]["last_success"] == datetime.fromtimestamp(NOW - 10 * D, UTC)
    running = rows_of(reader, p["Jobs running now"], values)
    assert [(r["username"], r["device_id"]) for r in running] == [
        ("carol", "dev-c1"), ("o'neil", "dev-o1")]
    assert 3 * H <= running[0]["running_for"] < 3 * H + 600
    longest = rows_of(reader, p["Longest jobs"], values)
    assert longest[0]["username"] == "carol" and longest[0]["duration"] == 10 * H
    assert len(longest) == sum(map(_in_range, JOBS))

    by_status = rows_of(reader, p["Jobs by status"], values)
    totals = {k: sum(r[k] for r in by_status) for k in ("succeeded", "warnings", "failed")}
    ended = [j.status for j in JOBS if _in_range(j)]
    assert totals == {"succeeded": ended.count(SUCCESS), "warnings": ended.count(WARNING),
                      "failed": len(ended) - ended.count(SUCCESS) - ended.count(WARNING)}
    assert totals == {"succeeded": 7, "warnings": 1, "failed": 4}
    assert [r["time"] for r in by_status] == sorted(r["time"] for r in by_status)
    assert all(r["time"] % 3600 == 0 for r in by_status)  # 1-hour buckets
    reasons = {r["metric"] for r in rows_of(reader, p["Failed jobs over time"], values)}
    assert reasons == {"JOB_STATUS_FAILED_TIMEOUT", "JOB_STATUS_FAILED_ERROR",
                       "JOB_STATUS_FAILED_QUOTA", "JOB_STATUS_FAILED_SCHEDULEMISSED"}
    events: dict[str, int] = {}
    for r in rows_of(reader, p["Events by type"], values):
        events[r["metric"]] = events.get(r["metric"], 0) + r["events"]
    assert events == {"SEVT_JOB_NEW": sum(j.start >= NOW - 30 * D for j in JOBS),
                      "SEVT_JOB_COMPLETED": sum(map(_in_range, JOBS)),
                      "SEVT_ACCOUNT_LOGIN": 2}


def test_the_variables_filter_every_panel(reader: Any) -> None:
    """Picking a server lists only its users; picking a user (one with a quote in the name)
    narrows every panel to that user; a server and a user who has no jobs there, or a server
    that sent nothing, leave every panel empty."""
    assert variable_values(reader, {"server": ["us"]})["username"] == ["carol", "o'neil"]
    values = variable_values(reader, {"server": ["us"], "username": ["o'neil"]})
    p = _panels()
    assert rows_of(reader, p["Failed jobs"], values) == [{"failed": 1}]
    assert rows_of(reader, p["Jobs running now"], values)[0]["username"] == "o'neil"
    for panel in p.values():
        for row in rows_of(reader, panel, values):
            assert row.get("username", "o'neil") == "o'neil", panel["title"]
            assert row.get("server", "us") == "us", panel["title"]
    # carol has no jobs on eu: every panel on jobs finds nothing; no server finds no event
    for picked in ({"server": ["eu"], "username": ["carol"]},
                   {"server": ["nowhere"], "username": ["carol"]}):
        nobody = variable_values(reader, picked)
        for panel in p.values():
            if "cometstream_jobs" in panel["targets"][0]["rawSql"] or picked["server"] != ["eu"]:
                rows = run_panel(reader, panel, nobody)
                assert not _found(panel, rows), (picked, panel["title"], rows)
