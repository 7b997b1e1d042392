"""The identity of an event: one function each, used by the live path, the resync, backfill and
the file sink's recovery.

- :func:`fingerprint`: what the dedup window keeps of a dedup key (a signed 64-bit BLAKE2b).
- :func:`job_event`: a job event's dedup fingerprint, timestamp and tracked-state change, from
  one look at its data (the hot path). The dedup key itself is :meth:`Event.dedup_key`'s:
  ``4200:<GUID>`` for a start, ``4201:<GUID>:<EndTime>`` for a completion.
- :func:`action`: the change an event makes to the tracked state (running jobs, accounts,
  devices), applied once the event is kept.
- :func:`profile_digest` / :func:`account_entry`: what the ledger keeps of an account profile.
- :func:`event_identity` / :func:`line_identity`: how a file sink recognises, after a crash, the
  lines it wrote past its last committed offset when the same event comes again (from the store
  or synthesized by a resync): the dedup key for job events, the user and profile digest for
  account changes, the type and ID of an account removal or a device change, a digest of the
  bytes otherwise.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Final

import orjson

from ..constants import SEVT
from ..events import JOB_COMPLETED, Event, completion_key, parse_raw
from ..store.codec import fingerprint

__all__ = ["Action", "account_entry", "action", "completion_key", "event_identity",
           "fingerprint", "job_event", "line_identity", "profile_digest", "timestamp"]

JOB_NEW: Final = SEVT["SEVT_JOB_NEW"]
ACCOUNT_NEW: Final = SEVT["SEVT_ACCOUNT_NEW"]
ACCOUNT_REMOVED: Final = SEVT["SEVT_ACCOUNT_REMOVED"]
ACCOUNT_UPDATED: Final = SEVT["SEVT_ACCOUNT_UPDATED"]
DEVICE_NEW: Final = SEVT["SEVT_DEVICE_NEW"]
DEVICE_REMOVED: Final = SEVT["SEVT_DEVICE_REMOVED"]

#: a tracked-state change: ("job_new", guid, user, start), ("job_done", guid), ("account",
#: user, raw bytes), ("account_removed", user), ("device", id, added, owner), or None
Action = tuple[Any, ...] | None

#: statistics that change after every job: not an account change
_VOLATILE_KEYS: Final = frozenset({"Statistics"})
_blake2b = hashlib.blake2b
#: what SQLite's INTEGER holds (the ledger keeps timestamps and start times)
_INT64_MIN: Final = -(1 << 63)
_INT64_MAX: Final = (1 << 63) - 1


def profile_digest(profile: dict[str, Any], *, owned: bool = False) -> str:
    """A digest of a UserProfileConfig that ignores per-job statistics, the device list (devices
    are tracked, and reported, on their own) and key order. Any depth (a hostile server's
    profile nested 1,000 levels deep is digested too, without recursion). ``owned``: the
    caller parsed ``profile`` for this alone, and the parts ignored are taken out of it in
    place instead of copying the rest (a third of the cost)."""
    if owned:
        profile.pop("Devices", None)
        top = _strip_in_place(profile)
    else:
        top = _strip({k: v for k, v in profile.items() if k != "Devices"})
    try:
        blob = orjson.dumps(top, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # an integer beyond 64 bits (stdlib-parsed), a lone surrogate, or
        try:           # nesting deeper than orjson writes (254 levels)
            blob = json.dumps(top, sort_keys=True).encode()
        except (RecursionError, ValueError):
            blob = _canonical(top)
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def _strip(value: Any) -> Any:
    """A copy of dicts and lists without the ``_VOLATILE_KEYS`` (iterative: any depth)."""
    if not isinstance(value, (dict, list)):
        return value
    root: Any = {} if isinstance(value, dict) else []
    stack = [(value, root)]
    while stack:
        src, dst = stack.pop()
        items = src.items() if isinstance(src, dict) else enumerate(src)
        for k, v in items:
            if isinstance(src, dict) and k in _VOLATILE_KEYS:
                continue
            if isinstance(v, (dict, list)):
                c: Any = {} if isinstance(v, dict) else []
                stack.append((v, c))
                v = c
            if isinstance(dst, dict):
                dst[k] = v
            else:
                dst.append(v)
    return root


def _strip_in_place(value: dict[str, Any]) -> dict[str, Any]:
    """:func:`_strip`'s result, made by deleting the ``_VOLATILE_KEYS`` from ``value`` itself."""
    stack: list[Any] = [value]
    pop, push = stack.pop, stack.append
    while stack:
        v = pop()
        if type(v) is dict:
            for k in _VOLATILE_KEYS & v.keys():
                del v[k]
            v = v.values()
        for x in v:
            if isinstance(x, (dict, list)):
                push(x)
    return value


def _canonical(value: Any) -> bytes:
    """An unambiguous encoding with sorted keys, iterative (for what the JSON encoders refuse
    to nest): ASCII-escaped JSON tokens, NUL-separated."""
    parts: list[str] = []
    stack: list[Any] = [value]
    while stack:
        v = stack.pop()
        if type(v) is tuple:  # a marker: ("}",), ("]",) or (key, None)
            parts.append(v[0] if len(v) == 1 else json.dumps(v[0]) + ":")
        elif isinstance(v, dict):
            parts.append("{")
            stack.append(("}",))
            for k in sorted(v, reverse=True):
                stack.append(v[k])
                stack.append((k, None))
        elif isinstance(v, list):
            parts.append("[")
            stack.append(("]",))
            stack.extend(reversed(v))
        else:
            parts.append(json.dumps(v))
    return "\0".join(parts).encode()


def account_entry(profile: dict[str, Any], *, owned: bool = False) -> list[Any]:
    """What the ledger keeps of a profile: [digest without statistics and devices, CreationGUID].
    ``owned``: see :func:`profile_digest`."""
    creation = profile.get("CreationGUID", "") or ""
    return [profile_digest(profile, owned=owned),
            creation if isinstance(creation, str) else str(creation)]


def timestamp(doc: dict[str, Any], ev: Event) -> int:
    """An event's time for the tracker: the server's ``Timestamp``, or when it was received if
    the server gave none."""
    ts = doc.get("Timestamp")
    # (within 64 bits, or the ledger could not store it: a frame's number is the server's)
    return ts if type(ts) is int and _INT64_MIN <= ts <= _INT64_MAX and ts \
        else int(ev.received_at)


def job_event(ev: Event) -> tuple[int | None, int, Action]:
    """A job event's dedup fingerprint, timestamp and tracked-state change, from one look at its
    data (the hot path: job events are most of the stream); (None, 0, None) for a job without a
    GUID. Keeps the dedup key on the event (a sink may ask once ``doc`` is released)."""
    doc = ev.doc
    data = doc.get("Data")
    if type(data) is not dict:
        return None, 0, None
    guid = data.get("GUID")
    if type(guid) is not str or not guid:
        return None, 0, None
    ts = timestamp(doc, ev)
    if ev.type == JOB_COMPLETED:
        end = data.get("EndTime")
        key = ev.key = f"{JOB_COMPLETED}:{guid}:{end if type(end) is int else 0}"
        return fingerprint(key), ts, ("job_done", guid)
    user = data.get("Username")
    start = data.get("StartTime")
    key = ev.key = f"{JOB_NEW}:{guid}"
    return fingerprint(key), ts, ("job_new", guid, user if type(user) is str else "",
                                  start if type(start) is int
                                  and _INT64_MIN <= start <= _INT64_MAX else 0)


def action(ev: Event) -> Action:
    """The change a non-job event makes to the tracked state, applied once it is kept. Events
    of a resync change nothing here: a resync stages its account and device state as a whole."""
    if ev.origin != "stream":
        return None
    t = ev.type
    data = ev.data
    if t in (ACCOUNT_NEW, ACCOUNT_UPDATED):
        if isinstance(data, dict) and isinstance(data.get("Username"), str):
            # the server's bytes, not yet redacted: digested only when the ledger or a resync
            # needs it (Tracker.account_entries)
            return ("account", data["Username"], ev.raw)
    elif t == ACCOUNT_REMOVED:
        name = data if isinstance(data, str) else (
            data.get("Username") if isinstance(data, dict) else None)
        name = name or ev.doc.get("ResourceID")
        if isinstance(name, str) and name:
            return ("account_removed", name)
    elif t in (DEVICE_NEW, DEVICE_REMOVED):
        dev = ev.doc.get("ResourceID")
        if isinstance(dev, str) and dev:
            actor = ev.doc.get("Actor")
            return ("device", dev, t == DEVICE_NEW, actor if isinstance(actor, str) else "")
    return None


# --- recognising an event again (a file sink's recovery) ----------------------------------------
def _identity(type_: int, doc: dict[str, Any], raw: bytes) -> str:
    data = doc.get("Data")
    if type_ in (JOB_NEW, JOB_COMPLETED) and isinstance(data, dict):
        guid = data.get("GUID")
        if isinstance(guid, str) and guid:
            return (completion_key(guid, data.get("EndTime")) if type_ == JOB_COMPLETED
                    else f"{JOB_NEW}:{guid}")
    if type_ in (ACCOUNT_NEW, ACCOUNT_UPDATED) and isinstance(data, dict) \
            and isinstance(data.get("Username"), str):
        # a live change and the resync's report of it carry the same profile (less statistics)
        return f"a{type_}:{data['Username']}:{profile_digest(data)}"
    if type_ == ACCOUNT_REMOVED:
        name = data if isinstance(data, str) else (
            data.get("Username") if isinstance(data, dict) else None) or doc.get("ResourceID")
        if isinstance(name, str) and name:
            return f"r{type_}:{name}"
    if type_ in (DEVICE_NEW, DEVICE_REMOVED):
        dev = doc.get("ResourceID")
        if isinstance(dev, str) and dev:
            # the resync reports the change with its own timestamp: the type and ID are its
            # identity (within a recovery, which lasts until the first resync is delivered)
            return f"r{type_}:{dev}"
    return "b:" + _blake2b(raw, digest_size=16).hexdigest()


def event_identity(ev: Event) -> str:
    """How an event is recognised again (see the module docstring): from its bytes as written."""
    key = ev.key
    if key:
        return key
    doc = parse_raw(ev.raw) if ev.type in _PARSED else {}
    return _identity(ev.type, doc, ev.raw)


_PARSED: Final = frozenset({JOB_NEW, JOB_COMPLETED, ACCOUNT_NEW, ACCOUNT_UPDATED,
                            ACCOUNT_REMOVED, DEVICE_NEW, DEVICE_REMOVED})
_EVENT_KEY: Final = b',"event":'


def line_identity(line: bytes) -> str | None:
    """:func:`event_identity` of a line a file sink wrote (``event`` or ``envelope`` format);
    None for a line that is not an event."""
    try:
        doc = parse_raw(line)
    except (ValueError, UnicodeDecodeError):
        return None
    raw = line
    if "event" in doc and "type_name" in doc:  # an envelope: the event's bytes are spliced in
        i = line.find(_EVENT_KEY)
        if i < 0 or not isinstance(doc["event"], dict):
            return None
        raw = line[i + len(_EVENT_KEY):-1]
        doc = doc["event"]
    type_ = doc.get("Type")
    if type(type_) is not int:
        return None
    return _identity(type_, doc if type_ in _PARSED else {}, raw)
