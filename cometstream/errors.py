"""The exception tree of cometstream.

Every error the daemon expects to meet is one of these, with a one-line ``__str__`` fit for a
log line or a CLI message, and a ``retryable`` flag that the supervisor and the sink workers read
instead of matching strings::

    CometStreamError                 retryable?
    ├── ConfigError(key)             no   (exit 2; ConfigErrors: several at once;
    │   └── UsageError(option)             a command-line argument, e.g. --since)
    ├── CredentialsRejected          no on the first login (exit 3), retried after a good session
    ├── StreamError                  yes  (connect refused, TLS, timeouts, dropped, silent peer)
    ├── ApiError(status)             per status (5xx and transport yes, 4xx no)
    │   ├── ApiAuthError             no   (exit 3 from check --connect and backfill)
    │   │   └── TotpRequired         no   (the account needs auth_type = "PasswordTOTP")
    │   └── ResponseTooLarge(limit)  no   (asking again gets the same answer)
    ├── SinkError(sink)              per instance (disk full yes, bad request no)
    ├── DlqError(usage)              no   (a dlq command could not do its job: exit 1,
    │                                      or 2 with usage: what it names is not there)
    ├── TapUnavailable               yes  (no daemon answers on the tap socket: exit 1)
    ├── TapRefused                   no   (the daemon refused the tap request: exit 2)
    ├── TapBadRequest                no   (the daemon's side: a request it refuses)
    ├── TaskDied(task)               no   (a background task ended on an unexpected error;
    │                                      handed to what waited on it)
    ├── DuplicateKey                 no   (a JSON object gives a key twice: redaction's
    │                                      parser hook, never outside it)
    ├── LedgerError                  no   (state dir in use, a failed migration: the daemon stops)
    ├── LedgerCorrupt                no   (a damaged ledger file: moved aside, replaced)
    ├── LedgerForeign                no   (a ledger written for another server: moved aside)
    └── CheckpointUnreadable(why)    no   (an earlier version's checkpoint: moved aside)

Foreign exceptions (aiohttp, OSError, ssl) are translated into these at each I/O boundary with
``raise ... from exc``; nothing from a library leaks into the pipeline.
"""

from __future__ import annotations

__all__ = [
    "ApiAuthError",
    "ApiError",
    "CheckpointUnreadable",
    "CometStreamError",
    "ConfigError",
    "ConfigErrors",
    "CredentialsRejected",
    "DlqError",
    "DuplicateKey",
    "LedgerCorrupt",
    "LedgerError",
    "LedgerForeign",
    "ResponseTooLarge",
    "SinkError",
    "StreamError",
    "TapBadRequest",
    "TapRefused",
    "TapUnavailable",
    "TaskDied",
    "TotpRequired",
    "UsageError",
]


class CometStreamError(Exception):
    """Base class: a one-line message and whether trying again may help."""

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable

    def __str__(self) -> str:
        return self.message


class ConfigError(CometStreamError):
    """The configuration is invalid; ``key`` is the dotted key at fault (e.g. ``sinks.bus.acks``)."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem, retryable=False)


class ConfigErrors(ConfigError):
    """Several configuration problems at once (``check`` prints one line each)."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        super().__init__(errors[0].key, errors[0].problem)
        self.message = "; ".join(str(e) for e in errors)

    def __str__(self) -> str:
        return self.message


class UsageError(ConfigError):
    """A command-line argument is wrong; ``key`` is the option (``--since``). Exit 2, like a
    configuration error, but the message is not about the configuration file."""


class CredentialsRejected(CometStreamError):
    """The server refused the login (anything but ``200 OK`` after the five frames)."""

    def __init__(self, message: str, *, reply: str = "") -> None:
        self.reply = reply
        super().__init__(message, retryable=False)


class StreamError(CometStreamError):
    """The event stream failed: could not connect, timed out, was dropped or went silent."""

    retryable = True

    def __init__(self, message: str, *, reason: str = "error", retryable: bool = True) -> None:
        #: a bounded label for ``disconnects_total{reason}`` / ``connects_total{result}``
        self.reason = reason
        super().__init__(message, retryable=retryable)


class ApiError(CometStreamError):
    """The admin HTTP API failed; ``status`` is the HTTP status or the body's ``Status``."""

    def __init__(self, message: str, *, status: int = 0, retryable: bool | None = None) -> None:
        self.status = status
        if retryable is None:
            retryable = status == 0 or status >= 500 or status == 429
        super().__init__(message, retryable=retryable)


class ApiAuthError(ApiError):
    """The API refused the credentials (wrong password, no admin rights, expired session)."""

    def __init__(self, message: str, *, status: int = 403) -> None:
        super().__init__(message, status=status, retryable=False)


class ResponseTooLarge(ApiError):
    """An answer larger than the client reads (not retried: asking again gets the same)."""

    def __init__(self, message: str, *, status: int, limit: int) -> None:
        super().__init__(message, status=status, retryable=False)
        self.limit = limit


class TotpRequired(ApiAuthError):
    """The account needs a TOTP code (``ERR_TOTP_REQUIRED``): set auth_type = "PasswordTOTP"."""


class SinkError(CometStreamError):
    """A sink could not accept (all of) a batch.

    - ``retryable``: whether the same events may be accepted later (``False``: never; they are
      dead-lettered and counted as rejected);
    - ``accepted``: how many events at the start of the batch *were* accepted before the failure
      (they are acknowledged and not sent again);
    - ``failed``: with ``retryable=False``, how many events after those the refusal concerns
      (0 = all the rest); the pipeline goes on with the events after them;
    - ``retry_after``: the receiver's requested wait in seconds (HTTP ``Retry-After``), honoured
      on top of the backoff;
    - ``sink_wide``: the failure is about the sink, not these events (the receiver cannot be
      reached, or refuses the sink's credentials or url): retried without counting toward
      ``max_retries``, so that an outage or an expired token dead-letters nothing.
    """

    def __init__(self, sink: str, message: str, *, retryable: bool = True, accepted: int = 0,
                 failed: int = 0, retry_after: float | None = None,
                 sink_wide: bool = False) -> None:
        self.sink = sink
        self.accepted = accepted
        self.failed = failed
        self.retry_after = retry_after
        self.sink_wide = sink_wide
        super().__init__(f"sink {sink}: {message}", retryable=retryable)


class LedgerError(CometStreamError):
    """The ledger cannot be used (a failed migration, a state dir in use): the daemon stops."""


class LedgerCorrupt(CometStreamError):
    """A ledger file is damaged (or not one at all): it is moved aside and replaced."""


class LedgerForeign(CometStreamError):
    """A ledger was written for another server: it is moved aside and replaced."""


class CheckpointUnreadable(CometStreamError):
    """An earlier version's ``checkpoint.json`` cannot be used; ``why`` names the suffix it is
    moved aside with (``foreign``: another server or format version)."""

    def __init__(self, why: str, message: str) -> None:
        self.why = why
        super().__init__(message)


class DlqError(CometStreamError):
    """A ``dlq`` command could not do its job: the ledger is missing or unreadable, another
    replay holds the lock, a replay stopped. ``usage``: the command line names what is not there
    (an unknown sink or id, a malformed duration)."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        self.usage = usage
        super().__init__(message, retryable=False)


class TapUnavailable(CometStreamError):
    """No daemon answers on the tap socket (missing, refused, no permission)."""

    retryable = True


class TapRefused(CometStreamError):
    """The daemon refused the tap request (its ``error``)."""


class TapBadRequest(CometStreamError):
    """A tap request the daemon refuses (its message goes to the client)."""


class DuplicateKey(CometStreamError):
    """A JSON object gives a key twice (raised by redaction's parser hook to stop the parse)."""

    def __init__(self, message: str = "a JSON object gives a key twice") -> None:
        super().__init__(message, retryable=False)


class TaskDied(CometStreamError):
    """A background task (``task``: its name) ended on an error nothing inside it expected: a
    bug. Handed to whatever waited on the task (``__cause__``: the error itself)."""

    def __init__(self, task: str, error: BaseException) -> None:
        self.task = task
        super().__init__(f"background task {task} died: {error.__class__.__name__}: {error}",
                         retryable=False)
