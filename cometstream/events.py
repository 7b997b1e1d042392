"""The Event: one StreamableEvent as received (or synthesized), and how it is written out.

An Event keeps the bytes the server sent. The ``event`` output format writes them unchanged, so
integers beyond 64 bits, unknown fields, key order and unicode reach the sinks byte for byte; the
``envelope`` format splices those same bytes into a small JSON wrapper. Nothing is re-serialized.
"""

from __future__ import annotations

import json
from typing import Any, Final

import orjson

from .constants import SEVT, SEVT_NAMES

__all__ = [
    "FORMATS",
    "JOB_COMPLETED",
    "JOB_TYPES",
    "ORIGINS",
    "Event",
    "completion_key",
    "type_label",
]

ORIGINS: Final = ("stream", "resync", "backfill")
FORMATS: Final = ("event", "envelope")
JOB_COMPLETED: Final = SEVT["SEVT_JOB_COMPLETED"]
_JOB_NEW: Final = SEVT["SEVT_JOB_NEW"]
#: the two job event types (the bulk of the stream; the only ones de-duplicated)
JOB_TYPES: Final = frozenset({_JOB_NEW, JOB_COMPLETED})


def completion_key(guid: str, end_time: object) -> str:
    """The dedup key of a job completion (see :meth:`Event.dedup_key`)."""
    end = end_time if isinstance(end_time, int) and not isinstance(end_time, bool) else 0
    return f"{JOB_COMPLETED}:{guid}:{end}"


def dump_json(obj: Any) -> bytes:
    """Compact JSON bytes of ``obj``: orjson, or the standard library for what orjson refuses
    (integers beyond 64 bits, valid JSON that a server may send)."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False).encode("utf-8", "backslashreplace")


def parse_raw(raw: bytes) -> dict[str, Any]:
    """Parse an event's bytes again (they were valid when received): orjson, or the standard
    library for what orjson refuses (integers beyond 64 bits, numbers beyond a double)."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = json.loads(raw)
    return doc if isinstance(doc, dict) else {}


def type_label(type_: int) -> str:
    """A bounded metric label for an event type: the SEVT name, or ``other`` for unknown numbers."""
    return SEVT_NAMES.get(type_, "other")


class Event:
    """One StreamableEvent. ``raw`` is a single line of JSON (the server's bytes, line breaks folded)."""

    __slots__ = (
        "_doc",
        "_type_name",
        "key",
        "origin",
        "raw",
        "received_at",
        "seq",
        "server",
        "type",
    )

    def __init__(
        self,
        raw: bytes,
        doc: dict[str, Any],
        type_: int,
        origin: str = "stream",
        received_at: float = 0.0,
        server: str = "",
    ) -> None:
        self.raw = raw
        self._doc: dict[str, Any] | None = doc
        self.type = type_
        self.origin = origin
        self.received_at = received_at
        self.server = server
        #: position in the pipeline, assigned when published (0 = not yet)
        self.seq = 0
        self._type_name: str | None = None
        #: the dedup key once known (None: not computed yet; "": the event has none): it
        #: outlives a released ``doc``. :meth:`dedup_key` computes it; the identity rules and
        #: the ledger (keys read back from the spool) set it directly
        self.key: str | None = None

    @classmethod
    def synthesize(
        cls, doc: dict[str, Any], *, origin: str, received_at: float, server: str
    ) -> Event:
        """An Event built by cometstream itself (resync, backfill): the same shape as a live one."""
        return cls(dump_json(doc), doc, int(doc["Type"]), origin=origin,
                   received_at=received_at, server=server)

    # --- views -----------------------------------------------------------------------------
    @property
    def doc(self) -> dict[str, Any]:
        """The parsed event. The pipeline releases it once no sink needs it (``release_doc``),
        to keep queued events small; reading it afterwards parses ``raw`` again."""
        doc = self._doc
        if doc is None:
            doc = self._doc = parse_raw(self.raw)
        return doc

    @doc.setter
    def doc(self, value: dict[str, Any]) -> None:
        self._doc = value

    def release_doc(self) -> None:
        self._doc = None

    @property
    def type_name(self) -> str:
        """``SEVT_...``: the known name; for a type this version does not know, the server's
        ``TypeString`` when it gives one, else ``SEVT_UNKNOWN_<n>``."""
        name = self._type_name
        if name is None:
            name = SEVT_NAMES.get(self.type)
            if name is None:
                ts = self.doc.get("TypeString")
                name = ts if isinstance(ts, str) and ts else f"SEVT_UNKNOWN_{self.type}"
            self._type_name = name
        return name

    @property
    def timestamp(self) -> int:
        """The server's ``Timestamp`` (Unix seconds), 0 when absent or not an integer."""
        ts = self.doc.get("Timestamp")
        return ts if isinstance(ts, int) and not isinstance(ts, bool) else 0

    @property
    def data(self) -> Any:
        return self.doc.get("Data")

    @property
    def job(self) -> dict[str, Any] | None:
        """The BackupJobDetail of a job event, or None."""
        if self.type == JOB_COMPLETED or self.type == _JOB_NEW:
            data = self.doc.get("Data")
            if isinstance(data, dict):
                return data
        return None

    def dedup_key(self) -> str | None:
        """The key that identifies a job event across the stream, resync and restarts, or None
        for events that are not de-duplicated.

        ``4200:<GUID>`` for a start, ``4201:<GUID>:<EndTime>`` for a completion (a job marked
        abandoned and then revived completes a second time, with another EndTime).

        Other events carry no identity: two logins of one user to one path in the same second
        are byte-identical and still two events, so a digest of the bytes would drop real events.
        They are never replayed either (resync rebuilds account changes from profile digests).
        """
        key = self.key
        if key is None:
            key = ""
            job = self.job
            if job is not None:
                guid = job.get("GUID")
                if isinstance(guid, str) and guid:
                    if self.type == JOB_COMPLETED:
                        key = completion_key(guid, job.get("EndTime"))
                    else:
                        key = f"{self.type}:{guid}"
            self.key = key
        return key or None

    def ordering_keys(self) -> tuple[str, ...]:
        """What the event is about, for sinks that send several events at once (two events
        sharing a key are never in flight together): its ``ResourceID``, and for a job event
        its GUID too (a start and its completion stay in order even from a server that sends
        no ``ResourceID``). Read from the bytes when the parsed event was released."""
        doc = self._doc if self._doc is not None else parse_raw(self.raw)
        keys: list[str] = []
        rid = doc.get("ResourceID")
        if isinstance(rid, str) and rid:
            keys.append("r:" + rid)
        if self.type in JOB_TYPES:
            data = doc.get("Data")
            guid = data.get("GUID") if isinstance(data, dict) else None
            if isinstance(guid, str) and guid:
                keys.append("j:" + guid)
        return tuple(keys)

    # --- output formats ------------------------------------------------------------------------
    def envelope(self) -> bytes:
        """``{"server", "origin", "received_at", "type_name", "event"}`` with the raw event inside."""
        return b"".join((
            b'{"server":', orjson.dumps(self.server),
            b',"origin":"', self.origin.encode(),
            b'","received_at":', orjson.dumps(self.received_at),
            b',"type_name":', orjson.dumps(self.type_name),
            b',"event":', self.raw, b"}",
        ))

    def render(self, fmt: str) -> bytes:
        """The event in output format ``fmt`` (``event`` or ``envelope``), without a newline."""
        return self.raw if fmt == "event" else self.envelope()

    def __repr__(self) -> str:
        return f"Event({self.type_name}, origin={self.origin}, seq={self.seq})"
