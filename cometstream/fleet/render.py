"""The fleet as Prometheus text (exposition format 0.0.4), from memory, for ``/metrics``.

Not a prometheus-client collector: the client builds a sample object per series and escapes
every label of every sample at each scrape (about 8 µs a series here), which for a fleet of
30,000 protected items (some 500,000 series) is seconds per scrape. Each entity's label text is
built once, when the entity is (:mod:`.model`), so a scrape is one pass that joins strings:
well under a microsecond a series. Each family is encoded as soon as it is complete, so the
transient text of a scrape is about one family's.

The ``cometserver_*`` families carry the names and labels of Comet's own exporter, and the
same meaning (:mod:`.model`); ``cometstream_fleet_*`` describe the fleet state itself.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
import zlib
from collections.abc import Callable, Iterable
from typing import Any, Final

from .model import BLOCKS, CATEGORIES, NEG_INF, Model, User, beyond, block_of, label_value

__all__ = ["BLOCK_FAMILIES", "BlockCache", "Family", "edges", "render"]

#: (name, type, help, [(label text without braces, value)]): a small family of our own
Family = tuple[str, str, str, list[tuple[str, float]]]

_HELP: Final = {
    "cometserver_users_total": "Users on the Comet Server",
    "cometserver_storagevault_size_bytes": "Last measured size of each Storage Vault",
    "cometserver_storagevault_quota_bytes": "Quota of each Storage Vault that has one",
    "cometserver_lastbackup_start_time": "Start time of the Protected Item's last completed "
                                         "backup job (Unix seconds)",
    "cometserver_lastbackup_end_time": "End time of the Protected Item's last completed backup "
                                       "job (Unix seconds)",
    "cometserver_lastbackup_file_count": "Files in the Protected Item's last completed backup job",
    "cometserver_lastbackup_file_size_bytes": "Size of the data selected for backup, as of the "
                                              "Protected Item's last completed backup job",
    "cometserver_lastbackup_upload_size_bytes": "Bytes uploaded by the Protected Item's last "
                                                "completed backup job",
    "cometserver_lastbackup_download_size_bytes": "Bytes downloaded by the Protected Item's last "
                                                  "completed backup job",
    "cometserver_lastbackup_status": "Status category of the Protected Item's last completed "
                                     "backup job (1 for its category, 0 for the others)",
    "cometserver_recentjobs_total": "Jobs that started or ended in the last 24 hours, by status "
                                    "category",
    "cometserver_device_is_online": "1 while the registered device has a live connection",
    "cometserver_device_is_current": "1 when the live-connected device runs the server's "
                                     "software version",
    "cometserver_lastsuccessfulbackup_end_time": "End time of the Protected Item's last "
                                                 "successful backup job (Unix seconds)",
    "cometserver_protected_item_info": "A Protected Item's description, engine and device "
                                       "(value 1)",
    "cometserver_device_info": "A registered device's name, platform and client version "
                               "(value 1)",
    "cometserver_selfbackup_time_since": "Seconds since the end of the last run of each of the "
                                         "server's self-backups (-1: never run)",
    "cometserver_selfbackup_filesize": "Size of the last run of each of the server's "
                                       "self-backups (bytes)",
    "cometserver_selfbackup_success": "1 when the last run of each of the server's self-backups "
                                      "succeeded",
}
_START: Final = "cometserver_lastbackup_start_time{"
_END: Final = "cometserver_lastbackup_end_time{"
_FILES: Final = "cometserver_lastbackup_file_count{"
_FSIZE: Final = "cometserver_lastbackup_file_size_bytes{"
_UP: Final = "cometserver_lastbackup_upload_size_bytes{"
_DOWN: Final = "cometserver_lastbackup_download_size_bytes{"
_STATUS: Final = "cometserver_lastbackup_status{"
_SUCCESS: Final = "cometserver_lastsuccessfulbackup_end_time{"
_ITEM_INFO: Final = "cometserver_protected_item_info{"
_SIZE: Final = "cometserver_storagevault_size_bytes{"
_QUOTA: Final = "cometserver_storagevault_quota_bytes{"
_ONLINE: Final = "cometserver_device_is_online{"
_CURRENT: Final = "cometserver_device_is_current{"
_DEVICE_INFO: Final = "cometserver_device_info{"
#: per category, the tails of its five status lines: (',status="success"} 1\n', ...)
_STATUS_TAILS: Final = tuple(
    tuple(f',status="{name}"}} {1 if i == cat else 0}\n' for i, name in enumerate(CATEGORIES))
    for cat in range(len(CATEGORIES)))


def _head(name: str, type_: str = "gauge", help_: str | None = None) -> str:
    return f"# HELP {name} {help_ or _HELP[name]}\n# TYPE {name} {type_}\n"


def _family(out: list[bytes], name: str, lines: list[str]) -> None:
    """Encode one family (its lines freed by the caller right after). The head goes in front
    of the lines (a move of pointers), not in front of their joined text (a copy of it)."""
    if lines:
        lines.insert(0, _head(name))
        out.append("".join(lines).encode("utf-8"))


def _value(v: float) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")
    return f"{v}"


def render(model: Model | None, now: float, own: Iterable[Family] = ()) -> bytes:
    """The exposition of ``model`` (nothing of the fleet before it is first seeded) and of the
    ``own`` families, at ``now`` (the server's clock, for the recent jobs)."""
    out: list[bytes] = []
    if model is not None:
        out.append(_small(model, now))
        users = list(model.users.values())  # (in one go: the blocks are for BlockCache)
        for index, name in enumerate(BLOCK_FAMILIES):
            _family(out, name, _LINES[index](users, model.live))
        _family(out, "cometserver_device_is_current", _current(model))
    out.append(_own(own))
    return b"".join(out)


def _small(model: Model, now: float) -> bytes:
    counts = model.recent_counts(now)
    return (_head("cometserver_users_total") + f"cometserver_users_total {len(model.users)}\n"
            + _head("cometserver_recentjobs_total") + "".join(
                f'cometserver_recentjobs_total{{status="{name}"}} {n}\n'
                for name, n in zip(CATEGORIES, counts, strict=True))
            + _self_backups(model, int(now))).encode()


def _self_backups(model: Model, now: int) -> str:
    """The server's self-backups, by their index in ``SelfBackup`` (none: no family)."""
    runs = model.self_backups
    if not runs:
        return ""
    since, size, success = (_head("cometserver_selfbackup_time_since"),
                            _head("cometserver_selfbackup_filesize"),
                            _head("cometserver_selfbackup_success"))
    for i, (end, bytes_, ok) in enumerate(runs):
        label = f'{{selfbackup_index="{i}"}}'
        ago = (NEG_INF if beyond(end) else now - end) if end > 0 else -1
        since += f"cometserver_selfbackup_time_since{label} {ago}\n"
        size += f"cometserver_selfbackup_filesize{label} {bytes_}\n"
        success += f"cometserver_selfbackup_success{label} {1 if ok else 0}\n"
    return since + size + success


def _own(own: Iterable[Family]) -> bytes:
    text: list[str] = []
    for name, type_, help_, samples in own:
        text.append(_head(name, type_, help_))
        for labels, value in samples:
            text.append(f"{name}{{{labels}}} {_value(value)}\n" if labels
                        else f"{name} {_value(value)}\n")
    return "".join(text).encode("utf-8")


def _groups(model: Model) -> list[list[User]]:
    """The users by block (:func:`~.model.block_of`)."""
    groups: list[list[User]] = [[] for _ in range(BLOCKS)]
    for name, user in model.users.items():
        groups[block_of(name)].append(user)
    return groups


def edges(model: Model, now: float, own: Iterable[Family]) -> tuple[bytes, bytes]:
    """The text before the blocks' families (users, recent jobs) and after them (devices'
    versions, ``own``): small, built afresh at each scrape."""
    tail: list[bytes] = []
    _family(tail, "cometserver_device_is_current", _current(model))
    tail.append(_own(own))
    return _small(model, now), b"".join(tail)


# --- the families of the users' entities, one block of users at a time ------------------------------
Lines = Callable[[list[User], dict[str, dict[str, str | None]]], list[str]]


def _figure(prefix: str, index: int) -> Lines:
    def lines(users: list[User], live: Any) -> list[str]:
        return [f"{prefix}{i.labels}}} {i.fig[index]}\n"
                for u in users for i in u.items if i.fig[0] > 0]
    return lines


def _status(users: list[User], live: Any) -> list[str]:
    tails = _STATUS_TAILS
    p = _STATUS
    return [f"{p}{i.labels}{t[0]}{p}{i.labels}{t[1]}{p}{i.labels}{t[2]}{p}{i.labels}{t[3]}"
            f"{p}{i.labels}{t[4]}"
            for u in users for i in u.items if i.fig[0] > 0 for t in (tails[i.fig[6]],)]


def _online(users: list[User], live: dict[str, dict[str, str | None]]) -> list[str]:
    out = []
    for user in users:
        conns = live.get(user.name)
        for d in user.devices:
            out.append(f"{_ONLINE}{d.labels}}} {1 if conns and d.id in conns else 0}\n")
    return out


#: the families rendered per block of users, in the order of the exposition
BLOCK_FAMILIES: Final = (
    "cometserver_storagevault_size_bytes", "cometserver_storagevault_quota_bytes",
    "cometserver_lastbackup_start_time", "cometserver_lastbackup_end_time",
    "cometserver_lastbackup_file_count", "cometserver_lastbackup_file_size_bytes",
    "cometserver_lastbackup_upload_size_bytes", "cometserver_lastbackup_download_size_bytes",
    "cometserver_lastbackup_status", "cometserver_lastsuccessfulbackup_end_time",
    "cometserver_protected_item_info", "cometserver_device_is_online", "cometserver_device_info",
)
_LINES: Final[tuple[Lines, ...]] = (
    lambda users, live: [f"{_SIZE}{v.labels}}} {v.size}\n" for u in users for v in u.vaults],
    lambda users, live: [f"{_QUOTA}{v.labels}}} {v.quota}\n"
                         for u in users for v in u.vaults if v.quota is not None],
    _figure(_START, 0), _figure(_END, 1), _figure(_FILES, 2), _figure(_FSIZE, 3),
    _figure(_UP, 4), _figure(_DOWN, 5),
    _status,
    lambda users, live: [f"{_SUCCESS}{i.labels}}} {i.fig[7]}\n"
                         for u in users for i in u.items if i.fig[7]],
    lambda users, live: [f"{_ITEM_INFO}{i.labels},{i.info}}} 1\n"
                         for u in users for i in u.items],
    _online,
    lambda users, live: [f"{_DEVICE_INFO}{d.labels},{d.info}}} 1\n"
                         for u in users for d in u.devices],
)


# --- kept between scrapes: compressed, and as text --------------------------------------------------
#: (raw deflate ending byte-aligned, CRC-32 of the text, its length, CRC-32 of as many zeros)
Chunk = tuple[bytes, int, int, int]
_GZIP_HEADER: Final = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
_ZEROS: Final = bytes(1 << 20)


def _zeros_crc(n: int, crc: int) -> int:
    view = memoryview(_ZEROS)
    while n:
        k = min(n, len(_ZEROS))
        crc = zlib.crc32(view[:k], crc)
        n -= k
    return crc


def _chunk(text: bytes, level: int) -> Chunk:
    """``text`` as raw deflate blocks that end on a byte boundary without a final block: such
    chunks, compressed apart, join into one deflate stream (as pigz does)."""
    if not text:
        return (b"", 0, 0, 0)
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return (c.compress(text) + c.flush(zlib.Z_SYNC_FLUSH), zlib.crc32(text), len(text),
            _zeros_crc(len(text), 0))


def _gzip(chunks: Iterable[Chunk]) -> bytes:
    """One gzip member (what every HTTP client reads, curl included) from the chunks: their
    deflate joined, a final empty block, and the CRC-32 of the whole text combined from the
    chunks' (crc(A+B) = crc(B) ^ crc(zeros, crc(A)) ^ crc(zeros): a pass over zeros, no text)."""
    parts = [_GZIP_HEADER]
    crc = total = 0
    for data, c, n, z0 in chunks:
        if not n:
            continue
        parts.append(data)
        crc = c ^ _zeros_crc(n, crc) ^ z0
        total += n
    parts.append(b"\x03\x00")  # a final, empty, fixed-Huffman block
    parts.append(struct.pack("<II", crc, total & 0xFFFFFFFF))
    return b"".join(parts)


class BlockCache:
    """The families of each block of users, kept between scrapes: compressed for the scrapes
    that ask for gzip (Prometheus always does) and, while plain scrapes come (someone with
    curl), as text too. A scrape renders and compresses again only the blocks whose users
    changed since the last one (a job completion: one user's block), then joins the rest as
    they were. Text is built on the event loop (it reads the model); compressing runs on a
    thread. The text (a hundred MB at 10,000 users with the exporter's labels, against a fifth
    of that compressed) is let go ``keep_text`` seconds after the last plain scrape."""

    def __init__(self, level: int = 1, keep_text: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.level = level
        self.keep_text = keep_text
        self._clock = clock
        self._model: Model | None = None
        #: per block, per family of BLOCK_FAMILIES, its chunk (None: to compress)
        self._blocks: list[list[Chunk] | None] = [None] * BLOCKS
        #: per block, per family, its text (None: to render), while plain scrapes come
        self._texts: list[list[bytes] | None] | None = None
        self._texts_until = -math.inf
        self._heads = [_chunk(_head(name).encode(), level) for name in BLOCK_FAMILIES]
        self._heads_text = [_head(name).encode() for name in BLOCK_FAMILIES]

    @property
    def keeps_text(self) -> bool:
        return self._texts is not None

    def expire(self) -> None:
        """Let the text go once no plain scrape has come for ``keep_text`` seconds."""
        if self._texts is not None and self._clock() > self._texts_until:
            self._texts = None

    def _take(self, model: Model) -> None:
        """Forget what changed in ``model`` since the last look (and :meth:`expire`)."""
        self.expire()
        texts = self._texts
        if model is not self._model:
            self._model = model
            self._blocks = [None] * BLOCKS
            if texts is not None:
                self._texts = [None] * BLOCKS
            model.dirty = set()
            return
        dirty = model.dirty
        if dirty:
            model.dirty = set()
            blocks = self._blocks
            for b in dirty:
                blocks[b] = None
                if texts is not None:
                    texts[b] = None

    def _render(self, model: Model, todo: Iterable[int]) -> dict[int, list[bytes]]:
        """The text of the blocks ``todo``: kept text where there is some, else rendered (and
        kept, while the text is)."""
        texts = self._texts
        groups: list[list[User]] | None = None
        out: dict[int, list[bytes]] = {}
        for b in todo:
            text = texts[b] if texts is not None else None
            if text is None:
                if groups is None:
                    groups = _groups(model)
                text = ["".join(fn(groups[b], model.live)).encode("utf-8") for fn in _LINES]
                if texts is not None:
                    texts[b] = text
            out[b] = text
        return out

    def texts(self, model: Model) -> dict[int, list[bytes]]:
        """The text of the blocks to compress again: {block: [family text, ...]} (on the
        event loop)."""
        self._take(model)
        return self._render(model, [b for b, c in enumerate(self._blocks) if c is None])

    def plain(self, model: Model, head: bytes, tail: bytes, keep: bool = True) -> list[bytes]:
        """The whole answer as text, in parts (on the event loop): ``head``, the blocks'
        families (the changed blocks rendered again, the rest as kept), ``tail``. ``keep``:
        keep the text for the next plain scrape (not for a HEAD request, which only wants the
        length)."""
        if keep:
            self._texts_until = self._clock() + self.keep_text
        self._take(model)
        if self._texts is None and keep:
            self._texts = [None] * BLOCKS
        texts: list[list[bytes] | None] = (self._texts if self._texts is not None
                                            else [None] * BLOCKS)
        for b, text in self._render(model, [b for b, t in enumerate(texts) if t is None]).items():
            texts[b] = text
        parts = [head]
        for index, family_head in enumerate(self._heads_text):
            family = [text[index] for text in texts if text is not None and text[index]]
            if family:
                parts.append(family_head)
                parts.extend(family)
        parts.append(tail)
        return parts

    def compress(self, changed: dict[int, list[bytes]], head: bytes | None = None,
                 tail: bytes = b"") -> tuple[dict[int, list[Chunk]], bytes | None]:
        """``changed`` (from :meth:`texts`) compressed, and the whole answer, gzipped: ``head``
        (text before the blocks' families), the blocks' families (``changed`` as just
        compressed, the rest as kept) and ``tail`` (no answer without a ``head``). Runs on a
        thread: it only reads the cache; the event loop :meth:`keep` s what it returns."""
        level = self.level
        fresh = {b: [_chunk(t, level) for t in texts] for b, texts in changed.items()}
        if head is None:
            return fresh, None
        blocks = [fresh.get(b, blk) for b, blk in enumerate(self._blocks)]
        chunks: list[Chunk] = [_chunk(head, level)]
        for index, family_head in enumerate(self._heads):
            family = [blk[index] for blk in blocks if blk is not None and blk[index][2]]
            if family:
                chunks.append(family_head)
                chunks.extend(family)
        chunks.append(_chunk(tail, level))
        return fresh, _gzip(chunks)

    async def update(self, model: Model, head: bytes | None = None,
                     tail: bytes = b"") -> bytes | None:
        """What changed in ``model`` compressed on a thread and kept (forgotten if this is
        cancelled); the whole answer, gzipped, when ``head`` is given. One at a time, and not
        beside :meth:`plain` (the caller holds a lock)."""
        changed = self.texts(model)
        if not changed and head is None:
            return None
        try:
            fresh, body = await asyncio.get_running_loop().run_in_executor(
                None, self.compress, changed, head, tail)
        except BaseException:
            self.forget(changed)  # (the thread's work, finished or not, is not kept)
            raise
        self.keep(fresh)
        return body

    def keep(self, fresh: dict[int, list[Chunk]]) -> None:
        """Keep what :meth:`compress` made (on the event loop)."""
        for b, chunks in fresh.items():
            self._blocks[b] = chunks

    def forget(self, changed: dict[int, list[bytes]]) -> None:
        """``changed`` was not compressed after all (a scrape gone): the next one makes it
        again (on the event loop)."""
        for b in changed:
            self._blocks[b] = None


def _current(model: Model) -> list[str]:
    """One line per live connection whose version is known: its user and device, named as in
    the profile (a device no profile has: no name)."""
    version = model.version
    lines = []
    for name, conns in model.live.items():
        user = model.users.get(name)
        known = {d.id: d.labels for d in user.devices} if user is not None else {}
        for dev_id, reported in conns.items():
            if reported is None:
                continue
            labels = known.get(dev_id)
            if labels is None:
                labels = f'username="{label_value(name)}",device_id="{label_value(dev_id)}"'
                if model.name_labels:
                    labels += ',device_name=""'
            lines.append(f"{_CURRENT}{labels}}} {1 if reported == version else 0}\n")
    return lines
