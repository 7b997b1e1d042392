"""A sink that keeps what it receives in memory: for tests, and a template for plugin authors."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import SinkError
from .base import Sink

if TYPE_CHECKING:
    from typing import Self

    from ..events import Event
    from ..section import Section

__all__ = ["MemorySink"]


class MemorySink(Sink):
    """Records every batch. ``fail_next`` makes the next N sends fail (retryable, unless
    ``fail_permanently``); ``delay`` slows every send; ``hang`` blocks sends until cleared."""

    default_format = "envelope"

    def __init__(self, name: str, *, format: str = "envelope", delay: float = 0.0) -> None:
        self.name = name
        self.format = format
        self.delay = delay
        self.batches: list[list[Event]] = []
        self.fail_next = 0
        self.fail_permanently = False
        self.hang = asyncio.Event()
        self.hang.set()  # set = not hanging
        self.opened = False
        self.closed = False

    @classmethod
    def from_config(cls, name: str, options: Section) -> Self:
        fmt = options.str("format", "envelope")
        delay = options.float("delay", 0.0, min=0)
        options.done()
        return cls(name, format=fmt, delay=delay)

    @property
    def events(self) -> list[Event]:
        return [ev for batch in self.batches for ev in batch]

    def lines(self) -> list[bytes]:
        return [ev.render(self.format) for ev in self.events]

    async def open(self) -> None:
        self.opened = True

    async def send(self, batch: Sequence[Event]) -> None:
        await self.hang.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_next > 0:
            self.fail_next -= 1
            raise SinkError(self.name, "injected failure", retryable=not self.fail_permanently)
        self.batches.append(list(batch))

    async def aclose(self) -> None:
        self.closed = True
