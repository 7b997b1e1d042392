"""Secrets inside event data, removed before any sink sees them.

Account events carry the whole ``UserProfileConfig`` (``PasswordHash``, ``TOTPKey``,
``PasswordRecovery``...), admin events the admin record, session events the session object, and
``SEVT_SERVER_UPDATED`` the whole server configuration (SMTP passwords, storage credentials,
licence keys...). Redaction walks ``Data`` of every event except the job events (whose
``BackupJobDetail`` holds no secret, and which are the bulk of the stream), and replaces the value
of every key that names a secret with ``"[REDACTED]"``. The rule is in ``docs/resync.md``.

A redacted event keeps every byte the server sent except the secrets' values when its bytes
are exactly what orjson writes for the parsed document (compact, no escape orjson would not
write, every number as orjson writes it back, no key given twice): the re-encoding of the
redacted document is then the received bytes with only those values replaced, with no search
for rewritten numbers. Other redacted events are re-encoded (key order kept; a number a double
would rewrite, and an integer beyond 64 bits, through the standard library's encoder). An event
with nothing to redact keeps its original bytes, unless those bytes may hold more than the
parsed document shows: a key given twice in one object (parsers keep the last one, so a secret
given first would survive in the bytes). Such an event is re-encoded from the parsed, redacted
document.

The walk is iterative (a list of the containers to visit, breadth first): a frame nested as deep
as the parser allows (1,024 levels) costs no recursion.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from typing import Any, Final

import orjson

from .errors import DuplicateKey
from .events import JOB_TYPES, Event

__all__ = ["MARK", "NO_SECRETS", "SAFE_KEYS", "SECRET_KEY_PATTERN", "Redactor", "rewrites_numbers"]

MARK: Final = "[REDACTED]"
#: key names (case-insensitive, anywhere in the name) whose values are secrets
SECRET_KEY_PATTERN: Final = re.compile(
    r"password|passwd|passphrase|secret|totpkey|privatekey|private_key|apikey|api_key|appkey|"
    r"accesskey|access_key|accountkey|bucketkey|sessionkey|session_key|token|credential|"
    r"recovery|serialnumber|licensekey|signingkey|encryptionkey|sharedkey|masterkey|"
    r"u2fregistrations|webauthnregistrations|customheaders|authorization|^key$",
    re.IGNORECASE,
)
#: names ending so describe a secret (its format, method, mode or switch), not hold one
_SAFE_ENDINGS: Final = ("format", "method", "mode", "enabled")
#: names that match the pattern but hold no secret (flags and formats)
SAFE_KEYS: Final = frozenset({
    "PasswordFormat", "AllowPasswordLogin", "AllowPasswordAndTOTPLogin",
    "AllowPasswordAndU2FLogin", "AllowPasswordAndWebAuthnLogin", "RequirePasswordChange",
    "TOTPKeyEncryptionFormat", "PasswordRecoveryEnabled", "HasPassword", "PasswordLastChanged",
})


def _number_shapes() -> bytes:
    table = bytearray(b"x" * 256)  # most bytes: "something else"
    for c in b"123456789":
        table[c] = ord("1")
    for c, to in zip(b"0.-eE:[,}]", b"0.-ee:::]]", strict=True):
        table[c] = to
    return bytes(table)


#: the shape of a JSON text as far as its numbers go: 0 itself, the other digits as 1, e and E
#: as e, what comes before a value (``:``, ``[``, ``,``) as ``:``, what closes one (``}``,
#: ``]``) as ``]``, ``.`` and ``-`` themselves, whitespace gone (``_BLANK``), anything else
#: ``x``. Inside strings the shape means nothing: a string shaped like a number only costs
#: the slow path.
_SHAPES: Final = _number_shapes()
_BLANK: Final = b" \t\r\n"
#: in that shape, a number a double would rewrite: one with an exponent (``1e400``, ``1E5``,
#: ``-2.5e-3``), or a negative zero integer (``-0``: read as ``0``). Hex digits in strings
#: (``"78e51061"``) are preceded by ``x``, not ``:``. (The regex starts with a literal, so
#: it runs in C: about 15 µs with the translation for a 6 KB profile.)
_REWRITTEN: Final = re.compile(rb":-?[01.]+e|:-0[:\]]")
#: a number of 19+ digits may not fit 64 bits (orjson reads those as floats): 20 digits above
#: 2**64 - 1, and 19 below -2**63; found by mapping every digit to 0 and looking for nineteen of
#: them (a regex is a hundred times slower)
_ZERO_DIGITS: Final = bytes.maketrans(b"123456789", b"000000000")
#: a negative zero integer, or text that looks like one (``"x-0"``: only costs the full check);
#: not ``-0`` in a GUID (``-0b2c``), nor ``-05``, ``-0.5``, ``-0e1`` (those are floats anyway)
_NEG_ZERO: Final = re.compile(rb"-0(?![0-9A-Za-z.])")
_LONG_RUN: Final = b"0" * 19
#: substrings of every name above: a name with none of them (most names, and ids used as keys)
#: is judged without the regex
_NEEDLES: Final = ("pass", "secret", "key", "token", "credential", "recovery", "serialnumber",
                   "registrations", "customheaders", "authorization")
#: keys whose values are measurements, never secrets: not walked. ``Statistics`` in a profile
#: holds the last jobs' BackupJobDetail (the job events' data, not redacted either) and sizes;
#: it is most of a profile's objects, and changes after every job.
NO_SECRETS: Final = frozenset({"Statistics"})
_NONE: Final[frozenset[str]] = frozenset()
#: the types the walk goes into (one set lookup per value: half the bytecode of two tests)
_CONTAINERS: Final = frozenset({dict, list})
#: values not worth replacing (nothing to hide)
_EMPTY: Final[tuple[object, ...]] = (None, "", [], {}, MARK)
#: key names judged and remembered at most (the ids used as keys included): about 13 MB
#: of ids like GUIDs
KNOWN_MAX: Final = 100_000
#: lower-cased key names: the same test without IGNORECASE (several times faster)
_LOWER: Final = re.compile(SECRET_KEY_PATTERN.pattern)


class Redactor:
    def __init__(self, *, extra_keys: Iterable[str] = (), enabled: bool = True) -> None:
        self.enabled = enabled
        self.extra = frozenset(k.lower() for k in extra_keys)
        self.redacted_events = 0
        #: redacted events re-encoded through the exact (standard library, slow) path
        self.exact_events = 0
        #: redacted events whose bytes were kept as received, the secrets' values excepted
        #: (:func:`_as_received`)
        self.kept_events = 0
        # Key names repeat across events (every profile has the same few hundred): each is
        # judged once, and a dict's keys are then matched with set operations, in C.
        self._known: set[str] = set()
        self._secret: set[str] = set()
        #: the known names that are neither secret nor skipped (:data:`NO_SECRETS`): an object
        #: whose every key is one of them is only looked into (one set operation)
        self._plain: set[str] = set()
        #: (lower-cased) what any secret name contains: bytes without any of them hide none
        #: (and the Kelvin sign, the one non-ASCII letter whose lower case is ASCII: "k")
        self._byte_needles = tuple({n.encode() for n in _NEEDLES} | {"\u212a".encode()}
                                   | {k.encode("utf-8", "surrogatepass") for k in self.extra})

    def is_secret(self, key: str) -> bool:
        if key in self._known:
            return key in self._secret
        lower = key.lower()
        if key in SAFE_KEYS or lower.endswith(_SAFE_ENDINGS):
            verdict = False
        elif not _mentions_secret(lower):
            verdict = lower in self.extra
        else:
            verdict = _LOWER.search(lower) is not None or lower in self.extra
        if len(key) <= 256:  # (the names, and their lengths, are the server's to choose)
            known = self._known
            if len(known) >= KNOWN_MAX:
                # full: forgotten all at once, and the names met from now on are judged again
                # (a few hundred). Over months the ids used as keys (devices, sources,
                # destinations) come and go: a cache that kept the first ones for good would
                # leave every new one to be judged at every event, which doubles the cost
                # of a profile's walk.
                known.clear()
                self._secret.clear()
                self._plain.clear()
            known.add(key)
            if verdict:
                self._secret.add(key)
            elif key not in NO_SECRETS:
                self._plain.add(key)
        return verdict

    def _walk(self, root: Any,
              replaced: list[tuple[dict[str, Any], str, Any]] | None = None) -> bool:
        """Redact ``root`` in place; True if anything changed. Iterative: the containers to
        visit are in a list (each once, breadth first, held until the walk ends: a slot per
        container), so depth costs no recursion. ``replaced``, when given, gets each value
        replaced, with its object and key.

        The hot path of an account event (a profile: a few dozen objects): an object whose
        names are all known plain ones (most) costs one set operation on its keys and one pass
        over its values; the others, two or three set operations more, each run in C against
        the smaller side."""
        changed = False
        known = self._known
        secret_names = self._secret
        plain = self._plain
        todo = [root]  # (iterated as it grows: no pop per container)
        push = todo.append
        for value in todo:
            if type(value) is dict:
                # most objects hold only plain names (nothing to replace or skip): they are
                # only looked into, below
                if not plain.issuperset(value):
                    keys = value.keys()
                    secret: AbstractSet[Any]
                    if not known.issuperset(keys):  # new names (or ids used as keys)
                        secret = found = keys & secret_names
                        for k in keys:
                            # (the verdict, not the cache: at its bound the cache starts over)
                            if k not in known and isinstance(k, str) and self.is_secret(k):
                                found.add(k)
                    elif keys.isdisjoint(secret_names):  # (no set built)
                        secret = _NONE
                    else:
                        secret = keys & secret_names
                    for k in secret:
                        old = value[k]
                        if old not in _EMPTY:
                            if replaced is not None:
                                replaced.append((value, k, old))
                            value[k] = MARK
                            changed = True
                    if not keys.isdisjoint(NO_SECRETS):
                        for k, v in value.items():
                            if type(v) in _CONTAINERS and k not in NO_SECRETS:
                                push(v)
                        continue
                for v in value.values():
                    if type(v) in _CONTAINERS:
                        push(v)
            else:  # (only dicts and lists are pushed)
                for v in value:
                    if type(v) in _CONTAINERS:
                        push(v)
        return changed

    def apply(self, ev: Event) -> Event:
        """The event with secret values replaced (the same object, re-encoded only if changed).

        The document parsed when the frame was received is redacted in place. If the received
        bytes are what orjson writes for it, they are kept but for the secrets' values
        (:func:`_as_received`); else it is re-encoded, unless it held a number a double would
        rewrite (orjson read an integer beyond 64 bits as a float, which it writes with an
        exponent: ``1.8446744073709552e+19``); such an event is re-encoded from an exact parse
        instead."""
        if not self.enabled or ev.type in JOB_TYPES:
            return ev
        doc = ev.doc
        data = doc.get("Data")
        if type(data) is not dict and type(data) is not list:
            # nothing to walk; but a hidden first "Data" may hold what this one does not
            raw = ev.raw
            if raw.count(b'"Data"') <= ("Data" in doc) and (92 not in raw  # (92: "\\")
                                                           or raw.find(b"\\u") < 0):
                return ev
            if not _duplicate_keys(raw):
                return ev
        else:
            replaced: list[tuple[dict[str, Any], str, Any]] = []
            if not self._walk(data, replaced):
                if not self._hides_something(ev.raw):
                    return ev
            else:
                kept = _as_received(doc, replaced, ev.raw)
                if kept is not None:
                    ev.raw = kept
                    self.kept_events += 1
                    self.redacted_events += 1
                    return ev
        try:
            out = orjson.dumps(doc)
            inexact = self._may_rewrite(doc, ev.raw) and \
                rewrites_numbers(ev.raw, out)
        except TypeError:  # integers beyond a double (the stdlib parsed this frame, exactly),
            inexact = True  # a lone surrogate, or nesting deeper than orjson writes
        if inexact:
            out = self._exact(ev.raw)
            self.exact_events += 1
        ev.raw = out
        self.redacted_events += 1
        return ev

    @staticmethod
    def _may_rewrite(doc: dict[str, Any], raw: bytes) -> bool:
        """Whether orjson's encoding of ``doc`` may have changed a number's text, told from
        the parsed document, cheaply: a number with an exponent and an integer beyond 64 bits
        were read as floats, so with no float anywhere only a negative zero integer (``-0``,
        read as ``0``) is left, which the bytes show. Otherwise :func:`rewrites_numbers`
        decides. (Only re-encoded events come here: the search for floats walks the whole
        document, and costs less than a search of its bytes.)"""
        return _has_float([doc]) or _NEG_ZERO.search(raw) is not None

    def _exact(self, raw: bytes) -> bytes:
        """``raw`` redacted from an exact parse: every number as the very text it came as
        (``1e400``, ``1E5``, ``-0``, an integer beyond 64 bits), never through a float."""
        nonce = os.urandom(6).hex()
        numbers: list[str] = []

        def keep(text: str) -> str:
            numbers.append(text)
            return f"\x00{nonce}:{len(numbers) - 1}\x00"

        exact = json.loads(raw, parse_float=keep,  # (the last of duplicate keys, as orjson)
                           parse_int=lambda t: keep(t) if t == "-0" else int(t))
        data = exact.get("Data")
        if type(data) is dict or type(data) is list:
            self._walk(data)
        text = json.dumps(exact, ensure_ascii=False, separators=(",", ":"))
        try:
            out = text.encode()
        except UnicodeEncodeError:  # a lone surrogate: written as the escape it came as
            out = json.dumps(exact, separators=(",", ":")).encode()
        if numbers:  # each number's placeholder string back to its text
            mark = re.compile(rb'"\\u0000' + nonce.encode() + rb':(\d+)\\u0000"')
            out = mark.sub(lambda m: numbers[int(m.group(1))].encode(), out)
        return out

    def _hides_something(self, raw: bytes) -> bool:
        """Whether the bytes of an event in which the parsed document showed nothing to redact
        may still carry a secret: only through a key given twice (the parser kept the last),
        so only if the bytes name a secret (or spell a name with ``\\u`` escapes); then the
        bytes are checked for duplicate keys (the standard library's parser, slow but rare)."""
        if 92 not in raw or raw.find(b"\\u") < 0:  # (92: "\\", one memchr)
            low = raw.lower()
            for needle in self._byte_needles:
                if low.find(needle) >= 0:  # (``bytes in bytes`` raises and clears an error)
                    break
            else:
                return False
        return _duplicate_keys(raw)

    def profile(self, profile: dict[str, Any]) -> dict[str, Any]:
        """A redacted copy of a profile (for synthesized account events)."""
        out: dict[str, Any] = _copy(profile)
        if self.enabled:
            self._walk(out)
        return out


def _as_received(doc: dict[str, Any], replaced: list[tuple[dict[str, Any], str, Any]],
                 raw: bytes) -> bytes | None:
    """The redacted ``doc`` encoded, if that is ``raw`` with only the replaced values changed;
    else None (the caller re-encodes).

    That holds when orjson's encoding of the document as parsed (its ``replaced`` values put
    back for the time of one encoding) is ``raw`` itself: the encoding is made of each value's
    own, so the redacted document's differs from ``raw`` only where a value was replaced.
    Everything a re-encoding could change fails that comparison: a number orjson writes
    otherwise (``1E5``, ``-0``, ``1.10``, an integer beyond 64 bits), an escape (``\\u003c``),
    whitespace, a key given twice (the parsed document holds one copy). One encoding more
    (about 5 µs for a 7 KB profile) instead of a search of the bytes for numbers (15-35). The
    redacted bytes are then those bytes with the values replaced (:func:`_spliced`), or, where
    that would cost more or cannot be sure, the redacted document encoded."""
    for obj, key, old in replaced:
        obj[key] = old
    try:
        received = orjson.dumps(doc)
    except TypeError:  # integers beyond 64 bits (the stdlib parsed this frame), too deep
        return None
    finally:
        for obj, key, _ in replaced:
            obj[key] = MARK
    if received != raw:
        return None
    spliced = _spliced(raw, replaced)
    return spliced if spliced is not None else orjson.dumps(doc)


#: :func:`_spliced` searches the bytes once per distinct replaced key and value: past this
#: many, encoding the document again costs less (a 7 KB profile: one search about a quarter
#: of an encoding's instructions, with the bookkeeping)
_SPLICE_MAX: Final = 2
_MARK_JSON: Final = b'"' + MARK.encode() + b'"'


def _spliced(raw: bytes, replaced: list[tuple[dict[str, Any], str, Any]]) -> bytes | None:
    """``raw``, orjson's encoding of the document before redaction, with each replaced value's
    encoding changed to :data:`MARK`'s: orjson's encoding of the redacted document, without
    encoding it again. None where the bytes cannot say for sure where the values are, or
    there are more than :data:`_SPLICE_MAX` distinct ones to look for.

    In ``raw`` each replaced key and value is written ``"key":value`` (orjson's encoding is
    made of each part's own, with no space), once per replacement, at places that do not
    overlap (a replaced value is not walked, so no replacement lies inside another). When the
    bytes hold that text exactly as many times as it was replaced, overlapping places counted,
    every place found is one of them; otherwise (the same text inside a value not walked, or
    inside a key spelt with an escaped quote) None."""
    wanted: dict[bytes, list[int]] = {}  # "key":value -> [times replaced, where value starts]
    for _obj, key, old in replaced:
        name = orjson.dumps(key)
        pair = name + b":" + orjson.dumps(old)
        if pair in wanted:
            wanted[pair][0] += 1
        elif len(wanted) == _SPLICE_MAX:
            return None
        else:
            wanted[pair] = [1, len(name) + 1]
    places: list[tuple[int, int, int]] = []  # (start, where its value starts, end)
    for pair, (times, value_at) in wanted.items():
        size = len(pair)
        at = raw.find(pair)
        while at >= 0:
            times -= 1
            if times < 0:
                return None
            places.append((at, at + value_at, at + size))
            at = raw.find(pair, at + 1)
        if times:
            return None
    places.sort()
    view = memoryview(raw)  # (slices of it are not copies: the join copies the bytes once)
    out: list[bytes | memoryview] = []
    done = 0
    for start, value_at, end in places:
        if start < done:  # (cannot happen, by the above; never splice over a splice)
            return None
        out.append(view[done:value_at])
        out.append(_MARK_JSON)
        done = end
    out.append(view[done:])
    return b"".join(out)


def rewrites_numbers(raw: bytes, out: bytes) -> bool:
    """Whether ``out``, orjson's encoding of the parsed ``raw``, may have changed the text of a
    number: one with an exponent (``1e400``, ``1E5``: read as a double), a negative zero integer
    (``-0``: read as ``0``), or an integer beyond 64 bits (read as a double, written with
    ``e+``; a decimal beyond a double, read as infinity, written as ``null``).

    Never wrong for a number; a string shaped like one after a ``:`` or ``,`` (``"a:1e5"``)
    only costs the slow path. Strings of hex digits (``"78e51061"``) do not."""
    if ((out.find(b"e+") >= 0 or out.find(b"null") >= 0)
            and raw.translate(_ZERO_DIGITS).find(_LONG_RUN) >= 0):
        return True
    return _REWRITTEN.search(raw.translate(_SHAPES, _BLANK)) is not None


def _has_float(values: list[Any]) -> bool:
    """Whether a float is among ``values`` or anywhere inside them (iterative)."""
    stack: list[Any] = [values]
    while stack:
        container = stack.pop()
        items = container.values() if type(container) is dict else container
        kinds = set(map(type, items))
        if float in kinds:
            return True
        if dict in kinds or list in kinds:
            stack.extend(v for v in items if type(v) is dict or type(v) is list)
    return False


def _mentions_secret(lowered: str) -> bool:
    return any(needle in lowered for needle in _NEEDLES)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> None:
    if len(pairs) > 1 and len({k for k, _ in pairs}) != len(pairs):
        raise DuplicateKey
    # (the parsed values are not needed: None)


def _duplicate_keys(raw: bytes) -> bool:
    """Whether some object in ``raw`` gives a key twice (True too when it cannot be told)."""
    try:
        json.loads(raw, object_pairs_hook=_no_duplicates)
    except DuplicateKey:
        return True
    except (RecursionError, ValueError):  # deeper than the stdlib parses: assume the worst
        return True
    return False


def _copy(value: Any) -> Any:
    """A deep copy of dicts and lists (iterative: any depth)."""
    if type(value) is not dict and type(value) is not list:
        return value
    root: Any = {} if type(value) is dict else []
    stack = [(value, root)]
    while stack:
        src, dst = stack.pop()
        if type(src) is dict:
            for k, v in src.items():
                if type(v) is dict or type(v) is list:
                    c: Any = {} if type(v) is dict else []
                    stack.append((v, c))
                    v = c
                dst[k] = v
        else:
            for v in src:
                if type(v) is dict or type(v) is list:
                    c = {} if type(v) is dict else []
                    stack.append((v, c))
                    v = c
                dst.append(v)
    return root
