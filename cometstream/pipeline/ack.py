"""Acknowledgements, positions and recovery: what a sink is done with, and where it stands.

An acknowledgement (a send accepted) moves the route's ``acked_seq``, records the sink's
``position()`` with it, feeds the latency histogram, ends a recovery that is complete and calls
the ack listeners; a refusal for good moves it too, after the events are kept as dead letters
(in the ledger, and the sink's ``dead_letter`` file if it has one).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
import structlog

from ..observe.logging import scrub
from .retry import FAILING_REMINDER

if TYPE_CHECKING:
    from ..events import Event
    from ..sinks.base import Position
    from .buffer import Buffer
    from .route import Route

__all__ = ["AckListener", "Acks", "DeadLetters"]

log = structlog.get_logger("cometstream.pipeline")

AckListener = Callable[["Route", Sequence["Event"]], None]


class Acks:
    """The acknowledgement side of every route: acks, dead letters, positions, recovery."""

    def __init__(self, buffer: Buffer) -> None:
        self.buffer = buffer
        self.listeners: list[AckListener] = []

    # --- acknowledgements ------------------------------------------------------------------------
    def acked(self, route: Route, batch: Sequence[Event]) -> None:
        stats = route.stats
        stats.delivered += len(batch)
        route.acked_seq = batch[-1].seq
        if route.tracks_position:
            route.history.append((route.acked_seq, route.sink.position()))
        if route.recover_until and route.acked_seq >= route.recover_until:
            self.recovered(route)
        now = time.time()
        stats.latency.observe_many([now - ev.received_at for ev in batch])
        for fn in self.listeners:
            fn(route, batch)

    async def rejected(self, route: Route, batch: Sequence[Event], msg: str) -> None:
        """Events the sink refused for good: counted, kept as dead letters, logged."""
        # the reason may quote the receiver's reply (an echoed Authorization header): masked
        # like the logs before it is kept in the ledger and the dead-letter file
        msg = scrub(msg)
        stats = route.stats
        stats.errors += 1
        stats.dropped["rejected"] += len(batch)
        route.acked_seq = batch[-1].seq
        kept: list[str] = []
        try:
            where = await self.buffer.dead_letters(route.name, list(batch), msg)
            if where is not None:
                kept.append(where)
        except Exception as exc:  # noqa: BLE001 - the disk is the problem: say so, go on
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

    # --- positions and recovery ------------------------------------------------------------------
    @staticmethod
    def positions(routes: Sequence[Route], cursors: dict[str, int]) -> dict[str, Position]:
        """Per sink, where its output stood once it had acknowledged what it did up to its
        cursor in ``cursors`` (the ledger may commit a cursor behind the sink's own)."""
        out = {}
        for r in routes:
            history = r.history
            if history:
                upto = cursors.get(r.name, 0)
                while len(history) > 1 and history[1][0] <= upto:
                    history.popleft()
                if history[0][0] <= upto:
                    r.position = history.popleft()[1]
            out[r.name] = r.position
        return out

    @staticmethod
    def recover(routes: Sequence[Route], positions: dict[str, Position]) -> None:
        """At start: each sink that recovers (a file sink) is told where its output stood at
        its committed cursor, to recognise what it wrote after it."""
        for route in routes:
            route.position = positions.get(route.name)
            if route.sink.recovers:
                route.sink.recover(route.position)
                route.recovering = True

    def end_recovery(self, routes: Sequence[Route], published: int) -> None:
        """Everything a crash may have left unaccounted has been published again (up to
        ``published``): each recovering sink ends its recovery once it has it."""
        for route in routes:
            if route.recovering:
                route.recover_until = max(published, 1)
                # (a sink not open yet has not read back its output: its first acknowledgement
                # beyond that seq ends it)
                if route.opened and route.done_through(published) >= published:
                    self.recovered(route)

    @staticmethod
    def recovered(route: Route) -> None:
        route.recovering = False
        route.recover_until = 0
        try:
            route.sink.end_recovery()
        except Exception:
            log.exception("sink end_recovery failed", sink=route.name)


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
