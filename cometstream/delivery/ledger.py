"""The ledger: one SQLite database (``ledger.db`` in ``state.dir``) holding everything delivery
depends on, written by one writer in one transaction per commit, so that what it says was
received, delivered, de-duplicated and tracked is always one consistent moment.

Tables:

- ``chunks``: the spooled events in the pipeline's order (``[spool] buffer = "disk"``), up to 256
  a row (``seq``, ``received_at``, ``type`` and ``origin`` as parallel arrays, the events' bytes
  joined by newlines, and their dedup keys as a JSON list): one row per 256 events keeps a
  burst's commit cheap;
- ``cursors``: per sink, the highest ``seq`` it is done with (delivered, filtered or refused),
  and where the sink's output stood then (a file sink: its file's inode and byte offset);
- ``dead_letters``: per sink, the events it refused for good, with the reason
  (``cometstream dlq list|replay|purge``);
- the delivery state: ``meta`` (watermark, server start hash, whether the accounts have a
  baseline, the server's name), ``dedup`` (the de-duplication window: one row per commit that
  kept job events, their keys' 64-bit fingerprints and timestamps as two little-endian int64
  arrays, with the row's newest timestamp and count), ``running_jobs``, ``accounts`` (digest and
  CreationGUID per username) and ``devices`` (device ID to owner).

Each commit writes only what changed since the last one: the new events some sink still needs
(an event every sink already has is never written), the moved cursors, the keys kept since
(inserted), the keys that left the window (deleted by age, or oldest first beyond its size),
and the changed jobs, accounts and devices. Nothing is rewritten whole: the write rate follows
the event rate, not the size of the window.

The read loop never waits for the disk: :attr:`Ledger.pending` holds what was published and not
yet committed, and a writer thread commits every ``fsync_interval`` (``synchronous=FULL``: one
fsync per commit). Everything the database does runs on that one thread, in order: commits,
reads of a lagging sink, trims and dead letters. What is pending is served from memory.

Why SQLite: transactions give torn-write safety for free, WAL lets the writer append while a
lagging sink reads, ``PRAGMA quick_check`` detects a damaged file at start, and it needs no
dependency.

Limits: beyond ``max_bytes`` (the events' bytes) or ``max_age`` the oldest events are deleted
even if a sink has not read them; each lagging sink's loss is counted (reason ``spool_limit``)
and logged.

A ledger that cannot be opened or fails its integrity check is moved aside
(``ledger.db.corrupt-<time>``), reported, and replaced by an empty one. The files of earlier
versions (``spool.db`` and ``checkpoint.json``) are migrated into a new ledger at the first
start; if that fails, they are left as they were and the daemon says so and exits.

:class:`StateLock` keeps a second daemon off the same ``state.dir``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import sqlite3
import stat
import sys
import tempfile
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Final

import orjson
import structlog

from .._thread import WriterThread
from ..events import Event
from .legacy import read_checkpoint
from .state import State, StateDiff

__all__ = ["FILENAME", "FORMAT_VERSION", "DeadLetter", "Ledger", "LedgerCorrupt", "LedgerError",
           "State", "StateDiff", "StateLock", "connect"]

FILENAME: Final = "ledger.db"
#: the files of versions before the ledger, migrated into it at the first start
LEGACY_SPOOL: Final = "spool.db"
LEGACY_CHECKPOINT: Final = "checkpoint.json"
LOCK_FILE: Final = "daemon.lock"
#: 1: chunks; 2: chunks.keys; 3: the ledger (cursors.position, the delivery state tables)
FORMAT_VERSION: Final = 3
#: events committed per transaction at most (a burst is written in pieces of this size)
_COMMIT_MAX: Final = 20_000
#: events waiting in memory for the disk beyond which the read loop waits for a commit. Kept
#: low: the writer thread competes with the busy event loop for the GIL, and while it falls
#: behind, every waiting event holds memory and the watermark.
PENDING_MAX: Final = 6_144
#: the same bound in bytes (the events' bytes): 6,144 events of 256 KiB would be 1.5 GB
PENDING_MAX_BYTES: Final = 64 * 1024 * 1024
#: events waiting in memory at which a commit starts before the interval is over
COMMIT_SOON: Final = 2048
#: ... or their bytes
COMMIT_SOON_BYTES: Final = 16 * 1024 * 1024
#: bytes committed per transaction at most (with ``_COMMIT_MAX``)
_COMMIT_MAX_BYTES: Final = 32 * 1024 * 1024
#: events per chunk (one row): the granularity of the limits, and of reads from disk
_RANGE: Final = 256
#: a chunk's events' bytes at most (a chunk of large events holds fewer than ``_RANGE``)
_RANGE_BYTES: Final = 4 * 1024 * 1024
#: bytes one read from disk hands a lagging sink at most (at least one event)
READ_MAX_BYTES: Final = 16 * 1024 * 1024
#: keys beyond the window's size the ``dedup`` rows may hold before the oldest row is deleted
#: (a row goes whole; a key kept twice is in two rows until the older goes)
_DEDUP_SLACK: Final = 2048
#: keys per ``dedup`` row at most (a migrated window is written in rows of this size)
_DEDUP_ROW: Final = 8192
log = structlog.get_logger("cometstream.ledger")

_SCHEMA: Final = """
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
_STATE_SCHEMA: Final = """
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
#: origins as one byte each in a chunk
_ORIGIN_CODE: Final = {"stream": 0, "resync": 1, "backfill": 2}
_ORIGINS: Final = ("stream", "resync", "backfill")


class LedgerCorrupt(Exception):
    pass


class LedgerError(Exception):
    """The ledger cannot be used (a failed migration, a state dir in use): the daemon stops."""


#: where a sink's output stood at its cursor (a file sink: [inode, offset]), or None
Position = list[Any] | None


def _pack(events: Sequence[Event]) -> tuple[Any, ...]:
    """One chunk row: parallel little-endian arrays, and the events' bytes joined by newlines
    (an event's bytes never hold a line break: the stream folds them)."""
    seqs = array("q", [ev.seq for ev in events])
    received = array("d", [ev.received_at for ev in events])
    types = array("q", [ev.type for ev in events])
    origins = bytes([_ORIGIN_CODE.get(ev.origin, 0) for ev in events])
    if sys.byteorder != "little":
        for a in (seqs, received, types):
            a.byteswap()
    raws = b"\n".join([ev.raw for ev in events])
    # the dedup keys the pipeline computed (a sink that reads the chunk back, e.g. the webhook's
    # Idempotency-Key, then need not parse every job event again)
    keys = [ev.key for ev in events]
    try:
        keys_b = orjson.dumps(keys) if any(keys) else None
    except TypeError:  # a GUID with a lone surrogate (from the stdlib parser): not kept
        keys_b = None
    return (events[0].seq, events[-1].seq, events[-1].received_at, len(events), len(raws),
            seqs.tobytes(), received.tobytes(), types.tobytes(), origins, raws, keys_b)


def _column(code: str, blob: bytes) -> array[Any]:
    """A chunk's array column (little-endian on disk) as a native array."""
    a = array(code, blob)
    if sys.byteorder != "little":
        a.byteswap()
    return a


def _unpack(seqs_b: bytes, received_b: bytes, types_b: bytes, origins: bytes, raws: bytes,
            keys_b: bytes | None) -> list[tuple[int, float, int, str, bytes, str | None]]:
    seqs, received, types = _column("q", seqs_b), _column("d", received_b), _column("q", types_b)
    lines = raws.split(b"\n")
    try:
        keys = orjson.loads(keys_b) if keys_b else [None] * len(lines)
    except orjson.JSONDecodeError:
        raise LedgerCorrupt("a chunk's dedup keys are not JSON") from None
    if type(keys) is not list:
        raise LedgerCorrupt("a chunk's dedup keys are not a list")
    if not (len(seqs) == len(received) == len(types) == len(origins) == len(lines) == len(keys)):
        raise LedgerCorrupt("a chunk's columns differ in length")
    return [(seqs[i], received[i], types[i], _ORIGINS[origins[i]] if origins[i] < 3 else
             "stream", lines[i], keys[i] if type(keys[i]) is str else None)
            for i in range(len(seqs))]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    sink: str
    failed_at: float
    error: str
    seq: int
    received_at: float
    type: int
    origin: str
    raw: bytes


def connect(path: Path, *, check: bool = True, upgrade: bool = False) -> sqlite3.Connection:
    """Open (creating if needed) a ledger database; raises LedgerCorrupt if it is damaged.
    ``check``: run the integrity check (the daemon at start; tools may skip it).
    ``upgrade``: bring a database of an older format to this one (the daemon only: a tool run
    beside an older daemon must not change the tables under it)."""
    _create_or_check(path)
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot open {path}: {exc}") from exc
    try:
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
        db.executescript(_SCHEMA)
        # (OR IGNORE: another process may create the same new file at the same moment)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (str(FORMAT_VERSION),))
        if upgrade and _format(db) in ("1", "2"):
            _transaction(db, lambda: _upgrade(db))
        if upgrade:
            db.executescript(_STATE_SCHEMA)
        found = _format(db)
        if found != str(FORMAT_VERSION) and not (found in ("1", "2") and not upgrade):
            raise LedgerCorrupt(f"format {found}, this cometstream reads {FORMAT_VERSION}")
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


#: what SQLite says of a file that is damaged (not of one that is locked or unreadable)
_DAMAGED: Final = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_CORRUPT_INDEX",
                             "SQLITE_CORRUPT_SEQUENCE", "SQLITE_CORRUPT_VTAB"})


#: the mode of every file in ``state.dir`` (the config has no group for them: owner only)
FILE_MODE: Final = 0o600


def _create_or_check(path: Path) -> bool:
    """Create ``path`` private (0600, whatever the umask: it holds usernames and dead letters;
    SQLite gives ``-wal`` and ``-shm`` the same mode), or check the file that is there: a
    symbolic link is not followed, and a file that exists with 0 bytes is damaged (a ledger this
    code created is never empty: its first statements write the header). LedgerCorrupt if not
    usable. True if it was created here."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     FILE_MODE)
    except FileExistsError:
        pass
    else:
        os.close(fd)
        return True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LedgerCorrupt("it is a symbolic link (not followed)") from None
        raise LedgerCorrupt(exc.strerror or str(exc)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LedgerCorrupt("it is not a regular file")
        if st.st_size == 0:
            raise LedgerCorrupt("the file is empty (0 bytes)")
        _tighten(fd, st)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        side = f"{path}{suffix}"
        with contextlib.suppress(OSError):
            if stat.S_ISLNK(os.lstat(side).st_mode):
                # SQLite refuses to open a database whose -wal or -shm is a link: a link planted
                # there is moved aside (renaming moves the link, never what it points to)
                aside = f"{side}.link-{int(time.time())}"
                os.rename(side, aside)
                log.warning("a symbolic link in the state dir was moved aside (not followed)",
                            path=side, moved_to=aside)
                continue
        with contextlib.suppress(OSError):
            fd = os.open(side, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                _tighten(fd, os.fstat(fd))
            finally:
                os.close(fd)
    return False


def _tighten(fd: int, st: os.stat_result) -> None:
    """A file of ours readable by others (restored from a backup, an earlier version's) is
    made private; one of another user is left as it is (``check_state_dir`` warns)."""
    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077 and st.st_uid == os.geteuid():
        with contextlib.suppress(OSError):
            os.fchmod(fd, FILE_MODE)


def check_state_dir(directory: Path) -> list[str]:
    """Warnings about ``state.dir`` (logged at start): writable by others, or owned by another
    user (who could then replace the ledger, or plant a symbolic link where a file goes)."""
    try:
        st = os.stat(directory)
    except OSError:
        return []
    problems = []
    if st.st_mode & 0o022:
        who = "everyone" if st.st_mode & 0o002 else "its group"
        problems.append(f"{directory} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}): "
                        "another user could replace or redirect the daemon's files; use 0700 "
                        "or 0750")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        problems.append(f"{directory} is owned by uid {st.st_uid}, not by this process "
                        f"(uid {os.geteuid()}): that user can replace the daemon's files")
    for text in problems:
        log.warning("state.dir is not private", problem=text)
    return problems


def _rollback(db: sqlite3.Connection) -> None:
    """Roll back what a failed statement left open. SQLite may already have rolled back (a full
    disk: SQLITE_FULL ends the transaction); a ROLLBACK then raises ``cannot rollback - no
    transaction is active``, which must not replace the real error."""
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


def _format(db: sqlite3.Connection) -> str:
    row = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
    return str(row[0]) if row is not None else ""


def _upgrade(db: sqlite3.Connection) -> None:
    """Format 1 → 2 → 3 (``chunks.keys``; ``cursors.position`` and the state tables). Runs under
    the write lock, and checks again what it finds there."""
    found = _format(db)
    if found not in ("1", "2"):
        return
    if "keys" not in {row[1] for row in db.execute("PRAGMA table_info(chunks)")}:
        db.execute("ALTER TABLE chunks ADD COLUMN keys BLOB")
    if "position" not in {row[1] for row in db.execute("PRAGMA table_info(cursors)")}:
        db.execute("ALTER TABLE cursors ADD COLUMN position TEXT")
    db.execute("UPDATE meta SET value = ? WHERE key = 'format'", (str(FORMAT_VERSION),))


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


# --- the delivery state --------------------------------------------------------------------------
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
            st.dedup.extend(zip(_column("q", fps_b), _column("q", stamps_b), strict=True))
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


def _upsert_meta(db: sqlite3.Connection, items: dict[str, str]) -> None:
    db.executemany("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                   "SET value = excluded.value", list(items.items()))


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


def write_state(db: sqlite3.Connection, st: State) -> None:
    """A whole state (a migrated checkpoint), within the caller's transaction."""
    _upsert_meta(db, {"watermark": str(st.watermark),
                      "server_start_hash": st.server_start_hash,
                      "accounts_baseline": "1" if st.accounts_baseline else "0"})
    for i in range(0, len(st.dedup), _DEDUP_ROW):
        _insert_keys(db, st.dedup[i:i + _DEDUP_ROW])
    _put_rows(db, "running_jobs", "guid", "username, start", dict(st.running_jobs))
    _put_rows(db, "accounts", "username", "digest, creation_guid", dict(st.accounts))
    _put_rows(db, "devices", "id", "owner", dict(st.devices))


# --- one daemon per state dir ----------------------------------------------------------------------
class StateLock:
    """An exclusive lock on ``state.dir`` for the daemon's lifetime (``daemon.lock``, holding
    its PID). The tools (``dlq``, ``tap``, ``backfill``) do not take it."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / LOCK_FILE
        self._fd = -1

    def acquire(self) -> None:
        """Raises LedgerError naming the directory and the PID that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                     FILE_MODE)
        try:
            _tighten(fd, os.fstat(fd))
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LedgerError(f"{self.dir} is in use by another cometstream daemon "
                              f"(pid {holder})") from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


# --- migration from the files of earlier versions ------------------------------------------------
def migrate(directory: Path, server: str) -> bool:
    """Build ``ledger.db`` from ``spool.db`` and ``checkpoint.json`` if there is no ledger yet
    and either exists. True if it did. On failure (LedgerError) the old files are untouched."""
    target = directory / FILENAME
    old_spool = directory / LEGACY_SPOOL
    old_cp = directory / LEGACY_CHECKPOINT
    if target.exists() or not (old_spool.exists() or old_cp.exists()):
        return False
    # built in a private directory (0700, a new random name): nobody else can plant a file or a
    # symbolic link where it is written, whatever the state dir's mode
    for stale in directory.glob(f"{FILENAME}.migrating*"):  # a migration a crash interrupted
        _remove_private_dir(stale)
    tmp_dir: Path | None = None
    tmp = directory / f"{FILENAME}.migrating"
    quarantined = None
    had_spool = old_spool.exists()
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f"{FILENAME}.migrating-", dir=directory))
        tmp = tmp_dir / FILENAME
        state = read_checkpoint(old_cp, server) if old_cp.exists() else None
        if old_spool.exists():
            try:
                src = connect(old_spool, check=True, upgrade=False)
            except LedgerCorrupt as exc:
                quarantined = quarantine(old_spool, str(exc))
            else:
                try:
                    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                                     | os.O_NOFOLLOW, FILE_MODE))
                    dst = sqlite3.connect(tmp)
                    try:
                        src.backup(dst)
                    finally:
                        dst.close()
                finally:
                    src.close()
        db = connect(tmp, upgrade=True)
        try:
            def fill() -> None:
                if state is not None:
                    write_state(db, state)
                _upsert_meta(db, {"server": server})
            _transaction(db, fill)
        finally:
            db.close()
        os.chmod(tmp, FILE_MODE)
        _fsync(tmp)
        os.replace(tmp, target)
        _fsync(directory)
        _remove_private_dir(tmp_dir)
    except (OSError, sqlite3.Error, LedgerCorrupt, LedgerError) as exc:
        # (LedgerError: connect() on a file that is not damaged but cannot be opened, e.g. a
        # full disk that has no room for the WAL: the same failure, the same cleanup)
        if tmp_dir is not None:
            _remove_private_dir(tmp_dir)
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise LedgerError(f"migrating {LEGACY_SPOOL} and {LEGACY_CHECKPOINT} in {directory} "
                          f"into {FILENAME} failed ({why}); the old files are left as they "
                          "were") from None
    for path in (old_cp, old_spool, Path(f"{old_spool}-wal"), Path(f"{old_spool}-shm")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    log.info("state migrated into the ledger", path=str(target),
             checkpoint=state is not None, spool=had_spool and quarantined is None,
             dedup_keys=len(state.dedup) if state else 0)
    return True


def _remove_private_dir(path: Path) -> None:
    """A migration's private directory and what is in it (files only; never follows a link)."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(OSError):
            os.unlink(path)  # (an earlier version's ledger.db.migrating file)
        for suffix in ("-wal", "-shm", "-journal"):
            with contextlib.suppress(OSError):
                os.unlink(f"{path}{suffix}")
        return
    if st.st_uid != os.geteuid():
        return  # not ours: left alone
    with contextlib.suppress(OSError):
        for name in os.listdir(path):
            with contextlib.suppress(OSError):
                os.unlink(path / name)
        os.rmdir(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Ledger:
    """The ledger of one daemon. Created closed; :meth:`open` migrates the files of earlier
    versions, runs the integrity check and loads the state. ``events``: whether events are
    spooled (``[spool] buffer = "disk"``); without, it keeps the delivery state and cursors."""

    def __init__(self, directory: Path, sinks: Sequence[str], *, server: str, max_bytes: int,
                 max_age: float, fsync_interval: float, events: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        self.dir = directory
        self.path = directory / FILENAME
        self.server = server
        self.sink_names = list(sinks)
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.fsync_interval = fsync_interval
        self.spools_events = events
        self.clock = clock
        self._db: sqlite3.Connection | None = None
        self._thread: WriterThread | None = None
        #: published, not yet committed (in seq order; disk buffer only), and their bytes
        self.pending: deque[Event] = deque()
        self.pending_bytes = 0
        #: highest seq committed to disk, or that every sink was done with before it had to be
        self.durable_seq = 0
        #: committed chunks: [first seq, last seq, bytes, oldest and newest received_at, count],
        #: oldest first
        self._batches: deque[list[Any]] = deque()
        self.bytes = 0
        self.events = 0
        self.cursors: dict[str, int] = {}
        #: per sink, where its output stood at its committed cursor (see ``Position``)
        self.positions: dict[str, Position] = {}
        self.state = State()
        self.quarantined: Path | None = None
        self.migrated = False
        self.commits = 0
        #: after ``close(sinks)``: per sink, (events the ledger keeps for it, events lost)
        self.left: dict[str, tuple[int, int]] | None = None
        self.write_errors = 0
        self.last_error = ""
        #: when commits started failing (monotonic; 0: they do not)
        self.failing_since = 0.0
        self._dedup_rows = 0
        self._cursor_fn: Callable[[], dict[str, int]] | None = None
        self._position_fn: Callable[[dict[str, int]], dict[str, Position]] | None = None
        self._lagging_fn: Callable[[], dict[str, tuple[int, frozenset[int] | None]]] | None = None
        self._on_dropped: Callable[[str, int], None] | None = None
        self._state_fn: Callable[[int], StateDiff] | None = None
        self._restore_fn: Callable[[StateDiff], None] | None = None
        self._through_fn: Callable[[], int] | None = None
        self._committed: asyncio.Future[None] | None = None
        #: per sink, the highest seq :meth:`read` handed it: the limits cannot take those from
        #: it (it holds them), so they are not counted lost for it
        self.served: dict[str, int] = {}
        self._kicked: asyncio.Future[None] | None = None
        self._stopping = False
        #: the state's meta and dedup horizon as last committed (an idle commit is skipped)
        self._meta_written: tuple[Any, ...] = ()
        self._horizon_written = 0

    # --- lifecycle -------------------------------------------------------------------------------
    def open(self) -> int:
        """Open (or create, or migrate) the ledger; returns the highest seq spooled in it (0 if
        none). A damaged file is quarantined and replaced; one written for another server too.
        Raises LedgerError if the files of an earlier version cannot be migrated."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        check_state_dir(self.dir)
        self.migrated = migrate(self.dir, self.server)
        try:
            db = connect(self.path, upgrade=True)
            try:
                state = load_state(db)
                owner = db.execute("SELECT value FROM meta WHERE key = 'server'").fetchone()
                if owner is not None and owner[0] != self.server:
                    raise _Foreign(f"written for server {owner[0]!r}, this is {self.server!r}")
            except BaseException:
                db.close()
                raise
        except _Foreign as exc:
            self.quarantined = quarantine(self.path, str(exc), "foreign")
            db, state = connect(self.path, upgrade=True), State()
        except LedgerCorrupt as exc:
            self.quarantined = quarantine(self.path, str(exc))
            db, state = connect(self.path, upgrade=True), State()
        self._db = db
        self.state = state
        _transaction(db, lambda: _upsert_meta(db, {"server": self.server}))
        self._dedup_rows = db.execute("SELECT coalesce(sum(count), 0) FROM dedup").fetchone()[0]
        for sink, seq, position in db.execute("SELECT sink, seq, position FROM cursors"):
            self.cursors[sink] = seq
            self.positions[sink] = _position(position)
        top = db.execute("SELECT max(last_seq) FROM chunks").fetchone()[0] or 0
        last_cursor = max(self.cursors.values(), default=0)
        self.durable_seq = max(top, last_cursor) if self.spools_events else 0
        for name in self.sink_names:
            # a new sink starts at the end (it gets what arrives from now on)
            self.cursors.setdefault(name, self.durable_seq)
        for first, last, size, oldest, newest, count in db.execute(
                "SELECT first_seq, last_seq, bytes, substr(received, 1, 8), newest, count "
                "FROM chunks ORDER BY first_seq"):
            self._batches.append([first, last, size, _column("d", oldest)[0], newest, count])
            self.bytes += size
            self.events += count
        self._thread = WriterThread("ledger")
        return self.durable_seq

    @property
    def oldest_received_at(self) -> float:
        """When the oldest event on disk was received (0.0: none)."""
        return self._batches[0][3] if self._batches else 0.0

    async def close(self, sinks: dict[str, frozenset[int] | None] | None = None) -> None:
        """Commit what is pending, with the cursors and the state; close the database.
        ``sinks`` (name → type filter): then :attr:`left` says, per sink, what the file holds
        for it and what it lost, whether the last commit succeeded or not."""
        if self._thread is None:
            return
        try:
            await self.commit()
        finally:
            db, self._db = self._db, None
            thread, self._thread = self._thread, None
            try:
                if sinks is not None and db is not None:
                    current = self._cursor_fn() if self._cursor_fn is not None else {}
                    try:
                        kept = await thread.run(self._left_sync, db, sinks)
                        self.left = {}
                        for sink, types in sinks.items():
                            count, cursor = kept[sink]
                            got = max(current.get(sink, cursor), cursor)
                            self.left[sink] = (count, sum(
                                1 for ev in self.pending
                                if ev.seq > got and (types is None or ev.type in types)))
                    except sqlite3.Error as exc:
                        log.error("cannot count the events left in the ledger", error=str(exc))
            finally:
                if db is not None:
                    await thread.run(db.close)
                thread.close()

    def _left_sync(self, db: sqlite3.Connection, sinks: dict[str, frozenset[int] | None]
                   ) -> dict[str, tuple[int, int]]:
        """Per sink: (events in the ledger past the cursor the ledger holds for it, that
        cursor): what the file says, not what was hoped."""
        committed = dict(db.execute("SELECT sink, seq FROM cursors"))
        out = {}
        for sink, types in sinks.items():
            cursor = committed.get(sink, self.durable_seq)
            out[sink] = (_count_after(db, cursor, types) if self.spools_events else 0, cursor)
        return out

    def release(self, floor: int) -> None:
        """Every sink is done with every event up to ``floor``: those still waiting for the disk
        need not go there (with healthy sinks, nearly all of them). Their keys and state go with
        the next commit."""
        self._pop_through(floor)
        if floor > self.durable_seq:
            self.durable_seq = floor
        if not self.full:
            c = self._committed
            if c is not None and not c.done():
                c.set_result(None)

    def append(self, ev: Event) -> bool:
        """A published event waits for the disk; True if the read loop must wait for room
        (:meth:`wait_for_room`)."""
        self.pending.append(ev)
        size = len(ev.raw)
        before = self.pending_bytes
        self.pending_bytes = before + size
        waiting = len(self.pending)
        if waiting == COMMIT_SOON or (before < COMMIT_SOON_BYTES <= before + size):
            self.kick()
        return waiting > PENDING_MAX or self.pending_bytes > PENDING_MAX_BYTES

    @property
    def full(self) -> bool:
        """Whether what waits in memory for the disk is over its bound (events or bytes)."""
        return len(self.pending) > PENDING_MAX or self.pending_bytes > PENDING_MAX_BYTES

    def _pop_through(self, seq: int) -> None:
        pending = self.pending
        size = 0
        while pending and pending[0].seq <= seq:
            size += len(pending.popleft().raw)
        if size:
            self.pending_bytes -= size
        if not pending:
            self.pending_bytes = 0

    # --- back-pressure -----------------------------------------------------------------------------
    async def wait_for_room(self) -> None:
        """Until what waits in memory for the disk is below ``PENDING_MAX`` events and
        ``PENDING_MAX_BYTES`` again (a disk slower than the stream, or one that is full, makes
        the read loop wait rather than memory grow without bound)."""
        while self.full:
            self.kick()
            if self._committed is None or self._committed.done():
                self._committed = asyncio.get_running_loop().create_future()
            await self._committed

    # --- commits -----------------------------------------------------------------------------------
    def bind(self, cursors: Callable[[], dict[str, int]],
             lagging: Callable[[], dict[str, tuple[int, frozenset[int] | None]]],
             on_dropped: Callable[[str, int], None],
             positions: Callable[[dict[str, int]], dict[str, Position]] | None = None,
             through: Callable[[], int] | None = None) -> None:
        """The pipeline's side. ``cursors()``: per sink, the seq it is done with;
        ``positions()``: per sink, where its output stood then; ``lagging()``: per sink reading
        from the spool, (next seq it needs, its type filter), to count what the limits take from
        it; ``through()`` (memory buffer): up to which seq every event is delivered."""
        self._cursor_fn, self._lagging_fn, self._on_dropped = cursors, lagging, on_dropped
        self._position_fn = positions
        self._through_fn = through

    def bind_state(self, diff: Callable[[int], StateDiff],
                   restore: Callable[[StateDiff], None]) -> None:
        """The tracker's side: ``diff(kept_through)`` settles what is kept up to that seq and
        returns what changed; ``restore(diff)`` takes back a diff whose commit failed."""
        self._state_fn, self._restore_fn = diff, restore

    def kick(self) -> None:
        """Commit now rather than at the end of the interval (a burst: memory stays small)."""
        if self._kicked is not None and not self._kicked.done():
            self._kicked.set_result(None)

    def stop(self) -> None:
        """End :meth:`run` after the commit in progress (a commit is never cut in half: the
        loop would not know what it wrote)."""
        self._stopping = True
        self.kick()

    async def run(self) -> None:
        """Commit every ``fsync_interval`` (sooner when kicked) until :meth:`stop`."""
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._kicked = loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kicked, self.fsync_interval)
            if self._stopping:
                return  # (close() makes the last commit)
            try:
                await self.commit()
            except Exception as exc:  # (anything: the committing task must go on)
                self.write_errors += 1
                msg = (str(exc) if isinstance(exc, (sqlite3.Error, OSError))
                       else f"{exc.__class__.__name__}: {exc}")
                if not self.last_error:
                    self.failing_since = time.monotonic()
                if msg != self.last_error:
                    log.error("ledger write failed (retrying; events stay in memory)",
                              error=msg, pending=len(self.pending))
                self.last_error = msg
            else:
                if self.last_error:
                    log.info("ledger writes recovered")
                self.last_error = ""
                self.failing_since = 0.0

    async def commit(self) -> None:
        """Write what is pending in transactions of at most ``_COMMIT_MAX`` events, with the
        cursors and the state they make true; delete what every sink is done with or what the
        limits no longer allow."""
        if self._thread is None or self._db is None:
            return
        lost: dict[str, int] = {}
        retrimmed = False
        while True:
            n = min(len(self.pending), _COMMIT_MAX)
            batch, batch_bytes = _within(list(islice(self.pending, n)),
                                         min(self.max_bytes // 2, _COMMIT_MAX_BYTES))
            if self._through_fn is not None:  # memory buffer: kept = delivered everywhere
                through = self._through_fn()
            else:  # disk buffer: kept = in this commit, or done with by every sink
                through = max(batch[-1].seq if batch else 0, self.durable_seq)
            cursors = self._cursor_fn() if self._cursor_fn is not None else dict(self.cursors)
            # a sink's cursor (and its output's position) is committed no further than what
            # this commit keeps: past it, a crash loses the events' keys, the resync brings
            # them back, and a file sink must find their lines after its committed position
            cursors = {k: v if v <= through else through for k, v in cursors.items()}
            positions = self._position_fn(cursors) if self._position_fn is not None else {}
            diff = self._state_fn(through) if self._state_fn is not None else None
            trim_to, dropped = self._trim_plan(batch, batch_bytes, cursors)
            if not batch and not dropped and cursors == self.cursors \
                    and positions == {k: self.positions.get(k) for k in positions} \
                    and (trim_to <= 0 or not self._batches or self._batches[0][1] > trim_to) \
                    and (diff is None or self._unchanged(diff)):
                break  # nothing to write: no transaction, no fsync (an idle daemon)
            try:
                written = await self._thread.run(self._commit_sync, batch, cursors, positions,
                                                 trim_to, dropped, diff)
            except BaseException:
                if diff is not None and self._restore_fn is not None:
                    self._restore_fn(diff)
                raise
            self.commits += 1
            if batch:
                last = batch[-1].seq
                self._pop_through(last)  # (release() may have taken some)
                if last > self.durable_seq:
                    self.durable_seq = last
            self.cursors.update(cursors)
            self.positions.update(positions)
            self._apply_trim(trim_to)
            for meta in written:
                self._batches.append(meta)
                self.bytes += meta[2]
                self.events += meta[5]
            for sink, count in dropped.items():
                lost[sink] = lost.get(sink, 0) + count
            c = self._committed
            if c is not None and not c.done():
                c.set_result(None)
            if len(self.pending) >= COMMIT_SOON or self.pending_bytes >= COMMIT_SOON_BYTES:
                # more arrived during this commit than would kick one: the next goes now
                continue
            if written and self.bytes > self.max_bytes and not retrimmed:
                retrimmed = True  # what this commit wrote went over the limit: trim it now
                continue
            break
        # reported once the spool is back within its limits
        for sink, count in lost.items():
            if count and self._on_dropped is not None:
                self._on_dropped(sink, count)

    def _trim_plan(self, batch: list[Event], batch_bytes: int, cursors: dict[str, int]
                   ) -> tuple[int, dict[str, Any]]:
        """Up to which seq to delete, and per lagging sink the range it loses to the limits."""
        done = min(cursors.values(), default=batch[-1].seq if batch else self.durable_seq)
        trim_to = done
        now = self.clock()
        size = self.bytes + batch_bytes
        forced = 0
        for _first, last, bsize, _oldest, newest, _count in self._batches:
            if last <= done:
                size -= bsize
                continue
            if size > self.max_bytes or newest < now - self.max_age:
                forced = last
                size -= bsize
                continue
            break
        dropped: dict[str, tuple[int, int, Any]] = {}
        if forced > trim_to:
            trim_to = forced
            lag = self._lagging_fn() if self._lagging_fn is not None else {}
            for sink, (need, types) in lag.items():
                if need <= forced:
                    dropped[sink] = (need, forced, types)
        return trim_to, dropped

    def _commit_sync(self, batch: list[Event], cursors: dict[str, int],
                     positions: dict[str, Position], trim_to: int, dropped: dict[str, Any],
                     diff: StateDiff | None) -> list[list[Any]]:
        """One transaction: the chunks of ``batch`` beyond every cursor, the cursors and
        positions, the state ``diff``, the limits' count per lagging sink (into ``dropped``) and
        the deletion up to ``trim_to``. Returns the written chunks' bookkeeping entries."""
        db = self._db
        assert db is not None
        # what every sink already has is not written at all (with healthy sinks: nearly all)
        floor = min(cursors.values(), default=0)
        i = 0
        while i < len(batch) and batch[i].seq <= floor:
            i += 1
        parts = _parts(batch, i)
        written: list[list[Any]] = []

        def rows() -> Iterable[tuple[Any, ...]]:
            # packed one chunk at a time, as SQLite takes them: a commit of large events does
            # not hold a second copy of all their bytes
            for part in parts:
                row = _pack(part)
                # first_seq, last_seq, bytes, oldest and newest received_at, count
                written.append([row[0], row[1], row[4], part[0].received_at, row[2], row[3]])
                yield row

        db.execute("BEGIN IMMEDIATE")
        try:
            deleted = 0
            if trim_to > 0 and self._batches and self._batches[0][1] <= trim_to:
                # what the limits and the cursors let go, first: the pages it frees take the
                # new chunks (a full disk can then still take a commit once a sink read on)
                deleted = db.execute("SELECT coalesce(sum(count), 0) FROM chunks "
                                     "WHERE last_seq <= ?", (trim_to,)).fetchone()[0]
            self._count_dropped(db, dropped)
            if deleted:
                db.execute("DELETE FROM chunks WHERE last_seq <= ?", (trim_to,))
            if parts:
                # (OR IGNORE: a commit whose result the loop never saw, e.g. cancelled at a
                # shutdown, may have written these already; they are the same rows)
                db.executemany("INSERT OR IGNORE INTO chunks VALUES "
                               "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows())
            db.executemany("INSERT INTO cursors VALUES (?, ?, ?) ON CONFLICT (sink) DO UPDATE "
                           "SET seq = excluded.seq, position = excluded.position",
                           [(sink, seq, _position_text(positions.get(sink)))
                            for sink, seq in cursors.items()])
            keys = self._write_diff(db, diff) if diff is not None else self._dedup_rows
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
        self._dedup_rows = keys  # (only once committed)
        if diff is not None:
            self._meta_written = (diff.watermark, diff.server_start_hash, diff.accounts_baseline)
            self._horizon_written = max(self._horizon_written, diff.horizon)
        if deleted > 10_000:
            with contextlib.suppress(sqlite3.Error):  # the commit stands whatever this does
                db.execute("PRAGMA incremental_vacuum").fetchall()
        return written

    def _count_dropped(self, db: sqlite3.Connection, dropped: dict[str, Any]) -> None:
        """Per lagging sink, the events the limits take from it (into ``dropped``)."""
        for sink, (need, upto, types) in list(dropped.items()):
            need = max(need, self.served.get(sink, 0) + 1)  # what it read, it holds
            lost = 0
            for seqs_b, types_b in db.execute(
                    "SELECT seqs, types FROM chunks WHERE last_seq >= ? AND last_seq <= ?",
                    (need, upto)):
                seqs, kinds = _column("q", seqs_b), _column("q", types_b)
                lost += sum(1 for q, t in zip(seqs, kinds, strict=True)
                            if q >= need and (types is None or t in types))
            dropped[sink] = lost


    def _unchanged(self, diff: StateDiff) -> bool:
        return (not diff.dedup and not diff.running_jobs and not diff.accounts
                and not diff.devices and diff.horizon <= self._horizon_written
                and (diff.watermark, diff.server_start_hash, diff.accounts_baseline)
                == self._meta_written)

    def _write_diff(self, db: sqlite3.Connection, diff: StateDiff) -> int:
        """The state's changes, within the commit's transaction (only what changed)."""
        _upsert_meta(db, {"watermark": str(diff.watermark),
                          "server_start_hash": diff.server_start_hash,
                          "accounts_baseline": "1" if diff.accounts_baseline else "0"})
        keys = self._dedup_rows  # (in the rows: a key kept twice counts twice)
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

    def _apply_trim(self, trim_to: int) -> None:
        """The chunks the transaction deleted leave the bookkeeping too."""
        batches = self._batches
        while batches and batches[0][1] <= trim_to:
            _f, _l, size, _o, _n, count = batches.popleft()
            self.bytes -= size
            self.events -= count

    # --- reading (a lagging sink) --------------------------------------------------------------
    async def read(self, start: int, limit: int, server: str, sink: str = "") -> list[Event]:
        """Up to ``limit`` events with seq >= ``start``, in order: from memory if they are still
        pending, else from disk. ``sink``: who reads (see ``served``)."""
        pending = self.pending
        if pending and pending[0].seq <= start:
            out = []
            for ev in pending:
                if ev.seq >= start:
                    out.append(ev)
                    if len(out) >= limit:
                        break
            if out:
                self._serve(sink, out[-1].seq)
            return out
        if self._thread is None:
            return []
        rows = await self._thread.run(self._read_sync, start, limit, sink)
        if not rows and pending:
            out = list(_take(pending, limit))  # committed and deleted meanwhile: memory
            if out:
                self._serve(sink, out[-1].seq)
            return out
        events = []
        for seq, received_at, type_, origin, raw, key in rows:
            ev = Event(raw, None, type_, origin, received_at, server)  # type: ignore[arg-type]
            ev.seq = seq
            ev.key = key
            events.append(ev)
        return events

    def _serve(self, sink: str, seq: int) -> None:
        """``sink`` was handed the events up to ``seq``."""
        if sink and seq > self.served.get(sink, 0):
            self.served[sink] = seq

    def _read_sync(self, start: int, limit: int, sink: str = "") -> list[tuple[Any, ...]]:
        """(On the writer thread, in order with the commits: a commit after this read knows
        what the reader holds.)"""
        assert self._db is not None
        out: list[tuple[Any, ...]] = []
        size = 0
        for row in self._db.execute(
                "SELECT seqs, received, types, origins, raws, keys FROM chunks "
                "WHERE last_seq >= ? "
                "ORDER BY first_seq LIMIT ?", (start, limit // _RANGE + 2)):
            for r in _unpack(*row):
                if r[0] < start:
                    continue
                if out and (len(out) >= limit or size + len(r[4]) > READ_MAX_BYTES):
                    break  # (bounded in bytes too: a lagging sink of large events)
                out.append(r)
                size += len(r[4])
            else:
                continue
            break
        if out:
            self._serve(sink, out[-1][0])
        return out

    # --- dead letters ------------------------------------------------------------------------------
    async def add_dead_letters(self, sink: str, events: Iterable[Event], error: str) -> int:
        if self._thread is None:
            return 0
        rows = [(sink, time.time(), error, ev.seq, ev.received_at, ev.type, ev.origin, ev.raw)
                for ev in events]
        return await self._thread.run(add_dead_letters_sync, self._db, rows)




def _parts(batch: list[Event], start: int) -> list[list[Event]]:
    """``batch[start:]`` in chunks of ``_RANGE`` events and ``_RANGE_BYTES`` at most (at least
    one event each)."""
    parts: list[list[Event]] = []
    part: list[Event] = []
    size = 0
    for ev in islice(batch, start, None):
        n = len(ev.raw)
        if part and (len(part) >= _RANGE or size + n > _RANGE_BYTES):
            parts.append(part)
            part, size = [], 0
        part.append(ev)
        size += n
    if part:
        parts.append(part)
    return parts


def _count_after(db: sqlite3.Connection, cursor: int, types: frozenset[int] | None) -> int:
    """Events in the ledger's chunks past ``cursor`` that a sink with filter ``types`` takes."""
    n = 0
    for seqs_b, types_b in db.execute("SELECT seqs, types FROM chunks WHERE last_seq > ?",
                                      (cursor,)):
        seqs, kinds = _column("q", seqs_b), _column("q", types_b)
        n += sum(1 for q, t in zip(seqs, kinds, strict=True)
                 if q > cursor and (types is None or t in types))
    return n


def _within(batch: list[Event], budget: int) -> tuple[list[Event], int]:
    """The head of ``batch`` whose bytes fit ``budget`` (at least one event), and its bytes: a
    commit larger than the room the limit leaves would have to trim what it just wrote, and the
    spool would be over ``max_bytes`` until it had."""
    total = 0
    for i, ev in enumerate(batch):
        size = len(ev.raw)
        if total + size > budget and i:
            return batch[:i], total
        total += size
    return batch, total


def _take(items: Iterable[Event], n: int) -> Iterable[Event]:
    for i, ev in enumerate(items):
        if i >= n:
            return
        yield ev


def _transaction(db: sqlite3.Connection, fn: Callable[[], Any]) -> Any:
    db.execute("BEGIN IMMEDIATE")
    try:
        out = fn()
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        raise
    return out


def add_dead_letters_sync(db: sqlite3.Connection | None, rows: list[tuple[Any, ...]]) -> int:
    assert db is not None
    _transaction(db, lambda: db.executemany(
        "INSERT INTO dead_letters (sink, failed_at, error, seq, received_at, type, origin, raw) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows))
    return len(rows)


def list_dead_letters(db: sqlite3.Connection, sink: str | None = None,
                      limit: int | None = None) -> list[DeadLetter]:
    q = "SELECT id, sink, failed_at, error, seq, received_at, type, origin, raw FROM dead_letters"
    args: list[Any] = []
    if sink is not None:
        q += " WHERE sink = ?"
        args.append(sink)
    q += " ORDER BY id"
    if limit is not None:
        q += " LIMIT ?"
        args.append(limit)
    return [DeadLetter(*row) for row in db.execute(q, args)]


def delete_dead_letters(db: sqlite3.Connection, ids: Sequence[int]) -> int:
    def run() -> int:
        n = 0
        for i in range(0, len(ids), 500):
            chunk = list(ids[i:i + 500])
            n += db.execute(f"DELETE FROM dead_letters WHERE id IN ({','.join('?' * len(chunk))})",
                            chunk).rowcount
        return n

    return _transaction(db, run)  # type: ignore[no-any-return]


class _Foreign(Exception):
    pass


def _position(text: str | None) -> Position:
    if not text:
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, list) else None


def _position_text(position: Position) -> str | None:
    return orjson.dumps(position).decode() if position is not None else None
