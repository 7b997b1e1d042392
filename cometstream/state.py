"""The checkpoint: what has been delivered, so that a restart or a reconnect catches up exactly.

``checkpoint.json`` in ``state.dir`` holds:

- ``watermark``: a server ``Timestamp`` (Unix seconds) such that every event up to it has been
  acknowledged by every sink; remedial sync reads from ``watermark - overlap``;
- ``server_start_hash``: the server's ``ServerStartHash`` (a new one = the server restarted);
- ``running_jobs``: jobs last seen running (``{GUID: [Username, StartTime]}``), re-checked by
  resync because a cancelled job may emit no event;
- ``accounts``: per username ``[digest, CreationGUID]`` (the digest leaves out the statistics
  that change after every job, and the devices); ``devices``: ``{device ID: username}``;
  ``accounts_baseline`` says whether they are filled;
- ``dedup``: the de-duplication window (``[[key, timestamp], ...]``, oldest first).

Writes are atomic (temporary file, fsync, rename, fsync of the folder). A file that cannot be read
(corrupt, another format version, another server) is moved aside with a clear log line and the
daemon starts as if there were none.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
import structlog

__all__ = ["FORMAT_VERSION", "Checkpoint", "Dedup", "StateStore", "profile_digest"]

log = structlog.get_logger("cometstream.state")

FORMAT_VERSION: Final = 1
FILENAME: Final = "checkpoint.json"
#: statistics that change after every job: not an account change
_VOLATILE_KEYS: Final = frozenset({"Statistics"})


def profile_digest(profile: dict[str, Any]) -> str:
    """A digest of a UserProfileConfig that ignores per-job statistics, the device list (devices
    are tracked, and reported, on their own) and key order."""
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in _VOLATILE_KEYS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    top = {k: v for k, v in profile.items() if k != "Devices"}
    try:
        blob = orjson.dumps(strip(top), option=orjson.OPT_SORT_KEYS)
    except TypeError:  # an integer beyond 64 bits (from the stdlib fallback parser)
        blob = repr(strip(top)).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


class Dedup:
    """Keys of delivered events, bounded in age and size; plus the keys still in flight.

    ``seen(key)`` is true for a key delivered within the window or published and not yet
    acknowledged. Only acknowledged keys are persisted: a crash before delivery must not make the
    next resync skip the event.
    """

    def __init__(self, *, max_age: float = 86400.0, max_size: int = 200_000) -> None:
        self.max_age = max_age
        self.max_size = max_size
        self.delivered: dict[str, int] = {}  # key -> timestamp, insertion ordered
        self.inflight: dict[str, int] = {}  # key -> seq
        self.duplicates = 0

    def seen(self, key: str) -> bool:
        return key in self.delivered or key in self.inflight

    def add_inflight(self, key: str, seq: int) -> None:
        self.inflight[key] = seq

    def acked(self, key: str, ts: int) -> None:
        self.inflight.pop(key, None)
        d = self.delivered
        if key in d:
            del d[key]  # move to the newest end
        d[key] = ts

    def forget_inflight(self, key: str) -> None:
        self.inflight.pop(key, None)

    def prune(self, now: float) -> None:
        d = self.delivered
        horizon = now - self.max_age
        excess = len(d) - self.max_size
        if not d:
            return
        drop: list[str] = []
        for key, ts in d.items():
            if excess > 0 or ts < horizon:
                drop.append(key)
                excess -= 1
            else:
                break
        for key in drop:
            del d[key]

    def load(self, entries: Iterable[Any]) -> None:
        for key, ts in entries:
            self.delivered[key] = ts

    def dump(self) -> list[list[Any]]:
        return [[k, ts] for k, ts in self.delivered.items()]


@dataclass
class Checkpoint:
    server: str = ""
    watermark: int = 0
    server_start_hash: str = ""
    running_jobs: dict[str, list[Any]] = field(default_factory=dict)
    accounts: dict[str, list[Any]] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)
    accounts_baseline: bool = False
    dedup: list[list[Any]] = field(default_factory=list)
    written_at: float = 0.0

    def to_json(self) -> bytes:
        return orjson.dumps({
            "version": FORMAT_VERSION,
            "server": self.server,
            "written_at": self.written_at,
            "watermark": self.watermark,
            "server_start_hash": self.server_start_hash,
            "running_jobs": self.running_jobs,
            "accounts": self.accounts,
            "devices": self.devices,
            "accounts_baseline": self.accounts_baseline,
            "dedup": self.dedup,
        })

    @classmethod
    def from_json(cls, blob: bytes) -> Checkpoint:
        doc = orjson.loads(blob)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        version = doc.get("version")
        if version != FORMAT_VERSION:
            raise _ForeignVersion(f"format version {version!r}, this cometstream reads "
                                  f"{FORMAT_VERSION}")
        cp = cls(
            server=_typed(doc, "server", str, ""),
            watermark=_typed(doc, "watermark", int, 0),
            server_start_hash=_typed(doc, "server_start_hash", str, ""),
            running_jobs=_typed(doc, "running_jobs", dict, {}),
            accounts=_typed(doc, "accounts", dict, {}),
            devices=_typed(doc, "devices", dict, {}),
            accounts_baseline=_typed(doc, "accounts_baseline", bool, False),
            dedup=_typed(doc, "dedup", list, []),
            written_at=float(_typed(doc, "written_at", (int, float), 0.0)),
        )
        # the entries too: a half-valid file must be moved aside, not fail every resync
        for guid, v in cp.running_jobs.items():
            if not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
                    and type(v[1]) is int):
                raise ValueError(f"running_jobs.{guid}: expected [username, start time]")
        for name, v in cp.accounts.items():
            if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)):
                raise ValueError(f"accounts.{name}: expected [digest, CreationGUID]")
        for dev, owner in cp.devices.items():
            if not isinstance(owner, str):
                raise ValueError(f"devices.{dev}: expected a username")
        for item in cp.dedup:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                    and type(item[1]) is int):
                raise ValueError("dedup: expected [key, timestamp] entries")
        return cp


class _ForeignVersion(ValueError):
    pass


def _typed(doc: dict[str, Any], key: str, typ: Any, default: Any) -> Any:
    value = doc.get(key, default)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ValueError(f"{key}: expected {getattr(typ, '__name__', typ)}")
    return value


class StateStore:
    """Reads and atomically writes ``checkpoint.json`` in ``state.dir``."""

    def __init__(self, directory: Path, server: str) -> None:
        self.dir = directory
        self.path = directory / FILENAME
        self.server = server
        self.writes = 0
        self.errors = 0
        self._lock = threading.Lock()  # the periodic writer's thread and shutdown's final write

    def prepare(self) -> None:
        """Create the folder and check it is writable (raises OSError with the reason)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        probe = self.dir / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()

    def load(self) -> Checkpoint | None:
        """The checkpoint, or None if there is none (or it had to be moved aside)."""
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("checkpoint unreadable, starting without it", path=str(self.path),
                      error=exc.strerror or str(exc))
            return None
        try:
            cp = Checkpoint.from_json(blob)
        except _ForeignVersion as exc:
            self._move_aside("foreign", str(exc))
            return None
        except (ValueError, TypeError) as exc:
            self._move_aside("corrupt", str(exc))
            return None
        if cp.server and cp.server != self.server:
            self._move_aside("foreign", f"written for server {cp.server!r}, this is "
                             f"{self.server!r}")
            return None
        return cp

    def _move_aside(self, why: str, detail: str) -> None:
        target = self.path.with_name(f"{FILENAME}.{why}-{int(time.time())}")
        try:
            os.replace(self.path, target)
            log.error("checkpoint moved aside, starting without it", reason=why, detail=detail,
                      moved_to=str(target))
        except OSError as exc:
            log.error("checkpoint unusable and cannot be moved aside", reason=why, detail=detail,
                      error=exc.strerror or str(exc))

    def save(self, cp: Checkpoint) -> bool:
        """Write atomically; False (logged) on failure — the daemon goes on. Thread-safe."""
        with self._lock:
            return self._save(cp)

    def _save(self, cp: Checkpoint) -> bool:
        cp.server = self.server
        cp.written_at = time.time()
        tmp = self.path.with_name(f".{FILENAME}.tmp-{os.getpid()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
            try:
                data = cp.to_json()
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except (OSError, TypeError, ValueError) as exc:
            self.errors += 1
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.error("checkpoint write failed", path=str(self.path), error=why)
            try:
                tmp.unlink()
            except OSError:
                pass
            return False
        self.writes += 1
        return True
