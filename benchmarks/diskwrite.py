"""What the delivery state costs on disk: bytes written per byte delivered, and start time with a
full dedup window.

    .venv/bin/python benchmarks/diskwrite.py [--quick] [--rate 3000] [--seconds 20]
        [--windows 10000,100000] [--start-window 200000] [--dir DIR] [--code DIR]

Three kinds of process: the simulator (``Simulator``, its own event generator paced at
``--rate`` events/s of its realistic mix, ~850-byte events, started when the daemon logs in),
the daemon (``python -m cometstream run -c CONFIG``: uvloop, JSON logs on stderr, metrics
endpoint on 127.0.0.1, one file sink with ``format = "envelope"`` and default options,
default ``[spool]``, default ``[resync]``), and this driver, which reads the daemon's
``/proc/PID/io`` and log lines and the sizes of its files.

The dedup window is pre-seeded: a ``checkpoint.json`` of format 2 (the state file of versions
before the ledger, which the daemon migrates into ``ledger.db`` at its first start) in
state.dir, with N random 64-bit fingerprints whose timestamps are spread over the last 23
hours (so nothing leaves the 24-hour window during the run), the watermark a minute ago and no
accounts baseline (the first sync takes it). The window then grows by every job event
delivered (half the mix: ~1,500 keys/s at 3,000 events/s), so the table shows its size,
estimated, at the start and at the end of the measured interval: seeded + the job events in the
sink's file by then.

1. **Disk writes per byte delivered**: for each ``--windows`` size, a fresh state dir, simulator
   and daemon; after the first sync and a warm-up, over ``--seconds``: the daemon's
   ``write_bytes`` (page-cache pages the process dirtied: what will reach the block device,
   in 4 KiB pages, without the filesystem's journal and metadata) and ``wchar`` (bytes passed
   to write(2) and friends, files or not), against the growth of the file sink's file (the
   bytes delivered). Amplification = write_bytes / sink growth. The state dir's writes are
   inferred, write_bytes - sink growth (the process writes nothing else to disk: its logs go
   to a pipe), since /proc/PID/io is per process, not per file; the state dir's size is that
   of every file in it, whatever the store calls them. Also shown, for reference: the block
   device's sectors written over the interval (the whole machine, journal included) and
   cancelled_write_bytes (dirty pages dropped before writeback: a file replaced or truncated
   before it was flushed).
2. **Start time with a full window**: a state dir seeded with ``--start-window`` keys, the
   simulator idle; the time from the process's spawn to its ``starting`` and ``logged in`` log
   lines (``logged in``: the stream's status becomes "connected"; then ``resync done``), then
   SIGTERM and the time to exit; three starts on the same state dir: the first loads (or
   migrates) the seed, the next two read the state as the daemon left it. A start with an
   empty state dir is shown first for reference (interpreter start and imports are in every
   figure).

``--code DIR`` runs another tree's cometstream package (daemon and simulator), e.g. a commit
exported with ``git archive COMMIT cometstream | tar -x -C DIR``: the same figures before and
after a change. ``--dir`` puts the state dirs elsewhere (on tmpfs write_bytes stays 0).

Nothing is asserted; on a shared 2-core VM the figures are noisy (compare within one run).
``--quick``: 3 s warm-up and 5 s measured instead of 5 s and 20 s (the warm-up is short: the
window grows meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from base64 import b64encode
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

USER = "bench"
PASSWORD = "bench pass"
SERVER = "bench"
ROOT = Path(__file__).resolve().parent.parent
#: the daemon keeps at most this many keys in its window (cometstream/delivery/window.py)
WINDOW_CAP = 200_000
#: the file sink's envelope lines start with these fields; the job types are the dedup keys
JOB_MARKERS = (b'"type_name":"SEVT_JOB_NEW"', b'"type_name":"SEVT_JOB_COMPLETED"')
#: log lines (the ``event`` field of the daemon's JSON logs)
STARTING, LOGGED_IN, RESYNC_DONE = "starting", "logged in", "resync done"
#: every wait is bounded
LOGIN_TIMEOUT = 120.0
RESYNC_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0


# --- the simulator (a process of its own) ---------------------------------------------------------
async def serve(rate: float) -> None:
    """A simulator whose generator starts at ``rate`` events/s once a client has logged in (so
    no backlog of world events precedes the daemon), until terminated (or an hour)."""
    import structlog

    from cometstream.simulator import Simulator

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    # a queue of 20 s of events: a daemon stalled for a moment is not dropped as a slow client
    sim = Simulator(username=USER, password=PASSWORD, rate=0, seed=1, record=False,
                    queue_limit=max(10_000, int(rate * 20)))
    await sim.start("127.0.0.1", 0)
    print(json.dumps({"url": sim.url}), flush=True)
    try:
        if rate > 0:
            await sim.wait_for_clients(1, timeout=600)
            sim.set_rate(rate)
        await asyncio.sleep(3600)
    finally:
        await sim.stop()


class Sim:
    def __init__(self, rate: float, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", "--rate", str(rate)],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                     env=env, cwd=tempfile.gettempdir())
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the simulator did not start (exit code {self.proc.wait(10)})")
        self.url: str = json.loads(line)["url"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# --- the daemon (a process of its own) ------------------------------------------------------------
class Daemon:
    """``python -m cometstream run -c CONFIG``; its JSON log lines are read by a thread, each
    stamped on arrival (the monotonic clock, from just before the spawn)."""

    def __init__(self, config: Path, env: dict[str, str]) -> None:
        self.lines: dict[str, tuple[float, dict[str, Any]]] = {}  # first of each event
        self.counts: Counter[str] = Counter()
        self.tail: deque[str] = deque(maxlen=30)
        self.eof = False
        self._cond = threading.Condition()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cometstream", "run", "-c", str(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
            cwd=config.parent)  # (-m puts the working folder first on sys.path)
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, name="daemon-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            now = time.monotonic()
            text = raw.decode("utf-8", "replace").rstrip()
            try:
                doc = json.loads(text)
                name = str(doc.get("event", "")) if isinstance(doc, dict) else ""
            except ValueError:
                doc, name = {}, ""
            with self._cond:
                self.tail.append(text)
                if name:
                    self.counts[name] += 1
                    self.lines.setdefault(name, (now - self.t0, doc))
                self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    def wait_for(self, name: str, timeout: float) -> float | None:
        """Seconds from the spawn to the first ``name`` log line; None if none came within
        ``timeout`` (or the process ended first)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while name not in self.lines:
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    return None
                self._cond.wait(min(left, 1.0))
            return self.lines[name][0]

    def at(self, name: str) -> float | None:
        with self._cond:
            hit = self.lines.get(name)
        return hit[0] if hit else None

    def window_loaded(self) -> int | None:
        """The dedup window the daemon says it loaded at start: the first log line with an
        integer ``dedup`` or ``dedup_keys`` field ("ledger loaded", or "state migrated into the
        ledger")."""
        with self._cond:
            hits = sorted(self.lines.values(), key=lambda hit: hit[0])
        for _t, doc in hits:
            for key in ("dedup", "dedup_keys"):
                if type(doc.get(key)) is int:
                    return int(doc[key])
        return None

    def migrated(self) -> bool:
        """Whether a log line says the state was migrated into the ledger."""
        with self._cond:
            return any("migrat" in name or doc.get("migrated") is True
                       for name, (_t, doc) in self.lines.items())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def failure(self, what: str) -> SystemExit:
        code = self.proc.poll()
        state = f"exited with code {code}" if code is not None else "still running"
        return SystemExit(f"daemon: {what} ({state}); its last log lines:\n  "
                          + "\n  ".join(self.tail))

    def stop(self) -> float:
        """SIGTERM, then the seconds until it exited (killed after STOP_TIMEOUT)."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        elapsed = time.monotonic() - t0
        self._reader.join(10)
        return elapsed


# --- state dir and config -------------------------------------------------------------------------
def seed_checkpoint(state: Path, keys: int, now: float) -> int:
    """``checkpoint.json`` (format 2) with a dedup window of ``keys`` random fingerprints, oldest
    first, their timestamps spread from 23 hours to a minute ago. Returns its size in bytes."""
    state.mkdir(parents=True, exist_ok=True, mode=0o750)
    rng = random.Random(keys)
    top = int(now) - 60
    span = 23 * 3600
    fps = array("q", (rng.getrandbits(64) - (1 << 63) for _ in range(keys)))
    stamps = array("q", (top - span + i * span // max(keys, 1) for i in range(keys)))
    if sys.byteorder != "little":
        fps.byteswap()
        stamps.byteswap()
    doc = {
        "version": 2, "server": SERVER, "written_at": now, "watermark": top,
        "server_start_hash": "", "running_jobs": {}, "accounts": {}, "devices": {},
        "accounts_baseline": False,
        "dedup": {"fingerprints": b64encode(fps.tobytes()).decode(),
                  "timestamps": b64encode(stamps.tobytes()).decode()},
    }
    blob = json.dumps(doc, separators=(",", ":")).encode()
    (state / "checkpoint.json").write_bytes(blob)
    return len(blob)


def write_config(tmp: Path, url: str, state: Path, out: Path) -> Path:
    q = json.dumps  # a JSON string is a TOML basic string
    text = f"""
[server]
url = {q(url)}
name = {q(SERVER)}
username = {q(USER)}
password = {q(PASSWORD)}

[state]
dir = {q(str(state))}

[http]
listen = "127.0.0.1:0"

[log]
level = "info"
format = "json"

[sinks.file]
type = "file"
path = {q(str(out))}
format = "envelope"
"""
    path = tmp / "cometstream.toml"
    path.write_text(text, encoding="utf-8")
    return path


def daemon_env(code: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("COMETSTREAM_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env["PYTHONPATH"] = str(code)
    return env


# --- measurements ---------------------------------------------------------------------------------
def proc_io(pid: int) -> dict[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = int(value)
    return out


def proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def dir_files(path: Path) -> dict[str, int]:
    """Every regular file under ``path`` (relative name -> size); files that vanish while
    listed (a temporary file renamed into place) are skipped."""
    out: dict[str, int] = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            if (st.st_mode & 0o170000) == 0o100000:
                out[os.path.relpath(full, path)] = st.st_size
    return out


def block_device(path: Path) -> Path | None:
    """/sys/.../stat of the block device under ``path`` (None for tmpfs, overlay and such)."""
    dev = os.stat(path).st_dev
    stat = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
    return stat if os.major(dev) and stat.exists() else None


def device_written(stat: Path | None) -> int | None:
    if stat is None:
        return None
    try:
        return int(stat.read_text().split()[6]) * 512  # sectors written, 512 bytes each
    except (OSError, IndexError, ValueError):
        return None


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2:
                mnt = parts[1].replace("\\040", " ")
                if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) \
                        and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    return kind


@dataclass
class Snap:
    t: float
    io: dict[str, int] | None
    cpu: float
    sink: int
    state: dict[str, int]
    device: int | None


def snapshot(pid: int, out: Path, state: Path, dev: Path | None) -> Snap:
    try:
        sink = out.stat().st_size
    except FileNotFoundError:
        sink = 0
    return Snap(time.monotonic(), proc_io(pid), proc_cpu(pid), sink, dir_files(state),
                device_written(dev))


def scan_sink(out: Path, upto: tuple[int, ...]) -> list[tuple[int, int]]:
    """(lines, job events) in the sink's file up to each offset in ``upto`` (ascending)."""
    counts = []
    lines = jobs = pos = 0
    marks = list(upto)
    with out.open("rb") as fh:
        for line in fh:
            while marks and pos >= marks[0]:
                counts.append((lines, jobs))
                marks.pop(0)
            if not marks:
                break
            pos += len(line)
            lines += 1
            head = line[:200]
            if JOB_MARKERS[0] in head or JOB_MARKERS[1] in head:
                jobs += 1
    while marks:
        counts.append((lines, jobs))
        marks.pop(0)
    return counts


def _sleep(seconds: float, daemon: Daemon) -> None:
    """Sleep, watching that the daemon stays up (bounded: ``seconds``)."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if not daemon.alive():
            raise daemon.failure("ended during the measurement")
        time.sleep(min(left, 0.5))


def measure_writes(window: int, rate: float, warmup: float, seconds: float, base: str | None,
                   env: dict[str, str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cometstream-diskwrite-", dir=base) as tmp_s:
        tmp = Path(tmp_s)
        state, out = tmp / "state", tmp / "out.jsonl"
        seeded = seed_checkpoint(state, window, time.time())
        dev = block_device(tmp)
        sim = Sim(rate, env)
        try:
            daemon = Daemon(write_config(tmp, sim.url, state, out), env)
            try:
                if daemon.wait_for(LOGGED_IN, LOGIN_TIMEOUT) is None:
                    raise daemon.failure(f"no {LOGGED_IN!r} log line within {LOGIN_TIMEOUT:.0f} s")
                # the first sync (a seeded checkpoint: it reads the last minutes' jobs)
                synced = daemon.wait_for(RESYNC_DONE, RESYNC_TIMEOUT) is not None
                _sleep(warmup, daemon)
                a = snapshot(daemon.pid, out, state, dev)
                _sleep(seconds, daemon)
                b = snapshot(daemon.pid, out, state, dev)
            finally:
                stop = daemon.stop()
        finally:
            sim.stop()
        (lines_a, jobs_a), (lines_b, jobs_b) = scan_sink(out, (a.sink, b.sink))
    dt = b.t - a.t
    grew = b.sink - a.sink
    res: dict[str, Any] = {
        "window": window, "seeded_bytes": seeded, "synced": synced, "stop": stop,
        "loaded": daemon.window_loaded(),
        "window_a": window + jobs_a, "window_b": window + jobs_b,
        "seconds": dt, "events": lines_b - lines_a, "sink": grew,
        "cpu": (b.cpu - a.cpu) / dt,
        "state_size": sum(b.state.values()), "state_grew": sum(b.state.values()) - sum(a.state.values()),
        "state_files": sorted(b.state), "disconnects": daemon.counts["stream disconnected"],
        "device": (b.device - a.device) if a.device is not None and b.device is not None else None,
        "io": None,
    }
    if a.io is not None and b.io is not None:
        res["io"] = {k: b.io[k] - a.io[k] for k in a.io if k in b.io}
    return res


def measure_start(keys: int, env: dict[str, str], base: str | None, starts: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    seeded = 0
    with tempfile.TemporaryDirectory(prefix="cometstream-diskwrite-", dir=base) as tmp_s:
        tmp = Path(tmp_s)
        sim = Sim(0, env)
        try:
            for label, state, runs in (("empty state dir", tmp / "empty", 1),
                                       ("seeded", tmp / "state", starts)):
                if label == "seeded":
                    seeded = seed_checkpoint(state, keys, time.time())
                cfg = write_config(tmp, sim.url, state, tmp / f"out-{state.name}.jsonl")
                for i in range(runs):
                    daemon = Daemon(cfg, env)
                    try:
                        login = daemon.wait_for(LOGGED_IN, LOGIN_TIMEOUT)
                        if login is None:
                            raise daemon.failure(f"no {LOGGED_IN!r} log line within "
                                                 f"{LOGIN_TIMEOUT:.0f} s")
                        synced = daemon.wait_for(RESYNC_DONE, RESYNC_TIMEOUT)
                    finally:
                        stop = daemon.stop()
                    files = dir_files(state)
                    rows.append({
                        "label": label if label != "seeded" else
                        ("1st start (loads the seed)" if i == 0 else
                         f"{_ordinal(i + 1)} start (state as left)"),
                        "starting": daemon.at(STARTING), "login": login, "resync": synced,
                        "stop": stop, "loaded": daemon.window_loaded(),
                        "migrated": daemon.migrated(),
                        "state_size": sum(files.values()), "files": sorted(files),
                        "code": daemon.proc.returncode,
                    })
        finally:
            sim.stop()
    return {"keys": keys, "seeded_bytes": seeded, "rows": rows}


def _ordinal(n: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")


# --- report ---------------------------------------------------------------------------------------
def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def _k(n: int) -> str:
    return f"{n / 1000:.0f}k"


def report_writes(results: list[dict[str, Any]], rate: float, where: Path) -> None:
    r0 = results[0]
    print(f"disk writes at {rate:,.0f} events/s: 1 file sink (envelope), disk spool, "
          f"{r0['seconds']:.0f} s measured, state dir on {fs_type(where)} ({where})")
    print(f"{'window keys':>16} {'ev/s':>6} {'sink MB/s':>10} {'write_bytes':>12} "
          f"{'wchar':>7} {'written/':>9} {'state dir':>10} {'state':>6} {'state dir':>10} "
          f"{'CPU':>5}")
    print(f"{'start→end of it':>16} {'':>6} {'(delivered)':>10} {'MB/s':>12} "
          f"{'MB/s':>7} {'delivered':>9} {'MB/s (*)':>10} {'share':>6} {'size MB':>10} "
          f"{'':>5}")
    for r in results:
        dt = r["seconds"]
        win = f"{_k(r['window_a'])}→{_k(r['window_b'])}"
        io = r["io"]
        if io is not None and r["sink"] > 0:
            wb, wc = io.get("write_bytes", 0), io.get("wchar", 0)
            state = max(0, wb - r["sink"])
            cols = (f"{_mb(wb / dt):>12} {_mb(wc / dt):>7} {wb / r['sink']:>8.2f}x "
                    f"{_mb(state / dt):>10} {(state / wb if wb else 0):>6.0%}")
        else:
            cols = f"{'-':>12} {'-':>7} {'-':>9} {'-':>10} {'-':>6}"
        print(f"{win:>16} {r['events'] / dt:>6,.0f} {_mb(r['sink'] / dt):>10} {cols} "
              f"{_mb(r['state_size']):>10} {r['cpu']:>5.0%}")
    print("  (*) inferred: write_bytes - the sink file's growth (/proc/PID/io is per process)")
    for r in results:
        io = r["io"] or {}
        extra = []
        if r["loaded"] is not None:
            extra.append(f"loaded {r['loaded']:,} keys")
        extra.append(f"checkpoint seeded {r['seeded_bytes'] / 1e6:.1f} MB")
        extra.append(f"state dir grew {r['state_grew'] / 1e6:+.2f} MB")
        if io:
            extra.append(f"cancelled_write_bytes {_mb(io.get('cancelled_write_bytes', 0))} MB")
        if r["device"] is not None:
            extra.append(f"device (whole machine) {_mb(r['device'] / r['seconds'])} MB/s")
        extra.append(f"stop {r['stop']:.2f} s")
        if r["disconnects"]:
            extra.append(f"{r['disconnects']} disconnects")
        if not r["synced"]:
            extra.append(f"no {RESYNC_DONE!r} line")
        print(f"  {_k(r['window'])} seeded: {', '.join(extra)}; files: "
              f"{', '.join(r['state_files']) or '-'}")
        if r["io"] is not None and r["io"].get("write_bytes", 0) == 0 and r["sink"] > 0:
            print("  warning: write_bytes did not move while the sink's file grew: this "
                  "filesystem (tmpfs?) or kernel does not count it; use --dir on a disk")
    if r0["io"] is None:
        print("  /proc/PID/io unreadable here: write_bytes and wchar not shown")
    if len(results) > 1 and all(r["io"] for r in results):
        parts = []
        for r in results:
            state = max(0, r["io"].get("write_bytes", 0) - r["sink"])
            per_event = state / r["events"] if r["events"] else 0
            parts.append(f"~{_k((r['window_a'] + r['window_b']) // 2)} keys: "
                         f"{_mb(state / r['seconds'])} MB/s ({per_event:,.0f} B/event)")
        print(f"state store writes by window size (mean over the interval): {'; '.join(parts)}")
    if any(r["window_b"] > WINDOW_CAP for r in results):
        print(f"  (the daemon keeps at most {WINDOW_CAP:,} keys: estimates beyond are capped)")


def report_start(res: dict[str, Any]) -> None:
    print(f"\nstart with a full window: {res['keys']:,} keys seeded (checkpoint.json format 2, "
          f"{res['seeded_bytes'] / 1e6:.1f} MB), simulator idle; seconds from the spawn")

    def s(v: float | None) -> str:
        return f"{v:.2f}" if v is not None else "-"

    print(f"{'':<30} {STARTING!r:>11} {LOGGED_IN!r:>12} {RESYNC_DONE!r:>14} {'stop':>6} "
          f"{'keys loaded':>12} {'state dir after':>16}")
    for r in res["rows"]:
        loaded = f"{r['loaded']:,}" if isinstance(r["loaded"], int) else "-"
        note = "  (logged a migration)" if r["migrated"] else ""
        print(f"{r['label']:<30} {s(r['starting']):>11} {s(r['login']):>12} {s(r['resync']):>14} "
              f"{s(r['stop']):>6} {loaded:>12} {r['state_size'] / 1e6:>13.2f} MB{note}")
    last = res["rows"][-1]
    print(f"  stop = SIGTERM to exit (final state write included); files after: "
          f"{', '.join(last['files'])}")
    bad = [r["label"] for r in res["rows"] if r["code"] not in (0, None)]
    if bad:
        print(f"  warning: non-zero exit code: {', '.join(bad)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="3 s warm-up and 5 s measured (instead of 5 s and 20 s)")
    ap.add_argument("--rate", type=float, default=3000.0, help="events/s (default 3000)")
    ap.add_argument("--seconds", type=float, default=None, help="measured interval")
    ap.add_argument("--warmup", type=float, default=None, help="after the first sync")
    ap.add_argument("--windows", default="10000,100000",
                    help="dedup window sizes to seed, comma-separated (default 10000,100000)")
    ap.add_argument("--start-window", type=int, default=200_000,
                    help="dedup window of the start-time runs (0: skip them)")
    ap.add_argument("--starts", type=int, default=3, help="starts on the seeded state dir")
    ap.add_argument("--dir", default=None,
                    help="where the temporary state dirs go (default: the system's temp dir); "
                         "must be on a disk, not tmpfs, for write_bytes to count")
    ap.add_argument("--code", default=str(ROOT),
                    help="the folder holding the cometstream package that the daemon and the "
                         "simulator run (default: this checkout), e.g. an export of another "
                         "commit: git archive COMMIT cometstream | tar -x -C DIR")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(serve(args.rate))
        return 0
    seconds = args.seconds if args.seconds is not None else (5.0 if args.quick else 20.0)
    warmup = args.warmup if args.warmup is not None else (3.0 if args.quick else 5.0)
    try:
        windows = [int(w) for w in args.windows.split(",") if w.strip()]
    except ValueError:
        ap.error(f"--windows: expected integers, got {args.windows!r}")
    if any(w < 0 for w in windows) or seconds <= 0 or warmup < 0 or args.starts < 1:
        ap.error("sizes and durations must be positive")
    code = Path(args.code).resolve()
    if not (code / "cometstream" / "__init__.py").is_file():
        ap.error(f"--code: no cometstream package in {code}")
    env = daemon_env(code)
    if code != ROOT:
        print(f"code: {code / 'cometstream'}")
    where = Path(args.dir or tempfile.gettempdir()).resolve()
    if windows:
        results = [measure_writes(w, args.rate, warmup, seconds, args.dir, env) for w in windows]
        report_writes(results, args.rate, where)
    if args.start_window > 0:
        report_start(measure_start(args.start_window, env, args.dir, args.starts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
