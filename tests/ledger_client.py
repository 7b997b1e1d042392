"""A :class:`~cometstream.delivery.ledger.LedgerClient` for tests that drive a ledger alone."""

from __future__ import annotations

from collections.abc import Callable

from cometstream.delivery.ledger import Position
from cometstream.delivery.tracker import Tracker
from cometstream.store.state import StateDiff

__all__ = ["Client"]


class Client:
    """Sinks at fixed cursors (or ``cursors()`` when callable), nothing lagging, no positions.
    ``through`` (a seq, or a function of none): what a commit keeps, as with the memory buffer
    (None: what it writes, as with the disk buffer). ``tracker``: the delivery state settles
    there, as the daemon's does. Every field may be changed between commits."""

    def __init__(self, cursors: dict[str, int] | Callable[[], dict[str, int]], *,
                 through: int | Callable[[], int] | None = None,
                 tracker: Tracker | None = None) -> None:
        self.cursor_values = cursors
        self.through = through
        self.tracker = tracker
        self.dropped: dict[str, int] = {}

    def cursors(self) -> dict[str, int]:
        c = self.cursor_values
        return c() if callable(c) else dict(c)

    def positions(self, cursors: dict[str, int]) -> dict[str, Position]:
        return {}

    def lagging(self) -> dict[str, tuple[int, frozenset[int] | None]]:
        return {}

    def spool_dropped(self, sink: str, count: int) -> None:
        self.dropped[sink] = self.dropped.get(sink, 0) + count

    def delivered_through(self) -> int | None:
        t = self.through
        return t() if callable(t) else t

    def settle(self, through: int) -> StateDiff | None:
        if self.tracker is None:
            return None
        self.tracker.settle(through, live_until=None)
        return self.tracker.diff()

    def unsettle(self, diff: StateDiff) -> None:
        if self.tracker is not None:
            self.tracker.restore(diff)
