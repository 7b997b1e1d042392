"""The de-duplication window: fingerprints of the dedup keys of kept job events, bounded in age
and size, plus the keys still in flight.

The ledger stores the window as rows and writes only what changed: each key kept since the last
commit (:attr:`Dedup.journal`) is inserted, and keys that left the window are deleted by age
(``ts < horizon``) or, beyond ``max_size``, oldest first. Nothing is rewritten whole.
"""

from __future__ import annotations

from collections.abc import Iterable

from .identity import fingerprint

__all__ = ["Dedup"]

#: the shared timestamps kept before a prune first looks for those that left the window
_TS_MIN = 4096


class Dedup:
    """``seen(key)`` is true for a key kept within the window or published and not yet kept.
    Only kept keys reach the ledger: a crash before an event is kept must not make the next
    resync skip it. Methods take a key (``str``) or its :func:`fingerprint`."""

    def __init__(self, *, max_age: float = 86400.0, max_size: int = 200_000) -> None:
        self.max_age = max_age
        self.max_size = max_size
        self.delivered: dict[int, int] = {}  # fingerprint -> timestamp, insertion ordered
        self.inflight: dict[int, int] = {}  # fingerprint -> seq
        self.duplicates = 0
        #: (fingerprint, timestamp) kept since the ledger's last commit, in order
        self.journal: list[tuple[int, int]] = []
        #: the age horizon of the last prune (the ledger deletes rows older than it)
        self.horizon = 0
        # timestamps repeat (many events a second): one int object per second, not per key
        self._ts: dict[int, int] = {}
        #: past this many shared timestamps, a prune forgets those that left the window (so
        #: they number up to twice the seconds the window holds: 172,800 for a day)
        self._ts_limit = _TS_MIN

    def seen(self, key: str | int) -> bool:
        fp = fingerprint(key)
        return fp in self.delivered or fp in self.inflight

    def acked(self, key: str | int, ts: int) -> None:
        self.acked_fp(fingerprint(key), ts)

    def acked_fp(self, fp: int, ts: int) -> None:
        """The key is kept."""
        self.acked_all([(fp, ts)])

    def acked_all(self, kept: list[tuple[int, int]]) -> None:
        """Keys kept, in order, (fingerprint, timestamp) each (the hot path: a settle's kept
        job events, at once)."""
        inflight, d, shared = self.inflight, self.delivered, self._ts.setdefault
        for fp, ts in kept:
            inflight.pop(fp, None)
            if fp in d:
                del d[fp]  # move to the newest end
            d[fp] = shared(ts, ts)
        self.journal.extend(kept)

    def forget_inflight(self, key: str | int) -> None:
        self.inflight.pop(fingerprint(key), None)

    def prune(self, now: float) -> None:
        d = self.delivered
        horizon = int(now - self.max_age)
        if horizon > self.horizon:
            self.horizon = horizon
        excess = len(d) - self.max_size
        if not d:
            return
        drop: list[int] = []
        for fp, ts in d.items():
            if excess > 0 or ts < horizon:
                drop.append(fp)
                excess -= 1
            else:
                break
        for fp in drop:
            del d[fp]
        if len(self._ts) > self._ts_limit:
            # forget the shared timestamps that left the window. That is a look at each, so
            # only once they have doubled since the last time: a full window drops keys at
            # every prune, and a look at each second of a day then would cost a few
            # milliseconds per acknowledgement, however few events it acknowledges
            self._ts = {ts: ts for ts in self._ts if ts >= horizon}
            self._ts_limit = max(_TS_MIN, 2 * len(self._ts))

    def load(self, rows: Iterable[tuple[int, int]]) -> None:
        """From the ledger (or a migrated checkpoint): (fingerprint, timestamp), oldest first."""
        d = self.delivered
        shared = self._ts
        for fp, ts in rows:
            if fp in d:
                del d[fp]
            d[fp] = shared.setdefault(ts, ts)

    def take_journal(self) -> list[tuple[int, int]]:
        out, self.journal = self.journal, []
        return out

    def restore_journal(self, rows: list[tuple[int, int]]) -> None:
        """A commit failed: its rows go again with the next one (at most a window's worth: older
        ones would leave the window at once)."""
        rows.extend(self.journal)
        self.journal = rows[-self.max_size:] if len(rows) > self.max_size else rows

    def __len__(self) -> int:
        return len(self.delivered)
