"""Wires the parts together: supervisor → gate (dedup, redaction, hold) → pipeline → sinks,
plus remedial sync and the ledger, and the lifecycle around them.

``Daemon.run(stop)`` locks ``state.dir``, opens the ledger, starts the sink workers and the stream
supervisor, and waits until ``stop`` is set (SIGTERM/SIGINT) or the supervisor gives up (a
rejected first login).

After every login (the HELLO), live events are held while a remedial sync runs; its synthesized
events go out first, then the held live events, de-duplicated. A resync that fails is retried
with backoff in the background (:mod:`.catchup`), the held events being released meanwhile;
until one succeeds the watermark stays frozen before the gap. /readyz and systemd's STATUS= are
:mod:`.health`'s. The ledger commits every ``fsync_interval``: the events
some sink still needs, the cursors, and the delivery state they make true, in one transaction.

Shutdown order: stop reading, release held events, let the sinks drain within
``shutdown.timeout``, close the sinks, commit the ledger. ``run`` returns on a clean stop and
raises what stopped the supervisor otherwise (:class:`CredentialsRejected` on the first login);
the CLI turns that into an exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import time
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from ._tasks import supervise
from .api import AdminClient
from .catchup import Catchup
from .config import Config, parse_listen
from .delivery.gate import Gate
from .delivery.ledger import Ledger, Position
from .delivery.tracker import Tracker
from .errors import ConfigError, CredentialsRejected, LedgerError
from .events import Event
from .fleet import Fleet
from .health import Health
from .observe.http import HttpServer
from .observe.logging import register_secret
from .observe.metrics import Metrics
from .observe.process import standard_registry
from .observe.systemd import Notifier
from .pipeline import DiskBuffer, MemoryBuffer, Pipeline
from .preflight import dir_problem
from .redact import Redactor
from .reload import Reloader
from .resync import Resyncer, ResyncResult
from .sinks import Sink, build_sink, log_warnings
from .store import StateLock
from .store.state import StateDiff
from .stream import Supervisor, make_ssl_context
from .tap import TapServer, socket_path

__all__ = ["Daemon"]

log = structlog.get_logger("cometstream.daemon")


class _LedgerSide:
    """The daemon as the ledger's :class:`~.delivery.ledger.LedgerClient`: the pipeline's
    cursors, positions and lagging sinks, and the tracker's delivery state. The ledger is built
    before the pipeline (whose buffer is the ledger) and the tracker is replaced once the state
    is loaded: both are looked up when the ledger asks."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def cursors(self) -> dict[str, int]:
        return self._daemon.pipeline.cursors()

    def positions(self, cursors: dict[str, int]) -> dict[str, Position]:
        return self._daemon.pipeline.positions(cursors)

    def lagging(self) -> dict[str, tuple[int, frozenset[int] | None]]:
        return self._daemon.pipeline.lagging()

    def spool_dropped(self, sink: str, count: int) -> None:
        self._daemon.pipeline.spool_dropped(sink, count)

    def delivered_through(self) -> int | None:
        d = self._daemon
        return None if d.cfg.spool.disk else d.pipeline.delivered_through()

    def settle(self, through: int) -> StateDiff:
        return self._daemon._settle(through)

    def unsettle(self, diff: StateDiff) -> None:
        self._daemon.tracker.restore(diff)


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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.notifier = notifier if notifier is not None else Notifier()
        #: why run() was asked to stop (logged): the signal's name, or what the caller says
        self.stop_reason = "signal"
        #: a second SIGTERM/SIGINT came while stopping: stop without waiting for the sinks
        self.hurried = False
        self._hurry_targets: set[asyncio.Future[Any]] = set()
        if registry is None:
            # process_* from /proc/self: prometheus_client's needs /proc/stat (ProcSubset=pid)
            registry = standard_registry()
        self.registry = registry
        self.http: HttpServer | None = None
        self.metrics = Metrics(cfg.server.name, self.registry)
        s = cfg.server
        register_secret(*s.secret_values())
        given = sinks or {}
        self.sinks = {sc.name: given.get(sc.name) or build_sink(sc) for sc in cfg.sinks}
        #: the ledger: delivery state, cursors and (``[spool] buffer = "disk"``, the default)
        #: the spooled events, in one store; opened by run()
        self.ledger = Ledger(cfg.state.dir, [sc.name for sc in cfg.sinks], server=s.name,
                             max_bytes=cfg.spool.max_bytes, max_age=cfg.spool.max_age,
                             fsync_interval=cfg.spool.fsync_interval, events=cfg.spool.disk,
                             client=_LedgerSide(self))
        self.lock = StateLock(cfg.state.dir)
        self.pipeline = Pipeline([(sc, self.sinks[sc.name]) for sc in cfg.sinks], self.metrics,
                                 buffer=DiskBuffer(self.ledger) if cfg.spool.disk
                                 else MemoryBuffer(self.ledger), server=s.name)
        self.pipeline.add_ack_listener(self._on_ack)
        self._settled_through = 0
        self.metrics.spool = self._spool_figures if cfg.spool.disk else None
        self.metrics.lag = self._lag_figures  # either buffer: CometstreamSinkLagging
        #: ``cometstream tap``: a live view of the published events on a Unix socket in state.dir
        self.tap = TapServer(socket_path(cfg.state.dir), self.pipeline, server=s.name)
        self.redactor = Redactor(enabled=cfg.redact.enabled, extra_keys=cfg.redact.extra_keys)
        self.tracker = Tracker(clock=self.server_time)
        filters = [sc.types for sc in cfg.sinks]
        routed = [f for f in filters if f is not None]
        #: (its filters are worked out again when a reload changes the sinks: routes_changed)
        #: the gate hands events to the pipeline through its publish callable, and asks it
        #: whether anyone taps (then every event is redacted): it holds nothing else of it
        self.gate = Gate(self.pipeline.publish, self.tracker, self.redactor, self.metrics.stream,
                         routed_types=None if len(routed) < len(filters)
                         else frozenset[int]().union(*routed),
                         keep_doc=any(sk.uses_doc for sk in self.sinks.values()),
                         hold_timeout=cfg.resync.hold_timeout, tapped=self.pipeline.tapped)
        self._rand = rand
        self.supervisor = self._make_supervisor(cfg)
        self.api = self._make_api(cfg)
        #: the running supervisor's task (a reload that changes [server] replaces it)
        self._stream_task: asyncio.Task[None] | None = None
        #: /readyz and systemd's STATUS=
        self.health = Health(self)
        self.resyncer = Resyncer(self.api, self.tracker, server=s.name,
                                 overlap=cfg.resync.overlap, redactor=self.redactor,
                                 clock=self.server_time, held=self.gate.is_held,
                                 on_progress=self.health.resync_progress)
        self.metrics.stream.resync_progress = self.health.resync_share
        #: ``[fleet]``: the Comet fleet's cometserver_* metrics; it sees every live event first
        self.fleet = Fleet(cfg.fleet, self.api, server=s.name, clock=self.server_time,
                           retry=resync_retry, timeout=cfg.resync.timeout) \
            if cfg.fleet.enabled else None
        if self.fleet is not None:
            self.supervisor.publish = self.fleet.tap(self.gate.publish)
        #: SIGHUP: the configuration read again, and what changed applied
        self.reloader = Reloader(self)
        self.metrics.reload_ok_at = self.clock()  # (the configuration loaded at start)
        #: the remedial sync after each HELLO, retried until one succeeds
        self.catchup = Catchup(self, resync_retry)
        self._skew = 0.0
        #: background tasks that died of a bug, by name: why (/readyz; cometstream._tasks)
        self.dead_tasks: dict[str, str] = {}

    def _make_supervisor(self, cfg: Config) -> Supervisor:
        sup = Supervisor(cfg.server, cfg.stream, self.gate.publish, self.metrics.stream,
                         rand=self._rand, on_status=self._on_status, on_hello=self._on_hello)
        self.gate.malformed = sup.malformed  # held events that fail, counted alike
        return sup

    @staticmethod
    def _make_api(cfg: Config) -> AdminClient:
        s = cfg.server
        return AdminClient(s, ssl_context=make_ssl_context(s),
                           connect_timeout=cfg.stream.connect_timeout,
                           call_timeout=cfg.resync.call_timeout)

    # --- reload ----------------------------------------------------------------------------------
    def routes_changed(self) -> None:
        """Sinks came or went (a reload): what the gate works out from their filters."""
        filters = [sc.types for sc in self.cfg.sinks]
        routed = [f for f in filters if f is not None]
        self.gate.routed_types = (None if len(routed) < len(filters)
                                  else frozenset[int]().union(*routed))
        self.gate.keep_doc = any(sk.uses_doc for sk in self.sinks.values())

    async def reconnect(self) -> None:
        """A reload changed ``[server]`` or ``[stream]``: a new connection with the new
        settings (the old one is closed), followed by the remedial sync as after any login."""
        old, old_api = self.supervisor, self.api
        sup = self._make_supervisor(self.cfg)
        sup.ever_logged_in = old.ever_logged_in  # (a rejection now is not a first login's)
        sup.publish = old.publish
        self.api = self._make_api(self.cfg)
        self.resyncer.api = self.api
        if self.fleet is not None:
            self.fleet.api = self.api
        if self.catchup.task is not None:
            self.catchup.task.cancel()
        self.supervisor = sup
        running = self._stream_task
        if running is not None:
            self._stream_task = asyncio.create_task(sup.run(), name="supervisor")
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
        self.metrics.stream.connection_up = 0
        self._on_status("reconnecting", "configuration reloaded")
        await old_api.aclose()

    async def _stream(self) -> None:
        """The supervisor's task, followed across the reconnects of reloads: returns (or raises)
        as the one running at the end does."""
        while True:
            task = self._stream_task
            assert task is not None
            await asyncio.wait({task})
            if task is self._stream_task:
                return task.result()

    # --- what tests and tools read, kept where they read it --------------------------------------
    @property
    def status(self) -> tuple[str, str]:
        """The stream's last state and its detail (:attr:`Health.status`)."""
        return self.health.status

    @property
    def resyncs_ok(self) -> int:
        """Remedial syncs that succeeded since the start."""
        return self.catchup.resyncs_ok

    @property
    def last_resync(self) -> ResyncResult | None:
        """The last remedial sync that succeeded."""
        return self.catchup.last_resync

    def not_ready_reasons(self) -> list[str]:
        """Why /readyz says 503 (:meth:`Health.not_ready_reasons`)."""
        return self.health.not_ready_reasons()

    def dead_task_reasons(self) -> dict[str, str]:
        """Background tasks that died of a bug, the fleet's included, by name: why."""
        dead = dict(self.dead_tasks)
        if self.fleet is not None:
            dead.update(self.fleet.dead_tasks)
        return dead

    def server_time(self) -> float:
        """The server's clock: ours plus the offset its HELLO's CurrentTime showed."""
        return self.clock() + self._skew

    # --- stream callbacks ------------------------------------------------------------------------
    def _on_status(self, state: str, detail: str) -> None:
        self.health.stream_status(state, detail)
        if self.fleet is not None:
            self.fleet.connection(state == "connected")
        if state == "reconnecting" and self.cfg.resync.enabled:
            self.tracker.frozen = True  # a gap: the watermark waits for the next resync

    def _on_hello(self, ev: Event) -> None:
        data = ev.data if isinstance(ev.data, dict) else {}
        current = data.get("CurrentTime")
        if isinstance(current, int) and current > 0:
            self._skew = current - self.clock()
        if not self.tracker.has_checkpoint and not self.tracker.baseline_before:
            self.tracker.baseline_before = int(self.server_time())
        self.api.fresh()  # (the answers of the sync and the seed are after this HELLO)
        if self.fleet is not None:
            self.fleet.hello(data)  # (with the sync: their list-users-full is one request)
        if self.cfg.resync.enabled:
            self.catchup.start(data)

    # --- the ledger ------------------------------------------------------------------------------
    def _settle(self, through: int) -> StateDiff:
        """For the ledger's commit: every event up to ``through`` is kept; settle it and hand over
        what changed in the delivery state."""
        self._settled_through = max(self._settled_through, through)
        self.tracker.settle(through, live_until=self._live_until())
        return self.tracker.diff()

    def _live_until(self) -> float | None:
        alive = self.supervisor.alive_at
        if alive and self.supervisor.connected and not self.gate.holding \
                and not self.tracker.frozen:
            # what the server sent up to our last sign of life from it (a pong or a frame) has
            # arrived: TCP keeps order. After that a half-open connection may hide events.
            return alive + self._skew
        return None

    def _on_ack(self, _route: object, _batch: object) -> None:
        """Settle as acknowledgements come, not only at commits: what the tracker holds pending
        stays small in a burst (its changes wait in the tracker for the next commit)."""
        point = self.ledger.durable_seq if self.cfg.spool.disk \
            else self.pipeline.delivered_through()
        if point > self._settled_through:
            self._settled_through = point
            self.tracker.settle(point, live_until=self._live_until())

    def _report_left(self) -> None:
        """At shutdown, per sink, what the ledger really holds for it (counted in the file,
        with its filter, after the last commit) and what is lost (never committed: a full
        disk), not what was hoped."""
        left = self.ledger.left
        if left is None:
            return
        for name, (kept, lost) in left.items():
            if kept and self.cfg.spool.disk:
                log.info("events stay in the ledger for the next start", sink=name,
                         events=kept)
            if lost:
                log.error("events lost for this sink: the ledger's last commit failed",
                          sink=name, events=lost, error=self.ledger.last_error or None)

    def _lag_figures(self) -> dict[str, tuple[int, float]]:
        """Per sink: the events received that it has not got yet, and the age of the oldest
        of them (in its memory queue, in flight, or in the ledger)."""
        now = time.time()
        seq = self.pipeline.seq
        lag = {}
        for r in self.pipeline.routes:
            behind = seq - r.done_through(seq)
            since = r.waiting_since()
            lag[r.name] = (behind, max(0.0, now - since) if behind and since else 0.0)
        return lag

    def _spool_figures(self) -> dict[str, Any]:
        spool = self.ledger
        now = time.time()
        oldest = spool.oldest_received_at
        return {"bytes": spool.bytes, "events": spool.events + len(spool.pending),
                "oldest_age": max(0.0, now - oldest) if oldest else 0.0,
                "write_errors": spool.write_errors}

    def _load_state(self) -> None:
        d = self.cfg.state.dir
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o750)
            self.lock.acquire()
        except LedgerError as exc:
            raise ConfigError("state.dir", str(exc)) from None
        except OSError as exc:  # in check's words ("not a directory", not "File exists")
            raise ConfigError("state.dir", dir_problem(d) or f"cannot use {d}: "
                              f"{exc.strerror or exc}") from None
        try:
            last = self.ledger.open()
        except LedgerError as exc:
            raise ConfigError("state.dir", str(exc)) from None
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError("state.dir", f"cannot use the ledger {self.ledger.path}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        if self.cfg.spool.disk:
            self.pipeline.resume(last, self.ledger.cursors)
        self.pipeline.recover(self.ledger.positions)
        if self.ledger.quarantined is not None:
            self.metrics.stream.spool_quarantined += 1
        st = self.ledger.state
        self.tracker = Tracker(st, clock=self.server_time)
        self.tracker.frozen = self.tracker.has_checkpoint and self.cfg.resync.enabled
        self.resyncer.tracker = self.tracker
        self.gate.tracker = self.tracker
        if not self.cfg.resync.enabled:  # (else the first sync that succeeds ends it)
            self.pipeline.end_recovery()
        if st.watermark or st.dedup:
            log.info("ledger loaded", watermark=st.watermark, running_jobs=len(st.running_jobs),
                     accounts=len(st.accounts), dedup=len(self.tracker.dedup),
                     migrated=self.ledger.migrated)

    # --- lifecycle -------------------------------------------------------------------------------
    async def _start_http(self) -> None:
        listen = self.cfg.http.listen
        if not listen:
            return
        host, port = parse_listen(listen)
        server = HttpServer(self.registry, self.health.not_ready_reasons, host=host, port=port,
                            extra=self.fleet.render if self.fleet is not None else None,
                            extra_gzip=(self.fleet.render_gzip if self.fleet is not None
                                        else None), info=self.health.ready_info)
        try:
            await server.start()
        except OSError as exc:
            # a busy port is a configuration error (exit 2), for run and demo alike
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ConfigError("http.listen", f"cannot listen on {listen}: {why}") from None
        self.http = server
        log.info("http endpoints", url=server.url, paths="/metrics /healthz /readyz")

    def reopen(self) -> None:
        """SIGHUP: reopen the files of file sinks (logrotate)."""
        log.info("reopening files")
        self.pipeline.reopen()

    def hangup(self) -> None:
        """SIGHUP: reopen the files of file sinks (logrotate), then reload the configuration."""
        self.reopen()
        self.reloader.request()

    def install_signal_handlers(self, stop: asyncio.Event) -> None:
        """SIGTERM and SIGINT stop; SIGHUP reopens the files of file sinks and reloads the
        configuration (:class:`~.reload.Reloader`), unless it says that
        the terminal the daemon runs on (in the foreground) has gone: then it stops too, rather
        than live on, orphaned, writing to a terminal that is no more."""
        loop = asyncio.get_running_loop()
        ttys = [fd for fd in (0, 1, 2) if os.isatty(fd)]

        def stop_for(reason: str) -> None:
            self.stop_reason = reason
            stop.set()

        def signalled(name: str) -> None:
            if stop.is_set():  # already stopping: a second signal means "now"
                self.hurry(name)
            else:
                stop_for(name)

        def hangup() -> None:
            if ttys and not any(os.isatty(fd) for fd in ttys):  # (a hung-up tty is none)
                if stop.is_set():
                    return
                stop_for("terminal hung up")
                devnull = os.open(os.devnull, os.O_RDWR)  # (writing there fails: EIO)
                for fd in ttys:
                    os.dup2(devnull, fd)
                os.close(devnull)
            elif not stop.is_set():
                self.hangup()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, signalled, sig.name)
        loop.add_signal_handler(signal.SIGHUP, hangup)

    def hurry(self, reason: str) -> None:
        """A second SIGTERM/SIGINT while stopping: stop waiting for the sinks at once, as when
        ``shutdown.timeout`` runs out (what they have not got stays in the ledger, with the disk
        buffer; the ledger is still committed and closed)."""
        if self.hurried:
            return
        self.hurried = True
        left = ("stays in the ledger for the next start" if self.cfg.spool.disk
                else "is dropped (buffer = \"memory\")")
        log.warning("second signal: stopping now, without waiting for the sinks", signal=reason,
                    undelivered=left)
        for task in self._hurry_targets:
            task.cancel()
        for route in self.pipeline.routes:  # (the drain then ends as at its timeout)
            if route.task is not None and not route.task.done():
                route.task.cancel()

    async def _unless_hurried(self, aw: Coroutine[Any, Any, Any], timeout: float) -> None:
        """``aw`` within ``timeout`` seconds, cut short by :meth:`hurry` (either way, silently)."""
        if self.hurried:
            aw.close()
            return
        task = asyncio.ensure_future(aw)
        self._hurry_targets.add(task)
        try:
            await asyncio.wait({task}, timeout=timeout)
        finally:
            self._hurry_targets.discard(task)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        elif not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]

    async def run(self, stop: asyncio.Event,
                  started: Callable[[], None] | None = None) -> None:
        """Until ``stop`` is set (or the credentials are rejected); ``started`` is called once
        the state is loaded and the HTTP endpoints listen. Raises, after the shutdown, what
        stopped the supervisor (:class:`CredentialsRejected` on the first login)."""
        cfg = self.cfg
        self._load_state()
        await self._start_http()
        if started is not None:
            started()
        log.info("starting", server=cfg.server.name, url=cfg.server.url,
                 sinks=[f"{sc.name}:{sc.type}" for sc in cfg.sinks],
                 resync=cfg.resync.enabled, state=str(self.ledger.path))
        for name, sink in self.sinks.items():
            log_warnings(name, sink)
        self.pipeline.start()
        await self.tap.start()
        self._stream_task = asyncio.create_task(self.supervisor.run(), name="supervisor")
        sup = asyncio.create_task(self._stream(), name="stream")
        stopper = asyncio.create_task(stop.wait(), name="stop")
        watchdog = asyncio.create_task(self.notifier.watchdog(), name="watchdog")
        saver = asyncio.create_task(self.health.status_loop(), name="status")
        # (the loop fails its own waiters if it dies: the rule adds the log line and /readyz)
        spooler = supervise(asyncio.create_task(self.ledger.run(), name="ledger"), "ledger",
                            lambda died: self.dead_tasks.__setitem__(died.task, str(died)))
        if self.fleet is not None:
            self.fleet.start()
        self.notifier.ready()
        self.reloader.started.set()
        failure: BaseException | None = None
        try:
            await asyncio.wait({sup, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if sup.done():
                failure = sup.exception()
                if failure is not None and not isinstance(failure, CredentialsRejected):
                    log.error("stream supervisor failed",
                              error=f"{failure.__class__.__name__}: {failure}")
            else:
                log.info("stopping", reason=self.stop_reason, drain_timeout=cfg.shutdown_timeout,
                         hint="a second SIGTERM or Ctrl-C stops without waiting for the sinks")
        finally:
            self.notifier.stopping()
            self.notifier.status("stopping: draining sink queues")
            reload = self.reloader.task
            if reload is not None:
                reload.cancel()
                await asyncio.gather(reload, return_exceptions=True)
            for task in (stopper, sup, self._stream_task, self.catchup.task, saver):
                if task is not None:
                    task.cancel()
            for task in (sup, self._stream_task, self.catchup.task, saver):
                if task is not None:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            self.metrics.stream.connection_up = 0
            if self.gate.holding:
                await self._unless_hurried(self.gate.release(), cfg.shutdown_timeout)
            complete = await self.pipeline.drain(0.0 if self.hurried else cfg.shutdown_timeout)
            self.ledger.stop()  # after the commit in progress, if any
            try:
                await asyncio.wait_for(asyncio.shield(spooler), max(cfg.shutdown_timeout, 5.0))
            except (TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001 - any end
                spooler.cancel()  # of the wait: the commit loop stops here (its failure is logged)
            try:
                # what is pending, every sink's cursor, and the state they make true
                await self.ledger.close({r.name: r.types for r in self.pipeline.routes})
            except Exception as exc:  # noqa: BLE001 - shutting down: say it, stop anyway
                log.error("ledger close failed", error=str(exc))
            self._report_left()
            self.tracker.drop_pending()
            self.lock.release()
            if self.fleet is not None:
                await self.fleet.aclose()
            await self.api.aclose()
            await self.tap.stop()
            if self.http is not None:
                await self.http.stop()
            watchdog.cancel()
            log.info("stopped", delivered={r.name: r.stats.delivered for r in self.pipeline.routes},
                     complete=complete)
            self.notifier.close()
        if failure is not None:
            raise failure
