"""The standard ``process_*`` metrics, from what the hardened units leave readable.

prometheus_client's ``ProcessCollector`` reads the boot time from ``/proc/stat`` and, when it
cannot, exports nothing at all. The units run with ``ProcSubset=pid``, which hides ``/proc/stat``
(and ``/proc/uptime``): the six ``process_*`` families would vanish exactly in production.
:class:`ProcessMetrics` exports the same six families, with the same names, types and help
texts, from ``/proc/self`` alone:

- ``/proc/self/stat``: CPU time (utime + stime), virtual and resident memory, and the start
  time in clock ticks since boot;
- ``/proc/self/limits``: the soft limit of open files;
- ``/proc/self/fd``: the open file descriptors.

The boot time that turns the start time into Unix seconds comes from ``CLOCK_BOOTTIME`` (the
clock ``/proc/self/stat`` counts from) instead of ``/proc/stat``: now minus the seconds since
boot. It is computed once, at the first successful read, since a process's start time does not
change. A file that cannot be read leaves out only its own families.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["ProcessMetrics", "standard_registry"]


def _sysconf(name: str, default: int) -> int:
    try:
        value = os.sysconf(name)
    except (ValueError, OSError):
        return default
    return value if value > 0 else default


class ProcessMetrics(Collector):
    """``process_*`` from ``/proc/self`` under ``proc`` (another mount of proc in tests)."""

    def __init__(self, *, proc: str | os.PathLike[str] = "/proc",
                 registry: CollectorRegistry | None = None) -> None:
        self.dir = Path(proc) / "self"
        self.ticks = float(_sysconf("SC_CLK_TCK", 100))
        self.pagesize = _sysconf("SC_PAGESIZE", 4096)
        self._start_time: float | None = None
        if registry is not None:
            registry.register(self)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        out: list[Metric] = []
        try:
            stat = (self.dir / "stat").read_bytes()
        except OSError:
            stat = b""
        if stat:
            out.extend(self._from_stat(stat))
        try:
            limits = (self.dir / "limits").read_bytes()
            open_fds = len(os.listdir(self.dir / "fd"))
        except OSError:
            return out
        out.append(GaugeMetricFamily("process_open_fds", "Number of open file descriptors.",
                                     value=float(open_fds)))
        max_fds = _max_open_files(limits)
        if max_fds is not None:
            out.append(GaugeMetricFamily("process_max_fds", "Maximum number of open file "
                                         "descriptors.", value=max_fds))
        return out

    def _from_stat(self, stat: bytes) -> list[Metric]:
        # the command name (field 2) may hold spaces and parentheses: split after its last ")"
        parts = stat.rpartition(b")")[2].split()
        try:
            utime, stime = int(parts[11]), int(parts[12])
            starttime, vsize, rss = int(parts[19]), int(parts[20]), int(parts[21])
        except (IndexError, ValueError):
            return []
        if self._start_time is None:
            boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
            self._start_time = boot + starttime / self.ticks
        return [
            GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                              value=float(vsize)),
            GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes.",
                              value=float(rss * self.pagesize)),
            GaugeMetricFamily("process_start_time_seconds", "Start time of the process since "
                              "unix epoch in seconds.", value=self._start_time),
            CounterMetricFamily("process_cpu_seconds", "Total user and system CPU time spent in "
                                "seconds.", value=(utime + stime) / self.ticks),
        ]


def _max_open_files(limits: bytes) -> float | None:
    """The soft limit on the "Max open files" line (``unlimited`` as +Inf)."""
    for line in limits.splitlines():
        if line.startswith(b"Max open files"):
            fields = line[len(b"Max open files"):].split()
            if not fields:
                return None
            if fields[0] == b"unlimited":
                return math.inf
            try:
                return float(fields[0])
            except ValueError:
                return None
    return None


def standard_registry() -> CollectorRegistry:
    """A registry with the standard collectors: ``process_*`` (:class:`ProcessMetrics`),
    ``python_info`` and ``python_gc_*``; the daemon adds its own."""
    registry = CollectorRegistry()
    ProcessMetrics(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
