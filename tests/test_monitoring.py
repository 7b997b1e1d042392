"""The operator kit: rules and config pass promtool, a real Prometheus scrapes the daemon, and
every metric the dashboard and the alerts use is one the daemon exports."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import aiohttp
import pytest

from cometstream.simulator import Simulator

from .conftest import make_config, running, wait_until

ROOT = Path(__file__).resolve().parent.parent
MON = ROOT / "docs" / "monitoring"
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not installed (Debian package prometheus; "
                                    ".ci/run installs it)")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@needs_promtool
@pytest.mark.parametrize("args", [["check", "rules", "alerts.yml"],
                                  ["check", "config", "prometheus.yml"],
                                  ["test", "rules", "alerts_test.yml"]])
def test_promtool_accepts_the_kit(args: list[str]) -> None:
    """promtool checks the rules and the config, and the rules' unit tests pass."""
    proc = subprocess.run(["promtool", *args], cwd=MON, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def _metrics_text(sim: Simulator, tmp_path: Path, port: int) -> str:
    cfg = make_config(sim.url, tmp_path, http={"listen": f"127.0.0.1:{port}"},
                      sinks={"f": {"type": "memory"}, "g": {"type": "memory", "types": [4201]}})
    async with running(cfg) as d:
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        sim.emit({"Type": 4201, "Data": {"GUID": "x", "Status": 7002, "EndTime": 5}})
        sim.emit(b"nope")
        await wait_until(lambda: d.sink_stats("g").delivered == 1, what="delivery")
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{port}/metrics") as r:
            return await r.text()


@needs_promtool
async def test_promtool_lints_the_exposition(sim: Simulator, tmp_path: Path) -> None:
    """promtool check metrics finds no problem in what /metrics serves."""
    text = await _metrics_text(sim, tmp_path, _port())
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)
    problems = [ln for ln in (proc.stdout + proc.stderr).splitlines()
                if ln.startswith("cometstream_")]
    assert problems == []


async def test_dashboard_and_alerts_use_only_exported_metrics(sim: Simulator,
                                                              tmp_path: Path) -> None:
    """Every cometstream_* name in the dashboard and the rules is served by /metrics."""
    text = await _metrics_text(sim, tmp_path, _port())
    exported = set(re.findall(r"^(cometstream_\w+?)(?:\{| )", text, re.M))
    used = set(re.findall(r"cometstream_\w+", (MON / "alerts.yml").read_text()))
    dash = json.loads((MON / "grafana-dashboard.json").read_text())
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"cometstream_\w+", target["expr"]))
    missing = {u for u in used if u not in exported}
    assert not missing, missing
    assert len(dash["panels"]) >= 10


needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None,
                                      reason="prometheus not installed (.ci/run installs it)")


@needs_prometheus
async def test_a_real_prometheus_scrapes_the_daemon_and_loads_the_rules(
        sim: Simulator, tmp_path: Path) -> None:
    """Prometheus itself scrapes /metrics (up == 1, connection_up == 1) with our rules loaded."""
    metrics_port, prom_port = _port(), _port()
    (tmp_path / "alerts.yml").write_text((MON / "alerts.yml").read_text())
    (tmp_path / "prom.yml").write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [alerts.yml]
scrape_configs:
  - job_name: cometstream
    static_configs:
      - targets: ["127.0.0.1:{metrics_port}"]
""")
    cfg = make_config(sim.url, tmp_path, http={"listen": f"127.0.0.1:{metrics_port}"})
    async with running(cfg) as d:
        await wait_until(lambda: d.daemon.supervisor.connected, what="login")
        prom = await asyncio.create_subprocess_exec(
            "prometheus", f"--config.file={tmp_path / 'prom.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{prom_port}/api/v1"
            async with aiohttp.ClientSession() as http:
                async def query(q: str) -> list[dict[str, object]]:
                    try:
                        async with http.get(f"{base}/query", params={"query": q}) as r:
                            return (await r.json())["data"]["result"]  # type: ignore[no-any-return]
                    except (aiohttp.ClientError, KeyError):
                        return []

                for _ in range(200):
                    up = await query('up{job="cometstream"}')
                    conn = await query("cometstream_connection_up")
                    if up and up[0]["value"][1] == "1" and conn and conn[0]["value"][1] == "1":  # type: ignore[index]
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError("Prometheus never scraped the daemon")
                async with http.get(f"{base}/rules") as r:
                    groups = (await r.json())["data"]["groups"]
            rules = [rule for g in groups for rule in g["rules"]]
            defined = (ROOT / "docs" / "monitoring" / "alerts.yml").read_text().count("- alert:")
            assert len(rules) == defined >= 10 and all(rule["health"] == "ok" for rule in rules)
        finally:
            prom.terminate()
            await prom.wait()
