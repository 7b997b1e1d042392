"""The daemon as seen from outside while it runs: ``/readyz`` and systemd's ``STATUS=``.

:class:`Health` answers why the daemon is not ready (not logged in to the stream, a sink
failing, the ledger's writes failing, remedial syncs failing or past their deadline, a
background task dead), with what a long sync has done so far beside it, and keeps systemd's
``STATUS=`` line: the stream's state, refreshed every :data:`STATUS_INTERVAL` while connected
(and counting down while it waits to reconnect), and a long sync's progress.

It reads the daemon's parts when asked, never copies them: it is built before some of them (the
resyncer reports its progress to it), and a figure read at a request is that moment's.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Final

import structlog

from .observe.logging import scrub
from .observe.systemd import connected_status

if TYPE_CHECKING:
    from .daemon import Daemon
    from .resync import ResyncResult

__all__ = ["LEDGER_UNREADY_AFTER", "STATUS_INTERVAL", "Health"]

#: how often systemd's STATUS= is refreshed while connected
STATUS_INTERVAL: Final = 5.0
#: /readyz says 503 once the ledger's commits have failed this long (seconds)
LEDGER_UNREADY_AFTER: Final = 10.0

log = structlog.get_logger("cometstream.daemon")  # (the daemon's log)


class Health:
    """One daemon's readiness and status line."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        #: the stream's last state and its detail, as the supervisor reported them
        self.status = ("starting", "starting")

    # --- systemd's STATUS= -----------------------------------------------------------------------
    def stream_status(self, state: str, detail: str) -> None:
        """The supervisor's report: kept for /readyz, and said to systemd."""
        self.status = (state, detail)
        if state == "connected":
            detail = self._connected_status()
        self._daemon.notifier.status(detail)

    def _connected_status(self) -> str:
        d = self._daemon
        return connected_status(d.cfg.server.name, d.metrics.stream.events_received)

    async def status_loop(self) -> None:
        """Refreshes STATUS= while connected, and counts down to the next connection attempt."""
        d = self._daemon
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            if d.supervisor.connected:
                d.notifier.status(self._connected_status())
            elif self.status[0] == "reconnecting":  # counts down to the next attempt
                d.notifier.status(d.supervisor.reconnecting())

    # --- a long remedial sync, seen from outside -------------------------------------------------
    def resync_share(self) -> tuple[float, int]:
        """The share of its job window the running sync has read, and its events so far."""
        res = self._daemon.resyncer.current
        return (res.progress(), res.count) if res is not None else (0.0, 0)

    def resync_progress(self, res: ResyncResult) -> None:
        """Every few seconds of a long sync: a log line and systemd's STATUS."""
        d = self._daemon
        started = d.metrics.stream.resync_started
        elapsed = time.monotonic() - started if started else 0.0
        pct = res.progress() * 100
        log.info("resync progress", server=d.cfg.server.name, progress_pct=round(pct, 1),
                 events=res.count, read_until=res.position, seconds=round(elapsed, 1),
                 events_per_second=round(res.count / elapsed) if elapsed > 0 else None)
        d.notifier.status(f"catching up: {pct:.0f}% of the job window read, "
                          f"{res.count:,} events synthesized")

    def ready_info(self) -> dict[str, Any]:
        """/readyz's body beside the reasons: a sync catching up (not a reason to be unready:
        the stream is live and the sinks are writing)."""
        d = self._daemon
        res = d.resyncer.current
        if res is None or not res.window[1]:
            return {}
        started = d.metrics.stream.resync_started
        return {"catching_up": {
            "progress": round(res.progress(), 4), "events": res.count,
            "read_until": res.position, "window": list(res.window),
            "seconds": round(time.monotonic() - started, 1) if started else 0.0}}

    # --- /readyz ---------------------------------------------------------------------------------
    def not_ready_reasons(self) -> list[str]:
        """Why /readyz says 503: not logged in to the stream, a sink failing, remedial syncs
        failing or past their deadline (:meth:`_resync_reasons`), or a background task dead. The details
        hold what the server or a receiver answered: masked like the logs (``scrub``)."""
        d = self._daemon
        reasons = []
        if not d.supervisor.connected:
            state, detail = self.status
            if state == "reconnecting":
                detail = d.supervisor.reconnecting()  # the wait left, as of now
            reasons.append(f"stream: {scrub(detail)}" if detail else f"stream: {state}")
        for route in d.pipeline.routes:
            if route.stats.failing:
                # a SinkError names its sink already ("sink archive: disk full")
                prefix = f"sink {route.name}: "
                why = route.stats.last_error.removeprefix(prefix)
                reasons.append(prefix + (scrub(why) if why else "failing"))
        ledger = d.ledger
        if ledger.last_error and time.monotonic() - ledger.failing_since >= LEDGER_UNREADY_AFTER:
            reasons.append(f"ledger: writes failing for "
                           f"{time.monotonic() - ledger.failing_since:.0f} s: "
                           f"{scrub(ledger.last_error)}")
        reasons.extend(self._resync_reasons())
        reasons.extend(scrub(why) for why in d.dead_task_reasons().values())
        return reasons

    def _resync_reasons(self) -> list[str]:
        """/readyz: a sync running past its deadline, or failed syncs (since the last good
        one) beyond ``unready_after_failures`` or ``unready_after_seconds``."""
        d = self._daemon
        rs = d.cfg.resync
        stats = d.metrics.stream
        now = time.monotonic()
        out = []
        if stats.resync_started and now - stats.resync_started > rs.timeout:
            out.append(f"resync: running for {now - stats.resync_started:.0f} s, past its "
                       f"deadline (resync.timeout = {rs.timeout:g} s)")
        n = stats.resync_failures
        if n:
            failing = now - d.catchup.failing_since
            if n >= rs.unready_after_failures or failing >= rs.unready_after_seconds:
                runs = "run" if n == 1 else "runs"
                out.append(f"resync: {n} failed {runs} since the last good one, failing for "
                           f"{failing:.0f} s: {scrub(d.catchup.last_error)[:300]}")
        return out
