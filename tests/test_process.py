"""process_* metrics from /proc/self alone: the same six families as prometheus_client's
collector, also where /proc/stat is hidden (the units' ProcSubset=pid)."""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, ProcessCollector

from cometstream.observe.process import ProcessMetrics

from .test_service import PROCESS_FAMILIES, UNDER_PROC_SUBSET, _proc_subset_available


def _values(collector: object) -> dict[str, float]:
    return {fam.name: fam.samples[0].value for fam in collector.collect()}  # type: ignore[attr-defined]


def test_the_six_families_match_prometheus_clients_on_this_proc() -> None:
    """Where /proc/stat is readable, the figures agree with prometheus_client's collector."""
    ours = _values(ProcessMetrics())
    theirs = _values(ProcessCollector(registry=CollectorRegistry()))
    assert set(ours) == PROCESS_FAMILIES == set(theirs)
    assert ours["process_max_fds"] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert abs(ours["process_open_fds"] - theirs["process_open_fds"]) <= 2
    # prometheus_client's boot time is whole seconds (/proc/stat's btime)
    assert abs(ours["process_start_time_seconds"] - theirs["process_start_time_seconds"]) < 2
    assert 0 < ours["process_resident_memory_bytes"] < ours["process_virtual_memory_bytes"]
    assert 0 < ours["process_cpu_seconds"] <= theirs["process_cpu_seconds"] + 0.5


def test_a_command_name_with_spaces_and_parentheses_is_parsed(tmp_path: Path) -> None:
    """/proc/self/stat's second field is the command name in parentheses, which may itself
    hold spaces and ")": the fields are read after the last one. Unlimited files read +Inf."""
    self_dir = tmp_path / "self"
    (self_dir / "fd").mkdir(parents=True)
    for i in range(3):
        (self_dir / "fd" / str(i)).write_text("")
    ticks = os.sysconf("SC_CLK_TCK")
    fields = ["S", *["0"] * 10, str(3 * ticks), str(2 * ticks), *["0"] * 6, str(ticks),
              "123456789", "1000"]
    (self_dir / "stat").write_text(f"42 (a) (b c)) {' '.join(fields)} 0 0 0\n")
    (self_dir / "limits").write_text(
        "Limit                     Soft Limit           Hard Limit           Units     \n"
        "Max open files            unlimited            unlimited            files     \n")
    v = _values(ProcessMetrics(proc=tmp_path))
    assert v["process_cpu_seconds"] == 5.0
    assert v["process_virtual_memory_bytes"] == 123456789
    assert v["process_resident_memory_bytes"] == 1000 * os.sysconf("SC_PAGESIZE")
    assert v["process_open_fds"] == 3 and math.isinf(v["process_max_fds"])


def test_an_unreadable_proc_leaves_out_only_what_it_hides(tmp_path: Path) -> None:
    """No /proc/self/limits: the four families from stat are still there."""
    real = Path("/proc/self/stat").read_text()
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "stat").write_text(real)
    assert set(_values(ProcessMetrics(proc=tmp_path))) == PROCESS_FAMILIES - {
        "process_open_fds", "process_max_fds"}


def test_the_six_families_under_a_proc_mounted_with_subset_pid() -> None:
    """In a process whose /proc is mounted as the units mount it (subset=pid: no /proc/stat),
    prometheus_client's collector exports nothing and ours all six, with a sane start time."""
    why_not = _proc_subset_available()
    if why_not is not None:
        pytest.skip(why_not)
    code = (
        "import json, os, time\n"
        "from prometheus_client import CollectorRegistry, ProcessCollector\n"
        "from cometstream.observe.process import ProcessMetrics\n"
        "theirs = [f.name for f in ProcessCollector(registry=CollectorRegistry()).collect()]\n"
        "ours = {f.name: f.samples[0].value for f in ProcessMetrics().collect()}\n"
        "print(json.dumps({'proc_stat': os.path.exists('/proc/stat'), 'theirs': theirs,\n"
        "                  'ours': ours, 'now': time.time()}))\n"
    )
    out = subprocess.run([*UNDER_PROC_SUBSET, sys.executable, "-c", code], check=False,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["proc_stat"] is False and seen["theirs"] == []
    assert set(seen["ours"]) == PROCESS_FAMILIES
    assert 0 <= seen["now"] - seen["ours"]["process_start_time_seconds"] < 30
