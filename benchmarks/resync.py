"""How long a remedial sync takes to deliver N job completions missed during a gap, and the
memory it takes.

    .venv/bin/python benchmarks/resync.py [--jobs 100000] [--hours 2]

The simulator runs in a separate process: it builds a world, lets a daemon (this process, file
sink, format event) connect once for its baseline, then, while refusing logins (the gap),
completes N jobs spread evenly over ``--hours`` of the server's clock (which then moves on by as
much: the gap lasted that long), then lets it back in. Printed: the time from the reconnect's
HELLO to the last synthesized completion written, the rate, the job-list calls and the largest
answer, the daemon's resident memory before the gap, at its peak during the sync (sampled every
20 ms from /proc), and a few seconds after it; and its peak RSS over the whole run.

The simulator is on this machine, so the daemon asks it for plain answers (``[server] api_gzip
= "auto"``); ``--api-gzip always`` measures gzip'd answers, as from a server elsewhere.

The daemon runs with the interpreter settings ``cometstream run`` applies
(``runtime.tune_for_daemon``); ``BENCH_TUNING=none|gc|switch`` runs it without (some of) them.
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

from _memory import PeakRss, rss_mb  # (benchmarks/, this script's folder)
from _tuning import TUNINGS, tune

USER, PASSWORD = "bench", "bench pass"
ROOT = Path(__file__).resolve().parent.parent


async def serve(n: int, hours: float, users: int) -> None:
    import structlog

    from cometstream.simulator import Simulator

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    # the daemon's refused logins during the gap end as reset connections: not news here
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    offset = [0.0]  # the server's clock runs ahead by the gap once it is over

    def clock() -> float:
        return time.time() + offset[0]

    sim = Simulator(username=USER, password=PASSWORD, rate=0, seed=1, record=False, clock=clock)
    if users != 20:  # (the simulator's own world has 20)
        from cometstream.simulator.world import World

        sim.world = World(1, admin=USER, clock=clock, users=users, history_days=1)
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
    gap = hours * 3600
    begin = clock() + 1
    for i in range(n):
        started = int(begin + gap * i / n)
        guid = sim.world.start_job(now=started)["Data"]["GUID"]
        sim.world.complete_job(guid, now=started + i % 600)
    offset[0] = gap + 600
    # the world's time indexes are built once, here, as a real server's database has its own:
    # built lazily, at the sync's first span, they took several seconds of the measured time
    # (a million-job gap) while the daemon waited
    sim.world.jobs_for_date_range(int(begin), int(begin))
    print(json.dumps({"gap_jobs": n, "built_in": time.perf_counter() - t0}), flush=True)
    sim.faults.reject_logins = False
    await asyncio.sleep(3600)


async def measure(url: str, n: int, out: Path, go: Callable[[], None],
                  api_gzip: str = "auto") -> dict[str, float]:
    from cometstream.config import parse_config
    from cometstream.daemon import Daemon
    from cometstream.sinks import resolve_sink_class

    cfg = parse_config({
        "server": {"url": url, "username": USER, "password": PASSWORD, "api_gzip": api_gzip},
        "stream": {"backoff_initial": 0.05, "backoff_max": 0.2},
        "http": {"listen": ""},
        "state": {"dir": str(out.parent / "state")},
        "resync": {"timeout": 3600, "call_timeout": 600},
        "sinks": {"file": {"type": "file", "path": str(out), "format": "event"}},
    }, env={}, resolve_sink=resolve_sink_class)
    d = Daemon(cfg, resync_retry=(0.05, 0.2))
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    while d.resyncs_ok < 1:
        await asyncio.sleep(0.05)
    base = d.metrics.sinks["file"].delivered
    rss = PeakRss()
    before = rss.before
    go()
    while d.metrics.stream.received.get(4000, 0) < 2:
        await asyncio.sleep(0.005)
    rss.start()
    t0 = time.perf_counter()
    deadline = t0 + 3600
    while d.metrics.sinks["file"].delivered - base < n + 1 or d.resyncs_ok < 2:
        if time.perf_counter() > deadline:
            raise SystemExit(f"only {d.metrics.sinks['file'].delivered - base - 1} of {n} "
                             "delivered after 3600 s")
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - t0
    res = d.last_resync
    await asyncio.sleep(5)
    rss.stop()
    after = rss_mb()
    stop.set()
    await task
    return {"seconds": elapsed, "rate": n / elapsed,
            "synthesized": float(res.count if res else 0),
            "spans": float(res.spans if res else 0),
            "largest": float(res.largest_answer if res else 0),
            "split": float(res.split if res else 0),
            "before": before, "peak": rss.peak, "after": after}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--hours", type=float, default=2.0,
                    help="the gap's length on the server's clock, the jobs spread over it")
    ap.add_argument("--users", type=int, default=20,
                    help="users in the world (each sync reads all their profiles)")
    ap.add_argument("--api-gzip", choices=("auto", "always", "never"), default="auto",
                    help="[server] api_gzip: auto asks this machine's server for plain "
                         "answers; always measures gzip'd ones, as from a server elsewhere")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(serve(args.jobs, args.hours, args.users))
        return 0
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    sender = subprocess.Popen([sys.executable, __file__, "--serve", "--jobs", str(args.jobs),
                               "--hours", str(args.hours), "--users", str(args.users)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert sender.stdout is not None
        url = json.loads(sender.stdout.readline())["url"]
        import structlog

        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
        tuning = os.environ.get("BENCH_TUNING", "all")
        if tuning not in TUNINGS:
            ap.error(f"BENCH_TUNING={tuning!r}: one of all, gc, switch, none")
        tune(tuning)
        with tempfile.TemporaryDirectory() as tmp:
            def go() -> None:
                assert sender.stdin is not None
                sender.stdin.write("go\n")
                sender.stdin.flush()

            res = asyncio.run(measure(url, args.jobs, Path(tmp) / "out.jsonl", go, args.api_gzip))
    finally:
        sender.terminate()
        sender.wait(10)
    print(f"resync of {args.jobs:,} job completions missed during a {args.hours:g} h gap "
          f"(answers {'gzip' if args.api_gzip == 'always' else 'plain'}): "
          f"{res['seconds']:.2f} s from the HELLO to the last one written "
          f"({res['rate']:,.0f} jobs/s; {res['synthesized']:,.0f} synthesized; "
          f"{res['spans']:.0f} job-list calls, largest answer {res['largest'] / 2**20:.1f} MiB, "
          f"{res['split']:.0f} refused)\n"
          f"daemon RSS: {res['before']:.0f} MB before the gap, peak {res['peak']:.0f} MB during "
          f"the sync, {res['after']:.0f} MB 5 s after; peak over the run "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
