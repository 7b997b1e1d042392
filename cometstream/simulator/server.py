"""The simulated Comet Server: aiohttp on real sockets, serving the live event stream and the admin API.

``GET /api/v1/events/stream`` upgrades to a websocket. The client sends five text frames
(Username, AuthType, Password, SessionKey, TOTP); the server answers ``200 OK`` followed by a
SEVT_META_HELLO event and then the live events, or ``403 Unauth`` and closes.

``POST /api/v1/admin/...`` is the admin HTTP API the remedial sync uses (``api.py``), answered
from the same ``World`` and authenticated with the same credentials and session keys.

Every authenticated client has a bounded queue of outgoing frames drained by its own writer task.
Broadcasting only appends to those queues, so it never waits on a client; a client whose queue
overflows is dropped (its TCP connection aborted), like Comet drops slow websocket consumers.

The writer sends pre-built websocket frames straight to the transport in chunks of about 64 KiB,
then awaits the transport's drain; control frames (pong, close) still go through aiohttp, which
writes whole frames, so both interleave at frame boundaries. No compression is negotiated.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import struct
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Self

import orjson
import structlog
from aiohttp import WSMsgType, web
from aiohttp.abc import AbstractStreamWriter

from cometstream.simulator.api import AdminAPI, encode_json
from cometstream.simulator.auth import HANDSHAKE_FRAMES, Credentials
from cometstream.simulator.world import World, server_meta_version_info
from cometstream.simulator.world import event as make_event

__all__ = ["STREAM_PATH", "Faults", "Simulator", "run_simulator"]

log = structlog.get_logger("cometstream.simulator")

#: Path of the live event stream.
STREAM_PATH = "/api/v1/events/stream"

_OK = b"200 OK"
_UNAUTH = "403 Unauth"
_CHUNK = 64 * 1024
_CLOSE_TIMEOUT = 1.0
_MAX_BURST = 5000


@dataclass
class Faults:
    """Faults injected by the simulated server; change the fields at any time.

    Event stream (the admin API is not affected by these):

    - ``reject_logins``: every stream login gets ``403 Unauth``.
    - ``reject_next``: the next N stream logins get ``403 Unauth`` (counts down).
    - ``silent``: connected and new clients get nothing more, and their sockets are no longer read
      (so websocket pings get no pong); TCP stays open. Clearing it resumes reading and sending;
      events broadcast meanwhile are lost for those clients.
    - ``hang_handshake``: new connections are upgraded but the five frames are never answered.
    - ``no_hello``: logins are answered ``200 OK``, then nothing is sent on those connections
      (no SEVT_META_HELLO, no events); pings are still answered.

    Admin HTTP API (applied in this order, before routing and authentication):

    - ``api_delay``: seconds to sleep before answering each API call.
    - ``api_stall``: request paths (``/api/v1/admin/...``) whose calls are not answered while
      they are listed (a server stuck on one endpoint: say, the fleet's last read).
    - ``api_dribble``: > 0: a successful API answer is sent uncompressed, one byte every
      ``api_dribble`` seconds (a server or proxy that never stalls long enough for a per-read
      timeout, yet never finishes).
    - ``api_down``: every API call gets HTTP 503 with a plain-text body.
    - ``api_fail_next``: the next N API calls get HTTP 500 with a plain-text body (counts down).
    - ``api_reject``: every API call gets HTTP 200 ``{"Status":403,"Message":"Unauthorised"}``
      while the stream still accepts the same credentials.
    - ``null_lists``: empty top-level lists and maps in API answers are JSON ``null`` (as Comet's
      Go encoder writes nil slices and maps); False sends ``[]`` / ``{}``.
    """

    reject_logins: bool = False
    reject_next: int = 0
    silent: bool = False
    hang_handshake: bool = False
    no_hello: bool = False
    api_down: bool = False
    api_reject: bool = False
    api_delay: float = 0.0
    api_stall: frozenset[str] = frozenset()
    api_dribble: float = 0.0
    api_fail_next: int = 0
    null_lists: bool = True

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        listener = self.__dict__.get("_listener")
        if listener is not None:
            listener(name)


def _frame_header(opcode: int, length: int) -> bytes:
    """Header of an unmasked, final, server-to-client websocket frame."""
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


class _Client:
    """One websocket connection: its queue of outgoing frames and its writer task."""

    def __init__(
        self, ws: web.WebSocketResponse, request: web.Request, writer: AbstractStreamWriter
    ) -> None:
        self.ws = ws
        self.transport = request.transport
        self.writer = writer
        self.peer = request.remote or "?"
        self.queue: deque[tuple[int, bytes]] = deque()
        self.wake = asyncio.Event()
        self.silent = False
        self.dropped = False
        self.task: asyncio.Task[None] | None = None

    def enqueue(self, opcode: int, payload: bytes) -> None:
        """Queue one frame for the writer (never waits)."""
        self.queue.append((opcode, payload))
        if not self.wake.is_set():
            self.wake.set()

    def start_writer(self) -> None:
        """Start the task that drains the queue to the socket."""
        self.task = asyncio.create_task(self._write_loop(), name=f"sim-writer-{self.peer}")

    async def _write_loop(self) -> None:
        queue = self.queue
        try:
            while True:
                while not queue or self.silent:
                    self.wake.clear()
                    await self.wake.wait()
                transport = self.transport
                if transport is None or transport.is_closing():
                    return
                parts: list[bytes] = []
                size = 0
                while queue and size < _CHUNK:
                    opcode, payload = queue.popleft()
                    parts.append(_frame_header(opcode, len(payload)))
                    parts.append(payload)
                    size += len(payload)
                transport.write(b"".join(parts))
                await self.writer.drain()
        except (ConnectionError, RuntimeError):
            self.abort()

    def pause(self) -> None:
        """Stop reading the socket and stop sending (the `silent` fault)."""
        self.silent = True
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(RuntimeError, AttributeError):
                self.transport.pause_reading()

    def resume(self) -> None:
        """Undo `pause`."""
        self.silent = False
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(RuntimeError, AttributeError):
                self.transport.resume_reading()
        self.wake.set()

    def abort(self) -> None:
        """Drop the TCP connection at once (RST, no close frame)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    async def close(self, code: int) -> None:
        """Send a close frame and wait briefly for the answer; abort if that does not work."""
        if self.silent or self.transport is None or self.transport.is_closing():
            self.abort()
            return
        try:
            await asyncio.wait_for(
                self.ws.close(code=code, message=b"server shutting down"), _CLOSE_TIMEOUT
            )
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        self.abort()


class Simulator:
    """A protocol-faithful Comet Server (event stream and admin API) with a generated world and
    fault injection.

    Use ``async with Simulator(...) as sim:`` or ``await start()`` / ``await stop()``.
    ``emit()`` broadcasts a frame now; a background generator emits world events at ``rate``
    per second, whether or not a client is connected (events nobody receives still change the
    world, which the admin API then reports). Counters and recordings (``handshakes``, ``sent``,
    ``api_calls``, ...) are for tests.
    """

    def __init__(
        self,
        *,
        username: str = "admin",
        password: str = "admin",
        totp_secret: str | None = None,
        session_keys: Iterable[str] = (),
        rate: float = 5.0,
        seed: int | None = None,
        queue_limit: int = 10000,
        handshake_timeout: float = 10.0,
        record: bool = True,
        totp_required: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Configure the server; raises ValueError for a bad TOTP secret, rate or limit.

        `session_keys` are accepted from the start (AuthType SessionKey), besides the keys that
        ``/api/v1/admin/account/session-start`` issues. With `totp_required` (needs
        `totp_secret`), AuthType Password is refused: ``ERR_TOTP_REQUIRED`` on the API,
        ``403 Unauth`` on the stream. `clock` is the server's clock (the world's, the HELLO's
        and meta/version's times).
        """
        if rate < 0:
            raise ValueError("rate must be >= 0")
        if queue_limit < 1:
            raise ValueError("queue_limit must be >= 1")
        self._credentials = Credentials.build(
            username, password, totp_secret, session_keys, totp_required=totp_required
        )
        self._session_keys: set[str] = set(self._credentials.session_keys)
        self._rate = float(rate)
        self.queue_limit = queue_limit
        self.handshake_timeout = handshake_timeout
        self.record = record
        self.clock = clock
        self.world = World(seed, admin=username, clock=clock)
        self.server_start_hash = str(uuid.uuid4())
        self.server_start_time = int(clock())
        self.handshakes: list[list[str]] = []
        self.sent: list[bytes] = []
        self.connections = 0
        self.logins_ok = 0
        self.logins_rejected = 0
        self.slow_drops = 0
        #: Admin API calls by request path (every call, faulted and refused ones included).
        self.api_calls: Counter[str] = Counter()
        #: Admin API calls by the Accept-Encoding they asked for ("": none said).
        self.api_encodings: Counter[str] = Counter()
        #: The aiohttp application; more routes may be added before start().
        self.app = web.Application()
        self.app.router.add_get(STREAM_PATH, self._stream_handler)
        self.api = AdminAPI(self)
        self.api.install(self.app)
        self._faults = Faults()
        self._attach_faults()
        self._conns: set[_Client] = set()
        self._clients: dict[_Client, None] = {}
        self._changed = asyncio.Event()
        self._paused = False
        self._gen_wake = asyncio.Event()
        self._gen_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._host = "127.0.0.1"
        self._port = 0

    # ----------------------------------------------------------------- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on host:port (0 = a free port) and start the generator."""
        if self._runner is not None:
            raise RuntimeError("simulator already started")
        runner = web.AppRunner(
            self.app, handle_signals=False, access_log=None, shutdown_timeout=_CLOSE_TIMEOUT
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._host = host
        self._port = int(runner.addresses[0][1])
        self._gen_task = asyncio.create_task(self._generate(), name="sim-generator")
        self._gen_task.add_done_callback(self._generator_done)
        log.info("simulator started", url=self.url, rate=self._rate)

    async def stop(self) -> None:
        """Close every client (close frame 1001, then abort) and the listener; idempotent."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if self._gen_task is not None:
            self._gen_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gen_task
            self._gen_task = None
        conns = list(self._conns)
        if conns:
            await asyncio.gather(*(c.close(1001) for c in conns), return_exceptions=True)
        await runner.cleanup()
        log.info("simulator stopped", url=self.url)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The listening port (valid after start)."""
        return self._port

    @property
    def url(self) -> str:
        """Base URL of the server, e.g. ``http://127.0.0.1:8060/`` (valid after start)."""
        host = self._host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._port}/"

    @property
    def clients(self) -> int:
        """Number of currently authenticated clients."""
        return len(self._clients)

    @property
    def faults(self) -> Faults:
        """The fault switches (mutable)."""
        return self._faults

    @faults.setter
    def faults(self, value: Faults) -> None:
        object.__setattr__(self._faults, "_listener", None)
        self._faults = value
        self._attach_faults()
        self._on_fault("silent")

    # ----------------------------------------------------------------- control

    def pause(self) -> None:
        """Stop the automatic generator (emit() still works)."""
        self._paused = True
        self._gen_wake.set()

    def resume(self) -> None:
        """Restart the automatic generator."""
        self._paused = False
        self._gen_wake.set()

    @property
    def rate(self) -> float:
        """Automatic events per second (0 = none)."""
        return self._rate

    def set_rate(self, rate: float) -> None:
        """Change the generator's rate (events per second, 0 = none)."""
        if rate < 0:
            raise ValueError("rate must be >= 0")
        self._rate = float(rate)
        self._gen_wake.set()

    async def wait_for_clients(self, n: int = 1, timeout: float = 5.0) -> None:
        """Wait until at least `n` clients are authenticated; raises TimeoutError."""
        await self._wait(lambda: self.clients >= n, timeout, f"{n} authenticated client(s)")

    async def wait_for_connections(self, n: int, timeout: float = 5.0) -> None:
        """Wait until `connections` (accepted upgrades, rejected logins included) >= n."""
        await self._wait(lambda: self.connections >= n, timeout, f"{n} connection(s)")

    def emit(
        self, event: dict[str, Any] | bytes | str | None = None, *, binary: bool = False
    ) -> bytes:
        """Broadcast one frame now to every authenticated client and return its bytes.

        A dict is encoded with orjson; bytes or str are sent verbatim (a TEXT frame, or BINARY
        with ``binary=True``), so malformed frames can be sent; None generates the next world
        event. Recorded in ``sent`` when ``record`` is on.
        """
        if event is None:
            payload = orjson.dumps(self.world.next_event())
        elif isinstance(event, dict):
            payload = orjson.dumps(event)
        elif isinstance(event, str):
            payload = event.encode("utf-8", "surrogatepass")
        else:
            payload = bytes(event)
        self._broadcast(WSMsgType.BINARY if binary else WSMsgType.TEXT, payload)
        return payload

    def emit_many(self, n: int) -> list[bytes]:
        """Generate and broadcast `n` world events in order; return their bytes."""
        return [self.emit() for _ in range(n)]

    @property
    def credentials(self) -> Credentials:
        """What the stream and the API accept now (session keys included)."""
        return self._credentials

    @property
    def session_keys(self) -> frozenset[str]:
        """Session keys accepted now (configured and issued, minus revoked)."""
        return self._credentials.session_keys

    def start_session(self) -> str:
        """Issue a new admin session key (what AdminAccountSessionStart does) and return it."""
        key = secrets.token_urlsafe(24)
        self._session_keys.add(key)
        self._credentials = self._credentials.with_session_keys(self._session_keys)
        return key

    def revoke_session(self, key: str) -> bool:
        """Stop accepting one session key; False if it was not accepted anyway."""
        if key not in self._session_keys:
            return False
        self._session_keys.discard(key)
        self._credentials = self._credentials.with_session_keys(self._session_keys)
        return True

    def expire_sessions(self) -> None:
        """Every session key stops working (sessions expired); open stream connections stay."""
        self._session_keys.clear()
        self._credentials = self._credentials.with_session_keys(())

    def meta_version_info(self) -> dict[str, Any]:
        """The ServerMetaVersionInfo of HELLO and AdminMetaVersion (CurrentTime = now)."""
        return server_meta_version_info(
            start_time=self.server_start_time,
            start_hash=self.server_start_hash,
            now=int(self.clock()),
            configured_devices=self.world.device_count(),
            self_backup=self.world.self_backups,
        )

    async def drop_clients(self) -> None:
        """Abort every client's TCP connection (no close frame), authenticated or not."""
        for conn in list(self._conns):
            self._forget(conn)
            conn.abort()
        await asyncio.sleep(0)

    async def restart(self) -> None:
        """Act out a server restart: drop every client, then answer with a new ServerStartHash.

        The listener, port, credentials and world stay; reconnecting clients get a HELLO whose
        ServerStartHash and ServerStartTime are new.
        """
        await self.drop_clients()
        self.server_start_hash = str(uuid.uuid4())
        self.server_start_time = int(self.clock())
        log.info("simulator restarted", server_start_hash=self.server_start_hash)

    # ----------------------------------------------------------------- internals

    def _attach_faults(self) -> None:
        object.__setattr__(self._faults, "_listener", self._on_fault)

    def _on_fault(self, name: str) -> None:
        if name != "silent":
            return
        for conn in list(self._conns):
            if self._faults.silent and not conn.silent:
                conn.pause()
            elif not self._faults.silent and conn.silent:
                conn.resume()
        log.info("fault changed", fault=name, value=self._faults.silent)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"simulator: {what} not reached within {timeout} s") from None

    def _broadcast(self, opcode: int, payload: bytes) -> None:
        if self.record:
            self.sent.append(payload)
        limit = self.queue_limit
        overflowed = None
        for conn in self._clients:
            if conn.silent:
                continue
            if len(conn.queue) >= limit:
                overflowed = overflowed or []
                overflowed.append(conn)
                continue
            conn.enqueue(opcode, payload)
        if overflowed:
            for conn in overflowed:
                self._drop_slow(conn)

    def _drop_slow(self, conn: _Client) -> None:
        self.slow_drops += 1
        log.warning("slow client dropped", peer=conn.peer, queued=len(conn.queue))
        self._forget(conn)
        conn.queue.clear()
        conn.abort()

    def _forget(self, conn: _Client) -> None:
        conn.dropped = True
        if conn in self._clients:
            del self._clients[conn]
            self._notify()

    def _generator_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("generator failed", error=repr(task.exception()))

    async def _generate(self) -> None:
        """Emit world events at `rate` per second (catching up in bursts, never more than 1 s behind)."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            if self._paused or self._rate <= 0:
                self._gen_wake.clear()
                await self._gen_wake.wait()
                next_at = loop.time()
                continue
            now = loop.time()
            interval = 1.0 / self._rate
            if now >= next_at:
                due = min(int((now - next_at) / interval) + 1, _MAX_BURST)
                for _ in range(due):
                    self.emit()
                next_at += due * interval
                if now - next_at > 1.0:
                    next_at = now
                await asyncio.sleep(0)
                continue
            self._gen_wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(next_at - now):
                    await self._gen_wake.wait()
            if self._gen_wake.is_set():
                next_at = loop.time()

    def _hello(self) -> bytes:
        data = self.meta_version_info()
        return encode_json(
            make_event(
                "SEVT_META_HELLO",
                actor="",
                organization="",
                data=data,
                timestamp=data["CurrentTime"],
            )
        )

    def _login(self, frames: list[str]) -> str | None:
        """None if the login succeeds, else the reason it is refused."""
        if self._faults.reject_logins:
            return "fault reject_logins"
        if self._faults.reject_next > 0:
            self._faults.reject_next -= 1
            return "fault reject_next"
        return self._credentials.check(frames)

    async def _stream_handler(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(
            autoping=True, compress=False, timeout=_CLOSE_TIMEOUT, max_msg_size=1 << 20
        )
        writer = await ws.prepare(request)
        conn = _Client(ws, request, writer)
        self._conns.add(conn)
        self.connections += 1
        self._notify()
        log.info("client connected", peer=conn.peer)
        try:
            if self._faults.silent:
                conn.pause()
            if self._faults.hang_handshake:
                await self._discard_until_closed(ws)
                return ws
            frames = await self._read_handshake(conn)
            if frames is None:
                return ws
            self.handshakes.append(frames)
            reason = self._login(frames)
            if reason is not None:
                self.logins_rejected += 1
                self._notify()
                log.warning(
                    "login rejected",
                    peer=conn.peer,
                    username=frames[0],
                    auth_type=frames[1],
                    reason=reason,
                )
                await self._reject(ws)
                return ws
            self.logins_ok += 1
            log.info("login ok", peer=conn.peer, username=frames[0], auth_type=frames[1])
            conn.enqueue(WSMsgType.TEXT, _OK)
            if self._faults.no_hello:
                conn.start_writer()
                await self._discard_until_closed(ws)
                return ws
            conn.enqueue(WSMsgType.TEXT, self._hello())
            conn.start_writer()
            if not conn.dropped:
                self._clients[conn] = None
                self._notify()
            await self._discard_until_closed(ws)
            return ws
        except ConnectionError:
            return ws
        finally:
            self._conns.discard(conn)
            self._forget(conn)
            if conn.task is not None:
                conn.task.cancel()
            log.info("client disconnected", peer=conn.peer)

    async def _read_handshake(self, conn: _Client) -> list[str] | None:
        """The five text frames, or None after a 403/close/timeout (already handled)."""
        ws = conn.ws
        frames: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.handshake_timeout
        while len(frames) < HANDSHAKE_FRAMES:
            remaining = deadline - loop.time()
            if remaining <= 0:
                if conn.silent:  # a silent server sends nothing, not even a close
                    deadline = loop.time() + self.handshake_timeout
                    continue
                log.warning("handshake timeout", peer=conn.peer, frames=len(frames))
                if frames:  # an incomplete login is refused like a wrong one
                    self.logins_rejected += 1
                    self._notify()
                    await self._reject(ws)
                else:
                    await ws.close()
                return None
            try:
                msg = await ws.receive(timeout=remaining)
            except TimeoutError:
                continue
            if msg.type == WSMsgType.TEXT:
                frames.append(msg.data)
            elif msg.type == WSMsgType.BINARY:
                self.logins_rejected += 1
                self._notify()
                log.warning("login rejected", peer=conn.peer, reason="binary handshake frame")
                await self._reject(ws)
                return None
            else:  # CLOSE, CLOSING, CLOSED, ERROR: the client went away
                return None
        return frames

    async def _reject(self, ws: web.WebSocketResponse) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_str(_UNAUTH)
            await ws.close()

    async def _discard_until_closed(self, ws: web.WebSocketResponse) -> None:
        """Keep reading (so pings are answered and a close is seen); ignore client messages."""
        while True:
            msg = await ws.receive()
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return


async def run_simulator(
    *,
    host: str,
    port: int,
    username: str,
    password: str,
    rate: float,
    stop: asyncio.Event,
    seed: int | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Run a Simulator on host:port until `stop` is set; `ready(url)` is called once listening.

    Frames are not recorded (``record=False``), so memory stays flat however long it runs.
    """
    sim = Simulator(username=username, password=password, rate=rate, seed=seed, record=False)
    await sim.start(host, port)
    try:
        if ready is not None:
            ready(sim.url)
        await stop.wait()
    finally:
        await sim.stop()
