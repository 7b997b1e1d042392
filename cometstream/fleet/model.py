"""The Comet fleet in memory: users, their protected items, vaults and devices, the live
connections, and the jobs of the last 24 hours: what the ``cometserver_*`` metrics read.

Pure (no I/O, no asyncio): fed by the seed (:mod:`.seed`, the admin API's answers) and by the
events (:mod:`.service`), read by :mod:`.render` at each scrape. The rules of the figures are
those of Comet's own Prometheus exporter, each written once here:

- a protected item's last backup is its profile's ``Statistics.LastBackupJob``, present when
  its ``StartTime`` > 0; a job completion of the item moves it (the completion with the latest
  ``EndTime`` wins, so a replayed older one never moves it back);
- job status categories: 5000-5999 success, 6000-6999 running, 7001 warning, 7003
  quota_exceeded, anything else error (:func:`category`);
- a vault's size is ``Statistics.ClientProvidedSize.Size`` (a job's ``DestinationSizeEnd``
  measured later replaces it), its quota ``StorageLimitBytes`` when ``StorageLimitEnabled``;
- the recent jobs are those that started or ended within the last 24 hours (what
  ``get-jobs-for-date-range(now - 86400, now)`` lists), running ones included;
- a device is online when a live connection has its user and device ID; a live connection's
  device is current when its reported version is the server's;
- the server's self-backups are ``ServerMetaVersionInfo.SelfBackup``: the seconds since each
  one's last run ended (-1: never), its size, whether it succeeded;
- a figure beyond a double's range (a 401-digit integer, ``1e400``) is :data:`INF` or
  :data:`NEG_INF`, written ``+Inf``/``-Inf``: Prometheus refuses a whole exposition with one
  value it cannot read as a double.

Compact on purpose (a fleet of 30,000 protected items fits in a few tens of MB): entities are
slotted objects, a user's are tuples (searched linearly: a user has a handful), and the label
text of each entity's series is rendered once, when the entity is built, so a scrape only joins
strings. A user's entities are rebuilt as a whole when a profile of theirs arrives.

Bounded: every entity reserves the series it can have (:data:`ITEM_SERIES`, ...), and so does
every user (one: their entry) and every job held for the recent-jobs counts (one); one that
would take the total past ``max_series`` is not created, and ``refused`` is told how many
series that was.
"""

from __future__ import annotations

import math
import sys
import zlib
from array import array
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

__all__ = [
    "CATEGORIES",
    "DEVICE_SERIES",
    "INF",
    "ITEM_SERIES",
    "JOB_SERIES",
    "NEG_INF",
    "RECENT_WINDOW",
    "SELF_BACKUPS_MAX",
    "USER_SERIES",
    "VAULT_SERIES",
    "Device",
    "Item",
    "Model",
    "User",
    "Vault",
    "beyond",
    "category",
    "label_value",
    "num",
]

#: the job status categories, in the exporter's order (an index is a category)
CATEGORIES: Final = ("success", "running", "warning", "quota_exceeded", "error")
SUCCESS, RUNNING, WARNING, QUOTA_EXCEEDED, ERROR = range(5)
#: seconds of job history counted by ``cometserver_recentjobs_total``
RECENT_WINDOW: Final = 86400
#: the series an entity may have: an item 6 last-backup figures, 5 status, the last success
#: and its info; a vault its size and quota; a device online, current and its info
ITEM_SERIES: Final = 13
VAULT_SERIES: Final = 2
DEVICE_SERIES: Final = 3
#: what a user (their entry, their share of ``users_total``) and a job held for the recent-jobs
#: counts reserve: they cost memory, not series of their own
USER_SERIES: Final = 1
JOB_SERIES: Final = 1
#: self-backup targets read at most (a server has a handful)
SELF_BACKUPS_MAX: Final = 64

#: an item's figures: its last completed job's start, end, files, size, upload and download,
#: that job's category, and the end of its last successful job (start 0: no completed job)
Figures = Any  # array("q") of 8, or a list of 8 when one does not fit 64 bits
START, END, FILES, SIZE, UPLOAD, DOWNLOAD, CAT, SUCCESS_END = range(8)


def category(status: object) -> int:
    """The exporter's category of a job status (an index into :data:`CATEGORIES`)."""
    if type(status) is not int:
        return ERROR
    if 5000 <= status <= 5999:
        return SUCCESS
    if 6000 <= status <= 6999:
        return RUNNING
    if status == 7001:
        return WARNING
    if status == 7003:
        return QUOTA_EXCEEDED
    return ERROR


class _Inf(float):
    """An infinity as the exposition writes it (``+Inf``, ``-Inf``: Python's ``inf`` is not
    Prometheus'); a float for every comparison."""

    __slots__ = ()

    def __str__(self) -> str:
        return "+Inf" if self > 0 else "-Inf"

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return str(self)


INF: Final = _Inf("inf")
NEG_INF: Final = _Inf("-inf")
#: the largest integer a double holds (beyond, Prometheus cannot read the digits)
_DOUBLE_MAX: Final = int(sys.float_info.max)


def num(value: object) -> int | float:
    """A figure as the exposition writes it: an integer or a finite float, or :data:`INF` /
    :data:`NEG_INF` for one beyond a double's range (a 401-digit integer; ``1e400``, which the
    standard library's parser reads as infinity); anything else (null, a string, a boolean, a
    missing field) is 0."""
    if type(value) is int:
        if -_DOUBLE_MAX <= value <= _DOUBLE_MAX:
            return value
        return INF if value > 0 else NEG_INF
    if type(value) is float:
        if math.isfinite(value):
            return value
        if not math.isnan(value):
            return INF if value > 0 else NEG_INF
    return 0


def beyond(value: object) -> bool:
    """Whether ``value`` (from :func:`num`) is an infinity."""
    return value.__class__ is _Inf


#: users are rendered (and their compressed text cached) in this many blocks
BLOCKS: Final = 1024


def block_of(name: str) -> int:
    """The block of the user ``name`` (stable across seeds: a hash of the name)."""
    return zlib.crc32(name.encode("utf-8", "surrogatepass")) & (BLOCKS - 1)


def label_value(value: object) -> str:
    """A label value, escaped for the text exposition and encodable as UTF-8 (a lone surrogate
    from the server's JSON becomes "?": one bad name must not break the whole scrape)."""
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    if "\\" in text or '"' in text or "\n" in text:
        text = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _last(job: object) -> list[Any] | None:
    """A completed job's figures (:data:`Figures` 0 to 6), or None when there is none
    (``StartTime`` not > 0)."""
    if not isinstance(job, dict):
        return None
    start = num(job.get("StartTime"))
    if not start > 0:
        return None
    return [start, num(job.get("EndTime")), num(job.get("TotalFiles")),
            num(job.get("TotalSize")), num(job.get("UploadSize")), num(job.get("DownloadSize")),
            category(job.get("Status"))]


def _overflows(values: Iterable[Any]) -> int:
    """How many of ``values`` are infinities (:func:`num`)."""
    return sum(1 for v in values if v.__class__ is _Inf)


def _figures(values: list[Any]) -> Figures:
    """Eight figures in 64 bytes of an array, or a list when one does not fit (a float, an
    integer beyond 64 bits: a list of Python numbers takes five times the room)."""
    try:
        return array("q", values)
    except (OverflowError, TypeError):
        return values


#: an item without a completed job: start 0, category error, no success
_NO_FIGURES: Final = (0, 0, 0, 0, 0, 0, ERROR, 0)
#: the packed form of a recent job: start, end (40 bits each) and category (3)
_BITS: Final = 40
_MASK: Final = (1 << _BITS) - 1


def _pack(start: Any, end: Any, cat: int) -> Any:
    """A recent job's (start, end, category) as one integer (36 bytes, a tuple of them 120),
    or the tuple when they do not fit."""
    if type(start) is int and type(end) is int and 0 <= start <= _MASK and 0 <= end <= _MASK:
        return (start << (_BITS + 3)) | (end << 3) | cat
    return (start, end, cat)


def _unpack(packed: Any) -> tuple[Any, Any, int]:
    if type(packed) is int:
        return packed >> (_BITS + 3), (packed >> 3) & _MASK, packed & 7
    return packed  # type: ignore[no-any-return]


def _end(job: object) -> int | float:
    return num(job.get("EndTime")) if isinstance(job, dict) else 0


class Item:
    """A protected item (``Sources[id]``). ``labels``: its series' label text (no braces);
    ``info``: what its info series adds to them; ``fig``: its :data:`Figures`."""

    __slots__ = ("device", "fig", "id", "info", "labels")

    def __init__(self, id_: str, device: str, labels: str, info: str, fig: Figures) -> None:
        self.id = id_
        self.device = device
        self.labels = labels
        self.info = info
        self.fig = fig


class Vault:
    """A storage vault (``Destinations[id]``); ``quota`` is None when no limit is enabled."""

    __slots__ = ("id", "labels", "measured", "quota", "size")

    def __init__(self, id_: str, labels: str, size: float, measured: float,
                 quota: float | None) -> None:
        self.id = id_
        self.labels = labels
        self.size = size
        self.measured = measured
        self.quota = quota


class Device:
    """A registered device (``Devices[id]``); ``info``: what its info series adds to the
    labels."""

    __slots__ = ("id", "info", "labels")

    def __init__(self, id_: str, labels: str, info: str) -> None:
        self.id = id_
        self.labels = labels
        self.info = info


class User:
    __slots__ = ("devices", "items", "name", "series", "vaults")

    def __init__(self, name: str, items: tuple[Item, ...], vaults: tuple[Vault, ...],
                 devices: tuple[Device, ...], series: int) -> None:
        self.name = name
        self.items = items
        self.vaults = vaults
        self.devices = devices
        #: the series its entities reserve
        self.series = series


def _find(entities: Iterable[Any], id_: str) -> Any:
    for entity in entities:
        if entity.id == id_:
            return entity
    return None


class Model:
    """One picture of the fleet. ``refused(n)`` hears of every entity left out (``n``: the
    series it would have had); ``overflowed(n)`` of figures beyond a double (written as
    ``+Inf``/``-Inf``)."""

    def __init__(self, *, max_series: int, name_labels: bool = True,
                 refused: Callable[[int], None] = lambda n: None,
                 overflowed: Callable[[int], None] = lambda n: None) -> None:
        self.max_series = max_series
        self.name_labels = name_labels
        self.refused = refused
        self.overflowed = overflowed
        self.users: dict[str, User] = {}
        #: job GUID -> (StartTime, EndTime, category) of the jobs that may count as recent,
        #: packed (:func:`_pack`); each reserves :data:`JOB_SERIES`
        self.recent: dict[str, Any] = {}
        #: the GUIDs of ``recent`` whose job is running (no EndTime yet): what the periodic
        #: check asks the server about; each reserves :data:`JOB_SERIES`
        self.running: set[str] = set()
        #: the server's own backups (``ServerMetaVersionInfo.SelfBackup``), in its order:
        #: (``LastRunEnd``, ``LastRunSize``, ``LastRunSuccess``) each
        self.self_backups: list[tuple[int | float, int | float, bool]] = []
        #: username -> {device ID: the version its live connection reported (None: not known
        #: yet, the event did not say)}
        self.live: dict[str, dict[str, str | None]] = {}
        #: the server's version (``ServerMetaVersionInfo.Version``)
        self.version = ""
        #: the series the entities reserve, at most ``max_series``
        self.series = 0
        #: (username, device ID) of the live connections of devices not in the model
        self.strays: set[tuple[str, str]] = set()
        #: the blocks of users (:func:`block_of`) whose series changed since the compressed
        #: scrape last looked (it takes and clears them)
        self.dirty: set[int] = set()
        #: devices registered by someone who is not their user (an administrator: the
        #: SEVT_DEVICE_NEW names them, not the user): device ID -> its DeviceConfig, until a
        #: live connection or a profile tells whose it is; each reserves :data:`DEVICE_SERIES`
        self.unplaced: dict[str, dict[str, Any]] = {}

    def _touch(self, name: str) -> None:
        self.dirty.add(block_of(name))

    def _checked(self, values: list[Any]) -> list[Any]:
        """``values`` (from :func:`num`), told to ``overflowed`` if some are infinities."""
        n = _overflows(values)
        if n:
            self.overflowed(n)
        return values

    # --- users -----------------------------------------------------------------------------------
    def put_user(self, name: str, profile: Mapping[str, Any]) -> None:
        """A user's profile (the seed's, or an account event's): their entities rebuilt from
        it. What an earlier event showed newer than the profile's statistics (a later last
        backup, a later vault measurement) is kept: a profile can come late (replayed after
        the seed), never the figures it carries backwards."""
        old = self.users.pop(name, None)
        if old is not None:
            self.series -= old.series
        if self.unplaced:
            for dev_id in _dict(profile.get("Devices")):
                self._unplace(dev_id)
        if not self._reserve(USER_SERIES):  # (a new user; one already in always has room)
            return
        self.users[name] = self._build(name, profile, old)
        self._touch(name)

    def remove_user(self, name: str) -> None:
        old = self.users.pop(name, None)
        if old is not None:
            self.series -= old.series
        self._drop_live(name)
        self._touch(name)

    def server_info(self, info: Mapping[str, Any]) -> None:
        """``ServerMetaVersionInfo`` (the HELLO's ``Data``, ``meta/version``): the server's
        version (kept when the answer has none) and its self-backups."""
        version = info.get("Version")
        if isinstance(version, str) and version:
            self.version = version
        runs = info.get("SelfBackup")
        backups = []
        for run in runs[:SELF_BACKUPS_MAX] if isinstance(runs, list) else ():
            run = _dict(run)
            end, size = self._checked([num(run.get("LastRunEnd")), num(run.get("LastRunSize"))])
            backups.append((end, size, run.get("LastRunSuccess") is True))
        self.self_backups = backups

    def _reserve(self, n: int) -> bool:
        if self.series + n > self.max_series:
            self.refused(n)
            return False
        self.series += n
        return True

    def _build(self, name: str, profile: Mapping[str, Any], old: User | None) -> User:
        user = label_value(name)
        reserved = USER_SERIES  # (reserved by the caller)
        devices: list[Device] = []
        #: device ID (the profile's own string, shared with the items) -> escaped name
        friendly: dict[str, str] = {}
        for dev_id, config in _dict(profile.get("Devices")).items():
            config = _dict(config)
            friendly[dev_id] = label_value(config.get("FriendlyName"))
            device = self._device(user, dev_id, config)
            if not self._reserve(DEVICE_SERIES):
                continue
            reserved += DEVICE_SERIES
            devices.append(device)
        items: list[Item] = []
        for item_id, source in _dict(profile.get("Sources")).items():
            source = _dict(source)
            if not self._reserve(ITEM_SERIES):
                continue
            reserved += ITEM_SERIES
            items.append(self._item(user, item_id, source, friendly,
                                    _find(old.items, item_id) if old is not None else None))
        vaults: list[Vault] = []
        for vault_id, dest in _dict(profile.get("Destinations")).items():
            dest = _dict(dest)
            if not self._reserve(VAULT_SERIES):
                continue
            reserved += VAULT_SERIES
            measured = _dict(_dict(dest.get("Statistics")).get("ClientProvidedSize"))
            size, at = self._checked([num(measured.get("Size")),
                                      num(measured.get("MeasureCompleted"))])
            was = _find(old.vaults, vault_id) if old is not None else None
            if was is not None and was.measured > at:
                size, at = was.size, was.measured
            kind = dest.get("DestinationType")
            labels = (f'username="{user}",vault_id="{label_value(vault_id)}",'
                      f'vault_name="{label_value(dest.get("Description"))}",'
                      f'vault_type="{label_value(kind if kind is not None else 0)}"')
            quota = self._checked([num(dest.get("StorageLimitBytes"))])[0] \
                if dest.get("StorageLimitEnabled") else None
            vaults.append(Vault(vault_id, labels, size, at, quota))
        return User(name, tuple(items), tuple(vaults), tuple(devices), reserved)

    def _device(self, user: str, dev_id: str, config: dict[str, Any]) -> Device:
        dev = label_value(dev_id)
        fname = label_value(config.get("FriendlyName"))
        labels = f'username="{user}",device_id="{dev}"'
        if self.name_labels:
            labels += f',device_name="{fname}"'
        osinfo = _dict(config.get("PlatformVersion"))
        platform = "/".join(p for p in (_str(osinfo.get("os")), _str(osinfo.get("arch"))) if p)
        info = (f'friendly_name="{fname}",platform="{label_value(platform)}",'
                f'version="{label_value(config.get("ClientVersion"))}"')
        return Device(dev_id, labels, info)

    def _item(self, user: str, item_id: str, source: dict[str, Any], friendly: dict[str, str],
              was: Item | None) -> Item:
        owner = _str(source.get("OwnerDevice"))
        for dev_id in friendly:  # (the Devices key, one string for the device and its items)
            if dev_id == owner:
                owner = dev_id
                break
        labels = f'username="{user}",protected_item_id="{label_value(item_id)}"'
        description = label_value(source.get("Description"))
        info = f'description="{description}",engine="{label_value(source.get("Engine"))}"'
        if self.name_labels:
            labels += (f',protected_item_name="{description}",device_id="{label_value(owner)}",'
                       f'device_name="{friendly.get(owner, "")}"')
        else:  # (with the names, device_id is among the labels already)
            info += f',device_id="{label_value(owner)}"'
        stats = _dict(source.get("Statistics"))
        fig = _last(stats.get("LastBackupJob")) or list(_NO_FIGURES[:7])
        fig.append(_end(stats.get("LastSuccessfulBackupJob")))
        self._checked(fig)
        if was is not None:
            had = was.fig
            if had[START] > 0 and (fig[START] <= 0 or had[END] > fig[END]):
                fig[:7] = had[:7]
            fig[SUCCESS_END] = max(fig[SUCCESS_END], had[SUCCESS_END])
        return Item(item_id, owner, labels, info, _figures(fig))

    # --- devices ---------------------------------------------------------------------------------
    def owner_of(self, device_id: str, hint: str = "") -> str:
        """The user whose profile has the device (``hint`` is tried first), or ""."""
        user = self.users.get(hint)
        if user is not None and _find(user.devices, device_id) is not None:
            return hint
        for name, user in self.users.items():
            if _find(user.devices, device_id) is not None:
                return name
        return ""

    def device_new(self, actor: str, device_id: str, config: Mapping[str, Any]) -> None:
        """SEVT_DEVICE_NEW: a device registered by ``actor``, its user; or by an administrator
        (no user of that name): kept aside (:attr:`unplaced`) until a live connection or a
        profile says whose it is."""
        if actor in self.users:
            self.add_device(actor, device_id, config)
        elif device_id not in self.unplaced and self.owner_of(device_id) == "" \
                and self._reserve(DEVICE_SERIES):
            self.unplaced[device_id] = dict(config)

    def _unplace(self, device_id: str) -> dict[str, Any] | None:
        config = self.unplaced.pop(device_id, None)
        if config is not None:
            self.series -= DEVICE_SERIES
        return config

    def add_device(self, name: str, device_id: str, config: Mapping[str, Any]) -> None:
        """A device registered to ``name`` (SEVT_DEVICE_NEW)."""
        user = self.users.get(name)
        if user is None or _find(user.devices, device_id) is not None:
            return
        if self._reserve(DEVICE_SERIES):
            device = self._device(label_value(name), device_id, dict(config))
            self.users[name] = User(name, user.items, user.vaults, (*user.devices, device),
                                    user.series + DEVICE_SERIES)
            self._touch(name)

    def remove_device(self, name: str, device_id: str) -> None:
        """A device revoked (SEVT_DEVICE_REMOVED): it goes, with its protected items and its
        live connection (``name`` "": one not placed, if it is)."""
        self._unplace(device_id)
        user = self.users.get(name)
        if user is None:
            return
        kept_devices = tuple(d for d in user.devices if d.id != device_id)
        kept_items = tuple(i for i in user.items if i.device != device_id)
        freed = ((len(user.devices) - len(kept_devices)) * DEVICE_SERIES
                 + (len(user.items) - len(kept_items)) * ITEM_SERIES)
        self.series -= freed
        self.users[name] = User(name, kept_items, user.vaults, kept_devices, user.series - freed)
        self.disconnect(name, device_id)
        self._touch(name)

    # --- live connections ------------------------------------------------------------------------
    def connect(self, name: str, device_id: str, version: str | None) -> None:
        """A live connection. One of a device no profile has here (not registered yet, or
        refused) reserves the one series it has (``device_is_current``), or is refused."""
        self._touch(name)
        if self.unplaced and device_id in self.unplaced and name in self.users:
            self.add_device(name, device_id, self._unplace(device_id) or {})
        conns = self.live.get(name)
        if conns is not None and device_id in conns:
            conns[device_id] = version
            return
        user = self.users.get(name)
        if user is None or _find(user.devices, device_id) is None:
            if not self._reserve(1):
                return
            self.strays.add((name, device_id))
        self.live.setdefault(name, {})[device_id] = version

    def disconnect(self, name: str, device_id: str) -> None:
        conns = self.live.get(name)
        if conns is not None and conns.pop(device_id, self) is not self:
            self._touch(name)
            self._unstray(name, device_id)
            if not conns:
                del self.live[name]

    def _drop_live(self, name: str) -> None:
        if name in self.live:
            self._touch(name)
        for device_id in self.live.pop(name, {}):
            self._unstray(name, device_id)

    def _unstray(self, name: str, device_id: str) -> None:
        if self.strays and (name, device_id) in self.strays:
            self.strays.discard((name, device_id))
            self.series -= 1

    def replace_live(self, conns: Mapping[str, Any], users: set[str] | None = None) -> None:
        """The live connections as ``dispatcher/list-active`` answered: every user's, or only
        those of ``users`` (the others in the answer are left as they are)."""
        for gone in list(self.live) if users is None else users:
            self._drop_live(gone)
        for conn in conns.values():
            conn = _dict(conn)
            name, device = conn.get("Username"), conn.get("DeviceID")
            if not isinstance(name, str) or not isinstance(device, str):
                continue
            if users is not None and name not in users:
                continue
            # (a handful of versions among thousands of connections: one string each)
            self.connect(name, device, sys.intern(_str(conn.get("ReportedVersion"))))

    # --- jobs ------------------------------------------------------------------------------------
    def recent_job(self, job: Mapping[str, Any]) -> None:
        """A job for the recent-jobs counts (started, completed, or listed by the seed or the
        check). A running one reserves :data:`JOB_SERIES` until it ends (refused: not
        counted); one whose times are beyond a double is in no window: not kept."""
        guid = job.get("GUID")
        if not isinstance(guid, str) or not guid:
            return
        start, end = self._checked([num(job.get("StartTime")), num(job.get("EndTime"))])
        if beyond(start) or beyond(end):
            self.forget_job(guid)
            return
        running = self.running
        if not end > 0:
            if guid in self.recent and _unpack(self.recent[guid])[1] > 0:
                return  # a start after the completion (replayed): the completion stands
            if guid not in running:
                if not self._reserve(JOB_SERIES):
                    return
                running.add(guid)
        elif guid in running:
            running.discard(guid)
            self.series -= JOB_SERIES
        self.recent[guid] = _pack(start, end, category(job.get("Status")))

    def forget_job(self, guid: str) -> None:
        """A job the server no longer knows (or never can count)."""
        self.recent.pop(guid, None)
        if guid in self.running:
            self.running.discard(guid)
            self.series -= JOB_SERIES

    def job_completed(self, job: Mapping[str, Any]) -> None:
        """SEVT_JOB_COMPLETED: the recent jobs, the item's last (and last successful) backup
        and the vault's size move."""
        self.recent_job(job)
        user = self.users.get(_str(job.get("Username")))
        if user is None:
            return
        self._touch(user.name)
        item = _find(user.items, _str(job.get("SourceGUID")))
        last = _last(job)
        if last is not None:
            self._checked(last[FILES:CAT])  # (the times: by recent_job)
        if item is not None and last is not None:
            fig = list(item.fig)
            if fig[START] <= 0 or last[END] >= fig[END]:
                fig[:7] = last
            if last[CAT] == SUCCESS and last[END] > 0 and last[END] >= fig[SUCCESS_END]:
                fig[SUCCESS_END] = last[END]
            item.fig = _figures(fig)
        vault = _find(user.vaults, _str(job.get("DestinationGUID")))
        if vault is not None:
            measured = _dict(job.get("DestinationSizeEnd"))
            at = num(measured.get("MeasureCompleted"))
            if at > 0 and at >= vault.measured:
                vault.size, vault.measured = self._checked([num(measured.get("Size")), at])

    def recent_counts(self, now: float) -> list[int]:
        """Jobs per category that started or ended within ``[now - 86400, now]``; forgets the
        completed ones that can no longer count."""
        since = now - RECENT_WINDOW
        counts = [0, 0, 0, 0, 0]
        gone = []
        for guid, packed in self.recent.items():
            start, end, cat = _unpack(packed)
            if since <= start <= now or (end and since <= end <= now):
                counts[cat] += 1
            elif end and end < since:
                gone.append(guid)
        for guid in gone:
            del self.recent[guid]
        return counts
