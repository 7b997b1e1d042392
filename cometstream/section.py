"""``Section``: reads one TOML table with type and range checks, for the config and the sinks.

It sits below both: ``cometstream.config`` parses the file with it (and re-exports it, the name
third-party sinks import), and a sink class's ``from_config`` receives one for its
``[sinks.NAME]`` table. Every problem is a :class:`~cometstream.errors.ConfigError` naming the
dotted key.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["Section", "close_matches", "note_secret", "secret_files_wanted", "show_value"]

#: while a config is parsed: the keys that hold a secret, each with the file it is in (None: the
#: config file itself), for ``check`` and ``run`` to warn about files others can read
_secret_sources: ContextVar[list[tuple[str, Path | None]] | None] = ContextVar(
    "cometstream_secret_sources", default=None)
#: False while a tool that needs no secrets (``tap``, ``dlq list``) reads the config: secret
#: files are then not opened at all
_read_secret_files: ContextVar[bool] = ContextVar("cometstream_read_secret_files", default=True)


def note_secret(key: str, path: Path | None = None) -> None:
    """Record that the option ``key`` holds a secret: read from the file ``path``, or written in
    the config file itself (``path=None``). For sinks whose secrets are not read through
    ``Section.string(..., secret=True)`` or ``cometstream.config.read_secret_file``."""
    sources = _secret_sources.get()
    if sources is not None:
        sources.append((key, path))


def secret_files_wanted() -> bool:
    """Whether secret files are to be read now (False while ``tap`` or ``dlq list`` read the
    config: a sink then takes a placeholder instead)."""
    return _read_secret_files.get()


@contextlib.contextmanager
def collecting_secrets() -> Iterator[list[tuple[str, Path | None]]]:
    sources: list[tuple[str, Path | None]] = []
    token = _secret_sources.set(sources)
    try:
        yield sources
    finally:
        _secret_sources.reset(token)


@contextlib.contextmanager
def reading_secret_files(wanted: bool) -> Iterator[None]:
    token = _read_secret_files.set(wanted)
    try:
        yield
    finally:
        _read_secret_files.reset(token)


def show_value(value: Any) -> str:
    """A value as an error message shows it (long strings cut, tables and lists named)."""
    if isinstance(value, str):
        return f'"{value}"' if len(value) <= 60 else f'"{value[:57]}..."'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return repr(value).lower() if isinstance(value, bool) else repr(value)


class Section:
    """Reads one TOML table with type and range checks; ``done()`` rejects the keys nobody read.

    Public so that third-party sinks validate their options with the same clear errors::

        opts = Section(options, f"sinks.{name}")
        url = opts.string("url", required=True)
        opts.done()

    ``str`` and ``bool`` are the older names of ``string`` and ``boolean``, kept for the sinks
    that use them.
    """

    def __init__(self, table: Mapping[str, Any], prefix: str, *, base_dir: Path | None = None) -> None:
        if not isinstance(table, Mapping):
            raise ConfigError(prefix, f"expected a table, got {show_value(table)}")
        self._table = table
        self.prefix = prefix
        self.base_dir = base_dir
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.key(name), problem)

    def has(self, name: str) -> bool:
        return name in self._table

    def raw(self, name: str, default: Any = None) -> Any:
        self._seen.add(name)
        return self._table.get(name, default)

    def string(self, name: str, default: str | None = None, *, required: bool = False,
            choices: tuple[str, ...] | None = None, allow_empty: bool = True,
            secret: bool = False) -> str:
        """A string; ``secret=True`` keeps the value out of error messages."""
        value = self.raw(name)
        if value is None:
            if required or default is None:
                raise self.error(name, "is required")
            return default
        if not isinstance(value, str):
            shown = f"a {type(value).__name__} (value not shown)" if secret else show_value(value)
            raise self.error(name, f"expected a string, got {shown}")
        if choices is not None and value not in choices:
            hint = close_matches(value, choices, n=1)
            extra = f' (did you mean "{hint[0]}"?)' if hint else ""
            raise self.error(name, f"expected one of {', '.join(choices)}, "
                             f"got {show_value(value)}{extra}")
        if not allow_empty and not value:
            raise self.error(name, "must not be empty")
        if secret:
            note_secret(self.key(name))
        return value

    def opt_str(self, name: str, *, secret: bool = False) -> str | None:
        if self.raw(name) is None:
            return None
        return self.string(name, secret=secret)

    def path(self, name: str, default: str | None = None) -> Path | None:
        value = self.opt_str(name)
        if value is None:
            value = default
        if value is None:
            return None
        if not value:
            raise self.error(name, "must not be empty")
        p = Path(value).expanduser()
        if not p.is_absolute() and self.base_dir is not None:
            p = self.base_dir / p
        return p

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise self.error(name, f"expected true or false, got {show_value(value)}")
        return value

    def float(self, name: str, default: float, *, min: float = 0.0, max: float = math.inf,
              min_exclusive: bool = False) -> float:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise self.error(name, f"expected a number of seconds, got {show_value(value)}")
        value = float(value)
        if value < min or (min_exclusive and value == min) or value > max:
            low = f"> {min:g}" if min_exclusive else f">= {min:g}"
            rng = low if max == math.inf else f"{low} and <= {max:g}"
            raise self.error(name, f"must be {rng}, got {show_value(value)}")
        return value

    def int(self, name: str, default: int, *, min: int = 0, max: int | None = None) -> int:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"expected an integer, got {show_value(value)}")
        if value < min or (max is not None and value > max):
            rng = f">= {min}" if max is None else f"between {min} and {max}"
            raise self.error(name, f"must be {rng}, got {value}")
        return value

    def table(self, name: str) -> Section:
        value = self.raw(name, {})
        return Section(value, self.key(name), base_dir=self.base_dir)

    def done(self) -> None:
        unknown = [k for k in self._table if k not in self._seen]
        if unknown:
            name = unknown[0]
            known = sorted(self._seen)
            hint = close_matches(name, known, n=1)
            extra = f' (did you mean "{hint[0]}"?)' if hint else ""
            raise self.error(name, f"unknown key{extra}")

    # The older names, for third-party sinks written against them. Last in the class, so
    # that the annotations above still mean the builtins.
    str = string
    bool = boolean


def close_matches(word: str, choices: Any, n: int = 1) -> list[str]:
    """The likely intended spellings of a misspelt ``word`` (for "did you mean")."""
    import difflib  # only when a config is wrong

    return difflib.get_close_matches(word, choices, n=n)
