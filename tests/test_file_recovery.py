"""A file sink across a crash, end to end: `cometstream run` as a real process, killed with
SIGKILL after the ledger committed the file's position and before it committed the lines written
since, then started again. The lines past the committed position are read back and recognised
when their events come again (here from the remedial sync): nothing is written twice.

The ledger commits only when kicked (``fsync_interval`` at its 60 s maximum; the first sync
kicks a commit), so where the kill falls relative to the last commit is not a matter of timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from cometstream.simulator import Simulator

from .conftest import cli_env, wait_until, write_config

COMPLETED = 4201


def _log_events(path: Path) -> list[str]:
    """The ``event`` of each JSON log line of a run."""
    out = []
    for line in path.read_bytes().splitlines() if path.exists() else []:
        with contextlib.suppress(orjson.JSONDecodeError):
            doc = orjson.loads(line)
            if isinstance(doc, dict):
                out.append(str(doc.get("event")))
    return out


def _log_file(path: Path) -> Any:
    return open(path, "wb")  # (closed by the caller's with)


async def _start(conf: Path, log: Path) -> asyncio.subprocess.Process:
    # the output goes to a file: a pipe nobody reads would fill up and stall the daemon
    with _log_file(log) as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cometstream", "run", "-c", str(conf),
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
            env=cli_env())


def _committed_position(state: Path, sink: str) -> list[int] | None:
    """The file position the ledger committed with ``sink``'s cursor (read-only, as an
    operator's tool would, beside a running daemon); None before the first commit."""
    try:
        db = sqlite3.connect(f"file:{state / 'ledger.db'}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        row = db.execute("SELECT position FROM cursors WHERE sink = ?", (sink,)).fetchone()
    except sqlite3.Error:
        return None
    finally:
        db.close()
    if row is None or row[0] is None:
        return None
    pos = orjson.loads(row[0])
    return pos if isinstance(pos, list) else None


def _completions(data: bytes, *, strict: bool = True) -> list[tuple[str, int]]:
    """(GUID, EndTime) of each job completion line of an ``event``-format file (not
    ``strict``: a line being written is skipped)."""
    out = []
    for line in data.splitlines():
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            if strict:
                raise
            continue
        if doc.get("Type") == COMPLETED:
            out.append((doc["Data"]["GUID"], doc["Data"]["EndTime"]))
    return out


async def test_sigkill_after_a_commit_then_restart_writes_no_line_twice(
        sim: Simulator, tmp_path: Path) -> None:
    """Jobs complete live after the ledger's first commit; the daemon is killed before the next
    one, so their lines lie past the committed position and their keys were never committed.
    At the restart the remedial sync brings the completions again: the file sink recognises
    them (the position the ledger committed is where it reads back from) and writes none of them
    a second time; a job completed after the restart is written once."""
    path = tmp_path / "events.jsonl"
    state = tmp_path / "state"
    conf = write_config(tmp_path, sim.url, f"""
[log]
format = "json"
[spool]
fsync_interval = 60.0
[sinks.f]
type = "file"
path = "{path}"
format = "event"
""")
    conf.chmod(0o600)  # (it holds the password)
    logs = [tmp_path / "run-1.log", tmp_path / "run-2.log"]
    proc = await _start(conf, logs[0])
    try:
        await wait_until(lambda: _committed_position(state, "f") is not None, timeout=15,
                         what="the first commit (kicked by the baseline sync)")
        jobs = []
        for _ in range(10):
            start = sim.world.start_job()
            sim.emit(start)
            done = sim.world.complete_job(start["Data"]["GUID"])
            sim.emit(done)
            jobs.append((done["Data"]["GUID"], done["Data"]["EndTime"]))
        await wait_until(lambda: set(jobs) <= set(_completions(path.read_bytes(), strict=False)),
                         timeout=15, what="the live completions in the file")
        proc.send_signal(signal.SIGKILL)
        await proc.wait()

        # the scenario holds: the live lines lie past the position committed with the cursor
        committed = _committed_position(state, "f")
        assert committed is not None
        ino, offset = committed
        data = path.read_bytes()
        assert path.stat().st_ino == ino and offset < len(data)
        assert set(jobs) <= set(_completions(data[offset:]))
        assert not set(jobs) & set(_completions(data[:offset]))

        proc = await _start(conf, logs[1])
        await wait_until(lambda: "resync done" in _log_events(logs[1]), timeout=15,
                         what="the restart's remedial sync")
        marker = sim.world.start_job()
        done = sim.world.complete_job(marker["Data"]["GUID"])
        sim.emit(done)
        marker_key = (done["Data"]["GUID"], done["Data"]["EndTime"])
        # the file sink writes in order: once the marker is in, what the sync published is too
        await wait_until(lambda: marker_key in _completions(path.read_bytes(), strict=False),
                         timeout=15, what="the marker completion in the file")
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)
        assert proc.returncode == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    events = _log_events(logs[1])
    counts = Counter(_completions(path.read_bytes()))
    twice = sorted(k for k, n in counts.items() if n > 1)
    assert not twice, f"written twice after the restart: {twice}"
    assert set(jobs) | {marker_key} <= set(counts)
    # the sync did bring them again (the recovery had something to recognise)
    assert "file sink: lines written after the last commit will not be written again" in events
    assert any(e.startswith("file sink recovery over") for e in events)
