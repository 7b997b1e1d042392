"""Routing: one sink's filter, bounded memory queue and overflow policy, and where its delivery
stands (in flight, acknowledged, behind in the store).

A :class:`Route` is plain state with a few small methods: the pipeline's ``publish`` fills its
queue, the delivery engine (``engine.py``) empties it, the acknowledgements (``ack.py``) move
its cursor. It wakes the engine when there is something to do, and releases producers waiting
for room in its queue.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Final

from ..errors import SinkError

if TYPE_CHECKING:
    from ..config import SinkConfig
    from ..events import Event
    from ..observe.metrics import SinkStats
    from ..sinks.base import Position, Sink
    from .ack import DeadLetters

__all__ = ["QUEUE_BYTES", "Route"]

#: a route's memory queue holds at most this many bytes of events (besides ``buffer`` events):
#: beyond, it overflows like a full queue (to the ledger, or ``when_full``)
QUEUE_BYTES: Final = 64 * 1024 * 1024


def _at_least_one(value: object, default: int = 1) -> int:
    """A declared integer capability, as the pipeline uses it (anything else: ``default``)."""
    return value if isinstance(value, int) and value >= 1 else default


class Route:
    """One sink with its filter, queue and delivery state."""

    def __init__(self, cfg: SinkConfig, sink: Sink, stats: SinkStats, *, batch_max: int,
                 dead_letter: DeadLetters | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.sink = sink
        self.stats = stats
        self.types = cfg.types
        self.maxlen = cfg.buffer
        self.drop_when_full = cfg.when_full == "drop_newest"
        self.queue: deque[Event] = deque()
        #: the queued events' bytes, and their bound
        self.queued_bytes = 0
        self.max_bytes = QUEUE_BYTES
        #: events taken from the queue (or the store) and not yet acknowledged or refused
        self.inflight = 0
        #: seq of the first event in flight (0: none), and when it was received
        self.inflight_first = 0
        self.inflight_since = 0.0
        self.acked_seq = 0
        #: with a spool: False while the sink is behind what its memory queue holds and reads
        #: from the spool, from ``next_seq`` on (the read loop then skips it entirely)
        self.live = True
        self.next_seq = 0
        #: when the oldest event the sink still waits for was received (0: caught up)
        self.behind_since = 0.0
        self.opened = False
        self.abandoned = False
        #: a reload replaces or removes the sink: its engine finishes the sends in flight and
        #: stops, taking nothing new (the queue stays for the sink's next instance)
        self.retiring = False
        #: the route that took this one's place (a reload)
        self.successor: Route | None = None
        #: the worker died of an unexpected exception: the sink gets nothing more
        self.crashed: BaseException | None = None
        # --- the sink's declared capabilities (``Sink``), as the engine uses them
        #: sends in flight at once; 1: one batch after the other
        self.concurrency = _at_least_one(sink.concurrency)
        #: the most events one send gets: what is queued (up to ``batch_max``) with one send
        #: at a time, the sink's ``max_batch`` with several
        self.unit_max = _at_least_one(sink.max_batch) if self.concurrency > 1 else batch_max
        #: counted failures of one send before it is dead-lettered; None = forever
        mr = sink.max_retries
        self.max_retries: int | None = mr if isinstance(mr, int) else None
        # --- acknowledgements and recovery (``ack.py``)
        #: where the sink's output stood at its last acknowledgement (``sink.position()``, if
        #: it tracks one: a file sink's inode and offset), committed with its cursor
        self.position: Position = None
        self.tracks_position = sink.tracks_position
        #: (acked seq, position) since the last commit's lookup, oldest first
        self.history: deque[tuple[int, Position]] = deque()
        #: the sink recognises output a crash left past its committed position until it has
        #: every event up to ``recover_until`` (0: not yet known)
        self.recovering = False
        self.recover_until = 0
        self.dead_letter = dead_letter
        # --- retries (``retry.py``)
        #: loop time before which no new send starts (a receiver's ``Retry-After``)
        self.pause_until = 0.0
        #: sends that failed and are being retried
        self.retrying = 0
        #: sends accepted so far (with several in flight, a failure counts toward
        #: ``max_retries`` only if this moved since the send's previous failure)
        self.accepted_sends = 0
        self.last_warned = 0.0
        #: a failure was logged at warning level since the sink last recovered, and which
        self.warned = False
        self.warned_error = ""
        self.last_rejection = ""
        #: set while the engine waits and would take new events (``publish`` resolves it)
        self.wakeup: asyncio.Future[None] | None = None
        #: set while the engine waits at all (a send's end resolves it too)
        self._idle: asyncio.Future[None] | None = None
        self._space: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        return len(self.queue) + self.inflight

    @property
    def failing(self) -> bool:
        return self.stats.failing

    def waiting_since(self) -> float:
        """When the oldest event the sink has not got yet was received (0: it has them all)."""
        if self.inflight_first:
            return self.inflight_since
        if self.queue:
            return self.queue[0].received_at
        return self.behind_since if not self.live else 0.0

    def done_through(self, published: int) -> int:
        """The highest seq such that the sink is done with every event up to it."""
        if self.inflight_first:
            return self.inflight_first - 1
        if self.queue:
            return self.queue[0].seq - 1
        if not self.live:
            return self.next_seq - 1
        return published

    # --- the queue ---------------------------------------------------------------------------------
    def fall_behind(self, seq: int) -> None:
        """The queue is full at event ``seq``: from it on, the sink reads from the store (the
        read loop skips it until it has caught up)."""
        self.live = False
        self.next_seq = seq
        self.wake()

    def wake(self) -> None:
        """Something for the engine to do (new events, a send ended, the pipeline closing)."""
        w = self._idle
        if w is not None:
            self._idle = self.wakeup = None
            if not w.done():
                w.set_result(None)

    async def idle(self, *, take: bool) -> None:
        """The engine's wait until :meth:`wake`; ``take``: new events wake it too (else only
        the end of a send does: no wake-up per event while nothing can be sent)."""
        fut = self._idle = asyncio.get_running_loop().create_future()
        if take:
            self.wakeup = fut
        await fut

    def space_freed(self) -> None:
        s = self._space
        if s is not None:
            self._space = None
            if not s.done():
                s.set_result(None)

    async def wait_for_space(self) -> None:
        """Until the queue is below its bound again (it may be over it by the events of
        producers that are waiting here). Raises :class:`SinkError` if the worker died."""
        while len(self.queue) > self.maxlen or self.queued_bytes > self.max_bytes:
            if self.successor is not None:
                await self.successor.wait_for_space()
                return
            if self.crashed is not None:
                raise SinkError(self.name, "worker stopped", retryable=False)
            if self._space is None or self._space.done():
                self._space = asyncio.get_running_loop().create_future()
            await self._space

    def replaces(self, old: Route) -> None:
        """This route replaces ``old`` (a reload): producers waiting for room in the old queue
        now wait for room in this one."""
        old.successor = self
        old.space_freed()

    def crash(self, exc: BaseException) -> None:
        """The worker died of ``exc``: the sink takes nothing more. Producers waiting for
        room are released with an error; new events no longer wait for it."""
        self.crashed = exc
        self.drop_when_full = True
        s = self._space
        if s is not None:
            self._space = None
            if not s.done():
                s.set_exception(SinkError(self.name, "worker stopped", retryable=False))
                s.exception()  # (retrieved: a producer may have stopped waiting meanwhile)
