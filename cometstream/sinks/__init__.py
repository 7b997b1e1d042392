"""Sinks: the built-ins and the registry that finds third-party ones by entry point.

Built-in types: ``stdout``, ``file``, ``kafka``, ``webhook``, ``postgres``, and ``memory``
(recording, for tests and plugin authors).
Others come from the entry point group ``cometstream.sinks`` (``name = "package.module:Class"``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

import structlog

from ..errors import ConfigError
from .base import Sink

if TYPE_CHECKING:
    from ..config import SinkConfig

__all__ = ["ENTRY_POINT_GROUP", "Sink", "available_sink_types", "build_sink",
           "log_warnings", "resolve_sink_class"]

log = structlog.get_logger("cometstream.sinks")

ENTRY_POINT_GROUP: Final = "cometstream.sinks"
_BUILTINS: Final = {
    "stdout": "cometstream.sinks.stdout:StdoutSink",
    "file": "cometstream.sinks.file:FileSink",
    "memory": "cometstream.sinks.memory:MemorySink",
    "kafka": "cometstream.sinks.kafka:KafkaSink",
    "webhook": "cometstream.sinks.webhook:WebhookSink",
    "postgres": "cometstream.sinks.postgres:PostgresSink",
}


def _load(spec: str) -> type[Sink]:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


def entry_points(*, group: str) -> Any:
    # imported when a third-party sink is looked up: importlib.metadata costs a megabyte of RSS
    # that a daemon with built-in sinks does not need
    from importlib.metadata import entry_points as _entry_points

    return _entry_points(group=group)


def available_sink_types() -> list[str]:
    names = set(_BUILTINS)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def resolve_sink_class(type_: str, *, key: str = "type") -> type[Sink]:
    """The class for a sink type: a built-in, else the entry point of that name."""
    spec = _BUILTINS.get(type_)
    if spec is not None:
        return _load(spec)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == type_:
            try:
                cls = ep.load()
            except Exception as exc:  # noqa: BLE001 - a broken plugin is a config problem, in one line
                raise ConfigError(key, f'sink plugin "{type_}" ({ep.value}) failed to load: '
                                  f"{exc.__class__.__name__}: {exc}") from None
            if not (isinstance(cls, type) and issubclass(cls, Sink)):
                raise ConfigError(key, f'sink plugin "{type_}" ({ep.value}) is not a Sink class')
            return cls
    raise ConfigError(key, f'unknown sink type "{type_}" (available: '
                      f"{', '.join(available_sink_types())})")


def build_sink(cfg: SinkConfig) -> Sink:
    """The sink ``[sinks.NAME]`` configures (its class resolved, built from its options; no
    I/O): for the daemon, a reload, ``backfill`` and ``dlq replay`` alike."""
    cls = resolve_sink_class(cfg.type, key=f"sinks.{cfg.name}.type")
    return cls.from_config(cfg.name, cfg.section())


def log_warnings(name: str, sink: Sink) -> None:
    """What :meth:`Sink.warnings` says, logged as the sink starts: at ``run``'s start, and for
    a sink a reload adds or changes (``check`` prints the same lines)."""
    for warning in sink.warnings():
        log.warning("sink setting to review", sink=name, warning=warning)
