"""The event stream's I/O shell: one websocket session, and the supervisor that reconnects.

This is the only module that imports the websocket library (aiohttp's client: on this machine it
drains ~2x faster than ``websockets``; see ``docs/design.md``). The protocol itself — the five
frames, the reply, frame decoding — lives in :mod:`cometstream.protocol`.

A session: connect (TCP, TLS, upgrade) → five frames → ``200 OK`` → read loop, with a keepalive
task (a ping every ``ping_interval``; no pong within ``ping_timeout`` = the peer is dead) and an
optional idle watchdog (no event frame for ``idle_timeout`` = recycle), all within
``connect_timeout`` for the connect and login part. The read loop only decodes and hands events to
the pipeline; it never waits on a sink unless a sink's policy is ``block``.

The supervisor runs sessions forever, sleeping a full-jitter exponential backoff between them,
reset once a session proved healthy: logged in and still connected ``STABLE_SESSION`` seconds
later (not at the HELLO: a server that sends a HELLO and then something that ends the session
would otherwise be reconnected to, and resynced with, as fast as the network allows). A login
refused (``403 Unauth``) before any session of this process succeeded is fatal
(:class:`CredentialsRejected`, exit 3); after one, it is retried (the server may be restarting).
A garbage reply to the login is a protocol error, retried like a network failure.

One frame costs one frame: whatever processing a frame raises once it was read (decoding, the
gate, redaction, identity, publishing) is caught in the read loop, counted as malformed with its
reason, and the frame skipped; the session goes on.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal

import aiohttp
import structlog
from aiohttp import WSMsgType
from aiohttp.http import WSMessageNoDecodeText

from .backoff import Backoff
from .config import ServerConfig, StreamConfig
from .constants import JOB_STATUS_NAMES, SEVT_NAMES, job_status_name
from .errors import CredentialsRejected, StreamError
from .events import JOB_COMPLETED, Event
from .observe.metrics import StreamStats
from .protocol import (
    HELLO,
    Credentials,
    Malformed,
    auth_frames,
    check_reply,
    decode_frame,
    frame_error,
)

__all__ = ["STABLE_SESSION", "Publish", "RateLimitedLog", "Session", "Supervisor", "classify",
           "count_malformed", "make_ssl_context", "plain_http_hint"]

#: frames read in a row before the read loop lets other tasks (the sink workers) run
YIELD_EVERY: Final = 256
#: seconds a logged-in session must last before the reconnect backoff starts again from its
#: first step (read at each login: tests may lower it)
STABLE_SESSION = 30.0
log = structlog.get_logger("cometstream.stream")

Publish = Callable[[Event], Awaitable[None] | None]
#: the connection as ``ws_connect(decode_text=False)`` returns it: a text frame's data is the
#: frame's bytes, handed to orjson without a decode to ``str`` first
WebSocket = aiohttp.ClientWebSocketResponse[Literal[False]]
StatusCallback = Callable[[str, str], None]  # (state, human-readable detail)

_CLOSE_TIMEOUT: Final = 1.0
_MALFORMED_LOG_INTERVAL: Final = 60.0
#: distinct event types counted one by one; beyond, unknown ones under one key (a server may
#: send any); a known type always gets its own (there are few of them)
_TYPES_COUNTED: Final = 1024
_OTHER_TYPE: Final = -1


def make_ssl_context(server: ServerConfig) -> ssl.SSLContext | None:
    """TLS for wss: verification on by default, ``ca_file`` for a private CA."""
    if not server.ws_url.startswith("wss://"):
        return None
    ctx = ssl.create_default_context(cafile=str(server.ca_file) if server.ca_file else None)
    if not server.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


#: what OpenSSL says when the other end answers a TLS handshake in plain HTTP
_PLAIN_ANSWER: Final = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE",
                                  "PACKET_LENGTH_TOO_LONG"})


def plain_http_hint(exc: BaseException) -> str:
    """For a TLS handshake that the server answered in plain HTTP (``https://`` in
    ``server.url`` for a port that serves ``http``): what to do, else ""."""
    err = getattr(exc, "os_error", None) or exc  # (aiohttp's connector error wraps the SSLError)
    if isinstance(err, ssl.SSLError) and err.reason in _PLAIN_ANSWER:
        return (": the server answered in plain HTTP, not TLS: use http:// in server.url for "
                "this port, or the port where it serves https")
    return ""


def classify(exc: BaseException, *, phase: str, timeout: float = 0.0) -> StreamError | CredentialsRejected:
    """Translate anything a session can raise into our error tree (one place, one decision)."""
    if isinstance(exc, (StreamError, CredentialsRejected)):
        return exc
    if isinstance(exc, TimeoutError):
        return StreamError(f"timed out after {timeout:g} s while {phase}", reason="timeout")
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return StreamError(f"websocket upgrade refused: HTTP {exc.status} {exc.message}".rstrip(),
                           reason="upgrade")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return StreamError(f"TLS certificate not trusted: {exc.certificate_error}", reason="tls")
    if isinstance(exc, aiohttp.ClientSSLError):
        return StreamError(f"TLS failed: {exc}{plain_http_hint(exc)}", reason="tls")
    if isinstance(exc, aiohttp.ClientConnectorError):
        why = exc.os_error.strerror or str(exc.os_error) or exc.os_error.__class__.__name__
        return StreamError(f"cannot connect to {exc.host}:{exc.port}: {why}", reason="refused")
    if isinstance(exc, aiohttp.ClientError | OSError):
        text = str(exc) or exc.__class__.__name__
        return StreamError(f"connection failed while {phase}: {text}", reason="error")
    return StreamError(f"unexpected {exc.__class__.__name__} while {phase}: {exc}", reason="error")


class RateLimitedLog:
    """Logs the first occurrence of each kind at once, then one summary line per interval."""

    def __init__(self, interval: float = _MALFORMED_LOG_INTERVAL) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, kind: str, event: str, **fields: Any) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            fields["suppressed_since_last"] = suppressed
        log.warning(event, **fields)


def count_malformed(stats: StreamStats, rate_log: RateLimitedLog, m: Malformed,
                    server: str) -> None:
    """Count a skipped frame by reason, and log it (once a minute per reason)."""
    stats.malformed += 1
    stats.malformed_by_reason[m.reason] += 1
    rate_log(m.reason, "malformed frame skipped", reason=m.reason, detail=m.detail,
             size=m.size, sample=m.sample, server=server)


class Session:
    """One connection: connect, log in, read until something fails (always ends by raising)."""

    def __init__(
        self,
        server: ServerConfig,
        cfg: StreamConfig,
        publish: Publish,
        stats: StreamStats,
        *,
        ssl_context: ssl.SSLContext | None = None,
        on_login: Callable[[], None] | None = None,
        on_hello: Callable[[Event], None] | None = None,
        malformed_log: RateLimitedLog | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.server = server
        self.cfg = cfg
        self.publish = publish
        self.stats = stats
        self.ssl_context = ssl_context
        self.on_login = on_login
        self.on_hello = on_hello
        self.malformed_log = malformed_log or RateLimitedLog()
        self.logged_in = False
        self.events = 0
        self.hello: Event | None = None
        self.last_frame = 0.0  # monotonic time of the last data frame
        #: wall time of the last sign of life from the server (a data frame or a pong)
        self.alive_at = 0.0
        #: True while the read loop waits for room in a full ``block`` queue
        self.blocked = False
        self._blocked_epochs = 0
        self._clock = clock
        self._pong: asyncio.Future[None] | None = None
        self._ws: WebSocket | None = None

    # --- connect and log in ------------------------------------------------------------------
    def credentials(self) -> Credentials:
        s = self.server
        return Credentials(
            username=s.username,
            auth_type=s.auth_type,
            password=s.password.reveal() if s.password else "",
            session_key=s.session_key.reveal() if s.session_key else "",
            totp=s.totp_now(self._clock()),
        )

    async def run(self) -> None:
        cfg = self.cfg
        connector = aiohttp.TCPConnector(limit=1, force_close=True, ssl=self.ssl_context or True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout)
        # trust_env: HTTPS_PROXY/NO_PROXY are honoured, like any other HTTP client on the host
        async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                         trust_env=True) as http:
            # closed however the session ends: a stop (cancellation) during the login too,
            # or its connection is left open
            ws: WebSocket | None = None
            try:
                phase = "connecting"
                try:
                    async with asyncio.timeout(cfg.connect_timeout):
                        ws = await http.ws_connect(
                            self.server.ws_url,
                            autoping=False,
                            autoclose=True,
                            heartbeat=None,
                            compress=0,
                            max_msg_size=cfg.max_message_bytes,
                            decode_text=False,
                            timeout=aiohttp.ClientWSTimeout(ws_receive=None,
                                                            ws_close=_CLOSE_TIMEOUT),
                        )
                        self._ws = ws
                        phase = "logging in"
                        log.debug("connected, sending credentials", url=self.server.ws_url,
                                  username=self.server.username, auth_type=self.server.auth_type)
                        for frame in auth_frames(self.credentials()):
                            await ws.send_str(frame)
                        reply = await ws.receive()
                        while reply.type in (WSMsgType.PING, WSMsgType.PONG):
                            # a server may ping before it answers the login
                            if reply.type is WSMsgType.PING:
                                await ws.pong(reply.data)
                            reply = await ws.receive()
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:
                    raise classify(exc, phase=phase, timeout=cfg.connect_timeout) from exc
                self._check_reply(reply)
                self.logged_in = True
                if self.on_login is not None:
                    self.on_login()
                await self._serve(ws)
            finally:
                if ws is not None:
                    await self._close(ws)

    def _check_reply(self, reply: WSMessageNoDecodeText) -> None:
        if reply.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            check_reply(reply.data)
            return
        if reply.type == WSMsgType.ERROR:
            raise classify(reply.data, phase="logging in") if isinstance(reply.data, BaseException) \
                else StreamError("connection failed while logging in", reason="error")
        raise StreamError("server closed the connection without answering the login",
                          reason="login_closed")

    async def _close(self, ws: WebSocket) -> None:
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT * 2):
                await ws.close()
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass

    # --- the connected phase ----------------------------------------------------------------------
    async def _serve(self, ws: WebSocket) -> None:
        self.last_frame = time.monotonic()
        tasks = [asyncio.create_task(self._read(ws), name="stream-read")]
        if self.cfg.ping_interval > 0:
            tasks.append(asyncio.create_task(self._keepalive(ws), name="stream-keepalive"))
        if self.cfg.idle_timeout > 0:
            tasks.append(asyncio.create_task(self._idle_watch(), name="stream-idle"))
        if self.hello is None:
            tasks.append(asyncio.create_task(self._hello_watch(), name="stream-hello"))
        try:
            done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            exc = t.exception()
            if exc is not None:
                raise classify(exc, phase="reading")
        raise StreamError("stream ended", reason="closed")

    async def _read(self, ws: WebSocket) -> None:
        receive = ws.receive
        on_frame = self._on_frame
        TEXT = WSMsgType.TEXT
        burst = 0
        while True:
            msg = await receive()
            if msg.type is TEXT:
                try:
                    waiting = on_frame(msg.data)
                except Exception as exc:  # noqa: BLE001 (one frame costs one frame)
                    waiting = None
                    self._malformed(frame_error(exc, msg.data))
                if waiting is not None:
                    await self._wait_for_sinks(waiting)
                burst += 1
                if burst >= YIELD_EVERY:
                    # While frames keep arriving, receive() never suspends: let the sink
                    # workers run, so that queues stay short (memory, latency)
                    burst = 0
                    await asyncio.sleep(0)
                continue
            kind = msg.type
            if kind is WSMsgType.PING:
                await ws.pong(msg.data)
            elif kind is WSMsgType.PONG:
                self.alive_at = time.time()
                pong = self._pong
                if pong is not None and not pong.done():
                    pong.set_result(None)
            elif kind is WSMsgType.BINARY:
                self.last_frame = time.monotonic()
                self._malformed(Malformed("binary", "binary frame (events are text frames)",
                                          repr(bytes(msg.data[:40]))[2:-1], len(msg.data)))
            elif kind is WSMsgType.ERROR:
                err = msg.data
                if isinstance(err, aiohttp.WebSocketError) and \
                        err.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
                    self._malformed(Malformed("oversized", str(err), "", 0))
                    raise StreamError(f"message larger than max_message_bytes "
                                      f"({self.cfg.max_message_bytes}): connection reset",
                                      reason="oversized") from err
                raise classify(err, phase="reading") if isinstance(err, BaseException) else \
                    StreamError("connection error", reason="error")
            else:  # CLOSE, CLOSING, CLOSED
                code = ws.close_code
                raise StreamError(f"server closed the connection (code {code})" if code else
                                  "connection closed", reason="closed")

    async def _wait_for_sinks(self, waiting: Awaitable[None]) -> None:
        """A ``block`` sink is full: wait for it, telling the keepalive and idle watch that the
        silence meanwhile is ours, not the server's."""
        self.blocked = True
        self._blocked_epochs += 1
        try:
            await waiting
        finally:
            self.blocked = False
            self.last_frame = time.monotonic()

    def _on_frame(self, data: bytes) -> Awaitable[None] | None:
        now = time.time()
        self.alive_at = now
        self.last_frame = time.monotonic()
        ev = decode_frame(data, now, self.server.name)
        if type(ev) is Malformed:
            self._malformed(ev)
            return None
        stats = self.stats
        received = stats.received
        type_ = ev.type
        if type_ in received or len(received) < _TYPES_COUNTED or type_ in SEVT_NAMES:
            received[type_] += 1  # (a known type keeps its name on /metrics, even late)
        else:  # bounded: the types are the server's to choose (the metric says "other" anyway)
            received[_OTHER_TYPE] += 1
        stats.last_event_time = now
        self.events += 1
        if type_ == JOB_COMPLETED:
            # no call per completion: a known code's name is one lookup (ints only: True and
            # 5000.0 hash as 1 and 5000, and job_status_name calls them "other")
            doc = ev._doc  # (the parsed event: decode_frame just set it)
            job = doc.get("Data") if doc is not None else None
            status = job.get("Status") if type(job) is dict else None
            name = JOB_STATUS_NAMES.get(status) if type(status) is int else None
            stats.jobs_completed[name if name is not None else job_status_name(status)] += 1
        if self.hello is None:
            self._first_event(ev)
        return self.publish(ev)

    def _first_event(self, ev: Event) -> None:
        self.hello = ev
        data = ev.data if isinstance(ev.data, dict) else {}
        if ev.type != HELLO:
            log.warning("first event was not SEVT_META_HELLO", type=ev.type_name)
        else:
            log.info("stream ready", server=self.server.name, version=data.get("Version"),
                     server_start=data.get("ServerStartTime"))
        if self.on_hello is not None:
            self.on_hello(ev)

    def _malformed(self, m: Malformed) -> None:
        count_malformed(self.stats, self.malformed_log, m, self.server.name)

    async def _keepalive(self, ws: WebSocket) -> None:
        loop = asyncio.get_running_loop()
        interval, timeout = self.cfg.ping_interval, self.cfg.ping_timeout
        while True:
            await asyncio.sleep(interval)
            self._pong = pong = loop.create_future()
            await ws.ping(b"cometstream")
            epochs = self._blocked_epochs
            while True:
                try:
                    await asyncio.wait_for(asyncio.shield(pong), timeout)
                    break
                except TimeoutError:
                    # The pong may be sitting unread behind events while the read loop waits
                    # for a full `block` sink: that is not a silent server. Wait on.
                    if self.blocked or self._blocked_epochs != epochs:
                        epochs = self._blocked_epochs
                        continue
                    raise StreamError(f"no pong within {timeout:g} s: the server is not "
                                      "responding", reason="ping_timeout") from None

    async def _hello_watch(self) -> None:
        """A server that accepted the login but sends no SEVT_META_HELLO (nor any event) within
        ``connect_timeout`` is stuck: the connection is replaced (the HELLO is what starts the
        remedial sync; without it the daemon would look connected and catch up on nothing)."""
        timeout = self.cfg.connect_timeout
        await asyncio.sleep(timeout)
        while self.hello is None:
            if not self.blocked:
                raise StreamError(f"logged in, but no SEVT_META_HELLO within {timeout:g} s: "
                                  "replacing the connection", reason="no_hello")
            await asyncio.sleep(timeout)
        # (then done: this task ends quietly)
        await asyncio.Event().wait()

    async def _idle_watch(self) -> None:
        idle = self.cfg.idle_timeout
        while True:
            left = self.last_frame + idle - time.monotonic()
            if self.blocked:
                left = idle
            elif left <= 0:
                raise StreamError(f"no event for {idle:g} s (idle_timeout): recycling the "
                                  "connection", reason="idle_timeout")
            await asyncio.sleep(left)


class Supervisor:
    """Runs sessions for one server until cancelled; see the module docstring for the policy."""

    def __init__(
        self,
        server: ServerConfig,
        cfg: StreamConfig,
        publish: Publish,
        stats: StreamStats,
        *,
        rand: Callable[[], float] = random.random,
        on_status: StatusCallback | None = None,
        on_hello: Callable[[Event], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.server = server
        self.cfg = cfg
        self.publish = publish
        self.stats = stats
        self.backoff = Backoff(cfg.backoff_initial, cfg.backoff_max, rand=rand)
        self._sleep = sleep
        self._clock = clock
        self.on_status = on_status
        self.on_hello = on_hello
        self.ever_logged_in = False
        self.connected = False
        self.sessions = 0
        self.last_error = ""
        #: when the next connection attempt starts (time.monotonic(); 0: not waiting)
        self.retry_at = 0.0
        self.session: Session | None = None
        self._ssl = make_ssl_context(server)
        self._malformed_log = RateLimitedLog()
        self._stable: asyncio.TimerHandle | None = None

    @property
    def alive_at(self) -> float:
        """Wall time of the connected session's last frame or pong (0 when not connected)."""
        session = self.session
        return session.alive_at if session is not None and self.connected else 0.0

    def _status(self, state: str, detail: str) -> None:
        if self.on_status is not None:
            self.on_status(state, detail)

    def malformed(self, m: Malformed) -> None:
        """Count and log a skipped frame (also for events that fail later, in the gate)."""
        count_malformed(self.stats, self._malformed_log, m, self.server.name)

    def _proved_stable(self, session: Session | None) -> None:
        # a session that stayed logged in STABLE_SESSION seconds proved healthy
        self._stable = None
        if self.session is session and self.connected:
            self.backoff.reset()

    def _hello(self, ev: Event) -> None:
        # (the backoff is not reset here: see STABLE_SESSION)
        if self.on_hello is not None:
            self.on_hello(ev)

    async def run(self) -> None:
        """Connect and read forever; raises CredentialsRejected only for the first login."""
        while True:
            session = Session(self.server, self.cfg, self.publish, self.stats,
                              ssl_context=self._ssl, on_login=self._logged_in,
                              on_hello=self._hello,
                              malformed_log=self._malformed_log, clock=self._clock)
            self.session = session
            self.sessions += 1
            self._status("connecting", f"connecting to {self.server.name}")
            try:
                await self._run_session(session)
            except CredentialsRejected as exc:
                self.stats.connects["rejected"] += 1
                self.last_error = str(exc)
                if not self.ever_logged_in:
                    log.error("login rejected", server=self.server.name,
                              username=self.server.username, auth_type=self.server.auth_type,
                              reply=exc.reply)
                    raise
                delay = self.backoff.next_delay()
                log.warning("login rejected, retrying", server=self.server.name, reply=exc.reply,
                            retry_in=round(delay, 2))
            except StreamError as exc:
                self.last_error = str(exc)
                delay = self.backoff.next_delay()
                if session.logged_in:
                    self.stats.disconnects[exc.reason] += 1
                    log.warning("stream disconnected", server=self.server.name, reason=exc.reason,
                                error=str(exc), events=session.events, retry_in=round(delay, 2))
                else:
                    self.stats.connects["timeout" if exc.reason == "timeout" else "error"] += 1
                    log.warning("connect failed", server=self.server.name, error=str(exc),
                                retry_in=round(delay, 2))
            self.retry_at = time.monotonic() + delay
            self._status("reconnecting", self.reconnecting())
            try:
                await self._sleep(delay)
            finally:
                self.retry_at = 0.0

    def reconnecting(self) -> str:
        """``reconnecting in N s: why``, N counted down to the next attempt as of now."""
        left = max(0.0, self.retry_at - time.monotonic()) if self.retry_at else 0.0
        return f"reconnecting in {left:.0f} s: {self.last_error}"

    async def _run_session(self, session: Session) -> None:
        try:
            # Session.run always ends by raising; the finally keeps the gauges honest
            await session.run()
        finally:
            if self._stable is not None:
                self._stable.cancel()
                self._stable = None
            if self.connected:
                self.connected = False
                self.stats.connection_up = 0

    def _logged_in(self) -> None:
        self._stable = asyncio.get_running_loop().call_later(
            STABLE_SESSION, self._proved_stable, self.session)
        self.connected = True
        self.ever_logged_in = True
        self.stats.connection_up = 1
        self.stats.connects["ok"] += 1
        log.info("logged in", server=self.server.name, url=self.server.ws_url,
                 username=self.server.username)
        self._status("connected", f"connected to {self.server.name}")
