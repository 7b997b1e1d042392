"""The one delivery engine: a window of sends, in which sending one batch at a time is simply
concurrency 1.

Per route, :class:`Delivery` opens the sink (retried with backoff), then loops: free what the
sends that ended held, acknowledge (or dead-letter) the finished head of the window in order,
take new events (from the memory queue, else from the store for a sink that is behind), start
the sends that may start, and wait. Each send is retried on its own as
:class:`~.retry.RetryPolicy` decides; while any is retrying the sink reports itself failing.
With several in flight each send is a task of its own; with one at a time the engine's task
sends it itself.

New events are taken only when a send could start: with concurrency 1 a batch is everything
queued meanwhile (up to ``batch_max``), and ``publish`` does not wake the engine per event
while its one send is in flight.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog

from .retry import RetryPolicy, cancelled_by_us, recovered, report_failure

if TYPE_CHECKING:
    from ..backoff import Backoff
    from ..events import Event
    from .ack import Acks
    from .buffer import Buffer
    from .route import Route

__all__ = ["Delivery"]

log = structlog.get_logger("cometstream.pipeline")


class _Unit:
    """Events one ``send`` gets, and how that send ended."""

    __slots__ = ("crash", "error", "events", "keys", "nbytes", "size", "started", "state", "task")

    def __init__(self, events: list[Event], nbytes: int, keyed: bool) -> None:
        self.events = events
        #: the resources it is about (only when several sends may be in flight)
        self.keys = {k for ev in events for k in ev.ordering_keys()} if keyed else set()
        #: what it holds of the window, in events and bytes
        self.size = len(events)
        self.nbytes = nbytes
        self.started = False
        #: the send's own task (None: not started, or sent by the engine's task itself)
        self.task: asyncio.Task[None] | None = None
        #: None: not finished; True: accepted; False: refused for good (``error`` says why)
        self.state: bool | None = None
        self.error = ""
        #: what the send died of, if nothing retries it
        self.crash: BaseException | None = None


class Delivery:
    """Delivers one route's events: up to ``route.concurrency`` sends of at most
    ``route.unit_max`` events in flight, acknowledged in order. Two events with the same
    resource (:meth:`Event.ordering_keys`) are never in flight together, and the later one is
    not sent before the earlier one is done. The window holds at most ``batch_max`` events."""

    def __init__(self, route: Route, acks: Acks, buffer: Buffer, *, batch_max: int,
                 server: str, published: Callable[[], int], closing: Callable[[], bool],
                 release: Callable[[], None], backoff: Callable[[], Backoff],
                 pause: Callable[[float], Awaitable[None]]) -> None:
        self.route = route
        self.acks = acks
        self.buffer = buffer
        self.batch_max = batch_max
        self.server = server
        self.published = published
        self.closing = closing
        self.release = release
        self.new_backoff = backoff
        self.pause = pause
        self.window: deque[_Unit] = deque()  # oldest first, until acknowledged
        self.ended: list[_Unit] = []  # units whose send finished since the last look
        self.held = 0  # events in the window
        self.held_bytes = 0  # and their bytes (at most the route's queue bound, beyond one)
        self.busy: dict[str, int] = {}  # ordering keys of the units being sent
        self.running = 0

    async def run(self) -> None:
        if not await self._open():
            return
        route = self.route
        try:
            while True:
                self._free_ended()
                moved = await self._settle_head()
                moved = await self._take() or moved
                self._mark_inflight()
                if moved:
                    self.release()
                alone = self._start_sends()
                if alone is not None:
                    await self._send(alone)  # (one send at a time: no task of its own)
                    continue
                if not self.window and (self.closing() or route.retiring):
                    return  # delivered what was queued (what is behind stays in the store)
                if self.ended or (self.window and self.window[0].state is not None):
                    continue
                can_take = self._can_take()
                if can_take and (route.queue or self._reads_behind()):
                    continue
                await route.idle(take=can_take)
        except BaseException:
            # drain() gave up, or the worker dies: stop the sends, put every event not
            # acknowledged back in front of the queue, in order, so that it is counted (or
            # stays in the store), not lost
            await self._put_back()
            raise

    async def _open(self) -> bool:
        route = self.route
        backoff = self.new_backoff()
        while not route.opened:
            try:
                await route.sink.open()
            except Exception as exc:  # noqa: BLE001 - any failure to open is retried
                if self.closing() or route.retiring:
                    return False
                report_failure(route, exc, "sink open failed", backoff)
                await self.pause(backoff.next_delay())
            else:
                route.opened = True
                recovered(route)
        return True

    # --- the steps of the loop -------------------------------------------------------------------
    def _free_ended(self) -> None:
        """Free the resources of the sends that ended; one that died takes the worker along."""
        busy = self.busy
        while self.ended:
            self.running -= 1
            unit = self.ended.pop()
            for k in unit.keys:
                left = busy[k] - 1
                if left:
                    busy[k] = left
                else:
                    del busy[k]
            if unit.crash is not None:
                raise unit.crash
            if unit.state is None:
                raise RuntimeError("sink send ended without an outcome")

    async def _settle_head(self) -> bool:
        """Acknowledge (or dead-letter) the finished head of the window, in order."""
        window = self.window
        moved = False
        while window and window[0].state is not None:
            unit = window[0]
            if unit.state:
                if unit.events:
                    self.acks.acked(self.route, unit.events)
            else:  # (left in the window until kept: a cancel meanwhile puts it back)
                await self.acks.rejected(self.route, unit.events, unit.error)
            window.popleft()
            self.held -= unit.size
            self.held_bytes -= unit.nbytes
            moved = True
        return moved

    def _can_take(self) -> bool:
        """New events are taken only when a send could start, and the window has room."""
        return (not self.route.retiring and self.running < self.route.concurrency
                and self.held < self.batch_max
                and (self.held_bytes < self.route.max_bytes or not self.window))

    def _reads_behind(self) -> bool:
        route = self.route
        return (not route.live and not self.closing() and self.held <= self.batch_max // 2
                and self.held_bytes <= route.max_bytes // 2)

    async def _take(self) -> bool:
        """New events into the window: from the queue first, then (half a window at least at
        a time) from the store. True if it read from the store."""
        if not self._can_take():
            return False
        route = self.route
        if route.queue:
            fresh, taken = self._from_queue()
            read = False
        elif self._reads_behind():
            fresh = await self._read_behind(self.batch_max - self.held)
            taken = sum([len(ev.raw) for ev in fresh])
            read = True
        else:
            return False
        step = route.unit_max
        keyed = route.concurrency > 1
        window = self.window
        if len(fresh) <= step:
            if fresh:
                window.append(_Unit(fresh, taken, keyed))
        else:
            for i in range(0, len(fresh), step):
                part = fresh[i:i + step]
                window.append(_Unit(part, sum([len(ev.raw) for ev in part]), keyed))
        self.held += len(fresh)
        self.held_bytes += taken
        return read

    def _from_queue(self) -> tuple[list[Event], int]:
        """As many queued events as the window has room for, in events and in bytes (at least
        one): the rest waits in the queue, which overflows as it would."""
        route = self.route
        queue = route.queue
        room = route.max_bytes - self.held_bytes
        n = self.batch_max - self.held
        if len(queue) <= n and route.queued_bytes <= room:  # (all of it: the usual case)
            fresh = list(queue)
            taken = route.queued_bytes
            queue.clear()
        else:
            fresh = []
            taken = 0
            while queue and len(fresh) < n and (taken < room or not fresh):
                ev = queue.popleft()
                fresh.append(ev)
                taken += len(ev.raw)
        route.queued_bytes = route.queued_bytes - taken if queue else 0
        route.space_freed()
        return fresh, taken

    def _mark_inflight(self) -> None:
        route = self.route
        route.inflight = self.held
        if self.window:
            head = self.window[0].events[0]
            route.inflight_first = head.seq
            route.inflight_since = head.received_at
        else:
            route.inflight_first = 0

    def _start_sends(self) -> _Unit | None:
        """Start what may start: in order, skipping (and holding back the resources of) the
        units whose resource is being sent. With one send at a time, returns the unit for the
        engine to send itself (a task per batch would only cost time)."""
        route = self.route
        if self.running >= route.concurrency:
            return None
        if route.concurrency == 1:
            for unit in self.window:
                if not unit.started:
                    unit.started = True
                    self.running += 1
                    return unit
            return None
        busy = self.busy
        blocked: set[str] = set()
        loop = asyncio.get_running_loop()
        for unit in self.window:
            if unit.started:
                continue
            keys = unit.keys
            if keys and any(k in busy or k in blocked for k in keys):
                blocked.update(keys)
                continue
            for k in keys:
                busy[k] = busy.get(k, 0) + 1
            unit.started = True
            unit.task = loop.create_task(self._send(unit))
            self.running += 1
            if self.running >= route.concurrency:
                break
        return None

    async def _read_behind(self, limit: int) -> list[Event]:
        """Up to ``limit`` of the events a sink that is behind needs next, from the store (the
        events its filter skips are counted and left out)."""
        route = self.route
        start = route.next_seq
        events = await self.buffer.read(start, limit, self.server, route.name)
        seq = self.published()
        if not events:
            route.next_seq = seq + 1
        else:
            route.behind_since = events[0].received_at
            route.next_seq = events[-1].seq + 1
        if route.next_seq > seq:  # nothing was published meanwhile that it skipped
            route.live = True
            route.behind_since = 0.0
            if start <= seq:
                log.info("sink caught up from the spool", sink=route.name)
        types = route.types
        if types is None:
            return events
        batch = [ev for ev in events if ev.type in types]
        route.stats.filtered += len(events) - len(batch)
        return batch

    async def _put_back(self) -> None:
        route = self.route
        window = self.window
        tasks = [u.task for u in window if u.task is not None and not u.task.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        events = [ev for u in window for ev in u.events]
        route.queue.extendleft(reversed(events))
        route.queued_bytes += sum(len(ev.raw) for ev in events)
        route.inflight = 0
        route.inflight_first = 0

    # --- one send ----------------------------------------------------------------------------------
    async def _send(self, unit: _Unit) -> None:
        """One unit, retried on its own (with its own backoff: a send that keeps failing waits
        longer and longer, whatever the others do) until accepted or refused for good."""
        route = self.route
        policy = RetryPolicy(route, self.new_backoff())
        retrying = False
        try:
            while unit.events:
                await self._sink_pause()
                try:
                    await route.sink.send(unit.events)
                except (Exception, asyncio.CancelledError) as exc:
                    if cancelled_by_us(exc):
                        raise  # the window (or the loop) stops this send
                    error: BaseException = exc
                else:
                    route.accepted_sends += 1
                    unit.state = True
                    return
                verdict = policy.decide(error, len(unit.events))
                if verdict.pause:
                    now = asyncio.get_running_loop().time()
                    route.pause_until = max(route.pause_until, now + verdict.pause)
                if verdict.accepted:
                    self._acked_part(unit, verdict.accepted)
                if verdict.refused:
                    if verdict.refused >= len(unit.events):
                        unit.error = verdict.why
                        unit.state = False
                        return
                    await self._refused_part(unit, verdict.refused, verdict.why)
                if not verdict.retry:
                    continue
                if not retrying:
                    retrying = True
                    route.retrying += 1
                report_failure(route, error, "sink write failed", policy.backoff,
                               unexpected=verdict.unexpected)
                await self.pause(policy.backoff.next_delay())
            unit.state = True  # (the accepted head was the last of it)
        except BaseException as exc:
            if cancelled_by_us(exc) or isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            unit.crash = exc  # nothing retries this: the worker dies of it (``_free_ended``)
        finally:
            if retrying:
                route.retrying -= 1
            if unit.state is True:
                recovered(route)  # (if no other send of the sink is retrying)
            self.ended.append(unit)
            route.wake()

    async def _sink_pause(self) -> None:
        """Until the sink's pause (a receiver's ``Retry-After``) is over."""
        route = self.route
        loop = asyncio.get_running_loop()
        wait = route.pause_until - loop.time()
        while wait > 0:
            await asyncio.sleep(wait)
            wait = route.pause_until - loop.time()

    def _split_head(self, unit: _Unit, n: int) -> list[Event]:
        """The first ``n`` events of the unit at the head of the window (one send at a time),
        which leave the window now."""
        part, unit.events = unit.events[:n], unit.events[n:]
        nbytes = sum([len(ev.raw) for ev in part])
        unit.size -= n
        unit.nbytes -= nbytes
        self.held -= n
        self.held_bytes -= nbytes
        route = self.route
        route.inflight = self.held
        route.inflight_first = unit.events[0].seq if unit.events else 0
        return part

    def _acked_part(self, unit: _Unit, n: int) -> None:
        self.acks.acked(self.route, self._split_head(unit, n))

    async def _refused_part(self, unit: _Unit, n: int, why: str) -> None:
        await self.acks.rejected(self.route, self._split_head(unit, n), why)
