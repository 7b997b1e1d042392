"""The delivery state in the ledger: ``meta`` (watermark, server start hash, whether the accounts
have a baseline, the server's name), ``dedup`` (the de-duplication window: one row per commit
that kept job events, their keys' 64-bit fingerprints and timestamps as two little-endian int64
arrays, with the row's newest timestamp and count), ``running_jobs``, ``accounts`` (digest and
CreationGUID per username) and ``devices`` (device ID to owner).

Each commit writes only what changed since the last one: the keys kept since (inserted), the
keys that left the window (deleted by age, or oldest first beyond its size), and the changed
jobs, accounts and devices. Nothing is rewritten whole: the write rate follows the event rate,
not the size of the window.
"""

from __future__ import annotations

import sqlite3
import sys
from array import array
from collections.abc import Sequence
from typing import Any, Final

from ..errors import LedgerCorrupt
from .codec import column
from .schema import upsert_meta
from .state import State, StateDiff

__all__ = ["StateRows", "load_state", "write_state"]

#: keys beyond the window's size the ``dedup`` rows may hold before the oldest row is deleted
#: (a row goes whole; a key kept twice is in two rows until the older goes)
_DEDUP_SLACK: Final = 2048
#: keys per ``dedup`` row at most (a migrated window is written in rows of this size)
_DEDUP_ROW: Final = 8192


def load_state(db: sqlite3.Connection) -> State:
    """The delivery state in a ledger; LedgerCorrupt if an entry is not what it should be."""
    meta = dict(db.execute("SELECT key, value FROM meta"))
    st = State()
    try:
        st.watermark = int(meta.get("watermark", "0"))
        st.server_start_hash = str(meta.get("server_start_hash", ""))
        st.accounts_baseline = meta.get("accounts_baseline", "0") == "1"
        for fps_b, stamps_b in db.execute("SELECT fps, stamps FROM dedup ORDER BY id"):
            if not (type(fps_b) is bytes and type(stamps_b) is bytes
                    and len(fps_b) == len(stamps_b) and not len(fps_b) % 8):
                raise LedgerCorrupt("dedup: a row's arrays are not int64 arrays of one length")
            st.dedup.extend(zip(column("q", fps_b), column("q", stamps_b), strict=True))
        for guid, user, start in db.execute("SELECT guid, username, start FROM running_jobs"):
            if type(start) is not int:
                raise LedgerCorrupt(f"running_jobs.{guid}: expected a start time")
            st.running_jobs[guid] = [user, start]
        for name, digest, creation in db.execute(
                "SELECT username, digest, creation_guid FROM accounts"):
            st.accounts[name] = [digest, creation]
        st.devices = dict(db.execute("SELECT id, owner FROM devices"))
    except ValueError as exc:
        raise LedgerCorrupt(f"meta: {exc}") from None
    return st


def write_state(db: sqlite3.Connection, st: State) -> None:
    """A whole state (a migrated checkpoint), within the caller's transaction."""
    upsert_meta(db, _meta(st.watermark, st.server_start_hash, st.accounts_baseline))
    for i in range(0, len(st.dedup), _DEDUP_ROW):
        _insert_keys(db, st.dedup[i:i + _DEDUP_ROW])
    _put_rows(db, "running_jobs", "guid", "username, start", dict(st.running_jobs))
    _put_rows(db, "accounts", "username", "digest, creation_guid", dict(st.accounts))
    _put_rows(db, "devices", "id", "owner", dict(st.devices))


class StateRows:
    """What the ledger's state tables hold, as far as commits need to know it without reading
    them: the keys in the ``dedup`` rows, and the meta and dedup horizon as last committed (an
    idle commit is skipped)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        #: keys in the ``dedup`` rows (a key kept twice counts twice)
        self.dedup_rows: int = db.execute(
            "SELECT coalesce(sum(count), 0) FROM dedup").fetchone()[0]
        self._meta_written: tuple[Any, ...] = ()
        self._horizon_written = 0

    def unchanged(self, diff: StateDiff) -> bool:
        return (not diff.dedup and not diff.running_jobs and not diff.accounts
                and not diff.devices and diff.horizon <= self._horizon_written
                and (diff.watermark, diff.server_start_hash, diff.accounts_baseline)
                == self._meta_written)

    def write(self, db: sqlite3.Connection, diff: StateDiff) -> int:
        """The state's changes, within the commit's transaction (only what changed); returns
        the keys the ``dedup`` rows hold then (:meth:`committed` takes it once committed)."""
        upsert_meta(db, _meta(diff.watermark, diff.server_start_hash, diff.accounts_baseline))
        keys = self.dedup_rows
        if diff.dedup:
            _insert_keys(db, diff.dedup)
            keys += len(diff.dedup)
        if diff.horizon > 0:  # rows whose every key left the window by age
            gone = db.execute("SELECT coalesce(sum(count), 0) FROM dedup WHERE newest < ?",
                              (diff.horizon,)).fetchone()[0]
            if gone:
                db.execute("DELETE FROM dedup WHERE newest < ?", (diff.horizon,))
                keys -= gone
        if keys > diff.max_size + _DEDUP_SLACK:  # the oldest rows, beyond the window's size
            drop = []
            for row_id, count in db.execute("SELECT id, count FROM dedup ORDER BY id"):
                if keys - count < diff.max_size:
                    break
                drop.append((row_id,))
                keys -= count
            db.executemany("DELETE FROM dedup WHERE id = ?", drop)
        if diff.running_jobs:
            _put_rows(db, "running_jobs", "guid", "username, start", diff.running_jobs)
        if diff.accounts:
            _put_rows(db, "accounts", "username", "digest, creation_guid", diff.accounts)
        if diff.devices:
            _put_rows(db, "devices", "id", "owner", diff.devices)
        return keys

    def committed(self, diff: StateDiff | None, keys: int) -> None:
        """The transaction that wrote ``diff`` (None: no state in it) committed."""
        self.dedup_rows = keys
        if diff is not None:
            self._meta_written = (diff.watermark, diff.server_start_hash, diff.accounts_baseline)
            self._horizon_written = max(self._horizon_written, diff.horizon)


def _meta(watermark: int, server_start_hash: str, accounts_baseline: bool) -> dict[str, str]:
    return {"watermark": str(watermark), "server_start_hash": server_start_hash,
            "accounts_baseline": "1" if accounts_baseline else "0"}


def _insert_keys(db: sqlite3.Connection, keys: Sequence[tuple[int, int]]) -> None:
    """One ``dedup`` row: the keys' fingerprints and timestamps as two int64 arrays."""
    fps = array("q", [fp for fp, _ts in keys])
    stamps = array("q", [ts for _fp, ts in keys])
    newest = max(stamps)
    if sys.byteorder != "little":
        fps.byteswap()
        stamps.byteswap()
    db.execute("INSERT INTO dedup (newest, count, fps, stamps) VALUES (?, ?, ?, ?)",
               (newest, len(keys), fps.tobytes(), stamps.tobytes()))


def _put_rows(db: sqlite3.Connection, table: str, key: str, columns: str,
              rows: dict[str, Any]) -> None:
    """Upsert the entries of ``rows`` (key -> values) and delete those whose value is None."""
    gone = [(k,) for k, v in rows.items() if v is None]
    if gone:
        db.executemany(f"DELETE FROM {table} WHERE {key} = ?", gone)
    put = [(k, *v) if isinstance(v, (list, tuple)) else (k, v)
           for k, v in rows.items() if v is not None]
    if put:
        marks = ", ".join("?" * (1 + columns.count(",") + 1))
        db.executemany(f"INSERT OR REPLACE INTO {table} ({key}, {columns}) VALUES ({marks})", put)
