"""A scripted Comet-like websocket server that is not the simulator.

Each connection runs ``script(ws, frames, n)``: ``frames`` are the five login frames it read,
``n`` the connection number (1-based). Used to reproduce behaviour of real servers and proxies
that the simulator does not have (a ping before the login reply, a close right after 200 OK).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import orjson
from aiohttp import web


@asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 (a free port) while the block runs; yields its base URL."""
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


Script = Callable[[web.WebSocketResponse, list[str], int], Awaitable[None]]

HELLO = orjson.dumps({"Actor": "", "OwnerOrganizationID": "", "Type": 4000, "Timestamp": 1,
                      "TypeString": "SEVT_META_HELLO", "Data": {"Version": "99.0.0",
                                                                "ServerStartHash": "h"}}).decode()


@asynccontextmanager
async def scripted_server(script: Script) -> AsyncIterator[tuple[str, list[list[str]]]]:
    """Serve ``script`` on 127.0.0.1; yields (base URL, list of each connection's frames)."""
    logins: list[list[str]] = []

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        frames = [(await ws.receive_str()) for _ in range(5)]
        logins.append(frames)
        try:
            await script(ws, frames, len(logins))
        except (ConnectionError, asyncio.CancelledError):
            pass
        if not ws.closed:
            await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/api/v1/events/stream", handler)
    async with serve_app(app) as url:
        yield url, logins
