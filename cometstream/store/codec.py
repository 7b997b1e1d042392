"""The chunk codec: how events are stored in the ``chunks`` table, and sink positions as text.

A chunk is one row of up to :data:`RANGE` events (and :data:`RANGE_BYTES` of their bytes):
``seq``, ``received_at``, ``type`` and ``origin`` as parallel little-endian arrays, the events'
bytes joined by newlines, and their dedup keys as a JSON list. One row per 256 events keeps a
burst's commit cheap, and is the granularity of the limits and of reads from disk.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Sequence
from itertools import islice
from typing import Any, Final

import orjson

from ..errors import LedgerCorrupt
from ..events import Event

__all__ = ["RANGE", "RANGE_BYTES", "Position", "Row", "column", "decode_position",
           "encode_position", "fingerprint", "pack", "split", "unpack"]

#: events per chunk (one row): the granularity of the limits, and of reads from disk
RANGE: Final = 256
#: a chunk's events' bytes at most (a chunk of large events holds fewer than ``RANGE``)
RANGE_BYTES: Final = 4 * 1024 * 1024


def fingerprint(key: str | int) -> int:
    """What the dedup window keeps of a key: a stable signed 64-bit BLAKE2b fingerprint (8 bytes
    in the ledger, where the key itself takes 60). A collision between two of 200,000 keys has a
    chance of about one in 10^9."""
    if isinstance(key, int):
        return key
    h = _BLAKE2B_8.copy()
    h.update(key.encode("utf-8", "surrogatepass"))
    fp: int = _INT64(h.digest())[0]  # (struct: half the cost of int.from_bytes with its keywords)
    return fp


#: the hash's initial state, copied for each key: a quarter cheaper than a new object, whose
#: keyword argument (``digest_size``) costs as much to parse as the hash costs to compute
_BLAKE2B_8: Final = hashlib.blake2b(digest_size=8)
_INT64: Final = struct.Struct("<q").unpack


#: origins as one byte each in a chunk
_ORIGIN_CODE: Final = {"stream": 0, "resync": 1, "backfill": 2}
_ORIGINS: Final = ("stream", "resync", "backfill")

#: where a sink's output stood at its cursor (a file sink: [inode, offset]), or None
Position = list[Any] | None
#: one event read back from a chunk: seq, received_at, type, origin, bytes, dedup key
Row = tuple[int, float, int, str, bytes, str | None]


def pack(events: Sequence[Event]) -> tuple[Any, ...]:
    """One chunk row: parallel little-endian arrays, and the events' bytes joined by newlines
    (an event's bytes never hold a line break: the stream folds them)."""
    seqs = array("q", [ev.seq for ev in events])
    received = array("d", [ev.received_at for ev in events])
    types = array("q", [ev.type for ev in events])
    origins = bytes([_ORIGIN_CODE.get(ev.origin, 0) for ev in events])
    if sys.byteorder != "little":
        for a in (seqs, received, types):
            a.byteswap()
    raws = b"\n".join([ev.raw for ev in events])
    # the dedup keys the pipeline computed (a sink that reads the chunk back, e.g. the webhook's
    # Idempotency-Key, then need not parse every job event again)
    keys = [ev.key for ev in events]
    try:
        keys_b = orjson.dumps(keys) if any(keys) else None
    except TypeError:  # a GUID with a lone surrogate (from the stdlib parser): not kept
        keys_b = None
    return (events[0].seq, events[-1].seq, events[-1].received_at, len(events), len(raws),
            seqs.tobytes(), received.tobytes(), types.tobytes(), origins, raws, keys_b)


def column(code: str, blob: bytes) -> array[Any]:
    """A chunk's array column (little-endian on disk) as a native array."""
    a = array(code, blob)
    if sys.byteorder != "little":
        a.byteswap()
    return a


def unpack(seqs_b: bytes, received_b: bytes, types_b: bytes, origins: bytes, raws: bytes,
           keys_b: bytes | None) -> list[Row]:
    seqs, received, types = column("q", seqs_b), column("d", received_b), column("q", types_b)
    lines = raws.split(b"\n")
    try:
        keys = orjson.loads(keys_b) if keys_b else [None] * len(lines)
    except orjson.JSONDecodeError:
        raise LedgerCorrupt("a chunk's dedup keys are not JSON") from None
    if type(keys) is not list:
        raise LedgerCorrupt("a chunk's dedup keys are not a list")
    if not (len(seqs) == len(received) == len(types) == len(origins) == len(lines) == len(keys)):
        raise LedgerCorrupt("a chunk's columns differ in length")
    return [(seqs[i], received[i], types[i], _ORIGINS[origins[i]] if origins[i] < 3 else
             "stream", lines[i], keys[i] if type(keys[i]) is str else None)
            for i in range(len(seqs))]


def split(batch: list[Event], start: int) -> list[list[Event]]:
    """``batch[start:]`` in chunks of ``RANGE`` events and ``RANGE_BYTES`` at most (at least
    one event each)."""
    parts: list[list[Event]] = []
    part: list[Event] = []
    size = 0
    for ev in islice(batch, start, None):
        n = len(ev.raw)
        if part and (len(part) >= RANGE or size + n > RANGE_BYTES):
            parts.append(part)
            part, size = [], 0
        part.append(ev)
        size += n
    if part:
        parts.append(part)
    return parts


def decode_position(text: str | None) -> Position:
    if not text:
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, list) else None


def encode_position(position: Position) -> str | None:
    return orjson.dumps(position).decode() if position is not None else None
