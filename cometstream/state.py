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
- ``dedup``: the de-duplication window, oldest first: ``{"fingerprints", "timestamps"}``, two
  base64 arrays of little-endian int64 (a key's 64-bit BLAKE2b fingerprint, its timestamp).
  Format 1 (``[[key, timestamp], ...]``) is still read.

Writes are atomic (temporary file, fsync, rename, fsync of the folder). A file that cannot be read
(corrupt, another format version, another server) is moved aside with a clear log line and the
daemon starts as if there were none.
"""

from __future__ import annotations

import binascii
import hashlib
import os
import sys
import threading
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
import structlog

__all__ = ["FORMAT_VERSION", "Checkpoint", "Dedup", "StateStore", "fingerprint", "profile_digest"]

log = structlog.get_logger("cometstream.state")

FORMAT_VERSION: Final = 2
#: older formats this version reads (and rewrites in the current one)
READABLE_VERSIONS: Final = (1, 2)
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


def fingerprint(key: str | int) -> int:
    """What the dedup window keeps of a key: a stable signed 64-bit BLAKE2b fingerprint (36
    bytes in memory and 8 in the checkpoint, where the key itself takes 100 and 60). A collision
    between two of 200,000 keys has a chance of about one in 10^9."""
    if type(key) is int:
        return key
    return int.from_bytes(_blake2b(key.encode(), digest_size=8).digest(), "little", signed=True)


_blake2b = hashlib.blake2b


class Dedup:
    """Fingerprints of the keys of delivered events, bounded in age and size; plus the keys
    still in flight. Methods take a key (``str``) or its :func:`fingerprint`.

    ``seen(key)`` is true for a key delivered within the window or published and not yet
    acknowledged. Only acknowledged keys are persisted: a crash before delivery must not make the
    next resync skip the event.
    """

    def __init__(self, *, max_age: float = 86400.0, max_size: int = 200_000) -> None:
        self.max_age = max_age
        self.max_size = max_size
        self.delivered: dict[int, int] = {}  # fingerprint -> timestamp, insertion ordered
        self.inflight: dict[int, int] = {}  # fingerprint -> seq
        self.duplicates = 0
        # timestamps repeat (many events a second): one int object per second, not per key
        self._ts: dict[int, int] = {}

    def seen(self, key: str | int) -> bool:
        fp = fingerprint(key)
        return fp in self.delivered or fp in self.inflight

    def add_inflight(self, key: str | int, seq: int) -> None:
        self.inflight[fingerprint(key)] = seq

    def acked(self, key: str | int, ts: int) -> None:
        self.acked_fp(fingerprint(key), ts)

    def acked_fp(self, fp: int, ts: int) -> None:
        """:meth:`acked` for a fingerprint (the hot path: every delivered job event)."""
        self.inflight.pop(fp, None)
        d = self.delivered
        if fp in d:
            del d[fp]  # move to the newest end
        d[fp] = self._ts.setdefault(ts, ts)

    def forget_inflight(self, key: str | int) -> None:
        self.inflight.pop(fingerprint(key), None)

    def prune(self, now: float) -> None:
        d = self.delivered
        horizon = now - self.max_age
        excess = len(d) - self.max_size
        if not d:
            return
        drop: list[int] = []
        for fp, ts in d.items():
            if excess > 0 or ts < horizon:
                drop.append(fp)
                excess -= 1
            else:
                break
        for fp in drop:
            del d[fp]
        if len(self._ts) > 100_000 or drop:
            # forget the shared timestamps that left the window
            live = {ts for ts in self._ts if ts >= horizon}
            if len(live) < len(self._ts):
                self._ts = {ts: ts for ts in live}

    def load(self, entries: Any) -> None:
        """From a checkpoint: the compact form (see :meth:`dump`), or format 1's
        ``[[key, timestamp], ...]``."""
        if isinstance(entries, dict):
            fps = array("q", binascii.a2b_base64(entries.get("fingerprints", "")))
            stamps = array("q", binascii.a2b_base64(entries.get("timestamps", "")))
            if len(fps) != len(stamps):
                raise ValueError("dedup: fingerprints and timestamps differ in number")
            if sys.byteorder != "little":
                fps.byteswap()
                stamps.byteswap()
            for fp, ts in zip(fps, stamps, strict=True):
                self.delivered[fp] = self._ts.setdefault(ts, ts)
            return
        for key, ts in entries:
            self.delivered[fingerprint(key)] = self._ts.setdefault(ts, ts)

    def dump(self) -> dict[str, str]:
        """``{"fingerprints": base64, "timestamps": base64}``: little-endian int64 arrays,
        oldest first (built in C: a 200,000-key window takes milliseconds, not a list per key)."""
        fps = array("q", self.delivered.keys())
        stamps = array("q", self.delivered.values())
        if sys.byteorder != "little":
            fps.byteswap()
            stamps.byteswap()
        return {"fingerprints": binascii.b2a_base64(fps.tobytes(), newline=False).decode(),
                "timestamps": binascii.b2a_base64(stamps.tobytes(), newline=False).decode()}

    def __len__(self) -> int:
        return len(self.delivered)


@dataclass
class Checkpoint:
    server: str = ""
    watermark: int = 0
    server_start_hash: str = ""
    running_jobs: dict[str, list[Any]] = field(default_factory=dict)
    accounts: dict[str, list[Any]] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)
    accounts_baseline: bool = False
    #: format 2's compact form, or format 1's list of [key, timestamp]
    dedup: Any = field(default_factory=dict)
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
        if version not in READABLE_VERSIONS:
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
            dedup=_typed(doc, "dedup", dict if version >= 2 else list, {} if version >= 2 else []),
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
        if isinstance(cp.dedup, dict):
            sizes = []
            for part in ("fingerprints", "timestamps"):
                v = cp.dedup.get(part, "")
                if not isinstance(v, str):
                    raise ValueError(f"dedup.{part}: expected base64 text")
                try:
                    sizes.append(len(binascii.a2b_base64(v)))
                except binascii.Error as exc:
                    raise ValueError(f"dedup.{part}: {exc}") from None
            if sizes[0] != sizes[1] or sizes[0] % 8:
                raise ValueError("dedup: fingerprints and timestamps are not int64 arrays of "
                                 "one length")
        else:
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
