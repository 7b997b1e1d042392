"""The pipeline: per sink a filter, a bounded buffer with an overflow policy, and a worker.

``publish(event)`` is called by the read loop for every event. It is synchronous and cheap: for
each route it tests the filter and appends to the route's queue. Only a route whose policy is
``block`` and whose queue is full makes ``publish`` return an awaitable (the read loop waits, as
the operator chose); ``drop_newest`` counts the event as dropped and moves on.

Each route's worker takes what is queued (up to ``batch_max``) and calls ``sink.send(batch)``.
A retryable :class:`~cometstream.errors.SinkError` (or an unexpected exception) retries the same
batch with backoff, the route reporting itself failing meanwhile; a permanent one drops the batch,
counted as ``rejected``. Success is an acknowledgement: it moves the route's acked sequence number,
feeds the latency histogram and calls the ack listeners. ``delivered_through()`` is the highest
sequence number that every route has finished with (acked, filtered or dropped): the checkpoint's
watermark.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Final

import orjson
import structlog

from .backoff import Backoff
from .config import SinkConfig
from .errors import SinkError
from .events import Event
from .observe.logging import scrub
from .observe.metrics import Metrics, SinkStats
from .sinks.base import Sink
from .delivery.ledger import Ledger, Position

__all__ = ["BATCH_MAX", "Buffer", "DiskBuffer", "MemoryBuffer", "Pipeline", "Route"]

BATCH_MAX: Final = 1024
#: a route's memory queue holds at most this many bytes of events (besides ``buffer`` events):
#: beyond, it overflows like a full queue (to the ledger, or ``when_full``)
QUEUE_BYTES: Final = 64 * 1024 * 1024
FAILING_REMINDER: Final = 60.0
#: with several sends in flight, at most one failure warning this often (seconds)
WARN_GAP: Final = 10.0
log = structlog.get_logger("cometstream.pipeline")

AckListener = Callable[["Route", Sequence[Event]], None]


class Route:
    """One sink with its filter, queue and worker state."""

    def __init__(self, cfg: SinkConfig, sink: Sink, stats: SinkStats) -> None:
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
        self.inflight = 0
        #: seq of the first event of the batch in flight (0: none), and when it was received
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
        #: where the sink's output stood at its last acknowledgement (``sink.position()``, if
        #: it has one: a file sink's inode and offset), committed with its cursor
        self.position: Position = None
        self._position_fn = getattr(sink, "position", None)
        #: (acked seq, position) since the last commit's lookup, oldest first
        self.history: deque[tuple[int, Position]] = deque()
        #: the sink recognises output a crash left past its committed position until it has
        #: every event up to ``recover_until`` (0: not yet known)
        self.recovering = False
        self.recover_until = 0
        #: a sink may bound the retries of one batch (webhook ``max_retries``); None = forever
        mr = getattr(sink, "max_retries", None)
        self.max_retries: int | None = mr if isinstance(mr, int) else None
        #: a sink may take several ``send`` calls at once (webhook ``concurrency``), each of at
        #: most ``max_batch`` events: the pipeline then keeps a window of them (``_window``)
        cc = getattr(sink, "concurrency", 1)
        self.concurrency = cc if isinstance(cc, int) and cc > 1 else 1
        mb = getattr(sink, "max_batch", 1)
        self.unit_max = mb if isinstance(mb, int) and mb > 0 else 1
        #: loop time before which no new send starts (a receiver's ``Retry-After``)
        self.pause_until = 0.0
        #: sends of the window that failed and are being retried
        self.retrying = 0
        #: sends of the window accepted so far (a failure counts toward ``max_retries`` only
        #: if this moved since the send's previous failure)
        self.accepted_sends = 0
        self.dead_letter = DeadLetters(cfg.name, cfg.dead_letter) if cfg.dead_letter else None
        self.last_warned = 0.0
        #: a failure was logged at warning level since the sink last recovered, and which
        self.warned = False
        self.warned_error = ""
        self.last_rejection = ""
        self._wakeup: asyncio.Future[None] | None = None
        self._space: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        return len(self.queue) + self.inflight

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

    @property
    def failing(self) -> bool:
        return self.stats.failing

    def wake(self) -> None:
        w = self._wakeup
        if w is not None:
            self._wakeup = None
            if not w.done():
                w.set_result(None)

    def _space_freed(self) -> None:
        s = self._space
        if s is not None:
            self._space = None
            if not s.done():
                s.set_result(None)

    async def wait_for_space(self) -> None:
        """Until the queue is below its bound again (it may be over it by the events of
        producers that are waiting here)."""
        while len(self.queue) > self.maxlen or self.queued_bytes > self.max_bytes:
            if self._space is None or self._space.done():
                self._space = asyncio.get_running_loop().create_future()
            await self._space


class Buffer:
    """Where a route's events wait beyond its memory queue: the pipeline's one view of its
    buffer. :class:`MemoryBuffer` (``[spool] buffer = "memory"``): nowhere, a full queue blocks
    or drops; :class:`DiskBuffer` (``"disk"``): the ledger, which a lagging sink reads from.
    Dead letters go to the ledger in both (when there is one: backfill has none)."""

    #: whether a sink that is behind reads from the store (else events wait in memory only)
    durable = False

    def __init__(self, ledger: Ledger | None = None) -> None:
        self.ledger = ledger

    def append(self, ev: Event) -> bool:
        """A published event; True if the read loop must wait (:meth:`wait`)."""
        return False

    def wait(self) -> Awaitable[None]:
        raise NotImplementedError

    def overflow(self, route: Route, ev: Event) -> bool:
        """``route``'s queue is full at ``ev``: True if the buffer takes over (else the route's
        ``when_full`` policy applies)."""
        return False

    def release(self, floor: Callable[[], int]) -> None:
        """A batch is done: every route is done with every event up to ``floor()``."""

    async def read(self, start: int, limit: int, server: str, sink: str) -> list[Event]:
        return []

    def delivered_through(self, routes: Sequence[Route], published: int) -> int:
        """The highest seq such that every route has finished with every event up to it."""
        low = published
        for r in routes:
            if r.queue or r.inflight or r.abandoned:
                low = min(low, r.acked_seq)
        return low

    def keeps(self) -> str | None:
        """Where events left undelivered at shutdown stay (None: they are lost)."""
        return None

    async def dead_letters(self, sink: str, batch: list[Event], msg: str) -> str | None:
        """Keep refused events; returns where (for the log), or None."""
        if self.ledger is None:
            return None
        await self.ledger.add_dead_letters(sink, batch, msg)
        return f"ledger (cometstream dlq list --sink {sink})"


class MemoryBuffer(Buffer):
    pass


class DiskBuffer(Buffer):
    durable = True

    def __init__(self, ledger: Ledger) -> None:
        super().__init__(ledger)
        self.store = ledger

    def append(self, ev: Event) -> bool:
        return self.store.append(ev)

    def wait(self) -> Awaitable[None]:
        return self.store.wait_for_room()

    def overflow(self, route: Route, ev: Event) -> bool:
        # the memory queue is full: the sink goes on from the store (nothing is dropped,
        # nothing blocks)
        route.live = False
        route.next_seq = ev.seq
        if route._wakeup is not None:
            route.wake()
        return True

    def release(self, floor: Callable[[], int]) -> None:
        if self.store.pending:
            self.store.release(floor())

    async def read(self, start: int, limit: int, server: str, sink: str) -> list[Event]:
        return await self.store.read(start, limit, server, sink)

    def delivered_through(self, routes: Sequence[Route], published: int) -> int:
        return min((r.done_through(published) for r in routes), default=published)

    def keeps(self) -> str | None:
        return "ledger"


class Pipeline:
    """Routes events to sinks. ``start()`` launches the workers, ``drain()`` stops them."""

    def __init__(
        self,
        routes: Sequence[tuple[SinkConfig, Sink]],
        metrics: Metrics,
        *,
        batch_max: int = BATCH_MAX,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        buffer: Buffer | None = None,
        server: str = "",
    ) -> None:
        self.metrics = metrics
        #: where events wait beyond the memory queues (see :class:`Buffer`)
        self.buffer = buffer if buffer is not None else MemoryBuffer()
        self.server = server
        self.routes: list[Route] = []
        for cfg, sink in routes:
            route = Route(cfg, sink, metrics.sink(cfg.name))
            route.stats.capacity = cfg.buffer
            metrics.sink(cfg.name, depth=lambda r=route: r.depth)
            self.routes.append(route)
        self.batch_max = batch_max
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        #: the jitter of retry delays (tests fix it)
        self.rand: Callable[[], float] = random.random
        self.seq = 0
        self._closing = False
        self._ack_listeners: list[AckListener] = []
        #: called with every published event (after redaction), e.g. ``cometstream tap``'s
        #: server; must not block or raise
        self.taps: list[Callable[[Event], None]] = []
        # the filter/queue step per route, precomputed as tuples for the hot loop
        self._fast = [(r, r.types, r.queue, r.maxlen, r.stats) for r in self.routes]

    def resume(self, last_seq: int, cursors: dict[str, int]) -> None:
        """After a restart with a spool: continue numbering after ``last_seq``; a sink whose
        cursor is behind reads the rest from the spool."""
        self.seq = last_seq
        for route in self.routes:
            cursor = cursors.get(route.name, last_seq)
            route.acked_seq = cursor
            if cursor < last_seq:
                route.live = False
                route.next_seq = cursor + 1
                log.info("sink resumes from the spool", sink=route.name,
                         events_behind=last_seq - cursor)

    def cursors(self) -> dict[str, int]:
        seq = self.seq
        return {r.name: r.done_through(seq) for r in self.routes}

    def positions(self, cursors: dict[str, int]) -> dict[str, Position]:
        """Per sink, where its output stood once it had acknowledged what it did up to its
        cursor in ``cursors`` (the ledger may commit a cursor behind the sink's own)."""
        out = {}
        for r in self.routes:
            history = r.history
            if history:
                upto = cursors.get(r.name, 0)
                while len(history) > 1 and history[1][0] <= upto:
                    history.popleft()
                if history[0][0] <= upto:
                    r.position = history.popleft()[1]
            out[r.name] = r.position
        return out

    def recover(self, positions: dict[str, Position]) -> None:
        """At start: each sink that can (``recover(position)``: a file sink) is told where its
        output stood at its committed cursor, to recognise what it wrote after it."""
        for route in self.routes:
            route.position = positions.get(route.name)
            recover = getattr(route.sink, "recover", None)
            if callable(recover) and callable(getattr(route.sink, "end_recovery", None)):
                recover(route.position)
                route.recovering = True

    def end_recovery(self) -> None:
        """Everything a crash may have left unaccounted has been published again (the store's
        events, the first resync's): each recovering sink ends its recovery once it has it."""
        for route in self.routes:
            if route.recovering:
                route.recover_until = max(self.seq, 1)
                # (a sink not open yet has not read back its output: its first acknowledgement
                # beyond that seq ends it)
                if route.opened and route.done_through(self.seq) >= self.seq:
                    self._recovered(route)

    @staticmethod
    def _recovered(route: Route) -> None:
        route.recovering = False
        route.recover_until = 0
        try:
            route.sink.end_recovery()  # type: ignore[attr-defined]
        except Exception:
            log.exception("sink end_recovery failed", sink=route.name)

    def lagging(self) -> dict[str, tuple[int, frozenset[int] | None]]:
        return {r.name: (r.next_seq, r.types) for r in self.routes if not r.live}

    def spool_dropped(self, sink: str, count: int) -> None:
        route = next(r for r in self.routes if r.name == sink)
        route.stats.dropped["spool_limit"] += count
        log.error("spool limit reached: the oldest events were deleted before this sink got them",
                  sink=sink, events=count, dropped_total=route.stats.dropped["spool_limit"])

    # --- the hot path ---------------------------------------------------------------------------
    def publish(self, ev: Event) -> Awaitable[None] | None:
        """Hand one event to every route; returns an awaitable only if a ``block`` queue is full."""
        self.seq += 1
        ev.seq = self.seq
        blocked: list[Route] | None = None
        buffer = self.buffer
        behind = buffer.append(ev)
        size = len(ev.raw)
        for route, types, queue, maxlen, stats in self._fast:
            if not route.live:
                continue  # behind: it reads this one from the spool later
            if types is not None and ev.type not in types:
                stats.filtered += 1
                continue
            if len(queue) >= maxlen or route.queued_bytes >= route.max_bytes:
                if buffer.overflow(route, ev):
                    continue
                if route.drop_when_full:
                    stats.dropped["queue_full"] += 1
                    continue
                # block: the event is queued now (in order, and never lost if the waiting
                # producer is cancelled); the producer waits until the queue is back in bounds
                if blocked is None:
                    blocked = []
                blocked.append(route)
            queue.append(ev)
            route.queued_bytes += size
            if route._wakeup is not None:
                route.wake()
        if self.taps:
            for tap in self.taps:
                tap(ev)
        if behind:
            return buffer.wait()  # the read loop waits for the store
        if blocked is not None:
            return self._wait_for_space(blocked)
        return None

    @staticmethod
    async def _wait_for_space(routes: list[Route]) -> None:
        for route in routes:
            await route.wait_for_space()

    # --- acknowledgements -------------------------------------------------------------------------
    def add_ack_listener(self, fn: AckListener) -> None:
        self._ack_listeners.append(fn)

    def delivered_through(self) -> int:
        """The highest seq such that every route has finished with every event up to it."""
        return self.buffer.delivered_through(self.routes, self.seq)

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        for route in self.routes:
            route.task = asyncio.create_task(self._worker(route), name=f"sink-{route.name}")

    def reopen(self) -> None:
        for route in self.routes:
            try:
                route.sink.reopen()
            except Exception:
                log.exception("sink reopen failed", sink=route.name)

    async def drain(self, timeout: float) -> bool:
        """Deliver what is queued within ``timeout`` seconds, then close every sink.

        Returns True if everything was delivered; what was not is counted as dropped (shutdown).
        """
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for route in self.routes:
            route.wake()
        tasks = [r.task for r in self.routes if r.task is not None]
        complete = True
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                complete = False
                await asyncio.wait(pending)
        for route in self.routes:
            left = len(route.queue) + route.inflight
            kept = self.buffer.keeps()
            if kept is not None:
                if left or not route.live:
                    # (what the ledger really keeps for it is reported once it is closed)
                    complete = False
                    route.live = False
                    route.next_seq = route.done_through(self.seq) + 1
                    route.queue.clear()
                    route.queued_bytes = 0
                    route.inflight = route.inflight_first = 0
                route._space_freed()
                continue
            if left:
                complete = False
                route.stats.dropped["shutdown"] += left
                log.warning("events not delivered at shutdown", sink=route.name, events=left,
                            timeout=timeout)
                route.queue.clear()
                route.queued_bytes = 0
                route.inflight = 0
                route.abandoned = True  # never delivered: not "finished with" for the watermark
            route._space_freed()
        # close every sink at once, within what is left of the same deadline (at least 1 s)
        opened = [r for r in self.routes if r.opened]
        if opened:
            results = await asyncio.gather(
                *(asyncio.wait_for(r.sink.aclose(), max(deadline - loop.time(), 1.0))
                  for r in opened), return_exceptions=True)
            for route, res in zip(opened, results, strict=True):
                if isinstance(res, BaseException):
                    log.warning("sink close failed", sink=route.name, error=_describe(res))
        return complete

    # --- workers ---------------------------------------------------------------------------------
    async def _worker(self, route: Route) -> None:
        backoff = Backoff(self.retry_initial, self.retry_max, rand=self.rand)
        stats = route.stats
        queue = route.queue
        while not route.opened:
            try:
                await route.sink.open()
                route.opened = True
                if stats.failing:
                    log.info("sink recovered", sink=route.name)
                stats.failing = False
            except Exception as exc:
                if self._closing:
                    return
                self._failed(route, exc, "sink open failed", backoff)
                await self._pause(backoff.next_delay())
        backoff.reset()
        if route.concurrency > 1:
            await self._window(route)
            return
        loop = asyncio.get_running_loop()
        while True:
            if not queue:
                if not route.live:
                    if self._closing:
                        return  # the rest stays in the spool
                    await self._from_spool(route, backoff)
                    continue
                if self._closing:
                    return
                route._wakeup = loop.create_future()
                await route._wakeup
                continue
            n = min(len(queue), self.batch_max)
            batch = [queue.popleft() for _ in range(n)]
            if queue:
                route.queued_bytes -= sum([len(ev.raw) for ev in batch])
            else:
                route.queued_bytes = 0
            route.inflight = n
            route.inflight_first = batch[0].seq
            route.inflight_since = batch[0].received_at
            route._space_freed()
            await self._deliver(route, batch, backoff)
            route.inflight = 0
            route.inflight_first = 0
            self.buffer.release(self.delivered_through)

    # --- concurrent sends (a sink with ``concurrency`` > 1) ----------------------------------------
    async def _window(self, route: Route) -> None:
        """Deliver with up to ``route.concurrency`` sends in flight, each of at most
        ``route.unit_max`` events and retried on its own, while acknowledgements still move in
        order: an event is done when it and every event before it are done. Two events with
        the same resource (:meth:`Event.ordering_keys`) are never in flight together, and the
        later one is not sent before the earlier one is done. The window holds at most
        ``batch_max`` events, like one batch of the serial worker."""
        queue = route.queue
        window: deque[_Unit] = deque()  # oldest first, until acknowledged
        ended: list[_Unit] = []  # units whose send finished since the last look
        held = 0  # events in the window
        held_bytes = 0  # and their bytes (at most the route's queue bound, beyond one event)
        busy: dict[str, int] = {}  # ordering keys of the units being sent
        running = 0
        batch_max = self.batch_max
        loop = asyncio.get_running_loop()
        try:
            while True:
                # 1. free the resources of the sends that ended
                while ended:
                    running -= 1
                    unit = ended.pop()
                    for k in unit.keys:
                        left = busy[k] - 1
                        if left:
                            busy[k] = left
                        else:
                            del busy[k]
                    if unit.state is None:  # (ended with no outcome: sent again, never stuck)
                        log.error("sink send ended without an outcome: sending again",
                                  sink=route.name, events=len(unit.events))
                        unit.task = None
                # 2. acknowledge (or dead-letter) the finished head, in order
                moved = False
                while window and window[0].state is not None:
                    unit = window[0]
                    if unit.state:
                        self._acked(route, unit.events)
                    else:  # (left in the window until kept: a cancel meanwhile puts it back)
                        await self._rejected(route, unit.events, unit.error)
                    window.popleft()
                    held -= len(unit.events)
                    held_bytes -= sum([len(ev.raw) for ev in unit.events])
                    moved = True
                # 3. take new events: from the queue first, then (half a window at least at a
                # time) from the store
                fresh: list[Event] = []
                taken = 0  # their bytes
                if held < batch_max and (held_bytes < route.max_bytes or not window):
                    if queue:
                        # as many as the window has room for, in events and in bytes (at least
                        # one): the rest waits in the queue, which overflows as it would
                        room = route.max_bytes - held_bytes
                        n = batch_max - held
                        while queue and len(fresh) < n and (taken < room or not fresh):
                            ev = queue.popleft()
                            fresh.append(ev)
                            taken += len(ev.raw)
                        route.queued_bytes = route.queued_bytes - taken if queue else 0
                        route._space_freed()
                    elif not route.live and not self._closing and held <= batch_max // 2 \
                            and held_bytes <= route.max_bytes // 2:
                        fresh = await self._read_behind(route, batch_max - held)
                        taken = sum([len(ev.raw) for ev in fresh])
                        moved = True
                    step = route.unit_max
                    for i in range(0, len(fresh), step):
                        window.append(_Unit(fresh[i:i + step], ended))
                    held += len(fresh)
                    held_bytes += taken
                route.inflight = held
                if window:
                    head = window[0].events[0]
                    route.inflight_first = head.seq
                    route.inflight_since = head.received_at
                else:
                    route.inflight_first = 0
                if moved:
                    self.buffer.release(self.delivered_through)
                # 4. start what may start: in order, skipping (and holding back the resources
                # of) the units whose resource is being sent
                if running < route.concurrency:
                    blocked: set[str] = set()
                    for unit in window:
                        if unit.task is not None:
                            continue
                        keys = unit.keys
                        if keys and any(k in busy or k in blocked for k in keys):
                            blocked.update(keys)
                            continue
                        for k in keys:
                            busy[k] = busy.get(k, 0) + 1
                        unit.task = loop.create_task(self._send_unit(route, unit))
                        running += 1
                        if running >= route.concurrency:
                            break
                # 5. wait for a send to end or for new events, unless there is more to do now
                if not window and self._closing:
                    return  # delivered what was queued (what is behind stays in the store)
                if ended or (window and window[0].state is not None):
                    continue
                if held < batch_max and held_bytes < route.max_bytes and (queue or (
                        not route.live and not self._closing and held <= batch_max // 2
                        and held_bytes <= route.max_bytes // 2)):
                    continue
                route._wakeup = loop.create_future()
                await route._wakeup
        except asyncio.CancelledError:
            # drain() gave up: stop the sends, put every event not acknowledged back in front of
            # the queue, in order, so that it is counted (or stays in the store), not lost
            tasks = [u.task for u in window if u.task is not None and not u.task.done()]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            events = [ev for u in window for ev in u.events]
            queue.extendleft(reversed(events))
            route.queued_bytes += sum(len(ev.raw) for ev in events)
            route.inflight = 0
            route.inflight_first = 0
            raise

    async def _read_behind(self, route: Route, limit: int) -> list[Event]:
        """Up to ``limit`` of the events a sink that is behind needs next, from the store (the
        events its filter skips are counted and left out)."""
        start = route.next_seq
        events = await self.buffer.read(start, limit, self.server, route.name)
        if not events:
            route.next_seq = self.seq + 1
        else:
            route.behind_since = events[0].received_at
            route.next_seq = events[-1].seq + 1
        if route.next_seq > self.seq:  # nothing was published meanwhile that it skipped
            route.live = True
            route.behind_since = 0.0
            if start <= self.seq:
                log.info("sink caught up from the spool", sink=route.name)
        types = route.types
        if types is None:
            return events
        batch = [ev for ev in events if ev.type in types]
        route.stats.filtered += len(events) - len(batch)
        return batch

    async def _send_unit(self, route: Route, unit: _Unit) -> None:
        """One unit of a window, retried on its own (with its own backoff: a send that keeps
        failing waits longer and longer, whatever the others do) until accepted or refused for
        good; a ``Retry-After`` pauses every send of the sink. While any unit is retrying, the
        sink reports itself failing.

        ``max_retries`` bounds the failures of a send that the receiver demonstrably does not
        take while it takes others: a failure counts only if another send was accepted since
        this one's previous failure (its first failure counts if one was accepted since it
        started). A receiver down, or refusing every POST (an expired token), dead-letters
        nothing: the events wait (in the ledger) and the sink reports failing until it is back.
        """
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        stats = route.stats
        max_retries = route.max_retries
        backoff = Backoff(self.retry_initial, self.retry_max, rand=self.rand)
        attempts = counted = 0
        seen = route.accepted_sends
        try:
            while True:
                wait = route.pause_until - loop.time()
                while wait > 0:
                    await asyncio.sleep(wait)
                    wait = route.pause_until - loop.time()
                try:
                    await route.sink.send(unit.events)
                except SinkError as exc:
                    if not exc.retryable:
                        unit.error = str(exc)
                        unit.state = False
                        return
                    if exc.retry_after:
                        route.pause_until = max(route.pause_until, loop.time() + exc.retry_after)
                    error: BaseException = exc
                    unexpected = False
                    if exc.sink_wide:
                        seen = route.accepted_sends  # (not about this send: never counted)
                except (Exception, asyncio.CancelledError) as exc:
                    if isinstance(exc, asyncio.CancelledError) and (
                            task is None or task.cancelling()):
                        raise  # the window (or the loop) stops this send
                    # anything else a sink lets out, even a CancelledError of its own
                    error, unexpected = exc, True
                else:
                    unit.state = True
                    route.accepted_sends += 1
                    return
                if route.accepted_sends != seen:  # the receiver takes others, not this one
                    seen = route.accepted_sends
                    counted += 1
                    if max_retries is not None and counted > max_retries:
                        unit.error = (f"{_describe(error)} (gave up after {attempts} retries, "
                                      f"{max_retries} of them while the sink accepted others)")
                        unit.state = False
                        return
                if not attempts:
                    route.retrying += 1
                attempts += 1
                self._failed(route, error, "sink write failed", backoff, unexpected=unexpected,
                             gap=WARN_GAP)
                await self._pause(backoff.next_delay())
        finally:
            if attempts:
                route.retrying -= 1
            if unit.state is True and not route.retrying and stats.failing:
                stats.failing = False  # no send of the sink is retrying any more
                stats.last_error = ""
                if route.warned:  # (the failures it ends were logged)
                    route.warned = False
                    log.info("sink recovered", sink=route.name)
            unit.ended.append(unit)
            route.wake()

    async def _from_spool(self, route: Route, backoff: Backoff) -> None:
        """One batch for a sink that is behind, read from the store."""
        start = route.next_seq
        events = await self.buffer.read(start, self.batch_max, self.server, route.name)
        if not events:
            # nothing at or after ``start``: caught up (or the limits took the rest)
            route.next_seq = self.seq + 1
            route.live = True
            route.behind_since = 0.0
            if start <= self.seq:
                log.info("sink caught up from the spool", sink=route.name)
            return
        types = route.types
        batch = events if types is None else [ev for ev in events if ev.type in types]
        route.stats.filtered += len(events) - len(batch)
        route.behind_since = events[0].received_at
        # what it needs from the spool next: the batch read is in its hands now, so the limits
        # cannot take it from it (nor count it lost) while it is being delivered or retried;
        # its cursor stays before the batch (``done_through``: inflight_first)
        route.next_seq = events[-1].seq + 1
        if batch:
            route.inflight = len(batch)
            route.inflight_first = batch[0].seq
            route.inflight_since = batch[0].received_at
            await self._deliver(route, batch, backoff)
            route.inflight = 0
            route.inflight_first = 0
        self.buffer.release(self.delivered_through)
        if route.next_seq > self.seq:  # nothing was published meanwhile that it skipped
            route.live = True
            route.behind_since = 0.0
            log.info("sink caught up from the spool", sink=route.name)

    async def _deliver(self, route: Route, batch: list[Event], backoff: Backoff) -> None:
        """Send one batch until every event in it is acknowledged or refused for good."""
        stats = route.stats
        max_retries = route.max_retries
        attempts = 0
        while batch:
            retry_after = 0.0
            try:
                await route.sink.send(batch)
            except asyncio.CancelledError:
                # drain() gave up: put the batch back so it is counted, not silently lost
                route.queue.extendleft(reversed(batch))
                route.queued_bytes += sum(len(ev.raw) for ev in batch)
                route.inflight = 0
                route.inflight_first = 0
                raise
            except SinkError as exc:
                done = min(max(exc.accepted, 0), len(batch))
                if done:  # progress: acknowledge the accepted head, retry only the rest
                    self._acked(route, batch[:done])
                    batch = batch[done:]
                    route.inflight = len(batch)
                    route.inflight_first = batch[0].seq if batch else 0
                    attempts = 0
                    backoff.reset()  # the sink works: the next failure starts small again
                    if not batch:
                        break
                exhausted = (max_retries is not None and attempts >= max_retries
                             and not exc.sink_wide)
                if not exc.retryable or exhausted:
                    # only the events the sink names (a webhook's one POST), else all the rest
                    n = exc.failed if exc.failed > 0 else len(batch)
                    why = str(exc) if not exhausted else f"{exc} (gave up after {attempts} retries)"
                    await self._rejected(route, batch[:n], why)
                    batch = batch[n:]
                    route.inflight = len(batch)
                    route.inflight_first = batch[0].seq if batch else 0
                    attempts = 0
                    continue
                if not exc.sink_wide:  # (an outage, a refused credential: not these events)
                    attempts += 1
                retry_after = exc.retry_after or 0.0
                self._failed(route, exc, "sink write failed", backoff)
            except Exception as exc:
                if max_retries is not None and attempts >= max_retries:
                    await self._rejected(route, batch, f"{_describe(exc)} (gave up after "
                                         f"{attempts} retries)")
                    break
                attempts += 1
                self._failed(route, exc, "sink write failed", backoff, unexpected=True)
            else:
                self._acked(route, batch)
                if stats.failing:
                    stats.failing = False
                    stats.last_error = ""
                    log.info("sink recovered", sink=route.name)
                backoff.reset()
                break
            await self._pause(max(backoff.next_delay(), retry_after))

    async def _pause(self, delay: float) -> None:
        await asyncio.sleep(delay)

    def _acked(self, route: Route, batch: list[Event]) -> None:
        stats = route.stats
        stats.delivered += len(batch)
        route.acked_seq = batch[-1].seq
        if route._position_fn is not None:
            route.history.append((route.acked_seq, route._position_fn()))
        if route.recover_until and route.acked_seq >= route.recover_until:
            self._recovered(route)
        now = time.time()
        stats.latency.observe_many([now - ev.received_at for ev in batch])
        for fn in self._ack_listeners:
            fn(route, batch)

    async def _rejected(self, route: Route, batch: list[Event], msg: str) -> None:
        # the reason may quote the receiver's reply (an echoed Authorization header): masked
        # like the logs before it is kept in the ledger and the dead-letter file
        msg = scrub(msg)
        stats = route.stats
        stats.errors += 1
        stats.dropped["rejected"] += len(batch)
        route.acked_seq = batch[-1].seq
        kept: list[str] = []
        try:
            where = await self.buffer.dead_letters(route.name, batch, msg)
            if where is not None:
                kept.append(where)
        except Exception as exc:  # the disk is the problem: say so, go on
            log.error("dead letters not kept in the ledger: write failed", sink=route.name,
                      events=len(batch), error=str(exc))
        if route.dead_letter is not None:  # a configured file gets them too
            route.dead_letter.write(batch, msg)
            kept.append(str(route.dead_letter.path))
        where = ", ".join(kept) or None
        now = time.monotonic()
        if msg != route.last_rejection or now - route.last_warned >= FAILING_REMINDER:
            route.last_warned = now
            route.last_rejection = msg
            log.error("sink refused events permanently", sink=route.name, events=len(batch),
                      dropped_total=stats.dropped["rejected"], error=msg,
                      dead_letter=where)

    def _failed(self, route: Route, exc: BaseException, what: str, backoff: Backoff,
                *, unexpected: bool = False, gap: float = 0.0) -> None:
        stats = route.stats
        stats.errors += 1
        msg = _describe(exc)
        now = time.monotonic()
        # one warning when a failure starts or changes, then a reminder a minute while it lasts
        # (with several sends in flight, at most one every ``gap`` seconds: a receiver that
        # fails now and then is not a log line per failed request)
        if gap:  # (judged on what was logged, not on what was suppressed meanwhile)
            first = now - route.last_warned >= gap and (
                not route.warned or route.warned_error != msg
                or now - route.last_warned >= FAILING_REMINDER)
        else:
            first = (not stats.failing or stats.last_error != msg
                     or now - route.last_warned >= FAILING_REMINDER)
        if first:
            route.warned_error = msg
            route.last_warned = now
            route.warned = True
        stats.failing = True
        stats.last_error = msg
        if unexpected and first:
            log.exception(what, sink=route.name, retry_in=round(backoff.ceiling(), 2))
        elif first:
            log.warning(what, sink=route.name, error=msg, retry_in=round(backoff.ceiling(), 2))
        else:
            log.debug(what, sink=route.name, error=msg)




class _Unit:
    """Events a concurrent sink gets in one ``send``, and how that send ended."""

    __slots__ = ("events", "keys", "task", "state", "error", "ended")

    def __init__(self, events: list[Event], ended: list[_Unit]) -> None:
        self.events = events
        self.keys = {k for ev in events for k in ev.ordering_keys()}
        self.task: asyncio.Task[None] | None = None
        #: None: not finished; True: accepted; False: refused for good (``error`` says why)
        self.state: bool | None = None
        self.error = ""
        #: where the unit puts itself when its send has ended (the window's list)
        self.ended = ended

class DeadLetters:
    """Events a sink refused for good, appended as JSON Lines with the reason:
    ``{"sink", "failed_at", "error", "event": <the event as received>}``."""

    def __init__(self, sink: str, path: Path) -> None:
        self.sink = sink
        self.path = path
        self.written = 0

    def write(self, batch: Sequence[Event], error: str) -> None:
        head = b"".join((b'{"sink":', orjson.dumps(self.sink), b',"failed_at":',
                         orjson.dumps(time.time()), b',"error":', orjson.dumps(error),
                         b',"event":'))
        data = b"".join(head + ev.raw + b"}\n" for ev in batch)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                         | os.O_NOFOLLOW, 0o640)  # (a symbolic link planted there: refused)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            self.written += len(batch)
        except OSError as exc:
            log.error("dead letter write failed: events lost", sink=self.sink, events=len(batch),
                      path=str(self.path), error=exc.strerror or str(exc))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SinkError):
        return str(exc)
    text = str(exc)
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__
