"""``cometstream dlq list|replay|purge`` as a user runs them: a real spool (SQLite, written with the
daemon's own helpers), the CLI as a subprocess, a real file sink and a real webhook receiver on
127.0.0.1."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cometstream.dlq import parse_duration
from cometstream.errors import DlqError
from cometstream.simulator import Simulator
from cometstream.store import FILENAME, DeadLetters, connect

from .conftest import cli_env, make_config, run_cli, running, wait_until, write_config

URL = "http://127.0.0.1:9/"  # the server is never contacted by dlq
#: a job completion as the server sends it: an integer beyond 64 bits, unicode, key order and
#: spacing that any re-serialization would change
BIG = 2**64 + 12345
RAW_JOB = (b'{"Actor":"caf\xc3\xa9","Type":4201, "Timestamp":1733400000,"Data":{"GUID":"g-1",'
           b'"Size":' + str(BIG).encode() + b',"EndTime":1733400000,"Z":1,"A":2}}')
RAW_LOGIN = b'{"Type":4103,"Actor":"bob","Timestamp":1733400001,"Data":"\\u00e9\\n"}'
RAW_NEW = b'{"Type":9999,"TypeString":"SEVT_SOMETHING_NEW","Data":{}}'
NOW = time.time()


def spool_file(tmp_path: Path) -> Path:
    return tmp_path / "state" / FILENAME


def add(tmp_path: Path, rows: list[tuple[Any, ...]]) -> None:
    """Rows as the daemon writes them: (sink, failed_at, error, seq, received_at, type, origin,
    raw)."""
    path = spool_file(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    letters = DeadLetters(connect(path))
    try:
        letters.add_rows(rows)
    finally:
        letters.close()


def dead(sink: str, seq: int, raw: bytes = RAW_JOB, *, age: float = 60.0, type_: int = 4201,
         error: str = "") -> tuple[Any, ...]:
    return (sink, NOW - age, error or f"sink {sink}: POST to http://127.0.0.1:9 refused: "
            f"HTTP 400: no such customer {seq}", seq, 1733400000.25 + seq, type_, "stream", raw)


def remaining(tmp_path: Path, sink: str | None = None) -> list[int]:
    db = sqlite3.connect(spool_file(tmp_path))
    try:
        q = "SELECT id FROM dead_letters" + (" WHERE sink = ?" if sink else "") + " ORDER BY id"
        return [r[0] for r in db.execute(q, (sink,) if sink else ())]
    finally:
        db.close()


async def dlq(conf: Path, *args: str) -> tuple[int, bytes, str]:
    proc = await run_cli("dlq", args[0], "-c", str(conf), *args[1:], env=cli_env(TZ="UTC"))
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    text = err.decode()
    assert "Traceback" not in text, text
    return proc.returncode, out, text


def sinks_toml(tmp_path: Path, hook_url: str = "http://127.0.0.1:9/hook") -> str:
    return f"""
[sinks.archive]
type = "file"
path = "{tmp_path / 'archive.jsonl'}"
format = "event"
[sinks.hook]
type = "webhook"
url = "{hook_url}"
timeout = 5
"""


# --- list -----------------------------------------------------------------------------------------
async def test_list_table_with_summary_per_sink(tmp_path: Path) -> None:
    conf = write_config(tmp_path, URL, sinks_toml(tmp_path))
    add(tmp_path, [dead("hook", 1, age=3 * 86400), dead("hook", 2, RAW_LOGIN, type_=4103),
                   dead("archive", 3, RAW_NEW, type_=9999, error="sink archive: disk full"),
                   dead("hook", 4, age=30)])
    code, out, err = await dlq(conf, "list")
    assert code == 0, err
    lines = out.decode().splitlines()
    assert lines[0].split() == ["ID", "SINK", "FAILED", "AT", "TYPE", "ERROR"]
    rows = [ln.split(None, 5) for ln in lines[1:5]]
    assert [r[0] for r in rows] == ["1", "2", "3", "4"]
    assert [r[1] for r in rows] == ["hook", "hook", "archive", "hook"]
    # local time (TZ=UTC here), the type's name (the server's TypeString for an unknown type)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(NOW - 3 * 86400))
    assert f"{rows[0][2]} {rows[0][3]}" == when
    assert [r[4] for r in rows] == ["SEVT_JOB_COMPLETED", "SEVT_ACCOUNT_LOGIN",
                                    "SEVT_SOMETHING_NEW", "SEVT_JOB_COMPLETED"]
    # the error without the redundant "sink NAME:" prefix
    assert rows[0][5] == "POST to http://127.0.0.1:9 refused: HTTP 400: no such customer 1"
    assert rows[2][5] == "disk full"
    newest = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(NOW - 30))
    assert lines[5] == ""
    assert lines[6] == f"archive: 1 dead letter, oldest {_t(NOW - 60)}, newest {_t(NOW - 60)}"
    assert lines[7] == f"hook: 3 dead letters, oldest {when}, newest {newest}"
    assert len(lines) == 8

    code, out, err = await dlq(conf, "list", "--sink", "hook", "--limit", "2")
    assert code == 0, err
    lines = out.decode().splitlines()
    assert [ln.split()[0] for ln in lines[1:3]] == ["1", "2"]
    assert lines[4].startswith("hook: 3 dead letters")  # the summary counts them all
    assert lines[5] == "(showing the first 2 of 3; --limit)"


def _t(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


async def test_list_json_gives_the_event_bytes_back_exactly(tmp_path: Path) -> None:
    conf = write_config(tmp_path, URL, sinks_toml(tmp_path))
    add(tmp_path, [dead("hook", 1), dead("archive", 2, RAW_LOGIN, type_=4103), dead("hook", 3)])
    code, out, err = await dlq(conf, "list", "--json")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3
    for line, raw in zip(lines, [RAW_JOB, RAW_LOGIN, RAW_JOB], strict=True):
        assert line.endswith(b',"event":' + raw + b"}")  # spliced in, not re-serialized
    docs = [json.loads(line) for line in lines]  # the standard library keeps big integers
    assert list(docs[0]) == ["id", "sink", "failed_at", "error", "event"]
    assert [(d["id"], d["sink"]) for d in docs] == [(1, "hook"), (2, "archive"), (3, "hook")]
    assert docs[0]["event"]["Data"]["Size"] == BIG
    assert docs[0]["event"]["Actor"] == "café"
    assert docs[0]["error"].endswith("HTTP 400: no such customer 1")
    assert abs(docs[0]["failed_at"] - (NOW - 60)) < 0.01

    code, out, err = await dlq(conf, "list", "--json", "--sink", "hook", "--limit", "1")
    assert code == 0, err
    assert [json.loads(x)["id"] for x in out.splitlines()] == [1]


async def test_list_empty_missing_spool_and_unknown_sink(tmp_path: Path) -> None:
    conf = write_config(tmp_path, URL, sinks_toml(tmp_path))
    code, out, err = await dlq(conf, "list")
    assert code == 1
    assert err.strip() == (f"cometstream dlq: no ledger at {spool_file(tmp_path)}: the daemon "
                           "has not run with this state.dir")
    assert not spool_file(tmp_path).exists()  # looking does not create one

    add(tmp_path, [])
    code, out, err = await dlq(conf, "list")
    assert (code, out, err) == (0, b"no dead letters\n", "")
    code, out, err = await dlq(conf, "list", "--json")
    assert (code, out, err.strip()) == (0, b"", "no dead letters")

    code, out, err = await dlq(conf, "list", "--sink", "hoook")
    assert code == 2
    assert err.strip() == ('cometstream dlq: --sink: no sink named "hoook" '
                           "(configured: archive, hook)")
    # a sink removed from the config keeps its dead letters: they can still be listed
    add(tmp_path, [dead("old", 1)])
    code, out, err = await dlq(conf, "list", "--sink", "old")
    assert code == 0, err
    assert out.decode().splitlines()[1].split()[:2] == ["1", "old"]
    code, out, err = await dlq(conf, "list", "--sink", "nope")
    assert code == 2 and "with dead letters but no longer configured: old" in err

    bad = write_config(tmp_path, URL, "[sinks.x]\ntype = \"file\"\n")  # no path
    code, out, err = await dlq(bad, "list")
    assert code == 2 and "sinks.x" in err and len(err.strip().splitlines()) == 1


# --- replay ---------------------------------------------------------------------------------------
async def test_replay_into_a_file_sink(tmp_path: Path) -> None:
    conf = write_config(tmp_path, URL, sinks_toml(tmp_path))
    raws = [RAW_JOB.replace(b'"g-1"', f'"g-{i}"'.encode()) for i in range(250)]
    add(tmp_path, [dead("archive", i, raw) for i, raw in enumerate(raws, 1)])
    add(tmp_path, [dead("hook", 999)])  # another sink's: untouched
    out_file = tmp_path / "archive.jsonl"

    code, _, err = await dlq(conf, "replay", "--sink", "archive", "--dry-run")
    assert code == 0, err
    assert "would replay 250 dead letters (ids 1 to 250) to sink archive" in err
    assert not out_file.exists() and len(remaining(tmp_path, "archive")) == 250

    code, _, err = await dlq(conf, "replay", "--sink", "archive")  # three batches
    assert code == 0, err
    assert err.strip() == "replayed 250 dead letters to sink archive"
    assert out_file.read_bytes() == b"".join(raw + b"\n" for raw in raws)  # exactly, in order
    assert remaining(tmp_path, "archive") == []
    assert remaining(tmp_path) == [251]

    code, _, err = await dlq(conf, "replay", "--sink", "archive")
    assert (code, err.strip()) == (0, "no dead letters for sink archive")


async def test_replay_chosen_ids_and_usage_errors(tmp_path: Path) -> None:
    conf = write_config(tmp_path, URL, sinks_toml(tmp_path))
    add(tmp_path, [dead("archive", i) for i in range(1, 6)] + [dead("hook", 6), dead("gone", 7)])
    code, _, err = await dlq(conf, "replay", "--sink", "archive", "--id", "2", "--id", "4")
    assert code == 0, err
    assert len((tmp_path / "archive.jsonl").read_bytes().splitlines()) == 2
    assert remaining(tmp_path, "archive") == [1, 3, 5]

    # an id of another sink, or none at all: nothing is sent
    code, _, err = await dlq(conf, "replay", "--sink", "archive", "--id", "3", "6", "40")
    assert code == 2
    assert err.strip() == "cometstream dlq: --id: sink archive has no dead letter 6, 40"
    assert remaining(tmp_path, "archive") == [1, 3, 5]
    code, _, err = await dlq(conf, "replay", "--sink", "gone")
    assert code == 2
    assert err.strip() == ('cometstream dlq: --sink: no sink named "gone" (configured: '
                           "archive, hook; with dead letters but no longer configured: gone)")
    code, _, err = await dlq(conf, "replay")
    assert code == 2 and "--sink" in err


@pytest.fixture
async def receiver() -> AsyncIterator[dict[str, Any]]:
    """A webhook receiver on 127.0.0.1: answers ``state["plan"]`` statuses in order, then 200."""
    state: dict[str, Any] = {"plan": [], "bodies": [], "accepted": []}

    async def handle(request: web.Request) -> web.Response:
        if "handler" in state:
            return await state["handler"](request)  # type: ignore[no-any-return]
        body = await request.read()
        state["bodies"].append(body)
        status = state["plan"].pop(0) if state["plan"] else 200
        if status < 300:
            state["accepted"].append(body)
        return web.Response(status=status, text="customer unknown" if status >= 400 else "ok")

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state["url"] = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        yield state
    finally:
        await runner.cleanup()


async def test_replay_into_a_webhook_that_refuses_then_accepts(
        tmp_path: Path, receiver: dict[str, Any]) -> None:
    conf = write_config(tmp_path, URL, sinks_toml(tmp_path, receiver["url"]))
    raws = [RAW_JOB, RAW_LOGIN, RAW_NEW]
    add(tmp_path, [dead("hook", i, raw) for i, raw in enumerate(raws, 1)])

    receiver["plan"] = [400]  # still refused: the replay stops, every row stays
    code, _, err = await dlq(conf, "replay", "--sink", "hook")
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("cometstream dlq: replay to sink hook stopped: sink hook: POST to "
                          f"http://127.0.0.1:{receiver['url'].split(':')[2].split('/')[0]} "
                          "refused: HTTP 400: customer unknown; replayed 0, 3 remain")
    assert receiver["bodies"] == [RAW_JOB]
    assert remaining(tmp_path, "hook") == [1, 2, 3]

    receiver["plan"] = [200, 503]  # the first accepted, then a failure: only the first goes
    code, _, err = await dlq(conf, "replay", "--sink", "hook")
    assert code == 1
    assert "HTTP 503" in err and err.strip().endswith("replayed 1, 2 remain")
    assert remaining(tmp_path, "hook") == [2, 3]

    receiver["plan"] = []  # accepted: the rows go
    code, _, err = await dlq(conf, "replay", "--sink", "hook")
    assert code == 0, err
    assert err.strip() == "replayed 2 dead letters to sink hook"
    assert receiver["accepted"] == raws  # each event once, byte for byte, in order
    assert remaining(tmp_path, "hook") == []


async def test_replay_unreachable_sink_keeps_everything(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = write_config(tmp_path, URL, sinks_toml(tmp_path, f"http://127.0.0.1:{port}/hook"))
    add(tmp_path, [dead("hook", 1), dead("hook", 2)])
    code, _, err = await dlq(conf, "replay", "--sink", "hook")
    assert code == 1
    assert f"cannot connect to http://127.0.0.1:{port}" in err
    assert err.strip().endswith("replayed 0, 2 remain")
    assert remaining(tmp_path, "hook") == [1, 2]


async def test_a_second_replay_at_the_same_time_is_refused(tmp_path: Path) -> None:
    conf = write_config(tmp_path, URL, sinks_toml(tmp_path))
    add(tmp_path, [dead("archive", 1), dead("archive", 2)])
    lock = os.open(f"{spool_file(tmp_path)}.replay-lock", os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running replay holds it
        code, _, err = await dlq(conf, "replay", "--sink", "archive")
        assert code == 1
        assert err.strip() == ("cometstream dlq: another dlq replay is running on "
                               f"{spool_file(tmp_path)}")
    finally:
        os.close(lock)
    assert not (tmp_path / "archive.jsonl").exists()
    assert remaining(tmp_path) == [1, 2]
    code, _, err = await dlq(conf, "replay", "--sink", "archive")  # released: it runs
    assert code == 0, err


async def test_replay_waits_for_the_daemon_s_write_transaction(
        tmp_path: Path, receiver: dict[str, Any]) -> None:
    """Beside a running daemon: when the receiver has accepted a batch, the daemon's connection
    is in the middle of a write (it adds a dead letter of another sink); the replay's delete
    waits for it (busy timeout) instead of failing with "database is locked"."""
    conf = write_config(tmp_path, URL, sinks_toml(tmp_path, receiver["url"]))
    add(tmp_path, [dead("hook", 1), dead("hook", 2)])
    daemon_db = connect(spool_file(tmp_path))
    loop = asyncio.get_running_loop()
    held: list[float] = []

    def commit() -> None:
        daemon_db.execute("COMMIT")
        held.append(time.monotonic())

    async def accept_and_write(request: web.Request) -> web.Response:
        body = await request.read()
        receiver["accepted"].append(body)
        if not held:
            daemon_db.execute("BEGIN IMMEDIATE")
            daemon_db.execute(
                "INSERT INTO dead_letters (sink, failed_at, error, seq, received_at, type, "
                "origin, raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", dead("archive", 3))
            held.append(time.monotonic())
            loop.call_later(1.5, commit)
        return web.Response(text="ok")

    receiver["handler"] = accept_and_write
    try:
        code, _, err = await dlq(conf, "replay", "--sink", "hook")
        ended = time.monotonic()
    finally:
        if daemon_db.in_transaction:
            daemon_db.execute("ROLLBACK")
        daemon_db.close()
    assert code == 0, err
    assert err.strip() == "replayed 2 dead letters to sink hook"
    assert len(held) == 2 and held[1] <= ended  # it waited for the commit, and then ended
    assert receiver["accepted"] == [RAW_JOB, RAW_JOB]
    assert remaining(tmp_path, "hook") == []
    assert remaining(tmp_path, "archive") == [3]


async def test_with_the_daemon_running_refusals_are_listed_and_replayed(
        sim: Simulator, tmp_path: Path, receiver: dict[str, Any]) -> None:
    """End to end: the daemon (disk spool) dead-letters the events a webhook refuses with 400;
    while it keeps running, `dlq list --json` shows them byte for byte and `dlq replay` delivers
    them once the receiver accepts."""
    refusing = [True]
    keys: dict[bytes, list[str]] = {}

    async def refuse_bad(request: web.Request) -> web.Response:
        body = await request.read()
        keys.setdefault(body, []).append(request.headers["Idempotency-Key"])
        if refusing[0] and b'"bad-' in body:
            return web.Response(status=400, text="unknown customer")
        receiver["accepted"].append(body)
        return web.Response(text="ok")

    receiver["handler"] = refuse_bad
    hook = {"type": "webhook", "url": receiver["url"], "timeout": 5}
    # the server's name as write_config's file has it (the host): it is in Idempotency-Key
    cfg = make_config(sim.url, tmp_path, exact=True, sinks={"hook": hook},
                      server={"name": "127.0.0.1"})
    conf = write_config(tmp_path, sim.url, f"""
[sinks.hook]
type = "webhook"
url = "{receiver['url']}"
timeout = 5
""")
    async with running(cfg) as d:
        await wait_until(lambda: d.sink_stats("hook").delivered == 1, what="HELLO")
        sent = [sim.emit(_job(g)) for g in ("ok-1", "bad-1", "bad-2", "ok-2")]
        await wait_until(lambda: d.sink_stats("hook").delivered == 3
                         and d.sink_stats("hook").dropped["rejected"] == 2, what="outcomes")
        await wait_until(lambda: spool_file(tmp_path).exists() and len(remaining(tmp_path)) == 2,
                         what="dead letters in the spool")

        code, out, err = await dlq(conf, "list", "--json")
        assert code == 0, err
        letters = [json.loads(x) for x in out.splitlines()]
        assert [x["sink"] for x in letters] == ["hook", "hook"]
        assert "HTTP 400: unknown customer" in letters[0]["error"]
        assert [x.split(b',"event":', 1)[1][:-1] for x in out.splitlines()] == sent[1:3]

        refusing[0] = False
        code, _, err = await dlq(conf, "replay", "--sink", "hook")
        assert code == 0, err
        assert err.strip() == "replayed 2 dead letters to sink hook"
        code, out, err = await dlq(conf, "list")
        assert (code, out) == (0, b"no dead letters\n")
        await d.stopped()  # a clean stop: it raises otherwise
    got = [b for b in receiver["accepted"] if b'"Type":4000' not in b]
    # the replayed two, in their order, after the live ones (two jobs: sent side by side, in
    # either order)
    assert sorted(got[:2]) == sorted([sent[0], sent[3]]) and got[2:] == [sent[1], sent[2]]
    for body in sent[1:3]:  # refused, then replayed: a receiver can tell it is the same event
        assert len(keys[body]) == 2 and keys[body][0] == keys[body][1]


def _job(guid: str) -> dict[str, Any]:
    return {"Actor": "a", "Type": 4201, "Timestamp": 1733400000,
            "Data": {"GUID": guid, "Username": "alice", "Status": 5000, "EndTime": 1733400000}}


# --- purge ----------------------------------------------------------------------------------------
async def test_purge_asks_for_yes_and_filters(tmp_path: Path) -> None:
    conf = write_config(tmp_path, URL, sinks_toml(tmp_path))
    add(tmp_path, [dead("hook", 1, age=10 * 86400), dead("hook", 2, age=86400),
                   dead("archive", 3, age=8 * 86400), dead("archive", 4, age=60),
                   dead("hook", 5, age=30)])

    code, _, err = await dlq(conf, "purge", "--older-than", "7d")
    assert code == 2
    assert err.strip() == ("would delete 2 dead letters (archive: 1, hook: 1); "
                           "add --yes to delete them")
    assert remaining(tmp_path) == [1, 2, 3, 4, 5]

    code, _, err = await dlq(conf, "purge", "--older-than", "7d", "--yes")
    assert code == 0, err
    assert err.strip() == "deleted 2 dead letters (archive: 1, hook: 1)"
    assert remaining(tmp_path) == [2, 4, 5]

    code, _, err = await dlq(conf, "purge", "--sink", "hook", "--older-than", "12h", "--yes")
    assert (code, err.strip()) == (0, "deleted 1 dead letter (hook: 1)")
    assert remaining(tmp_path) == [4, 5]

    code, _, err = await dlq(conf, "purge", "--id", "5", "77", "--yes")
    assert (code, err.strip()) == (0, "deleted 1 dead letter (hook: 1) (no match for id 77)")
    assert remaining(tmp_path) == [4]

    code, _, err = await dlq(conf, "purge", "--older-than", "1d")
    assert (code, err.strip()) == (0, "no dead letters match")
    code, _, err = await dlq(conf, "purge", "--older-than", "a week")
    assert code == 2
    assert err.strip() == ('cometstream dlq: --older-than: expected a duration like 7d, 12h '
                           'or 30m, got "a week"')
    code, _, err = await dlq(conf, "purge", "--sink", "nope", "--yes")
    assert code == 2 and "configured: archive, hook" in err

    code, _, err = await dlq(conf, "purge", "--yes")  # everything
    assert (code, err.strip()) == (0, "deleted 1 dead letter (archive: 1)")
    assert remaining(tmp_path) == []


def test_parse_duration() -> None:
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("12h") == 12 * 3600
    assert parse_duration("30m") == 1800
    assert parse_duration("1d12h") == 36 * 3600
    assert parse_duration("1.5h") == 5400
    assert parse_duration("2W") == 14 * 86400
    for bad in ("", "7", "d", "7x", "7d 1h", "-1d", "1h7"):
        with pytest.raises(DlqError) as info:
            parse_duration(bad)
        assert info.value.usage  # exit 2


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
async def test_run_as_root_the_files_keep_the_daemon_s_owner(tmp_path: Path) -> None:
    """The daemon runs as its own user (DynamicUser=yes); `dlq` run by root must not leave it
    root-owned files beside its spool (SQLite gives -wal/-shm the database's owner itself; the
    replay lock is ours)."""
    conf = write_config(tmp_path, URL, sinks_toml(tmp_path))
    add(tmp_path, [dead("archive", 1)])
    path = spool_file(tmp_path)
    os.chown(path, 65534, 65534)
    other = connect(path)  # keeps the side files after the command has exited
    try:
        code, _, err = await dlq(conf, "replay", "--sink", "archive")
        assert code == 0, err
        for suffix in ("-wal", "-shm", ".replay-lock"):
            st = Path(f"{path}{suffix}").stat()
            assert (st.st_uid, st.st_gid) == (65534, 65534), suffix
    finally:
        other.close()


async def test_dlq_needs_no_password(tmp_path: Path) -> None:
    """Like tap, dlq runs where the password is a credential of the unit: a config whose password
    is not there (no key, no file, no environment) still lists the dead letters."""
    conf = write_config(tmp_path, URL, sinks_toml(tmp_path))
    text = conf.read_text()
    conf.write_text("\n".join(line for line in text.splitlines()
                              if not line.startswith("password")))
    add(tmp_path, [dead("hook", 1)])
    code, out, err = await dlq(conf, "list")
    assert code == 0, err
    assert out.decode().splitlines()[1].split()[:2] == ["1", "hook"]
