"""Every metric of the contract, defined once, on an injected Prometheus registry.

The hot path never touches prometheus-client: the read loop and the sink workers bump plain
integers on :class:`StreamStats` and :class:`SinkStats`, and :class:`Metrics` (a collector) turns
them into metric families when scraped. That keeps a counter update at the cost of an integer
increment. Label values are bounded: event types fold unknown numbers into ``other``, job
statuses into their range, disconnect reasons and drop reasons are fixed vocabularies.
"""

from __future__ import annotations

import time
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..constants import SEVT_NAMES

__all__ = ["LATENCY_BUCKETS", "Histogram", "Metrics", "SinkStats", "StreamStats"]

PREFIX: Final = "cometstream_"
#: label values exported from the start (at 0), so that rules and dashboards see the series
DISCONNECT_REASONS: Final = frozenset({"closed", "error", "ping_timeout", "idle_timeout",
                                       "no_hello", "oversized"})
RESYNC_RESULTS: Final = frozenset({"ok", "baseline", "error"})
RESYNC_KINDS: Final = frozenset({"job_completed", "job_new", "account_new", "account_updated",
                                 "account_removed", "device_new", "device_removed"})
#: delivery latency buckets, 1 ms to 60 s
LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                          5.0, 10.0, 30.0, 60.0)


#: why a frame was skipped (``cometstream_events_malformed_total{reason}``), exported from 0
MALFORMED_REASONS: Final = ("bad_type", "bad_unicode", "binary", "duplicate_key", "invalid_json",
                            "not_object", "not_utf8", "oversized", "processing_error", "too_deep")

class Histogram:
    """A cheap fixed-bucket histogram (no locks: the event loop is its only writer)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def observe_many(self, values: Iterable[float]) -> None:
        """:meth:`observe` each value: sorted once, then each bucket's share found by bisection
        (a batch of acknowledgements: hundreds of values, a few dozen steps in Python, where a
        loop over the values took hundreds)."""
        ordered = sorted(values)
        counts = self.counts
        below = 0  # values in the buckets so far (all <= the last bound passed)
        for i, bound in enumerate(self.bounds):
            upto = bisect_right(ordered, bound, below)
            counts[i] += upto - below
            below = upto
        counts[-1] += len(ordered) - below
        self.sum += sum(ordered)
        self.count += len(ordered)

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        acc = 0
        for bound, c in zip(self.bounds, self.counts, strict=False):
            acc += c
            out.append((repr(bound), acc))
        acc += self.counts[-1]
        out.append(("+Inf", acc))
        return out



class StreamStats:
    """Stream-side numbers, bumped by the read loop and the supervisor."""

    def __init__(self) -> None:
        self.connection_up = 0
        self.connects: dict[str, int] = defaultdict(int)  # result: ok|rejected|error|timeout
        self.disconnects: dict[str, int] = defaultdict(int)  # reason
        self.received: dict[int, int] = defaultdict(int)  # raw Type -> count
        self.malformed = 0
        self.duplicates = 0
        self.spool_quarantined = 0
        self.malformed_by_reason: dict[str, int] = defaultdict(int)
        self.last_event_time = 0.0
        self.jobs_completed: dict[str, int] = defaultdict(int)  # status label
        self.resync_runs: dict[str, int] = defaultdict(int)
        self.resync_events: dict[str, int] = defaultdict(int)
        self.resync_duration = Histogram((0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0))
        #: when the running sync started (time.monotonic()), 0.0 while none runs
        self.resync_started = 0.0
        #: failed syncs since the last good one
        self.resync_failures = 0
        #: the running sync's progress: the share of its job window read (0 to 1) and the
        #: events it synthesized so far (0, 0 while none runs)
        self.resync_progress: Callable[[], tuple[float, int]] = lambda: (0.0, 0)

    @property
    def events_received(self) -> int:
        return sum(self.received.values())


class SinkStats:
    """One sink's numbers, bumped by the pipeline."""

    def __init__(self) -> None:
        self.delivered = 0
        self.filtered = 0
        self.dropped: dict[str, int] = defaultdict(int)  # reason: queue_full|rejected|shutdown
        self.errors = 0
        self.queue_depth = 0  # maintained by the pipeline at scrape time via a callback
        self.latency = Histogram()
        self.failing = False
        self.last_error = ""
        self.capacity = 0


class Metrics(Collector):
    """A collector over the stats objects; register once per registry."""

    def __init__(self, server: str, registry: CollectorRegistry | None = None) -> None:
        self.server = server
        self.stream = StreamStats()
        self.sinks: dict[str, SinkStats] = {}
        self._depth: dict[str, object] = {}
        #: with a spool: a callable giving {"bytes", "events", "oldest_age", "write_errors"}
        self.spool: Callable[[], dict[str, Any]] | None = None
        #: how far each sink is behind, with either buffer: a callable giving
        #: {sink: (events, seconds)} (cometstream_sink_lag_events / _seconds)
        self.lag: Callable[[], dict[str, tuple[int, float]]] | None = None
        #: configuration reloads (SIGHUP) by result, and whether and when the last one succeeded
        self.reloads: dict[str, int] = {"success": 0, "failure": 0}
        self.reload_ok = 1
        self.reload_ok_at = 0.0
        if registry is not None:
            registry.register(self)

    def sink(self, name: str, depth: object = None) -> SinkStats:
        """The stats of sink ``name``; ``depth`` is a callable giving its current queue depth."""
        st = self.sinks.get(name)
        if st is None:
            st = self.sinks[name] = SinkStats()
        if depth is not None:
            self._depth[name] = depth
        return st

    def forget_sink(self, name: str) -> None:
        """A sink removed by a reload: its series go."""
        self.sinks.pop(name, None)
        self._depth.pop(name, None)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        """Every family, in the contract's order: the connection, the events, the remedial
        sync, the sinks, then how far they lag and the spool (when the daemon gives them)."""
        yield from self._connection_families()
        yield from self._event_families()
        yield from self._resync_families()
        yield from self._sink_families()
        yield from self._reload_families()
        if self.lag is not None:
            yield from self._lag_families(self.lag())
        if self.spool is not None:
            yield from self._spool_families(self.spool())

    def _connection_families(self) -> Iterator[Metric]:
        s = self.stream
        srv = self.server
        g = GaugeMetricFamily(PREFIX + "connection_up", "1 while logged in to the event stream",
                              labels=["server"])
        g.add_metric([srv], s.connection_up)
        yield g

        c = CounterMetricFamily(PREFIX + "connects", "Connection attempts by result",
                                labels=["server", "result"])
        known = ("ok", "rejected", "error", "timeout")
        for result in (*known, *sorted(set(s.connects) - set(known))):
            c.add_metric([srv, result], s.connects.get(result, 0))
        yield c

        c = CounterMetricFamily(PREFIX + "disconnects", "Lost connections by reason",
                                labels=["server", "reason"])
        for reason in sorted(DISCONNECT_REASONS | set(s.disconnects)):
            c.add_metric([srv, reason], s.disconnects.get(reason, 0))
        yield c

    def _event_families(self) -> Iterator[Metric]:
        s = self.stream
        srv = self.server
        c = CounterMetricFamily(PREFIX + "events_received", "Events received by SEVT type "
                                "(unknown numbers as other)", labels=["server", "type"])
        folded: dict[str, int] = defaultdict(int)
        for t, n in s.received.items():
            folded[SEVT_NAMES.get(t, "other")] += n
        for name, n in sorted(folded.items()):
            c.add_metric([srv, name], n)
        yield c

        c = CounterMetricFamily(PREFIX + "events_malformed", "Frames that were not a "
                                "StreamableEvent, or whose processing failed (skipped), by reason",
                                labels=["server", "reason"])
        by_reason = dict.fromkeys(MALFORMED_REASONS, 0)
        by_reason.update(s.malformed_by_reason)
        for reason, n in sorted(by_reason.items()):
            c.add_metric([srv, reason], n)
        yield c

        c = CounterMetricFamily(PREFIX + "events_duplicate", "Events dropped as already "
                                "delivered (dedup window)", labels=["server"])
        c.add_metric([srv], s.duplicates)
        yield c

        g = GaugeMetricFamily(PREFIX + "last_event_timestamp_seconds", "Unix time of the last "
                              "event received", labels=["server"])
        g.add_metric([srv], s.last_event_time)
        yield g

        c = CounterMetricFamily(PREFIX + "jobs_completed", "Job-completed events by JOB_STATUS",
                                labels=["server", "status"])
        for status, n in sorted(s.jobs_completed.items()):
            c.add_metric([srv, status], n)
        yield c

    def _resync_families(self) -> Iterator[Metric]:
        s = self.stream
        srv = self.server
        c = CounterMetricFamily(PREFIX + "resync_runs", "Remedial sync runs by result",
                                labels=["server", "result"])
        for result in sorted(RESYNC_RESULTS | set(s.resync_runs)):
            c.add_metric([srv, result], s.resync_runs.get(result, 0))
        yield c
        c = CounterMetricFamily(PREFIX + "resync_events", "Events synthesized by remedial sync",
                                labels=["server", "kind"])
        for kind in sorted(RESYNC_KINDS | set(s.resync_events)):
            c.add_metric([srv, kind], s.resync_events.get(kind, 0))
        yield c
        h = HistogramMetricFamily(PREFIX + "resync_duration_seconds", "Remedial sync duration",
                                  labels=["server"])
        h.add_metric([srv], s.resync_duration.cumulative(), s.resync_duration.sum)
        yield h
        g = GaugeMetricFamily(PREFIX + "resync_running_seconds", "Age of the running remedial "
                              "sync (0 when none runs)", labels=["server"])
        started = s.resync_started
        g.add_metric([srv], max(0.0, time.monotonic() - started) if started else 0.0)
        yield g
        g = GaugeMetricFamily(PREFIX + "resync_consecutive_failures", "Remedial syncs failed "
                              "since the last good one", labels=["server"])
        g.add_metric([srv], s.resync_failures)
        yield g
        share, made = s.resync_progress()
        g = GaugeMetricFamily(PREFIX + "resync_progress_ratio", "Share of the running remedial "
                              "sync's job window read so far (0 when none runs)",
                              labels=["server"])
        g.add_metric([srv], share)
        yield g
        g = GaugeMetricFamily(PREFIX + "resync_progress_events", "Events the running remedial "
                              "sync has synthesized so far (0 when none runs)", labels=["server"])
        g.add_metric([srv], made)
        yield g

    def _reload_families(self) -> Iterator[Metric]:
        """Prometheus' own names for a configuration that reloads."""
        server = self.server
        c = CounterMetricFamily(PREFIX + "config_reloads", "Configuration reloads (SIGHUP) by "
                                "result", labels=["server", "result"])
        for result, n in self.reloads.items():
            c.add_metric([server, result], n)
        yield c
        g = GaugeMetricFamily(PREFIX + "config_last_reload_successful", "1 if the last "
                              "configuration reload succeeded (or none was tried), 0 if it "
                              "was refused", labels=["server"])
        g.add_metric([server], self.reload_ok)
        yield g
        g = GaugeMetricFamily(PREFIX + "config_last_reload_success_timestamp_seconds", "Unix "
                              "time of the last configuration (re)load that succeeded",
                              labels=["server"])
        g.add_metric([server], self.reload_ok_at)
        yield g

    def _sink_families(self) -> Iterator[Metric]:
        delivered = CounterMetricFamily(PREFIX + "events_delivered", "Events acknowledged by "
                                        "the sink", labels=["sink"])
        dropped = CounterMetricFamily(PREFIX + "events_dropped", "Events a sink will never get",
                                      labels=["sink", "reason"])
        filtered = CounterMetricFamily(PREFIX + "events_filtered", "Events the sink's filter "
                                       "skipped", labels=["sink"])
        errors = CounterMetricFamily(PREFIX + "sink_errors", "Failed sink writes", labels=["sink"])
        depth = GaugeMetricFamily(PREFIX + "sink_queue_depth", "Events queued for the sink",
                                  labels=["sink"])
        latency = HistogramMetricFamily(PREFIX + "delivery_latency_seconds", "Received to "
                                        "acknowledged by the sink", labels=["sink"])
        failing = GaugeMetricFamily(PREFIX + "sink_failing", "1 while the sink's writes fail "
                                    "(retrying)", labels=["sink"])
        capacity = GaugeMetricFamily(PREFIX + "sink_queue_capacity", "The sink's buffer size",
                                     labels=["sink"])
        for name, st in self.sinks.items():
            delivered.add_metric([name], st.delivered)
            for reason in ("queue_full", "rejected", "shutdown", "spool_limit"):
                dropped.add_metric([name, reason], st.dropped.get(reason, 0))
            filtered.add_metric([name], st.filtered)
            errors.add_metric([name], st.errors)
            fn = self._depth.get(name)
            depth.add_metric([name], fn() if callable(fn) else st.queue_depth)
            latency.add_metric([name], st.latency.cumulative(), st.latency.sum)
            failing.add_metric([name], 1 if st.failing else 0)
            capacity.add_metric([name], st.capacity)
        yield from (delivered, dropped, filtered, errors, depth, latency, failing, capacity)

    def _spool_families(self, fig: dict[str, Any]) -> Iterator[Metric]:
        srv = self.server
        for name, help_, value in (
                ("spool_bytes", "Bytes of the events in the spool", fig["bytes"]),
                ("spool_events", "Events in the spool (some sink has not got them)", fig["events"]),
                ("spool_oldest_age_seconds", "Age of the oldest event in the spool",
                 fig["oldest_age"])):
            g = GaugeMetricFamily(PREFIX + name, help_, labels=["server"])
            g.add_metric([srv], value)
            yield g
        c = CounterMetricFamily(PREFIX + "spool_write_errors", "Failed spool commits (retried)",
                                labels=["server"])
        c.add_metric([srv], fig["write_errors"])
        yield c
        c = CounterMetricFamily(PREFIX + "spool_quarantined", "Damaged spools moved aside at start",
                                labels=["server"])
        c.add_metric([srv], self.stream.spool_quarantined)
        yield c

    @staticmethod
    def _lag_families(lag: dict[str, tuple[int, float]]) -> Iterator[Metric]:
        events = GaugeMetricFamily(PREFIX + "sink_lag_events", "Events received that the sink "
                                   "has not got yet", labels=["sink"])
        seconds = GaugeMetricFamily(PREFIX + "sink_lag_seconds", "Age of the oldest event the "
                                    "sink is waiting for", labels=["sink"])
        for sink, (n, age) in lag.items():
            events.add_metric([sink], n)
            seconds.add_metric([sink], age)
        yield events
        yield seconds
