"""The durable spool: every received event, kept on disk until every sink has it.

One SQLite database (``spool.db`` in ``state.dir``, WAL mode, from the standard library) holds:

- ``events``: ``(seq, received_at, type, origin, raw)``, append-only, in the pipeline's order;
- ``cursors``: per sink, the highest ``seq`` it is done with (delivered, filtered or refused);
- ``dead_letters``: per sink, the events it refused for good, with the reason
  (``cometstream dlq list|replay|purge``).

Why SQLite: transactions give torn-write safety for free (a crash mid-batch leaves the previous
batch), WAL lets the writer append while a lagging sink reads, ``PRAGMA quick_check`` detects a
damaged file at start, and it needs no dependency. A hand-rolled segment log would need its own
checksums, recovery and compaction for no measurable gain at this rate (see docs/guarantees.md).

The read loop never waits for the disk: :meth:`Spool.append` adds the event to an in-memory list
that a writer thread commits in one transaction every ``fsync_interval`` (``synchronous=FULL``:
one fsync per commit). Everything the database does runs on that one thread, in order: commits,
reads of a lagging sink, trims and dead letters. What is in memory and not yet committed is
served from memory, so a reader never misses an event in between.

Limits: beyond ``max_bytes`` (the events' bytes) or ``max_age`` the oldest events are deleted
even if a sink has not read them; each lagging sink's loss is counted (reason ``spool_limit``)
and logged. Events every sink is done with are deleted at each commit.

A spool that cannot be opened or fails its integrity check is moved aside
(``spool.db.corrupt-<time>``), reported, and replaced by an empty one.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from .events import Event
from .sinks._writer import WriterThread

__all__ = ["FILENAME", "FORMAT_VERSION", "DeadLetter", "Spool", "SpoolCorrupt"]

FILENAME: Final = "spool.db"
FORMAT_VERSION: Final = 1
#: events committed per transaction at most (a burst is written in pieces of this size)
_COMMIT_MAX: Final = 20_000
#: the granularity of the limits: the oldest events go in ranges of this many
_RANGE: Final = 256
log = structlog.get_logger("cometstream.spool")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, received_at REAL NOT NULL, type INTEGER NOT NULL,
    origin TEXT NOT NULL, raw BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS cursors (sink TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY, sink TEXT NOT NULL, failed_at REAL NOT NULL, error TEXT NOT NULL,
    seq INTEGER NOT NULL, received_at REAL NOT NULL, type INTEGER NOT NULL,
    origin TEXT NOT NULL, raw BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS dead_letters_sink ON dead_letters (sink, id);
"""


class SpoolCorrupt(Exception):
    pass


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


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) a spool database; raises SpoolCorrupt if it is damaged."""
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    except sqlite3.Error as exc:
        raise SpoolCorrupt(str(exc)) from exc
    try:
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes on a new file
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise SpoolCorrupt(f"cannot use WAL mode (journal_mode is {mode})")
        db.execute("PRAGMA synchronous = FULL")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise SpoolCorrupt(f"integrity check failed: {check}")
        db.executescript(_SCHEMA)
        row = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        if row is None:
            db.execute("INSERT INTO meta VALUES ('format', ?)", (str(FORMAT_VERSION),))
        elif row[0] != str(FORMAT_VERSION):
            raise SpoolCorrupt(f"format {row[0]}, this cometstream reads {FORMAT_VERSION}")
    except sqlite3.DatabaseError as exc:
        db.close()
        raise SpoolCorrupt(str(exc)) from exc
    except SpoolCorrupt:
        db.close()
        raise
    return db


def quarantine(path: Path, why: str) -> Path | None:
    """Move a damaged spool (and its WAL) aside; returns where it went."""
    stamp = int(time.time())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    moved = None
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            try:
                os.replace(src, Path(f"{target}{suffix}"))
                if not suffix:
                    moved = target
            except OSError as exc:
                log.error("cannot move the damaged spool aside", path=str(src),
                          error=exc.strerror or str(exc))
    log.error("spool damaged: moved aside, starting with an empty one (events in it that some "
              "sink had not yet received are lost; remedial sync recovers the jobs)",
              reason=why, moved_to=str(moved) if moved else None)
    return moved


class Spool:
    """The spool of one daemon. Created closed; :meth:`open` runs the integrity check."""

    def __init__(self, directory: Path, sinks: Sequence[str], *, max_bytes: int, max_age: float,
                 fsync_interval: float, clock: Callable[[], float] = time.time) -> None:
        self.path = directory / FILENAME
        self.sink_names = list(sinks)
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.fsync_interval = fsync_interval
        self.clock = clock
        self._db: sqlite3.Connection | None = None
        self._thread: WriterThread | None = None
        #: published, not yet committed (in seq order)
        self.pending: deque[Event] = deque()
        #: highest seq committed to disk
        self.durable_seq = 0
        #: committed events: batches (first seq, last seq, bytes, newest received_at), oldest first
        self._batches: deque[list[Any]] = deque()
        self.bytes = 0
        self.events = 0
        self.oldest_received_at = 0.0
        self.cursors: dict[str, int] = {}
        self.quarantined: Path | None = None
        self.commits = 0
        self.write_errors = 0
        self.last_error = ""
        self._cursor_fn: Callable[[], dict[str, int]] | None = None
        self._lagging_fn: Callable[[], dict[str, tuple[int, frozenset[int] | None]]] | None = None
        self._on_dropped: Callable[[str, int], None] | None = None

    # --- lifecycle -------------------------------------------------------------------------------
    def open(self) -> int:
        """Open (or create) the spool; returns the highest seq in it (0 if empty). A damaged file
        is quarantined and replaced."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = connect(self.path)
        except SpoolCorrupt as exc:
            self.quarantined = quarantine(self.path, str(exc))
            db = connect(self.path)
        self._db = db
        for sink, seq in db.execute("SELECT sink, seq FROM cursors"):
            self.cursors[sink] = seq
        top = db.execute("SELECT max(seq) FROM events").fetchone()[0] or 0
        last_cursor = max(self.cursors.values(), default=0)
        self.durable_seq = max(top, last_cursor)
        for name in self.sink_names:
            # a new sink starts at the end (it gets what arrives from now on)
            self.cursors.setdefault(name, self.durable_seq)
        # group the stored events by ranges of 4096 seq numbers for the limits
        for first, last, size, newest in db.execute(
                "SELECT min(seq), max(seq), sum(length(raw)), max(received_at) FROM events "
                "GROUP BY seq / 4096 ORDER BY 1"):
            self._batches.append([first, last, size, newest])
            self.bytes += size
            self.events += last - first + 1  # gaps (deleted rows) are counted below
        if self._batches:
            self.events = db.execute("SELECT count(*) FROM events").fetchone()[0]
            self.oldest_received_at = db.execute(
                "SELECT received_at FROM events ORDER BY seq LIMIT 1").fetchone()[0]
        self._thread = WriterThread("spool")
        return self.durable_seq

    async def close(self) -> None:
        """Commit what is pending, persist the cursors, close the database."""
        if self._thread is None:
            return
        try:
            await self.commit()
        finally:
            db, self._db = self._db, None
            thread, self._thread = self._thread, None
            if db is not None:
                await thread.run(db.close)
            thread.close()

    # --- the hot path ------------------------------------------------------------------------------
    def append(self, ev: Event) -> None:
        self.pending.append(ev)

    # --- commits -----------------------------------------------------------------------------------
    def bind(self, cursors: Callable[[], dict[str, int]],
             lagging: Callable[[], dict[str, tuple[int, frozenset[int] | None]]],
             on_dropped: Callable[[str, int], None]) -> None:
        """``cursors()``: per sink, the seq it is done with; ``lagging()``: per sink reading from
        the spool, (next seq it needs, its type filter), to count what the limits take from it."""
        self._cursor_fn, self._lagging_fn, self._on_dropped = cursors, lagging, on_dropped

    async def run(self) -> None:
        """Commit every ``fsync_interval`` until cancelled."""
        while True:
            await asyncio.sleep(self.fsync_interval)
            try:
                await self.commit()
            except (sqlite3.Error, OSError) as exc:
                self.write_errors += 1
                msg = str(exc)
                if msg != self.last_error:
                    log.error("spool write failed (retrying; events stay in memory)",
                              error=msg, pending=len(self.pending))
                self.last_error = msg
            else:
                if self.last_error:
                    log.info("spool writes recovered")
                self.last_error = ""

    async def commit(self) -> None:
        """Write what is pending in transactions of at most ``_COMMIT_MAX`` events; advance the
        cursors; delete what every sink is done with or what the limits no longer allow."""
        if self._thread is None or self._db is None:
            return
        while True:
            n = min(len(self.pending), _COMMIT_MAX)
            batch = [self.pending[i] for i in range(n)]
            cursors = self._cursor_fn() if self._cursor_fn is not None else dict(self.cursors)
            trim_to, dropped = self._trim_plan(batch, cursors)
            rows = await self._thread.run(self._commit_sync, batch, cursors, trim_to, dropped)
            if batch:
                for _ in range(n):
                    self.pending.popleft()
                last = batch[-1].seq
                self.durable_seq = last
                # the limits delete whole ranges: keep them small enough to be fair
                for i in range(0, n, _RANGE):
                    part = batch[i:i + _RANGE]
                    size = sum(len(ev.raw) for ev in part)
                    self._batches.append([part[0].seq, part[-1].seq, size, part[-1].received_at])
                    self.bytes += size
                self.events += n
                if not self.oldest_received_at:
                    self.oldest_received_at = batch[0].received_at
            self.cursors.update(cursors)
            self._apply_trim(trim_to, rows)
            for sink, count in dropped.items():
                if count and self._on_dropped is not None:
                    self._on_dropped(sink, count)
            self.commits += 1
            if len(self.pending) < _COMMIT_MAX:
                return

    def _trim_plan(self, batch: list[Event], cursors: dict[str, int]
                   ) -> tuple[int, dict[str, Any]]:
        """Up to which seq to delete, and per lagging sink the range it loses to the limits."""
        done = min(cursors.values(), default=batch[-1].seq if batch else self.durable_seq)
        trim_to = done
        now = self.clock()
        size = self.bytes + sum(len(ev.raw) for ev in batch)
        forced = 0
        for first, last, bsize, newest in self._batches:
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

    def _commit_sync(self, batch: list[Event], cursors: dict[str, int], trim_to: int,
                     dropped: dict[str, Any]) -> int:
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            if batch:
                db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                               [(ev.seq, ev.received_at, ev.type, ev.origin, ev.raw)
                                for ev in batch])
            db.executemany("INSERT INTO cursors VALUES (?, ?) ON CONFLICT (sink) DO UPDATE "
                           "SET seq = excluded.seq", list(cursors.items()))
            counted: dict[str, int] = {}
            for sink, (need, upto, types) in dropped.items():
                if types is None:
                    q = db.execute("SELECT count(*) FROM events WHERE seq >= ? AND seq <= ?",
                                   (need, upto))
                else:
                    marks = ",".join("?" * len(types))
                    q = db.execute(f"SELECT count(*) FROM events WHERE seq >= ? AND seq <= ? "
                                   f"AND type IN ({marks})", (need, upto, *sorted(types)))
                counted[sink] = q.fetchone()[0]
            for sink in dropped:
                dropped[sink] = counted[sink]
            deleted = 0
            if trim_to > 0:
                deleted = db.execute("DELETE FROM events WHERE seq <= ?", (trim_to,)).rowcount
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if deleted > 10_000:
            db.execute("PRAGMA incremental_vacuum").fetchall()
        return deleted

    def _apply_trim(self, trim_to: int, deleted: int) -> None:
        if trim_to <= 0:
            return
        batches = self._batches
        while batches and batches[0][1] <= trim_to:
            self.bytes -= batches.popleft()[2]
        if batches and batches[0][0] <= trim_to:
            batches[0][0] = trim_to + 1  # (its bytes are an upper bound until it goes)
        self.events = max(0, self.events - deleted)
        if not batches:
            self.oldest_received_at = 0.0
            self.bytes = 0
        elif deleted:
            self.oldest_received_at = 0.0  # refreshed lazily by oldest_age()

    # --- reading (a lagging sink) --------------------------------------------------------------
    async def read(self, start: int, limit: int, server: str) -> list[Event]:
        """Up to ``limit`` events with seq >= ``start``, in order: from memory if they are still
        pending, else from disk."""
        pending = self.pending
        if pending and pending[0].seq <= start:
            out = []
            for ev in pending:
                if ev.seq >= start:
                    out.append(ev)
                    if len(out) >= limit:
                        break
            return out
        if self._thread is None:
            return []
        rows = await self._thread.run(self._read_sync, start, limit)
        if not rows and pending:
            return list(_take(pending, limit))  # committed and deleted meanwhile: memory
        events = []
        for seq, received_at, type_, origin, raw in rows:
            ev = Event(raw, None, type_, origin, received_at, server)  # type: ignore[arg-type]
            ev.seq = seq
            events.append(ev)
        return events

    def _read_sync(self, start: int, limit: int) -> list[tuple[Any, ...]]:
        assert self._db is not None
        return self._db.execute("SELECT seq, received_at, type, origin, raw FROM events "
                                "WHERE seq >= ? ORDER BY seq LIMIT ?", (start, limit)).fetchall()

    async def oldest_age(self) -> float:
        """Seconds since the oldest event in the spool was received (0 when empty)."""
        if not self._batches:
            return 0.0
        if not self.oldest_received_at and self._thread is not None:
            row = await self._thread.run(self._oldest_sync)
            self.oldest_received_at = row or 0.0
        return max(0.0, self.clock() - self.oldest_received_at) if self.oldest_received_at else 0.0

    def _oldest_sync(self) -> float | None:
        assert self._db is not None
        row = self._db.execute("SELECT received_at FROM events ORDER BY seq LIMIT 1").fetchone()
        return row[0] if row else None

    # --- dead letters ------------------------------------------------------------------------------
    async def add_dead_letters(self, sink: str, events: Iterable[Event], error: str) -> int:
        if self._thread is None:
            return 0
        rows = [(sink, time.time(), error, ev.seq, ev.received_at, ev.type, ev.origin, ev.raw)
                for ev in events]
        return await self._thread.run(add_dead_letters_sync, self._db, rows)


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
        db.execute("ROLLBACK")
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
