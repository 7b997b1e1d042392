"""How long a configuration reload takes: SIGHUP to the daemon's ``READY=1``, for a file that
changes nothing, one that adds a file sink and one that moves a file sink to a new path, under
a steady stream of job completions.

    .venv/bin/python benchmarks/reload.py [--reloads 20] [--rate 200]

The simulator runs in this process; ``cometstream run`` runs as a real process with a notify
socket of this benchmark's (what systemd reads). Each reload waits for its ``READY=1`` before
the next; a moved file sink (a new ``path``) waits for the ledger's commit of its cursor with
the new file's position. Printed per kind: median, p90 and max in milliseconds, and the stream logins the
simulator counted over the whole run (1: no reload dropped the stream).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

USER, PASSWORD = "bench", "bench pass"


class Notify:
    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)

    async def wait_for(self, message: str, timeout: float = 60.0) -> float:
        """Until a datagram that is ``message``; returns when it came (monotonic)."""
        loop = asyncio.get_running_loop()
        while True:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), timeout)
            if data.decode() == message:
                return time.monotonic()


def _config(folder: Path, url: str, extra_sinks: int, main: int = 0) -> str:
    sinks = "".join(f"""
[sinks.extra{i}]
type = "file"
path = "{folder / f"extra{i}.jsonl"}"
format = "event"
""" for i in range(extra_sinks))
    return f"""[server]
url = "{url}"
name = "bench"
username = "{USER}"
password = "{PASSWORD}"
[http]
listen = ""
[state]
dir = "{folder / "state"}"
[log]
level = "warning"
[sinks.main]
type = "file"
path = "{folder / f"main{main}.jsonl"}"
format = "event"
{sinks}"""


async def _emit(sim: object, rate: float) -> None:
    world = sim.world  # type: ignore[attr-defined]
    while True:
        ev = world.complete_job(world.start_job()["Data"]["GUID"])
        if sim.clients:  # type: ignore[attr-defined]
            sim.emit(ev)  # type: ignore[attr-defined]
        await asyncio.sleep(1.0 / rate)


async def run(reloads: int, rate: float) -> int:
    import structlog

    from cometstream.simulator import Simulator

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    folder = Path(tempfile.mkdtemp(prefix="cs-reload-", dir="/tmp"))
    notify = Notify(str(folder))
    async with Simulator(username=USER, password=PASSWORD, rate=0, seed=3, record=False) as sim:
        conf = folder / "c.toml"
        conf.write_text(_config(folder, sim.url, 0))
        conf.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("COMETSTREAM_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cometstream", "run", "-c", str(conf),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            env={**env, "NOTIFY_SOCKET": notify.path})
        emitter = asyncio.create_task(_emit(sim, rate))
        figures: dict[str, list[float]] = {"nothing changed": [], "a file sink added": [],
                                           "a file sink moved": []}
        try:
            await notify.wait_for("READY=1")
            await sim.wait_for_clients(1, timeout=30)
            for i in range(reloads):
                for kind, ms in figures.items():
                    if kind == "a file sink added":
                        conf.write_text(_config(folder, sim.url, i + 1, i))
                    elif kind == "a file sink moved":
                        conf.write_text(_config(folder, sim.url, i + 1, i + 1))
                    sent = time.monotonic()
                    proc.send_signal(signal.SIGHUP)
                    done = await notify.wait_for("READY=1")
                    ms.append((done - sent) * 1000)
        finally:
            emitter.cancel()
            proc.send_signal(signal.SIGTERM)
            rc = await proc.wait()
            notify.sock.close()
            shutil.rmtree(folder, ignore_errors=True)
        print(f"reload latency, SIGHUP -> READY=1, {reloads} reloads each, "
              f"{rate:g} completions/s flowing:")
        for kind, ms in figures.items():
            ms.sort()
            p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
            print(f"  {kind:<18} median {statistics.median(ms):7.1f} ms  p90 {p90:7.1f} ms  "
                  f"max {ms[-1]:7.1f} ms")
        print(f"stream logins during the run: {sim.logins_ok}; daemon exit {rc}")
    return 0 if rc == 0 and sim.logins_ok == 1 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reloads", type=int, default=20)
    ap.add_argument("--rate", type=float, default=200.0, help="job completions per second")
    args = ap.parse_args()
    return asyncio.run(run(args.reloads, args.rate))


if __name__ == "__main__":
    sys.exit(main())
