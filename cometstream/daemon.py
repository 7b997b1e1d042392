"""Wires the parts together: supervisor → (gate, dedup, redaction) → pipeline → sinks, plus
remedial sync and the checkpoint, and the lifecycle around them.

``Daemon.run(stop)`` loads the checkpoint, starts the sink workers and the stream supervisor, and
waits until ``stop`` is set (SIGTERM/SIGINT) or the supervisor gives up (a rejected first login).

After every login (the HELLO), live events are held while a remedial sync runs; its synthesized
events go out first, then the held live events, de-duplicated. A resync that fails is retried
with backoff in the background, the held events being released meanwhile; until one succeeds the
watermark stays frozen before the gap. The checkpoint is written once a second when something
changed, after each resync and at shutdown.

Shutdown order: stop reading, release held events, let the sinks drain within
``shutdown.timeout``, close the sinks, write the checkpoint. The return value is the exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final

import structlog
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)

from .api import AdminClient
from .backoff import Backoff
from .config import Config, SinkConfig
from .errors import ApiError, ConfigError, CredentialsRejected
from .events import JOB_TYPES, Event
from .config import parse_listen
from .observe.http import HttpServer
from .observe.logging import register_secret
from .observe.metrics import Metrics
from .observe.systemd import Notifier
from .pipeline import Pipeline
from .protocol import HELLO
from .redact import Redactor
from .resync import (
    ACCOUNT_NEW,
    ACCOUNT_UPDATED,
    JOB_NEW,
    Action,
    ResyncResult,
    Resyncer,
    Tracker,
    account_entry,
)
from .sinks import Sink, resolve_sink_class
from .spool import Spool
from .state import StateStore
from .stream import Supervisor, make_ssl_context
from .tap import TapServer, socket_path

__all__ = ["EXIT_CREDENTIALS", "EXIT_FATAL", "EXIT_OK", "Daemon", "build_sink"]

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_CREDENTIALS = 3
#: how often the checkpoint is written when something changed (a crash re-synthesizes at most
#: this much of the job events delivered before it: their dedup keys were not saved yet)
CHECKPOINT_INTERVAL: Final = 1.0
#: live events held during a resync beyond this many are released before it finishes
HOLD_MAX: Final = 200_000

log = structlog.get_logger("cometstream.daemon")


def build_sink(cfg: SinkConfig) -> Sink:
    cls = resolve_sink_class(cfg.type, key=f"sinks.{cfg.name}.type")
    return cls.from_config(cfg.name, cfg.section())


class Daemon:
    """One server's daemon. ``sinks`` may pass ready sink objects (tests); else built from config."""

    def __init__(
        self,
        cfg: Config,
        *,
        registry: CollectorRegistry | None = None,
        sinks: dict[str, Sink] | None = None,
        rand: Callable[[], float] = random.random,
        notifier: Notifier | None = None,
        resync_retry: tuple[float, float] = (1.0, 60.0),
        http_required: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.notifier = notifier if notifier is not None else Notifier()
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        self.http: HttpServer | None = None
        self._http_required = http_required
        self.metrics = Metrics(cfg.server.name, self.registry)
        s = cfg.server
        register_secret(*s.secret_values())
        given = sinks or {}
        self.sinks = {sc.name: given.get(sc.name) or build_sink(sc) for sc in cfg.sinks}
        #: the durable spool (``[spool] buffer = "disk"``, the default), opened by run()
        self.spool = Spool(cfg.state.dir, [sc.name for sc in cfg.sinks],
                           max_bytes=cfg.spool.max_bytes, max_age=cfg.spool.max_age,
                           fsync_interval=cfg.spool.fsync_interval) if cfg.spool.disk else None
        self.pipeline = Pipeline([(sc, self.sinks[sc.name]) for sc in cfg.sinks], self.metrics,
                                 spool=self.spool, server=s.name)
        self.metrics.spool = self._spool_figures if self.spool is not None else None
        # settle acknowledgements as they come (not only once a second): what is pending stays
        # small during a burst
        self.pipeline.add_ack_listener(self._on_ack)
        self._settled_through = 0
        #: the event types some sink takes (None: every type)
        filters = [sc.types for sc in cfg.sinks]
        self._routed_types: frozenset[int] | None = (
            None if any(f is None for f in filters) else frozenset().union(*filters))
        #: whether a sink reads the parsed event (else it is dropped once routed, to save memory)
        self._keep_doc = any(getattr(sk, "uses_doc", True) for sk in self.sinks.values())
        self.supervisor = Supervisor(s, cfg.stream, self._publish, self.metrics.stream,
                                     rand=rand, on_status=self._on_status,
                                     on_hello=self._on_hello)
        self.store = StateStore(cfg.state.dir, s.name)
        #: ``cometstream tap``: a live view of the published events on a Unix socket in state.dir
        self.tap = TapServer(socket_path(cfg.state.dir), self.pipeline, server=s.name)
        self.redactor = Redactor(enabled=cfg.redact.enabled, extra_keys=cfg.redact.extra_keys)
        self.tracker = Tracker(clock=self.server_time)
        self._held_keys: set[str] = set()
        self.api = AdminClient(s, ssl_context=make_ssl_context(s),
                               connect_timeout=cfg.stream.connect_timeout)
        self.resyncer = Resyncer(self.api, self.tracker, server=s.name,
                                 overlap=cfg.resync.overlap, redactor=self.redactor,
                                 clock=self.server_time, held=self._held_keys.__contains__)
        self._release_filter: ResyncResult | None = None
        self._saving = False
        self._save_cost = 0.0
        self._resync_retry = resync_retry
        self._resync_task: asyncio.Task[None] | None = None
        self._holding = False
        self._held: deque[Event] = deque()
        self._releasing: asyncio.Task[None] | None = None
        self._skew = 0.0
        self.status = ("starting", "starting")
        self.resyncs_ok = 0
        self.last_resync: ResyncResult | None = None

    def server_time(self) -> float:
        """The server's clock: ours plus the offset its HELLO's CurrentTime showed."""
        return self.clock() + self._skew

    # --- the publish path ------------------------------------------------------------------------
    def _publish(self, ev: Event) -> Awaitable[None] | None:
        if self._holding and ev.type != HELLO:  # the HELLO opens the session: it goes first
            self._held.append(ev)
            if ev.type in JOB_TYPES:
                key = ev.dedup_key()
                if key is not None:
                    self._held_keys.add(key)
            if len(self._held) > HOLD_MAX and self._releasing is None:
                log.warning("resync is slow: releasing held live events before it finishes",
                            held=len(self._held))
                self._releasing = asyncio.ensure_future(self._release_held())
            return None
        return self._deliver(ev)

    def _deliver(self, ev: Event) -> Awaitable[None] | None:
        """Dedup, track, redact, publish: the per-event path, kept to a few calls."""
        tracker = self.tracker
        if ev.type in JOB_TYPES:
            fp, ts, action = tracker.job_event(ev)
            if fp is not None:
                return self._deliver_job(ev, fp, ts, action)
            key = None  # a job without a GUID: not de-duplicated
        else:
            key = None
            action = tracker.action(ev)  # before redaction: digests are of the full profile
            wanted = self._routed_types
            if wanted is None or ev.type in wanted:  # (no sink takes it: nothing to redact)
                self.redactor.apply(ev)
        waiting = self.pipeline.publish(ev)  # assigns ev.seq
        tracker.published(ev, key, action)
        if not self._keep_doc:
            ev.release_doc()  # queued events hold only their bytes
        return waiting

    def _duplicate(self, fp: int) -> bool:
        """A job event already delivered or in flight: counted, and not published again."""
        dedup = self.tracker.dedup
        if fp in dedup.delivered or fp in dedup.inflight:
            dedup.duplicates += 1
            self.metrics.stream.duplicates += 1
            return True
        return False

    def _deliver_job(self, ev: Event, fp: int, ts: int, action: Action) -> Awaitable[None] | None:
        """:meth:`_deliver` for a job event whose dedup fingerprint, timestamp and tracked-state
        change are known (live: from :meth:`Tracker.job_event`; synthesized: from the resync).
        Job events are not redacted."""
        if self._duplicate(fp):
            return None
        waiting = self.pipeline.publish(ev)  # assigns ev.seq
        self.tracker.published_job(ev.seq, fp, ts, action)
        if not self._keep_doc:
            ev.release_doc()
        return waiting

    def _repeats_resync(self, ev: Event) -> bool:
        """A held live event that says again what the sync that just ran reported: a JOB_NEW of
        a job it reported completed, an account change it reported with the same profile."""
        res = self._release_filter
        if res is None:
            return False
        if ev.type == JOB_NEW:
            job = ev.job
            return job is not None and job.get("GUID") in res.completed
        if ev.type in (ACCOUNT_NEW, ACCOUNT_UPDATED) and isinstance(ev.data, dict):
            name = ev.data.get("Username")
            return isinstance(name, str) and res.accounts.get(name) == account_entry(ev.data)[0]
        return False

    async def _release_held(self) -> None:
        try:
            held = self._held
            while held:
                ev = held.popleft()
                if self._repeats_resync(ev):
                    self.metrics.stream.duplicates += 1
                    continue
                waiting = self._deliver(ev)
                if waiting is not None:
                    await waiting
            self._holding = False
        finally:
            self._releasing = None
            self._release_filter = None
            self._held_keys.clear()

    # --- stream callbacks ------------------------------------------------------------------------
    def _on_status(self, state: str, detail: str) -> None:
        self.status = (state, detail)
        if state == "reconnecting" and self.cfg.resync.enabled:
            self.tracker.frozen = True  # a gap: the watermark waits for the next resync
        if state == "connected":
            n = self.metrics.stream.events_received
            detail = f"{detail}, {n:,} events".replace(",", " ")
        self.notifier.status(detail)

    def _on_hello(self, ev: Event) -> None:
        data = ev.data if isinstance(ev.data, dict) else {}
        current = data.get("CurrentTime")
        if isinstance(current, int) and current > 0:
            self._skew = current - self.clock()
        if not self.tracker.has_checkpoint and not self.tracker.baseline_before:
            self.tracker.baseline_before = int(self.server_time())
        if not self.cfg.resync.enabled:
            return
        self._holding = True
        if self._resync_task is not None:
            self._resync_task.cancel()
        self._resync_task = asyncio.ensure_future(self._resync_loop(data))
        self._resync_task.add_done_callback(self._resync_ended)

    def _resync_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # a bug, not an API failure (those are retried inside): never leave events held
        log.error("resync task failed", error=repr(task.exception()), exc_info=task.exception())
        if self._holding and self._releasing is None:
            self._releasing = asyncio.ensure_future(self._release_held())

    # --- remedial sync ---------------------------------------------------------------------------
    async def _resync_loop(self, hello: dict[str, Any]) -> None:
        stats = self.metrics.stream
        backoff = Backoff(*self._resync_retry)
        while True:
            t0 = time.monotonic()
            try:
                res = await self.resyncer.run(hello, self._deliver, self._deliver_job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                stats.resync_runs["error"] += 1
                delay = backoff.next_delay()
                if isinstance(exc, ApiError):
                    log.warning("resync failed", server=self.cfg.server.name, error=str(exc),
                                retry_in=round(delay, 1))
                else:
                    log.exception("resync failed unexpectedly", retry_in=round(delay, 1))
                self.notifier.status(f"resync failing, retry in {delay:.0f} s: {exc}")
                if self._holding and self._releasing is None:
                    await self._release_held()  # live events flow while we retry
                await asyncio.sleep(delay)
                continue
            if res.staged is not None:
                self.tracker.stage_accounts(self.pipeline.seq, *res.staged)
            duration = time.monotonic() - t0
            self.last_resync = res
            stats.resync_runs["baseline" if res.baseline else "ok"] += 1
            stats.resync_duration.observe(duration)
            for kind, n in res.kinds.items():
                stats.resync_events[kind] += n
            log.info("resync done", server=self.cfg.server.name, baseline=res.baseline,
                     events=res.count, kinds=res.kinds, since=res.window[0] or None,
                     duration=round(duration, 3))
            if self._releasing is not None:
                await self._releasing
            self._release_filter = res
            await self._release_held()
            self.tracker.frozen = False
            self.resyncs_ok += 1
            self.checkpoint(write=False)
            await self._save()
            return

    # --- checkpoint ------------------------------------------------------------------------------
    def _on_ack(self, _route: object, _batch: object) -> None:
        if self._settle_point() > self._settled_through:
            self.checkpoint(write=False)

    def _settle_point(self) -> int:
        """Up to which seq published events count as kept: durably spooled with a spool (the
        *received* watermark), else acknowledged by every sink (the delivered one)."""
        if self.spool is not None:
            return self.spool.durable_seq
        return self.pipeline.delivered_through()

    def _spool_figures(self) -> dict[str, Any]:
        spool = self.spool
        assert spool is not None
        now = time.time()
        seq = self.pipeline.seq
        lag = {}
        for r in self.pipeline.routes:
            behind = seq - r.done_through(seq)
            since = r.waiting_since()
            lag[r.name] = (behind, max(0.0, now - since) if behind and since else 0.0)
        oldest = spool.oldest_received_at
        return {"bytes": spool.bytes, "events": spool.events + len(spool.pending),
                "oldest_age": max(0.0, now - oldest) if oldest else 0.0, "lag": lag,
                "write_errors": spool.write_errors}

    def checkpoint(self, *, write: bool = True) -> None:
        """Fold acknowledgements into the tracker and (``write``) save it if anything changed."""
        live_until = None
        alive = self.supervisor.alive_at
        if alive and self.supervisor.connected and not self._holding and not self.tracker.frozen:
            # what the server sent up to our last sign of life from it (a pong or a frame) has
            # arrived: TCP keeps order. After that a half-open connection may hide events.
            live_until = alive + self._skew
        through = self._settle_point()
        self._settled_through = through
        self.tracker.settle(through, live_until=live_until)
        if write and self.tracker.changed:
            self.store.save(self.tracker.snapshot())

    async def _save(self) -> None:
        """Write the checkpoint on a thread (it can be megabytes), one write at a time."""
        if self._saving or not self.tracker.changed:
            return
        self._saving = True
        t0 = time.monotonic()
        try:
            await asyncio.to_thread(self.store.save, self.tracker.snapshot())
        finally:
            self._saving = False
            self._save_cost = time.monotonic() - t0

    async def _checkpoint_loop(self) -> None:
        ticks = 0
        while True:
            # a big checkpoint is written less often: at most ~10% of the time goes to it
            await asyncio.sleep(max(CHECKPOINT_INTERVAL, 10 * self._save_cost))
            self.checkpoint(write=False)
            await self._save()
            ticks += 1
            if ticks % 5 == 0 and self.supervisor.connected:
                n = self.metrics.stream.events_received
                self.notifier.status(f"connected to {self.cfg.server.name}, "
                                     f"{n:,} events".replace(",", " "))

    def _load_state(self) -> None:
        try:
            self.store.prepare()
        except OSError as exc:
            raise ConfigError("state.dir", f"cannot use {self.store.dir}: "
                              f"{exc.strerror or exc}") from None
        cp = self.store.load()
        if self.spool is not None:
            try:
                last = self.spool.open()
            except (OSError, sqlite3.Error) as exc:
                raise ConfigError("state.dir", f"cannot use the spool {self.spool.path}: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from None
            self.pipeline.resume(last, self.spool.cursors)
            if self.spool.quarantined is not None:
                self.metrics.stream.spool_quarantined += 1
        self.tracker = Tracker(cp, clock=self.server_time)
        self.tracker.frozen = self.tracker.has_checkpoint and self.cfg.resync.enabled
        self.resyncer.tracker = self.tracker
        if cp is not None:
            log.info("checkpoint loaded", watermark=cp.watermark, running_jobs=len(cp.running_jobs),
                     accounts=len(cp.accounts), dedup=len(self.tracker.dedup))

    # --- lifecycle -------------------------------------------------------------------------------
    def not_ready_reasons(self) -> list[str]:
        """Why /readyz says 503: not logged in to the stream, or a sink failing."""
        reasons = []
        if not self.supervisor.connected:
            state, detail = self.status
            reasons.append(f"stream: {detail}" if detail else f"stream: {state}")
        for route in self.pipeline.routes:
            if route.stats.failing:
                reasons.append(f"sink {route.name}: {route.stats.last_error or 'failing'}")
        return reasons

    async def _start_http(self) -> None:
        listen = self.cfg.http.listen
        if not listen:
            return
        host, port = parse_listen(listen)
        server = HttpServer(self.registry, self.not_ready_reasons, host=host, port=port)
        try:
            await server.start()
        except OSError as exc:
            if self._http_required:
                raise ConfigError("http.listen", f"cannot listen on {listen}: "
                                  f"{exc.strerror or exc}") from None
            log.warning("metrics endpoint not started", listen=listen,
                        error=exc.strerror or str(exc))
            return
        self.http = server
        log.info("http endpoints", url=server.url, paths="/metrics /healthz /readyz")

    def reopen(self) -> None:
        """SIGHUP: reopen the files of file sinks (logrotate)."""
        log.info("reopening files")
        self.pipeline.reopen()

    def install_signal_handlers(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reopen)

    async def run(self, stop: asyncio.Event) -> int:
        cfg = self.cfg
        self._load_state()
        await self._start_http()
        log.info("starting", server=cfg.server.name, url=cfg.server.url,
                 sinks=[f"{sc.name}:{sc.type}" for sc in cfg.sinks],
                 resync=cfg.resync.enabled, state=str(self.store.path))
        self.pipeline.start()
        await self.tap.start()
        sup = asyncio.create_task(self.supervisor.run(), name="supervisor")
        stopper = asyncio.create_task(stop.wait(), name="stop")
        watchdog = asyncio.create_task(self.notifier.watchdog(), name="watchdog")
        saver = asyncio.create_task(self._checkpoint_loop(), name="checkpoint")
        spooler = asyncio.create_task(self.spool.run(), name="spool") \
            if self.spool is not None else None
        self.notifier.ready()
        code = EXIT_OK
        try:
            await asyncio.wait({sup, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if sup.done():
                exc = sup.exception()
                if isinstance(exc, CredentialsRejected):
                    code = EXIT_CREDENTIALS
                elif exc is not None:
                    log.error("stream supervisor failed", error=f"{exc.__class__.__name__}: {exc}",
                              exc_info=exc)
                    code = EXIT_FATAL
            else:
                log.info("stopping", reason="signal")
        finally:
            self.notifier.stopping()
            self.notifier.status("stopping: draining sink queues")
            for task in (stopper, sup, self._resync_task, saver):
                if task is not None:
                    task.cancel()
            for task in (sup, self._resync_task, saver):
                if task is not None:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            self.metrics.stream.connection_up = 0
            if self._holding:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._release_held(), cfg.shutdown_timeout)
            complete = await self.pipeline.drain(cfg.shutdown_timeout)
            if spooler is not None:
                spooler.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await spooler
            if self.spool is not None:
                try:
                    await self.spool.close()  # what is pending, and every sink's cursor
                except Exception as exc:
                    log.error("spool close failed", error=str(exc))
            self.tracker.settle(self._settle_point(), live_until=None)
            self.tracker.drop_pending()
            self.store.save(self.tracker.snapshot())
            await self.api.aclose()
            await self.tap.stop()
            if self.http is not None:
                await self.http.stop()
            watchdog.cancel()
            log.info("stopped", delivered={r.name: r.stats.delivered for r in self.pipeline.routes},
                     complete=complete)
            self.notifier.close()
        return code
