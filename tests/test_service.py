"""The operator's path: config.example.toml, edited as docs/operations.md says, started the way
the unit starts it (the password as a systemd credential in $CREDENTIALS_DIRECTORY, systemd's
$NOTIFY_SOCKET, and, where this machine allows it, a /proc mounted with subset=pid like the
units' ProcSubset=pid), against the simulator; then scraped like Prometheus does."""

from __future__ import annotations

import asyncio
import gzip
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cometstream.observe.systemd import connected_status
from cometstream.simulator import Simulator

from .conftest import PASSWORD, USER, cli_env

ROOT = Path(__file__).resolve().parent.parent
PROCESS_FAMILIES = {"process_cpu_seconds", "process_open_fds", "process_max_fds",
                    "process_virtual_memory_bytes", "process_resident_memory_bytes",
                    "process_start_time_seconds"}
#: runs ARGS as pid 1 of a new pid namespace whose /proc is mounted as the units mount it
#: (killed with unshare, should a failed test kill that)
UNDER_PROC_SUBSET = ["unshare", "--map-root-user", "--mount", "--pid", "--kill-child", "sh", "-c",
                     "mount -t proc -o subset=pid,hidepid=invisible proc /proc && exec \"$@\"",
                     "sh"]


def _proc_subset_available() -> str | None:
    """None if this machine can run a process under a subset=pid /proc, else why not."""
    if shutil.which("unshare") is None:
        return "unshare not installed (util-linux)"
    try:
        proc = subprocess.run([*UNDER_PROC_SUBSET, "sh", "-c", "test ! -e /proc/stat"],
                              check=False, capture_output=True, text=True, timeout=30)
    except OSError as exc:
        return f"unshare failed: {exc}"
    if proc.returncode != 0:
        return ("no user namespaces with a private proc mount here: "
                + (proc.stderr.strip().splitlines() or ["?"])[-1])
    return None


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connected_status_text() -> None:
    """STATUS= while connected: the name as configured (its commas too), then the count with
    its thousands apart."""
    assert connected_status("comet1", 12345) == "connected to comet1, 12 345 events"
    assert connected_status("eu, west", 1234567) == "connected to eu, west, 1 234 567 events"
    assert connected_status("comet1", 0) == "connected to comet1, 0 events"


def _example_as_documented(tmp_path: Path, sim_url: str, http_port: int) -> Path:
    """config.example.toml with what operations.md says to edit (url, username, sinks), plus
    what this machine needs instead of the unit's: the state directory, the metrics port."""
    text = (ROOT / "config.example.toml").read_text()
    edits = [('url = "https://comet.example.com:8060/"', f'url = "{sim_url}"'),
             ('username = "cometstream"', f'username = "{USER}"'),
             ('listen = "127.0.0.1:9780"', f'listen = "127.0.0.1:{http_port}"'),
             ("/var/lib/cometstream", str(tmp_path / "state"))]
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    conf = tmp_path / "config.toml"
    conf.write_text(text)
    conf.chmod(0o600)
    return conf


async def _scrape(http: aiohttp.ClientSession, port: int) -> dict[str, list[float]]:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
        body = await r.read()
    if body[:2] == b"\x1f\x8b":
        body = gzip.decompress(body)
    out: dict[str, list[float]] = {}
    for fam in text_string_to_metric_families(body.decode()):
        out[fam.name] = [s.value for s in fam.samples]
    return out


@pytest.mark.parametrize("proc_mount", ["host", "subset=pid"])
async def test_the_example_starts_like_the_unit_starts_it(sim: Simulator, tmp_path: Path,
                                                          proc_mount: str) -> None:
    """The example, edited as documented, with the password only as a credential: READY=1,
    STATUS=connected to comet1, N events (exactly), no event on stdout (the journal), the six
    process_* families on /metrics (on the host's /proc, and on a subset=pid /proc like the
    units'), and SIGTERM exits 0."""
    prefix: list[str] = []
    if proc_mount == "subset=pid":
        why_not = _proc_subset_available()
        if why_not is not None:
            pytest.skip(f"a subset=pid /proc: {why_not}")
        prefix = UNDER_PROC_SUBSET
    http_port = _port()
    conf = _example_as_documented(tmp_path, sim.url, http_port)
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "password").write_text(PASSWORD)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"cometstream-service-test-{os.getpid()}-{http_port}"
    notify.bind("\0" + name)
    notify.setblocking(False)
    env = cli_env(CREDENTIALS_DIRECTORY=str(creds), NOTIFY_SOCKET="@" + name)
    proc = await asyncio.create_subprocess_exec(
        *prefix, sys.executable, "-m", "cometstream", "run", "-c", str(conf),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    loop = asyncio.get_running_loop()
    messages: list[str] = []

    async def until(what: str, predicate) -> None:  # type: ignore[no-untyped-def]
        async with asyncio.timeout(20):
            while not predicate():
                messages.append((await loop.sock_recv(notify, 4096)).decode())
        assert predicate(), what

    try:
        await until("READY", lambda: "READY=1" in messages)
        await until("connected", lambda: any(m.startswith("STATUS=connected") for m in messages))
        assert "STATUS=connected to comet1, 0 events" in messages, messages
        async with aiohttp.ClientSession() as http:
            scraped = await _scrape(http, http_port)
            assert set(scraped) >= PROCESS_FAMILIES, sorted(scraped)
            assert scraped["process_resident_memory_bytes"][0] > 0
            sim.emit_many(1500)
            async with asyncio.timeout(20):
                while sum((await _scrape(http, http_port)).get(
                        "cometstream_events_received", [0])) < 1501:
                    await asyncio.sleep(0.05)
        messages.clear()
        await sim.drop_clients()  # a reconnect: STATUS= with thousands
        await until("reconnected", lambda: any(m.startswith("STATUS=connected") for m in messages))
        status = next(m for m in messages if m.startswith("STATUS=connected"))
        assert re.fullmatch(r"STATUS=connected to comet1, 1 5\d\d events", status), status
        target = proc.pid
        if prefix:  # the daemon is unshare's child (pid 1 of its namespace)
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            target = int(children[0])
        os.kill(target, signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        notify.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert out == b""  # stdout is the journal under the unit: log lines only, on stderr
    assert PASSWORD.encode() not in err
