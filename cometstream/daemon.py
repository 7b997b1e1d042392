"""Wires the parts together: sinks → pipeline ← supervisor, and the lifecycle around them.

``Daemon.run(stop)`` starts the sink workers, then the stream supervisor, and waits until
``stop`` is set (SIGTERM/SIGINT) or the supervisor gives up (a rejected first login). Shutdown
order: stop reading the stream, let the sinks drain their queues within ``shutdown.timeout``,
close the sinks. The return value is the process exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from collections.abc import Callable

import structlog
from prometheus_client import CollectorRegistry

from .config import Config, SinkConfig
from .errors import CredentialsRejected
from .events import Event
from .observe.logging import register_secret
from .observe.metrics import Metrics
from .observe.systemd import Notifier
from .pipeline import Pipeline
from .sinks import Sink, resolve_sink_class
from .stream import Supervisor

__all__ = ["EXIT_CREDENTIALS", "EXIT_FATAL", "EXIT_OK", "Daemon", "build_sink"]

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_CREDENTIALS = 3

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
    ) -> None:
        self.cfg = cfg
        self.notifier = notifier if notifier is not None else Notifier()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(cfg.server.name, self.registry)
        s = cfg.server
        for secret in (s.password, s.totp_secret, s.session_key):
            if secret is not None:
                register_secret(secret.reveal())
        given = sinks or {}
        self.sinks = {sc.name: given.get(sc.name) or build_sink(sc) for sc in cfg.sinks}
        self.pipeline = Pipeline([(sc, self.sinks[sc.name]) for sc in cfg.sinks], self.metrics)
        self.supervisor = Supervisor(s, cfg.stream, self._publish, self.metrics.stream,
                                     rand=rand, on_status=self._on_status)
        self.status = ("starting", "starting")
        self.started = asyncio.Event()

    def _publish(self, ev: Event):  # type: ignore[no-untyped-def]
        return self.pipeline.publish(ev)

    def _on_status(self, state: str, detail: str) -> None:
        self.status = (state, detail)
        if state == "connected":
            detail = f"{detail}, {self.metrics.stream.events_received} events so far"
        self.notifier.status(detail)

    @property
    def ready(self) -> bool:
        return self.supervisor.connected and not self.pipeline.failing_sinks

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
        log.info("starting", server=cfg.server.name, url=cfg.server.url,
                 sinks=[f"{sc.name}:{sc.type}" for sc in cfg.sinks])
        self.pipeline.start()
        sup = asyncio.create_task(self.supervisor.run(), name="supervisor")
        stopper = asyncio.create_task(stop.wait(), name="stop")
        watchdog = asyncio.create_task(self.notifier.watchdog(), name="watchdog")
        self.notifier.ready()
        self.started.set()
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
            stopper.cancel()
            sup.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sup
            self.metrics.stream.connection_up = 0
            complete = await self.pipeline.drain(cfg.shutdown_timeout)
            watchdog.cancel()
            log.info("stopped", delivered={r.name: r.stats.delivered for r in self.pipeline.routes},
                     complete=complete)
            self.notifier.close()
        return code
