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

Exactly once across a crash: the file's inode and byte offset at each acknowledgement
(:meth:`FileSink.position`) are committed in the ledger with the sink's cursor. At the next start
(:meth:`FileSink.recover`) the lines past the committed offset (written after the last commit,
before the crash) are read back and recognised by their identity: the dedup key of a job event,
the profile digest of an account change, a digest of the bytes otherwise. When the same event
comes again (from the ledger, or synthesized by the remedial sync) it is not written twice. A
torn last line (a write cut short) is cut off: its event comes again. Recovery ends once the sink
has every event published up to the first resync after the start.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import structlog

from .._thread import WriterThread
from ..delivery.identity import event_identity, line_identity
from ..errors import SinkError
from .base import Sink

if TYPE_CHECKING:
    from typing import Self

    from ..events import Event
    from ..section import Section

__all__ = ["FileSink"]

log = structlog.get_logger("cometstream.sinks.file")

T = TypeVar("T")

FSYNC_MODES: Final = ("always", "batch", "never")
_BATCH_FSYNC_INTERVAL: Final = 1.0


def _trusted(st: os.stat_result, path: Path) -> bool:
    """A file we may append to: ours, or one in a folder only its owner (and root) can change
    (an operator may create the file for us; a local user may not, in a folder everyone can
    write to, to read what we write)."""
    if not hasattr(os, "geteuid") or st.st_uid == os.geteuid():
        return True
    try:
        parent = os.stat(path.parent)
    except OSError:
        return False
    return not parent.st_mode & 0o022


def refused(path: Path) -> str | None:
    """Why the sink would not write to ``path`` as it stands, in run's own words (its tests at
    open, for ``check``): a symbolic link, not a regular file (a FIFO, a device), a file not
    ours in a folder others can write to. None if missing (it is created) or usable."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link (not followed)"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if not _trusted(st, path):
        return (f"is owned by uid {st.st_uid} in a folder others can write to (not ours: not "
                "written to)")
    return None


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
        self._ino = 0
        self._writer: WriterThread | None = None
        #: where the file stood at the last committed cursor (``[inode, offset]``), for recovery
        self._recover_from: list[int] | None = None
        #: identities of lines written past the committed offset, not to be written again
        self._skip: Counter[str] = Counter()
        #: the position recovery started from, while it lasts
        self._recovering: list[int] | None = None
        self.recognised = 0

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

    # --- exactly once across a crash -------------------------------------------------------------
    def position(self) -> list[int]:
        """Where the file stands after what was acknowledged: [inode, byte offset]. While it
        recovers, where the recovery started: a second crash then reads back the same lines
        and those written since (their events may come yet again)."""
        if self._recovering is not None:
            return self._recovering
        return [self._ino, self._size]

    def recover(self, position: list[int] | None) -> None:
        """Before :meth:`open`: the position committed with the sink's cursor (None: unknown)."""
        if isinstance(position, list) and len(position) == 2 \
                and all(type(v) is int for v in position):
            self._recover_from = position

    def end_recovery(self) -> None:
        self._recovering = None
        if self._skip:
            log.info("file sink recovery over: some lines written before the crash were not "
                     "published again", sink=self.name, lines=sum(self._skip.values()))
        elif self.recognised:
            log.info("file sink recovery over", sink=self.name, recognised=self.recognised)
        self._skip.clear()

    def _recognised(self, batch: Sequence[Event]) -> tuple[list[Event], Counter[str]]:
        """The events of ``batch`` that the file does not hold yet, and the identities of those
        it does (consumed once the rest is written: a failed write is retried whole)."""
        skip = self._skip
        out = []
        seen: Counter[str] = Counter()
        for ev in batch:
            ident = event_identity(ev)
            if skip.get(ident, 0) > seen[ident]:
                seen[ident] += 1
                continue
            out.append(ev)
        return out, seen

    async def send(self, batch: Sequence[Event]) -> None:
        seen = None
        if self._skip:
            batch, seen = self._recognised(batch)
            if not batch:
                self._consume(seen)
                return
        lines = ([ev.raw for ev in batch] if self.format == "event"
                 else [ev.envelope() for ev in batch])
        await self._run(self._write_sync, lines)
        if seen:
            self._consume(seen)

    def _consume(self, seen: Counter[str]) -> None:
        skip = self._skip
        for ident, n in seen.items():
            left = skip[ident] - n
            if left > 0:
                skip[ident] = left
            else:
                del skip[ident]
        self.recognised += sum(seen.values())

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

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
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
        try:
            # never through a symbolic link: in a folder others can write to, one planted at
            # the path (after a rotation, say) would send the events into any file we can write
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                         | os.O_NOFOLLOW | os.O_NONBLOCK, 0o640)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OSError(exc.errno, "is a symbolic link (not followed)") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _trusted(st, self.path):
            os.close(fd)
            what = "not a regular file" if not stat.S_ISREG(st.st_mode) else (
                f"owned by uid {st.st_uid} in a folder others can write to (not ours: not "
                "written to)")
            raise OSError(errno.EPERM, what)
        os.set_blocking(fd, True)
        self._fd = fd
        self._size = st.st_size
        self._ino = st.st_ino
        if self._recover_from is not None:
            recover, self._recover_from = self._recover_from, None
            self._read_back(*recover)
        if self._size:
            self._repair_tail()

    def _read_back(self, ino: int, offset: int) -> None:
        """The lines past the committed position (the file may have been rotated since: the
        committed inode's rest, then every newer file), as identities not to write again."""
        base = str(self.path)
        chain = [(base, self._ino)]
        for i in range(1, self.keep + 1):
            try:
                chain.append((f"{base}.{i}", os.stat(f"{base}.{i}").st_ino))
            except OSError:
                break
        found = next((k for k, (_p, i) in enumerate(chain) if i == ino), None)
        if found is None:
            if offset:
                log.warning("file sink: the file of the last commit is gone (moved or deleted); "
                            "lines written after it are not recognised", sink=self.name,
                            path=base)
            return
        if found == 0 and self._size < offset:
            log.error("file sink: the file is shorter than at the last commit: lines "
                      "acknowledged before a power failure were lost (fsync = \"always\" "
                      "prevents it)", sink=self.name, path=base, size=self._size,
                      committed=offset)
        tail = b""
        for k in range(found, -1, -1):
            path = chain[k][0]
            with open(path, "rb") as fh:
                if k == found:
                    fh.seek(offset)
                data = fh.read()
            if k == 0 and data and not data.endswith(b"\n"):
                # a torn last line: cut off (its event comes again)
                cut = data.rfind(b"\n") + 1
                os.ftruncate(self._fd, self._size - (len(data) - cut))
                log.warning("file sink: torn last line cut off", sink=self.name,
                            bytes=len(data) - cut)
                self._size -= len(data) - cut
                data = data[:cut]
            tail += data
        for line in tail.splitlines():
            ident = line_identity(line)
            if ident is not None:
                self._skip[ident] += 1
        if self._skip:
            self._recovering = [ino, offset]
            log.info("file sink: lines written after the last commit will not be written again",
                     sink=self.name, lines=sum(self._skip.values()))

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
        if limit and self._size + sum(map(len, lines)) + len(lines) > limit:
            # (a batch that fits, nearly all, is written whole below, its size summed in C:
            # no Python loop over its lines on this thread, which holds the interpreter then)
            chunk: list[bytes] = []
            size = 0
            for line in lines:
                n = len(line) + 1
                if self._size + size + n > limit and self._size + size > 0:
                    if chunk:
                        self._append(_lines(chunk))
                        chunk, size = [], 0
                    self._rotate()
                chunk.append(line)
                size += n
            if chunk:
                self._append(_lines(chunk))
        else:
            self._append(_lines(lines))
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


def _lines(lines: list[bytes]) -> bytes:
    """The lines as one text, each ended by a line break, in one copy of their bytes (a join
    then ``+ b"\\n"`` copies them twice, the second time holding the interpreter)."""
    return b"\n".join([*lines, b""])
