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

        # optional capabilities, declared on this class with their defaults (override them):
        concurrency = 16                          # sends in flight at once (default 1)
        max_batch = 1                             # events per send when concurrency > 1
        max_retries = 10                          # counted failures of one send before its
                                                  # events are dead-lettered (None: forever)

        # optional, together: exactly once across a crash (the file sink has them)
        def position(self): ...                   # where the output stands after the last send
        def recover(self, position): ...          # before open(): the position committed with
                                                  # the cursor (None: unknown); recognise what
                                                  # was written after it, do not write it again
        def end_recovery(self): ...               # every event that could repeat has been sent

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
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

if TYPE_CHECKING:
    from typing import Self

    from ..events import Event
    from ..section import Section

__all__ = ["Position", "Sink"]

#: where a sink's output stands (``Sink.position()``): a small JSON list, or None (unknown)
Position: TypeAlias = "list[Any] | None"


class Sink(ABC):
    """Base class of every sink. ``name`` is the ``[sinks.NAME]`` key (the metric label)."""

    #: the output format when the config does not say (``event`` or ``envelope``)
    default_format: ClassVar[str] = "envelope"
    #: whether ``send`` reads the parsed event (``ev.doc``, ``ev.data``, ``ev.job``...). When no
    #: sink does, queued events keep only their bytes (reading ``doc`` then parses them again).
    uses_doc: bool = True

    #: sends the pipeline may have in flight at once (1: one after the other). Above 1, each
    #: send gets at most ``max_batch`` events and succeeds or fails as a whole (``accepted``
    #: and ``failed`` of a SinkError are not read); two events with the same resource are
    #: never in two sends at once, and acknowledgements still move in order.
    concurrency: int = 1
    #: the most events one send gets when ``concurrency`` > 1 (with 1, a batch is what is
    #: queued, up to the pipeline's batch size)
    max_batch: int = 1
    #: counted failures of one send after which its events are refused for good
    #: (dead-lettered); None: retried forever. What counts: see ``docs/sinks.md``.
    max_retries: int | None = None

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

    # --- for the operator: check and the start of run ---------------------------------------
    def warnings(self) -> list[str]:
        """Settings that work but that an operator should know of (a remote database without
        verified TLS), each a line naming its key (``sinks.NAME.dsn: ...``): ``check`` prints
        them, ``run`` logs them when the sink starts. No I/O."""
        return []

    async def probe(self) -> str | None:
        """``check --connect``: try what :meth:`send` needs (connect, log in) without sending
        an event, and say in a few words what answered; None when there is nothing to try.
        Raises :class:`SinkError` (the message is printed). Leaves nothing open."""
        return None

    # --- exactly once across a crash: override all three, or none ------------------------------
    def position(self) -> Position:
        """Where the output stands after what was acknowledged (a small JSON list), or None.
        Called on the event loop after each acknowledgement: cheap, no I/O."""
        return None

    def recover(self, position: Position) -> None:  # noqa: B027 - optional hook
        """Once, before :meth:`open`: the position committed with the sink's cursor (None:
        unknown). Recognise what was written after it; do not write it again."""

    def end_recovery(self) -> None:  # noqa: B027 - optional hook
        """Once, when every event that could repeat after a crash has been sent again."""

    @property
    def tracks_position(self) -> bool:
        """Whether :meth:`position` says anything (the class overrides it)."""
        return type(self).position is not Sink.position

    @property
    def recovers(self) -> bool:
        """Whether the sink is exactly once across a crash: it overrides :meth:`recover` and
        :meth:`end_recovery` (the pipeline then calls both)."""
        cls = type(self)
        return cls.recover is not Sink.recover and cls.end_recovery is not Sink.end_recovery

    def __repr__(self) -> str:
        return f"{type(self).__name__}({getattr(self, 'name', '?')!r})"
