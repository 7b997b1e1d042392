"""``cometstream backfill``: replay historical job completions through the configured sinks.

Jobs are read from ``get-jobs-for-date-range`` one day at a time (bounded memory, visible
progress), each completed job whose ``EndTime`` falls in ``[since, until)`` becomes a synthesized
``SEVT_JOB_COMPLETED`` with origin ``backfill``, and goes through the same pipeline as live events
(filters, buffers, batching, retries). The ledger is not touched.
"""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import datetime
from typing import IO, Any, Final

import structlog
from prometheus_client import CollectorRegistry

from .api import AdminClient
from .config import Config, unknown_sink
from .constants import SEVT
from .errors import UsageError
from .events import Event
from .observe.metrics import Metrics
from .pipeline import Pipeline
from .stream import make_ssl_context

__all__ = ["parse_when", "run_backfill"]

log = structlog.get_logger("cometstream.backfill")
DAY: Final = 86400
#: ANSI "erase to the end of the line"
ERASE_LINE: Final = "\x1b[K"
JOB_COMPLETED: Final = SEVT["SEVT_JOB_COMPLETED"]


def parse_when(text: str, *, option: str) -> int:
    """Unix seconds from ``2026-11-01``, ``2026-11-01T12:30[:00][+01:00]`` (naive = local time)
    or a plain number of Unix seconds."""
    t = text.strip()
    if t.isdigit():
        return int(t)
    try:
        return int(datetime.fromisoformat(t).timestamp())
    except ValueError:
        raise UsageError(option, f'expected a date like 2026-11-01 or 2026-11-01T12:30, or Unix '
                         f'seconds like 1733400000, got "{text}"') from None


class _Progress:
    """A one-line progress bar on a terminal (stderr); silent otherwise."""

    def __init__(self, total: int, out: IO[str] = sys.stderr) -> None:
        self.total = max(total, 1)
        self.out = out
        self.tty = out.isatty()
        self._last = 0.0

    def update(self, done: int, jobs: int, label: str, *, final: bool = False) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if not final and now - self._last < 0.1:
            return
        self._last = now
        frac = min(done / self.total, 1.0)
        bar = "#" * int(frac * 30)
        # back to the line's start, the new text, then erase what a longer one left after it
        self.out.write(f"\rbackfill [{bar:<30}] {frac:4.0%}  {jobs:,} jobs  {label}{ERASE_LINE}")
        if final:
            self.out.write("\n")
        self.out.flush()


async def run_backfill(cfg: Config, *, since: int, until: int, sink_names: list[str]) -> int:
    """Replay job completions with EndTime in [since, until) to the chosen sinks; returns a count."""
    from .sinks import build_sink

    if until <= since:
        raise UsageError("--until", "must be after --since")
    chosen = [sc for sc in cfg.sinks if not sink_names or sc.name in sink_names]
    unknown = sorted(set(sink_names) - {sc.name for sc in cfg.sinks})
    if unknown:
        raise UsageError("--sink", unknown_sink(unknown[0], [sc.name for sc in cfg.sinks]))
    metrics = Metrics(cfg.server.name, CollectorRegistry())
    pipeline = Pipeline([(sc, build_sink(sc)) for sc in chosen], metrics)
    pipeline.start()
    progress = _Progress(until - since)
    count = 0
    try:
        async with AdminClient(cfg.server, ssl_context=make_ssl_context(cfg.server),
                               connect_timeout=cfg.stream.connect_timeout,
                               call_timeout=cfg.resync.call_timeout) as api:
            start = since
            while start < until:
                end = min(start + DAY, until)
                jobs = await api.jobs_for_date_range(start, end)
                batch: list[dict[str, Any]] = []
                for job in jobs:
                    guid, ended = job.get("GUID"), job.get("EndTime")
                    # a job is listed for the day it started and the day it ended: it belongs
                    # to the day it ended, so it is sent once
                    if isinstance(guid, str) and isinstance(ended, int) and start <= ended < end:
                        batch.append(job)
                batch.sort(key=lambda j: j["EndTime"])
                for job in batch:
                    doc = {"Actor": job.get("Username", ""), "OwnerOrganizationID": "",
                           "ResourceID": job["GUID"], "Type": JOB_COMPLETED,
                           "Timestamp": job["EndTime"], "TypeString": "SEVT_JOB_COMPLETED",
                           "Data": job}
                    ev = Event.synthesize(doc, origin="backfill", received_at=time.time(),
                                          server=cfg.server.name)
                    waiting = pipeline.publish(ev)
                    if waiting is not None:
                        await waiting
                    count += 1
                label = datetime.fromtimestamp(start).strftime("%Y-%m-%d")
                progress.update(end - since, count, label)
                start = end
                await asyncio.sleep(0)
        progress.update(until - since, count, "done", final=True)
    finally:
        complete = await pipeline.drain(max(cfg.shutdown_timeout, 30.0))
    delivered = {r.name: r.stats.delivered for r in pipeline.routes}
    log.info("backfill done", jobs=count, delivered=delivered, complete=complete)
    return count
