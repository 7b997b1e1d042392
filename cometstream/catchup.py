"""The remedial sync after each login, run in the background until one succeeds.

At every HELLO :meth:`Catchup.start` holds the live events and starts a sync (cancelling one
still running from an earlier HELLO). A sync has a deadline as a whole (``resync.timeout``); one
that fails is retried with backoff, the held events being released meanwhile, and until one
succeeds the watermark stays frozen before the gap. The first success after the start ends the
sinks' crash recovery. The task follows the daemon's one rule for background tasks
(:mod:`cometstream._tasks`): should it die of a bug, :meth:`Catchup._died` records it.

:class:`~cometstream.resync.Resyncer` runs one sync; this is the loop around it. It reaches the
gate, the tracker, the pipeline and the ledger through the daemon when it needs them: the tracker
is replaced once the ledger is loaded.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import structlog

from ._tasks import supervise
from .backoff import Backoff
from .errors import ApiError, TaskDied

if TYPE_CHECKING:
    from .daemon import Daemon
    from .resync import ResyncResult

__all__ = ["Catchup"]

log = structlog.get_logger("cometstream.daemon")  # (the daemon's log)


class Catchup:
    """One daemon's remedial syncs; ``retry`` is the backoff between failed runs (initial, cap)."""

    def __init__(self, daemon: Daemon, retry: tuple[float, float]) -> None:
        self._daemon = daemon
        self._retry = retry
        self.task: asyncio.Task[None] | None = None
        self._recovered = False
        self.resyncs_ok = 0
        self.last_resync: ResyncResult | None = None
        #: since the first of the failed syncs in a row (monotonic; 0 = the last one succeeded),
        #: and why the latest failed: /readyz (their count is ``metrics.stream.resync_failures``)
        self.failing_since = 0.0
        self.last_error = ""

    def start(self, hello: dict[str, Any]) -> None:
        """A HELLO: hold the live events and sync (a sync still running is cancelled)."""
        d = self._daemon
        d.gate.hold()
        if self.task is not None:
            self.task.cancel()
        d.dead_tasks.pop("resync", None)  # (a new sync: the last one's death is history)
        self.task = supervise(asyncio.ensure_future(self._loop(hello)), "resync", self._died)

    def _died(self, died: TaskDied) -> None:
        """The sync's task died of a bug (API failures are retried inside it; the death is
        logged by ``supervise``): a failed run on the metrics, a reason on /readyz, and the
        events it held are let go. The watermark stays frozen before the gap until a sync
        succeeds (the next HELLO starts one)."""
        d = self._daemon
        stats = d.metrics.stream
        stats.resync_started = 0.0
        stats.resync_runs["error"] += 1
        d.dead_tasks[died.task] = str(died)
        if d.gate.holding:
            d.gate.start_release()

    async def _loop(self, hello: dict[str, Any]) -> None:
        d = self._daemon
        stats = d.metrics.stream
        backoff = Backoff(*self._retry)
        limit = d.cfg.resync.timeout
        while True:
            t0 = time.monotonic()
            stats.resync_started = t0  # its age: cometstream_resync_running_seconds, /readyz
            # the whole sync has a deadline: a server that answers slowly enough (a byte a
            # second) would otherwise hold it, and the watermark, for ever
            deadline = asyncio.timeout(limit)
            try:
                async with deadline:
                    res = await d.resyncer.run(hello, d.gate.deliver, d.gate.deliver_job)
            except asyncio.CancelledError:
                if stats.resync_started == t0:  # (not a newer loop's: a HELLO restarts it)
                    stats.resync_started = 0.0
                raise
            except Exception as exc:  # noqa: BLE001 - said by _failed, and retried
                delay = self._failed(exc, t0, backoff, expired=deadline.expired())
                if d.gate.holding:
                    await d.gate.release()  # live events flow while we retry
                await asyncio.sleep(delay)
                continue
            await self._succeeded(res, t0)
            return

    def _failed(self, exc: Exception, t0: float, backoff: Backoff, *, expired: bool) -> float:
        """A failed run, said and counted; the delay before the next."""
        d = self._daemon
        stats = d.metrics.stream
        limit = d.cfg.resync.timeout
        stats.resync_started = 0.0
        stats.resync_runs["error"] += 1
        stats.resync_failures += 1
        if stats.resync_failures == 1:
            self.failing_since = t0
        delay = backoff.next_delay()
        if isinstance(exc, TimeoutError) and expired:
            why = f"not finished within {limit:g} s (resync.timeout): cancelled"
            log.warning("resync failed", server=d.cfg.server.name, error=why,
                        failures=stats.resync_failures, retry_in=round(delay, 1))
        elif isinstance(exc, ApiError):
            why = str(exc)
            log.warning("resync failed", server=d.cfg.server.name, error=why,
                        failures=stats.resync_failures, retry_in=round(delay, 1))
        else:
            why = f"{exc.__class__.__name__}: {exc}"
            log.exception("resync failed unexpectedly", retry_in=round(delay, 1))
        self.last_error = why
        d.notifier.status(f"resync failing, retry in {delay:.0f} s: {why}")
        return delay

    async def _succeeded(self, res: ResyncResult, t0: float) -> None:
        """A run that succeeded: counted, its events released, the watermark thawed."""
        d = self._daemon
        stats = d.metrics.stream
        stats.resync_started = 0.0
        stats.resync_failures = 0
        self.failing_since = 0.0
        self.last_error = ""
        if res.staged is not None:
            d.tracker.stage_accounts(d.pipeline.seq, *res.staged)
        duration = time.monotonic() - t0
        self.last_resync = res
        stats.resync_runs["baseline" if res.baseline else "ok"] += 1
        stats.resync_duration.observe(duration)
        for kind, n in res.kinds.items():
            stats.resync_events[kind] += n
        log.info("resync done", server=d.cfg.server.name, baseline=res.baseline,
                 events=res.count, kinds=res.kinds, since=res.window[0] or None,
                 duration=round(duration, 3))
        await d.gate.release(res)
        d.tracker.frozen = False
        self.resyncs_ok += 1
        if not self._recovered:
            # what a crash left in the sinks' output is recognised until every sink has
            # what was published so far (the store's events, this sync's)
            self._recovered = True
            d.pipeline.end_recovery()
        d.ledger.kick()
