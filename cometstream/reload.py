"""What a configuration reload (SIGHUP) changes: the difference between the running
configuration and a new one, as a plan, without I/O.

The daemon validates the new file whole (the parse and validation ``run`` and ``check`` use),
then asks :func:`plan_reload` what differs. Keys a running process cannot change refuse the
reload as a whole ("restart to change KEY"); the rest is applied, and only where it changed:

- ``[sinks.NAME]``: added (starts at the live head), removed (stops; its cursor is dropped) or
  changed (swapped for a new instance with the new settings, from its cursor); an unchanged
  sink is not touched.
- ``[log] level`` and ``[shutdown] timeout``: at once.
- ``[server]``, ``[stream]``: a reconnect, followed by the remedial sync as after any login.

Everything else needs a restart; see :data:`RESTART_KEYS`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Final

import structlog

from .errors import ConfigError, ConfigErrors

if TYPE_CHECKING:
    from .config import Config, SinkConfig
    from .daemon import Daemon
    from .sinks import Sink

__all__ = ["RESTART_KEYS", "ReloadPlan", "Reloader", "plan_reload"]

log = structlog.get_logger("cometstream.reload")

#: the sections (or keys) a running daemon cannot change: they set up its state directory, its
#: listening socket, its ledger or the fleet exporter once, at start
RESTART_KEYS: Final = ("state", "http", "spool", "redact", "resync", "fleet", "log.format")


@dataclass(slots=True)
class ReloadPlan:
    """What a reload does; :attr:`restart` lists the keys that refuse it."""

    restart: list[str] = field(default_factory=list)
    added: list[SinkConfig] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[SinkConfig] = field(default_factory=list)
    reconnect: bool = False
    log_level: str | None = None

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.reconnect
                    or self.log_level)


def _differs(old: object, new: object) -> list[str]:
    """The fields of two dataclasses of one type that differ."""
    return [f.name for f in fields(old) if getattr(old, f.name) != getattr(new, f.name)]  # type: ignore[arg-type]


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    plan = ReloadPlan()
    for key in RESTART_KEYS:
        section, _, name = key.partition(".")
        before, after = getattr(old, section), getattr(new, section)
        if name:
            if getattr(before, name) != getattr(after, name):
                plan.restart.append(key)
        else:
            plan.restart += [f"{section}.{k}" for k in _differs(before, after)]
    if old.log.level != new.log.level:
        plan.log_level = new.log.level
    plan.reconnect = old.server != new.server or old.stream != new.stream
    before = {sc.name: sc for sc in old.sinks}
    after = {sc.name: sc for sc in new.sinks}
    plan.removed = [name for name in before if name not in after]
    for name, sc in after.items():
        if name not in before:
            plan.added.append(sc)
        elif _sink_key(before[name]) != _sink_key(sc):
            plan.changed.append(sc)
    return plan


def _sink_key(sc: SinkConfig) -> tuple[object, ...]:
    """What makes two sink configurations the same (the options, which the repr leaves out,
    included)."""
    return (sc.type, sc.types, sc.format, sc.buffer, sc.when_full, dict(sc.options),
            sc.base_dir, sc.dead_letter)


class Reloader:
    """The daemon's SIGHUP: :meth:`request` starts a reload, or (one is running) asks for one
    more after it, however many signals come meanwhile. Reloads wait until the daemon has
    started (``READY=1``)."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self.started = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._again = False
        #: log level from the command line (``--log-level``): a reload leaves it
        self.level_override: str | None = None

    def request(self) -> None:
        if self._daemon.cfg.path is None:
            return  # (``demo``: the configuration did not come from a file)
        if self.task is not None and not self.task.done():
            self._again = True  # (coalesced: one more reload once this one ends)
            return
        self.task = asyncio.create_task(self._loop(), name="reload")

    async def _loop(self) -> None:
        await self.started.wait()
        while True:
            self._again = False
            try:
                await self.reload()
            except Exception:  # a bug: said with its traceback; the daemon goes on
                log.exception("reload failed unexpectedly")
                self._outcome(ok=False)
            if not self._again:
                return

    async def reload(self) -> bool:
        """Read the configuration file again, validate it whole, apply what changed. Returns
        whether it was applied (False: refused; the running configuration stays)."""
        d = self._daemon
        d.notifier.reloading()
        started = time.monotonic()
        try:
            problems, new, plan, sinks = self._validate()
            if problems:
                for e in problems:
                    log.error("reload refused", key=e.key or None, problem=str(e))
                d.notifier.status(f"reload failed: {len(problems)} problem(s) in the "
                                  "configuration; the running one stays")
                self._outcome(ok=False)
                return False
            assert new is not None and plan is not None
            await self._apply(new, plan, sinks)
            self._outcome(ok=True)
            log.info("configuration reloaded", seconds=round(time.monotonic() - started, 3),
                     added=[sc.name for sc in plan.added], removed=plan.removed,
                     changed=[sc.name for sc in plan.changed], reconnect=plan.reconnect,
                     log_level=plan.log_level)
            d.health.stream_status(*d.health.status)  # (STATUS= back to the stream's)
            return True
        finally:
            d.notifier.ready()

    def _outcome(self, *, ok: bool) -> None:
        m = self._daemon.metrics
        m.reloads["success" if ok else "failure"] += 1
        m.reload_ok = int(ok)
        if ok:
            m.reload_ok_at = time.time()

    def _validate(self) -> tuple[list[ConfigError], Config | None, ReloadPlan | None,
                                 dict[str, Sink]]:
        """The file parsed and validated as ``run`` and ``check`` do (not the network), the
        keys a restart must change, and the new sinks built: every problem at once."""
        from .config import load_config
        from .preflight import check_paths
        from .sinks import build_sink, resolve_sink_class

        d = self._daemon
        path = d.cfg.path
        if path is None:
            return [ConfigError("", "no configuration file to read again")], None, None, {}
        try:
            new = load_config(path, resolve_sink=resolve_sink_class)
        except ConfigErrors as exc:
            return list(exc.errors), None, None, {}
        except ConfigError as exc:
            return [exc], None, None, {}
        problems = check_paths(new)
        plan = plan_reload(d.cfg, new)
        problems += [ConfigError(key, f"restart to change {key}") for key in plan.restart]
        sinks: dict[str, Sink] = {}
        for sc in [*plan.added, *plan.changed]:
            try:
                sinks[sc.name] = build_sink(sc)
            except ConfigError as exc:
                problems.append(exc)
        return problems, new, plan, sinks

    async def _apply(self, new: Config, plan: ReloadPlan, sinks: dict[str, Sink]) -> None:
        from .observe.logging import configure_logging, register_secret
        from .sinks import log_warnings

        d = self._daemon
        register_secret(*new.server.secret_values())
        if plan.log_level is not None and self.level_override is None:
            configure_logging(new.log.level, new.log.format)
        timeout = new.shutdown_timeout
        pipeline = d.pipeline
        for name in plan.removed:
            left = await pipeline.remove_route(name, timeout)
            d.sinks.pop(name, None)
            await d.ledger.forget(name)
            log.warning("sink removed", sink=name, events_not_delivered=left)
        for sc in plan.changed:
            await pipeline.replace_route(sc, sinks[sc.name], timeout, d.ledger.checkpoint)
            d.sinks[sc.name] = sinks[sc.name]
            log.info("sink reopened with its new settings", sink=sc.name)
            log_warnings(sc.name, sinks[sc.name])
        for sc in plan.added:
            pipeline.add_route(sc, sinks[sc.name])
            d.sinks[sc.name] = sinks[sc.name]
            log.info("sink added", sink=sc.name, type=sc.type)
            log_warnings(sc.name, sinks[sc.name])
        d.cfg = new
        d.routes_changed()
        if plan.reconnect:
            await d.reconnect()
