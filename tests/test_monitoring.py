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


async def _metrics_text(sim: Simulator, tmp_path: Path, port: int, buffer: str = "disk") -> str:
    cfg = make_config(sim.url, tmp_path, http={"listen": f"127.0.0.1:{port}"},
                      sinks={"f": {"type": "memory"}, "g": {"type": "memory", "types": [4201]}},
                      spool={"buffer": buffer})
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


def _exprs() -> list[str]:
    dash = json.loads((MON / "grafana-dashboard.json").read_text())
    return [t["expr"] for panel in dash["panels"] for t in panel["targets"]]


@pytest.mark.parametrize("buffer", ["disk", "memory"])
async def test_dashboard_and_alerts_use_only_exported_metrics(sim: Simulator, tmp_path: Path,
                                                              buffer: str) -> None:
    """Every cometstream_* and process_* name the rules use is served by /metrics with either
    [spool] buffer, so every alert can fire in both; the dashboard's too (but for its spool
    panel, which has no data with the memory buffer)."""
    text = await _metrics_text(sim, tmp_path, _port(), buffer)
    exported = set(re.findall(r"^((?:cometstream|process)_\w+?)(?:\{| )", text, re.MULTILINE))
    names = r"(?:cometstream|process)_\w+"
    queries = [ln for ln in (MON / "alerts.yml").read_text().splitlines()
               if not re.match(r"\s*(summary|description):", ln)]  # (not the annotations)
    rules = set(re.findall(names, "\n".join(queries)))
    assert not rules - exported, rules - exported
    panels = {n for expr in _exprs() for n in re.findall(names, expr)}
    if buffer == "memory":
        panels = {n for n in panels if not n.startswith("cometstream_spool_")}
    assert not panels - exported, panels - exported
    assert len(_exprs()) >= 10


def test_every_alert_has_a_promtool_test_that_fires_it() -> None:
    """alerts_test.yml makes each rule of alerts.yml fire at least once (with its labels and
    annotations)."""
    names = re.findall(r"^\s*- alert: (\w+)$", (MON / "alerts.yml").read_text(), re.MULTILINE)
    tests = (MON / "alerts_test.yml").read_text()
    firing = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels:", tests))
    assert len(names) == 11 and set(names) <= firing, set(names) - firing


def test_the_dashboard_and_the_alert_count_the_same_failed_jobs() -> None:
    """One definition of a failed job (JOB_STATUS_FAILED_* but FAILED_WARNING), in the rule,
    the dashboard, and both their descriptions."""
    rules = (MON / "alerts.yml").read_text()
    dash = json.loads((MON / "grafana-dashboard.json").read_text())
    panel = next(p for p in dash["panels"] if p["title"] == "Job failures (1h)")
    matchers = 'status=~"JOB_STATUS_FAILED_.*", status!="JOB_STATUS_FAILED_WARNING"'
    assert matchers in rules and matchers in panel["targets"][0]["expr"]
    assert "except FAILED_WARNING" in rules and "except FAILED_WARNING" in panel["description"]


def test_the_dashboard_follows_its_variables() -> None:
    """No panel hard-codes a job or a data source: each uses ${datasource}, and the process_*
    panels (their series have no server label) follow $server through connection_up."""
    dash = json.loads((MON / "grafana-dashboard.json").read_text())
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            assert "job=" not in expr, (panel["title"], expr)
            assert target["datasource"]["uid"] == "${datasource}"
            if "process_" in expr:
                assert 'cometstream_connection_up{server=~"$server"}' in expr, expr
            elif "server" in expr:
                assert '"$server"' in expr, expr
    titles = [p["title"] for p in dash["panels"]]
    assert "Sink lag" in titles and "Spool (disk buffer)" in titles


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
                # every panel's query is valid PromQL, and the process panels find the daemon
                # (its process_* joined to its server label)
                for expr in _exprs():
                    q = (expr.replace("$server", ".*").replace("$sink", ".*")
                         .replace("$__rate_interval", "1m"))
                    async with http.get(f"{base}/query", params={"query": q}) as r:
                        answer = await r.json()
                    assert answer["status"] == "success", (expr, answer)
                    if expr.startswith("process_resident_memory_bytes"):
                        assert answer["data"]["result"][0]["metric"]["server"] == "sim", answer
            rules = [rule for g in groups for rule in g["rules"]]
            defined = (ROOT / "docs" / "monitoring" / "alerts.yml").read_text().count("- alert:")
            assert len(rules) == defined >= 10 and all(rule["health"] == "ok" for rule in rules)
        finally:
            prom.terminate()
            await prom.wait()
