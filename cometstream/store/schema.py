"""The ledger's tables, opening a ledger file, its format upgrades and moving a damaged one aside.

Opening runs ``PRAGMA quick_check`` (SQLite detects a damaged file at start); WAL lets the
writer append while a lagging sink or a tool reads; ``synchronous=FULL``: one fsync per commit.
A file that is damaged is told apart from one that is merely locked, unreadable or on a full
disk: only the first may be moved aside (the second's window and lagging events would be lost).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import structlog

from ..errors import LedgerCorrupt, LedgerError
from .statedir import create_or_check

__all__ = ["FILENAME", "FORMAT_VERSION", "SCHEMA", "STATE_SCHEMA", "connect", "format_of",
           "quarantine", "rollback", "transaction", "upgrade", "upsert_meta"]

FILENAME: Final = "ledger.db"
#: 1: chunks; 2: chunks.keys; 3: the ledger (cursors.position, the delivery state tables)
FORMAT_VERSION: Final = 3

log = structlog.get_logger("cometstream.ledger")

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL, newest REAL NOT NULL,
    count INTEGER NOT NULL, bytes INTEGER NOT NULL,
    seqs BLOB NOT NULL, received BLOB NOT NULL, types BLOB NOT NULL, origins BLOB NOT NULL,
    raws BLOB NOT NULL, keys BLOB);
CREATE TABLE IF NOT EXISTS cursors (sink TEXT PRIMARY KEY, seq INTEGER NOT NULL, position TEXT);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY, sink TEXT NOT NULL, failed_at REAL NOT NULL, error TEXT NOT NULL,
    seq INTEGER NOT NULL, received_at REAL NOT NULL, type INTEGER NOT NULL,
    origin TEXT NOT NULL, raw BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS dead_letters_sink ON dead_letters (sink, id);
"""
STATE_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS dedup (
    id INTEGER PRIMARY KEY, newest INTEGER NOT NULL, count INTEGER NOT NULL,
    fps BLOB NOT NULL, stamps BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS dedup_newest ON dedup (newest);
CREATE TABLE IF NOT EXISTS running_jobs (
    guid TEXT PRIMARY KEY, username TEXT NOT NULL, start INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (
    username TEXT PRIMARY KEY, digest TEXT NOT NULL, creation_guid TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, owner TEXT NOT NULL);
"""

#: what SQLite says of a file that is damaged (not of one that is locked or unreadable)
_DAMAGED: Final = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_CORRUPT_INDEX",
                             "SQLITE_CORRUPT_SEQUENCE", "SQLITE_CORRUPT_VTAB"})


def connect(path: Path, *, check: bool = True, upgrade: bool = False) -> sqlite3.Connection:
    """Open (creating if needed) a ledger database; raises LedgerCorrupt if it is damaged.
    ``check``: run the integrity check (the daemon at start; tools may skip it).
    ``upgrade``: bring a database of an older format to this one (the daemon only: a tool run
    beside an older daemon must not change the tables under it)."""
    create_or_check(path)
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot open {path}: {exc}") from exc
    try:
        _prepare(db, check=check, upgrading=upgrade)
    except LedgerError as exc:  # (a newer version's ledger)
        db.close()
        raise LedgerError(f"{path}: {exc}") from None
    except sqlite3.DatabaseError as exc:
        db.close()
        if getattr(exc, "sqlite_errorname", "") in _DAMAGED:
            raise LedgerCorrupt(str(exc)) from exc
        # locked by another process, unreadable, a full disk: the file is not damaged, and
        # must not be moved aside (its window and lagging events would be lost)
        raise LedgerError(f"cannot open {path}: {exc}") from exc
    except LedgerCorrupt:
        db.close()
        raise
    return db


def _prepare(db: sqlite3.Connection, *, check: bool, upgrading: bool) -> None:
    if db.execute("PRAGMA page_count").fetchone()[0] == 0:  # a new file (the pragma
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")     # needs the write lock)
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        raise LedgerCorrupt(f"cannot use WAL mode (journal_mode is {mode})")
    db.execute("PRAGMA synchronous = FULL")
    if check:
        verdict = db.execute("PRAGMA quick_check").fetchone()[0]
        if verdict != "ok":
            raise LedgerCorrupt(f"integrity check failed: {verdict}")
    # a ledger a newer version wrote (a rollback after an upgrade) is not damage: it holds the
    # gap's state and the lagging sinks' events. Nothing is written to it, nothing moved aside.
    has_meta = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
                          ).fetchone() is not None
    existing = format_of(db) if has_meta else ""
    if existing.isdigit() and int(existing) > FORMAT_VERSION:
        raise LedgerError(f"written by a newer cometstream (format {existing}; this version reads "
                     f"format {FORMAT_VERSION} and older): run that version again, or move "
                     "the file aside to start with an empty ledger")
    db.executescript(SCHEMA)
    # (OR IGNORE: another process may create the same new file at the same moment)
    db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (str(FORMAT_VERSION),))
    if upgrading and format_of(db) in ("1", "2"):
        transaction(db, lambda: upgrade(db))
    if upgrading:
        db.executescript(STATE_SCHEMA)
    found = format_of(db)
    if found != str(FORMAT_VERSION) and not (found in ("1", "2") and not upgrading):
        raise LedgerCorrupt(f"format {found}, this cometstream reads {FORMAT_VERSION}")


def format_of(db: sqlite3.Connection) -> str:
    row = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
    return str(row[0]) if row is not None else ""


def upgrade(db: sqlite3.Connection) -> None:
    """Format 1 → 2 → 3 (``chunks.keys``; ``cursors.position`` and the state tables). Runs under
    the write lock, and checks again what it finds there."""
    found = format_of(db)
    if found not in ("1", "2"):
        return
    if "keys" not in {row[1] for row in db.execute("PRAGMA table_info(chunks)")}:
        db.execute("ALTER TABLE chunks ADD COLUMN keys BLOB")
    if "position" not in {row[1] for row in db.execute("PRAGMA table_info(cursors)")}:
        db.execute("ALTER TABLE cursors ADD COLUMN position TEXT")
    db.execute("UPDATE meta SET value = ? WHERE key = 'format'", (str(FORMAT_VERSION),))


def transaction(db: sqlite3.Connection, fn: Callable[[], Any]) -> Any:
    """``fn()`` in one write transaction (rolled back if it raises)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        out = fn()
        db.execute("COMMIT")
    except BaseException:
        rollback(db)
        raise
    return out


def rollback(db: sqlite3.Connection) -> None:
    """Roll back what a failed statement left open. SQLite may already have rolled back (a full
    disk: SQLITE_FULL ends the transaction); a ROLLBACK then raises ``cannot rollback - no
    transaction is active``, which must not replace the real error."""
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


def upsert_meta(db: sqlite3.Connection, items: dict[str, str]) -> None:
    db.executemany("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                   "SET value = excluded.value", list(items.items()))


def quarantine(path: Path, why: str, label: str = "corrupt") -> Path | None:
    """Move a damaged ledger (and its WAL) aside; returns where it went."""
    stamp = int(time.time())
    target = path.with_name(f"{path.name}.{label}-{stamp}")
    moved = None
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{path}{suffix}")
        if os.path.lexists(src):  # (a symbolic link is moved, never followed)
            try:
                os.replace(src, Path(f"{target}{suffix}"))
                if not suffix:
                    moved = target
            except OSError as exc:
                log.error("cannot move the damaged file aside", path=str(src),
                          error=exc.strerror or str(exc))
    log.error(f"{path.name} {'damaged' if label == 'corrupt' else 'not ours'}: moved aside, "
              "starting with an empty one (events in it that some sink had not yet received "
              "are lost for it; remedial sync recovers the jobs)",
              reason=why, moved_to=str(moved) if moved else None)
    return moved
