"""The admin HTTP API of the simulated Comet Server, answered from the simulator's ``World``.

Conventions (comet-api.md §5): every call is ``POST`` with a form body
(``application/x-www-form-urlencoded``, or ``multipart/form-data``) carrying the auth fields
``Username``, ``AuthType``, ``Password``, ``SessionKey`` and ``TOTP``; the same credentials and
session keys as the event stream are accepted. Application errors are HTTP 200 with a
CometAPIResponseMessage ``{"Status": 4xx, "Message": ...}``: ``Unauthorised`` (British spelling)
for bad credentials, ``ERR_TOTP_REQUIRED`` when only the TOTP code is missing. An unknown path
under ``/api/v1/`` is HTTP 404 with such a body. Empty top-level lists and maps are JSON ``null``
(``Faults.null_lists``). Answers are gzip-compressed when the request accepts gzip.

Endpoints (paths as in comet-api.md §7 and §5.4):

- ``admin/meta/version`` → ServerMetaVersionInfo
- ``admin/get-jobs-for-date-range`` (``Start``, ``End``), ``admin/get-jobs-recent``,
  ``admin/get-jobs-all``, ``admin/get-jobs-for-user`` (``TargetUser``) → ``[]BackupJobDetail``
- ``admin/get-job-properties`` (``JobID``) → BackupJobDetail
- ``admin/list-users`` → ``[]string``; ``admin/list-users-full`` → ``{username: profile}``
- ``admin/get-user-profile``, ``admin/get-user-profile-hash``, ``admin/get-user-profile-and-hash``
  (``TargetUser``)
- ``admin/dispatcher/list-active`` (optional ``UserNameFilter``) → ``{GUID: LiveUserConnection}``
- ``admin/account/session-start`` → SessionKeyRegeneratedResponse; ``admin/account/session-revoke``
"""

from __future__ import annotations

import asyncio
import json
import struct
import zlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import orjson
import structlog
from aiohttp import web
from aiohttp.web_request import FileField

from cometstream.simulator.auth import TOTP_MISSING

if TYPE_CHECKING:
    from collections import Counter

    from cometstream.simulator.auth import Credentials
    from cometstream.simulator.world import World

__all__ = [
    "API_PREFIX",
    "AUTH_FIELDS",
    "ERR_TOTP_REQUIRED",
    "UNAUTHORISED",
    "AdminAPI",
    "ApiError",
    "ApiFaults",
    "ApiServer",
    "encode_json",
]

log = structlog.get_logger("cometstream.simulator.api")

#: Every admin API path starts with this.
API_PREFIX = "/api/v1/"

#: The auth form fields, in the order of the stream's five handshake frames.
AUTH_FIELDS = ("Username", "AuthType", "Password", "SessionKey", "TOTP")

#: The SDK's TOTPRequiredError sentinel.
ERR_TOTP_REQUIRED = "ERR_TOTP_REQUIRED"
UNAUTHORISED = "Unauthorised"

_Form = Mapping[str, str]


class ApiError(Exception):
    """An application error, answered as HTTP 200 with ``{"Status": status, "Message": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _carm(status: int, message: str) -> dict[str, Any]:
    """A CometAPIResponseMessage."""
    return {"Status": status, "Message": message}


def _required(form: _Form, name: str) -> str:
    value = form.get(name)
    if value is None:
        raise ApiError(400, f"Missing required parameter '{name}'")
    return value


def _required_int(form: _Form, name: str) -> int:
    raw = _required(form, name)
    try:
        return int(raw.strip(), 10)
    except ValueError:
        raise ApiError(400, f"Invalid integer for parameter '{name}'") from None


def _accepts_gzip(header: str) -> bool:
    """Whether an Accept-Encoding header allows gzip (a ``q=0`` refuses it)."""
    for item in header.split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() not in ("gzip", "x-gzip", "*"):
            continue
        quality = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality > 0:
            return True
    return False


#: bodies this large (a day of jobs can be a hundred megabytes) are gzipped in pieces on
#: several threads, as pigz does, instead of on one
PARALLEL_GZIP_MIN = 1 << 20
_GZIP_PIECE = 1 << 21
#: the deflate level of those bodies: 1, the fastest. The answer is the same JSON whatever the
#: level (the client inflates it at about the same speed); at level 6 a span of a million-job
#: resync took the simulator about 65 ms a 4 MiB answer against 23 ms, while the daemon waited
GZIP_LEVEL = 1
_WINDOW = 1 << 15
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name/mtime, OS unknown


def _deflate_piece(body: bytes, start: int, end: int) -> bytes:
    """Raw deflate of ``body[start:end]`` primed with the 32 KiB before it (the decoder has them:
    they are the previous piece's output), ended by a sync flush (byte aligned, not final) or,
    for the last piece, finished. The pieces concatenated are one deflate stream."""
    zdict = body[max(0, start - _WINDOW):start]
    if zdict:
        comp = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY,
                                zdict)
    else:
        comp = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15)
    out = comp.compress(memoryview(body)[start:end])
    return out + comp.flush(zlib.Z_FINISH if end >= len(body) else zlib.Z_SYNC_FLUSH)


async def gzip_parallel(body: bytes) -> bytes:
    """``body`` as one gzip member (level ``GZIP_LEVEL``), deflated in pieces on the loop's default executor
    (zlib releases the GIL) and its CRC-32 computed alongside."""
    loop = asyncio.get_running_loop()
    size = len(body)
    pieces = [loop.run_in_executor(None, _deflate_piece, body, start,
                                   min(start + _GZIP_PIECE, size))
              for start in range(0, max(size, 1), _GZIP_PIECE)]
    crc = loop.run_in_executor(None, zlib.crc32, body)
    parts = await asyncio.gather(*pieces)
    trailer = struct.pack("<II", await crc, size & 0xFFFFFFFF)
    return b"".join((_GZIP_HEADER, *parts, trailer))


class ApiFaults(Protocol):
    """The fault switches the admin API obeys (``server.Faults`` has them)."""

    api_down: bool
    api_reject: bool
    api_delay: float
    api_stall: frozenset[str]
    api_dribble: float  # > 0: answers go out a byte at a time, this many seconds apart
    api_fail_next: int  # counted down here
    null_lists: bool


class ApiServer(Protocol):
    """What the admin API needs of the server it answers for (``server.Simulator`` is one): the
    API depends on this, not on the server module, which imports the API."""

    #: admin API calls by request path, counted here
    api_calls: Counter[str]
    #: admin API calls by the Accept-Encoding they asked for, counted here
    api_encodings: Counter[str]

    @property
    def world(self) -> World: ...

    @property
    def faults(self) -> ApiFaults: ...

    @property
    def credentials(self) -> Credentials: ...

    def meta_version_info(self) -> dict[str, Any]: ...

    def start_session(self) -> str: ...

    def revoke_session(self, key: str) -> bool: ...


class AdminAPI:
    """The ``/api/v1/`` routes of one Simulator (installed on its aiohttp app)."""

    def __init__(self, sim: ApiServer) -> None:
        self._sim = sim
        self._endpoints: dict[str, Callable[[_Form], Any]] = {
            "/api/v1/admin/meta/version": self._meta_version,
            "/api/v1/admin/get-jobs-for-date-range": self._jobs_for_date_range,
            "/api/v1/admin/get-jobs-recent": self._jobs_recent,
            "/api/v1/admin/get-jobs-all": self._jobs_all,
            "/api/v1/admin/get-jobs-for-user": self._jobs_for_user,
            "/api/v1/admin/get-job-properties": self._job_properties,
            "/api/v1/admin/list-users": self._list_users,
            "/api/v1/admin/list-users-full": self._list_users_full,
            "/api/v1/admin/get-user-profile": self._user_profile,
            "/api/v1/admin/get-user-profile-hash": self._user_profile_hash,
            "/api/v1/admin/get-user-profile-and-hash": self._user_profile_and_hash,
            "/api/v1/admin/dispatcher/list-active": self._list_active,
            "/api/v1/admin/account/session-start": self._session_start,
            "/api/v1/admin/account/session-revoke": self._session_revoke,
        }

    @property
    def paths(self) -> tuple[str, ...]:
        """Every implemented endpoint path."""
        return tuple(self._endpoints)

    def install(self, app: web.Application) -> None:
        """Route every path under ``/api/v1/`` (except the stream's GET) to this API."""
        app.router.add_route("*", API_PREFIX + "{tail:.*}", self._handle)

    # ----------------------------------------------------------------- request handling

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        sim = self._sim
        path = request.path
        sim.api_calls[path] += 1
        sim.api_encodings[request.headers.get("Accept-Encoding", "")] += 1
        faults = sim.faults
        if faults.api_delay > 0:
            await asyncio.sleep(faults.api_delay)
        while path in faults.api_stall:  # noqa: ASYNC110 - a fault polled as a peer would stall
            await asyncio.sleep(0.05)
        if faults.api_down:
            return web.Response(status=503, text="503 Service Unavailable (simulated outage)\n")
        if faults.api_fail_next > 0:
            faults.api_fail_next -= 1
            return web.Response(status=500, text="500 Internal Server Error (simulated)\n")
        endpoint = self._endpoints.get(path)
        if endpoint is None:
            return self._reply(request, _carm(404, f"Unknown API endpoint {path}"), status=404)
        if request.method != "POST":
            resp = self._reply(request, _carm(405, "Method not allowed, use POST"), status=405)
            resp.headers["Allow"] = "POST"
            return resp
        if faults.api_reject:
            return self._reply(request, _carm(403, UNAUTHORISED))
        try:
            form = await self._form(request)
        except ValueError:
            return self._reply(request, _carm(400, "Malformed request body"))
        reason = sim.credentials.check([form.get(name, "") for name in AUTH_FIELDS])
        if reason is not None:
            log.info(
                "api login refused",
                path=path,
                username=form.get("Username", ""),
                auth_type=form.get("AuthType", ""),
                reason=reason,
            )
            message = ERR_TOTP_REQUIRED if reason == TOTP_MISSING else UNAUTHORISED
            return self._reply(request, _carm(403, message))
        try:
            result = endpoint(form)
        except ApiError as exc:
            return self._reply(request, _carm(exc.status, exc.message))
        body = encode_json(result)
        if faults.api_dribble > 0:
            return await self._dribble(request, body, faults)
        if len(body) >= PARALLEL_GZIP_MIN and _accepts_gzip(
                request.headers.get("Accept-Encoding", "")):
            return web.Response(body=await gzip_parallel(body), content_type="application/json",
                                headers={"Content-Encoding": "gzip"})
        return self._reply(request, body)

    async def _dribble(self, request: web.Request, body: bytes,
                       faults: ApiFaults) -> web.StreamResponse:
        """``body`` one byte at a time, ``faults.api_dribble`` seconds apart (read at each
        byte: clearing it sends the rest at once)."""
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(body)
        await resp.prepare(request)
        try:
            for i in range(len(body)):
                pause = faults.api_dribble
                if pause <= 0:
                    await resp.write(body[i:])
                    break
                await resp.write(body[i:i + 1])
                await asyncio.sleep(pause)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client gave up: what it was waiting for
        return resp

    async def _form(self, request: web.Request) -> dict[str, str]:
        """The form fields (first value of each name) of a urlencoded or multipart body."""
        raw = await request.post()
        form: dict[str, str] = {}
        for name, value in raw.items():
            if name in form:
                continue
            if isinstance(value, FileField):
                value = value.file.read()
            if isinstance(value, bytes | bytearray):
                value = bytes(value).decode("utf-8", "replace")
            form[name] = value
        return form

    def _reply(self, request: web.Request, payload: Any, status: int = 200) -> web.Response:
        """``payload`` as JSON (or already encoded, as bytes), gzipped if the client accepts it."""
        body = payload if isinstance(payload, bytes) else encode_json(payload)
        resp = web.Response(body=body, status=status, content_type="application/json")
        if _accepts_gzip(request.headers.get("Accept-Encoding", "")):
            resp.enable_compression(web.ContentCoding.gzip)
        return resp

    def _collection(self, value: list[Any] | dict[str, Any]) -> list[Any] | dict[str, Any] | None:
        """An empty list or map becomes None (JSON null) while ``Faults.null_lists`` is on."""
        if not value and self._sim.faults.null_lists:
            return None
        return value

    def _profile(self, form: _Form) -> tuple[str, dict[str, Any]]:
        username = _required(form, "TargetUser")
        profile = self._sim.world.profile(username)
        if profile is None:
            raise ApiError(400, "User not found")
        return username, profile

    # ----------------------------------------------------------------- endpoints

    def _meta_version(self, form: _Form) -> Any:
        return self._sim.meta_version_info()

    def _jobs_for_date_range(self, form: _Form) -> Any:
        start = _required_int(form, "Start")
        end = _required_int(form, "End")
        return self._collection(self._sim.world.jobs_for_date_range(start, end))

    def _jobs_recent(self, form: _Form) -> Any:
        return self._collection(self._sim.world.recent_jobs())

    def _jobs_all(self, form: _Form) -> Any:
        return self._collection(list(self._sim.world.jobs.values()))

    def _jobs_for_user(self, form: _Form) -> Any:
        username = _required(form, "TargetUser")
        return self._collection(self._sim.world.jobs_for_user(username))

    def _job_properties(self, form: _Form) -> Any:
        job = self._sim.world.job(_required(form, "JobID"))
        if job is None:
            raise ApiError(400, "Job not found")
        return job

    def _list_users(self, form: _Form) -> Any:
        return self._collection(list(self._sim.world.users))

    def _list_users_full(self, form: _Form) -> Any:
        return self._collection(self._sim.world.list_users_full())

    def _user_profile(self, form: _Form) -> Any:
        return self._profile(form)[1]

    def _user_profile_hash(self, form: _Form) -> Any:
        username, _ = self._profile(form)
        return {
            "Status": 200,
            "Message": "OK",
            "ProfileHash": self._sim.world.profile_hash(username),
        }

    def _user_profile_and_hash(self, form: _Form) -> Any:
        username, profile = self._profile(form)
        return {
            "Status": 200,
            "Message": "OK",
            "ProfileHash": self._sim.world.profile_hash(username),
            "Profile": profile,
        }

    def _list_active(self, form: _Form) -> Any:
        conns = self._sim.world.live_connections()
        wanted = form.get("UserNameFilter", "")
        if wanted:
            conns = {k: c for k, c in conns.items() if c["Username"] == wanted}
        return self._collection(conns)

    def _session_start(self, form: _Form) -> Any:
        key = self._sim.start_session()
        log.info("api session started", username=form.get("Username", ""))
        return {"Status": 200, "Message": "OK", "SessionKey": key, "SessionType": "admin"}

    def _session_revoke(self, form: _Form) -> Any:
        if form.get("AuthType") != "SessionKey":
            raise ApiError(400, "Only a session key can be revoked (use AuthType=SessionKey)")
        self._sim.revoke_session(form.get("SessionKey", ""))
        return _carm(200, "OK")


def encode_json(payload: Any) -> bytes:
    """JSON as Comet writes it: orjson, or the standard library for what orjson refuses and a
    hostile server may send (integers beyond 64 bits, a lone surrogate escaped as ``\\ud800``)."""
    try:
        return orjson.dumps(payload)
    except TypeError:
        return json.dumps(payload, separators=(",", ":")).encode()
