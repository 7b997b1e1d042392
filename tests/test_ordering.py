"""Per-resource ordering of a concurrent webhook sink, for events the server sends without a
``ResourceID``: a job's GUID is then what keeps its start before its completion.

A real aiohttp receiver on 127.0.0.1 (``tests/peers.py``) holds a job's start unanswered while the
daemon, fed by the simulator over a real websocket, goes on POSTing other events."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from cometstream.simulator import Simulator

from .conftest import make_config, running, wait_until
from .peers import serve_app


class HoldingReceiver:
    """Records each POST's body in arrival order, and what had been answered when it arrived;
    the POST of ``held`` is answered only once ``release`` is set."""

    def __init__(self) -> None:
        self.held = b""
        self.release = asyncio.Event()
        self.bodies: list[bytes] = []
        self.answered: list[bytes] = []
        #: body -> the bodies answered before it arrived
        self.answered_before: dict[bytes, list[bytes]] = {}
        self.holding = False

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.bodies.append(body)
        self.answered_before.setdefault(body, list(self.answered))
        if body == self.held:
            self.holding = True
            await self.release.wait()
            self.holding = False
        self.answered.append(body)
        return web.Response(status=200)


def _without_resource(doc: dict[str, Any]) -> dict[str, Any]:
    """The event as a server that sends no ``ResourceID`` would."""
    return {k: v for k, v in doc.items() if k != "ResourceID"}


async def test_a_jobs_completion_without_resource_id_waits_for_its_start(
        sim: Simulator, tmp_path: Path) -> None:
    """Job events without a ``ResourceID``, two POSTs in flight at once: while the job's start is
    unanswered its completion is not sent (the job GUID is the ordering key), yet unrelated jobs
    go on through the other slot; once the start is answered, the completion follows."""
    hook = HoldingReceiver()
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    async with serve_app(app) as base:
        cfg = make_config(sim.url, tmp_path, exact=True, sinks={
            "hook": {"type": "webhook", "url": base + "hook", "timeout": 30.0,
                     "concurrency": 2}})
        async with running(cfg) as d:
            stats = d.sink_stats("hook")
            await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
            await wait_until(lambda: stats.delivered >= 1
                             and stats.delivered == len(hook.answered), what="baseline delivered")
            base_n = len(hook.bodies)
            # (made now: jobs that ended before the baseline sync would come from it, with
            # their ResourceID, and the live copies would be dropped as duplicates)
            start = _without_resource(sim.world.start_job())
            done = _without_resource(sim.world.complete_job(start["Data"]["GUID"]))
            others = [_without_resource(sim.world.complete_job(
                sim.world.start_job()["Data"]["GUID"])) for _ in range(5)]
            hook.held = start_raw = orjson.dumps(start)
            done_raw = orjson.dumps(done)
            other_raws = [orjson.dumps(o) for o in others]
            assert b"ResourceID" not in start_raw + done_raw + b"".join(other_raws)
            try:
                assert sim.emit(start) == start_raw and sim.emit(done) == done_raw
                for o in others:
                    sim.emit(o)
                # every unrelated job got through the second slot while the start was held
                await wait_until(lambda: set(other_raws) <= set(hook.answered), timeout=10,
                                 what="the other jobs delivered while the start is held")
                assert hook.holding
            finally:
                hook.release.set()
            await wait_until(lambda: stats.delivered == base_n + 7, timeout=10,
                             what="everything delivered")
    posted = hook.bodies[base_n:]
    assert sorted(posted) == sorted([start_raw, done_raw, *other_raws])  # each once
    assert start_raw in hook.answered_before[done_raw], \
        "the completion was sent while its start was in flight"
    # the sink was not simply serial: the other jobs were answered before the start was
    assert hook.answered.index(start_raw) > max(hook.answered.index(o) for o in other_raws)
