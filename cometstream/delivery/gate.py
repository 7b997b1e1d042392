"""The gate between the stream and the pipeline: de-duplication, tracking, redaction, and the
hold during a remedial sync.

Every received event goes through :meth:`Gate.publish`. While a resync runs (after each HELLO)
live events are held; the resync's synthesized events go out first (:meth:`deliver` and
:meth:`deliver_job`), then the held live events (:meth:`release`), less those that repeat what
the sync just reported. A job event whose dedup key was kept or is in flight is counted as a
duplicate and not published again.

The hold is bounded in time (``hold_timeout``, ``[resync] hold_timeout``): held events are only
in memory, so a sync that outlasts it (a slow or stalled server) releases them into the pipeline,
and the ledger keeps them as any other received event; live events then flow while the sync goes
on, and the sync's job events already delivered live are de-duplicated as usual.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import structlog

from ..events import JOB_TYPES, Event
from ..protocol import HELLO, Malformed, frame_error
from .identity import (
    ACCOUNT_NEW,
    ACCOUNT_UPDATED,
    JOB_NEW,
    Action,
    account_entry,
    action,
    job_event,
)
from .tracker import Tracker

if TYPE_CHECKING:
    from ..observe.metrics import StreamStats
    from ..redact import Redactor

__all__ = ["HOLD_MAX", "Gate", "Publish"]

#: live events held during a resync beyond this many, or this many bytes (each keeps its
#: parsed document: a few times its bytes), are released before it finishes
HOLD_MAX: Final = 200_000
HOLD_MAX_BYTES: Final = 64 * 1024 * 1024

log = structlog.get_logger("cometstream.delivery")


#: hands an event on (the pipeline's ``publish``): assigns ``ev.seq``; an awaitable if the
#: caller must wait for room
Publish = Callable[[Event], "Awaitable[None] | None"]


class Gate:
    """``publish``: where released events go (the pipeline's); ``tapped``: whether someone
    taps the published events (they are then redacted whatever the sinks take)."""

    def __init__(self, publish: Publish, tracker: Tracker, redactor: Redactor,
                 stats: StreamStats, *, routed_types: frozenset[int] | None,
                 keep_doc: bool, hold_timeout: float | None = None,
                 tapped: Callable[[], bool] = lambda: False) -> None:
        self._publish = publish
        self._tapped = tapped
        self.tracker = tracker
        self.redactor = redactor
        self.stats = stats
        #: the event types some sink takes (None: every type): others need no redaction
        self.routed_types = routed_types
        #: whether a sink reads the parsed event (else it is dropped once routed, to save memory)
        self.keep_doc = keep_doc
        self.holding = False
        #: where a held event that fails to deliver is counted (None: here, logged each time)
        self.malformed: Callable[[Malformed], None] | None = None
        #: seconds a hold lasts at most (None: until released)
        self.hold_timeout = hold_timeout
        self._hold_timer: asyncio.TimerHandle | None = None
        self._held: deque[Event] = deque()
        self._held_keys: set[str] = set()
        self._held_bytes = 0
        self._releasing: asyncio.Task[None] | None = None
        #: what the sync that just ran reported (held events that repeat it are dropped)
        self._repeat_filter: Any = None

    # --- the publish path ------------------------------------------------------------------------
    def publish(self, ev: Event) -> Awaitable[None] | None:
        """A received event: held during a resync, else delivered."""
        if self.holding and ev.type != HELLO:  # the HELLO opens the session: it goes first
            self._held.append(ev)
            self._held_bytes += len(ev.raw)
            if ev.type in JOB_TYPES:
                key = ev.dedup_key()
                if key is not None:
                    self._held_keys.add(key)
            if (len(self._held) > HOLD_MAX or self._held_bytes > HOLD_MAX_BYTES) \
                    and self._releasing is None:
                log.warning("resync is slow: releasing held live events before it finishes",
                            held=len(self._held), held_bytes=self._held_bytes)
                self.start_release()
            return None
        return self.deliver(ev)

    def deliver(self, ev: Event) -> Awaitable[None] | None:
        """Dedup, track, redact, publish: the per-event path, kept to a few calls."""
        if ev.type in JOB_TYPES:
            fp, ts, act = job_event(ev)
            if fp is not None:
                return self.deliver_job(ev, fp, ts, act)
            act = None  # a job without a GUID: not de-duplicated, nothing to track
        else:
            act = action(ev)  # before redaction: digests are of the full profile
            wanted = self.routed_types
            # (no sink takes it and nobody taps: it only passes through the private ledger)
            if wanted is None or ev.type in wanted or self._tapped():
                self.redactor.apply(ev)
        waiting = self._publish(ev)  # assigns ev.seq
        self.tracker.published(ev, act)
        if not self.keep_doc:
            ev.release_doc()  # queued events hold only their bytes
        return waiting

    def deliver_job(self, ev: Event, fp: int, ts: int, act: Action) -> Awaitable[None] | None:
        """:meth:`deliver` for a job event whose dedup fingerprint, timestamp and tracked-state
        change are known (live: from :func:`~.identity.job_event`; synthesized: from the
        resync). Job events are not redacted."""
        dedup = self.tracker.dedup
        if fp in dedup.delivered or fp in dedup.inflight:
            dedup.duplicates += 1
            self.stats.duplicates += 1
            return None
        waiting = self._publish(ev)  # assigns ev.seq
        self.tracker.published_job(ev.seq, fp, ts, act)
        if not self.keep_doc:
            ev.release_doc()
        return waiting

    # --- the hold ----------------------------------------------------------------------------------
    def hold(self) -> None:
        self.holding = True
        if self.hold_timeout is not None:
            if self._hold_timer is not None:
                self._hold_timer.cancel()
            self._hold_timer = asyncio.get_running_loop().call_later(self.hold_timeout,
                                                                     self._hold_expired)

    def _hold_expired(self) -> None:
        """The sync outlasted ``hold_timeout``: what is held is only in memory, so it goes into
        the pipeline (and the ledger) now, and live events flow from here on."""
        self._hold_timer = None
        if not self.holding or self._releasing is not None:
            return
        if self._held:
            log.info("resync still running: releasing the held live events",
                     held=len(self._held), hold_timeout=self.hold_timeout)
        self.start_release()

    def is_held(self, key: str) -> bool:
        """Whether a live event with this dedup key is held behind the sync: it is the better
        copy (the server's own bytes), so the sync leaves that job to it."""
        return key in self._held_keys

    def start_release(self) -> None:
        """Release the held events in the background (a resync failing or too slow)."""
        if self._releasing is None:
            self._releasing = asyncio.ensure_future(self.release())

    async def release(self, synced: Any = None) -> None:
        """Deliver the held events, in order, and stop holding. ``synced``: the result of the
        sync that just ran (a ResyncResult), whose reports the held events must not repeat."""
        if self._releasing is not None and self._releasing is not asyncio.current_task():
            await self._releasing
        self._repeat_filter = synced
        try:
            held = self._held
            while held:
                ev = held.popleft()
                self._held_bytes -= len(ev.raw)
                if self._repeats_sync(ev):
                    self.stats.duplicates += 1
                    continue
                try:
                    waiting = self.deliver(ev)
                except Exception as exc:  # noqa: BLE001 (one event costs one event)
                    self.failed(exc, ev)
                    continue
                if waiting is not None:
                    await waiting
            self.holding = False
            if self._hold_timer is not None:
                self._hold_timer.cancel()
                self._hold_timer = None
        finally:
            self._releasing = None
            self._repeat_filter = None
            self._held_keys.clear()

    def failed(self, exc: Exception, ev: Event) -> None:
        """A held live event whose delivery raised: skipped and counted as malformed (the
        daemon points ``malformed`` at the supervisor's counter and rate-limited log)."""
        m = frame_error(exc, ev.raw)
        if self.malformed is not None:
            self.malformed(m)
        else:
            self.stats.malformed += 1
            self.stats.malformed_by_reason[m.reason] += 1
            log.warning("malformed frame skipped", reason=m.reason, detail=m.detail)

    def _repeats_sync(self, ev: Event) -> bool:
        """A held live event that says again what the sync that just ran reported: a JOB_NEW of
        a job it reported completed, an account change it reported with the same profile."""
        res = self._repeat_filter
        if res is None:
            return False
        if ev.type == JOB_NEW:
            job = ev.job
            return job is not None and job.get("GUID") in res.completed
        if ev.type in (ACCOUNT_NEW, ACCOUNT_UPDATED) and isinstance(ev.data, dict):
            name = ev.data.get("Username")
            return isinstance(name, str) and res.accounts.get(name) == account_entry(ev.data)[0]
        return False
