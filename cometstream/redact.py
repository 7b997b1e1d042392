"""Secrets inside event data, removed before any sink sees them.

Account events carry the whole ``UserProfileConfig`` (``PasswordHash``, ``TOTPKey``,
``PasswordRecovery``...), admin events the admin record, session events the session object, and
``SEVT_SERVER_UPDATED`` the whole server configuration (SMTP passwords, storage credentials,
licence keys...). Redaction walks ``Data`` of every event except the job events (whose
``BackupJobDetail`` holds no secret, and which are the bulk of the stream), and replaces the value
of every key that names a secret with ``"[REDACTED]"``. The rule is in ``docs/resync.md``.

A redacted event is re-encoded with the standard library's JSON encoder (which keeps integers of
any size and the key order); an event with nothing to redact keeps its original bytes.
"""

from __future__ import annotations

import json
import re

import orjson
from collections.abc import Iterable
from typing import Any, Final

from .events import JOB_TYPES, Event

__all__ = ["MARK", "SECRET_KEY_PATTERN", "SAFE_KEYS", "Redactor"]

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
_SAFE_SUFFIX: Final = re.compile(r"(format|method|mode|enabled)$", re.IGNORECASE)
#: names that match the pattern but hold no secret (flags and formats)
SAFE_KEYS: Final = frozenset({
    "PasswordFormat", "AllowPasswordLogin", "AllowPasswordAndTOTPLogin",
    "AllowPasswordAndU2FLogin", "AllowPasswordAndWebAuthnLogin", "RequirePasswordChange",
    "TOTPKeyEncryptionFormat", "PasswordRecoveryEnabled", "HasPassword", "PasswordLastChanged",
})
#: a number of 19+ digits may not fit 64 bits: such events are parsed and encoded by the stdlib
_LONG_NUMBER: Final = re.compile(rb"\d{19}")


class Redactor:
    def __init__(self, *, extra_keys: Iterable[str] = (), enabled: bool = True) -> None:
        self.enabled = enabled
        self.extra = frozenset(k.lower() for k in extra_keys)
        self.redacted_events = 0
        # key names repeat across events (every profile has the same few hundred): decide once
        self._verdicts: dict[str, bool] = {}

    def is_secret(self, key: str) -> bool:
        verdict = self._verdicts.get(key)
        if verdict is None:
            if key in SAFE_KEYS or _SAFE_SUFFIX.search(key):
                verdict = False
            else:
                verdict = bool(SECRET_KEY_PATTERN.search(key)) or key.lower() in self.extra
            if len(self._verdicts) < 100_000:  # bounded: key names are the server's to choose
                self._verdicts[key] = verdict
        return verdict

    def _walk(self, value: Any) -> bool:
        changed = False
        if isinstance(value, dict):
            for k, v in value.items():
                if isinstance(k, str) and self.is_secret(k) and v not in (None, "", [], {}):
                    value[k] = MARK
                    changed = True
                elif isinstance(v, dict | list):
                    changed |= self._walk(v)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict | list):
                    changed |= self._walk(item)
        return changed

    def apply(self, ev: Event) -> Event:
        """The event with secret values replaced (the same object, re-encoded only if changed)."""
        if not self.enabled or ev.type in JOB_TYPES:
            return ev
        if not isinstance(ev.doc.get("Data"), dict | list):
            return ev
        # Work on a fresh parse of the original bytes: orjson where that is exact, the stdlib
        # where the event holds integers beyond 64 bits (orjson would turn them into floats).
        exact_ints = _LONG_NUMBER.search(ev.raw) is not None
        doc = json.loads(ev.raw) if exact_ints else orjson.loads(ev.raw)
        if not self._walk(doc.get("Data")):
            return ev
        if exact_ints:
            ev.raw = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
        else:
            ev.raw = orjson.dumps(doc)
        ev.doc = doc
        self.redacted_events += 1
        return ev

    def profile(self, profile: dict[str, Any]) -> dict[str, Any]:
        """A redacted copy of a profile (for synthesized account events)."""
        out = _copy(profile)
        if self.enabled:
            self._walk(out)
        return out


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
