"""The Comet event-stream protocol, without I/O.

After the websocket upgrade the client sends five text frames (Username, AuthType, Password,
SessionKey, TOTP; an empty frame skips a value) and the server answers ``200 OK`` or
``403 Unauth``. Then each text frame is one JSON ``StreamableEvent``, ``SEVT_META_HELLO`` first.

This module turns credentials into the five frames, classifies the reply, and turns a frame into
an :class:`~cometstream.events.Event` or a :class:`Malformed` description. It imports no asyncio
and no websocket library, and is tested with plain lists of frames.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import struct
import time
from dataclasses import dataclass
from typing import Any, Final, final
from urllib.parse import urlsplit, urlunsplit

import orjson
from orjson import JSONDecodeError
from orjson import loads as _loads

from .errors import CredentialsRejected, StreamError
from .events import Event

__all__ = [
    "AUTH_TYPES",
    "HELLO",
    "OK_REPLY",
    "Credentials",
    "Malformed",
    "auth_frames",
    "check_reply",
    "decode_frame",
    "frame_error",
    "stream_url",
    "totp_code",
]

AUTH_TYPES: Final = ("Password", "PasswordTOTP", "SessionKey")
OK_REPLY: Final = "200 OK"
HELLO: Final = 4000
STREAM_PATH: Final = "api/v1/events/stream"
_INT64_MIN: Final = -(1 << 63)
_INT64_MAX: Final = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class Credentials:
    """What one login sends. ``totp`` is the code for this login (computed by the caller)."""

    username: str
    auth_type: str
    password: str = ""
    session_key: str = ""
    totp: str = ""

    def __repr__(self) -> str:  # never show secrets, even in a traceback
        return f"Credentials(username={self.username!r}, auth_type={self.auth_type!r})"


def auth_frames(creds: Credentials) -> list[str]:
    """The five handshake frames in protocol order; values the auth type does not use are empty."""
    use_password = creds.auth_type in ("Password", "PasswordTOTP")
    return [
        creds.username,
        creds.auth_type,
        creds.password if use_password else "",
        creds.session_key if creds.auth_type == "SessionKey" else "",
        creds.totp if creds.auth_type == "PasswordTOTP" else "",
    ]


#: a refusal of the login, as Comet words it (``403 Unauth``) or as an HTTP-minded proxy might
_REFUSAL: Final = re.compile(r"(?:401|403)(?:\s|$)")


def check_reply(reply: str | bytes | None) -> None:
    """Accept ``200 OK`` (surrounding whitespace tolerated).

    A clear refusal (``403 Unauth``; any reply starting with ``403`` or ``401``) raises
    :class:`CredentialsRejected`. Anything else (an HTML page, an empty frame, ``500 ...``) is
    not a verdict on the credentials but a protocol error: :class:`StreamError`
    (``reason="login_reply"``), retried with backoff like a network failure."""
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    stripped = "" if text is None else text.strip()
    if stripped == OK_REPLY:
        return
    shown = "no reply" if text is None else repr(_printable(stripped[:80]))
    if _REFUSAL.match(stripped):
        raise CredentialsRejected(f"login rejected by server: {shown}",
                                  reply=_printable(stripped[:80]))
    raise StreamError(f"unexpected reply to the login: {shown} (expected {OK_REPLY!r} or "
                      "'403 Unauth'; is the URL a Comet Server?)", reason="login_reply")


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def stream_url(base_url: str) -> str:
    """The websocket URL of the event stream for a server's base URL.

    ``http`` becomes ``ws`` and ``https`` becomes ``wss``; a path prefix (a reverse proxy's
    sub-path) and a query string are kept. A ``ws``/``wss`` URL that already names the stream is
    used as given.
    """
    parts = urlsplit(base_url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https", "ws", "wss"):
        raise ValueError(f"expected an http:// or https:// URL, got {base_url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in {base_url!r}")
    ws_scheme = {"http": "ws", "https": "wss"}.get(scheme, scheme)
    path = parts.path.rstrip("/")
    if not path.endswith("/" + STREAM_PATH):
        path = f"{path}/{STREAM_PATH}"
    return urlunsplit((ws_scheme, parts.netloc, path, parts.query, ""))


def totp_code(secret_b32: str, at: float | None = None, *, step: int = 30, digits: int = 6) -> str:
    """The RFC 6238 TOTP code (HMAC-SHA1) of a base32 secret at time ``at`` (default: now)."""
    key = base64.b32decode(_b32_normalize(secret_b32), casefold=True)
    counter = int((time.time() if at is None else at) // step)
    mac = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[offset : offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10**digits).zfill(digits)


def _b32_normalize(secret: str) -> str:
    s = "".join(secret.split()).replace("-", "").upper()
    return s + "=" * (-len(s) % 8)


@final  # (so ``type(x) is Malformed`` tells a type checker that anything else is an Event)
@dataclass(frozen=True, slots=True)
class Malformed:
    """A frame that is not a StreamableEvent. ``reason`` is a bounded label; ``sample`` a short excerpt."""

    #: invalid_json | too_deep | not_object | bad_type | duplicate_key | binary | not_utf8 |
    #: oversized, and for a valid frame whose processing failed (:func:`frame_error`):
    #: bad_unicode | too_deep | processing_error
    reason: str
    detail: str
    sample: str
    size: int


def _sample(data: bytes) -> str:
    """The start of a bad frame, for the log line; none for what looks like a JSON object (an
    event, possibly with secrets not redacted yet)."""
    if data.lstrip()[:1] == b"{":
        return ""
    text = data[:60].decode("utf-8", "replace")
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    return text + ("..." if len(data) > 60 else "")


def frame_error(exc: BaseException, data: bytes | str) -> Malformed:
    """A frame that decoded but whose processing raised (gate, redaction, identity, publish):
    counted and skipped like a malformed one, so that one frame costs one frame, never the
    connection. No sample: the event may not be redacted yet, and the message of an exception
    may quote its data; the reason and the exception's class say what failed."""
    if isinstance(exc, UnicodeError):
        reason, what = "bad_unicode", "text that is not valid Unicode (a lone surrogate?)"
    elif isinstance(exc, RecursionError):
        reason, what = "too_deep", "nesting too deep to process"
    else:
        reason, what = "processing_error", "the event could not be processed"
    return Malformed(reason, f"{what} ({exc.__class__.__name__})", "", len(data))


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; accepting them would write unparseable lines
    raise ValueError(f"{name} is not valid JSON")


def _slow_loads(raw: bytes, exc: orjson.JSONDecodeError) -> Any:
    """Where orjson refuses a document, decide with the standard library.

    orjson rejects numbers beyond a double's range (``1e400``, 400-digit integers), which are
    valid JSON: the stdlib parses them. Only frames orjson refused take this path.
    """
    msg = str(exc)
    if "depth" in msg or "recursion" in msg.lower():
        return Malformed("too_deep", "nesting deeper than 1024 levels", _sample(raw), len(raw))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return Malformed("not_utf8", "frame is not valid UTF-8", _sample(raw), len(raw))
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        return Malformed("too_deep", "nesting too deep", _sample(raw), len(raw))
    except ValueError:
        return Malformed("invalid_json", msg.split(":", 1)[0][:80], _sample(raw), len(raw))


#: a frame's first ``"Type"``, a key with an integer value: ``"Type" : 4201,``
_FIRST_TYPE: Final = re.compile(rb'"Type"[ \t\r\n]*:[ \t\r\n]*(-?[0-9]+)[ \t\r\n]*[,}]')
#: a letter of ``Type`` written as an escape (``"\u0054ype"`` is the key ``Type`` too)
_ESCAPED_TYPE_LETTER: Final = re.compile(rb"\\u00(?:54|79|70|65)", re.IGNORECASE)
#: a frame up to this size is searched whole for a second ``"Type"`` first (a 1 KB job event:
#: 0.6 µs); a larger one is judged by its first ``"Type"`` (1.3 µs, whatever its size)
_SCAN_MAX: Final = 2048
#: what follows a member's value (a tuple: ``bytes in bytes`` first tries its operand as an
#: integer, and the exception that raises costs more than the whole check)
_VALUE_ENDS: Final = (b",", b"}")
#: every byte but the brackets, quotes and backslash (what :func:`_types_disagree` deletes)
_NOT_STRUCTURAL: Final = bytes(b for b in range(256) if b not in b'{}[]"\\')


def _types_disagree(raw: bytes, type_: int) -> bool | None:
    """Whether the top-level object gives ``Type`` more than once, the first not ``type_`` (the
    last, which orjson keeps and the filters read): a consumer whose parser keeps the first
    would get another event than the one routed. None: it cannot tell (nested deeper than the
    standard library parses).

    A frame whose keys come in Comet's order gives its top-level ``Type`` first, before any
    nested object: when what precedes the first ``"Type"`` is the object's opening and keys and
    values that hold no bracket, escape or open string, that ``"Type"`` is the top-level key,
    and its value is compared with ``type_``: equal, no ``Type`` after it can differ from the
    first. That costs a search of the frame's first hundred bytes, whatever its size (a
    profile's retention ranges hold more ``"Type"`` keys further on). Other frames that hold
    ``"Type"`` twice, or a letter of it as an escape (``"\\u0054ype"`` is the key ``Type`` too),
    are parsed again by the standard library, slow but only for them."""
    if len(raw) <= _SCAN_MAX and raw.count(b'"Type"') < 2 and not _escaped_type_letter(raw):
        return False  # (a small frame: scanned whole, cheaper than the steps below)
    at = raw.find(b'"Type"')
    if at > 0:
        # what precedes it, but for its brackets, quotes and backslashes: "{" and pairs of
        # quotes (keys and values without an escape) put it at the top level, a key's start
        shape = raw[:at].translate(None, _NOT_STRUCTURAL)
        if shape[:1] == b"{" and len(shape) & 1 and shape.count(b'"') == len(shape) - 1:
            same = b'"Type":%d' % type_  # (Comet's spelling: no second look at the value)
            if raw.startswith(same, at) and raw[at + len(same):at + len(same) + 1] in _VALUE_ENDS:
                return False
            first = _FIRST_TYPE.match(raw, at)
            if first is not None:
                return int(first.group(1)) != type_
    if raw.count(b'"Type"') > 1 or _escaped_type_letter(raw):
        return _types_disagree_exactly(raw, type_)
    return False


def _escaped_type_letter(raw: bytes) -> bool:
    # (92: "\\"; ``int in bytes`` is one memchr, without a method call's argument parsing)
    return 92 in raw and _ESCAPED_TYPE_LETTER.search(raw) is not None


def _types_disagree_exactly(raw: bytes, type_: int) -> bool | None:
    """:func:`_types_disagree` by the standard library's parser (None: nested deeper than it
    parses)."""
    outer: list[list[tuple[str, Any]]] = []

    def pairs(found: list[tuple[str, Any]]) -> None:
        outer[:] = [found]  # objects end inside out: the last one is the top level

    try:
        json.loads(raw, object_pairs_hook=pairs)
    except RecursionError:
        return None
    except ValueError:  # (orjson parsed it: not expected)
        return True
    types = [value for key, value in outer[0] if key == "Type"] if outer else []
    return len(types) > 1 and not (type(types[0]) is int and types[0] == type_)


def _lone_surrogate(doc: Any) -> bool:
    """Whether a (standard-library parsed) document holds a string, key or value, that is not
    valid Unicode. Iterative: the parser allows more nesting than recursion would."""
    stack = [doc]
    while stack:
        v = stack.pop()
        if type(v) is dict:
            for k in v:
                if not k.isascii():
                    try:
                        k.encode()
                    except UnicodeEncodeError:
                        return True
            stack.extend(v.values())
        elif type(v) is list:
            stack.extend(v)
        elif type(v) is str and not v.isascii():
            try:
                v.encode()
            except UnicodeEncodeError:
                return True
    return False


def decode_frame(
    data: bytes | str,
    received_at: float,
    server: str,
    origin: str = "stream",
) -> Event | Malformed:
    """One text frame → an Event, or a Malformed for anything that is not a JSON object with an
    integer ``Type``. Unknown types and unknown fields are fine: they are the server's to add.

    Runs for every frame: exact type checks, one parse, no copy unless the frame has line
    breaks or surrounding whitespace. (The read loop passes its arguments by position: a call
    with keywords costs more.)"""
    raw = data if type(data) is bytes else (
        data.encode() if isinstance(data, str) else bytes(data))
    try:
        doc = _loads(raw)
    except JSONDecodeError as exc:
        doc = _slow_loads(raw, exc)
        if type(doc) is Malformed:
            return doc
        if _lone_surrogate(doc):
            # valid JSON grammar, but not Unicode: no Comet Server writes it (Go escapes
            # invalid text as U+FFFD), and the ledger, the sinks and the logs could not encode
            # it. (Only frames orjson refused come here: it refuses lone surrogates.) No
            # sample: this is an event, not yet redacted.
            type_ = doc.get("Type") if type(doc) is dict else None
            return Malformed("bad_unicode", "a \\u escape that is a lone surrogate"
                             + (f" (event Type {type_})" if type(type_) is int else ""),
                             "", len(raw))
    if type(doc) is not dict:
        return Malformed("not_object", f"JSON {type(doc).__name__}, not an object", _sample(raw), len(raw))
    type_ = doc.get("Type")
    if type(type_) is not int:
        return Malformed("bad_type", "no integer Type field", _sample(raw), len(raw))
    if not _INT64_MIN <= type_ <= _INT64_MAX:  # (the ledger keeps types as 64-bit integers)
        return Malformed("bad_type", "Type beyond 64 bits", _sample(raw), len(raw))
    disagree = _types_disagree(raw, type_)
    if disagree:
        # the filters read the last Type (as orjson keeps it); a consumer whose parser keeps
        # the first would see another event than the one routed. No Comet Server writes this.
        return Malformed("duplicate_key", "Type given twice, differently", _sample(raw),
                         len(raw))
    if disagree is None:
        return Malformed("too_deep", "nested too deep to check that Type is given once",
                         _sample(raw), len(raw))
    raw = raw.strip()  # the same object when there is nothing to strip
    if 10 in raw or 13 in raw:  # (an int: one memchr each, no method call)
        # Line breaks outside strings are insignificant whitespace in JSON (inside strings they
        # must be escaped), so folding them keeps the document and makes it one JSON Lines line.
        raw = raw.replace(b"\r", b" ").replace(b"\n", b" ")
    return Event(raw, doc, type_, origin, received_at, server)
