"""How long a remedial sync takes to deliver N job completions missed during a gap.

    .venv/bin/python benchmarks/resync.py [--jobs 100000]

The simulator runs in a separate process: it builds a world, lets a daemon (this process, file
sink, format event) connect once for its baseline, then completes N jobs while refusing logins
(the gap), then lets it back in. Printed: the time from the reconnect's HELLO to the last
synthesized completion written, the rate, and the API response sizes involved.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

USER, PASSWORD = "bench", "bench pass"
ROOT = Path(__file__).resolve().parent.parent


async def serve(n: int) -> None:
    import structlog

    from cometstream.simulator import Simulator

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    # the daemon's refused logins during the gap end as reset connections: not news here
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    sim = Simulator(username=USER, password=PASSWORD, rate=0, seed=1, record=False)
    sim.world.max_jobs = 2 * n + 50_000  # keep every gap job in the world's history
    await sim.start("127.0.0.1", 0)
    print(json.dumps({"url": sim.url}), flush=True)
    await sim.wait_for_clients(1, timeout=60)
    # The measuring side says when its baseline sync is done (a fixed sleep raced with a slow
    # machine: the drop could come before the baseline ended, and the measure waited forever).
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    sim.faults.reject_logins = True
    await sim.drop_clients()
    t0 = time.perf_counter()
    for _ in range(n):
        guid = sim.world.start_job()["Data"]["GUID"]
        sim.world.complete_job(guid)
    print(json.dumps({"gap_jobs": n, "built_in": time.perf_counter() - t0}), flush=True)
    sim.faults.reject_logins = False
    await asyncio.sleep(3600)


async def measure(url: str, n: int, out: Path, go: Callable[[], None]) -> dict[str, float]:
    from cometstream.config import parse_config
    from cometstream.daemon import Daemon
    from cometstream.sinks import resolve_sink_class

    cfg = parse_config({
        "server": {"url": url, "username": USER, "password": PASSWORD},
        "stream": {"backoff_initial": 0.05, "backoff_max": 0.2},
        "http": {"listen": ""},
        "state": {"dir": str(out.parent / "state")},
        "sinks": {"file": {"type": "file", "path": str(out), "format": "event", "buffer": 200000}},
    }, env={}, resolve_sink=resolve_sink_class)
    d = Daemon(cfg, resync_retry=(0.05, 0.2))
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    while d.resyncs_ok < 1:
        await asyncio.sleep(0.05)
    base = d.metrics.sinks["file"].delivered
    go()
    while d.metrics.stream.received.get(4000, 0) < 2:
        await asyncio.sleep(0.005)
    t0 = time.perf_counter()
    deadline = t0 + 600
    while d.metrics.sinks["file"].delivered - base < n + 1:
        if time.perf_counter() > deadline:
            raise SystemExit(f"only {d.metrics.sinks['file'].delivered - base - 1} of {n} "
                             "delivered after 600 s")
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - t0
    res = d.last_resync
    stop.set()
    await task
    return {"seconds": elapsed, "rate": n / elapsed,
            "synthesized": float(res.count if res else 0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(serve(args.jobs))
        return 0
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    sender = subprocess.Popen([sys.executable, __file__, "--serve", "--jobs", str(args.jobs)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert sender.stdout is not None
        url = json.loads(sender.stdout.readline())["url"]
        import structlog

        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
        with tempfile.TemporaryDirectory() as tmp:
            def go() -> None:
                assert sender.stdin is not None
                sender.stdin.write("go\n")
                sender.stdin.flush()

            res = asyncio.run(measure(url, args.jobs, Path(tmp) / "out.jsonl", go))
    finally:
        sender.terminate()
        sender.wait(10)
    print(f"resync of {args.jobs:,} job completions missed during a gap: "
          f"{res['seconds']:.2f} s from the HELLO to the last one written "
          f"({res['rate']:,.0f} jobs/s; {res['synthesized']:,.0f} synthesized; "
          f"daemon peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
