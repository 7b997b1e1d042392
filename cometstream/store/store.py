"""The open ledger: one SQLite database (``ledger.db`` in ``state.dir``) holding everything
delivery depends on, and what is known of it without reading it (the committed cursors and
chunks). Blocking: the async writer (:class:`cometstream.delivery.ledger.Ledger`) runs
:meth:`Store.commit`, :meth:`Store.read` and :meth:`Store.left` on its one writer thread, in
order, so that a commit after a read knows what the reader holds.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from ..errors import LedgerCorrupt, LedgerForeign
from .codec import (
    RANGE,
    Position,
    Row,
    column,
    decode_position,
    encode_position,
    pack,
    split,
    unpack,
)
from .deadletters import DeadLetters
from .migrate import migrate
from .plan import ChunkMeta, CommitPlan
from .schema import FILENAME, connect, quarantine, rollback, transaction, upsert_meta
from .state import State
from .statedb import StateRows, load_state
from .statedir import check_state_dir

__all__ = ["READ_MAX_BYTES", "Chunks", "Store"]

#: bytes one read from disk hands a lagging sink at most (at least one event)
READ_MAX_BYTES: Final = 16 * 1024 * 1024
#: deleted events beyond which a commit gives the freed pages back to the file system
_VACUUM_AFTER: Final = 10_000


class Chunks:
    """The committed chunks' bookkeeping (oldest first), kept with the commits that change it."""

    def __init__(self) -> None:
        self.metas: deque[ChunkMeta] = deque()
        self.bytes = 0
        self.events = 0

    def add(self, meta: ChunkMeta) -> None:
        self.metas.append(meta)
        self.bytes += meta[2]
        self.events += meta[5]

    def first_last(self) -> int | None:
        """The last seq of the oldest chunk (None: there is none)."""
        return self.metas[0][1] if self.metas else None

    def trim(self, trim_to: int) -> None:
        """The chunks a transaction deleted leave the bookkeeping too."""
        metas = self.metas
        while metas and metas[0][1] <= trim_to:
            _f, _l, size, _o, _n, count = metas.popleft()
            self.bytes -= size
            self.events -= count

    @property
    def oldest_received_at(self) -> float:
        """When the oldest event on disk was received (0.0: none)."""
        return self.metas[0][3] if self.metas else 0.0


class Store:
    """One daemon's open ledger. :meth:`open` migrates the files of earlier versions, runs the
    integrity check, moves a damaged (or another server's) file aside and loads what it holds.
    ``spools_events``: whether events are spooled (``[spool] buffer = "disk"``); without, it
    keeps the delivery state and cursors."""

    def __init__(self, db: sqlite3.Connection, *, spools_events: bool) -> None:
        self.db = db
        self.spools_events = spools_events
        self.state = State()
        self.quarantined: Path | None = None
        self.migrated = False
        #: per sink, the committed cursor and where its output stood then (see ``Position``)
        self.cursors: dict[str, int] = {}
        self.positions: dict[str, Position] = {}
        self.top = 0
        self.chunks = Chunks()
        self.rows = StateRows(db)
        self.dead_letters = DeadLetters(db)
        #: per sink, the highest seq a read handed it: the limits cannot take those from it
        #: (it holds them), so they are not counted lost for it
        self.served: dict[str, int] = {}

    @classmethod
    def open(cls, directory: Path, server: str, *, spools_events: bool) -> Store:
        """Open (or create, or migrate) the ledger in ``directory``. Raises LedgerError if the
        files of an earlier version cannot be migrated."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        check_state_dir(directory)
        migrated = migrate(directory, server)
        path = directory / FILENAME
        quarantined = None
        try:
            db, state = _load(path, server)
        except LedgerForeign as exc:
            quarantined = quarantine(path, str(exc), "foreign")
            db, state = connect(path, upgrade=True), State()
        except LedgerCorrupt as exc:
            quarantined = quarantine(path, str(exc))
            db, state = connect(path, upgrade=True), State()
        store = cls(db, spools_events=spools_events)
        store.state, store.quarantined, store.migrated = state, quarantined, migrated
        transaction(db, lambda: upsert_meta(db, {"server": server}))
        for sink, seq, position in db.execute("SELECT sink, seq, position FROM cursors"):
            store.cursors[sink] = seq
            store.positions[sink] = decode_position(position)
        store.top = db.execute("SELECT max(last_seq) FROM chunks").fetchone()[0] or 0
        for first, last, size, oldest, newest, count in db.execute(
                "SELECT first_seq, last_seq, bytes, substr(received, 1, 8), newest, count "
                "FROM chunks ORDER BY first_seq"):
            store.chunks.add([first, last, size, column("d", oldest)[0], newest, count])
        return store

    def close(self) -> None:
        self.db.close()

    # --- commits (on the writer thread) ---------------------------------------------------------
    def commit(self, plan: CommitPlan) -> list[ChunkMeta]:
        """One transaction: the chunks of the plan's batch beyond every cursor, the cursors and
        positions, the state diff, the limits' count per lagging sink (into ``plan.dropped``)
        and the deletion up to ``plan.trim_to``. Returns the written chunks' bookkeeping
        entries (the caller applies them with :meth:`Chunks.trim` and :meth:`Chunks.add`)."""
        db = self.db
        # what every sink already has is not written at all (with healthy sinks: nearly all)
        floor = min(plan.cursors.values(), default=0)
        batch = plan.batch
        i = 0
        while i < len(batch) and batch[i].seq <= floor:
            i += 1
        parts = split(batch, i)
        written: list[ChunkMeta] = []

        def rows() -> Iterable[tuple[Any, ...]]:
            # packed one chunk at a time, as SQLite takes them: a commit of large events does
            # not hold a second copy of all their bytes
            for part in parts:
                row = pack(part)
                # first_seq, last_seq, bytes, oldest and newest received_at, count
                written.append([row[0], row[1], row[4], part[0].received_at, row[2], row[3]])
                yield row

        trim_to = plan.trim_to
        first = self.chunks.first_last()
        db.execute("BEGIN IMMEDIATE")
        try:
            deleted = 0
            if trim_to > 0 and first is not None and first <= trim_to:
                # what the limits and the cursors let go, first: the pages it frees take the
                # new chunks (a full disk can then still take a commit once a sink read on)
                deleted = db.execute("SELECT coalesce(sum(count), 0) FROM chunks "
                                     "WHERE last_seq <= ?", (trim_to,)).fetchone()[0]
            self._count_dropped(plan.dropped)
            if deleted:
                db.execute("DELETE FROM chunks WHERE last_seq <= ?", (trim_to,))
            if parts:
                # (OR IGNORE: a commit whose result the loop never saw, e.g. cancelled at a
                # shutdown, may have written these already; they are the same rows)
                db.executemany("INSERT OR IGNORE INTO chunks VALUES "
                               "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows())
            db.executemany("INSERT INTO cursors VALUES (?, ?, ?) ON CONFLICT (sink) DO UPDATE "
                           "SET seq = excluded.seq, position = excluded.position",
                           [(sink, seq, encode_position(plan.positions.get(sink)))
                            for sink, seq in plan.cursors.items()])
            keys = (self.rows.write(db, plan.diff) if plan.diff is not None
                    else self.rows.dedup_rows)
            db.execute("COMMIT")
        except BaseException:
            rollback(db)
            raise
        self.rows.committed(plan.diff, keys)  # (only once committed)
        if deleted > _VACUUM_AFTER:
            with contextlib.suppress(sqlite3.Error):  # the commit stands whatever this does
                db.execute("PRAGMA incremental_vacuum").fetchall()
        return written

    def _count_dropped(self, dropped: dict[str, Any]) -> None:
        """Per lagging sink, the events the limits take from it (into ``dropped``)."""
        for sink, (need, upto, types) in list(dropped.items()):
            need = max(need, self.served.get(sink, 0) + 1)  # what it read, it holds
            lost = 0
            for seqs_b, types_b in self.db.execute(
                    "SELECT seqs, types FROM chunks WHERE last_seq >= ? AND last_seq <= ?",
                    (need, upto)):
                seqs, kinds = column("q", seqs_b), column("q", types_b)
                lost += sum(1 for q, t in zip(seqs, kinds, strict=True)
                            if q >= need and (types is None or t in types))
            dropped[sink] = lost

    # --- reading (a lagging sink; on the writer thread) -----------------------------------------
    def serve(self, sink: str, seq: int) -> None:
        """``sink`` was handed the events up to ``seq``."""
        if sink and seq > self.served.get(sink, 0):
            self.served[sink] = seq

    def read(self, start: int, limit: int, sink: str = "") -> list[Row]:
        """Up to ``limit`` events with seq >= ``start`` from disk, in order, bounded in bytes
        too (a lagging sink of large events). ``sink``: who reads (see ``served``)."""
        out: list[Row] = []
        size = 0
        for row in self.db.execute(
                "SELECT seqs, received, types, origins, raws, keys FROM chunks "
                "WHERE last_seq >= ? "
                "ORDER BY first_seq LIMIT ?", (start, limit // RANGE + 2)):
            for r in unpack(*row):
                if r[0] < start:
                    continue
                if out and (len(out) >= limit or size + len(r[4]) > READ_MAX_BYTES):
                    break
                out.append(r)
                size += len(r[4])
            else:
                continue
            break
        if out:
            self.serve(sink, out[-1][0])
        return out

    def forget_sink(self, sink: str) -> None:
        """A sink removed from the configuration: its cursor goes (were it added again, it
        would start at the live head, like any new sink)."""
        with self.db:
            self.db.execute("DELETE FROM cursors WHERE sink = ?", (sink,))
        self.cursors.pop(sink, None)
        self.positions.pop(sink, None)

    def left(self, sinks: dict[str, frozenset[int] | None], durable_seq: int
             ) -> dict[str, tuple[int, int]]:
        """Per sink: (events in the ledger past the cursor the ledger holds for it, that
        cursor): what the file says, not what was hoped."""
        committed = dict(self.db.execute("SELECT sink, seq FROM cursors"))
        out = {}
        for sink, types in sinks.items():
            cursor = committed.get(sink, durable_seq)
            out[sink] = (self._count_after(cursor, types) if self.spools_events else 0, cursor)
        return out

    def _count_after(self, cursor: int, types: frozenset[int] | None) -> int:
        """Events in the chunks past ``cursor`` that a sink with filter ``types`` takes."""
        n = 0
        for seqs_b, types_b in self.db.execute("SELECT seqs, types FROM chunks "
                                               "WHERE last_seq > ?", (cursor,)):
            seqs, kinds = column("q", seqs_b), column("q", types_b)
            n += sum(1 for q, t in zip(seqs, kinds, strict=True)
                     if q > cursor and (types is None or t in types))
        return n


def _load(path: Path, server: str) -> tuple[sqlite3.Connection, State]:
    """Connect and load the state; LedgerForeign if the file was written for another server."""
    db = connect(path, upgrade=True)
    try:
        state = load_state(db)
        owner = db.execute("SELECT value FROM meta WHERE key = 'server'").fetchone()
        if owner is not None and owner[0] != server:
            raise LedgerForeign(f"written for server {owner[0]!r}, this is {server!r}")
    except BaseException:
        db.close()
        raise
    return db, state

