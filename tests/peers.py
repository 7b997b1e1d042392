"""A scripted Comet-like websocket server that is not the simulator.

Each connection runs ``script(ws, frames, n)``: ``frames`` are the five login frames it read,
``n`` the connection number (1-based). Used to reproduce behaviour of real servers and proxies
that the simulator does not have (a ping before the login reply, a close right after 200 OK).

Also what tests use to watch a `cometstream` process from outside: its JSON log read up to a
given record (``read_log``), its stdout on a pipe the test can hang up (``run_cli_with_stdout``).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from aiohttp import web

from .conftest import cli_env


@asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 (a free port) while the block runs; yields its base URL."""
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
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


# --- watching a `cometstream` process from outside ------------------------------------------------
async def read_log(stream: asyncio.StreamReader | None, event: str,
                   timeout: float = 30.0) -> dict[str, Any]:
    """Read a process's JSON log (``[log] format = "json"``) up to the first record whose
    ``event`` is ``event``, and return it. The deadline only fails a test that hangs; what the
    stream holds after that record is left for ``communicate()``."""
    assert stream is not None
    try:
        async with asyncio.timeout(timeout):
            while True:
                line = await stream.readline()
                if not line:
                    raise AssertionError(f"the log ended before {event!r}")
                try:
                    rec = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and rec.get("event") == event:
                    return rec
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {event!r} in the log"
                             ) from None


async def run_cli_with_stdout(*args: str, env: dict[str, str] | None = None
                              ) -> tuple[asyncio.subprocess.Process, asyncio.StreamReader,
                                         asyncio.ReadTransport]:
    """``python -m cometstream ARGS`` with its stdout on a pipe whose read end this side owns:
    read it with the returned reader; closing the returned transport hangs that end up (what
    ``| head`` does once it has its lines). stderr is piped, as with ``run_cli``."""
    loop = asyncio.get_running_loop()
    r, w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cometstream", *args, stdout=w,
            stderr=asyncio.subprocess.PIPE, env=env or cli_env())
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(r, "rb", buffering=0))
    return proc, reader, transport
