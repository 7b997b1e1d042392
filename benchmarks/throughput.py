"""End-to-end throughput: the daemon with a file sink against naive forwarders, one stream.

    .venv/bin/python benchmarks/throughput.py [--events 200000] [--repeat 3]

A sender process (the simulator, rate 0) pre-encodes N realistic events (~850 bytes, mixed
types) and blasts them to each client that logs in. Each receiver runs in its own process so
that CPU time and peak RSS are its own:

- ``naive-websockets``: log in, ``recv``, ``orjson.loads``, append the line (websockets client);
- ``naive-aiohttp``: the same loop on aiohttp's websocket client;
- ``daemon``: cometstream's Daemon with one file sink (format ``event``).

Rate = events / (last line written - first frame received). Printed as a table with the ratio
daemon / fastest naive loop. Numbers on a shared 2-core machine are noisy: compare ratios within
one run, and take the best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

USER = "bench"
PASSWORD = "bench pass"
ROOT = Path(__file__).resolve().parent.parent


# --- sender ---------------------------------------------------------------------------------------
async def serve(n: int) -> None:
    import structlog

    from cometstream.simulator import Simulator

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))

    sim = Simulator(username=USER, password=PASSWORD, rate=0, seed=1, record=False,
                    queue_limit=n + 1000)
    frames = [orjson.dumps(sim.world.next_event()) for _ in range(n)]
    await sim.start("127.0.0.1", 0)
    print(json.dumps({"url": sim.url, "bytes": sum(map(len, frames)) / n}), flush=True)
    served = 0
    try:
        while True:
            await sim.wait_for_clients(1, timeout=3600)
            served += 1
            for i in range(0, n, 5000):
                for f in frames[i:i + 5000]:
                    sim.emit(f)
                await asyncio.sleep(0)
            while sim.clients:
                await asyncio.sleep(0.05)
    finally:
        await sim.stop()


# --- receivers --------------------------------------------------------------------------------------
def _frames() -> list[str]:
    return [USER, "Password", PASSWORD, "", ""]


async def naive_aiohttp(url: str, n: int, out: Path) -> tuple[float, float]:
    import aiohttp

    ws_url = url.replace("http://", "ws://") + "api/v1/events/stream"
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url) as ws:
        for f in _frames():
            await ws.send_str(f)
        assert (await ws.receive()).data == "200 OK"
        with out.open("ab") as fh:
            first = 0.0
            for _ in range(n + 1):  # HELLO + n
                msg = await ws.receive()
                if not first:
                    first = time.perf_counter()
                orjson.loads(msg.data)
                fh.write(msg.data.encode() + b"\n")
        return first, time.perf_counter()


async def naive_websockets(url: str, n: int, out: Path) -> tuple[float, float]:
    import websockets

    ws_url = url.replace("http://", "ws://") + "api/v1/events/stream"
    async with websockets.connect(ws_url, max_size=None, compression=None) as ws:
        for f in _frames():
            await ws.send(f)
        assert await ws.recv() == "200 OK"
        with out.open("ab") as fh:
            first = 0.0
            for _ in range(n + 1):
                data = await ws.recv(decode=False)
                if not first:
                    first = time.perf_counter()
                orjson.loads(data)
                fh.write(data + b"\n")
        return first, time.perf_counter()


async def daemon(url: str, n: int, out: Path) -> tuple[float, float]:
    from cometstream.config import parse_config
    from cometstream.daemon import Daemon

    cfg = parse_config({
        "server": {"url": url, "username": USER, "password": PASSWORD},
        "http": {"listen": ""},
        # the sender builds its world before anyone connects: a resync would (rightly) find
        # those jobs already done; this measures the stream path, resync has its own figure
        "resync": {"enabled": False},
        "redact": {"enabled": os.environ.get("BENCH_REDACT", "1") == "1"},
        "state": {"dir": str(out.parent)},
        "sinks": {"file": {"type": "file", "path": str(out), "format": "event"}},
    }, env={})
    d = Daemon(cfg)
    done = asyncio.get_running_loop().create_future()
    times = {"first": 0.0}
    total = n + 1

    def on_ack(route: Any, batch: Any) -> None:
        if not times["first"]:
            times["first"] = time.perf_counter() - (time.time() - batch[0].received_at)
        if route.stats.delivered >= total and not done.done():
            done.set_result(time.perf_counter())

    d.pipeline.add_ack_listener(on_ack)
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    end = await done
    stop.set()
    await task
    return times["first"], end


RECEIVERS = {"naive-websockets": naive_websockets, "naive-aiohttp": naive_aiohttp,
             "daemon": daemon}


def receive(kind: str, url: str, n: int) -> None:
    import structlog

    if kind == "daemon":
        from cometstream.cli import _tune_gc

        _tune_gc()  # as `cometstream run` does

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.jsonl"
        cpu0 = time.process_time()
        try:
            import uvloop

            first, last = uvloop.run(RECEIVERS[kind](url, n, out))
        except ImportError:
            first, last = asyncio.run(RECEIVERS[kind](url, n, out))
        cpu = time.process_time() - cpu0
        lines = sum(1 for _ in out.open("rb"))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"kind": kind, "seconds": last - first, "rate": n / (last - first),
                      "cpu_per_100k": cpu / n * 100_000, "rss_mb": rss_mb, "lines": lines}))


# --- driver ---------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--receive", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(serve(args.events))
        return 0
    if args.receive:
        receive(args.receive, args.url, args.events)
        return 0

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    sender = subprocess.Popen([sys.executable, __file__, "--serve", "--events", str(args.events)],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert sender.stdout is not None
        info = json.loads(sender.stdout.readline())
        url = info["url"]
        print(f"{args.events} events of {info['bytes']:.0f} bytes on average, over 127.0.0.1; "
              f"best of {args.repeat}")
        best: dict[str, dict[str, Any]] = {}
        for _ in range(args.repeat):
            for kind in RECEIVERS:
                res = json.loads(subprocess.run(
                    [sys.executable, __file__, "--receive", kind, "--url", url, "--events",
                     str(args.events)], capture_output=True, text=True, env=env, check=True,
                ).stdout)
                assert res["lines"] == args.events + 1, res
                if kind not in best or res["rate"] > best[kind]["rate"]:
                    best[kind] = res
    finally:
        sender.terminate()
        sender.wait(10)
    fastest = max(best["naive-aiohttp"]["rate"], best["naive-websockets"]["rate"])
    print(f"{'receiver':<18} {'events/s':>10} {'CPU s/100k':>11} {'peak RSS MB':>12} {'vs fastest naive':>17}")
    for kind, r in best.items():
        print(f"{kind:<18} {r['rate']:>10,.0f} {r['cpu_per_100k']:>11.2f} {r['rss_mb']:>12.1f} "
              f"{r['rate'] / fastest:>16.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
