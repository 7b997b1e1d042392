"""Dead letters: per sink, the events it refused for good, with the reason (the ``dead_letters``
table). One reader and writer for the daemon (on the ledger's writer thread) and for
``cometstream dlq`` (beside a running daemon: SQLite's own locking, WAL readers never wait, a
delete waits up to its busy timeout for the daemon's commit).

Reads go a page at a time in id order, so any table size lists in bounded memory.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..events import Event
from .schema import connect, transaction

__all__ = ["DeadLetter", "DeadLetters"]

_COLUMNS = "id, sink, failed_at, error, seq, received_at, type, origin, raw"


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


def _where(sink: str | None = None, ids: Sequence[int] = (), older_than: float | None = None,
           max_id: int | None = None) -> tuple[str, list[Any]]:
    conds: list[str] = []
    params: list[Any] = []
    if sink is not None:
        conds.append("sink = ?")
        params.append(sink)
    if ids:
        conds.append(f"id IN ({','.join('?' * len(ids))})")
        params.extend(ids)
    if older_than is not None:
        conds.append("failed_at < ?")
        params.append(older_than)
    if max_id is not None:
        conds.append("id <= ?")
        params.append(max_id)
    return (" WHERE " + " AND ".join(conds)) if conds else "", params


class DeadLetters:
    """The dead letters of one ledger database (``db``: the daemon's connection, or a tool's
    from :meth:`open`). Selections: ``sink``, ``ids``, ``older_than`` (unix seconds) and
    ``max_id`` narrow them, together."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    @classmethod
    def open(cls, path: Path, *, busy_timeout_ms: int) -> DeadLetters:
        """An existing ledger, for a tool beside the daemon (never upgraded here); a write waits
        up to ``busy_timeout_ms`` for the daemon's own transaction. LedgerCorrupt or
        LedgerError if it cannot be used."""
        db = connect(path)
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        return cls(db)

    def close(self) -> None:
        self.db.close()

    # --- writing -------------------------------------------------------------------------------
    def add(self, sink: str, events: Iterable[Event], error: str) -> int:
        """Keep ``events`` refused by ``sink`` (one transaction); returns how many."""
        rows = [(sink, time.time(), error, ev.seq, ev.received_at, ev.type, ev.origin, ev.raw)
                for ev in events]
        self.add_rows(rows)
        return len(rows)

    def add_rows(self, rows: list[tuple[Any, ...]]) -> None:
        """Rows of (sink, failed_at, error, seq, received_at, type, origin, raw)."""
        transaction(self.db, lambda: self.db.executemany(
            "INSERT INTO dead_letters (sink, failed_at, error, seq, received_at, type, origin, "
            "raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows))

    def delete(self, ids: Sequence[int]) -> int:
        """Delete by id (one transaction); returns how many were there."""
        db = self.db

        def run() -> int:
            n = 0
            for i in range(0, len(ids), 500):
                chunk = list(ids[i:i + 500])
                n += db.execute(f"DELETE FROM dead_letters WHERE id IN "
                                f"({','.join('?' * len(chunk))})", chunk).rowcount
            return n

        return transaction(db, run)  # type: ignore[no-any-return]

    # --- reading -------------------------------------------------------------------------------
    def rows(self, *, sink: str | None = None, ids: Sequence[int] = (),
             max_id: int | None = None, limit: int | None = None,
             page: int = 500) -> Iterator[DeadLetter]:
        """Dead letters in id order, read a page at a time (bounded memory for any table
        size)."""
        where, params = _where(sink, ids, None, max_id)
        after = 0
        left = limit
        while left is None or left > 0:
            n = page if left is None else min(page, left)
            q = (f"SELECT {_COLUMNS} FROM dead_letters{where}"
                 f"{' AND' if where else ' WHERE'} id > ? ORDER BY id LIMIT ?")
            batch = [DeadLetter(*row) for row in self.db.execute(q, [*params, after, n])]
            yield from batch
            if len(batch) < n:
                return
            after = batch[-1].id
            if left is not None:
                left -= len(batch)

    def sinks(self) -> list[str]:
        """The sinks that have dead letters, by name."""
        return [r[0] for r in self.db.execute(
            "SELECT DISTINCT sink FROM dead_letters ORDER BY sink")]

    def has(self, sink: str) -> bool:
        return self.db.execute("SELECT 1 FROM dead_letters WHERE sink = ? LIMIT 1",
                               (sink,)).fetchone() is not None

    def summary(self, sink: str | None = None) -> list[tuple[str, int, float, float]]:
        """Per sink: (sink, count, oldest and newest failed_at), by sink name."""
        where, params = _where(sink)
        return self.db.execute(f"SELECT sink, count(*), min(failed_at), max(failed_at) "
                               f"FROM dead_letters{where} GROUP BY sink ORDER BY sink",
                               params).fetchall()

    def span(self, sink: str | None = None, ids: Sequence[int] = (),
             max_id: int | None = None) -> tuple[int, int | None, int | None]:
        """(count, highest id, lowest id) of a selection."""
        where, params = _where(sink, ids, None, max_id)
        count, high, low = self.db.execute(
            f"SELECT count(*), max(id), min(id) FROM dead_letters{where}", params).fetchone()
        return count, high, low

    def select(self, sink: str | None = None, ids: Sequence[int] = (),
               older_than: float | None = None) -> list[tuple[int, str]]:
        """(id, sink) of a selection, in id order."""
        where, params = _where(sink, ids, older_than)
        return self.db.execute(f"SELECT id, sink FROM dead_letters{where} ORDER BY id",
                               params).fetchall()
