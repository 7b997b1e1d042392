"""The pipeline: routes published events to every sink's route, and runs one delivery per sink.

``publish(event)`` is called by the read loop (through the gate) for every event. It is
synchronous and cheap: for each route it tests the filter and appends to the route's queue. Only
a route whose policy is ``block`` and whose queue is full makes ``publish`` return an awaitable
(the read loop waits, as the operator chose); ``drop_newest`` counts the event as dropped and
moves on; with the disk buffer, a full queue sends the sink on from the ledger.

Each route's :class:`~.engine.Delivery` sends what is queued, retried as
:class:`~.retry.RetryPolicy` decides; acknowledgements (:class:`~.ack.Acks`) move the route's
cursor, feed the latency histogram and call the ack listeners. ``delivered_through()`` is the
highest sequence number that every route has finished with (acked, filtered or dropped).

A worker that dies of something no retry covers is logged once with its traceback, its sink is
marked failing (``/readyz``, ``cometstream_sink_failing``), and producers waiting for room in
its queue are released: it never hangs the read loop.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Final

import structlog

from .._tasks import supervise
from ..backoff import Backoff
from ..errors import SinkError, TaskDied
from .ack import AckListener, Acks, DeadLetters
from .buffer import Buffer, MemoryBuffer
from .engine import Delivery
from .retry import describe, recovered
from .route import Route

if TYPE_CHECKING:
    from ..config import SinkConfig
    from ..events import Event
    from ..observe.metrics import Metrics, SinkStats
    from ..sinks.base import Position, Sink

__all__ = ["BATCH_MAX", "Pipeline", "Tap"]

BATCH_MAX: Final = 1024
log = structlog.get_logger("cometstream.pipeline")

#: called with every published event (after redaction); must not block or raise
Tap = Callable[["Event"], None]


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
        self.acks = Acks(self.buffer)
        self.server = server
        self.batch_max = batch_max
        self.routes: list[Route] = [self._new_route(cfg, sink) for cfg, sink in routes]
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        #: the jitter of retry delays (tests fix it)
        self.rand: Callable[[], float] = random.random
        self.seq = 0
        self._closing = False
        self._started = False
        #: the taps (``cometstream tap``): see :meth:`add_tap`
        self.taps: list[Tap] = []
        self._fast: list[tuple[Route, frozenset[int] | None, deque[Event], int, SinkStats]] = []
        self._routes_changed()

    def _new_route(self, cfg: SinkConfig, sink: Sink) -> Route:
        dead = DeadLetters(cfg.name, cfg.dead_letter) if cfg.dead_letter else None
        route = Route(cfg, sink, self.metrics.sink(cfg.name), batch_max=self.batch_max,
                      dead_letter=dead)
        route.stats.capacity = cfg.buffer
        self.metrics.sink(cfg.name, depth=lambda r=route: r.depth)
        return route

    def _routes_changed(self) -> None:
        # the filter/queue step per route, precomputed as tuples for the hot loop
        self._fast = [(r, r.types, r.queue, r.maxlen, r.stats) for r in self.routes]

    # --- the ledger's side: cursors, positions, recovery -----------------------------------------
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
        return self.acks.positions(self.routes, cursors)

    def recover(self, positions: dict[str, Position]) -> None:
        """At start: each sink that recovers (a file sink) is told where its output stood at
        its committed cursor, to recognise what it wrote after it."""
        self.acks.recover(self.routes, positions)

    def end_recovery(self) -> None:
        """Everything a crash may have left unaccounted has been published again (the store's
        events, the first resync's): each recovering sink ends its recovery once it has it."""
        self.acks.end_recovery(self.routes, self.seq)

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
            if route.wakeup is not None:
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
            try:
                await route.wait_for_space()
            except SinkError:
                if route.crashed is None:
                    raise
                # (its worker died, which was logged: the read loop goes on for the others)

    # --- taps and ack listeners ------------------------------------------------------------------
    def add_tap(self, tap: Tap) -> None:
        """Call ``tap`` with every published event from now on (once, however often added)."""
        if tap not in self.taps:
            self.taps.append(tap)

    def remove_tap(self, tap: Tap) -> None:
        if tap in self.taps:
            self.taps.remove(tap)

    def tapped(self) -> bool:
        """Whether someone taps the published events (they then need redaction, whatever
        the sinks take)."""
        return bool(self.taps)

    def add_ack_listener(self, fn: AckListener) -> None:
        self.acks.listeners.append(fn)

    def delivered_through(self) -> int:
        """The highest seq such that every route has finished with every event up to it."""
        return self.buffer.delivered_through(self.routes, self.seq)

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._started = True
        for route in self.routes:
            self._start(route)

    def _start(self, route: Route) -> None:
        delivery = Delivery(
            route, self.acks, self.buffer, batch_max=self.batch_max, server=self.server,
            published=lambda: self.seq, closing=lambda: self._closing,
            release=partial(self.buffer.release, self.delivered_through),
            backoff=lambda: Backoff(self.retry_initial, self.retry_max, rand=self.rand),
            pause=self._pause)
        route.task = supervise(
            asyncio.create_task(delivery.run(), name=f"sink-{route.name}"),
            f"sink {route.name}", partial(self._worker_died, route))

    # --- reload: sinks added, removed, changed ---------------------------------------------------
    def add_route(self, cfg: SinkConfig, sink: Sink) -> None:
        """A new sink, from the live head on: it gets the events published from now on."""
        route = self._new_route(cfg, sink)
        route.acked_seq = self.seq
        self.routes.append(route)
        self._routes_changed()
        if self._started:
            self._start(route)

    async def _retire(self, route: Route, timeout: float) -> None:
        """Let the route's engine finish the sends in flight (within ``timeout`` seconds; then
        they are cancelled and their events go back in front of the queue) and stop. Publish
        still queues for it meanwhile."""
        route.retiring = True
        route.wake()
        task = route.task
        if task is not None and not task.done():
            # (a sink still trying to open has nothing in flight: no wait for its next attempt)
            _done, pending = await asyncio.wait({task}, timeout=timeout if route.opened else 0)
            if pending:
                task.cancel()
                await asyncio.wait(pending)

    async def _close(self, route: Route, timeout: float) -> None:
        if route.opened:
            try:
                await asyncio.wait_for(route.sink.aclose(), max(timeout, 1.0))
            except Exception as exc:  # noqa: BLE001 - said; the sink is gone either way
                log.warning("sink close failed", sink=route.name, error=describe(exc))
            route.opened = False

    async def remove_route(self, name: str, timeout: float) -> int:
        """Stop sink ``name`` (the sends in flight end first) and forget it; returns how many
        events published before it was removed it had not got (at most: what it is behind in
        the store is counted with the events its filter would skip)."""
        route = next(r for r in self.routes if r.name == name)
        await self._retire(route, timeout)
        self.routes.remove(route)
        self._routes_changed()
        left = len(route.queue) + (self.seq - route.next_seq + 1 if not route.live else 0)
        route.queue.clear()
        route.queued_bytes = 0
        route.crash(SinkError(name, "removed by a reload", retryable=False))
        self.metrics.forget_sink(name)
        await self._close(route, timeout)
        return left

    async def replace_route(self, cfg: SinkConfig, sink: Sink, timeout: float,
                            committed: Callable[[], Awaitable[None]]) -> None:
        """Swap sink ``cfg.name`` for ``sink`` with the settings ``cfg``, from its cursor: the
        old one finishes its sends in flight and is closed; what it had not taken (its queue,
        what it is behind in the store) goes to the new one. ``committed`` writes the cursor
        with the new sink's position (a file sink: where its new file starts) before the new
        sink gets anything, so that a crash then neither loses nor repeats an event."""
        old = next(r for r in self.routes if r.name == cfg.name)
        await self._retire(old, timeout)
        if old.recovering:
            self.acks.recovered(old)
        await self._close(old, timeout)
        new = self._new_route(cfg, sink)
        types = new.types
        if types is None or types == old.types:
            new.queue, new.queued_bytes = old.queue, old.queued_bytes
        else:  # (queued under the old filter: the new one applies from the cursor on)
            new.queue.extend(ev for ev in old.queue if ev.type in types)
            new.queued_bytes = sum(len(ev.raw) for ev in new.queue)
            new.stats.filtered += len(old.queue) - len(new.queue)
        new.acked_seq, new.live, new.next_seq = old.acked_seq, old.live, old.next_seq
        new.behind_since = old.behind_since
        self.routes[self.routes.index(old)] = new
        self._routes_changed()
        new.replaces(old)
        try:
            await sink.open()
        except Exception as exc:  # noqa: BLE001 - the engine retries it, as at start
            log.warning("sink open failed", sink=cfg.name, error=describe(exc))
        else:
            new.opened = True
            recovered(new)  # (the old instance's failures are not the new one's)
            if new.tracks_position:
                new.position = sink.position()
        await committed()
        if self._started:
            self._start(new)

    @staticmethod
    def _worker_died(route: Route, died: TaskDied) -> None:
        """The background-task rule for a sink's worker (logged once by :func:`supervise`):
        the sink is failing until a restart, and nothing waits on it any more."""
        exc = died.__cause__ if died.__cause__ is not None else died
        route.crash(exc)
        stats = route.stats
        stats.errors += 1
        stats.failing = True
        stats.last_error = f"sink {route.name}: worker stopped: {describe(exc)}"

    async def _pause(self, delay: float) -> None:
        await asyncio.sleep(delay)

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
            if not self._left_at_shutdown(route, timeout):
                complete = False
        await self._close_sinks(max(deadline - loop.time(), 1.0))
        return complete

    def _left_at_shutdown(self, route: Route, timeout: float) -> bool:
        """What the route did not deliver: kept in the store, or counted as dropped. True if
        there was nothing."""
        left = len(route.queue) + route.inflight
        clean = True
        if self.buffer.keeps() is not None:
            if left or not route.live:
                # (what the ledger really keeps for it is reported once it is closed)
                clean = False
                route.live = False
                route.next_seq = route.done_through(self.seq) + 1
                route.queue.clear()
                route.queued_bytes = 0
                route.inflight = route.inflight_first = 0
        elif left:
            clean = False
            route.stats.dropped["shutdown"] += left
            log.warning("events not delivered at shutdown", sink=route.name, events=left,
                        timeout=timeout)
            route.queue.clear()
            route.queued_bytes = 0
            route.inflight = 0
            route.abandoned = True  # never delivered: not "finished with" for the watermark
        route.space_freed()
        return clean

    async def _close_sinks(self, timeout: float) -> None:
        """Close every opened sink at once, within ``timeout`` seconds."""
        opened = [r for r in self.routes if r.opened]
        if not opened:
            return
        results = await asyncio.gather(
            *(asyncio.wait_for(r.sink.aclose(), timeout) for r in opened),
            return_exceptions=True)
        for route, res in zip(opened, results, strict=True):
            if isinstance(res, BaseException):
                log.warning("sink close failed", sink=route.name, error=describe(res))
