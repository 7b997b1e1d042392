"""The fleet metrics at scale: a scrape's time and the fleet state's memory.

    .venv/bin/python benchmarks/fleet.py [--users 10000 --items 30000] [--scrapes 20]

Builds the admin API's answers for a fleet of ``--users`` users with ``--items`` protected
items in all (each with its last and last successful job), two devices and one or two vaults
a user (a third of them with a quota), half the devices live-connected, and a day of jobs (one
per item); encodes them as JSON, then, under tracemalloc, parses them and seeds the fleet
state from them as the daemon does (the answers freed afterwards: what stays is the state).
Printed: the seed's time (parsing the answers and building the state), the state's memory,
a scrape's time (rendering the exposition from memory, the median of ``--scrapes``) with the
default labels (the exporter's) and with ``name_labels = false``, the same scrape through the
daemon's HTTP endpoint on 127.0.0.1 (gzip and plain, each the first time and then with a few
or many job completions since), the exposition's size, and the cost of applying one job
completion. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import sys
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cometstream.api import USERS_PATH, profile_map
from cometstream.config import FleetConfig
from cometstream.fleet.model import Model
from cometstream.fleet.render import render
from cometstream.simulator.world import job_detail

NOW = 1_796_000_000
ENGINES = ("engine1/file", "engine1/windisk", "engine1/mssql", "engine1/winmsofficemail")


def guid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def job(rng: random.Random, user: str, source: str, device: str, vault: str,
        status: int) -> dict[str, Any]:
    start = NOW - rng.randint(600, 86000)
    return job_detail(GUID=guid(rng), Username=user, Classification=4001, Status=status,
                      StartTime=start, EndTime=start + rng.randint(60, 7200), SourceGUID=source,
                      DestinationGUID=vault, DeviceID=device, ClientVersion="25.9.6",
                      TotalDirectories=rng.randint(10, 10**4), TotalFiles=rng.randint(10**4, 10**6),
                      TotalSize=rng.randint(10**9, 5 * 10**11), TotalChunks=rng.randint(1, 10**5),
                      UploadSize=rng.randint(10**6, 10**10), DownloadSize=rng.randint(0, 10**6))


def answers(users: int, items: int, seed: int = 1) -> tuple[bytes, bytes, bytes]:
    """(list-users-full, get-jobs-for-date-range of a day, dispatcher/list-active) as JSON."""
    rng = random.Random(seed)
    profiles: dict[str, Any] = {}
    jobs: list[dict[str, Any]] = []
    live: dict[str, Any] = {}
    per_user = [items // users + (1 if i < items % users else 0) for i in range(users)]
    for u, n_items in enumerate(per_user):
        name = f"user{u:05d}.example"
        devices = {f"{rng.getrandbits(160):040x}": {
            "FriendlyName": f"WS-{u:05d}-{d}", "RegistrationTime": NOW - 86400 * 30,
            "PlatformVersion": {"version": "10.0", "build": "19045", "os": "windows",
                                "arch": "amd64"},
            "DeviceTimezone": "UTC", "ClientVersion": rng.choice(("25.9.6", "25.9.6", "25.6.2"))}
            for d in range(2)}
        vaults = {}
        for _ in range(rng.choice((1, 2))):
            size = rng.randint(10**10, 2 * 10**12)
            limited = rng.random() < 0.33
            vaults[guid(rng)] = {"Description": "Comet Storage", "DestinationType": 1003,
                                 "StorageLimitEnabled": limited,
                                 "StorageLimitBytes": size * 2 if limited else 0,
                                 "Statistics": {"ClientProvidedSize": {
                                     "Size": size, "MeasureStarted": NOW - 90000,
                                     "MeasureCompleted": NOW - 90000}}}
        sources = {}
        dev_ids, vault_ids = list(devices), list(vaults)
        for i in range(n_items):
            source = guid(rng)
            device = dev_ids[i % 2]
            last = job(rng, name, source, device, rng.choice(vault_ids),
                       rng.choice((5000, 5000, 5000, 7001, 7002)))
            jobs.append(last)
            sources[source] = {"Engine": ENGINES[i % len(ENGINES)],
                               "Description": "Files and Folders", "OwnerDevice": device,
                               "CreateTime": NOW - 86400 * 30, "ModifyTime": NOW - 86400 * 30,
                               "Statistics": {"LastStartTime": last["StartTime"],
                                              "LastBackupJob": last,
                                              "LastSuccessfulBackupJob": last}}
        profiles[name] = {"Username": name, "AccountName": f"Customer {u}", "Emails": [],
                          "Destinations": vaults, "Sources": sources, "BackupRules": {},
                          "Devices": devices, "IsSuspended": False, "CreateTime": NOW - 86400 * 90}
        for device in dev_ids:
            if rng.random() < 0.5:
                live[guid(rng)] = {"Username": name, "DeviceID": device,
                                   "ReportedVersion": devices[device]["ClientVersion"],
                                   "ReportedPlatform": "windows/amd64", "ConnectionTime": NOW}
    return orjson.dumps(profiles), orjson.dumps(jobs), orjson.dumps(live)


def seed(raw: tuple[bytes, bytes, bytes], names: bool) -> Model:
    """What fleet.seed.read_fleet does with the answers (without the HTTP calls): the users'
    answer read one profile at a time, as the admin API client reads it."""
    users = asyncio.run(profile_map(raw[0], USERS_PATH))
    assert users is not None
    jobs, live = (orjson.loads(r) for r in raw[1:])
    model = Model(max_series=10**8, name_labels=names)
    model.version = "25.9.6"
    for name, profile in users.items():
        model.put_user(name, profile)
    for j in jobs:
        model.recent_job(j)
    model.replace_live(live)
    return model


def _completion(user: Any, at: int) -> dict[str, Any]:
    item = user.items[0]
    return {"GUID": "x", "Username": user.name, "SourceGUID": item.id,
            "DestinationGUID": user.vaults[0].id, "Status": 5000, "StartTime": at,
            "EndTime": at + 60, "TotalFiles": 1, "TotalSize": 2, "UploadSize": 3,
            "DownloadSize": 4, "DestinationSizeEnd": {"Size": 5, "MeasureCompleted": at}}


async def http_scrape(model: Model, repeat: int) -> dict[str, Any]:
    """Median wall time of GET /metrics through the daemon's HTTP server, as a scraper in
    another process sees it (curl; without it, a client in this process, which then competes
    with the server for the one thread): gzip the first time (everything compressed); gzip
    again after 5 job completions of random users (a quiet interval between scrapes) and after
    250 (a burst: many blocks of users changed); the same three for plain scrapes (the first
    renders the whole text, which is then kept while plain scrapes come); then the warm-up a
    seed is followed by (the whole text compressed ahead) and the first gzip scrape after
    it."""
    import shutil

    import aiohttp
    from prometheus_client import CollectorRegistry

    from cometstream.fleet.render import BlockCache, edges
    from cometstream.observe.http import HttpServer

    cache = BlockCache()
    lock = asyncio.Lock()  # (as the daemon's: one scrape at a time uses the cache)

    async def gzipped(prefix: bytes) -> bytes:
        async with lock:
            head, tail = edges(model, NOW, ())
            body = await cache.update(model, prefix + head, tail)
        assert body is not None
        return body

    async def plain(keep: bool) -> list[bytes]:
        async with lock:
            head, tail = edges(model, NOW, ())
            return cache.plain(model, head, tail, keep)

    server = HttpServer(CollectorRegistry(), list, host="127.0.0.1", port=0,
                        extra=plain, extra_gzip=gzipped)
    await server.start()
    curl = shutil.which("curl")
    rng = random.Random(3)
    users = list(model.users.values())
    at = NOW

    async def fetch(enc: str) -> tuple[float, int]:
        if curl:
            proc = await asyncio.create_subprocess_exec(
                curl, "-s", "-o", "/dev/null", "-H", f"Accept-Encoding: {enc}",
                "-w", "%{time_total} %{size_download}", server.url + "/metrics",
                stdout=asyncio.subprocess.PIPE)
            out, _ = await proc.communicate()
            took, got = out.split()
            return float(took), int(got)
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            t0 = time.perf_counter()
            async with http.get(server.url + "/metrics", headers={"Accept-Encoding": enc}) as r:
                n = len(await r.read())
            return time.perf_counter() - t0, n

    out: dict[str, Any] = {}
    try:
        for enc in ("gzip", "identity"):
            out[f"{enc}_first"], out[f"{enc}_size"] = await fetch(enc)
            for label, k in (("quiet", 5), ("burst", 250)):
                taken = []
                for _ in range(repeat):
                    at += 120
                    for user in rng.sample(users, min(k, len(users))):
                        model.job_completed(_completion(user, at))
                    taken.append((await fetch(enc))[0])
                out[f"{enc}_{label}"] = statistics.median(taken)
        out["kept_text"] = sum(len(t) for block in cache._texts or () if block for t in block)
        # after a (re)seed the daemon compresses the new model's text ahead, on a thread
        cache = BlockCache()
        t0 = time.perf_counter()
        await cache.update(model)
        out["warm"] = time.perf_counter() - t0
        out["gzip_warm"] = (await fetch("gzip"))[0]
    finally:
        await server.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--items", type=int, default=30_000)
    ap.add_argument("--scrapes", type=int, default=20)
    args = ap.parse_args()
    assert FleetConfig().max_series >= args.items * 13
    t0 = time.perf_counter()
    raw = answers(args.users, args.items)
    print(f"fleet: {args.users:,} users, {args.items:,} protected items; answers "
          f"{sum(map(len, raw)) / 2**20:.1f} MiB of JSON (built in {time.perf_counter() - t0:.1f} s)")
    rows = []
    for names in (True, False):
        gc.collect()
        t0 = time.perf_counter()
        model = seed(raw, names)  # (timed without tracemalloc, which slows allocation)
        seeded = time.perf_counter() - t0
        del model
        gc.collect()
        tracemalloc.start()
        model = seed(raw, names)
        gc.collect()
        state, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        render(model, NOW)  # (warm)
        times = []
        for _ in range(args.scrapes):
            t0 = time.perf_counter()
            text = render(model, NOW)
            times.append(time.perf_counter() - t0)
        series = sum(1 for line in text.split(b"\n") if line and not line.startswith(b"#"))
        http = asyncio.run(http_scrape(model, max(3, args.scrapes // 4)))
        completion = _completion(next(iter(model.users.values())), NOW)
        n = 100_000
        t0 = time.perf_counter()
        for _ in range(n):
            model.job_completed(completion)
        per_event = (time.perf_counter() - t0) / n
        rows.append(("default labels" if names else "name_labels=false", seeded, state, peak,
                     times, series, len(text), http, per_event))
        del model, text
    print(f"{'labels':<18}{'seed s':>8}{'state MB':>10}{'seed peak MB':>14}{'render ms':>11}"
          f"{'p90 ms':>8}{'series':>10}{'text MB':>9}{'event µs':>10}")
    for label, seeded, state, peak, times, series, size, _http, per_event in rows:
        p90 = sorted(times)[int(len(times) * 0.9) - 1]
        print(f"{label:<18}{seeded:>8.2f}{state / 1e6:>10.1f}{peak / 1e6:>14.1f}"
              f"{statistics.median(times) * 1e3:>11.0f}{p90 * 1e3:>8.0f}{series:>10,}"
              f"{size / 1e6:>9.1f}{per_event * 1e6:>10.2f}")
    print("\nscrapes through the HTTP endpoint (curl in another process), ms:")
    print(f"{'labels':<18}{'encoding':>9}{'first':>7}{'MB':>7}{'5 jobs since':>14}"
          f"{'250 jobs since':>16}")
    for label, *_rest, http, _per_event in rows:
        for enc in ("gzip", "identity"):
            print(f"{label:<18}{enc:>9}{http[f'{enc}_first'] * 1e3:>7.0f}"
                  f"{http[f'{enc}_size'] / 1e6:>7.1f}{http[f'{enc}_quiet'] * 1e3:>14.0f}"
                  f"{http[f'{enc}_burst'] * 1e3:>16.0f}")
        print(f"{'':<18}{'(text kept for plain scrapes: '}{http['kept_text'] / 1e6:.1f} MB)")
    print("\nafter a seed, the text compressed ahead on a thread, ms:")
    print(f"{'labels':<18}{'warm-up':>8}{'gzip, first after':>19}")
    for label, *_rest, http, _per_event in rows:
        print(f"{label:<18}{http['warm'] * 1e3:>8.0f}{http['gzip_warm'] * 1e3:>19.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
