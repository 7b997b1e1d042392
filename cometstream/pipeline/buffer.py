"""Where a route's events wait beyond its memory queue: nowhere (memory) or the ledger (disk)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..delivery.ledger import Ledger
    from ..events import Event
    from .route import Route

__all__ = ["Buffer", "DiskBuffer", "MemoryBuffer"]


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
        # (every event comes here: the ledger's own append, with no relay in between)
        self.append = ledger.append  # type: ignore[method-assign]

    def wait(self) -> Awaitable[None]:
        return self.store.wait_for_room()

    def overflow(self, route: Route, ev: Event) -> bool:
        # the memory queue is full: the sink goes on from the store (nothing is dropped,
        # nothing blocks)
        route.fall_behind(ev.seq)
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
