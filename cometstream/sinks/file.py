"""The file sink: JSON Lines appended to a file, with size rotation and SIGHUP reopen.

Options (``[sinks.NAME]``, ``type = "file"``):

- ``path`` (required): the file; its folder is created. Existing data is never truncated.
- ``rotate_bytes`` (default 0 = never): before a write would take the file past this size, it is
  renamed ``PATH.1`` (older ones shift to ``PATH.2`` … ``PATH.<keep>``; the oldest is deleted).
- ``keep`` (default 5): how many rotated files to keep.
- ``fsync``: ``always`` = every write is fsynced before the batch is acknowledged (durable acks);
  ``batch`` (default) = written batches are acknowledged at once and fsynced at most once a
  second, at rotation and at close; ``never`` = left to the OS (still fsynced at close).

Writing happens on one worker thread per sink, so a slow disk never stalls the event loop. A
failed write (or failed fsync with ``always``) is cut back to where it began (``ftruncate``), so a
retry leaves no torn or duplicated line behind; a batch that a rotation split in two can only be
rolled back to the rotation. SIGHUP (``reopen()``) makes the next write reopen ``path``: logrotate's
``create`` mode then works without ``copytruncate``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from .._thread import WriterThread
from ..errors import SinkError
from .base import Sink

if TYPE_CHECKING:
    from typing import Self

    from ..section import Section
    from ..events import Event

__all__ = ["FileSink"]

FSYNC_MODES: Final = ("always", "batch", "never")
_BATCH_FSYNC_INTERVAL: Final = 1.0


class FileSink(Sink):
    default_format = "envelope"
    uses_doc = False

    def __init__(self, name: str, path: Path, *, format: str = "envelope", rotate_bytes: int = 0,
                 keep: int = 5, fsync: str = "batch") -> None:
        self.name = name
        self.path = path
        self.format = format
        self.rotate_bytes = rotate_bytes
        self.keep = keep
        self.fsync = fsync
        self._fd = -1
        self._size = 0
        self._reopen = False
        self._last_fsync = 0.0
        self._dirty = False
        self._writer: WriterThread | None = None

    @classmethod
    def from_config(cls, name: str, options: Section) -> Self:
        path = options.path("path")
        if path is None:
            raise options.error("path", "is required")
        fmt = options.str("format", cls.default_format)
        rotate = options.int("rotate_bytes", 0, min=0)
        if 0 < rotate < 4096:
            raise options.error("rotate_bytes", f"must be 0 (never) or >= 4096, got {rotate}")
        keep = options.int("keep", 5, min=1, max=1000)
        fsync = options.str("fsync", "batch", choices=FSYNC_MODES)
        options.done()
        return cls(name, path, format=fmt, rotate_bytes=rotate, keep=keep, fsync=fsync)

    # --- lifecycle (event loop side) ------------------------------------------------------------
    async def open(self) -> None:
        if self._writer is None:
            self._writer = WriterThread(f"sink-{self.name}")
        await self._run(self._open_sync)

    async def send(self, batch: Sequence[Event]) -> None:
        fmt = self.format
        if fmt == "event":
            lines = [ev.raw for ev in batch]
        else:
            lines = [ev.envelope() for ev in batch]
        await self._run(self._write_sync, lines)

    async def aclose(self) -> None:
        if self._writer is None:
            return
        try:
            await self._run(self._close_sync)
        finally:
            self._writer.close()
            self._writer = None

    def reopen(self) -> None:
        self._reopen = True

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        assert self._writer is not None, "sink not open"
        try:
            return await self._writer.run(fn, *args)
        except OSError as exc:
            raise SinkError(self.name, f"{self.path}: {exc.strerror or exc}",
                            retryable=True) from exc

    # --- the worker thread ------------------------------------------------------------------------
    def _open_sync(self) -> None:
        if self._fd >= 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._fd = fd
        self._size = os.fstat(fd).st_size
        if self._size:
            self._repair_tail()

    def _repair_tail(self) -> None:
        # A crash mid-write (power loss) can leave a last line without its newline; end it so
        # the next line is not glued onto a torn one.
        with open(self.path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                os.write(self._fd, b"\n")
                self._size += 1

    def _close_sync(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                if self._dirty:
                    os.fsync(fd)
            finally:
                os.close(fd)

    def _write_sync(self, lines: list[bytes]) -> None:
        if self._reopen:
            self._reopen = False
            self._close_sync()
        if self._fd < 0:
            self._open_sync()
        limit = self.rotate_bytes
        if limit:
            chunk: list[bytes] = []
            size = 0
            for line in lines:
                n = len(line) + 1
                if self._size + size + n > limit and self._size + size > 0:
                    if chunk:
                        self._append(b"\n".join(chunk) + b"\n")
                        chunk, size = [], 0
                    self._rotate()
                chunk.append(line)
                size += n
            if chunk:
                self._append(b"\n".join(chunk) + b"\n")
        else:
            self._append(b"\n".join(lines) + b"\n")
        if self.fsync == "batch":
            now = time.monotonic()
            if now - self._last_fsync >= _BATCH_FSYNC_INTERVAL:
                os.fsync(self._fd)
                self._last_fsync = now
                self._dirty = False

    def _append(self, data: bytes) -> None:
        """Append whole lines; on any failure (write or, with fsync=always, fsync) the file is
        cut back to where this write began, so a retry writes each line exactly once."""
        fd = self._fd
        # the real end of file (another writer or a copytruncate may have moved it)
        start = os.fstat(fd).st_size
        view = memoryview(data)
        written = 0
        try:
            while written < len(data):
                written += os.write(fd, view[written:])
            self._dirty = True
            if self.fsync == "always":
                os.fsync(fd)
                self._dirty = False
        except OSError:
            if written:
                try:
                    os.ftruncate(fd, start)
                except OSError:
                    pass
            raise
        self._size = start + written

    def _rotate(self) -> None:
        self._close_sync()
        base = str(self.path)
        oldest = f"{base}.{self.keep}"
        if os.path.exists(oldest):
            os.unlink(oldest)
        for i in range(self.keep - 1, 0, -1):
            src = f"{base}.{i}"
            if os.path.exists(src):
                os.replace(src, f"{base}.{i + 1}")
        os.replace(base, f"{base}.1")
        self._open_sync()
