"""The stdout sink: JSON Lines, or one readable colourised line per event on a terminal.

Options (``type = "stdout"``): ``format`` (``envelope`` default, or ``event``) and ``pretty``
(``"auto"`` default: readable lines when stdout is a TTY, JSON Lines otherwise; ``true``;
``false``). Writes go through a worker thread so a slow reader (a pager, a full pipe) never stalls
the event loop. A closed stdout (``| head``) is a permanent failure, counted and logged once;
unless the sink was built with ``on_closed`` (``cometstream demo``): then it calls it once, like a
Unix tool whose reader has what it wanted, and accepts and discards whatever follows.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, Any

from .._thread import WriterThread
from ..constants import job_status_name
from ..errors import SinkError
from .base import Sink

if TYPE_CHECKING:
    from typing import Self

    from ..events import Event
    from ..section import Section

__all__ = ["StdoutSink", "pretty_line"]

_RESET = "\x1b[0m"
_DIM = "\x1b[2m"
_BOLD = "\x1b[1m"
_RED = "\x1b[31m"
_GREEN = "\x1b[32m"
_YELLOW = "\x1b[33m"
_BLUE = "\x1b[34m"
_MAGENTA = "\x1b[35m"
_CYAN = "\x1b[36m"

_CLASSIFICATION = {4001: "backup", 4002: "restore", 4003: "retention", 4004: "unlock",
                   4005: "delete", 4006: "remeasure", 4007: "update", 4008: "import",
                   4009: "reindex", 4010: "verify", 4011: "uninstall"}


def _size(n: object) -> str:
    if not isinstance(n, int | float) or isinstance(n, bool):
        return ""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return ""


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _duration(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _s(value: Any, width: int = 0) -> str:
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    text = "".join(ch if ch.isprintable() else "?" for ch in text)  # no terminal escapes
    return text[:width] if width else text


def _status_colour(status: object) -> str:
    if isinstance(status, int):
        if 5000 <= status <= 5999:
            return _GREEN
        if 6000 <= status <= 6999:
            return _BLUE
        if status == 7001:
            return _YELLOW
        return _RED
    return ""


def pretty_line(ev: Event, *, colour: bool = True) -> str:
    """One human line for an event: time, type, and what matters for that type."""
    c = (lambda code: code) if colour else (lambda code: "")
    ts = ev.timestamp
    if not 0 < ts < 253402300799:  # a Timestamp localtime() cannot show: use the arrival time
        ts = int(ev.received_at)
    clock = time.strftime("%H:%M:%S", time.localtime(ts))
    doc = ev.doc
    data = doc.get("Data")
    actor = _s(doc.get("Actor"), 32)
    resource = _s(doc.get("ResourceID"), 48)
    parts: list[str] = []
    job = ev.job
    if job is not None:
        status = job.get("Status")
        kind = _CLASSIFICATION.get(_int(job.get("Classification")) or 0, "job")
        parts.append(f"{_s(job.get('Username'), 32)} {kind} {_s(job.get('GUID'), 8)}")
        parts.append(f"{c(_status_colour(status))}{job_status_name(status).removeprefix('JOB_STATUS_')}{c(_RESET)}")
        start, end = _int(job.get("StartTime")), _int(job.get("EndTime"))
        if start is not None and end is not None and end >= start > 0:
            parts.append(_duration(end - start))
        if end:
            up = _size(job.get("UploadSize"))
            if up:
                parts.append(f"up {up}")
    elif ev.type == 4000 and isinstance(data, dict):
        parts.append(f"Comet {_s(data.get('Version'), 16)} start {_s(data.get('ServerStartHash'), 8)}")
    elif isinstance(data, dict) and isinstance(data.get("Username"), str):
        parts.append(_s(data.get("Username"), 32))
        if actor and actor != data.get("Username"):
            parts.append(f"by {actor}")
    elif isinstance(data, dict) and isinstance(data.get("FriendlyName"), str):
        parts.append(f"{_s(data.get('FriendlyName'), 32)} ({resource[:12]})")
    else:
        if isinstance(data, str):
            parts.append(_s(data, 48))
        if actor:
            parts.append(actor)
        if resource:
            parts.append(resource)
    origin = "" if ev.origin == "stream" else f" {c(_MAGENTA)}[{ev.origin}]{c(_RESET)}"
    name = ev.type_name
    name_colour = _YELLOW if name not in ("SEVT_JOB_NEW", "SEVT_JOB_COMPLETED") else _CYAN
    return (f"{c(_DIM)}{clock}{c(_RESET)} {c(name_colour)}{name:<28}{c(_RESET)} "
            f"{'  '.join(p for p in parts if p)}{origin}")


class StdoutSink(Sink):
    default_format = "envelope"

    def __init__(self, name: str, *, format: str = "envelope", pretty: bool | None = None,
                 stream: IO[bytes] | None = None,
                 on_closed: Callable[[], None] | None = None) -> None:
        self.name = name
        self.on_closed = on_closed
        #: stdout was closed and on_closed called: the rest is discarded
        self.closed = False
        self.format = format
        self._pretty_opt = pretty
        self._stream = stream
        self._fd: int | None = None
        self.pretty = False
        self.colour = False
        self._writer: WriterThread | None = None

    @classmethod
    def from_config(cls, name: str, options: Section) -> Self:
        fmt = options.str("format", cls.default_format)
        raw = options.raw("pretty", "auto")
        if raw == "auto":
            pretty = None
        elif isinstance(raw, bool):
            pretty = raw
        else:
            raise options.error("pretty", f'expected "auto", true or false, got {raw!r}')
        options.done()
        return cls(name, format=fmt, pretty=pretty)

    @property
    def uses_doc(self) -> bool:  # type: ignore[override]
        """Only the readable lines read the parsed event."""
        return self._pretty_opt if self._pretty_opt is not None else self._is_tty()

    def _is_tty(self) -> bool:
        try:
            fd = sys.stdout.fileno() if self._stream is None else self._stream.fileno()
            return os.isatty(fd)
        except (OSError, ValueError, AttributeError):
            return False

    async def open(self) -> None:
        if self._stream is None:
            # Write to fd 1 directly, unbuffered: if a write blocks on a full pipe, nothing is
            # left in sys.stdout's buffer for the interpreter to flush (and hang on) at exit.
            self._fd = sys.stdout.fileno()
        tty = self._is_tty()
        self.pretty = tty if self._pretty_opt is None else self._pretty_opt
        self.colour = tty and "NO_COLOR" not in os.environ
        if self._writer is None:
            self._writer = WriterThread(f"sink-{self.name}")

    async def send(self, batch: Sequence[Event]) -> None:
        if self.closed:
            return
        if self.pretty:
            data = "".join([self._pretty(ev) for ev in batch]).encode("utf-8", "replace")
        elif self.format == "event":
            data = b"\n".join([ev.raw for ev in batch]) + b"\n"
        else:
            data = b"\n".join([ev.envelope() for ev in batch]) + b"\n"
        assert self._writer is not None, "sink not open"
        try:
            await self._writer.run(self._write, data)
        except BrokenPipeError as exc:
            if self.on_closed is None:
                raise SinkError(self.name, "stdout is closed", retryable=False) from exc
            self.closed = True
            self.on_closed()
        except OSError as exc:
            raise SinkError(self.name, f"stdout: {exc.strerror or exc}", retryable=True) from exc

    def _write(self, data: bytes) -> None:
        if self._fd is not None:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            return
        assert self._stream is not None
        self._stream.write(data)
        self._stream.flush()

    def _pretty(self, ev: Event) -> str:
        try:
            return pretty_line(ev, colour=self.colour) + "\n"
        except Exception:  # noqa: BLE001 - an event shaped like nothing we know: show it as it came
            return ev.raw.decode("utf-8", "replace") + "\n"

    async def aclose(self) -> None:
        if self._writer is not None:
            self._writer.close()  # never waits: a write stuck on a full pipe must not hang exit
            self._writer = None
