"""The daemon's HTTP endpoints on ``http.listen``: ``/metrics``, ``/healthz``, ``/readyz``.

- ``/metrics``: Prometheus text format from the daemon's registry (gzip when the scraper asks);
- ``/healthz``: 200 while the event loop answers (the handler itself runs on it);
- ``/readyz``: 200 when logged in to the stream, no sink is failing and remedial syncs succeed,
  else 503 with a JSON body naming why
  (``{"ready": false, "reasons": ["stream: reconnecting in 8 s: ..."]}``).

Whoever can reach the port can open connections to it, so they are bounded: at most
``max_connections`` at once (64; beyond, a connection gets a 503 and is closed at once), and a
connection that has not sent a whole request's headers within ``header_timeout`` (10 s) of
opening, or of its previous answer, is closed. Each connection holds one file descriptor of the
daemon, which the ledger, the sinks and the stream need too. A ``listen`` address that is not
a loopback one is reported with a warning at start.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ..config import is_loopback

__all__ = ["HEADER_TIMEOUT", "MAX_CONNECTIONS", "HttpServer", "is_loopback"]

log = structlog.get_logger("cometstream.http")

ReadyCheck = Callable[[], list[str]]

#: connections served at once; beyond, each new one gets a 503 and is closed
MAX_CONNECTIONS: Final = 64
#: seconds a connection has to send a request's headers (after opening, or after an answer)
HEADER_TIMEOUT: Final = 10.0
#: a /metrics answer larger than this is compressed on a thread
_GZIP_ON_LOOP_MAX: Final = 1 << 20
#: a refusal is logged at most this often
_REFUSAL_LOG_INTERVAL: Final = 60.0
_BUSY: Final = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 22\r\nConnection: close\r\n\r\ntoo many connections\r\n")


class _Refused(asyncio.Protocol):
    """A connection beyond the cap: a short 503, then closed (it fits the socket buffer)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_BUSY)
        transport.close()


class _GuardedServer(web.Server):
    """aiohttp's low-level server with a cap on open connections and a deadline for each
    request's headers (aiohttp itself has neither: an idle connection lives an hour)."""

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], *,
                 max_connections: int, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        #: connections accepted and not yet closed
        self.open = 0
        self.refused = 0
        self._refusal_logged = 0.0
        self._timers: dict[RequestHandler, asyncio.TimerHandle] = {}

    def __call__(self) -> Any:  # the listening socket's protocol factory: one per connection
        if self.open >= self.max_connections:
            self.refused += 1
            now = time.monotonic()
            if now - self._refusal_logged >= _REFUSAL_LOG_INTERVAL:
                self._refusal_logged = now
                log.warning("http: too many connections, refusing new ones",
                            max_connections=self.max_connections, refused=self.refused)
            return _Refused()
        self.open += 1
        return super().__call__()

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.arm(handler, transport)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self.open -= 1
        self.disarm(handler)
        super().connection_lost(handler, exc)

    def arm(self, handler: RequestHandler, transport: asyncio.Transport | None) -> None:
        """The next request's headers must arrive within ``header_timeout``."""
        self.disarm(handler)
        if transport is None or transport.is_closing():
            return
        self._timers[handler] = self._loop.call_later(self.header_timeout, self._expired,
                                                      handler, transport)

    def disarm(self, handler: RequestHandler) -> None:
        timer = self._timers.pop(handler, None)
        if timer is not None:
            timer.cancel()

    def _expired(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        self._timers.pop(handler, None)
        transport.abort()  # (close() would wait to flush what a peer that reads nothing holds)


class HttpServer:
    def __init__(self, registry: CollectorRegistry, ready: ReadyCheck, *, host: str,
                 port: int, max_connections: int = MAX_CONNECTIONS,
                 header_timeout: float = HEADER_TIMEOUT,
                 extra: Callable[[bool], Awaitable[list[bytes]]] | None = None,
                 extra_gzip: Callable[[bytes], Awaitable[bytes]] | None = None,
                 info: Callable[[], dict[str, Any]] | None = None) -> None:
        self.registry = registry
        self.ready = ready
        #: more of the state for /readyz's body, whatever its status (e.g. a sync catching up)
        self.info = info
        #: more exposition text after the registry's, in parts (the fleet's, from memory);
        #: called with False for a HEAD request (the length is all it needs)
        self.extra = extra
        #: the same, gzipped with the registry's text (given) into one answer, by the owner of
        #: the extra text (the fleet keeps most of it compressed between scrapes)
        self.extra_gzip = extra_gzip
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self._runner: web.ServerRunner | None = None
        self._server: _GuardedServer | None = None
        self._routes: dict[str, Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]] = {
            "/metrics": self._metrics,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/": self._index,
        }

    async def start(self) -> None:
        server = _GuardedServer(self._handle, max_connections=self.max_connections,
                                header_timeout=self.header_timeout, access_log=None)
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self._server = server
        if self.port == 0 and runner.addresses:  # port 0: the one the kernel chose
            self.port = runner.addresses[0][1]
        if not is_loopback(self.host):
            log.warning("http: listening on a non-loopback address: anyone who can reach it "
                        "reads the metrics and the /readyz reasons; restrict it with a "
                        "firewall, or listen on 127.0.0.1", listen=self.url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._server = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def connections(self) -> int:
        """Connections open now (for tests and diagnostics)."""
        return self._server.open if self._server is not None else 0

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        server = self._server
        protocol = request.protocol
        if server is not None:
            server.disarm(protocol)  # the headers are in
        try:
            route = self._routes.get(request.path)
            if route is None:
                return web.Response(status=404, text="404: Not Found\n")
            if request.method not in ("GET", "HEAD"):
                return web.Response(status=405, text="405: Method Not Allowed\n",
                                    headers={"Allow": "GET, HEAD"})
            return await route(request)
        finally:
            if server is not None:
                # the answer, and the next request's headers, within header_timeout
                server.arm(protocol, request.transport)

    async def _metrics(self, request: web.BaseRequest) -> web.StreamResponse:
        body = generate_latest(self.registry)
        headers = {"Content-Type": CONTENT_TYPE_LATEST}
        gzipped = "gzip" in request.headers.get("Accept-Encoding", "")
        if gzipped and self.extra_gzip is not None:
            headers["Content-Encoding"] = "gzip"
            return web.Response(body=await self.extra_gzip(body), headers=headers)
        if self.extra is not None:
            parts = await self.extra(request.method == "GET")
            if not gzipped:
                # the fleet's text (a hundred MB at 10,000 users with the exporter's labels)
                # goes out after ours in pieces, never copied into one body
                resp = web.StreamResponse(headers=headers)
                resp.content_length = len(body) + sum(map(len, parts))
                await resp.prepare(request)
                if request.method == "GET":
                    await _write_pieces(resp, [body, *parts])
                await resp.write_eof()
                return resp
            body = b"".join([body, *parts])
        if gzipped:
            if len(body) > _GZIP_ON_LOOP_MAX:  # (a fleet's tens of MB: zlib on a thread
                # lets the loop go on reading the stream meanwhile; level 1 takes half the
                # time of 5 for 9% more bytes)
                body = await asyncio.get_running_loop().run_in_executor(
                    None, gzip.compress, body, 1)
            else:
                body = gzip.compress(body, compresslevel=5)
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

    async def _healthz(self, request: web.BaseRequest) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.BaseRequest) -> web.Response:
        reasons = self.ready()
        doc: dict[str, Any] = {"ready": not reasons, "reasons": reasons}
        if self.info is not None:
            doc.update(self.info())
        try:
            body = orjson.dumps(doc)
        except TypeError:  # (a lone surrogate the scrubber missed: escaped, not a crash)
            body = json.dumps(doc).encode()
        return web.Response(body=body, status=503 if reasons else 200,
                            content_type="application/json")

    async def _index(self, request: web.BaseRequest) -> web.Response:
        return web.Response(text="cometstream: /metrics /healthz /readyz\n")


#: the size of the pieces a long answer is written in
_PIECE: Final = 1 << 20


async def _write_pieces(resp: web.StreamResponse, parts: list[bytes]) -> None:
    """``parts`` written in pieces of about :data:`_PIECE`, each sent (drained) before the next
    is made: small parts joined, large ones sliced. One write of a hundred MB is copied whole
    into the transport's buffer and then sent from it, four times slower on loopback."""
    batch: list[bytes] = []
    size = 0
    for part in parts:
        if len(part) >= _PIECE:
            if batch:
                await resp.write(b"".join(batch))
                batch, size = [], 0
            view = memoryview(part)
            for at in range(0, len(part), _PIECE):
                await resp.write(view[at:at + _PIECE])
            continue
        batch.append(part)
        size += len(part)
        if size >= _PIECE:
            await resp.write(b"".join(batch))
            batch, size = [], 0
    if batch:
        await resp.write(b"".join(batch))
