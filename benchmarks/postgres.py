"""The postgres sink against a private local PostgreSQL (initdb + pg_ctl, as the tests start it).

    .venv/bin/python benchmarks/postgres.py [--burst 20000] [--paced 1000] [--jobs 1000000]

One driver process runs the simulator and the daemon (as ``cometstream run`` builds it: the
ledger on disk, the postgres sink with its defaults, a file sink with ``format = "event"`` beside
it); PostgreSQL runs as its own server (``fsync = off``: the figures are the sink's, not this
VM's disk).

1. **Burst**: N job completions (the simulator's, each a different job) emitted at once; rate =
   N / (first emitted -> the last committed by the sink); the file sink's time beside it. The
   tables are then counted: every completion one row in ``events`` and one in ``jobs``.
2. **Paced**: events at 100/s (a busy Comet Server's evening, job starts and completions);
   delivery latency = (the sink's transaction committed) - (the daemon received the event),
   p50 / p99 / max.
3. **Reports**: ``jobs`` filled with ``--jobs`` rows (COPY; 2,000 users with 3 devices each, a
   year), ``devices`` from them as the sink's upgrade fills it, ``VACUUM ANALYZE``;
   each SQL query of ``docs/reporting.md`` run 5 times, median milliseconds.

Nothing is asserted; on a shared 2-core VM the figures are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
USER = "bench"
PASSWORD = "bench pass"


def _quiet() -> None:
    import logging

    import structlog
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


async def _daemon(run: Path, sim_url: str, dsn: str, pwfile: Path) -> Any:
    from cometstream.config import parse_config
    from cometstream.daemon import Daemon
    from cometstream.sinks import resolve_sink_class

    cfg = parse_config({
        "server": {"url": sim_url, "username": USER, "password": PASSWORD, "name": "bench"},
        "stream": {"backoff_initial": 0.05, "backoff_max": 0.2},
        "http": {"listen": ""},
        "state": {"dir": str(run / "state")},
        "sinks": {
            "pg": {"type": "postgres", "dsn": dsn, "password_file": str(pwfile),
                   "buffer": 100000},
            "file": {"type": "file", "path": str(run / "events.jsonl"), "format": "event",
                     "buffer": 100000},
        },
    }, env={}, resolve_sink=resolve_sink_class)
    return Daemon(cfg, resync_retry=(0.05, 0.2))


async def _settled(d: Any) -> None:
    while d.resyncs_ok < 1:
        await asyncio.sleep(0.02)
    pg, file = d.metrics.sinks["pg"], d.metrics.sinks["file"]
    while pg.delivered < file.delivered or any(r.depth for r in d.pipeline.routes):
        await asyncio.sleep(0.02)


def _timed(sink: Any, latencies: list[float]) -> None:
    """Record each event's (committed - received) as the sink's send returns."""
    send = sink.send

    async def timed_send(batch: Sequence[Any]) -> None:
        await send(batch)
        now = time.time()
        latencies.extend(now - ev.received_at for ev in batch)

    sink.send = timed_send


@asynccontextmanager
async def _running(run: Path, pg: Any, pwfile: Path, seed: int,
                   queue_limit: int = 10_000) -> AsyncIterator[tuple[Any, Any]]:
    """The simulator and the daemon, settled (the baseline sync done, the queues empty)."""
    from cometstream.simulator import Simulator

    sim = Simulator(username=USER, password=PASSWORD, rate=0.0, seed=seed, record=False,
                    queue_limit=queue_limit)
    await sim.start()
    run.mkdir()
    d = await _daemon(run, sim.url, pg.dsn, pwfile)
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    try:
        await _settled(d)
        yield sim, d
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await sim.stop()


async def burst(tmp: Path, pg: Any, pwfile: Path, n: int) -> dict[str, Any]:
    # (the whole burst fits in the simulator's queue for one client: a drop is not measured)
    async with _running(tmp / "burst", pg, pwfile, seed=7, queue_limit=n + 1000) as (sim, d):
        pgs, file = d.metrics.sinks["pg"], d.metrics.sinks["file"]
        base_pg, base_file = pgs.delivered, file.delivered
        world = sim.world
        events = []
        while len(events) < n:
            world.start_job()
            events.append(world.complete_job())
        t0 = time.perf_counter()
        for ev in events:
            sim.emit(ev)
        file_done = 0.0
        while pgs.delivered - base_pg < n:
            if not file_done and file.delivered - base_file >= n:
                file_done = time.perf_counter() - t0
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - t0
        while not file_done and file.delivered - base_file < n:
            await asyncio.sleep(0.005)
        file_done = file_done or time.perf_counter() - t0
    jobs = pg.query("SELECT count(*) FROM cometstream_jobs WHERE end_time IS NOT NULL")[0][0]
    completions = pg.query("SELECT count(*) FROM cometstream_events WHERE type = 4201")[0][0]
    return {"seconds": elapsed, "rate": n / elapsed, "file_seconds": file_done,
            "jobs": jobs, "completions": completions}


async def paced(tmp: Path, pg: Any, pwfile: Path, n: int, rate: float) -> list[float]:
    latencies: list[float] = []
    async with _running(tmp / "paced", pg, pwfile, seed=8) as (sim, d):
        _timed(d.sinks["pg"], latencies)
        world = sim.world
        pgs = d.metrics.sinks["pg"]
        base = pgs.delivered
        t0 = time.perf_counter()
        for i in range(n):
            if world.running and (not world._can_start() or world.rng.random() < 0.5):
                sim.emit(world.complete_job())
            else:
                sim.emit(world.start_job())
            delay = t0 + (i + 1) / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        while pgs.delivered - base < n:
            await asyncio.sleep(0.005)
    return latencies[-n:]


def _report_queries() -> list[tuple[str, str]]:
    text = (ROOT / "docs" / "reporting.md").read_text()
    found = []
    title = ""
    for block in re.split(r"^(## .*)$", text, flags=re.MULTILINE):
        if block.startswith("## "):
            title = block[3:].strip()
            continue
        for sql in re.findall(r"```sql\n(.*?)```", block, flags=re.DOTALL):
            name = title or "query"
            if any(t == name for t, _ in found):
                name += f" ({sum(t.startswith(name) for t, _ in found) + 1})"
            found.append((name, sql.strip().rstrip(";")))
    return found


_DEVICES_FILL = """INSERT INTO cometstream_devices
    SELECT server, username, device_id, max(start_time), max(end_time),
           max(end_time) FILTER (WHERE status = 5000 AND classification = 4001),
           (array_agg(status ORDER BY end_time DESC) FILTER (WHERE end_time IS NOT NULL))[1]
    FROM cometstream_jobs GROUP BY server, username, device_id"""


def reports(pg: Any, jobs: int) -> list[tuple[str, float, int]]:
    import psycopg

    from tests.pgserver import PG_PASSWORD

    users, devices_per_user, days = 2000, 3, 365  # a year of a large MSP's history
    now = int(time.time())
    with psycopg.connect(pg.dsn, password=PG_PASSWORD, autocommit=True) as conn:
        conn.execute("TRUNCATE cometstream_jobs")
        with conn.cursor() as cur, cur.copy(
                "COPY cometstream_jobs (server, job_id, username, device_id, classification, "
                "status, status_name, start_time, end_time, total_size, upload_size) "
                "FROM STDIN") as copy:
            for i in range(jobs):
                u = i % users
                start = now - days * 86400 + (i * 86400 * days) // jobs
                running = i >= jobs - 200
                if running and i % 4 == 0:  # some running for more than 12 hours
                    start = now - 13 * 3600 - i % 3600
                failed = i % 23 == 0 or u % 97 == 0  # a few users' backups fail every time
                status = 6001 if running else (7003 if failed else 5000)
                copy.write_row((
                    "bench", f"job-{i:08d}", f"user{u:04d}",
                    f"dev-{u:04d}-{i % devices_per_user}", 4001, status,
                    "running" if running else ("failed" if failed else "success"),
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(start))}+00",
                    None if running else
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(start + 1800))}+00",
                    10_000_000 + i, 100_000 + i % 977))
        conn.execute("TRUNCATE cometstream_devices")
        conn.execute(_DEVICES_FILL)  # what the sink's upgrade fills it with, from the jobs
        conn.execute("VACUUM ANALYZE cometstream_jobs")
        conn.execute("ANALYZE cometstream_devices")
        conn.execute("VACUUM ANALYZE cometstream_events")
        out = []
        for title, sql in _report_queries():
            times = []
            rows = 0
            for _ in range(5):
                t0 = time.perf_counter()
                rows = len(conn.execute(sql).fetchall())  # type: ignore[call-overload]
                times.append((time.perf_counter() - t0) * 1000)
            out.append((title, statistics.median(times), rows))
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def amain(args: argparse.Namespace) -> None:
    from tests.pgserver import PG_PASSWORD, bindir, private_postgres

    _quiet() if not args.verbose else None
    where = bindir()
    if where is None:
        sys.exit("PostgreSQL server binaries (initdb, pg_ctl) not found: apt install postgresql")
    with tempfile.TemporaryDirectory(prefix="cometstream-bench-") as t, \
            private_postgres(where) as pg:
        tmp = Path(t)
        pwfile = tmp / "pw"
        pwfile.write_text(PG_PASSWORD + "\n")
        pwfile.chmod(0o600)
        if args.burst:
            r = await burst(tmp, pg, pwfile, args.burst)
            print(f"burst: {args.burst:,} job completions into the postgres sink (defaults): "
                  f"{r['seconds']:.2f} s, {r['rate']:,.0f} rows/s; the file sink beside it "
                  f"{r['file_seconds']:.2f} s ({args.burst / r['file_seconds']:,.0f} events/s, "
                  f"postgres/file {r['file_seconds'] / r['seconds']:.2f}x); tables: "
                  f"{r['completions']:,} completion events, {r['jobs']:,} finished jobs")
        if args.paced:
            lat = await paced(tmp, pg, pwfile, args.paced, 100.0)
            print(f"paced: {len(lat):,} job events at 100/s: received -> committed "
                  f"p50 {_pct(lat, 0.5):.1f} ms, p99 {_pct(lat, 0.99):.1f} ms, "
                  f"max {max(lat) * 1000:.1f} ms")
        if args.jobs:
            from cometstream.config import Section
            from cometstream.sinks.postgres import PostgresSink

            sink = PostgresSink.from_config("pg", Section(  # the tables, as the sink makes them
                {"dsn": pg.dsn, "password_file": str(pwfile)}, "sinks.pg"))
            await sink.open()
            await sink.aclose()
            t0 = time.perf_counter()
            found = reports(pg, args.jobs)
            print(f"reports: {args.jobs:,} jobs ({time.perf_counter() - t0:.0f} s to fill), "
                  "median of 5 runs:")
            for title, ms, rows in found:
                print(f"  {ms:8.1f} ms  {rows:>6} rows  {title}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verbose", action="store_true", help="the daemon's log lines")
    ap.add_argument("--burst", type=int, default=20000, help="completions in the burst (0: skip)")
    ap.add_argument("--paced", type=int, default=1000, help="events at 100/s (0: skip)")
    ap.add_argument("--jobs", type=int, default=1_000_000,
                    help="jobs in the table for the report queries (0: skip)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    asyncio.run(amain(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
