"""The Sink contract: what a destination of events implements, and nothing more.

A sink is one class::

    class MySink(Sink):
        default_format = "event"                  # or "envelope"

        @classmethod
        def from_config(cls, name, options):      # options: a cometstream.config.Section
            url = options.str("url", required=True)
            fmt = options.str("format")           # always present, already validated
            options.done()                        # unknown keys → ConfigError naming the key
            return cls(name, url, fmt)

        async def open(self): ...                 # connect; raise SinkError(retryable=True) if down
        async def send(self, batch): ...          # return only once the batch is durably accepted
        async def aclose(self): ...
        def reopen(self): ...                     # optional: SIGHUP (reopen files)

        # optional, together: exactly once across a crash (the file sink has them)
        def position(self): ...                   # where the output stands after the last send
        def recover(self, position): ...          # before open(): the position committed with
                                                  # the cursor (None: unknown); recognise what
                                                  # was written after it, do not write it again
        def end_recovery(self): ...               # every event that could repeat has been sent

        # optional: several sends at once (the webhook has them)
        concurrency = 16                          # sends in flight at once (> 1)
        max_batch = 1                             # events per send; each send all or nothing

``from_config`` must not do I/O: it runs for ``cometstream check`` too. Filtering (``types``),
the bounded buffer, batching, retries with backoff, metrics and acknowledgements belong to the
pipeline: a sink only writes a batch or raises :class:`~cometstream.errors.SinkError` with
``retryable`` saying whether the same batch may succeed later. ``position()`` must return a
small JSON value (a list of numbers or strings): the ledger stores it with the sink's cursor.
Third-party sinks register an entry point in the group ``cometstream.sinks`` (see
``docs/sinks.md``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from typing import Self

    from ..events import Event
    from ..section import Section

__all__ = ["Sink"]


class Sink(ABC):
    """Base class of every sink. ``name`` is the ``[sinks.NAME]`` key (the metric label)."""

    #: the output format when the config does not say (``event`` or ``envelope``)
    default_format: ClassVar[str] = "envelope"
    #: whether ``send`` reads the parsed event (``ev.doc``, ``ev.data``, ``ev.job``...). When no
    #: sink does, queued events keep only their bytes (reading ``doc`` then parses them again).
    uses_doc: bool = True

    name: str

    @classmethod
    @abstractmethod
    def from_config(cls, name: str, options: Section) -> Self:
        """Build the sink from its ``[sinks.NAME]`` options (validated; no I/O)."""

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Acquire resources (files, connections). Retried by the pipeline if it raises SinkError."""

    @abstractmethod
    async def send(self, batch: Sequence[Event]) -> None:
        """Deliver ``batch`` in order; return only once it is durably accepted, else raise SinkError."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Flush and release resources. Called once, after the last send."""

    def reopen(self) -> None:  # noqa: B027 - optional hook
        """Reopen files (SIGHUP, for logrotate). Must not block."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({getattr(self, 'name', '?')!r})"
