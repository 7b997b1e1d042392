"""A commit, planned without I/O: what the next transaction writes and deletes, computed from
what waits in memory, the sinks' cursors and what is on disk; :meth:`.Store.commit` then applies
the plan in one transaction.

What every sink already has is never written; a sink's cursor is committed no further than what
the commit keeps; beyond ``max_bytes`` (the events' bytes) or ``max_age`` the oldest chunks are
deleted even if a sink has not read them, and each lagging sink's loss is counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Final

from ..events import Event
from .codec import Position
from .state import StateDiff

__all__ = ["COMMIT_MAX", "COMMIT_MAX_BYTES", "ChunkMeta", "CommitPlan", "cap_cursors", "head",
           "is_idle", "lost_to_limits", "trim_point"]

#: events committed per transaction at most (a burst is written in pieces of this size)
COMMIT_MAX: Final = 20_000
#: bytes committed per transaction at most (with ``COMMIT_MAX``)
COMMIT_MAX_BYTES: Final = 32 * 1024 * 1024

#: a committed chunk: [first seq, last seq, bytes, oldest and newest received_at, count]
ChunkMeta = list[Any]
#: per sink reading from the spool: (next seq it needs, its type filter)
Lagging = Mapping[str, tuple[int, frozenset[int] | None]]


@dataclass(slots=True)
class CommitPlan:
    """One transaction: the chunks of ``batch`` beyond every cursor, the cursors and positions,
    the state ``diff``, and the deletion up to ``trim_to`` (``dropped``: per lagging sink, the
    range (need, up to, types) the limits take from it; counted into a number when applied)."""

    batch: list[Event]
    cursors: dict[str, int]
    positions: dict[str, Position]
    diff: StateDiff | None
    trim_to: int = 0
    dropped: dict[str, Any] = field(default_factory=dict)


def head(pending: Iterable[Event], waiting: int, max_bytes: int) -> tuple[list[Event], int]:
    """The events the next transaction takes from ``pending`` (``waiting`` of them), and their
    bytes: at most ``COMMIT_MAX`` events, and the bytes that fit half the limit (a commit larger
    than the room the limit leaves would have to trim what it just wrote, and the spool would be
    over ``max_bytes`` until it had)."""
    batch = list(islice(pending, min(waiting, COMMIT_MAX)))
    budget = min(max_bytes // 2, COMMIT_MAX_BYTES)
    total = 0
    for i, ev in enumerate(batch):
        size = len(ev.raw)
        if total + size > budget and i:
            return batch[:i], total
        total += size
    return batch, total


def cap_cursors(cursors: Mapping[str, int], through: int) -> dict[str, int]:
    """A sink's cursor (and its output's position) is committed no further than what this
    commit keeps: past it, a crash loses the events' keys, the resync brings them back, and a
    file sink must find their lines after its committed position."""
    return {k: v if v <= through else through for k, v in cursors.items()}


def trim_point(chunks: Iterable[ChunkMeta], size: int, done: int, *, now: float,
               max_bytes: int, max_age: float) -> int:
    """Up to which seq the limits force chunks out (0: none), oldest first: ``size`` is the
    spool's bytes with the batch, ``done`` the seq every sink is done with."""
    forced = 0
    for _first, last, bsize, _oldest, newest, _count in chunks:
        if last <= done:
            size -= bsize
            continue
        if size > max_bytes or newest < now - max_age:
            forced = last
            size -= bsize
            continue
        break
    return forced


def lost_to_limits(forced: int, lagging: Lagging) -> dict[str, tuple[int, int, Any]]:
    """Per lagging sink, the range it loses when the limits delete up to ``forced``."""
    return {sink: (need, forced, types) for sink, (need, types) in lagging.items()
            if need <= forced}


def is_idle(plan: CommitPlan, cursors: Mapping[str, int], positions: Mapping[str, Position],
            first_chunk_last: int | None, state_unchanged: bool) -> bool:
    """Whether the plan writes nothing (an idle daemon: no transaction, no fsync)."""
    return (not plan.batch and not plan.dropped and plan.cursors == cursors
            and plan.positions == {k: positions.get(k) for k in plan.positions}
            and (plan.trim_to <= 0 or first_chunk_last is None or first_chunk_last > plan.trim_to)
            and state_unchanged)
