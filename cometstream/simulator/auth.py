"""Login checks of the simulated Comet Server: the five-frame stream handshake and RFC 6238 TOTP.

Pure functions and one small value class, no I/O, so the rules can be tested with plain lists of
frames. The stream's five frames are, in order: Username, AuthType, Password, SessionKey, TOTP.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

__all__ = [
    "AUTH_TYPES",
    "HANDSHAKE_FRAMES",
    "TOTP_MISSING",
    "Credentials",
    "decode_totp_secret",
    "totp_code",
    "totp_matches",
]

#: The number of text frames a client sends after the websocket upgrade.
HANDSHAKE_FRAMES = 5

#: AuthType values the stream accepts (the HTTP API also knows PasswordWebAuthn and TOTP).
AUTH_TYPES = ("Password", "PasswordTOTP", "SessionKey")

#: The refusal reason for a correct password without a TOTP code while one is needed; the HTTP
#: API answers it with ``ERR_TOTP_REQUIRED`` instead of ``Unauthorised``.
TOTP_MISSING = "totp missing"

_TOTP_STEP = 30
_TOTP_DIGITS = 6


def decode_totp_secret(secret: str) -> bytes:
    """The key bytes of a base32 TOTP secret (case, spaces and missing padding tolerated).

    Raises ValueError for a secret that is not base32.
    """
    cleaned = secret.replace(" ", "").replace("-", "").upper().rstrip("=")
    if not cleaned:
        raise ValueError("TOTP secret is empty")
    padded = cleaned + "=" * (-len(cleaned) % 8)
    try:
        return base64.b32decode(padded)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("TOTP secret is not valid base32") from exc


def totp_code(secret: str, at: float | None = None) -> str:
    """The RFC 6238 code (HMAC-SHA1, 6 digits, 30 s step) of a base32 `secret` at Unix time `at`."""
    key = decode_totp_secret(secret)
    counter = int((time.time() if at is None else at) // _TOTP_STEP)
    return _hotp(key, counter)


def totp_matches(secret: str, code: str, at: float | None = None, window: int = 1) -> bool:
    """Whether `code` is the TOTP of `secret` at `at`, or within `window` steps either side."""
    if len(code) != _TOTP_DIGITS or not code.isdigit():
        return False
    key = decode_totp_secret(secret)
    counter = int((time.time() if at is None else at) // _TOTP_STEP)
    matched = False
    for offset in range(-window, window + 1):
        # No early exit: every candidate is compared, in constant time.
        matched |= hmac.compare_digest(_hotp(key, counter + offset), code)
    return matched


def _hotp(key: bytes, counter: int) -> str:
    """RFC 4226 HOTP value of `counter` under `key`."""
    digest = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    value = struct.unpack(">I", digest[offset : offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10**_TOTP_DIGITS).zfill(_TOTP_DIGITS)


@dataclass(frozen=True)
class Credentials:
    """What the simulated server accepts, on its event stream and its admin API alike.

    With ``totp_required`` (and a ``totp_secret``), AuthType ``Password`` is refused with
    ``TOTP_MISSING``, as Comet refuses a password-only login to an account with 2FA.
    """

    username: str
    password: str = field(repr=False)
    totp_secret: str | None = field(default=None, repr=False)
    session_keys: frozenset[str] = field(default=frozenset(), repr=False)
    totp_required: bool = False

    @classmethod
    def build(
        cls,
        username: str,
        password: str,
        totp_secret: str | None = None,
        session_keys: Iterable[str] = (),
        *,
        totp_required: bool = False,
    ) -> Credentials:
        """Validated credentials; raises ValueError for a TOTP secret that is not base32."""
        if totp_secret is not None:
            decode_totp_secret(totp_secret)
        elif totp_required:
            raise ValueError("totp_required needs a totp_secret")
        return cls(username, password, totp_secret, frozenset(session_keys), totp_required)

    def with_session_keys(self, session_keys: Iterable[str]) -> Credentials:
        """A copy accepting exactly `session_keys` for AuthType SessionKey."""
        return replace(self, session_keys=frozenset(session_keys))

    def check(self, frames: Sequence[str], at: float | None = None) -> str | None:
        """None if the five values (Username, AuthType, Password, SessionKey, TOTP) log in,
        else a short reason (safe to log); ``TOTP_MISSING`` when only a TOTP code is missing."""
        if len(frames) != HANDSHAKE_FRAMES:
            return "wrong frame count"
        username, auth_type, password, session_key, totp = frames
        if not hmac.compare_digest(username.encode(), self.username.encode()):
            return "unknown user"
        if auth_type == "Password":
            if not self._password_ok(password):
                return "wrong password"
            return TOTP_MISSING if self.totp_required else None
        if auth_type == "PasswordTOTP":
            if not self._password_ok(password):
                return "wrong password"
            if self.totp_secret is None:
                return "totp not enabled"
            if not totp:
                return TOTP_MISSING
            return None if totp_matches(self.totp_secret, totp, at) else "wrong totp"
        if auth_type == "SessionKey":
            return (
                None if session_key and session_key in self.session_keys else "unknown session key"
            )
        return "unsupported auth type"

    def _password_ok(self, password: str) -> bool:
        return hmac.compare_digest(password.encode(), self.password.encode())
