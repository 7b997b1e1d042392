"""Randomized fault tests: no job completion lost, none written twice, into a file sink.

`cometstream run` runs as a real process against the in-process simulator (real sockets on
127.0.0.1) while jobs start and complete, and faults are injected at random moments: dropped
connections, a silent server, refused logins, server restarts, SIGKILL and SIGTERM of the
daemon (each followed by a restart), jobs cancelled without any event. Jobs keep completing in
the simulator's world while the daemon is down or disconnected, so remedial sync has to bring
them back.

A job completion's identity is (GUID, EndTime). The expected set is read from the simulator's
world at the end: every job the test started that the world has recorded as ended (a job
cancelled from the web UI ends with status 7005 and an EndTime, and the admin API reports it,
so the daemon owes a synthesized SEVT_JOB_COMPLETED for it).

Each test prints one summary line (run pytest with ``-s`` or ``-rP`` to see it on success).

A file sink is exactly once across SIGKILL: the daemon commits the file's offset with the sink's
cursor and the dedup keys of what it kept in one ledger transaction, and at start recognises the
lines written after the last commit when their events come again (docs/guarantees.md). Earlier
versions wrote job completions delivered just before a kill twice (4-125 per seed here, 17,000
to 23,000 in the burst). The harness reads no state file; it follows the daemon through its
JSON log lines ("starting", "logged in", "stream ready", "resync done").
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from cometstream.simulator import Simulator

from .conftest import PASSWORD, USER, cli_env, wait_until, write_config
from .test_spool import Hook

COMPLETED = 4201

Key = tuple[str, int]  # (job GUID, EndTime): the identity of a job completion


# --------------------------------------------------------------------------- harness


def _config(tmp_path: Path, url: str, sinks: str, *, stream: str = "",
            buffer: str = "disk") -> Path:
    """A config for a `cometstream run` subprocess: fast reconnects, a 50 ms spool commit, JSON
    logs (the harness reads them), no HTTP endpoint."""
    return write_config(tmp_path, url, f"""[spool]
fsync_interval = 0.05
buffer = "{buffer}"
[shutdown]
timeout = 10.0
{sinks}""", name="sim", backoff_max=0.3, stream=f"connect_timeout = 1.0\n{stream}",
                        json_logs=True)


class DaemonProcess:
    """`cometstream run -c CONF` as a real process, restarted at will; each run's output goes to
    its own log file (a pipe nobody reads would fill up and stall the daemon)."""

    def __init__(self, conf: Path, logdir: Path, watch: Path | None = None) -> None:
        self.conf = conf
        self.logdir = logdir
        #: the file sink's size at each start, and why the daemon (re)started: where repeats
        #: come from (see _repeats_by_run)
        self.watch = watch
        self.starts: list[tuple[int, str]] = []
        self.proc: asyncio.subprocess.Process | None = None
        self.runs = 0
        self.log_path = logdir / "run-0.log"
        self.term_codes: list[int] = []
        #: more environment for each run (e.g. a notify socket)
        self.env: dict[str, str] = {}

    async def start(self, why: str = "first start") -> None:
        size = self.watch.stat().st_size if self.watch and self.watch.exists() else 0
        self.starts.append((size, why))
        self.runs += 1
        self.log_path = self.logdir / f"run-{self.runs}.log"
        with self._open_log() as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cometstream", "run", "-c", str(self.conf),
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                env=cli_env(**self.env))

    def _open_log(self) -> Any:
        return open(self.log_path, "wb")  # closed by the caller's with

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(self.proc.wait(), timeout)
        self.term_codes.append(rc)
        return rc

    async def close(self) -> None:
        """Test teardown: never leave a daemon behind."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    def log(self) -> list[dict[str, Any]]:
        """The current run's log lines (JSON; anything else is skipped)."""
        out = []
        for line in self.log_path.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                doc = orjson.loads(line)
                if isinstance(doc, dict):
                    out.append(doc)
        return out

    def started(self) -> bool:
        """Whether the current run is up (its signal handlers are installed before this line)."""
        return any(doc.get("event") == "starting" for doc in self.log())

    def logged_in(self) -> bool:
        """Whether the current run has logged in to the stream at least once."""
        return any(doc.get("event") == "logged in" for doc in self.log())

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def settled_since(self, offset: int = 0) -> bool:
        """Since byte ``offset`` of the current run's log: a session opened ("stream ready") and
        the remedial sync of the latest session finished ("resync done" after it)."""
        events = []
        with open(self.log_path, "rb") as fh:
            fh.seek(offset)
            for line in fh.read().splitlines():
                with contextlib.suppress(orjson.JSONDecodeError):
                    doc = orjson.loads(line)
                    if isinstance(doc, dict):
                        events.append(doc.get("event"))
        if "stream ready" not in events:
            return False
        last_ready = len(events) - 1 - events[::-1].index("stream ready")
        return "resync done" in events[last_ready + 1:]

    def report(self) -> None:
        """For a test that failed: the end of the current run's log, on stderr."""
        print(f"\n--- daemon log (run {self.runs}) ---\n{self.tail(60)}", file=sys.stderr)

    def tail(self, n: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return b"\n".join(self.log_path.read_bytes().splitlines()[-n:]).decode(errors="replace")


def _file_completions(path: Path) -> tuple[list[Key], list[bytes]]:
    """(GUID, EndTime) of every SEVT_JOB_COMPLETED line of an `event`-format file, in order, and
    the lines that are not one (torn, unparsable, another type)."""
    keys: list[Key] = []
    other: list[bytes] = []
    if not path.exists():
        return keys, other
    for line in path.read_bytes().splitlines():
        try:
            doc = orjson.loads(line)
            if doc["Type"] != COMPLETED:
                raise ValueError("not a completion")
            keys.append((doc["Data"]["GUID"], doc["Data"]["EndTime"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            other.append(line)
    return keys, other


class FileTail:
    """The completions in a file sink's file so far, read incrementally (whole lines only), so
    polling a file of 50,000 lines does not starve the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.seen: set[Key] = set()

    def keys(self) -> set[Key]:
        if self.path.exists():
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
            end = data.rfind(b"\n") + 1
            for line in data[:end].splitlines():
                with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                    doc = orjson.loads(line)
                    self.seen.add((doc["Data"]["GUID"], doc["Data"]["EndTime"]))
            self.offset += end
        return self.seen


def _repeats_by_run(path: Path, starts: list[tuple[int, str]]) -> Counter[str]:
    """For each repeated completion line, why the daemon run that wrote it had started (first
    start, after a SIGKILL, after a SIGTERM; by the file's size at each start): where the
    duplicates come from."""
    out: Counter[str] = Counter()
    if not path.exists():
        return out
    seen: set[bytes] = set()
    offset = 0
    for line in path.read_bytes().splitlines(keepends=True):
        with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
            doc = orjson.loads(line)
            key = f"{doc['Data']['GUID']}:{doc['Data']['EndTime']}".encode()
            if key in seen:
                cause = next((why for at, why in reversed(starts) if at <= offset), "?")
                out[cause] += 1
            seen.add(key)
        offset += len(line)
    return out


def _completion_key(ev: dict[str, Any]) -> Key:
    return ev["Data"]["GUID"], ev["Data"]["EndTime"]


# --------------------------------------------------------------------------- test 1: chaos


#: (seed, [spool] buffer): the last seed runs with the memory buffer (events kept = delivered)
SEEDS = ((101, "disk"), (202, "disk"), (303, "memory"))
CHAOS = 11.0          # seconds of jobs and faults per seed
TICK = 0.03           # a job starts (and one completes) every TICK seconds
FAULTS = ("sigkill", "sigkill", "sigterm", "drop", "drop", "silent", "refuse", "restart")
PING = 'ping_interval = 0.25\nping_timeout = 0.35'  # a silent server is noticed within 0.6 s


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("seed", "buffer"), SEEDS)
async def test_random_faults_lose_no_job_completion_and_write_none_twice(
        tmp_path: Path, seed: int, buffer: str) -> None:
    """About 11 s of a job completing every 30 ms (and a few cancelled without an event) while
    the faults of ``FAULTS`` hit at random moments; then a last forced resync and SIGTERM. Every
    completion the world recorded is in the file exactly once, and nothing else is."""
    rng = random.Random(seed)
    path = tmp_path / "jobs.jsonl"
    async with Simulator(username=USER, password=PASSWORD, rate=0, seed=seed,
                         record=False) as sim:
        conf = _config(tmp_path, sim.url, f"""
[sinks.f]
type = "file"
path = "{path}"
format = "event"
types = ["SEVT_JOB_COMPLETED"]
""", stream=PING, buffer=buffer)
        daemon = DaemonProcess(conf, tmp_path, watch=path)
        figures: Counter[str] = Counter()
        started: list[str] = []              # every job this test started (GUIDs)
        ended: set[Key] = set()              # every completion it made, as the world returned it
        old_running: list[str] = []          # jobs started "5.5 hours ago", still running
        try:
            await daemon.start()
            # the first start records a baseline (completions before it are history): wait for it
            await wait_until(daemon.settled_since, timeout=20, what="the baseline resync")

            stop = asyncio.Event()

            def emit(ev: dict[str, Any]) -> None:
                if sim.clients:
                    sim.emit(ev)

            async def jobs() -> None:
                pool: list[str] = []
                target = rng.randint(3, 6)
                tick = 0
                while not stop.is_set():
                    tick += 1
                    ev = sim.world.start_job()
                    started.append(ev["Data"]["GUID"])
                    pool.append(ev["Data"]["GUID"])
                    emit(ev)
                    if len(pool) > target:
                        ev = sim.world.complete_job(pool.pop(0))
                        ended.add(_completion_key(ev))
                        emit(ev)
                    if len(pool) > 1 and rng.random() < 0.03:
                        # cancelled from the web UI: the job ends (7005), no event at all
                        job = sim.world.cancel_silently(pool.pop(rng.randrange(len(pool))))
                        ended.add((job["GUID"], job["EndTime"]))
                        figures["cancelled"] += 1
                    if tick % 60 == 30:
                        # a job the server says started hours ago (its JOB_NEW may be lost);
                        # it is abandoned with an old EndTime at the end (see below)
                        ev = sim.world.start_job(int(time.time()) - 20000)
                        started.append(ev["Data"]["GUID"])
                        old_running.append(ev["Data"]["GUID"])
                        emit(ev)
                    await asyncio.sleep(TICK)
                for guid in pool:  # the last ones complete normally
                    ev = sim.world.complete_job(guid)
                    ended.add(_completion_key(ev))
                    emit(ev)

            async def faults() -> None:
                kinds = list(FAULTS)
                rng.shuffle(kinds)
                t0 = time.monotonic()
                moments = sorted(rng.uniform(0.3, CHAOS - 1.5) for _ in kinds)
                for at, kind in zip(moments, kinds, strict=True):
                    await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
                    if kind == "sigterm":
                        # SIGTERM before the handlers are installed (Python still importing)
                        # just kills it: a SIGKILL by another name
                        await wait_until(daemon.started, timeout=20, what="the daemon up")
                    figures[kind] += 1
                    if kind in ("sigkill", "sigterm"):
                        assert daemon.alive, f"the daemon exited by itself:\n{daemon.tail()}"
                        if kind == "sigkill":
                            await daemon.kill()
                        else:
                            await daemon.terminate()
                        await asyncio.sleep(rng.uniform(0.1, 1.0))  # jobs go on meanwhile
                        await daemon.start(f"after {kind}")
                    elif kind == "drop":
                        await sim.drop_clients()
                    elif kind == "restart":
                        await sim.restart()
                    elif kind == "silent":  # longer than ping_interval + ping_timeout
                        sim.faults.silent = True
                        await asyncio.sleep(rng.uniform(1.0, 2.0))
                        sim.faults.silent = False
                    elif kind == "refuse":
                        # a daemon whose *first* login is refused exits 3 by design (bad
                        # credentials; systemd does not restart it): refuse only once this run
                        # has logged in
                        await wait_until(daemon.logged_in, timeout=20, what="a first login")
                        sim.faults.reject_logins = True
                        await sim.drop_clients()
                        await asyncio.sleep(rng.uniform(0.3, 1.2))
                        sim.faults.reject_logins = False
                await asyncio.sleep(max(0.0, t0 + CHAOS - time.monotonic()))

            producer = asyncio.create_task(jobs())
            try:
                await faults()
            finally:
                stop.set()
                await producer

            # --- the end: no more faults. A fresh session: its sync, which queries the API
            # after the last job started, lists the jobs that "started hours ago" as running.
            assert daemon.alive, f"the daemon exited by itself:\n{daemon.tail()}"
            offset = daemon.log_size()
            await sim.drop_clients()
            figures["drop"] += 1
            await wait_until(lambda: daemon.settled_since(offset), timeout=30,
                             what="a session opened after the faults, and its resync")
            # Those jobs are now abandoned with an EndTime long before the resync window, so
            # only the re-check of jobs believed running can find them, and that across a
            # SIGTERM restart (the daemon's state is saved at shutdown).
            for guid in old_running:
                job = sim.world.abandon(guid, now=sim.world.jobs[guid]["StartTime"] + 60)
                ended.add((job["GUID"], job["EndTime"]))
                figures["abandoned_old"] += 1
            figures["sigterm"] += 1
            await daemon.terminate()
            await daemon.start("after the final sigterm")
            await wait_until(daemon.settled_since, timeout=30, what="the resync after restart")
            # one more resync over a window that is all delivered: it must repeat nothing
            offset = daemon.log_size()
            await sim.drop_clients()
            figures["drop"] += 1
            await wait_until(lambda: daemon.settled_since(offset), timeout=30,
                             what="the last resync")

            rechecks = sim.api_calls["/api/v1/admin/get-job-properties"]
            world = {(g, sim.world.jobs[g]["EndTime"]) for g in started
                     if sim.world.jobs[g]["EndTime"]}
            assert world == ended, "harness: the world and the test disagree on completions"
            expected = world
            tail = FileTail(path)
            await wait_until(lambda: expected <= tail.keys(), timeout=30,
                             what="every completion in the file")
            rc = await daemon.terminate()
            assert rc == 0, daemon.tail()
        except BaseException:
            daemon.report()
            raise
        finally:
            sim.faults.silent = sim.faults.reject_logins = False
            await daemon.close()

    got, other = _file_completions(path)
    counts = Counter(got)
    lost = expected - set(counts)
    duplicated = {k: n for k, n in counts.items() if n > 1}
    unexpected = set(counts) - expected
    print(f"\nseed={seed} buffer={buffer}: kills={figures['sigkill']} terms={figures['sigterm']} "
          f"drops={figures['drop']} silences={figures['silent']} refusals={figures['refuse']} "
          f"server_restarts={figures['restart']} cancelled={figures['cancelled']}"
          f"+{figures['abandoned_old']} old, completions={len(expected)} lost={len(lost)} "
          f"duplicates={sum(n - 1 for n in duplicated.values())} "
          f"(of {len(duplicated)} completions) unexpected={len(unexpected) + len(other)}"
          f" duplicates_by_run={dict(_repeats_by_run(path, daemon.starts))}"
          f" job_rechecks={rechecks}")
    problems = []
    if lost:
        problems.append(f"{len(lost)} lost, e.g. {sorted(lost)[:3]}")
    if duplicated:
        problems.append(f"{sum(n - 1 for n in duplicated.values())} duplicate lines of "
                        f"{len(duplicated)} completions, e.g. {sorted(duplicated)[:3]}")
    if unexpected or other:
        problems.append(f"unexpected: {sorted(unexpected)[:3]} {other[:3]}")
    if old_running and not rechecks:
        problems.append("harness: the abandoned jobs were never re-checked by GUID")
    if any(rc != 0 for rc in daemon.term_codes):
        problems.append(f"SIGTERM exit codes {daemon.term_codes}")
    assert not problems, "; ".join(problems)


# --------------------------------------------------------------------------- test 2: burst


class KeyedHook(Hook):
    """The webhook receiver of test_spool, recording each POST's ``Idempotency-Key`` with the
    completion it carries (one event per POST: ``batch = 1``, so the key is the event's own)."""

    def __init__(self) -> None:
        super().__init__()
        self.deliveries: list[tuple[Key, str]] = []
        self.seen: set[Key] = set()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        key = request.headers.get("Idempotency-Key", "")
        doc = orjson.loads(body)
        for ev in doc if isinstance(doc, list) else [doc]:
            self.deliveries.append((_completion_key(ev), key))
            self.seen.add(_completion_key(ev))
        return web.Response(text="ok")


BURSTS, PER_BURST, KILLS = 4, 12_500, 3


@pytest.mark.timeout(300)
async def test_three_sigkills_in_a_burst_file_exactly_once_webhook_keys_stable(
        tmp_path: Path) -> None:
    """SIGKILL three times at random points while 50,000 jobs complete, restarting each time,
    with a file sink and a webhook sink (one event per POST). Both get every completion; the
    file gets none twice; every repeat at the webhook carries the Idempotency-Key of the first
    delivery of that completion, and repeats stay within about one checkpoint interval of the
    stream per kill."""
    rng = random.Random(7)
    hook = KeyedHook()
    await hook.start()
    path = tmp_path / "a.jsonl"
    completions: set[Key] = set()
    kills = 0
    async with Simulator(username=USER, password=PASSWORD, rate=0, seed=7,
                         record=False) as sim:
        # a Comet Server keeps its job history; the simulator forgets the oldest jobs past
        # max_jobs (a long demo's memory bound), which 50,000 jobs at thousands a second would
        # reach while a sync reads its window span by span, oldest first
        sim.world.max_jobs = 4 * BURSTS * PER_BURST
        conf = _config(tmp_path, sim.url, f"""
[sinks.a]
type = "file"
path = "{path}"
format = "event"
types = ["SEVT_JOB_COMPLETED"]
[sinks.b]
type = "webhook"
url = "{hook.url}"
batch = 1
max_retries = -1
format = "event"
types = ["SEVT_JOB_COMPLETED"]
""")
        daemon = DaemonProcess(conf, tmp_path, watch=path)
        try:
            await daemon.start()
            await wait_until(daemon.settled_since, timeout=20, what="the baseline resync")
            t0 = time.monotonic()
            for burst in range(BURSTS):
                # where this burst's kill falls: at a random 500-job step, or just after it
                kill_at = rng.randrange(0, PER_BURST + 5000, 500) if burst < KILLS else None
                for i in range(PER_BURST):
                    ev = sim.world.complete_job(sim.world.start_job()["Data"]["GUID"])
                    completions.add(_completion_key(ev))
                    if sim.clients:
                        sim.emit(ev)
                    if i % 500 == 0:
                        await asyncio.sleep(0.02)
                        if kill_at is not None and i >= kill_at:
                            await daemon.kill()
                            kills += 1
                            kill_at = None
                            await daemon.start("after sigkill")
                if kill_at is not None:
                    await asyncio.sleep((kill_at - PER_BURST) / 5000)  # up to 1 s after
                    await daemon.kill()
                    kills += 1
                    await daemon.start("after sigkill")
                await sim.wait_for_clients(1, timeout=20)
            rate = len(completions) / (time.monotonic() - t0)

            tail = FileTail(path)

            def delivered() -> bool:  # (the receiver runs in this event loop: keep it cheap)
                return len(hook.seen) >= len(completions) and completions <= hook.seen \
                    and completions <= tail.keys()

            await wait_until(delivered, timeout=150, what="every completion in both sinks")
            await wait_until(daemon.settled_since, timeout=30, what="the last resync")
            # (its drain, spool commit and ledger close are each bounded by shutdown_timeout:
            # on a loaded machine, after three kills' worth of spool, more than 30 s in all)
            rc = await daemon.terminate(timeout=90)
            assert rc == 0, daemon.tail()
        except BaseException:
            daemon.report()
            raise
        finally:
            await daemon.close()
            await hook.stop()

    assert kills == KILLS
    got, other = _file_completions(path)
    file_counts = Counter(got)
    file_lost = completions - set(file_counts)
    file_dups = sum(n - 1 for n in file_counts.values() if n > 1)
    hook_counts = Counter(k for k, _i in hook.deliveries)
    hook_lost = completions - set(hook_counts)
    hook_dups = sum(n - 1 for n in hook_counts.values() if n > 1)
    first_key: dict[Key, str] = {}
    key_changed: list[Key] = []
    for k, idem in hook.deliveries:
        if first_key.setdefault(k, idem) != idem:
            key_changed.append(k)
    unexpected = (set(file_counts) | set(hook_counts)) - completions
    print(f"\nburst: kills={kills} completions={len(completions)} rate={rate:.0f}/s "
          f"file: lost={len(file_lost)} duplicates={file_dups} "
          f"{dict(_repeats_by_run(path, daemon.starts))} torn/other={len(other)}; "
          f"webhook: lost={len(hook_lost)} duplicates={hook_dups} "
          f"({hook_dups / max(1, kills):.0f} per kill) key_changed={len(key_changed)}; "
          f"unexpected={len(unexpected)}")
    problems = []
    if file_lost or hook_lost:
        problems.append(f"lost: file {len(file_lost)}, webhook {len(hook_lost)}, e.g. "
                        f"{sorted(file_lost | hook_lost)[:3]}")
    if file_dups:
        problems.append(f"file: {file_dups} duplicate lines")
    if other or unexpected:
        problems.append(f"unexpected: {len(other)} other lines, {sorted(unexpected)[:3]}")
    if key_changed:
        problems.append(f"webhook: {len(key_changed)} repeats with another Idempotency-Key, "
                        f"e.g. {key_changed[:3]}")
    # a kill repeats at most what the webhook got since the ledger's last commit (every 0.05 s
    # here; a burst's commit takes longer): bounded at a quarter second of the stream per kill
    bound = kills * max(500.0, rate * 0.25)
    if hook_dups > bound:
        problems.append(f"webhook: {hook_dups} duplicates > {bound:.0f} ({kills} kills x "
                        f"max(500, 0.25 s x {rate:.0f}/s))")
    assert not problems, "; ".join(problems)
