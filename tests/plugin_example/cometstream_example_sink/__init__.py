"""A minimal third-party sink: appends "<prefix> <event JSON>" lines to a file.

Registered with the entry point ``cometstream.sinks: example``, so that a config says::

    [sinks.mine]
    type = "example"
    path = "/var/lib/cometstream/example.txt"
    prefix = "comet"
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from cometstream.config import Section
from cometstream.errors import SinkError
from cometstream.events import Event
from cometstream.sinks import Sink


class ExampleSink(Sink):
    default_format = "event"

    def __init__(self, name: str, path: Path, prefix: str, fmt: str) -> None:
        self.name = name
        self.path = path
        self.prefix = prefix
        self.format = fmt

    @classmethod
    def from_config(cls, name: str, options: Section) -> ExampleSink:
        path = options.path("path")
        if path is None:
            raise options.error("path", "is required")
        prefix = options.str("prefix", "event")
        if " " in prefix:
            raise options.error("prefix", "must not contain spaces")
        fmt = options.str("format")
        options.done()
        return cls(name, path, prefix, fmt)

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    async def send(self, batch: Sequence[Event]) -> None:
        data = b"".join(self.prefix.encode() + b" " + ev.render(self.format) + b"\n"
                        for ev in batch)
        try:
            await asyncio.to_thread(self._append, data)
        except OSError as exc:
            raise SinkError(self.name, f"{self.path}: {exc.strerror}", retryable=True) from exc

    def _append(self, data: bytes) -> None:
        with self.path.open("ab") as fh:
            fh.write(data)
