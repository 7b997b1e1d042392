"""The daemon's HTTP endpoints on ``http.listen``: ``/metrics``, ``/healthz``, ``/readyz``.

- ``/metrics``: Prometheus text format from the daemon's registry (gzip when the scraper asks);
- ``/healthz``: 200 while the event loop answers (the handler itself runs on it);
- ``/readyz``: 200 when logged in to the stream and no sink is failing, else 503 with a JSON
  body naming why (``{"ready": false, "reasons": ["stream: reconnecting in 8 s: ..."]}``).
"""

from __future__ import annotations

import gzip
from collections.abc import Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["HttpServer"]

ReadyCheck = Callable[[], list[str]]


class HttpServer:
    def __init__(self, registry: CollectorRegistry, ready: ReadyCheck, *, host: str,
                 port: int) -> None:
        self.registry = registry
        self.ready = ready
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/", self._index)
        self.app = app

    async def start(self) -> None:
        runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server
        if self.port == 0 and server is not None and server.sockets:  # type: ignore[union-attr]
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        headers = {"Content-Type": CONTENT_TYPE_LATEST}
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body, compresslevel=5)
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        reasons = self.ready()
        body = orjson.dumps({"ready": not reasons, "reasons": reasons})
        return web.Response(body=body, status=503 if reasons else 200,
                            content_type="application/json")

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(text="cometstream: /metrics /healthz /readyz\n")
