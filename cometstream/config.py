"""Configuration: TOML → validated, frozen dataclasses.

The whole file is checked at start-up. Every problem is a :class:`~cometstream.errors.ConfigError`
naming the dotted key (``sinks.archive.fsync: expected one of always, batch, never, got "sometimes"``);
unknown keys are errors, because a typo must not silently switch a feature off.

Secrets (password, TOTP secret, session key) are held in :class:`Secret`, whose ``repr`` is masked.
Each comes from the first of these that is set: the environment (``COMETSTREAM_PASSWORD``,
``COMETSTREAM_TOTP_SECRET``, ``COMETSTREAM_SESSION_KEY``), the key in the file, its ``*_file``
(which must then exist), or systemd's ``$CREDENTIALS_DIRECTORY`` (credentials named
``password``, ``totp_secret``, ``session_key``).
Relative paths are taken relative to the configuration file's folder.
"""

from __future__ import annotations

import binascii
import dataclasses
import functools
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

from .constants import SEVT
from .errors import ConfigError, ConfigErrors
from .events import FORMATS
from .protocol import AUTH_TYPES, stream_url, totp_code
from .section import (
    Section,
    close_matches,
    collecting_secrets,
    note_secret,
    reading_secret_files,
    secret_files_wanted,
    show_value,
)

__all__ = [
    "DEFAULT_PATH",
    "Config",
    "FleetConfig",
    "HttpConfig",
    "LogConfig",
    "RedactConfig",
    "ResyncConfig",
    "Secret",
    "Section",
    "ServerConfig",
    "SinkConfig",
    "SinkResolver",
    "StateConfig",
    "StreamConfig",
    "load_config",
    "parse_config",
    "parse_listen",
    "read_credential",
    "read_secret_file",
    "unknown_sink",
]

DEFAULT_PATH: Final = "/etc/cometstream/config.toml"
WHEN_FULL: Final = ("block", "drop_newest")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("auto", "console", "json")
#: the keys every sink has, read by the pipeline; the rest go to the sink class
_PIPELINE_KEYS: Final = ("type", "types", "format", "buffer", "when_full", "dead_letter")
_SINK_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


class Secret:
    """A secret string. ``repr``/``str`` are masked; ``reveal()`` gives the value to the one place
    that sends it."""

    __slots__ = ("_value", "source", "where")

    def __init__(self, value: str, source: str = "config", where: str = "") -> None:
        self._value = value
        #: where it came from (``config``, ``file``, ``env``, ``credential``), for diagnostics
        self.source = source
        #: the same for a person: ``the environment variable COMETSTREAM_PASSWORD``, ...
        self.where = where or source

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret('******', source={self.source!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


# --------------------------------------------------------------------------------------------
#: the values of ``[server] api_gzip``
API_GZIP: Final = ("auto", "always", "never")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    url: str
    ws_url: str
    name: str
    username: str
    auth_type: str
    password: Secret | None = field(default=None, repr=False)
    totp_secret: Secret | None = field(default=None, repr=False)
    session_key: Secret | None = field(default=None, repr=False)
    tls_verify: bool = True
    ca_file: Path | None = None
    #: whether the admin API's answers are asked for gzip-compressed: ``auto`` (unless the
    #: server is on this machine), ``always``, ``never``
    api_gzip: str = "auto"
    #: the secrets set nowhere here that ``run`` is to take from a systemd credential: only
    #: from ``load_config(..., credentials_later=True)`` (``check`` without ``--connect``)
    pending: tuple[str, ...] = ()

    def login_sources(self) -> str:
        """Where the secrets a login sends come from, for a rejected login's message
        (``password from the environment variable COMETSTREAM_PASSWORD``); never a value."""
        used = {"Password": [("password", self.password)],
                "PasswordTOTP": [("password", self.password), ("TOTP secret", self.totp_secret)],
                "SessionKey": [("session key", self.session_key)]}.get(self.auth_type, [])
        return ", ".join(f"{what} from {secret.where}" for what, secret in used
                         if secret is not None)

    def secret_values(self) -> list[str]:
        """The configured secrets' values (for the log redaction), none of them empty."""
        return [s.reveal() for s in (self.password, self.totp_secret, self.session_key)
                if s is not None and s.reveal()]

    def totp_now(self, at: float | None = None) -> str:
        """The TOTP code for a login now (``PasswordTOTP``), or "" when not used."""
        if self.auth_type != "PasswordTOTP" or self.totp_secret is None:
            return ""
        return totp_code(self.totp_secret.reveal(), at)


@dataclass(frozen=True, slots=True)
class StreamConfig:
    connect_timeout: float = 10.0
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    idle_timeout: float = 0.0
    backoff_initial: float = 0.5
    backoff_max: float = 60.0
    max_message_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ResyncConfig:
    enabled: bool = True
    overlap: float = 120.0
    #: seconds for one admin API request, from connect to the answer's last byte
    call_timeout: float = 60.0
    #: seconds for a whole remedial sync (its calls, their retries, the synthesized events)
    timeout: float = 300.0
    #: seconds live events may be held behind a running sync before they are released
    hold_timeout: float = 2.0
    #: /readyz says not ready after this many failed syncs in a row...
    unready_after_failures: int = 3
    #: ...or once syncs have been failing for this many seconds
    unready_after_seconds: float = 300.0


@dataclass(frozen=True, slots=True)
class RedactConfig:
    enabled: bool = True
    extra_keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    """``[spool]``: where received events wait for the sinks (docs/guarantees.md)."""

    buffer: str = "disk"  # "disk": the durable spool in state.dir; "memory": queues only
    max_bytes: int = 1 << 30
    max_age: float = 7 * 86400.0
    fsync_interval: float = 0.2

    @property
    def disk(self) -> bool:
        return self.buffer == "disk"


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """``[fleet]``: the Comet fleet's ``cometserver_*`` metrics on /metrics (docs/fleet.md)."""

    enabled: bool = False
    #: series of users' protected items, vaults and devices beyond this are not created
    max_series: int = 1_000_000
    #: seconds between full re-reads of the fleet while connected (0 = only after a reconnect)
    reseed_interval: float = 3600.0
    #: the exporter's labels: the item and device names on the per-item and per-device series
    #: too (False: the reduced set, the names only in the info series)
    name_labels: bool = True
    #: seconds between checks of what no event tells against the admin API: the jobs
    #: believed running, devices an administrator registered, the self-backups (0 = never)
    check_interval: float = 60.0


@dataclass(frozen=True, slots=True)
class StateConfig:
    dir: Path = Path("/var/lib/cometstream")


@dataclass(frozen=True, slots=True)
class HttpConfig:
    listen: str = "127.0.0.1:9780"

    @property
    def enabled(self) -> bool:
        return bool(self.listen)


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """The pipeline's part of a sink (filter, buffer, policy) and the sink's own options."""

    name: str
    type: str
    types: frozenset[int] | None  # None = every event
    format: str
    buffer: int
    when_full: str
    #: passed to the sink class's from_config, "format" included; not in the repr: they may
    #: hold secrets (a Kafka password, a webhook's signing key or header values)
    options: Mapping[str, Any] = field(repr=False)
    base_dir: Path | None = None  # relative paths in options are relative to this folder
    dead_letter: Path | None = None  # JSON Lines of the events this sink refused for good

    def section(self) -> Section:
        """The options as the Section a sink class's ``from_config`` takes."""
        return Section(dict(self.options), f"sinks.{self.name}", base_dir=self.base_dir)


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    stream: StreamConfig
    resync: ResyncConfig
    state: StateConfig
    http: HttpConfig
    log: LogConfig
    shutdown_timeout: float
    sinks: tuple[SinkConfig, ...]
    redact: RedactConfig = RedactConfig()
    path: Path | None = None
    spool: SpoolConfig = SpoolConfig()
    fleet: FleetConfig = FleetConfig()
    #: the options that hold a secret, each with its file (None: inline in the config file)
    secrets: tuple[tuple[str, Path | None], ...] = ()


# --------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Whether ``host`` (a URL's or ``[http] listen``'s) is a loopback address: a name other
    than ``localhost`` may resolve to anything, so it is not."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) → (host, port)."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not host or not port_s.isdigit():
        raise ValueError(f'expected "HOST:PORT", got "{value}"')
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def unknown_sink(name: str, configured: Sequence[str], extra: str = "") -> str:
    """How every command words a sink name that is not configured (``--sink``, a tap
    request): ``no sink named "x" (configured: a, b)``."""
    return f'no sink named "{name}" (configured: {", ".join(configured) or "none"}{extra})'


def read_secret_file(sect: Section, name: str) -> Secret | None:
    """The secret in the file the option ``name`` names, or None when the option is not set:
    every ``*_file`` secret of the server and of the sinks is read here. The file is read as
    text (``\r\n`` and ``\r`` are line breaks), and its one final line break is not part of the
    secret; everything else is, spaces included (the rule of systemd credentials too). While a
    tool that needs no secrets reads the config (``tap``, ``dlq list``) the file is not opened:
    a placeholder is returned."""
    path = sect.path(name)
    if path is None:
        return None
    if not secret_files_wanted():
        return Secret("-", "placeholder")
    note_secret(sect.key(name), path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise sect.error(name, f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise sect.error(name, f"cannot read {path}: {exc.__class__.__name__}") from None
    return Secret(_without_final_newline(text), "file")


def _without_final_newline(text: str) -> str:
    """Only the final line break goes: a password may begin or end with spaces. (``text`` was
    read with universal newlines: ``\r\n`` and ``\r`` arrive as ``\n``.)"""
    return text.removesuffix("\n")


#: how each secret is called in messages
_SECRET_WORDS: Final = {"password": "the password", "totp_secret": "the base32 TOTP secret",
                        "session_key": "the session key"}


def read_credential(sect: Section, credential: str, *, option: str) -> Secret | None:
    """A sink's systemd credential ``credential`` ($CREDENTIALS_DIRECTORY/NAME, as a unit's
    ``LoadCredential[Encrypted]=`` gives it), or None when none is loaded or while a tool that
    needs no secrets reads the config. One that cannot be read is reported under ``option``
    (the key that would set the secret instead)."""
    if not secret_files_wanted():
        return None
    return _credential(sect, credential, os.environ, option=option)


def _credential(sect: Section, key: str, env: Mapping[str, str], *,
                option: str | None = None) -> Secret | None:
    """The systemd credential ``key`` ($CREDENTIALS_DIRECTORY/KEY), or None when none is loaded
    (no such directory, no such file). One that is there but cannot be read is an error, under
    ``option`` (default: ``key``, as the server's secrets are named)."""
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if not cred_dir:
        return None
    path = Path(cred_dir) / key
    where = f'the systemd credential "{key}" ({path})'
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise sect.error(option or key, f"cannot read {where}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise sect.error(option or key, f"{where} is not UTF-8 text: encrypt "
                         f"{_SECRET_WORDS.get(key, 'it')} again (docs/operations.md)") from None
    return Secret(_without_final_newline(text), "credential", where)


def _secret(sect: Section, key: str, env_var: str, env: Mapping[str, str], *,
            used: bool = True) -> Secret | None:
    """The first source that is set: env var, inline key, KEY_file, systemd credential KEY.

    A KEY_file that is set is read (a missing file is an error, never skipped for the
    credential: the error says when a credential is there to use instead). An empty secret that
    the login would send (``used``) is an error naming its source, whichever it is: the server
    would only reject it, and an empty variable would hide a credential that is loaded. One the
    auth type does not send is ignored when empty."""
    inline = sect.opt_str(key, secret=True)
    file_key = f"{key}_file"
    what = _SECRET_WORDS[key]

    def empty(name: str, problem: str) -> None:
        if used:
            raise sect.error(name, problem)

    if inline is not None and sect.raw(file_key) is not None:
        raise sect.error(file_key, f"set either {key} or {key}_file, not both")
    if env_var in env:
        sect.path(file_key)  # still type-checked, but not read: the environment wins
        if not env[env_var]:
            empty(key, f"the environment variable {env_var} is set but empty: it comes before "
                  f"every other source; unset {env_var}, or put {what} in it")
            return None
        where = f"the environment variable {env_var}"
        if env.get("CREDENTIALS_DIRECTORY") and (Path(env["CREDENTIALS_DIRECTORY"]) / key).exists():
            where += f' (before the systemd credential "{key}", also loaded)'
        return Secret(env[env_var], "env", where)
    try:
        from_file = read_secret_file(sect, file_key)
    except ConfigError as exc:
        if _credential(sect, key, env) is None:
            raise
        raise sect.error(file_key, f"{exc.problem}; a systemd credential {key!r} is loaded: "
                         f"remove {file_key} to use it") from None
    if inline is not None:
        if not inline:
            empty(key, f"empty: put {what} in it, or remove the line to use the next source")
            return None
        return Secret(inline, "config", f"{sect.key(key)} in the config file")
    if from_file is not None:
        path = sect.path(file_key)
        if from_file.source == "file" and not from_file.reveal():
            empty(file_key, f"{path} is empty: put {what} in it")
            return None
        return Secret(from_file.reveal(), from_file.source, f"{sect.key(file_key)} ({path})")
    secret = _credential(sect, key, env)
    if secret is not None and not secret.reveal():
        empty(key, f"{secret.where} is empty: encrypt {what} into it again (docs/operations.md)")
        return None
    return secret


def hide_userinfo(url: str) -> str:
    """``url`` as an error message may show it: whatever could be ``user:password@`` (all up
    to the last "@") masked, even in a URL too broken to parse."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" not in rest:
        return url
    return f"{scheme}{sep}******@{rest.rpartition('@')[2]}"


def _parse_server(sect: Section, env: Mapping[str, str], *,
                  credentials_later: bool = False) -> ServerConfig:
    """``credentials_later``: a secret set nowhere is no error but noted in ``pending``: the
    systemd credential ``run`` will be given (``check`` without ``--connect``)."""
    url = sect.str("url", required=True, allow_empty=False)
    try:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https", "ws", "wss"):
            raise ValueError("the scheme must be http or https")
        if not parts.hostname:
            raise ValueError("no host")
        _ = parts.port  # raises ValueError for a bad port
        ws_url = stream_url(url)
    except ValueError as exc:
        if "@" in url:  # the reason may quote a piece of a password (a "/" in it ends the host)
            raise sect.error("url", f"not a valid http(s) URL: {show_value(hide_userinfo(url))}"
                             ) from None
        raise sect.error("url", f"not a valid http(s) URL ({exc}): {show_value(url)}") from None
    if parts.username is not None or parts.password is not None:
        # it would be logged with the URL; credentials belong in username/password
        raise sect.error("url", "must not contain credentials (user:password@); use "
                         "server.username and server.password")
    name = sect.str("name", parts.hostname or "", allow_empty=False)
    username = sect.str("username", required=True, allow_empty=False)
    auth_type = sect.str("auth_type", "Password", choices=AUTH_TYPES)
    password = _secret(sect, "password", "COMETSTREAM_PASSWORD", env,
                       used=auth_type in ("Password", "PasswordTOTP"))
    totp_secret = _secret(sect, "totp_secret", "COMETSTREAM_TOTP_SECRET", env,
                          used=auth_type == "PasswordTOTP")
    session_key = _secret(sect, "session_key", "COMETSTREAM_SESSION_KEY", env,
                          used=auth_type == "SessionKey")
    tls_verify = sect.bool("tls_verify", True)
    ca_file = sect.path("ca_file")
    if ca_file is not None and not ca_file.is_file():
        raise sect.error("ca_file", f"file not found: {ca_file}")
    api_gzip = sect.str("api_gzip", "auto", choices=API_GZIP)
    sect.done()

    wanted = {"password": auth_type in ("Password", "PasswordTOTP"),
              "totp_secret": auth_type == "PasswordTOTP", "session_key": auth_type == "SessionKey"}
    found = {"password": password, "totp_secret": totp_secret, "session_key": session_key}
    pending = tuple(k for k, want in wanted.items() if want and found[k] is None) \
        if credentials_later else ()
    if wanted["password"] and password is None and not pending:
        raise sect.error("password", f"required for auth_type {auth_type}, and set nowhere here: "
                         "COMETSTREAM_PASSWORD, password, password_file, or a systemd credential "
                         "'password' (what the units load; check --connect with it: "
                         "docs/operations.md)" + _sudo_hint("COMETSTREAM_PASSWORD", env))
    if auth_type == "PasswordTOTP" and "totp_secret" not in pending:
        if totp_secret is None:
            raise sect.error("totp_secret_file", "required for auth_type PasswordTOTP (the base32 "
                             "TOTP secret), or COMETSTREAM_TOTP_SECRET, or a systemd credential "
                             "'totp_secret'" + _sudo_hint("COMETSTREAM_TOTP_SECRET", env))
        try:
            totp_code(totp_secret.reveal())
        except (binascii.Error, ValueError):
            raise sect.error("totp_secret_file", "the TOTP secret is not valid base32") from None
    if auth_type == "SessionKey" and session_key is None and not pending:
        raise sect.error("session_key_file", "required for auth_type SessionKey, or "
                         "COMETSTREAM_SESSION_KEY, or a systemd credential 'session_key'"
                         + _sudo_hint("COMETSTREAM_SESSION_KEY", env))
    return ServerConfig(url=url, ws_url=ws_url, name=name, username=username, auth_type=auth_type,
                        password=password, totp_secret=totp_secret, session_key=session_key,
                        tls_verify=tls_verify, ca_file=ca_file, api_gzip=api_gzip,
                        pending=pending)


def _sudo_hint(env_var: str, env: Mapping[str, str]) -> str:
    """Under sudo, which drops the caller's environment: how to keep the variable."""
    if "SUDO_USER" not in env:
        return ""
    return f" (sudo does not pass {env_var} on: sudo --preserve-env={env_var})"


def _parse_stream(sect: Section) -> StreamConfig:
    d = StreamConfig()
    cfg = StreamConfig(
        connect_timeout=sect.float("connect_timeout", d.connect_timeout, min=0, min_exclusive=True),
        ping_interval=sect.float("ping_interval", d.ping_interval, min=0),
        ping_timeout=sect.float("ping_timeout", d.ping_timeout, min=0, min_exclusive=True),
        idle_timeout=sect.float("idle_timeout", d.idle_timeout, min=0),
        backoff_initial=sect.float("backoff_initial", d.backoff_initial, min=0, min_exclusive=True),
        backoff_max=sect.float("backoff_max", d.backoff_max, min=0, min_exclusive=True),
        max_message_bytes=sect.int("max_message_bytes", d.max_message_bytes, min=1024,
                                   max=1 << 30),
    )
    if cfg.backoff_max < cfg.backoff_initial:
        raise sect.error("backoff_max", f"must be >= backoff_initial ({cfg.backoff_initial:g}), "
                         f"got {cfg.backoff_max:g}")
    sect.done()
    return cfg


def parse_types(sect: Section, name: str) -> frozenset[int] | None:
    """A filter list of SEVT names or numbers; an unknown name is an error, never "matches nothing"."""
    value = sect.raw(name)
    if value is None:
        return None
    if not isinstance(value, list):
        raise sect.error(name, f'expected a list of SEVT names or numbers, got {show_value(value)}')
    if not value:
        raise sect.error(name, "an empty list would match no event; remove the key to match all")
    out: set[int] = set()
    for i, item in enumerate(value):
        if isinstance(item, str):
            key = item.strip().upper()
            if key not in SEVT:
                hint = close_matches(key, list(SEVT), n=1)
                extra = f' (did you mean "{hint[0]}"?)' if hint else ""
                raise sect.error(f"{name}[{i}]", f"unknown event type {show_value(item)}{extra}")
            out.add(SEVT[key])
        elif isinstance(item, int) and not isinstance(item, bool):
            if not 4000 <= item <= 4999:
                raise sect.error(f"{name}[{i}]", f"event type numbers are 4000-4999, got {item}")
            out.add(item)
        else:
            raise sect.error(f"{name}[{i}]",
                             f"expected an SEVT name or number, got {show_value(item)}")
    return frozenset(out)


class SinkResolver(Protocol):
    """Finds the class of a sink type: ``cometstream.sinks.resolve_sink_class``, passed in by the
    caller that builds the sinks (the configuration does not import the sink registry).

    It raises ConfigError naming ``key`` for an unknown type or a broken plugin; the class it
    returns has ``default_format`` and ``from_config(name, Section)``.
    """

    def __call__(self, type_: str, *, key: str) -> Any: ...


def _parse_sink(name: str, sect: Section, resolve_sink: SinkResolver) -> SinkConfig:
    if not _SINK_NAME.match(name):
        raise ConfigError(sect.prefix, "sink names use letters, digits, '_', '-' and '.' "
                          "(up to 64 characters)")
    type_ = sect.str("type", required=True, allow_empty=False)
    cls = resolve_sink(type_, key=sect.key("type"))
    types = parse_types(sect, "types")
    fmt = sect.str("format", cls.default_format, choices=FORMATS)
    buffer = sect.int("buffer", 10000, min=1, max=10_000_000)
    when_full = sect.str("when_full", "block", choices=WHEN_FULL)
    dead_letter = sect.path("dead_letter")
    options: dict[str, Any] = {k: v for k, v in sect._table.items()
                               if k not in _PIPELINE_KEYS}
    options["format"] = fmt
    cfg = SinkConfig(name=name, type=type_, types=types, format=fmt, buffer=buffer,
                     when_full=when_full, options=options, base_dir=sect.base_dir,
                     dead_letter=dead_letter)
    # The sink validates its own keys (raising ConfigError with sinks.NAME.key); nothing is opened.
    cls.from_config(name, cfg.section())
    return cfg


def parse_config(data: Mapping[str, Any], *, path: Path | None = None,
                 env: Mapping[str, str] | None = None, resolve_sink: SinkResolver,
                 credentials_later: bool = False) -> Config:
    """See :func:`_parse_config`; the result also lists the options that hold secrets.

    ``credentials_later``: a server secret set nowhere is not an error but listed in
    ``server.pending``, to come from a systemd credential when ``run`` runs under a unit
    (``check`` without ``--connect``)."""
    with collecting_secrets() as sources:
        cfg = _parse_config(data, path=path, env=env, resolve_sink=resolve_sink,
                            credentials_later=credentials_later)
    return dataclasses.replace(cfg, secrets=tuple(dict.fromkeys(sources)))


def _parse_config(data: Mapping[str, Any], *, path: Path | None = None,
                  env: Mapping[str, str] | None = None, resolve_sink: SinkResolver,
                  credentials_later: bool = False) -> Config:
    """Validate a parsed TOML document into a :class:`Config`; ``resolve_sink`` finds the sink
    classes (``cometstream.sinks.resolve_sink_class``), which check their own options.

    Every section and every sink is checked even after one fails, so ``check`` can list all the
    problems at once: one error raises that ConfigError, several raise :class:`ConfigErrors`.
    """
    env = os.environ if env is None else env
    base_dir = path.parent if path is not None else Path.cwd()
    top = Section(data, "", base_dir=base_dir)
    errors: list[ConfigError] = []

    def attempt(fn: Any) -> Any:
        try:
            return fn()
        except ConfigErrors as exc:
            errors.extend(exc.errors)
        except ConfigError as exc:
            errors.append(exc)
        return None

    def table(parent: Section, name: str, parse: Callable[[Section], Any]) -> Any:
        """``parse`` the table ``name`` of ``parent``, noting every problem of it: see
        :func:`_parse_table`."""
        prefix = parent.key(name)
        data = parent.raw(name, {})
        if not isinstance(data, Mapping):
            return attempt(lambda: Section(data, prefix))
        not_typos: set[str] = set()
        while True:
            try:
                result, found = _parse_table(data, prefix, parent.base_dir, parse, not_typos)
            except _NotATypo as exc:  # a guess at a misspelt key was wrong: again without it
                not_typos.add(exc.key)
                continue
            errors.extend(found)
            return result

    server = table(top, "server",
                   lambda t: _parse_server(t, env, credentials_later=credentials_later))
    stream = table(top, "stream", _parse_stream)
    resync = table(top, "resync", _parse_resync)
    state = table(top, "state", _parse_state)
    http = table(top, "http", _parse_http)
    log = table(top, "log", _parse_log)
    shutdown_timeout = table(top, "shutdown", _parse_shutdown)
    redact = table(top, "redact", _parse_redact)
    spool = table(top, "spool", _parse_spool)
    fleet = table(top, "fleet", lambda t: _parse_fleet(t, http))
    sinks: list[SinkConfig] = []
    sinks_tbl = attempt(lambda: top.table("sinks"))
    if sinks_tbl is not None:
        for name in list(sinks_tbl._table):
            sink = table(sinks_tbl, name, functools.partial(_parse_sink, name,
                                                            resolve_sink=resolve_sink))
            if sink is not None:
                sinks.append(sink)
        attempt(sinks_tbl.done)
        if not sinks_tbl._table:
            errors.append(ConfigError("sinks", 'no sink configured: add at least one '
                                      '[sinks.NAME] table (e.g. type = "stdout")'))
    attempt(top.done)
    if errors:
        raise errors[0] if len(errors) == 1 else ConfigErrors(errors)
    return Config(server=server, stream=stream, resync=resync, state=state, http=http, log=log,
                  shutdown_timeout=shutdown_timeout, sinks=tuple(sinks), redact=redact, path=path,
                  spool=spool, fleet=fleet)


class _NotATypo(Exception):
    """The key taken for a misspelling of a missing required key is not one."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _parse_table(data: Mapping[str, Any], prefix: str, base_dir: Path | None,
                 parse: Callable[[Section], Any], not_typos: set[str]
                 ) -> tuple[Any, list[ConfigError]]:
    """``parse`` one table, and every problem in it: the parsed value (None if it failed) and
    the problems, each once.

    At a problem with one of its keys, the problem is noted and the table parsed again without
    that key, so that every problem of a table is found in one go; what only follows from a key
    taken out is not reported ("is required", or "password: required" after a
    ``password_file`` that is not there). A required key that is missing while an unknown key
    looks like it (``usrname`` for ``username``) is one problem, the unknown key: its value is
    used as the required key's to go on checking the rest. Raises :class:`_NotATypo` when that
    guess proves wrong (the key is read for itself, or its value fails as the other key's)."""
    data = dict(data)
    removed: set[str] = set()
    typos: dict[str, str] = {}  # the required key -> the unknown key taken for it
    known: set[str] = set()  # the keys the parse reads (the table's own keys)
    found: list[ConfigError] = []
    while True:
        sect = Section(data, prefix, base_dir=base_dir)
        try:
            result = parse(sect)
        except ConfigErrors as exc:
            found.extend(exc.errors)
            result = None
        except ConfigError as exc:
            known |= sect._seen
            key = exc.key[len(prefix) + 1:].split(".")[0].split("[")[0] \
                if exc.key.startswith(prefix + ".") else None
            if key in typos:  # the misspelt key's value fails as the key it was taken for
                raise _NotATypo(typos[key]) from None
            if key is None or key in removed or _follows_from(key, removed):
                if key is None:
                    found.append(exc)
                return None, found
            if key not in data:
                unknown = [k for k in data if k not in known and k not in not_typos
                           and k not in typos.values()]
                hint = close_matches(key, unknown, n=1)
                if not hint:
                    found.append(exc)
                    return None, found
                typos[key] = hint[0]
                found.append(ConfigError(f"{prefix}.{hint[0]}",
                                         f'unknown key (did you mean "{key}"?)'))
                data[key] = data.pop(hint[0])
                continue
            found.append(exc)
            removed.add(key)
            del data[key]
            continue
        known |= sect._seen
        wrong = [k for k in typos.values() if k in known]
        if wrong:
            raise _NotATypo(wrong[0])
        return result, found


def _follows_from(key: str, removed: set[str]) -> bool:
    """Whether a problem with ``key`` only follows from the keys taken out: a secret is
    "required" once its ``*_file`` went for not being there, and the other way round."""
    return f"{key}_file" in removed or (key.endswith("_file") and key[:-5] in removed)


def _parse_resync(rs: Section) -> ResyncConfig:
    d = ResyncConfig()
    resync = ResyncConfig(
        enabled=rs.bool("enabled", True),
        overlap=rs.float("overlap", 120.0, min=0, max=30 * 86400),
        call_timeout=rs.float("call_timeout", d.call_timeout, min=0, min_exclusive=True,
                              max=3600),
        timeout=rs.float("timeout", d.timeout, min=0, min_exclusive=True, max=86400),
        hold_timeout=rs.float("hold_timeout", d.hold_timeout, min=0, max=60),
        unready_after_failures=rs.int("unready_after_failures", d.unready_after_failures,
                                      min=1, max=1_000_000),
        unready_after_seconds=rs.float("unready_after_seconds", d.unready_after_seconds,
                                       min=0, min_exclusive=True, max=30 * 86400),
    )
    if resync.timeout < resync.call_timeout:
        raise rs.error("timeout", f"must be >= call_timeout ({resync.call_timeout:g}), "
                       f"got {resync.timeout:g}")
    rs.done()
    return resync


def _parse_state(st: Section) -> StateConfig:
    state = StateConfig(dir=st.path("dir", "/var/lib/cometstream") or Path("/var/lib/cometstream"))
    st.done()
    return state


def _parse_http(ht: Section) -> HttpConfig:
    listen = ht.str("listen", "127.0.0.1:9780")
    if listen:
        try:
            parse_listen(listen)
        except ValueError as exc:
            raise ht.error("listen", str(exc)) from None
    ht.done()
    return HttpConfig(listen=listen)


def _parse_log(lg: Section) -> LogConfig:
    log = LogConfig(level=lg.str("level", "info", choices=LOG_LEVELS),
                    format=lg.str("format", "auto", choices=LOG_FORMATS))
    lg.done()
    return log


def _parse_fleet(fl: Section, http: HttpConfig | None) -> FleetConfig:
    d = FleetConfig()
    fleet = FleetConfig(
        enabled=fl.bool("enabled", d.enabled),
        max_series=fl.int("max_series", d.max_series, min=1, max=100_000_000),
        reseed_interval=fl.float("reseed_interval", d.reseed_interval, min=0, max=30 * 86400),
        name_labels=fl.bool("name_labels", d.name_labels),
        check_interval=fl.float("check_interval", d.check_interval, min=0, max=86400),
    )
    if 0 < fleet.reseed_interval < 60:
        raise fl.error("reseed_interval", f"must be 0 (never) or >= 60, got "
                       f"{fleet.reseed_interval:g}")
    if 0 < fleet.check_interval < 10:
        raise fl.error("check_interval", f"must be 0 (never) or >= 10, got "
                       f"{fleet.check_interval:g}")
    if fleet.enabled and http is not None and not http.listen:
        raise fl.error("enabled", "the fleet metrics are served on /metrics: set [http] listen")
    fl.done()
    return fleet


def _parse_spool(sp: Section) -> SpoolConfig:
    spool = SpoolConfig(
        buffer=sp.str("buffer", "disk", choices=("disk", "memory")),
        max_bytes=sp.int("max_bytes", 1 << 30, min=1 << 20),
        max_age=sp.float("max_age", 7 * 86400.0, min=60.0),
        fsync_interval=sp.float("fsync_interval", 0.2, min=0.001, max=60.0),
    )
    sp.done()
    return spool


def _parse_redact(rd: Section) -> RedactConfig:
    enabled = rd.bool("enabled", True)
    extra = rd.raw("extra_keys", [])
    if not isinstance(extra, list) or not all(isinstance(k, str) and k for k in extra):
        raise rd.error("extra_keys", "expected a list of field names")
    rd.done()
    return RedactConfig(enabled=enabled, extra_keys=tuple(extra))


def _parse_shutdown(sd: Section) -> float:
    timeout = sd.float("timeout", 10.0, min=0, max=3600)
    sd.done()
    return timeout


def load_config_without_secrets(path: str | os.PathLike[str], *,
                                resolve_sink: SinkResolver, sink_secrets: bool = False) -> Config:
    """The config as ``run`` reads it, with placeholders for the server's secrets: for the tools
    that need only state.dir and the sinks (``tap``, ``dlq``), which run where the password may be
    a systemd credential of the unit (``COMETSTREAM_*`` from the environment are ignored).

    No secret file is opened, the sinks' neither (they get placeholders), unless
    ``sink_secrets`` (``dlq replay``, which sends to the sinks)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMETSTREAM_")}
    env.update(COMETSTREAM_PASSWORD="-", COMETSTREAM_SESSION_KEY="-",
               COMETSTREAM_TOTP_SECRET="JBSWY3DPEHPK3PXP")
    with reading_secret_files(sink_secrets):
        return load_config(path, env=env, resolve_sink=resolve_sink)


@dataclass(frozen=True, slots=True)
class ExposedSecret:
    """A file holding a secret that its group or everyone may read."""

    path: Path
    mode: int
    keys: tuple[str, ...]  # the options whose secret it holds

    def __str__(self) -> str:
        who = "others" if self.mode & 0o004 else "its group"
        what = ("the password" if self.keys in (("server.password",), ("server.password_file",))
                else "secrets (" + ", ".join(self.keys) + ")")
        return f"{self.path} is readable by {who} (mode {self.mode:04o}) and holds {what}: chmod 600"


def exposed_secrets(cfg: Config) -> list[ExposedSecret]:
    """The files with a secret in them (the config file itself with an inline one, a
    ``*_file``, a sink's secret file or TLS key) that are readable by group or others."""
    by_file: dict[Path, list[str]] = {}
    for key, path in cfg.secrets:
        where = path if path is not None else cfg.path
        if where is not None:
            by_file.setdefault(where, []).append(key)
    out = []
    for path, keys in by_file.items():
        try:
            mode = os.stat(path).st_mode & 0o7777
        except OSError:
            continue
        if mode & 0o044:
            out.append(ExposedSecret(path, mode, tuple(dict.fromkeys(keys))))
    return out


def load_config(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None,
                resolve_sink: SinkResolver, credentials_later: bool = False) -> Config:
    """Read and validate a TOML file (raises ConfigError with a one-line reason);
    ``credentials_later``: see :func:`parse_config`."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("", f"{p}: no such file") from None
    except IsADirectoryError:
        raise ConfigError("", f"{p}: is a directory") from None
    except PermissionError:
        raise ConfigError("", f"{p}: permission denied{_why_unreadable(p)}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{p}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"{p}: not UTF-8 text") from None
    return parse_config(data, path=p.resolve(), env=env, resolve_sink=resolve_sink,
                        credentials_later=credentials_later)


def _why_unreadable(path: Path) -> str:
    """Why this process may not read ``path`` (the folder it cannot enter, or the file's mode),
    and the fix: the units run as a dynamic user, for whom only the "others" bits count."""
    import grp
    import pwd
    import stat as st

    def owner(s: os.stat_result) -> str:
        try:
            user = pwd.getpwuid(s.st_uid).pw_name
        except KeyError:
            user = str(s.st_uid)
        try:
            group = grp.getgrgid(s.st_gid).gr_name
        except KeyError:
            group = str(s.st_gid)
        return f"mode {st.S_IMODE(s.st_mode):04o}, {user}:{group}"

    p = path.absolute()
    blocker, fix = p, f"chmod 0644 {p}"
    for folder in reversed(p.parents):
        if not os.access(folder, os.X_OK):
            blocker, fix = folder, f"chmod 0755 {folder}"
            break
    try:
        shown = f"{blocker} is {owner(blocker.stat())}"
    except OSError:
        shown = f"{blocker} cannot be reached"
    return (f" for uid {os.getuid()}: {shown}; the units' dynamic user must be able to read it "
            f"as \"others\": {fix} (keep secrets out of it: they are credentials)")

