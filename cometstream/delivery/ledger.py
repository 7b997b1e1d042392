"""The ledger: the one writer to the store (:mod:`cometstream.store`), so that what it says was
received, delivered, de-duplicated and tracked is always one consistent moment: one transaction
per commit.

Each commit writes only what changed since the last one: the new events some sink still needs
(an event every sink already has is never written), the moved cursors and the changes of the
delivery state (:mod:`cometstream.store.statedb`). Nothing is rewritten whole: the write rate
follows the event rate, not the size of the window.

The read loop never waits for the disk: :attr:`Ledger.pending` holds what was published and not
yet committed, and a writer thread commits every ``fsync_interval`` (``synchronous=FULL``: one
fsync per commit). Everything the database does runs on that one thread, in order: commits,
reads of a lagging sink, trims and dead letters. What is pending is served from memory.

What a commit needs from the rest of the daemon (where each sink is, the delivery state that
makes true) it asks through one :class:`LedgerClient`, handed over at construction; the commit
itself is planned by pure functions (:mod:`cometstream.store.plan`) and applied by
:meth:`cometstream.store.Store.commit`.

Limits: beyond ``max_bytes`` (the events' bytes) or ``max_age`` the oldest events are deleted
even if a sink has not read them; each lagging sink's loss is counted (reason ``spool_limit``)
and logged.

A commit that fails on the disk (SQLite, OSError: a full disk) is retried, its events staying in
memory, and the read loop waits for room rather than memory growing without bound. Any other
failure is a bug: it is logged once with its traceback, and whatever waits for room gets the
error instead of waiting for a commit that may never come.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from pathlib import Path
from typing import Final, Protocol

import structlog

from .._thread import WriterThread
from ..errors import LedgerError
from ..events import Event
from ..store import FILENAME, CommitPlan, Position, Store
from ..store.plan import cap_cursors, head, is_idle, lost_to_limits, trim_point
from ..store.state import State, StateDiff
from ..store.store import Chunks

__all__ = ["COMMIT_SOON", "COMMIT_SOON_BYTES", "PENDING_MAX", "PENDING_MAX_BYTES", "Ledger",
           "LedgerClient", "Position"]

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

log = structlog.get_logger("cometstream.ledger")


class LedgerClient(Protocol):
    """What the ledger asks of the daemon at each commit: the pipeline's side (where each sink
    stands) and the tracker's (the delivery state that makes true)."""

    def cursors(self) -> dict[str, int]:
        """Per sink, the seq it is done with (delivered, filtered or refused)."""

    def positions(self, cursors: dict[str, int]) -> dict[str, Position]:
        """Per sink, where its output stood once it was done up to its cursor in ``cursors``."""

    def lagging(self) -> dict[str, tuple[int, frozenset[int] | None]]:
        """Per sink reading from the spool: (next seq it needs, its type filter), to count what
        the limits take from it."""

    def spool_dropped(self, sink: str, count: int) -> None:
        """The limits deleted ``count`` events before ``sink`` got them."""

    def delivered_through(self) -> int | None:
        """Up to which seq every event is delivered, when that is what a commit keeps (the
        memory buffer); None when a commit keeps what it writes (the disk buffer)."""

    def settle(self, through: int) -> StateDiff | None:
        """Every event up to ``through`` is kept: settle it and return what changed in the
        delivery state since the last commit (None: no delivery state)."""

    def unsettle(self, diff: StateDiff) -> None:
        """Take back a diff whose commit failed (it goes with the next one)."""


class Ledger:
    """The ledger of one daemon. Created closed; :meth:`open` opens the store (migrating the
    files of earlier versions, checking its integrity, loading the state). ``events``: whether
    events are spooled (``[spool] buffer = "disk"``); without, it keeps the delivery state and
    cursors. ``client``: see :class:`LedgerClient`; without one (a tool, a test), commits keep
    the cursors as they are and no delivery state."""

    def __init__(self, directory: Path, sinks: Sequence[str], *, server: str, max_bytes: int,
                 max_age: float, fsync_interval: float, events: bool = True,
                 client: LedgerClient | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.dir = directory
        self.path = directory / FILENAME
        self.server = server
        self.sink_names = list(sinks)
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.fsync_interval = fsync_interval
        self.spools_events = events
        self.client = client
        self.clock = clock
        self._store: Store | None = None
        self._thread: WriterThread | None = None
        self._chunks = Chunks()
        #: published, not yet committed (in seq order; disk buffer only), and their bytes
        self.pending: deque[Event] = deque()
        self.pending_bytes = 0
        #: highest seq committed to disk, or that every sink was done with before it had to be
        self.durable_seq = 0
        #: per sink, the committed cursor and where its output stood then (see ``Position``)
        self.cursors: dict[str, int] = {}
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
        self._committed: asyncio.Future[None] | None = None
        self._kicked: asyncio.Future[None] | None = None
        self._stopping = False
        #: waiting for a commit that starts after they asked (:meth:`checkpoint`)
        self._checkpoints: list[asyncio.Future[None]] = []
        #: set once :meth:`run` is gone for good: nothing makes room any more
        self._dead: LedgerError | None = None

    # --- lifecycle -------------------------------------------------------------------------------
    def open(self) -> int:
        """Open (or create, or migrate) the ledger; returns the highest seq spooled in it (0 if
        none). A damaged file is quarantined and replaced; one written for another server too.
        Raises LedgerError if the files of an earlier version cannot be migrated."""
        store = Store.open(self.dir, self.server, spools_events=self.spools_events)
        self._store, self._chunks = store, store.chunks
        self.state, self.quarantined, self.migrated = store.state, store.quarantined, \
            store.migrated
        self.cursors, self.positions = store.cursors, store.positions
        last_cursor = max(self.cursors.values(), default=0)
        self.durable_seq = max(store.top, last_cursor) if self.spools_events else 0
        for name in self.sink_names:
            # a new sink starts at the end (it gets what arrives from now on)
            self.cursors.setdefault(name, self.durable_seq)
        self._thread = WriterThread("ledger")
        return self.durable_seq

    @property
    def bytes(self) -> int:
        """The spooled events' bytes on disk."""
        return self._chunks.bytes

    @property
    def events(self) -> int:
        """The events on disk."""
        return self._chunks.events

    @property
    def oldest_received_at(self) -> float:
        """When the oldest event on disk was received (0.0: none)."""
        return self._chunks.oldest_received_at

    async def close(self, sinks: dict[str, frozenset[int] | None] | None = None) -> None:
        """Commit what is pending, with the cursors and the state; close the database.
        ``sinks`` (name → type filter): then :attr:`left` says, per sink, what the file holds
        for it and what it lost, whether the last commit succeeded or not."""
        if self._thread is None:
            return
        try:
            await self.commit()
        finally:
            store, self._store = self._store, None
            thread, self._thread = self._thread, None
            try:
                if sinks is not None and store is not None:
                    current = self.client.cursors() if self.client is not None else {}
                    try:
                        kept = await thread.run(store.left, sinks, self.durable_seq)
                        self.left = self._left(kept, current, sinks)
                    except sqlite3.Error as exc:
                        log.error("cannot count the events left in the ledger", error=str(exc))
            finally:
                if store is not None:
                    await thread.run(store.close)
                thread.close()

    def _left(self, kept: dict[str, tuple[int, int]], current: dict[str, int],
              sinks: dict[str, frozenset[int] | None]) -> dict[str, tuple[int, int]]:
        """Per sink: what the file holds for it, and what is lost (pending past what it got)."""
        left = {}
        for sink, types in sinks.items():
            count, cursor = kept[sink]
            got = max(current.get(sink, cursor), cursor)
            left[sink] = (count, sum(1 for ev in self.pending
                                     if ev.seq > got and (types is None or ev.type in types)))
        return left

    # --- the pending buffer and back-pressure ---------------------------------------------------
    def release(self, floor: int) -> None:
        """Every sink is done with every event up to ``floor``: those still waiting for the disk
        need not go there (with healthy sinks, nearly all of them). Their keys and state go with
        the next commit."""
        self._pop_through(floor)
        if floor > self.durable_seq:
            self.durable_seq = floor
        if not self.full:
            self._wake_waiters()

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

    async def wait_for_room(self) -> None:
        """Until what waits in memory for the disk is below ``PENDING_MAX`` events and
        ``PENDING_MAX_BYTES`` again (a disk slower than the stream, or one that is full, makes
        the read loop wait rather than memory grow without bound). LedgerError if the commits
        fail for another reason, or the commit loop is gone: no commit would make room."""
        while self.full:
            if self._dead is not None:
                raise self._dead
            self.kick()
            if self._committed is None or self._committed.done():
                self._committed = asyncio.get_running_loop().create_future()
            await self._committed

    def _wake_waiters(self, error: BaseException | None = None) -> None:
        c = self._committed
        if c is not None and not c.done():
            if error is None:
                c.set_result(None)
            else:
                c.set_exception(error)

    # --- the commit loop -------------------------------------------------------------------------
    def kick(self) -> None:
        """Commit now rather than at the end of the interval (a burst: memory stays small)."""
        if self._kicked is not None and not self._kicked.done():
            self._kicked.set_result(None)

    async def checkpoint(self) -> None:
        """Until a commit that started after this call has succeeded (at once while the
        commit loop does not run)."""
        if self._thread is None or self._stopping or self._dead is not None:
            return
        fut = asyncio.get_running_loop().create_future()
        self._checkpoints.append(fut)
        self.kick()
        await fut

    async def forget(self, sink: str) -> None:
        """Drop the cursor of a sink removed from the configuration."""
        store, thread = self._store, self._thread
        self.cursors.pop(sink, None)
        self.positions.pop(sink, None)
        if store is not None and thread is not None:
            await thread.run(store.forget_sink, sink)

    def stop(self) -> None:
        """End :meth:`run` after the commit in progress (a commit is never cut in half: the
        loop would not know what it wrote)."""
        self._stopping = True
        self.kick()

    async def run(self) -> None:
        """Commit every ``fsync_interval`` (sooner when kicked) until :meth:`stop`."""
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping:
                self._kicked = loop.create_future()
                if not self._checkpoints:  # (else a checkpoint asked during the last commit)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._kicked, self.fsync_interval)
                if self._stopping:
                    return  # (close() makes the last commit)
                asked, self._checkpoints = self._checkpoints, []
                try:
                    await self.commit()
                except (sqlite3.Error, OSError) as exc:  # the disk: retried, waiters wait
                    self._failed(str(exc))
                    self._checkpoints[:0] = asked
                except Exception as exc:  # noqa: BLE001 - a bug: said once, with its traceback
                    self._failed(f"{exc.__class__.__name__}: {exc}", exc)
                    self._checkpoints[:0] = asked
                else:
                    for fut in asked:
                        if not fut.done():
                            fut.set_result(None)
                    if self.last_error:
                        log.info("ledger writes recovered")
                    self.last_error = ""
                    self.failing_since = 0.0
        except BaseException as exc:
            # the loop itself is gone (cancelled, or a bug outside a commit): whatever waits for
            # room would wait for ever
            self._dead = LedgerError("the ledger's commit loop stopped")
            if not isinstance(exc, asyncio.CancelledError):
                self._failed(f"{exc.__class__.__name__}: {exc}", exc)
            self._wake_waiters(self._dead)
            for fut in self._checkpoints:
                if not fut.done():
                    fut.set_exception(self._dead)
            self._checkpoints = []
            raise

    def _failed(self, msg: str, unexpected: BaseException | None = None) -> None:
        """A commit failed: counted, logged when the error changes, and (``unexpected``: not the
        disk) handed to whatever waits for room."""
        self.write_errors += 1
        if not self.last_error:
            self.failing_since = time.monotonic()
        if msg != self.last_error:
            if unexpected is None:
                log.error("ledger write failed (retrying; events stay in memory)",
                          error=msg, pending=len(self.pending))
            else:
                log.error("ledger commit failed unexpectedly (retrying; events stay in memory)",
                          error=msg, pending=len(self.pending), exc_info=unexpected)
        self.last_error = msg
        if unexpected is not None:
            error = LedgerError(f"ledger commit failed: {msg}")
            error.__cause__ = unexpected
            self._wake_waiters(error)

    async def commit(self) -> None:
        """Write what is pending in transactions of at most ``COMMIT_MAX`` events, with the
        cursors and the state they make true; delete what every sink is done with or what the
        limits no longer allow."""
        store, thread = self._store, self._thread
        if store is None or thread is None:
            return
        lost: dict[str, int] = {}
        retrimmed = False
        while True:
            plan = self._plan(store)
            if plan is None:
                break  # nothing to write: no transaction, no fsync (an idle daemon)
            try:
                written = await thread.run(store.commit, plan)
            except BaseException:
                if plan.diff is not None and self.client is not None:
                    self.client.unsettle(plan.diff)
                raise
            self._applied(plan, written)
            for sink, count in plan.dropped.items():
                lost[sink] = lost.get(sink, 0) + count
            self._wake_waiters()
            if len(self.pending) >= COMMIT_SOON or self.pending_bytes >= COMMIT_SOON_BYTES:
                # more arrived during this commit than would kick one: the next goes now
                continue
            if written and self._chunks.bytes > self.max_bytes and not retrimmed:
                retrimmed = True  # what this commit wrote went over the limit: trim it now
                continue
            break
        # reported once the spool is back within its limits
        for sink, count in lost.items():
            if count and self.client is not None:
                self.client.spool_dropped(sink, count)

    def _plan(self, store: Store) -> CommitPlan | None:
        """The next transaction (None: it would write nothing)."""
        client = self.client
        batch, batch_bytes = head(self.pending, len(self.pending), self.max_bytes)
        kept = client.delivered_through() if client is not None else None
        # memory buffer: kept = delivered everywhere; disk buffer: kept = in this commit, or
        # done with by every sink
        through = kept if kept is not None else max(batch[-1].seq if batch else 0,
                                                    self.durable_seq)
        cursors = cap_cursors(client.cursors() if client is not None else self.cursors, through)
        positions = client.positions(cursors) if client is not None else {}
        diff = client.settle(through) if client is not None else None
        plan = CommitPlan(batch, cursors, positions, diff)
        done = min(cursors.values(), default=batch[-1].seq if batch else self.durable_seq)
        forced = trim_point(self._chunks.metas, self._chunks.bytes + batch_bytes, done,
                            now=self.clock(), max_bytes=self.max_bytes, max_age=self.max_age)
        plan.trim_to = done
        if forced > done:
            plan.trim_to = forced
            plan.dropped = lost_to_limits(forced, client.lagging() if client is not None else {})
        if is_idle(plan, self.cursors, self.positions, self._chunks.first_last(),
                   diff is None or store.rows.unchanged(diff)):
            return None
        return plan

    def _applied(self, plan: CommitPlan, written: list[list[object]]) -> None:
        """The plan's transaction committed: what it wrote and deleted leaves memory."""
        self.commits += 1
        if plan.batch:
            last = plan.batch[-1].seq
            self._pop_through(last)  # (release() may have taken some)
            if last > self.durable_seq:
                self.durable_seq = last
        self.cursors.update(plan.cursors)
        self.positions.update(plan.positions)
        self._chunks.trim(plan.trim_to)
        for meta in written:
            self._chunks.add(meta)

    # --- reading (a lagging sink) --------------------------------------------------------------
    async def read(self, start: int, limit: int, server: str, sink: str = "") -> list[Event]:
        """Up to ``limit`` events with seq >= ``start``, in order: from memory if they are still
        pending, else from disk. ``sink``: who reads (the limits do not count what it holds as
        lost for it)."""
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
        store, thread = self._store, self._thread
        if store is None or thread is None:
            return []
        rows = await thread.run(store.read, start, limit, sink)
        if not rows and pending:
            out = list(islice(pending, limit))  # committed and deleted meanwhile: memory
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
        if self._store is not None:
            self._store.serve(sink, seq)

    # --- dead letters ----------------------------------------------------------------------------
    async def add_dead_letters(self, sink: str, events: Iterable[Event], error: str) -> int:
        store, thread = self._store, self._thread
        if store is None or thread is None:
            return 0
        return await thread.run(store.dead_letters.add, sink, list(events), error)
