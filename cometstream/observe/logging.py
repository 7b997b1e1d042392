"""Logging: structlog to stderr, readable on a terminal, JSON Lines otherwise, secrets masked.

Log events are short lowercase phrases with fields (``log.warning("connect failed", error=...)``).
Two guards keep secrets out of the logs: fields whose *name* says secret (``password``,
``session_key``, ``totp``...) are masked, and every secret value registered with
:func:`register_secret` (the configured password, TOTP secret and session key, the admin API's
session key, a webhook's header values and the secret parts of its URL) is replaced wherever it
appears in a logged string, e.g. inside a library's error message or a traceback.

:func:`scrub` is the same guard for every other string that leaves the process with text a peer
(the server, a receiver) may have written: ``/readyz``, systemd's ``STATUS=``, the command line's
error messages and dead-letter records.

Libraries (aiohttp, asyncio, aiokafka) log through the stdlib; their records go through the same
masking and the same renderer, so a JSON log stays one JSON object per line, a traceback being
the ``exception`` field.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import IO, Any, Final, TextIO
from urllib.parse import quote, quote_plus

import orjson
import structlog

__all__ = ["MASK", "configure_logging", "redact", "register_secret", "scrub"]

MASK: Final = "******"
_SECRET_KEYS: Final = frozenset({
    "password", "passwd", "secret", "session_key", "sessionkey", "totp", "totp_secret",
    "totp_code", "token", "authorization", "api_key",
})
#: Secrets of at least this many characters are masked wherever they appear inside a string.
#: A shorter one cannot be: replacing every "a" or "x1" in a log line would mangle every line,
#: and the pattern of masks would spell the secret out for whoever reads it. A 1-3 character
#: secret is masked where it stands as a whole token (delimited by anything but a letter, digit
#: or "_"), and then the whole line holding it goes, not just the token: a masked short token
#: inside a readable line would still show where, and so what, the secret is.
_MIN_SUBSTRING: Final = 4
#: a secret cut short (a reply excerpt truncated at N characters) is masked from this many
#: characters on, when the cut is at the end of the text, a quote or "..."
_MIN_PREFIX: Final = 8
_TRUNCATED_BY: Final = ("...", "'", '"', "\u2026")
_secrets: set[str] = set()
#: what is searched for: each secret of 4+ characters and its escaped forms, longest first
_needles: tuple[str, ...] = ()
#: the 1-3 character secrets (and their escaped forms), as one whole-token pattern
_short: re.Pattern[str] | None = None
_LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
                  "error": logging.ERROR}
#: event dict keys that are not text to mask (structlog's own machinery)
_SKIP_KEYS: Final = frozenset({"exc_info", "stack_info", "_record", "_from_structlog"})


def _escaped(text: str) -> str:
    """``text`` as ``repr`` writes it inside quotes, the quotes themselves left alone."""
    return "".join(c if c in "'\"" else repr(c)[1:-1] for c in text)


def _forms(value: str) -> set[str]:
    """The value as it appears inside other text: as is, escaped by ``repr`` (either quoting),
    by JSON (orjson and ASCII-only), percent-encoded (a URL, a form), and inside a bytes repr."""
    base = _escaped(value)
    twice = _escaped(base)  # (a reply made printable, then shown with repr)
    forms = {value, base, base.replace("'", "\\'"), base.replace('"', '\\"'),
             twice, twice.replace("'", "\\'"), twice.replace('"', '\\"'),
             json.dumps(value)[1:-1]}
    try:  # (a value with a lone surrogate has no UTF-8 form: the others still apply)
        forms.add(orjson.dumps(value).decode()[1:-1])
        forms |= {quote(value, safe=""), quote(value), quote_plus(value)}
        raw = str(value.encode("utf-8"))[2:-1]
        forms |= {raw, raw.replace('"', '\\"')}
    except (TypeError, ValueError):
        pass
    return forms


def register_secret(*values: str | None) -> None:
    """Mask each value wherever it would appear in a log line or in :func:`scrub`'s output
    (values of 1-3 characters: the whole line holding them as a token, see ``_MIN_SUBSTRING``)."""
    global _needles, _short
    added = [v for v in values if v and v not in _secrets]
    if not added:
        return
    _secrets.update(added)
    long_forms: set[str] = set()
    short_forms: set[str] = set()
    for s in _secrets:
        for form in _forms(s):
            if len(s) >= _MIN_SUBSTRING:
                if len(form) >= _MIN_SUBSTRING:
                    long_forms.add(form)
            else:
                short_forms.add(form)
    # (assigned whole: writer threads may log meanwhile)
    _needles = tuple(sorted(long_forms, key=len, reverse=True))
    if short_forms:
        alts = "|".join(re.escape(f) for f in sorted(short_forms, key=len, reverse=True))
        _short = re.compile(rf"(?<!\w)(?:{alts})(?!\w)")


def _clear_secrets() -> None:
    """Forget every registered secret (tests only)."""
    global _needles, _short
    _secrets.clear()
    _needles = ()
    _short = None


def _mask_prefixes(text: str, needle: str) -> str:
    """Mask what is left of ``needle`` where a text was cut short inside it."""
    head = needle[:_MIN_PREFIX]
    start = text.find(head)
    while start != -1:
        k = _MIN_PREFIX
        while k < len(needle) and start + k < len(text) and text[start + k] == needle[k]:
            k += 1
        end = start + k
        if end == len(text) or text.startswith(_TRUNCATED_BY, end):
            text = text[:start] + MASK + text[end:]
            end = start + len(MASK)
        start = text.find(head, end)
    return text


def scrub(text: str) -> str:
    """``text`` with every registered secret masked: each one of 4+ characters (and its
    escaped forms, and what is left of it where the text was truncated) replaced by ``******``;
    a line holding a 1-3 character secret as a token replaced whole. The one function every
    outward string with peer text goes through. A lone surrogate (a hostile server's
    ``"\\ud800"``, which no UTF-8 encoder takes) comes out as the escape ``\\ud800``."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    needles, short = _needles, _short
    if not needles and short is None:
        return text
    for needle in needles:
        if needle in text:
            text = text.replace(needle, MASK)
        if len(needle) > _MIN_PREFIX and needle[:_MIN_PREFIX] in text:
            text = _mask_prefixes(text, needle)
    if short is not None and short.search(text):
        text = "\n".join(MASK if short.search(line) else line for line in text.split("\n"))
    return text


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict):
        return {k: MASK if isinstance(k, str) and k.lower() in _SECRET_KEYS else _scrub_value(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_scrub_value(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    # an exception or another object: rendered as its repr anyway (JSON default, console)
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 (a broken repr is the renderer's problem, as before)
        return value
    masked = scrub(text)
    return value if masked == text else masked


def redact(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask secret-named fields and registered secret values (in strings,
    nested containers, objects' reprs and the rendered traceback)."""
    active = bool(_needles) or _short is not None
    for key, value in event_dict.items():
        if key in _SKIP_KEYS:
            continue
        if key.lower() in _SECRET_KEYS:
            event_dict[key] = MASK
        elif active:
            event_dict[key] = _scrub_value(value)
    return event_dict


def _scrubbed_traceback(sio: IO[str], exc_info: Any) -> None:
    """The console's traceback, masked like the rest of the line."""
    buf = io.StringIO()
    structlog.dev.plain_traceback(buf, exc_info)
    sio.write(scrub(buf.getvalue()))


def _stack_field(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A stdlib record's ``stack_info`` (already text) as the ``stack`` field."""
    stack = event_dict.pop("stack_info", None)
    if isinstance(stack, str):
        event_dict["stack"] = stack
    return event_dict


def _orjson_dumps(obj: Any, **_kw: Any) -> bytes:
    return _orjson_str(obj).encode()


def _orjson_str(obj: Any, **_kw: Any) -> str:
    try:
        return orjson.dumps(obj, default=repr).decode()
    except TypeError:  # a lone surrogate or an integer beyond 64 bits: the log line still goes
        return json.dumps(_encodable(obj), default=repr)


def _encodable(value: Any, depth: int = 0) -> Any:
    """``value`` with lone surrogates in its strings (and keys) written as ``\\udXXX`` text."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if depth > 32:
        return repr(value)
    if isinstance(value, dict):
        return {_encodable(k, depth + 1) if isinstance(k, str) else k: _encodable(v, depth + 1)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encodable(v, depth + 1) for v in value]
    return value


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog (and the stdlib logging of libraries) on ``stream`` (stderr)."""
    out = stream if stream is not None else sys.stderr
    tty = False
    try:
        tty = out.isatty()
    except (AttributeError, ValueError):
        pass
    console = fmt == "console" or (fmt == "auto" and tty)
    timestamper = (structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False) if console
                   else structlog.processors.TimeStamper(fmt="iso", utc=True))
    processors: list[Any]
    if console:
        renderer: Any = structlog.dev.ConsoleRenderer(colors=tty,
                                                      exception_formatter=_scrubbed_traceback)
        processors = [structlog.contextvars.merge_contextvars,
                      structlog.processors.add_log_level, redact, timestamper, renderer]
        factory: Any = structlog.PrintLoggerFactory(file=out)
        # stdlib records: masked, then rendered by the same console renderer
        tail: list[Any] = [redact, renderer]
    else:
        # the traceback is rendered to text first, so that the masking sees it
        processors = [structlog.contextvars.merge_contextvars,
                      structlog.processors.add_log_level, timestamper,
                      structlog.processors.format_exc_info, redact,
                      structlog.processors.JSONRenderer(serializer=_orjson_dumps)]
        buffer = getattr(out, "buffer", None)
        factory = (structlog.BytesLoggerFactory(file=buffer) if buffer is not None
                   else structlog.PrintLoggerFactory(file=out))
        if buffer is None:
            processors[-1] = structlog.processors.JSONRenderer(serializer=_orjson_str)
        # stdlib records: one JSON object per line too, the traceback a field
        tail = [structlog.processors.format_exc_info, redact,
                structlog.processors.JSONRenderer(serializer=_orjson_str)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    # Libraries (aiohttp, asyncio, aiokafka) log through the stdlib: warnings and up, to the
    # same stream, through the same masking and renderer.
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_cometstream", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(out)
    handler._cometstream = True  # type: ignore[attr-defined]
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.processors.add_log_level, structlog.stdlib.add_logger_name,
                           timestamper, _stack_field],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
    ))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
