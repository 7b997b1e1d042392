"""The durable spool: every received event, kept on disk until every sink has it.

One SQLite database (``spool.db`` in ``state.dir``, WAL mode, from the standard library) holds:

- ``chunks``: the events in the pipeline's order, up to 256 a row (``seq``, ``received_at``,
  ``type`` and ``origin`` as parallel arrays, the events' bytes joined by newlines, and their
  dedup keys where known as a JSON list): one row per 256 events keeps a burst's commit cheap
  (a row per event costs a GIL round trip each);
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
import contextlib
import os
import sqlite3
import sys
import time
from array import array
from collections import deque
from itertools import islice
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson
import structlog

from .events import Event
from ._thread import WriterThread

__all__ = ["FILENAME", "FORMAT_VERSION", "DeadLetter", "Spool", "SpoolCorrupt"]

FILENAME: Final = "spool.db"
#: 2 added ``chunks.keys`` (a spool of format 1 gets the column when opened)
FORMAT_VERSION: Final = 2
#: events committed per transaction at most (a burst is written in pieces of this size)
_COMMIT_MAX: Final = 20_000
#: events waiting in memory for the disk beyond which the read loop waits for a commit. Kept
#: low: the writer thread competes with the busy event loop for the GIL, and while it falls
#: behind, every waiting event holds memory and the watermark. At 50,000, a lagging webhook or
#: Kafka sink took peak RSS to 145-165 MB in the benchmark and the rate to 27-30k events/s; at
#: 6,144 (with commits kicked at 2,048) to about 95 MB and 40-50k events/s.
PENDING_MAX: Final = 6_144
#: events waiting in memory at which a commit starts before the interval is over
COMMIT_SOON: Final = 2048
#: events per chunk (one row): the granularity of the limits, and of reads from disk
_RANGE: Final = 256
log = structlog.get_logger("cometstream.spool")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL, newest REAL NOT NULL,
    count INTEGER NOT NULL, bytes INTEGER NOT NULL,
    seqs BLOB NOT NULL, received BLOB NOT NULL, types BLOB NOT NULL, origins BLOB NOT NULL,
    raws BLOB NOT NULL, keys BLOB);
CREATE TABLE IF NOT EXISTS cursors (sink TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY, sink TEXT NOT NULL, failed_at REAL NOT NULL, error TEXT NOT NULL,
    seq INTEGER NOT NULL, received_at REAL NOT NULL, type INTEGER NOT NULL,
    origin TEXT NOT NULL, raw BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS dead_letters_sink ON dead_letters (sink, id);
"""
#: origins as one byte each in a chunk
_ORIGIN_CODE: Final = {"stream": 0, "resync": 1, "backfill": 2}
_ORIGINS: Final = ("stream", "resync", "backfill")


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
    keys = [ev._key for ev in events]
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
        raise SpoolCorrupt("a chunk's dedup keys are not JSON") from None
    if type(keys) is not list:
        raise SpoolCorrupt("a chunk's dedup keys are not a list")
    if not (len(seqs) == len(received) == len(types) == len(origins) == len(lines) == len(keys)):
        raise SpoolCorrupt("a chunk's columns differ in length")
    return [(seqs[i], received[i], types[i], _ORIGINS[origins[i]] if origins[i] < 3 else
             "stream", lines[i], keys[i] if type(keys[i]) is str else None)
            for i in range(len(seqs))]


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


def connect(path: Path, *, check: bool = True, upgrade: bool = False) -> sqlite3.Connection:
    """Open (creating if needed) a spool database; raises SpoolCorrupt if it is damaged.
    ``check``: run the integrity check (the daemon at start; tools may skip it).
    ``upgrade``: bring a spool of an older format to this one (the daemon only: a tool run
    beside an older daemon must not change the tables under it; the tools read only what every
    format has)."""
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    except sqlite3.Error as exc:
        raise SpoolCorrupt(str(exc)) from exc
    try:
        if db.execute("PRAGMA page_count").fetchone()[0] == 0:  # a new file (the pragma
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")     # needs the write lock)
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise SpoolCorrupt(f"cannot use WAL mode (journal_mode is {mode})")
        db.execute("PRAGMA synchronous = FULL")
        if check:
            verdict = db.execute("PRAGMA quick_check").fetchone()[0]
            if verdict != "ok":
                raise SpoolCorrupt(f"integrity check failed: {verdict}")
        db.executescript(_SCHEMA)
        # (OR IGNORE: another process may create the same new file at the same moment)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (str(FORMAT_VERSION),))
        if upgrade and _format(db) == "1":
            _transaction(db, lambda: _upgrade_from_1(db))
        found = _format(db)
        if found != str(FORMAT_VERSION) and not (found == "1" and not upgrade):
            raise SpoolCorrupt(f"format {found}, this cometstream reads {FORMAT_VERSION}")
    except sqlite3.DatabaseError as exc:
        db.close()
        raise SpoolCorrupt(str(exc)) from exc
    except SpoolCorrupt:
        db.close()
        raise
    return db


def _format(db: sqlite3.Connection) -> str:
    row = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
    return str(row[0]) if row is not None else ""


def _upgrade_from_1(db: sqlite3.Connection) -> None:
    """Format 1 → 2: ``chunks.keys``. Runs under the write lock, and checks again what it finds
    there: another process may have upgraded the file since it was first read."""
    if _format(db) != "1":
        return
    if "keys" not in {row[1] for row in db.execute("PRAGMA table_info(chunks)")}:
        db.execute("ALTER TABLE chunks ADD COLUMN keys BLOB")
    db.execute("UPDATE meta SET value = ? WHERE key = 'format'", (str(FORMAT_VERSION),))


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
        #: committed chunks: [first seq, last seq, bytes, oldest and newest received_at, count],
        #: oldest first
        self._batches: deque[list[Any]] = deque()
        self.bytes = 0
        self.events = 0
        self.cursors: dict[str, int] = {}
        self.quarantined: Path | None = None
        self.write_errors = 0
        self.last_error = ""
        self._cursor_fn: Callable[[], dict[str, int]] | None = None
        self._lagging_fn: Callable[[], dict[str, tuple[int, frozenset[int] | None]]] | None = None
        self._on_dropped: Callable[[str, int], None] | None = None
        self._committed: asyncio.Future[None] | None = None
        #: per sink, the highest seq :meth:`read` handed it: the limits cannot take those from
        #: it (it holds them), so they are not counted lost for it
        self.served: dict[str, int] = {}
        self._kicked: asyncio.Future[None] | None = None

    # --- lifecycle -------------------------------------------------------------------------------
    def open(self) -> int:
        """Open (or create) the spool; returns the highest seq in it (0 if empty). A damaged file
        is quarantined and replaced."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = connect(self.path, upgrade=True)
        except SpoolCorrupt as exc:
            self.quarantined = quarantine(self.path, str(exc))
            db = connect(self.path, upgrade=True)
        self._db = db
        for sink, seq in db.execute("SELECT sink, seq FROM cursors"):
            self.cursors[sink] = seq
        top = db.execute("SELECT max(last_seq) FROM chunks").fetchone()[0] or 0
        last_cursor = max(self.cursors.values(), default=0)
        self.durable_seq = max(top, last_cursor)
        for name in self.sink_names:
            # a new sink starts at the end (it gets what arrives from now on)
            self.cursors.setdefault(name, self.durable_seq)
        for first, last, size, oldest, newest, count in db.execute(
                "SELECT first_seq, last_seq, bytes, substr(received, 1, 8), newest, count "
                "FROM chunks ORDER BY first_seq"):
            self._batches.append([first, last, size, _column("d", oldest)[0], newest, count])
            self.bytes += size
            self.events += count
        self._thread = WriterThread("spool")
        return self.durable_seq

    @property
    def oldest_received_at(self) -> float:
        """When the oldest event on disk was received (0.0: none)."""
        return self._batches[0][3] if self._batches else 0.0

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

    def release(self, floor: int) -> None:
        """Every sink is done with every event up to ``floor``: those still waiting for the disk
        need not go there (with healthy sinks, nearly all of them), and they count as kept."""
        pending = self.pending
        while pending and pending[0].seq <= floor:
            pending.popleft()
        if floor > self.durable_seq:
            self.durable_seq = floor
        if len(pending) <= PENDING_MAX:
            c = self._committed
            if c is not None and not c.done():
                c.set_result(None)

    # --- back-pressure -----------------------------------------------------------------------------
    async def wait_for_room(self) -> None:
        """Until what waits in memory for the disk is below ``PENDING_MAX`` again (a disk slower
        than the stream makes the read loop wait rather than memory grow without bound)."""
        while len(self.pending) > PENDING_MAX:
            self.kick()
            if self._committed is None or self._committed.done():
                self._committed = asyncio.get_running_loop().create_future()
            await self._committed

    # --- commits -----------------------------------------------------------------------------------
    def bind(self, cursors: Callable[[], dict[str, int]],
             lagging: Callable[[], dict[str, tuple[int, frozenset[int] | None]]],
             on_dropped: Callable[[str, int], None]) -> None:
        """``cursors()``: per sink, the seq it is done with; ``lagging()``: per sink reading from
        the spool, (next seq it needs, its type filter), to count what the limits take from it."""
        self._cursor_fn, self._lagging_fn, self._on_dropped = cursors, lagging, on_dropped

    def kick(self) -> None:
        """Commit now rather than at the end of the interval (a burst: memory stays small)."""
        if self._kicked is not None and not self._kicked.done():
            self._kicked.set_result(None)

    async def run(self) -> None:
        """Commit every ``fsync_interval`` (sooner when kicked) until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            self._kicked = loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kicked, self.fsync_interval)
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
        lost: dict[str, int] = {}
        retrimmed = False
        while True:
            n = min(len(self.pending), _COMMIT_MAX)
            batch, batch_bytes = _within(list(islice(self.pending, n)), self.max_bytes // 2)
            cursors = self._cursor_fn() if self._cursor_fn is not None else dict(self.cursors)
            trim_to, dropped = self._trim_plan(batch, batch_bytes, cursors)
            written = await self._thread.run(self._commit_sync, batch, cursors, trim_to, dropped)
            if batch:
                last = batch[-1].seq
                pending = self.pending
                while pending and pending[0].seq <= last:  # (release() may have taken some)
                    pending.popleft()
                if last > self.durable_seq:
                    self.durable_seq = last
            self.cursors.update(cursors)
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
            if len(self.pending) >= COMMIT_SOON:
                # more arrived during this commit than would kick one: the next goes now, not
                # after fsync_interval (meanwhile the read loop could reach PENDING_MAX and wait
                # on an idle writer)
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

    def _commit_sync(self, batch: list[Event], cursors: dict[str, int], trim_to: int,
                     dropped: dict[str, Any]) -> list[list[Any]]:
        """One transaction: the chunks of ``batch`` beyond every cursor, the cursors, the
        limits' count per lagging sink (into ``dropped``) and the deletion up to ``trim_to``.
        Returns the written chunks' bookkeeping entries (see ``_batches``)."""
        db = self._db
        assert db is not None
        # what every sink already has is not written at all (with healthy sinks: nearly all)
        floor = min(cursors.values(), default=0)
        i = 0
        while i < len(batch) and batch[i].seq <= floor:
            i += 1
        parts = [batch[j:j + _RANGE] for j in range(i, len(batch), _RANGE)]
        rows = [_pack(part) for part in parts]
        db.execute("BEGIN IMMEDIATE")
        try:
            if rows:
                db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               rows)
            db.executemany("INSERT INTO cursors VALUES (?, ?) ON CONFLICT (sink) DO UPDATE "
                           "SET seq = excluded.seq", list(cursors.items()))
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
            deleted = 0
            if trim_to > 0:
                deleted = db.execute("SELECT coalesce(sum(count), 0) FROM chunks "
                                     "WHERE last_seq <= ?", (trim_to,)).fetchone()[0]
                db.execute("DELETE FROM chunks WHERE last_seq <= ?", (trim_to,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if deleted > 10_000:
            db.execute("PRAGMA incremental_vacuum").fetchall()
        # row: first_seq, last_seq, newest, count, bytes, ...
        return [[row[0], row[1], row[4], part[0].received_at, row[2], row[3]]
                for part, row in zip(parts, rows, strict=True)]

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
            ev._key = key
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
        for row in self._db.execute(
                "SELECT seqs, received, types, origins, raws, keys FROM chunks "
                "WHERE last_seq >= ? "
                "ORDER BY first_seq LIMIT ?", (start, limit // _RANGE + 2)):
            out.extend(r for r in _unpack(*row) if r[0] >= start)
            if len(out) >= limit:
                break
        out = out[:limit]
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
