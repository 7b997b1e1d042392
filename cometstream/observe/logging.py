"""Logging: structlog to stderr, readable on a terminal, JSON Lines otherwise, secrets masked.

Log events are short lowercase phrases with fields (``log.warning("connect failed", error=...)``).
Two guards keep secrets out of the logs: fields whose *name* says secret (``password``,
``session_key``, ``totp``...) are masked, and every secret value registered with
:func:`register_secret` (the configured password, TOTP secret and session key) is replaced
wherever it appears in a logged string, e.g. inside a library's error message.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import IO, Any, Final

import orjson
import structlog

__all__ = ["MASK", "configure_logging", "redact", "register_secret"]

MASK: Final = "******"
_SECRET_KEYS: Final = frozenset({
    "password", "passwd", "secret", "session_key", "sessionkey", "totp", "totp_secret",
    "totp_code", "token", "authorization", "api_key",
})
_secrets: set[str] = set()
_LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
                  "error": logging.ERROR}


def register_secret(*values: str | None) -> None:
    """Mask each value wherever it would appear in a log line (values of 4+ characters)."""
    for value in values:
        if value and len(value) >= 4:
            _secrets.add(value)


def _scrub(text: str) -> str:
    for s in _secrets:
        if s in text:
            text = text.replace(s, MASK)
    return text


def redact(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask secret-named fields and registered secret values."""
    for key, value in event_dict.items():
        if key.lower() in _SECRET_KEYS:
            event_dict[key] = MASK
        elif _secrets and isinstance(value, str):
            event_dict[key] = _scrub(value)
    return event_dict


def _orjson_dumps(obj: Any, **_kw: Any) -> bytes:
    return orjson.dumps(obj, default=repr)


def configure_logging(level: str = "info", fmt: str = "auto", stream: IO[str] | None = None) -> None:
    """Set up structlog (and the stdlib logging of libraries) on ``stream`` (stderr)."""
    out = stream if stream is not None else sys.stderr
    tty = False
    try:
        tty = out.isatty()
    except (AttributeError, ValueError):
        pass
    console = fmt == "console" or (fmt == "auto" and tty)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        redact,
    ]
    if console:
        processors = [
            *shared,
            structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
            structlog.dev.ConsoleRenderer(colors=tty, exception_formatter=structlog.dev.plain_traceback),
        ]
        factory: Any = structlog.PrintLoggerFactory(file=out)
    else:
        processors = [
            *shared,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_orjson_dumps),
        ]
        buffer = getattr(out, "buffer", None)
        factory = (structlog.BytesLoggerFactory(file=buffer) if buffer is not None
                   else structlog.PrintLoggerFactory(file=out))
        if buffer is None:
            processors[-1] = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    # Libraries (aiohttp, asyncio) log through the stdlib: warnings and up, to the same stream.
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_cometstream", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(out)
    handler._cometstream = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
