"""Reading ``checkpoint.json``, the delivery state of versions before the ledger, once, to
migrate it (:func:`~.migrate.migrate`).

Format 2: ``{"version": 2, "server", "watermark", "server_start_hash", "running_jobs": {GUID:
[Username, StartTime]}, "accounts": {username: [digest, CreationGUID]}, "devices": {id: owner},
"accounts_baseline", "dedup": {"fingerprints", "timestamps"}}``, the dedup window as two base64
arrays of little-endian int64. Format 1 kept the window as ``[[key, timestamp], ...]``.

A file that cannot be read (corrupt, another format version, another server) is moved aside
(``checkpoint.json.corrupt-<time>`` or ``.foreign-<time>``) with a clear log line, and the
migration goes on without it.
"""

from __future__ import annotations

import binascii
import os
import sys
import time
from array import array
from pathlib import Path
from typing import Any, Final

import orjson
import structlog

from ..errors import CheckpointUnreadable
from .codec import fingerprint
from .state import State

__all__ = ["read_checkpoint"]

log = structlog.get_logger("cometstream.ledger")

READABLE_VERSIONS: Final = (1, 2)


def read_checkpoint(path: Path, server: str) -> State | None:
    """The state in a checkpoint file, or None if it had to be moved aside. OSError if it
    cannot be read at all (the migration then fails and leaves it as it is)."""
    blob = path.read_bytes()
    try:
        return parse_checkpoint(blob, server)
    except CheckpointUnreadable as exc:
        _move_aside(path, exc.why, str(exc))
    except (ValueError, TypeError) as exc:
        _move_aside(path, "corrupt", str(exc))
    return None


def parse_checkpoint(blob: bytes, server: str) -> State:
    doc = orjson.loads(blob)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    version = doc.get("version")
    if version not in READABLE_VERSIONS:
        raise CheckpointUnreadable("foreign", f"format version {version!r}, this cometstream reads "
                          f"{READABLE_VERSIONS[-1]}")
    owner = _typed(doc, "server", str, "")
    if owner and owner != server:
        raise CheckpointUnreadable("foreign", f"written for server {owner!r}, this is {server!r}")
    st = State(
        watermark=_typed(doc, "watermark", int, 0),
        server_start_hash=_typed(doc, "server_start_hash", str, ""),
        running_jobs=_typed(doc, "running_jobs", dict, {}),
        accounts=_typed(doc, "accounts", dict, {}),
        devices=_typed(doc, "devices", dict, {}),
        accounts_baseline=_typed(doc, "accounts_baseline", bool, False),
    )
    # the entries too: a half-valid file must be moved aside, not fail every resync
    for guid, v in st.running_jobs.items():
        if not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
                and type(v[1]) is int):
            raise ValueError(f"running_jobs.{guid}: expected [username, start time]")
    for name, v in st.accounts.items():
        if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)):
            raise ValueError(f"accounts.{name}: expected [digest, CreationGUID]")
    for dev, owner_name in st.devices.items():
        if not isinstance(owner_name, str):
            raise ValueError(f"devices.{dev}: expected a username")
    st.dedup = _dedup(doc.get("dedup", {} if version >= 2 else []), version)
    return st


def _dedup(value: Any, version: int) -> list[tuple[int, int]]:
    if version >= 2:
        if not isinstance(value, dict):
            raise ValueError("dedup: expected an object")
        arrays = []
        for part in ("fingerprints", "timestamps"):
            v = value.get(part, "")
            if not isinstance(v, str):
                raise ValueError(f"dedup.{part}: expected base64 text")
            try:
                raw = binascii.a2b_base64(v)
            except binascii.Error as exc:
                raise ValueError(f"dedup.{part}: {exc}") from None
            if len(raw) % 8:
                raise ValueError(f"dedup.{part}: not an int64 array")
            a = array("q", raw)
            if sys.byteorder != "little":
                a.byteswap()
            arrays.append(a)
        if len(arrays[0]) != len(arrays[1]):
            raise ValueError("dedup: fingerprints and timestamps differ in number")
        return list(zip(arrays[0], arrays[1], strict=True))
    if not isinstance(value, list):
        raise ValueError("dedup: expected [key, timestamp] entries")
    out = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and type(item[1]) is int):
            raise ValueError("dedup: expected [key, timestamp] entries")
        out.append((fingerprint(item[0]), item[1]))
    return out


def _typed(doc: dict[str, Any], key: str, typ: Any, default: Any) -> Any:
    value = doc.get(key, default)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ValueError(f"{key}: expected {getattr(typ, '__name__', typ)}")
    return value


def _move_aside(path: Path, why: str, detail: str) -> None:
    target = path.with_name(f"{path.name}.{why}-{int(time.time())}")
    try:
        os.replace(path, target)
        log.error("checkpoint moved aside, migrating without it", reason=why, detail=detail,
                  moved_to=str(target))
    except OSError as exc:
        log.error("checkpoint unusable and cannot be moved aside", reason=why, detail=detail,
                  error=exc.strerror or str(exc))
