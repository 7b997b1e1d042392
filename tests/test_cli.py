"""End-to-end commands as a user runs them: demo, simulate + run, systemd notification."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

import orjson

from .conftest import cli_env, run_cli, toml_str


async def _read_until(stream: asyncio.StreamReader, predicate, timeout: float) -> list[bytes]:  # type: ignore[no-untyped-def]
    lines: list[bytes] = []
    async with asyncio.timeout(timeout):
        while True:
            line = await stream.readline()
            if not line:
                return lines
            lines.append(line)
            if predicate(lines):
                return lines


async def test_demo_shows_events_within_seconds_and_ctrl_c_exits_0() -> None:
    """cometstream demo prints events from the built-in simulator; SIGINT exits 0."""
    proc = await run_cli("demo", "--rate", "50")
    try:
        assert proc.stdout is not None
        lines = await _read_until(proc.stdout, lambda ls: len(ls) >= 5, timeout=15)
        assert len(lines) >= 5
        docs = [orjson.loads(x) for x in lines]  # not a TTY here: JSON Lines envelopes
        assert docs[0]["type_name"] == "SEVT_META_HELLO"
        # a job that ends while the first sync runs may be reported by it (origin resync)
        assert all(d["server"] == "demo" and d["origin"] in ("stream", "resync") for d in docs)
        proc.send_signal(signal.SIGINT)
        _out, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_simulate_and_run_as_two_processes_with_systemd_notify(tmp_path: Path) -> None:
    """The simulator and the daemon as separate processes; the daemon tells systemd READY,
    STATUS, WATCHDOG and STOPPING over $NOTIFY_SOCKET (an abstract socket here)."""
    port = _free_port()
    sim = await run_cli("simulate", "--listen", f"127.0.0.1:{port}", "--username", "ops",
                        "--password", "s3cret & co", "--rate", "20")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind("\0cometstream-test-" + str(port))
    notify.setblocking(False)
    out_path = tmp_path / "events.jsonl"
    conf = tmp_path / "c.toml"
    conf.write_text(f"""
[server]
url = "http://127.0.0.1:{port}/"
username = "ops"
password = {toml_str("s3cret & co")}
[stream]
backoff_initial = 0.1
[http]
listen = ""
[state]
dir = "{tmp_path}"
[sinks.f]
type = "file"
path = "{out_path}"
""")
    env = cli_env(NOTIFY_SOCKET="@cometstream-test-" + str(port), WATCHDOG_USEC="200000")
    daemon = await run_cli("run", "-c", str(conf), env=env)
    messages: list[str] = []
    loop = asyncio.get_running_loop()

    stamps: list[float] = []

    async def collect() -> None:
        while True:
            messages.append((await loop.sock_recv(notify, 4096)).decode())
            stamps.append(loop.time())

    collector = asyncio.create_task(collect())
    try:
        async with asyncio.timeout(20):
            while not (out_path.exists() and len(out_path.read_bytes().splitlines()) >= 10):
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        daemon.send_signal(signal.SIGTERM)
        _o, err = await asyncio.wait_for(daemon.communicate(), 15)
        await asyncio.sleep(0.1)
    finally:
        collector.cancel()
        for p in (daemon, sim):
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
                await asyncio.wait_for(p.wait(), 10)
        notify.close()
    assert daemon.returncode == 0, err.decode()
    assert messages[0] == "READY=1" or "READY=1" in messages
    assert any(m.startswith("STATUS=connected to 127.0.0.1") for m in messages)
    # WATCHDOG_USEC=200000: a ping every 0.1 s, from READY until STOPPING
    span = stamps[messages.index("STOPPING=1")] - stamps[messages.index("READY=1")]
    pings = messages.count("WATCHDOG=1")
    assert span > 0.5 and span / 0.1 - 3 <= pings <= span / 0.1 + 3, (span, pings)
    assert "STOPPING=1" in messages
    assert sim.returncode == 0
    assert b"s3cret" not in err
