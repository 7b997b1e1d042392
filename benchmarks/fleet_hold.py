"""The memory the fleet takes while its read of the API hangs and large events keep coming.

    .venv/bin/python benchmarks/fleet_hold.py [--events 200] [--size 1048576]

The simulator runs in a separate process. The daemon (this process: ``[fleet]`` on, a file sink
that takes only job completions) connects, syncs and seeds; then the simulator stops answering
``dispatcher/list-active`` (the last call of the fleet's read) and drops the connection, so the
reconnect's read hangs; it sends ``--events`` account updates whose profile is ``--size``
bytes of JSON (a user with as many protected items as that takes); then it answers again.
Printed: the daemon's resident memory before, its peak while the read hung (sampled every
20 ms from /proc) and after the read made again is in, and the reads. ``--daemon-root`` runs
the daemon from another checkout (the simulator stays this one's), to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _memory import PeakRss, rss_mb  # (benchmarks/, this script's folder)

USER, PASSWORD = "bench", "bench pass"
ROOT = Path(__file__).resolve().parent.parent
STALL = "/api/v1/admin/dispatcher/list-active"


def _grow(profile: dict[str, Any], size: int) -> None:
    """``profile``'s protected items copied until its JSON is about ``size`` bytes."""
    import copy

    import orjson

    sources = profile["Sources"]
    model = copy.deepcopy(next(iter(sources.values())))
    each = len(orjson.dumps(model)) + 40
    have = len(orjson.dumps(profile))
    for i in range(max(0, (size - have) // each)):
        sources[f"{i:08x}-0000-4000-8000-{i:012x}"] = copy.deepcopy(model)


async def serve(events: int, size: int) -> None:
    import structlog

    from cometstream.simulator import Simulator

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    sim = Simulator(username=USER, password=PASSWORD, rate=0, seed=1, record=False)
    user = next(iter(sim.world.users))
    _grow(sim.world.users[user], size)
    await sim.start("127.0.0.1", 0)
    print(json.dumps({"url": sim.url}), flush=True)
    await sim.wait_for_clients(1, timeout=60)
    stdin = asyncio.get_running_loop()
    await stdin.run_in_executor(None, sys.stdin.readline)  # the baseline is in
    asked = sim.api_calls[STALL]
    sim.faults.api_stall = frozenset({STALL})
    await sim.drop_clients()
    while sim.api_calls[STALL] == asked:  # the reconnect's read reached its last call
        await asyncio.sleep(0.01)
    sent = sum(len(sim.emit(sim.world.update_account(user))) for _ in range(events))
    print(json.dumps({"sent": events, "bytes": sent}), flush=True)
    await stdin.run_in_executor(None, sys.stdin.readline)  # the daemon has them all
    sim.faults.api_stall = frozenset()
    await asyncio.sleep(3600)


async def measure(url: str, events: int, tmp: Path, go: Callable[[], dict[str, Any]],
                  release: Callable[[], None]) -> dict[str, float]:
    from cometstream.config import parse_config
    from cometstream.daemon import Daemon
    from cometstream.sinks import resolve_sink_class

    cfg = parse_config({
        "server": {"url": url, "username": USER, "password": PASSWORD},
        "stream": {"backoff_initial": 0.05, "backoff_max": 0.2},
        "http": {"listen": "127.0.0.1:0"},
        "state": {"dir": str(tmp / "state")},
        "fleet": {"enabled": True},
        "sinks": {"file": {"type": "file", "path": str(tmp / "out.jsonl"),
                           "types": ["SEVT_JOB_COMPLETED"]}},
    }, env={}, resolve_sink=resolve_sink_class)
    d = Daemon(cfg, resync_retry=(0.05, 0.2))
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    fleet = d.fleet
    assert fleet is not None
    while d.resyncs_ok < 1 or fleet.seeds["ok"] < 1:
        await asyncio.sleep(0.05)
    seeds = fleet.seeds["ok"]
    rss = PeakRss()
    before = rss.before
    rss.start()
    base = d.metrics.stream.events_received
    sent = await asyncio.get_running_loop().run_in_executor(None, go)
    t0 = time.perf_counter()
    while d.metrics.stream.events_received < base + 1 + events:  # (+ the HELLO)
        if time.perf_counter() - t0 > 600:
            raise SystemExit("the events did not all arrive within 600 s")
        await asyncio.sleep(0.01)
    hung = rss.peak
    release()
    while fleet.seeds["ok"] <= seeds or fleet.seeding:
        await asyncio.sleep(0.02)
    await asyncio.sleep(1)
    rss.stop()
    after = rss_mb()
    stop.set()
    await task
    return {"before": before, "hung": hung, "peak": rss.peak, "after": after,
            "bytes": float(sent["bytes"]), "seeds": float(fleet.seeds["ok"] - seeds)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200)
    ap.add_argument("--size", type=int, default=1 << 20, help="bytes of each profile")
    ap.add_argument("--daemon-root", type=Path, default=ROOT,
                    help="the checkout whose cometstream the daemon runs")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        sys.path.insert(0, str(ROOT))
        asyncio.run(serve(args.events, args.size))
        return 0
    sys.path.insert(0, str(args.daemon_root.resolve()))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    sender = subprocess.Popen([sys.executable, __file__, "--serve", "--events", str(args.events),
                               "--size", str(args.size)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert sender.stdin is not None and sender.stdout is not None
        url = json.loads(sender.stdout.readline())["url"]
        import structlog

        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))

        def say() -> None:
            assert sender.stdin is not None
            sender.stdin.write("go\n")
            sender.stdin.flush()

        def go() -> dict[str, Any]:
            say()
            assert sender.stdout is not None
            return json.loads(sender.stdout.readline())  # type: ignore[no-any-return]

        with tempfile.TemporaryDirectory() as tmp:
            res = asyncio.run(measure(url, args.events, Path(tmp), go, say))
    finally:
        sender.terminate()
        sender.wait(10)
    print(f"fleet read hung while {args.events} account events of "
          f"{res['bytes'] / args.events / 2**20:.2f} MiB arrived "
          f"({res['bytes'] / 2**20:.0f} MiB): daemon RSS {res['before']:.0f} MB before, "
          f"peak {res['hung']:.0f} MB while hung, peak {res['peak']:.0f} MB over the run, "
          f"{res['after']:.0f} MB after; {res['seeds']:.0f} reads once it answered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
