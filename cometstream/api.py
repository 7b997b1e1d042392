"""The Comet Server admin HTTP API: the calls remedial sync and backfill need.

Every call is a ``POST`` of form fields to a kebab-case path (``/api/v1/admin/get-jobs-for-date-range``)
with the auth fields (``Username``, ``AuthType``, ``Password``/``SessionKey``/``TOTP``) in the same
form. There is one place that turns what comes back into results or errors
(:meth:`AdminClient._decode`):

- HTTP 401/403, or HTTP 200 with ``{"Status": 403, "Message": ...}`` → :class:`ApiAuthError`
  (``ERR_TOTP_REQUIRED`` in the message → :class:`TotpRequired`); not retried.
- other HTTP 4xx, or a 200 body with ``Status`` outside 200-299 → :class:`ApiError` (not retried);
- HTTP 5xx, 429, transport errors and timeouts → retryable :class:`ApiError`, retried with backoff;
- every request has a total deadline, ``call_timeout`` (connect, send, headers and the whole body):
  a per-read timeout alone lets a server that sends one byte a second hold a call forever;
- JSON ``null`` where a list or map is expected means empty;
- ``list-users-full`` (every profile; it cannot be paged) comes back as a :class:`ProfileMap`:
  its bytes, each profile parsed when read (a profile that is not JSON is an ApiError then).

With ``PasswordTOTP`` the client logs in once with a code (``account/session-start``) and then uses
the session key, because a TOTP code may be single-use; an expired session is renewed once.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import ssl
from collections.abc import Iterator, Mapping
from typing import Any, Final, Self
from urllib.parse import urlsplit

import aiohttp
import orjson
import structlog

from .backoff import Backoff
from .config import ServerConfig, is_loopback
from .errors import ApiAuthError, ApiError, ResponseTooLarge, TotpRequired
from .observe.logging import register_secret
from .runtime import gc_paused

__all__ = ["JOBS_PATH", "USERS_PATH", "AdminClient", "ProfileMap", "api_base_url", "profile_map"]

log = structlog.get_logger("cometstream.api")

TOTP_REQUIRED: Final = "ERR_TOTP_REQUIRED"
#: the largest answer read (decompressed); the job list is asked for a day at a time (a day of
#: 100,000 jobs is about 95 MB), the accounts' list cannot be paged
MAX_RESPONSE_BYTES: Final = 256 * 1024 * 1024
#: the largest job list read at once: the remedial sync asks for a shorter span of time when a
#: span's answer is larger (its parsed form is a few times its bytes)
MAX_JOBS_RESPONSE_BYTES: Final = 128 * 1024 * 1024
JOBS_PATH: Final = "admin/get-jobs-for-date-range"
USERS_PATH: Final = "admin/list-users-full"
_PREFIX: Final = "/api/v1/"


def api_base_url(url: str) -> str:
    """The server's base URL for API calls (http/https; a ws/wss URL is mapped back)."""
    base = url.strip()
    if base.startswith("ws://"):
        base = "http://" + base[5:]
    elif base.startswith("wss://"):
        base = "https://" + base[6:]
    base = base.split("?", 1)[0].split("#", 1)[0]
    marker = base.find("/api/v1/")
    if marker != -1:
        base = base[:marker]
    return base.rstrip("/")


def accept_encoding(server: ServerConfig) -> str:
    """``gzip``, unless ``[server] api_gzip`` says never, or says auto and the server is on this
    machine: there compressing only costs both sides CPU (a remedial sync of a million jobs
    spends about a fifth of its time on it), while across a network it saves most of the
    bytes. Behind a local tunnel to a distant server, set ``api_gzip = "always"``."""
    mode = server.api_gzip
    if mode == "always" or (mode == "auto" and not is_loopback(urlsplit(server.url).hostname
                                                              or "")):
        return "gzip"
    return "identity"


class AdminClient:
    """One aiohttp session (keep-alive) to one server's admin API. Use ``async with``."""

    def __init__(
        self,
        server: ServerConfig,
        *,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
        call_timeout: float = 60.0,
        attempts: int = 4,
        retry_initial: float = 0.5,
        retry_max: float = 8.0,
        rand: Any = random.random,
    ) -> None:
        self.server = server
        self.base = api_base_url(server.url)
        #: what the answers are asked for as (:func:`accept_encoding`)
        self.accept_encoding = accept_encoding(server)
        self._ssl = ssl_context
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout,
                                              sock_read=min(read_timeout, call_timeout))
        #: the deadline of one request, from connect to the answer's last byte
        self.call_timeout = call_timeout
        self.attempts = attempts
        #: the largest answer read, in bytes (after gzip): beyond, a clear error, not the memory
        self.max_response = MAX_RESPONSE_BYTES
        self.max_jobs_response = MAX_JOBS_RESPONSE_BYTES
        self._retry = (retry_initial, retry_max, rand)
        self._http: aiohttp.ClientSession | None = None
        self._session_key: str | None = None
        self.calls = 0
        #: the size of the latest answer per path, in bytes (after gzip): what the remedial
        #: sync sizes its next span of the job list by
        self.answer_bytes: dict[str, int] = {}
        #: the calls in flight, by path and parameters: an identical call made meanwhile waits
        #: for the same answer (see :meth:`call`)
        self._inflight: dict[tuple[str, tuple[tuple[str, str], ...]], asyncio.Future[Any]] = {}
        self._running: set[asyncio.Future[Any]] = set()

    async def __aenter__(self) -> Self:
        self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _open(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            connector = aiohttp.TCPConnector(limit=4, ssl=self._ssl or True)
            self._http = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                               trust_env=True, raise_for_status=False)
        return self._http

    async def aclose(self) -> None:
        for shared in list(self._running):
            shared.cancel()
        if self._http is not None:
            await self._http.close()
            self._http = None

    # --- auth ------------------------------------------------------------------------------------
    def _auth_fields(self) -> dict[str, str]:
        s = self.server
        if s.auth_type == "SessionKey":
            return {"Username": s.username, "AuthType": "SessionKey",
                    "SessionKey": s.session_key.reveal() if s.session_key else ""}
        if s.auth_type == "PasswordTOTP" and self._session_key:
            return {"Username": s.username, "AuthType": "SessionKey",
                    "SessionKey": self._session_key}
        fields = {"Username": s.username, "AuthType": s.auth_type,
                  "Password": s.password.reveal() if s.password else ""}
        if s.auth_type == "PasswordTOTP":
            fields["TOTP"] = s.totp_now()
        return fields

    async def _ensure_session(self) -> None:
        if self.server.auth_type != "PasswordTOTP" or self._session_key:
            return
        body = await self._post("admin/account/session-start", {})
        key = body.get("SessionKey") if isinstance(body, dict) else None
        if not isinstance(key, str) or not key:
            raise ApiAuthError("account/session-start returned no SessionKey")
        register_secret(key)  # as secret as the password: masked in logs and every output
        self._session_key = key
        log.debug("api session started", server=self.server.name)

    # --- calls -----------------------------------------------------------------------------------
    async def call(self, path: str, params: Mapping[str, Any] | None = None, *,
                   limit: int | None = None) -> Any:
        """POST ``/api/v1/<path>`` with auth + params; returns the decoded JSON (retries per policy).

        Every call here only reads. One made while an identical one (same path and parameters)
        is in flight shares its request and its answer, the same object: callers must not
        change it. After a reconnect the remedial sync and the fleet's seed both read
        ``list-users-full``: one request, one moment of the server (:meth:`fresh` at each
        HELLO keeps a request from before it out). A caller that is cancelled leaves the
        request to the others."""
        key = (path, tuple(sorted((k, _form_value(v)) for k, v in (params or {}).items())))
        shared = self._inflight.get(key)
        if shared is None:
            shared = asyncio.ensure_future(self._call(path, params or {}, limit))
            self._inflight[key] = shared
            self._running.add(shared)
            shared.add_done_callback(lambda done: self._landed(key, done))
        return await asyncio.shield(shared)

    def fresh(self) -> None:
        """From now on no call joins a request already in flight: after a reconnect, an answer
        asked for before it may predate what the gap hid."""
        self._inflight.clear()

    def _landed(self, key: tuple[str, tuple[tuple[str, str], ...]],
                done: asyncio.Future[Any]) -> None:
        self._running.discard(done)
        if self._inflight.get(key) is done:
            del self._inflight[key]
        if not done.cancelled():
            done.exception()  # retrieved: every caller may have gone

    async def _call(self, path: str, params: Mapping[str, Any], limit: int | None = None) -> Any:
        await self._ensure_session()
        try:
            return await self._post(path, params or {}, limit)
        except ApiAuthError:
            if self.server.auth_type == "PasswordTOTP" and self._session_key:
                # the session may have expired: log in again once
                self._session_key = None
                await self._ensure_session()
                return await self._post(path, params or {}, limit)
            raise

    async def _post(self, path: str, params: Mapping[str, Any], limit: int | None = None) -> Any:
        initial, cap, rand = self._retry
        backoff = Backoff(initial, cap, rand=rand)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._post_once(path, params, limit)
            except ApiError as exc:
                if not exc.retryable or attempt >= self.attempts:
                    raise
                delay = backoff.next_delay()
                log.info("api call failed, retrying", path=path, error=str(exc),
                         attempt=attempt, retry_in=round(delay, 2))
                await asyncio.sleep(delay)

    async def _post_once(self, path: str, params: Mapping[str, Any],
                         limit: int | None = None) -> Any:
        form = self._auth_fields()
        for k, v in params.items():
            form[k] = _form_value(v)
        url = f"{self.base}{_PREFIX}{path}"
        http = self._open()
        self.calls += 1
        # one deadline for the whole request: a server that dribbles its answer a byte at a time
        # never trips a per-read timeout
        deadline = asyncio.timeout(self.call_timeout)
        try:
            async with deadline, http.post(url, data=form,
                                           headers={"Accept-Encoding": self.accept_encoding}) as resp:
                cap = self.max_response
                if path == JOBS_PATH:
                    cap = min(cap, self.max_jobs_response)
                if limit is not None:
                    cap = min(cap, limit)
                body = await _read_capped(resp, cap, path)
                self.answer_bytes[path] = len(body)
                status = resp.status
                ctype = resp.headers.get("Content-Type", "")
        except TimeoutError as exc:
            if deadline.expired():
                raise ApiError(f"{path}: no complete answer within {self.call_timeout:g} s "
                               "(resync.call_timeout)", status=0) from exc
            raise ApiError(f"{path}: timed out", status=0) from exc
        except aiohttp.ClientConnectorError as exc:
            from .stream import plain_http_hint

            why = exc.os_error.strerror or str(exc.os_error)
            raise ApiError(f"{path}: cannot connect to {exc.host}:{exc.port}: {why}"
                           f"{plain_http_hint(exc)}", status=0) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ApiError(f"{path}: {exc.__class__.__name__}: {exc}", status=0) from exc
        if path == USERS_PATH and status < 400 and (body[:1] == b"{" or "json" in ctype):
            # every profile of every user, in one answer that cannot be paged: read one
            # profile at a time (ProfileMap) when it has the expected shape
            users = await profile_map(body, path)
            if users is not None:
                return users
        return self._decode(path, status, ctype, body)

    @staticmethod
    def _decode(path: str, status: int, ctype: str, body: bytes) -> Any:
        """The one error-mapping boundary (see the module docstring)."""
        data: Any = None
        parsed = False
        if body[:1] in (b"{", b"[", b"n", b'"') or "json" in ctype:
            with gc_paused():  # (an answer may be a million objects: nothing to collect)
                parsed, data = _parse(body)
        message = ""
        body_status = 0
        if parsed and isinstance(data, dict) and isinstance(data.get("Status"), int) \
                and isinstance(data.get("Message"), str):
            body_status = data["Status"]
            message = data["Message"]
        if status >= 400:
            text = message or body[:120].decode("utf-8", "replace").strip() or f"HTTP {status}"
            if status in (401, 403) and message:  # Comet's own refusal (not a proxy's page)
                raise ApiAuthError(f"{path}: HTTP {status}: {text}", status=status)
            raise ApiError(f"{path}: HTTP {status}: {text}", status=status)
        if body_status and not 200 <= body_status <= 299:
            if TOTP_REQUIRED in message:
                raise TotpRequired(f"{path}: the account requires a TOTP code "
                                   f"({TOTP_REQUIRED}): use auth_type = \"PasswordTOTP\"")
            if body_status in (401, 403):
                raise ApiAuthError(f"{path}: {body_status} {message}", status=body_status)
            raise ApiError(f"{path}: {body_status} {message}", status=body_status)
        if not parsed:
            raise ApiError(f"{path}: the response is not JSON ({ctype or 'no content type'})",
                           status=status, retryable=False)
        return data

    # --- the calls resync needs ------------------------------------------------------------------
    async def meta_version(self) -> dict[str, Any]:
        return _as_map(await self.call("admin/meta/version"))

    async def jobs_for_date_range(self, start: int, end: int, *,
                                  limit: int | None = None) -> list[dict[str, Any]]:
        """Jobs that started or ended within [start, end]; (0, 0) = the incomplete jobs.
        ``limit``: refuse (ResponseTooLarge) an answer larger than that many bytes, below the
        client's own bound for a job list."""
        data = await self.call(JOBS_PATH, {"Start": start, "End": end}, limit=limit)
        return [j for j in _as_list(data) if isinstance(j, dict)]

    async def job_properties(self, guid: str) -> dict[str, Any]:
        return _as_map(await self.call("admin/get-job-properties", {"JobID": guid}))

    async def list_users_full(self) -> Mapping[str, dict[str, Any]]:
        """{username: UserProfileConfig}: a :class:`ProfileMap` (each profile parsed when
        read), or, for an answer of another shape, the parsed answer's objects."""
        data = await self.call(USERS_PATH)
        if isinstance(data, ProfileMap):
            return data
        return {k: v for k, v in _as_map(data).items() if isinstance(v, dict)}

    async def live_connections(self, username: str = "") -> dict[str, dict[str, Any]]:
        """The live-connected devices (``dispatcher/list-active``): {connection GUID:
        LiveUserConnection}; ``username`` asks for one user's only (Comet 22.6.7 and later;
        an older server answers with every user's, so callers filter too)."""
        data = _as_map(await self.call("admin/dispatcher/list-active",
                                       {"UserNameFilter": username} if username else None))
        return {k: v for k, v in data.items() if isinstance(v, dict)}


async def _read_capped(resp: aiohttp.ClientResponse, limit: int, path: str) -> bytes:
    """The answer's body (decompressed), or ApiError (not retried) once it passes ``limit``
    bytes: a server, or a gzip bomb, cannot make the client hold more."""
    def too_large() -> ResponseTooLarge:
        return ResponseTooLarge(f"{path}: the answer is larger than {limit / 2**20:g} MiB: "
                                "not read", status=resp.status, limit=limit)

    if resp.content_length is not None and resp.content_length > limit:
        raise too_large()
    body = bytearray()
    async for chunk in resp.content.iter_chunked(1 << 20):
        if len(body) + len(chunk) > limit:
            # freed now: the exception's traceback keeps this frame, and what it holds,
            # until the cyclic collector runs (which a large sync pauses)
            body.clear()
            del chunk
            raise too_large()
        body += chunk
    return body  # type: ignore[return-value]  # (bytes-like: not copied again)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _parse(body: bytes | memoryview) -> tuple[bool, Any]:
    """(True, the JSON value of ``body``), or (False, None) if it is not JSON."""
    try:
        return True, orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    # orjson refuses numbers beyond a double (valid JSON): the stdlib takes them (not from
    # a memoryview: a profile's, which is small, is copied)
    if isinstance(body, memoryview):
        body = body.tobytes()
    try:
        data = json.loads(body, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        return False, None
    # orjson also refuses a lone surrogate ("\ud800"), which no UTF-8 encoder (logs, the
    # ledger, the sinks) takes: it becomes U+FFFD here, once
    if _SURROGATE_ESCAPE.search(body):
        data = _without_lone_surrogates(data)
    return True, data


# --- list-users-full, one profile at a time ------------------------------------------------------
_WS: Final = rb"[ \t\r\n]*"
#: a JSON string (the unrolled form: runs of plain characters between escapes)
_STRING: Final = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
#: what lies between the brackets inside an object or array: scalars, commas, colons, spaces
#: and strings (whole: a bracket or quote inside one is not structure)
_FLAT: Final = rb'[^"{}\[\]]*+(?:' + _STRING + rb'[^"{}\[\]]*+)*+'


def _nested(depth: int) -> bytes:
    """A JSON object or array nested at most ``depth`` levels deep, as a regular expression
    that skips its strings whole and checks nothing else (the parse of the value does)."""
    value = rb"[{\[]" + _FLAT + rb"[}\]]"
    for _ in range(depth - 1):
        value = rb"[{\[]" + _FLAT + rb"(?:" + value + _FLAT + rb")*+[}\]]"
    return value


#: profiles nested deeper than this are not read one at a time (the whole answer is parsed)
PROFILE_DEPTH: Final = 32
#: one member of the answer's object: its name (a JSON string) and its value, an object (or
#: an array: then the answer is parsed whole, as it was before), up to the comma or brace after
_MEMBER: Final = re.compile(_WS + rb"(" + _STRING + rb")" + _WS + rb":" + _WS
                            + rb"(" + _nested(PROFILE_DEPTH) + rb")" + _WS + rb"([,}])",
                            re.DOTALL)
_OPEN: Final = re.compile(_WS + rb"\{")
_EMPTY_REST: Final = re.compile(_WS + rb"\}" + _WS + rb"\Z")
_END: Final = re.compile(_WS + rb"\Z")
#: members found between two turns given to the event loop (a 6 KB profile takes ~60 µs)
_MEMBERS_PER_TURN: Final = 256


class ProfileMap(Mapping[str, dict[str, Any]]):
    """The answer of ``list-users-full`` ({username: UserProfileConfig}) as its bytes and where
    each profile lies in them: a profile is parsed each time it is asked for, and freed by
    whoever asked once done with it. The answer's parsed form is several times its bytes (a
    10,000-user answer of 62 MiB: some 300 MB at once); this keeps its bytes and one profile
    at a time. Read-only, so one answer can be shared by its readers (the remedial sync and
    the fleet's seed), each with profiles of its own."""

    __slots__ = ("_body", "_path", "_spans")

    def __init__(self, body: bytes, spans: dict[str, tuple[int, int]], path: str) -> None:
        self._body = memoryview(body)
        self._spans = spans
        self._path = path

    def __getitem__(self, name: str) -> dict[str, Any]:
        start, end = self._spans[name]
        parsed, data = _parse(self._body[start:end])
        if not parsed or not isinstance(data, dict):  # (found whole: only its insides can fail)
            raise ApiError(f"{self._path}: the response is not JSON (the profile of "
                           f"{name!r})", status=200, retryable=False)
        return data

    def __contains__(self, name: object) -> bool:
        return name in self._spans

    def __iter__(self) -> Iterator[str]:
        return iter(self._spans)

    def __len__(self) -> int:
        return len(self._spans)


async def profile_map(body: bytes, path: str) -> ProfileMap | None:
    """``body`` as a :class:`ProfileMap`, if it is a JSON object whose every value is an object
    nested at most :data:`PROFILE_DEPTH` deep, each name given once; else None (then it is
    parsed whole, as any answer: an error given as a body, ``null``, anything else). Gives the
    event loop a turn every few hundred profiles."""
    m = _OPEN.match(body)
    if m is None:
        return None
    pos = m.end()
    spans: dict[str, tuple[int, int]] = {}
    if _EMPTY_REST.match(body, pos):
        return ProfileMap(body, spans, path)
    match = _MEMBER.match
    while True:
        for _ in range(_MEMBERS_PER_TURN):
            m = match(body, pos)
            if m is None or body[m.start(2)] != 0x7B:  # ({: a value that is an object)
                return None
            key = m.group(1)
            parsed, name = _parse(key)
            if not parsed or not isinstance(name, str):
                return None
            if name in spans:
                # a name given twice: a parser keeps the last value, but the first must be
                # JSON too (as a parse of the whole answer checks)
                return None
            spans[name] = m.span(2)
            pos = m.end()
            if body[pos - 1] == 0x7D:  # (}: the answer's end)
                return ProfileMap(body, spans, path) if _END.match(body, pos) else None
        await asyncio.sleep(0)


def _fix_text(text: str) -> str:
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)


def _without_lone_surrogates(data: Any) -> Any:
    """``data`` (parsed JSON) with every lone surrogate in its strings and keys as U+FFFD;
    iterative (the nesting is the server's to choose)."""
    if isinstance(data, str):
        return _fix_text(data)
    if not isinstance(data, (dict, list)):
        return data
    stack: list[Any] = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for k in list(node):
                v = node[k]
                if isinstance(v, str):
                    v = _fix_text(v)
                elif isinstance(v, (dict, list)):
                    stack.append(v)
                if isinstance(k, str) and (fixed := _fix_text(k)) is not k:
                    del node[k]
                    k = fixed
                node[k] = v
        else:
            for i, v in enumerate(node):
                if isinstance(v, str):
                    node[i] = _fix_text(v)
                elif isinstance(v, (dict, list)):
                    stack.append(v)
    return data


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _form_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        return orjson.dumps(v).decode()
    return str(v)


def _as_list(data: Any) -> list[Any]:
    if data is None:
        return []
    if isinstance(data, list):
        return data
    raise ApiError(f"expected a JSON list, got {type(data).__name__}", retryable=False)


def _as_map(data: Any) -> dict[str, Any]:
    if data is None:
        return {}
    if isinstance(data, dict):
        return data
    raise ApiError(f"expected a JSON object, got {type(data).__name__}", retryable=False)
