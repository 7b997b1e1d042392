"""The webhook sink: each event POSTed as JSON to an HTTP(S) endpoint, a drop-in for Comet's own.

Options (``[sinks.NAME]``, ``type = "webhook"``):

- ``url`` (required): ``http://`` or ``https://``. Credentials in the URL (``user:pass@``) are
  refused: put them in ``headers`` (e.g. ``Authorization``), where they are never logged.
- ``headers`` (default ``{}``): extra request headers, ``NAME = "value"``; a value may instead be
  ``{ file = "path" }`` (the file's text, final line break removed) or ``{ env = "VAR" }`` (an
  environment variable), so that secrets need not sit in the config. Resolved once, when the
  config is read. Headers the sink sets itself (``Content-Type``, ``Content-Length``, ``Host``,
  the signature, tracing, idempotency and ``cometstream-*`` headers) cannot be configured;
  ``User-Agent`` can.
- ``timeout`` (default 10, > 0): seconds for one whole POST (connect, send, reply).
- ``max_retries`` (default 10; -1 = forever): after that many retries of the same events the
  pipeline gives up and dead-letters them (``dead_letter`` key) or drops them, counted.
- ``concurrency`` (default 16, 1 to 256): POSTs in flight at once (below).
- ``batch`` (default 1): 1 = one event per POST, the body being the event itself; N > 1 = up to
  N events per POST, the body a JSON array ``[ev1,ev2,...]`` (the events' bytes joined, never
  re-serialized).
- ``format``: ``event`` (default: the StreamableEvent exactly as the server sent it, what
  Comet's webhooks POST) or ``envelope``.
- ``secret`` / ``secret_file`` / env ``COMETSTREAM_WEBHOOK_SECRET_<NAME>`` (sink name upper-cased,
  ``-`` and ``.`` as ``_``; the environment wins): a key to sign each POST with (below).
- ``tls_verify`` (default true) and ``ca_file`` (a PEM bundle for a private CA).

Every POST carries::

    Content-Type: application/json
    User-Agent: cometstream/<version>
    X-Comet-Tracing-Id: <a fresh UUID4 per attempt>
    Idempotency-Key: <32 hex digits, the same on every retry of the same event(s)>
    cometstream-origin: stream | resync | backfill       (of the first event of a batch)
    cometstream-server: <server name>
    cometstream-received-at: <unix seconds, float>       (of the first event of a batch)

``Idempotency-Key`` of one event is the SHA-256 (first 32 hex digits) of the server name and the
event's dedup key for job events (``4201:<GUID>:<EndTime>``, so a job completion replayed by a
resync after a reconnect carries the same key as the live one), and of the server name, arrival
time and bytes for other events (two byte-identical logins in one second are two real events and
get two keys). For a batch POST it is the SHA-256 of the events' keys joined by ``\\n``.

Signature (when a secret is set)::

    X-Cometstream-Timestamp: <unix seconds, an integer, when the POST was signed>
    X-Cometstream-Signature: sha256=<lowercase hex of HMAC-SHA256(key=secret as UTF-8,
                                     msg=timestamp + "." + body)>

that is, the timestamp's ASCII digits, one ``.``, then the exact body bytes. A receiver
recomputes it over the raw body (before any JSON parsing), compares with
``hmac.compare_digest``, and rejects timestamps more than a few minutes from its clock (the
timestamp is signed, so a captured request cannot be replayed later under a new one)::

    expected = hmac.new(secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    ok = hmac.compare_digest(sig_header, "sha256=" + expected) and abs(time.time() - int(ts)) < 300

Outcomes of a POST (redirects are not followed):

=================================  ===========================================================
2xx                                accepted
408, 409, 425, 429, 5xx, timeout,  retried by the pipeline with backoff; ``Retry-After`` (seconds
connection or TLS failure          or an HTTP date, capped at 10 minutes) is honoured
3xx, 401, 403, 404, 405, 407, 410  about the sink, not the event (a wrong ``url``, an expired
                                   credential): retried the same way, the sink failing
other 4xx                          that POST's event(s) refused for good (dead-lettered); the
                                   message has the status and a short excerpt of the reply
=================================  ===========================================================

``max_retries`` counts only the failures of a POST while the receiver takes other POSTs: a
receiver that is down, or refuses every POST, dead-letters nothing. Failures about the sink
(3xx and the sink-wide 4xx above, a receiver that cannot be reached) never count; with
``concurrency = 1`` the other failures (timeouts, 5xx) all count, as there are no other POSTs
to tell an outage by.

Concurrency: the pipeline calls ``send`` up to ``concurrency`` times at once, each with at most
``batch`` events (one POST), never two events with the same ``ResourceID`` (or job GUID) at
once, and retries each POST on its own (progress resets the backoff; a ``Retry-After`` pauses
every POST of the sink; see ``docs/sinks.md``). With ``concurrency = 1`` the events of one
``send`` are POSTed in order, one request at a time; on a failure the events already accepted
are reported (``SinkError.accepted``).

Request bodies and header values are never logged; error messages name the endpoint by host and
port only (a URL path may itself be a secret, as in Slack- or Teams-style webhook URLs).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import os
import re
import ssl
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, quote, urlsplit

import aiohttp
import orjson
from multidict import CIMultiDict

from .. import __version__
from ..config import read_secret_file
from ..errors import ConfigError, SinkError
from ..observe.logging import register_secret
from ..section import Section, note_secret, secret_files_wanted
from .base import Sink

if TYPE_CHECKING:
    from typing import Self

    from ..events import Event

__all__ = ["RETRY_AFTER_MAX", "WebhookSink", "idempotency_key", "parse_retry_after", "signature"]

DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_MAX_RETRIES: Final = 10
#: POSTs in flight at once: at 50 ms from the receiver, 16 give some 300 events/s with
#: ``batch = 1`` (one at a time: under 20)
DEFAULT_CONCURRENCY: Final = 16
CONCURRENCY_LIMIT: Final = 256
BATCH_LIMIT: Final = 1000
#: the longest ``Retry-After`` honoured, in seconds (a receiver asking for more gets this)
RETRY_AFTER_MAX: Final = 600.0
_EXCERPT_BYTES: Final = 200
_USER_AGENT: Final = f"cometstream/{__version__}"
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
#: headers the sink sets itself: a configured header may not replace them
_RESERVED: Final = frozenset({
    "content-type", "content-length", "content-encoding", "transfer-encoding", "host",
    "connection", "x-cometstream-signature", "x-cometstream-timestamp", "x-comet-tracing-id",
    "idempotency-key", "cometstream-origin", "cometstream-server", "cometstream-received-at",
})
#: configured headers whose values are masked in logs even when written inline in the config
_SENSITIVE = re.compile(r"auth|token|key|secret|cookie|session|pass|signature|sig|cred|api|"
                        r"private|jwt|bearer", re.IGNORECASE)
#: the receiver may take it later: 408 Request Timeout, 409 Conflict (an Idempotency-Key whose
#: first attempt is still being processed), 425 Too Early, 429 Too Many Requests
_RETRYABLE_4XX: Final = frozenset({408, 409, 425, 429})
#: answers about the sink, not the event (a wrong url, an expired or missing credential): the
#: sink is failing; its events wait for it to be fixed
_SINK_WIDE_4XX: Final = frozenset({401, 403, 404, 405, 407, 410})


def idempotency_key(ev: Event) -> str:
    """The ``Idempotency-Key`` of one event: stable across retries, resyncs and restarts for
    job events, distinct for distinct arrivals otherwise (see the module docstring)."""
    h = hashlib.sha256(ev.server.encode("utf-8", "surrogatepass"))
    dk = ev.dedup_key()
    if dk is not None:
        h.update(b"\0k\0" + dk.encode("utf-8", "surrogatepass"))
    else:
        h.update(b"\0r\0" + repr(ev.received_at).encode() + b"\0" + ev.raw)
    return h.hexdigest()[:32]


def _batch_key(events: Sequence[Event]) -> str:
    if len(events) == 1:
        return idempotency_key(events[0])
    joined = "\n".join(idempotency_key(ev) for ev in events)
    return hashlib.sha256(joined.encode()).hexdigest()[:32]


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Cometstream-Signature`` value for ``body`` signed at ``timestamp``."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` (delay-seconds or an HTTP-date) → seconds to wait, within
    ``[0, RETRY_AFTER_MAX]``; None when absent or unreadable."""
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000": UTC by RFC 5322
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX)


def _header_value(value: str) -> str:
    """Metadata for a header: printable ASCII as is, anything else percent-encoded."""
    if value.isascii() and value.isprintable():
        return value
    return quote(value, safe=" !#$&'()*+,/:;=?@[]~")


def _excerpt(body: bytes) -> str:
    text = body[:_EXCERPT_BYTES].decode("utf-8", "replace")
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return text if len(body) <= _EXCERPT_BYTES else text + "..."


class WebhookSink(Sink):
    default_format = "event"
    #: reads only the dedup key (kept on the event) and the bytes
    uses_doc = False

    def __init__(
        self,
        name: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        format: str = "event",
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int | None = DEFAULT_MAX_RETRIES,
        batch: int = 1,
        concurrency: int = DEFAULT_CONCURRENCY,
        secret: bytes | None = None,
        tls_verify: bool = True,
        ca_file: Path | None = None,
        masked: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.url = url
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        #: how error messages name the endpoint (never the path or query: they may be secret)
        host = parts.hostname or ""
        self.where = f"{parts.scheme}://{f'[{host}]' if ':' in host else host}:{port}"
        self.headers: dict[str, str] = dict(headers or {})
        self.format = format
        self.timeout = timeout
        #: the Sink capabilities: retries of one POST before it is dead-lettered (None =
        #: forever), POSTs in flight at once, each of at most ``max_batch`` events
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.max_batch = batch
        self.batch = batch
        self._secret = secret
        self.tls_verify = tls_verify
        self.ca_file = ca_file
        self._masked = tuple(masked)
        self._session: aiohttp.ClientSession | None = None
        #: POSTs made (every attempt), for tests and debugging
        self.requests = 0

    def __repr__(self) -> str:  # no URL: its path may be a secret
        return f"WebhookSink({self.name!r}, {self.where!r})"

    # --- configuration (no network I/O) -----------------------------------------------------------
    @classmethod
    def from_config(cls, name: str, options: Section) -> Self:
        url = options.str("url", required=True, allow_empty=False)
        try:
            parts = urlsplit(url)
            scheme_ok = parts.scheme.lower() in ("http", "https")
            host = parts.hostname
            _ = parts.port  # ValueError for a bad port
        except ValueError as exc:
            if "@" in url:  # the reason may quote a piece of a user:password@
                raise options.error("url", "not a valid URL") from None
            raise options.error("url", f"not a valid URL ({exc})") from None
        if not scheme_ok:
            shown = parts.scheme or "none"
            raise options.error("url", f'the scheme must be http or https, got "{shown}"')
        if parts.username is not None or parts.password is not None:
            raise options.error("url", "must not contain credentials (user:password@); send "
                                "them in headers, where they are kept out of logs, e.g. "
                                'headers = { Authorization = { file = "..." } }')
        if not host:
            raise options.error("url", "has no host")
        headers, masked = _parse_headers(options)
        url_secrets = _url_secrets(url)
        if url_secrets:  # a Slack- or Teams-style token in the URL, inline in the config
            masked.extend(url_secrets)
            note_secret(options.key("url"))
        fmt = options.str("format", cls.default_format)
        timeout = options.float("timeout", DEFAULT_TIMEOUT, min=0, max=3600, min_exclusive=True)
        retries = options.int("max_retries", DEFAULT_MAX_RETRIES, min=-1)
        batch = options.int("batch", 1, min=1, max=BATCH_LIMIT)
        concurrency = options.int("concurrency", DEFAULT_CONCURRENCY, min=1,
                                  max=CONCURRENCY_LIMIT)
        secret = _parse_secret(name, options)
        tls_verify = options.bool("tls_verify", True)
        ca_file = options.path("ca_file")
        if ca_file is not None:
            if not tls_verify:
                raise options.error("ca_file", "set either ca_file or tls_verify = false, not both")
            if not ca_file.is_file():
                raise options.error("ca_file", f"file not found: {ca_file}")
        options.done()
        if secret is not None:
            masked.append(secret.decode("utf-8", "surrogateescape"))
        return cls(name, url, headers=headers, format=fmt, timeout=timeout,
                   max_retries=None if retries == -1 else retries, batch=batch,
                   concurrency=concurrency, secret=secret,
                   tls_verify=tls_verify, ca_file=ca_file, masked=masked)

    # --- lifecycle ----------------------------------------------------------------------------------
    async def open(self) -> None:
        if self._session is not None and not self._session.closed:
            return
        for value in self._masked:
            register_secret(value)
        tls: ssl.SSLContext | bool = True
        if not self.tls_verify:
            tls = False
        elif self.ca_file is not None:
            try:
                tls = ssl.create_default_context(cafile=str(self.ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise SinkError(self.name, f"ca_file {self.ca_file}: {exc.__class__.__name__}",
                                retryable=True) from exc
        connector = aiohttp.TCPConnector(limit=max(self.concurrency, 4), ssl=tls)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
            trust_env=True,  # HTTP(S)_PROXY / NO_PROXY, like the admin API client
        )

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # --- delivery -------------------------------------------------------------------------------------
    async def send(self, batch: Sequence[Event]) -> None:
        session = self._session
        if session is None or session.closed:
            raise SinkError(self.name, "not open", retryable=True)
        size = self.batch
        done = 0
        total = len(batch)
        while done < total:
            chunk = batch[done:done + size]
            await self._post(session, chunk, accepted=done)
            done += len(chunk)

    def _body(self, events: Sequence[Event]) -> bytes:
        fmt = self.format
        if self.batch == 1:
            return events[0].render(fmt)
        return b"[" + b",".join([ev.render(fmt) for ev in events]) + b"]"

    def _request_headers(self, events: Sequence[Event], body: bytes) -> CIMultiDict[str]:
        first = events[0]
        headers: CIMultiDict[str] = CIMultiDict(self.headers)
        headers.setdefault("User-Agent", _USER_AGENT)
        headers["Content-Type"] = "application/json"
        headers["X-Comet-Tracing-Id"] = str(uuid.uuid4())
        headers["Idempotency-Key"] = _batch_key(events)
        headers["cometstream-origin"] = _header_value(first.origin)
        headers["cometstream-server"] = _header_value(first.server)
        headers["cometstream-received-at"] = orjson.dumps(first.received_at).decode()
        if self._secret is not None:
            ts = str(int(time.time()))
            headers["X-Cometstream-Timestamp"] = ts
            headers["X-Cometstream-Signature"] = signature(self._secret, ts, body)
        return headers

    async def _post(self, session: aiohttp.ClientSession, events: Sequence[Event], *,
                    accepted: int) -> None:
        """POST ``events`` once; raise SinkError (``accepted`` = events before them) on failure."""
        body = self._body(events)
        headers = self._request_headers(events, body)
        self.requests += 1
        excerpt = b""
        try:
            async with session.post(self.url, data=body, headers=headers,
                                    allow_redirects=False) as resp:
                status = resp.status
                if 200 <= status < 300:
                    return
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                excerpt = await resp.content.read(_EXCERPT_BYTES + 1)
        except TimeoutError as exc:
            raise SinkError(self.name, f"POST to {self.where} timed out after {self.timeout:g} s",
                            retryable=True, accepted=accepted, failed=len(events)) from exc
        except aiohttp.ClientConnectorError as exc:
            why = exc.os_error.strerror or str(exc.os_error) or exc.__class__.__name__
            raise SinkError(self.name, f"cannot connect to {self.where}: {why}",
                            retryable=True, accepted=accepted, failed=len(events),
                            sink_wide=True) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise SinkError(self.name, f"POST to {self.where} failed: {self._describe(exc)}",
                            retryable=True, accepted=accepted, failed=len(events)) from exc
        raise self._refusal(status, excerpt, retry_after, accepted, len(events))

    def _refusal(self, status: int, body: bytes, retry_after: float | None, accepted: int,
                 n: int) -> SinkError:
        """The one place an HTTP status becomes an outcome (table in the module docstring)."""
        text = _excerpt(body)
        reply = f": {text}" if text else ""
        if 300 <= status < 400:
            return SinkError(self.name, f"POST to {self.where}: HTTP {status} (redirects are not "
                             "followed; set url to the final address)", retryable=True,
                             accepted=accepted, failed=n, sink_wide=True)
        if status in _SINK_WIDE_4XX:
            return SinkError(self.name, f"POST to {self.where}: HTTP {status}{reply} (check the "
                             "sink's url and headers)", retryable=True, accepted=accepted,
                             failed=n, retry_after=retry_after, sink_wide=True)
        if 400 <= status < 500 and status not in _RETRYABLE_4XX:
            return SinkError(self.name, f"POST to {self.where} refused: HTTP {status}{reply}",
                             retryable=False, accepted=accepted, failed=n)
        # 408, 429, 5xx, and statuses outside 1xx-5xx: the receiver may take it later
        return SinkError(self.name, f"POST to {self.where}: HTTP {status}{reply}", retryable=True,
                         accepted=accepted, failed=n, retry_after=retry_after)

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, aiohttp.ServerDisconnectedError):  # (its text: the raw reply head)
            return "the receiver closed the connection before its reply was complete"
        text = str(exc).replace(self.url, self.where)
        return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


# --- option parsing --------------------------------------------------------------------------------
def _url_secrets(url: str) -> list[str]:
    """The parts of a webhook URL that may be a secret (Slack- or Teams-style URLs carry the
    token in the path; others put it in the query), to mask wherever they would be shown: the
    path from its first token-like segment on, each such segment (8+ characters with a digit,
    or 16+), the query and each of its values of 4+ characters."""
    parts = urlsplit(url)
    out: list[str] = []
    segments = parts.path.split("/")
    for i, seg in enumerate(segments):
        if len(seg) >= 16 or (len(seg) >= 8 and any(c.isdigit() for c in seg)):
            out.append(seg)
            rest = "/".join(segments[i:])
            if rest != seg:
                out.append(rest)
    if parts.query:
        out.append(parts.query)
        out.extend(v for _k, v in parse_qsl(parts.query, keep_blank_values=True) if len(v) >= 4)
    return [v for v in dict.fromkeys(out) if len(v) >= 4]


def _header_secrets(value: str) -> list[str]:
    """A sensitive header's value, and the credentials in it as a receiver may echo them alone:
    the token after the scheme (``Bearer <token>``), and for ``Basic`` the decoded
    ``user:password`` and the password."""
    out = [value]
    scheme, _, cred = value.strip().partition(" ")
    cred = cred.strip()
    if cred:
        out.append(cred)
        if scheme.lower() == "basic":
            try:
                plain = base64.b64decode(cred, validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                plain = ""
            if plain:
                out.append(plain)
                out.append(plain.partition(":")[2])
    # (the parts: only of 4+ characters; the whole value is masked at any length)
    return [value] + [v for v in out[1:] if len(v) >= 4]


def _parse_headers(options: Section) -> tuple[dict[str, str], list[str]]:
    """``headers`` → {name: value}, plus the values to mask in logs (from file/env, or under a
    sensitive-looking name)."""
    table = options.raw("headers", {})
    if not isinstance(table, Mapping):
        raise options.error("headers", "expected a table of header names to values, e.g. "
                            '{ "X-Team" = "ops", Authorization = { env = "WEBHOOK_AUTH" } }')
    hs = Section(table, options.key("headers"), base_dir=options.base_dir)
    out: dict[str, str] = {}
    masked: list[str] = []
    seen: set[str] = set()
    for header, spec in table.items():
        if not _TOKEN.match(header):
            raise hs.error(header, "not a valid HTTP header name")
        low = header.lower()
        if low in _RESERVED:
            raise hs.error(header, "is set by the webhook sink itself and cannot be configured")
        if low in seen:
            raise hs.error(header, "given twice (header names are case-insensitive)")
        seen.add(low)
        if isinstance(spec, str):
            value = spec
            if _SENSITIVE.search(header):
                masked.extend(_header_secrets(value))
                note_secret(hs.key(header))  # inline in the config file
        elif isinstance(spec, Mapping):
            value = _header_from_source(hs, header, spec)
            masked.extend(_header_secrets(value))
        else:
            raise hs.error(header, f"expected a string, or a table {{ file = \"path\" }} or "
                           f"{{ env = \"VAR\" }}, got a {_type_name(spec)} (value not shown)")
        if "\r" in value or "\n" in value or "\0" in value:
            raise hs.error(header, "the value must not contain line breaks or NUL")
        out[header] = value
    return out, masked


def _header_from_source(hs: Section, header: str, spec: Mapping[str, Any]) -> str:
    src = Section(spec, hs.key(header), base_dir=hs.base_dir)
    has_file, has_env = "file" in spec, "env" in spec
    if has_file == has_env:
        raise hs.error(header, 'expected exactly one of { file = "path" } or { env = "VAR" }')
    if has_env:
        var = src.str("env", allow_empty=False)
        src.done()
        if not secret_files_wanted():  # tap, dlq list: the unit's environment is not needed
            return "-"
        value = os.environ.get(var)
        if value is None:
            raise hs.error(header, f'environment variable "{var}" is not set')
        return value
    try:
        secret = read_secret_file(src, "file")
    except ConfigError as exc:  # "file not found: ..." named after the header, like env
        raise hs.error(header, exc.problem) from None
    src.done()
    assert secret is not None
    return secret.reveal()


def _parse_secret(name: str, options: Section) -> bytes | None:
    """The signing key: env COMETSTREAM_WEBHOOK_SECRET_<NAME> > secret > secret_file."""
    env_var = "COMETSTREAM_WEBHOOK_SECRET_" + re.sub(r"[-.]", "_", name.upper())
    inline = options.opt_str("secret", secret=True)
    if inline is not None and options.raw("secret_file") is not None:
        raise options.error("secret_file", "set either secret or secret_file, not both")
    if env_var in os.environ:
        options.path("secret_file")  # type-checked, not read: the environment wins
        value = os.environ[env_var]
        if not value:
            raise options.error("secret", f"the environment variable {env_var} is set but empty")
    elif inline is not None:
        value = inline
        if not value:
            raise options.error("secret", "must not be empty")
    else:
        from_file = read_secret_file(options, "secret_file")
        if from_file is None:
            return None
        value = from_file.reveal()
        if not value:
            raise options.error("secret_file", "the file is empty")
    return value.encode("utf-8", "surrogateescape")


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, list):
        return "list"
    return type(value).__name__
