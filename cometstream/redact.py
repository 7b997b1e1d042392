"""Secrets inside event data, removed before any sink sees them.

Account events carry the whole ``UserProfileConfig`` (``PasswordHash``, ``TOTPKey``,
``PasswordRecovery``...), admin events the admin record, session events the session object, and
``SEVT_SERVER_UPDATED`` the whole server configuration (SMTP passwords, storage credentials,
licence keys...). Redaction walks ``Data`` of every event except the job events (whose
``BackupJobDetail`` holds no secret, and which are the bulk of the stream), and replaces the value
of every key that names a secret with ``"[REDACTED]"``. The rule is in ``docs/resync.md``.

A redacted event is re-encoded (key order kept; integers beyond 64 bits through the standard
library's encoder); an event with nothing to redact keeps its original bytes.
"""

from __future__ import annotations

import json
import re

import orjson
from collections.abc import Iterable
from typing import Any, Final

from .events import JOB_TYPES, Event

__all__ = ["MARK", "NO_SECRETS", "SECRET_KEY_PATTERN", "SAFE_KEYS", "Redactor"]

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


#: a number of 19+ digits may not fit 64 bits (orjson reads those as floats): 20 digits above
#: 2**64 - 1, and 19 below -2**63; found by mapping every digit to 0 and looking for nineteen of
#: them (a regex is a hundred times slower)
_ZERO_DIGITS: Final = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN: Final = b"0" * 19
#: substrings of every name above: a name with none of them (most names, and ids used as keys)
#: is judged without the regex
_NEEDLES: Final = ("pass", "secret", "key", "token", "credential", "recovery", "serialnumber",
                   "registrations", "customheaders", "authorization")
#: keys whose values are measurements, never secrets: not walked. ``Statistics`` in a profile
#: holds the last jobs' BackupJobDetail (the job events' data, not redacted either) and sizes;
#: it is most of a profile's objects, and changes after every job.
NO_SECRETS: Final = frozenset({"Statistics"})
#: values not worth replacing (nothing to hide)
_EMPTY: Final = (None, "", [], {}, MARK)
#: lower-cased key names: the same test without IGNORECASE (several times faster)
_LOWER: Final = re.compile(SECRET_KEY_PATTERN.pattern)


class Redactor:
    def __init__(self, *, extra_keys: Iterable[str] = (), enabled: bool = True) -> None:
        self.enabled = enabled
        self.extra = frozenset(k.lower() for k in extra_keys)
        self.redacted_events = 0
        # Key names repeat across events (every profile has the same few hundred): each is
        # judged once, and a dict's keys are then matched with set operations, in C.
        self._known: set[str] = set()
        self._secret: set[str] = set()

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
        if len(self._known) < 100_000:  # bounded: key names are the server's to choose
            self._known.add(key)
            if verdict:
                self._secret.add(key)
        return verdict

    def _walk(self, value: Any) -> bool:
        """Redact ``value`` in place; True if anything changed."""
        changed = False
        walk = self._walk
        if type(value) is dict:
            keys = value.keys()
            secret = keys & self._secret
            if not self._known.issuperset(keys):  # new names (or ids used as keys)
                for k in keys:
                    # (the verdict, not the cache: past its bound the cache keeps no more)
                    if k not in self._known and isinstance(k, str) and self.is_secret(k):
                        secret.add(k)
            for k in secret:
                if value[k] not in _EMPTY:
                    value[k] = MARK
                    changed = True
            # the types of the values, found in C: most objects hold only scalars
            kinds = set(map(type, value.values()))
            if dict in kinds or list in kinds:
                for k, v in value.items():
                    if (type(v) is dict or type(v) is list) and k not in NO_SECRETS:
                        changed |= walk(v)
        elif type(value) is list:
            kinds = set(map(type, value))
            if dict in kinds or list in kinds:
                for v in value:
                    if type(v) is dict or type(v) is list:
                        changed |= walk(v)
        return changed

    def apply(self, ev: Event) -> Event:
        """The event with secret values replaced (the same object, re-encoded only if changed).

        The document parsed when the frame was received is redacted in place and re-encoded,
        unless it held integers beyond 64 bits: orjson read those as floats, which it writes
        with an exponent (``1.8446744073709552e+19``); such an event is re-encoded from an
        exact parse instead."""
        if not self.enabled or ev.type in JOB_TYPES:
            return ev
        doc = ev.doc
        data = doc.get("Data")
        if type(data) is not dict and type(data) is not list:
            return ev
        if not self._walk(data):
            return ev
        try:
            out = orjson.dumps(doc)
            inexact = out.find(b"e+") >= 0 and ev.raw.translate(_ZERO_DIGITS).find(_LONG_RUN) >= 0
        except TypeError:  # integers beyond a double: the stdlib parsed this frame, exactly
            inexact = True
        if inexact:
            exact = json.loads(ev.raw)
            self._walk(exact.get("Data"))
            out = json.dumps(exact, ensure_ascii=False, separators=(",", ":")).encode()
        ev.raw = out
        self.redacted_events += 1
        return ev

    def profile(self, profile: dict[str, Any]) -> dict[str, Any]:
        """A redacted copy of a profile (for synthesized account events)."""
        out = _copy(profile)
        if self.enabled:
            self._walk(out)
        return out


def _mentions_secret(lowered: str) -> bool:
    for needle in _NEEDLES:
        if needle in lowered:
            return True
    return False


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
