"""The webhook sink against a receiver at internet latency, and one that fails each event once.

    .venv/bin/python benchmarks/webhook.py [--quick] [--latency 0.05]

Two processes: this driver runs the simulator and the daemon (as ``cometstream run`` builds
it: default ``[spool]``, i.e. the ledger on disk, a webhook sink with ``batch = 1`` and
``types`` = the two job event types, a file sink beside it); the receiver, an aiohttp server in
a second process, answers every POST after ``--latency`` seconds and records what it got.

1. **Throughput at latency**: a burst of job events (starts and completions of the same jobs,
   as after a nightly backup window) emitted at once; rate = events / (first emitted → last
   acknowledged by the webhook sink). Rows: ``concurrency = 1`` (one POST at a time, what the
   sink did before it had the option), the default, 8 and 64. The receiver checks per-job order
   (a job's completion never accepted before its start) and counts what it accepted twice.
2. **Fail-once receiver**: 300 job events; the first POST of each event is answered 503, or 429
   with ``Retry-After: 1``, or held past the sink's 2 s ``timeout``, each for a fifth of the
   events (by the event's ``Idempotency-Key``), every later POST 200. Time until all 300 are
   accepted, and when the file sink beside it had them.

Nothing is asserted; on a shared 2-core VM the figures are noisy. ``--quick``: smaller bursts.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

USER = "bench"
PASSWORD = "bench pass"
ROOT = Path(__file__).resolve().parent.parent


# --- the receiver (its own process) --------------------------------------------------------------
def receiver_main(port_file: str, latency: float, mode: str) -> None:
    import orjson
    from aiohttp import web

    seen: dict[str, int] = {}  # Idempotency-Key -> attempts
    accepted: dict[str, int] = {}  # Idempotency-Key -> accepted POSTs
    started: set[str] = set()  # job GUIDs whose start was accepted
    state = {"order_violations": 0, "requests": 0}

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        key = request.headers.get("Idempotency-Key", "")
        state["requests"] += 1
        attempt = seen.get(key, 0)
        seen[key] = attempt + 1
        await asyncio.sleep(latency)
        if mode == "failonce" and attempt == 0:
            kind = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 5
            if kind == 0:
                return web.Response(status=503, text="busy")
            if kind == 1:
                return web.Response(status=429, headers={"Retry-After": "1"})
            if kind == 2:
                await asyncio.sleep(3.0)  # past the sink's 2 s timeout
        doc = orjson.loads(body)
        data = doc.get("Data") if isinstance(doc, dict) else None
        if isinstance(data, dict) and data.get("GUID"):
            if doc.get("Type") == 4200:
                started.add(data["GUID"])
            elif (doc.get("Type") == 4201 and data.get("StartTime")
                  and data["GUID"] in jobs_started and data["GUID"] not in started):
                state["order_violations"] += 1
        accepted[key] = accepted.get(key, 0) + 1
        return web.Response(status=200)

    jobs_started: set[str] = set()  # GUIDs the driver says it started in this run

    async def expect(request: web.Request) -> web.Response:
        jobs_started.update(await request.json())
        return web.Response(status=204)

    async def report(request: web.Request) -> web.Response:
        return web.json_response({
            "requests": state["requests"], "accepted_events": len(accepted),
            "accepted_twice": sum(1 for n in accepted.values() if n > 1),
            "order_violations": state["order_violations"]})

    async def reset(request: web.Request) -> web.Response:
        seen.clear()
        accepted.clear()
        started.clear()
        jobs_started.clear()
        state.update(order_violations=0, requests=0)
        return web.Response(status=204)

    async def main() -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/hook", hook)
        app.router.add_post("/expect", expect)
        app.router.add_get("/report", report)
        app.router.add_post("/reset", reset)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        Path(port_file).write_text(str(port))
        await asyncio.Event().wait()

    try:
        import uvloop
        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


# --- the driver ------------------------------------------------------------------------------------
class Receiver:
    def __init__(self, tmp: Path, latency: float, mode: str) -> None:
        port_file = tmp / f"port-{mode}"
        self.proc = subprocess.Popen([sys.executable, __file__, "--receiver", str(port_file),
                                      "--latency", str(latency), "--mode", mode])
        deadline = time.monotonic() + 20
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("receiver did not start")
            time.sleep(0.05)
        self.base = f"http://127.0.0.1:{port_file.read_text()}"

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        import aiohttp
        async with aiohttp.ClientSession() as s, s.request(method, self.base + path,
                                                           json=body) as r:
            return await r.json() if r.status == 200 else None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _quiet() -> None:
    import logging

    import structlog
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


async def run_burst(tmp: Path, rx: Receiver, n: int, opts: dict[str, Any],
                    timeout: float = 600.0) -> dict[str, Any]:
    from cometstream.config import parse_config
    from cometstream.daemon import Daemon
    from cometstream.simulator import Simulator
    from cometstream.sinks import resolve_sink_class

    await rx.call("POST", "/reset")
    sim = Simulator(username=USER, password=PASSWORD, rate=0.0, seed=7, record=False)
    await sim.start()
    run = tmp / f"run-{time.monotonic_ns()}"
    run.mkdir()
    cfg = parse_config({
        "server": {"url": sim.url, "username": USER, "password": PASSWORD, "name": "bench"},
        "stream": {"backoff_initial": 0.05, "backoff_max": 0.2},
        "http": {"listen": ""},
        "state": {"dir": str(run / "state")},
        "sinks": {
            "hook": {"type": "webhook", "url": rx.base + "/hook", "batch": 1,
                     "types": ["SEVT_JOB_NEW", "SEVT_JOB_COMPLETED"], "buffer": 100000, **opts},
            "file": {"type": "file", "path": str(run / "events.jsonl"), "format": "event",
                     "types": ["SEVT_JOB_NEW", "SEVT_JOB_COMPLETED"], "buffer": 100000},
        },
    }, env={}, resolve_sink=resolve_sink_class)
    d = Daemon(cfg, resync_retry=(0.05, 0.2))
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    try:
        while d.resyncs_ok < 1:
            await asyncio.sleep(0.02)
        hook, file = d.metrics.sinks["hook"], d.metrics.sinks["file"]
        while hook.delivered < file.delivered or d.pipeline.routes[0].depth:
            await asyncio.sleep(0.02)
        base_hook, base_file = hook.delivered, file.delivered
        world = sim.world
        events, guids = [], []
        while len(events) < n:
            if world.running and (not world._can_start() or world.rng.random() < 0.5):
                events.append(world.complete_job())
            else:
                ev = world.start_job()
                guids.append(ev["Data"]["GUID"])
                events.append(ev)
        await rx.call("POST", "/expect", guids)
        t0 = time.perf_counter()
        for ev in events:
            sim.emit(ev)
        file_done = 0.0
        deadline = t0 + timeout
        while hook.delivered - base_hook < n:
            if not file_done and file.delivered - base_file >= n:
                file_done = time.perf_counter() - t0
            if time.perf_counter() > deadline:
                break
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - t0
        if not file_done:
            file_done = elapsed
        got = hook.delivered - base_hook
        rejected = hook.dropped["rejected"]
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await sim.stop()
    rep = await rx.call("GET", "/report")
    return {"n": n, "delivered": got, "seconds": elapsed, "rate": got / elapsed,
            "file_seconds": file_done, "rejected": rejected, **rep}


async def amain(args: argparse.Namespace) -> None:
    from cometstream.sinks.webhook import DEFAULT_CONCURRENCY

    _quiet()
    scale = 5 if args.quick else 1
    with tempfile.TemporaryDirectory(prefix="cometstream-bench-") as t:
        tmp = Path(t)
        rx = Receiver(tmp, args.latency, "plain")
        try:
            rows = [
                ("concurrency = 1 (serial)", 200 // scale, {"concurrency": 1}),
                (f"default (concurrency = {DEFAULT_CONCURRENCY})", 3000 // scale, {}),
                ("concurrency = 8", 2000 // scale, {"concurrency": 8}),
                ("concurrency = 64", 10000 // scale, {"concurrency": 64}),
            ]
            print(f"webhook sink, batch = 1, receiver latency {args.latency * 1000:g} ms, "
                  "a burst of job starts and completions")
            print(f"{'settings':<32} {'events':>7} {'seconds':>8} {'events/s':>9} "
                  f"{'POSTs':>6} {'twice':>6} {'order':>6}")
            serial = 0.0
            for label, n, opts in rows:
                r = await run_burst(tmp, rx, n, opts)
                serial = serial or r["rate"]
                print(f"{label:<32} {r['delivered']:>7} {r['seconds']:>8.2f} {r['rate']:>9.1f} "
                      f"{r['requests']:>6} {r['accepted_twice']:>6} {r['order_violations']:>6}"
                      f"   ({r['rate'] / serial:.1f}x serial)")
        finally:
            rx.stop()
        rx = Receiver(tmp, 0.0, "failonce")
        try:
            r = await run_burst(tmp, rx, 300, {"timeout": 2.0}, timeout=300)
            print()
            print("fail-once receiver (503 / 429 Retry-After: 1 / hang past the 2 s timeout, "
                  "each on a fifth of the events), 300 job events, default settings:")
            print(f"  accepted {r['accepted_events']} of 300 in {r['seconds']:.1f} s "
                  f"({r['requests']} POSTs, {r['rejected']} dead-lettered, "
                  f"{r['order_violations']} order violations); the file sink beside it had all "
                  f"300 after {r['file_seconds']:.2f} s")
        finally:
            rx.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a fifth of the bursts")
    ap.add_argument("--latency", type=float, default=0.05, help="receiver latency, seconds")
    ap.add_argument("--receiver", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="plain", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.receiver:
        receiver_main(args.receiver, args.latency, args.mode)
        return 0
    sys.path.insert(0, str(ROOT))
    asyncio.run(amain(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
