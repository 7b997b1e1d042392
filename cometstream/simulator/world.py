"""A generated Comet Server world: organizations, users, devices, Protected Items, vaults and jobs.

The world is plain data plus pure methods (no I/O, no asyncio), so the event stream and the
admin API answer from one state. Every random choice comes from one `random.Random(seed)`:
two worlds with the same seed and the same clock produce byte-identical events. Only timestamps
depend on the clock.

Shapes follow Comet's SDK definitions (see ``comet-api.md``):

- ``users``: ``{username: UserProfileConfig}``; ``Devices`` maps device ID to DeviceConfig
  (``PlatformVersion`` has lower-case keys), ``Sources`` maps a Protected Item GUID to
  SourceConfig with ``Statistics.LastBackupJob``, ``Destinations`` maps a vault GUID to
  DestinationConfig.
- ``jobs``: ``{GUID: BackupJobDetail}`` in start order, running jobs included (``EndTime`` 0).
  Keys are in the SDK serializer's order, omitempty fields dropped when empty (``JOB_DETAIL_KEYS``).
- Events are ``StreamableEvent`` dicts (``event()``), ``Data`` shared with the world's state:
  encode an event before the next call changes the world.
- Vaults may have a quota (``StorageLimitEnabled``) a little above their size; devices report
  a ``ClientVersion`` (one in five behind the server's), which their live connections report
  as ``ReportedVersion``. These come from a second generator (``_aux``), so that a seed makes
  the same users, jobs and events as before they existed.
- A finished job updates its profile's statistics (``Sources[*].Statistics.LastBackupJob`` /
  ``LastSuccessfulBackupJob``, ``Destinations[*].Statistics.ClientProvidedSize``) without an
  account event, as Comet does; ``cancel_silently``/``abandon`` finish a job with no event at all.
- The server's own backups (``self_backups``: ``ServerMetaVersionInfo.SelfBackup``, one target
  that last ran a few hours before the world was made, from ``_aux`` too); ``run_self_backup``
  runs one, with no event (Comet emits none).

Values (sizes, engines, platforms, password hashes) are made up but plausible; none is a real
secret.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson

from cometstream.constants import SEVT

#: worlds with at least this many jobs answer date-range queries from sorted indexes
_INDEX_FROM = 20_000
#: the times of the jobs (sorted), and (rank in the world's order, job) in the same order
_TimeIndex = tuple[list[int], list[tuple[int, dict[str, Any]]]]

__all__ = [
    "CLIENT_VERSION",
    "EVENT_KEYS",
    "JOB_DETAIL_KEYS",
    "NO_DATA",
    "SERVER_VERSION",
    "World",
    "event",
    "job_detail",
    "server_meta_version_info",
]

SERVER_VERSION = "25.9.6"
CLIENT_VERSION = "25.9.6"
#: client versions of devices not yet upgraded, with their weights (the current one: 80)
_OLD_CLIENT_VERSIONS = (("25.6.2", 15), ("24.12.3", 5))

#: StreamableEvent keys in wire order (ResourceID and Data are omitted when absent).
EVENT_KEYS = (
    "Actor",
    "OwnerOrganizationID",
    "ResourceID",
    "Type",
    "Timestamp",
    "TypeString",
    "Data",
)

#: BackupJobDetail keys in the order Comet's serializer writes them (comet-api.md §8.1).
JOB_DETAIL_KEYS = (
    "GUID",
    "Username",
    "Classification",
    "Status",
    "StartTime",
    "EndTime",
    "RetryCount",
    "SourceGUID",
    "DestinationGUID",
    "DeviceID",
    "SnapshotID",
    "BackupRuleGUID",
    "ClientVersion",
    "TotalDirectories",
    "TotalFiles",
    "TotalSize",
    "TotalChunks",
    "UploadSize",
    "DownloadSize",
    "TotalVmCount",
    "TotalMailsCount",
    "TotalSitesCount",
    "TotalAccountsCount",
    "TotalLicensedMailsCount",
    "TotalUnlicensedMailsCount",
    "ConflictingJobID",
    "CancellationID",
    "Progress",
    "DestinationSizeStart",
    "DestinationSizeEnd",
    "Tags",
)

#: BackupJobDetail fields that are omitempty (dropped when "" or 0).
_JOB_OMITEMPTY = frozenset(
    {
        "SnapshotID",
        "BackupRuleGUID",
        "TotalVmCount",
        "TotalMailsCount",
        "TotalSitesCount",
        "TotalAccountsCount",
        "TotalLicensedMailsCount",
        "TotalUnlicensedMailsCount",
        "ConflictingJobID",
        "CancellationID",
        "Tags",
    }
)


class _NoData:
    """Marker for an event without a Data field."""

    def __repr__(self) -> str:
        return "NO_DATA"


#: Pass as ``data`` to ``event()`` for types that carry no Data (the key is then omitted).
NO_DATA: Any = _NoData()

# Job constants (comet-api.md §8.2 / §8.3).
_BACKUP = 4001
_STATUS_RUNNING = 6001
_STATUS_SUCCESS = 5000
_STATUS_CANCELLED = 7005
_STATUS_ABANDONED = 7007
_FINAL_STATUSES = ((5000, 85), (7001, 7), (7002, 5), (7005, 3))
_CLASSIFICATIONS = ((4001, 90), (4003, 6), (4006, 2), (4009, 1), (4010, 1))

# Event mix of the generator: kind -> weight.
_MIX = (
    ("job_new", 25),
    ("job_completed", 25),
    ("login", 22),
    ("device_live", 22),
    ("account_updated", 3),
    ("account_new", 1),
    ("account_removed", 1),
)

_LOGIN_PATHS = (
    "/api/v1/user/web/get-user-profile",
    "/api/v1/user/web/get-user-profile-and-hash",
    "/api/v1/user/web/session/start",
    "/api/v1/user/web/get-jobs-for-date-range",
    "/api/v1/user/web/get-job-log",
)

_FIRST = (
    "alice",
    "bob",
    "carol",
    "dave",
    "erin",
    "frank",
    "grace",
    "heidi",
    "ivan",
    "judy",
    "mallory",
    "niaj",
    "olivia",
    "peggy",
    "rupert",
    "sybil",
    "trent",
    "victor",
    "walter",
    "yusuf",
    "zoe",
    "amara",
    "bruno",
    "chen",
    "dmitri",
    "eva",
    "farah",
    "goran",
    "hana",
    "ines",
    "jonas",
    "kai",
)
_LAST = (
    "smith",
    "jones",
    "nguyen",
    "garcia",
    "müller",
    "rossi",
    "kim",
    "silva",
    "novak",
    "okafor",
    "tanaka",
    "dubois",
    "larsen",
    "kowalski",
    "haddad",
    "byrne",
)
_COMPANIES = (
    "Acme Dental",
    "Bluewater Logistics",
    "Cedar Accounting",
    "Delta Architects",
    "Evergreen Clinic",
    "Fjord Media",
    "Granite Legal",
    "Harbor Schools",
)
_TIMEZONES = ("UTC", "Europe/Berlin", "America/New_York", "Pacific/Auckland", "Asia/Tokyo")
_LANGUAGES = ("en_US", "en_US", "de_DE", "fr_FR", "es_ES")

# (os, weight, platform versions, arch choices, host name prefix)
_PLATFORMS: tuple[tuple[str, int, tuple[dict[str, str], ...], tuple[str, ...], str], ...] = (
    (
        "windows",
        60,
        (
            {"version": "10.0", "build": "19045"},
            {"version": "10.0", "build": "22631"},
            {"version": "10.0", "build": "20348", "distribution": "Server 2022"},
        ),
        ("amd64",),
        "WS",
    ),
    (
        "linux",
        25,
        (
            {"version": "22.04", "distribution": "Ubuntu"},
            {"version": "12", "distribution": "Debian"},
            {"version": "9.4", "distribution": "Rocky Linux"},
        ),
        ("amd64", "arm64"),
        "srv",
    ),
    ("darwin", 15, ({"version": "14.5"}, {"version": "15.1"}), ("arm64", "amd64"), "MBP"),
)

# engine -> (description, allowed os, weight)
_ENGINES: tuple[tuple[str, str, frozenset[str], int], ...] = (
    ("engine1/file", "Files and Folders", frozenset({"windows", "linux", "darwin"}), 60),
    ("engine1/windisk", "Disk Image", frozenset({"windows"}), 10),
    ("engine1/mssql", "Microsoft SQL Server", frozenset({"windows"}), 8),
    ("engine1/hyperv", "Hyper-V", frozenset({"windows"}), 6),
    ("engine1/winmsofficemail", "Microsoft 365", frozenset({"windows", "linux", "darwin"}), 8),
    ("engine1/mysql", "MySQL", frozenset({"linux"}), 8),
)

#: OSInfo keys in the SDK's order (lower-case on the wire, unlike the rest of the API).
_OSINFO_KEYS = ("version", "distribution", "build", "os", "arch")

# (DestinationType, description, weight)
_VAULTS = ((1003, "Comet Storage", 70), (1000, "Amazon S3", 15), (1008, "Backblaze B2", 15))


def event(
    type_name: str,
    *,
    actor: str,
    organization: str,
    resource: str = "",
    data: Any = NO_DATA,
    timestamp: int,
) -> dict[str, Any]:
    """A StreamableEvent dict with keys in wire order; ResourceID omitted when empty, Data when NO_DATA."""
    ev: dict[str, Any] = {"Actor": actor, "OwnerOrganizationID": organization}
    if resource:
        ev["ResourceID"] = resource
    ev["Type"] = SEVT[type_name]
    ev["Timestamp"] = timestamp
    ev["TypeString"] = type_name
    if data is not NO_DATA:
        ev["Data"] = data
    return ev


def job_detail(**fields: Any) -> dict[str, Any]:
    """A BackupJobDetail dict in serializer order: omitempty fields dropped when empty, others always set.

    Unknown field names raise TypeError; missing non-omitempty fields get their zero value.
    """
    unknown = set(fields) - set(JOB_DETAIL_KEYS)
    if unknown:
        raise TypeError(f"unknown BackupJobDetail fields: {sorted(unknown)}")
    out: dict[str, Any] = {}
    for key in JOB_DETAIL_KEYS:
        value = fields.get(key)
        if key in _JOB_OMITEMPTY:
            if value:
                out[key] = value
        elif key in ("Progress",):
            out[key] = value if value is not None else _progress(0, 0, 0, 0, 0, 0)
        elif key in ("DestinationSizeStart", "DestinationSizeEnd"):
            out[key] = value if value is not None else _size(0, 0, 0)
        elif key in (
            "GUID",
            "Username",
            "SourceGUID",
            "DestinationGUID",
            "DeviceID",
            "ClientVersion",
        ):
            out[key] = value if value is not None else ""
        else:
            out[key] = value if value is not None else 0
    return out


def server_meta_version_info(
    *, start_time: int, start_hash: str, now: int, configured_devices: int = 0,
    self_backup: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A ServerMetaVersionInfo (the Data of SEVT_META_HELLO and of AdminMetaVersion);
    ``self_backup``: its ``SelfBackup`` (SelfBackupStatistics, copied)."""
    return {
        "Version": SERVER_VERSION,
        "VersionCodename": "Voyager",
        "StorageRole": True,
        "AuthenticationRole": True,
        "SoftwareBuildRole": True,
        "OverseerRole": False,
        "ConstellationRole": False,
        "ServerStartTime": start_time,
        "ServerStartHash": start_hash,
        "CurrentTime": now,
        "ServerLicenseHash": "5f1c0d2a9b7e4c3f8a6d1e0b2c4f6a8d",
        "ServerLicenseFeaturesAll": True,
        "ServerLicenseFeatureSet": 0,
        "LicenseValidUntil": now + 30 * 86400,
        "ConfiguredDevices": configured_devices,
        "EmailsSentSuccessfully": 0,
        "EmailsSentErrors": 0,
        "EmailsWaitingInQueue": 0,
        "ScheduledEmailThreadCurrentState": 3,
        "ScheduledEmailThreadLastCalculateDurationNanos": 184000,
        "ScheduledEmailThreadWaitingUntil": now + 3600,
        "ScheduledEmailThreadLastWakeTime": start_time,
        "ScheduledEmailThreadLastWakeSentEmails": False,
        "SelfBackup": [dict(run) for run in self_backup or ()],
    }


def _without_statistics(profile: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of a profile without ``Sources[*]`` / ``Destinations[*]`` ``Statistics``."""
    out = dict(profile)
    for key in ("Sources", "Destinations"):
        out[key] = {
            item_id: {k: v for k, v in item.items() if k != "Statistics"}
            for item_id, item in profile[key].items()
        }
    return out


def _progress(
    counter: int, sent: int, received: int, done: int, items: int, total: int
) -> dict[str, int]:
    return {
        "Counter": counter,
        "SentTime": sent,
        "RecievedTime": received,  # sic: Comet's spelling
        "BytesDone": done,
        "ItemsDone": items,
        "ItemsTotal": total,
    }


def _size(size: int, started: int, completed: int) -> dict[str, int]:
    return {"Size": size, "MeasureStarted": started, "MeasureCompleted": completed}


class World:
    """Users, devices, jobs and live connections of one simulated Comet Server, and its event source.

    ``next_event()`` advances the world by one event of a realistic mix and returns it; the
    ``start_job``/``complete_job``/... methods do one specific change. The query methods
    (``jobs_for_date_range``, ``list_users_full``, ...) answer like the admin API would.
    """

    def __init__(
        self,
        seed: int | None = None,
        *,
        admin: str = "admin",
        users: int = 20,
        organizations: int = 3,
        running: int = 2,
        history_days: int = 3,
        max_jobs: int = 20000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Generate the world; `running` jobs are already in progress (they got no SEVT_JOB_NEW)."""
        self.seed = seed
        self.admin = admin
        self.target_users = users
        self.max_jobs = max_jobs
        self.rng = random.Random(seed)
        #: the choices added after the first generator (devices' client versions, vault quotas):
        #: a second generator, so that ``rng`` makes the same world and events as before
        self._aux = random.Random(f"aux-{seed}") if seed is not None else random.Random()
        self._clock = clock
        self._name_counter = 0
        #: orgID -> Organization-like dict; "" (the top-level organization) is not listed.
        self.organizations: dict[str, dict[str, Any]] = {}
        #: username -> UserProfileConfig.
        self.users: dict[str, dict[str, Any]] = {}
        #: job GUID -> BackupJobDetail, in start order (running jobs included).
        self.jobs: dict[str, dict[str, Any]] = {}
        #: (starts, ends): the jobs sorted by StartTime and by EndTime, for date-range queries
        #: on large worlds; rebuilt after the world's own changes to its jobs (a test that edits
        #: a job's times by hand does so in a world small enough to be scanned)
        self._job_index: tuple[_TimeIndex, _TimeIndex] | None = None
        #: GUIDs of running jobs, in start order.
        self.running: dict[str, None] = {}
        #: device ID -> LiveUserConnection-like dict for live-connected devices.
        self.live: dict[str, dict[str, Any]] = {}
        #: Whether profile_hash() covers Sources/Destinations statistics (see there).
        self.hash_statistics = True
        #: ServerMetaVersionInfo.SelfBackup: one SelfBackupStatistics per self-backup target
        self.self_backups: list[dict[str, Any]] = []
        self._usernames: list[str] = []
        self._busy_sources: set[str] = set()

        now = self._now()
        org_ids = [""]
        for i in range(organizations):
            org_id = self._guid()
            self.organizations[org_id] = {
                "Name": _COMPANIES[i % len(_COMPANIES)],
                "IsSuspended": False,
                "Hosts": [],
            }
            org_ids.append(org_id)
        for _ in range(users):
            self._add_user(self.rng.choice(org_ids), now - self.rng.randint(30, 900) * 86400)
        self._seed_history(now, history_days)
        for username in list(self._usernames):
            for device_id in self.users[username]["Devices"]:
                if self.rng.random() < 0.5:
                    self._connect(username, device_id, now - self.rng.randint(60, 86400))
        for _ in range(running):
            self.start_job(now - self.rng.randint(60, 3600))
        ended = now - self._aux.randint(3600, 12 * 3600)
        self.self_backups.append({
            "CurrentRunStart": 0, "LastRunStart": ended - self._aux.randint(60, 900),
            "LastRunEnd": ended, "LastRunSuccess": True,
            "LastRunSize": self._aux.randint(10**6, 10**9)})

    # ----------------------------------------------------------------- event generation

    def next_event(self, now: int | None = None) -> dict[str, Any]:
        """Advance the world by one event of the realistic mix and return it."""
        ts = self._now() if now is None else now
        roll = self.rng.random() * sum(w for _, w in _MIX)
        kind = _MIX[-1][0]
        for name, weight in _MIX:
            if roll < weight:
                kind = name
                break
            roll -= weight
        if kind == "job_new":
            return self.start_job(ts) if self._can_start() else self.complete_job(now=ts)
        if kind == "job_completed":
            return self.complete_job(now=ts) if self.running else self.start_job(ts)
        if kind == "login":
            return self.login(now=ts)
        if kind == "device_live":
            return self.toggle_device(now=ts)
        if kind == "account_new" and len(self.users) < self.target_users * 1.25:
            return self.new_account(now=ts)
        if kind == "account_removed" and len(self.users) > self.target_users * 0.75:
            removable = [u for u in self._usernames if not self._user_busy(u)]
            if removable:
                return self.remove_account(self.rng.choice(removable), now=ts)
        return self.update_account(now=ts)

    def start_job(self, now: int | None = None, *, username: str | None = None) -> dict[str, Any]:
        """Start a job on an idle Protected Item (of `username` if given); SEVT_JOB_NEW."""
        ts = self._now() if now is None else now
        user, source_id = self._pick_idle_source(username)
        profile = self.users[user]
        source = profile["Sources"][source_id]
        dest_id = self.rng.choice(list(profile["Destinations"]))
        dest = profile["Destinations"][dest_id]
        classification = self._weighted(_CLASSIFICATIONS)
        start = ts - self.rng.randint(1, 5)
        dest_size = dest["Statistics"]["ClientProvidedSize"]["Size"]
        job = job_detail(
            GUID=self._guid(),
            Username=user,
            Classification=classification,
            Status=_STATUS_RUNNING,
            StartTime=start,
            EndTime=0,
            SourceGUID=source_id,
            DestinationGUID=dest_id,
            DeviceID=source["OwnerDevice"],
            BackupRuleGUID=self._guid() if self.rng.random() < 0.7 else "",
            ClientVersion=CLIENT_VERSION,
            CancellationID=self._guid(),
            Progress=_progress(1, start, start, 0, 0, 0),
            DestinationSizeStart=_size(dest_size, start, start + self.rng.randint(0, 3)),
            DestinationSizeEnd=_size(0, 0, 0),
            Tags="nightly" if self.rng.random() < 0.15 else "",
        )
        self.jobs[job["GUID"]] = job
        self._job_index = None
        self.running[job["GUID"]] = None
        self._busy_sources.add(source_id)
        source["Statistics"]["LastStartTime"] = start
        self._evict_history()
        return event(
            "SEVT_JOB_NEW",
            actor=user,
            organization=profile.get("OrganizationID", ""),
            resource=job["GUID"],
            data=job,
            timestamp=ts,
        )

    def complete_job(
        self, guid: str | None = None, now: int | None = None, *, status: int | None = None
    ) -> dict[str, Any]:
        """Finish a running job (a random one unless `guid`) with a final status; SEVT_JOB_COMPLETED.

        The world changes whether or not the caller broadcasts the event, so calling this and
        dropping the result models a job that ended without an event.
        """
        ts = self._now() if now is None else now
        if guid is None:
            if not self.running:
                raise LookupError("no running job")
            guid = self.rng.choice(list(self.running))
        elif guid not in self.running:
            raise LookupError(f"job {guid} is not running")
        old = self.jobs[guid]
        final = self._weighted(_FINAL_STATUSES) if status is None else status
        end = max(ts, old["StartTime"] + 1)
        fields = {k: v for k, v in old.items() if k != "CancellationID"}
        fields.update(self._job_sizes(old, final))
        fields["Status"] = final
        fields["EndTime"] = end
        if final in (_STATUS_SUCCESS, 7001) and fields["Classification"] == _BACKUP:
            fields["SnapshotID"] = f"{self.rng.getrandbits(256):064x}"
        fields["Progress"] = _progress(
            self.rng.randint(10, 5000),
            end,
            end,
            fields["UploadSize"],
            fields["TotalFiles"],
            fields["TotalFiles"],
        )
        start_size = old["DestinationSizeStart"]["Size"]
        end_size = start_size + int(fields["UploadSize"] * self.rng.uniform(0.6, 0.95))
        fields["DestinationSizeEnd"] = _size(end_size, max(end - 3, old["StartTime"]), end)
        job = job_detail(**fields)
        self.jobs[guid] = job
        self._job_index = None
        del self.running[guid]
        self._busy_sources.discard(job["SourceGUID"])
        profile = self.users.get(job["Username"])
        organization = ""
        if profile is not None:
            organization = profile.get("OrganizationID", "")
            source = profile["Sources"].get(job["SourceGUID"])
            if source is not None:
                stats = source["Statistics"]
                stats["LastBackupJob"] = job
                if 5000 <= final <= 5999:
                    stats["LastSuccessfulBackupJob"] = job
            dest = profile["Destinations"].get(job["DestinationGUID"])
            if dest is not None:
                dest["Statistics"]["ClientProvidedSize"] = _size(end_size, end - 3, end)
        return event(
            "SEVT_JOB_COMPLETED",
            actor=job["Username"],
            organization=organization,
            resource=guid,
            data=job,
            timestamp=ts,
        )

    def login(self, username: str | None = None, now: int | None = None) -> dict[str, Any]:
        """A user authenticated a non-session request; SEVT_ACCOUNT_LOGIN, ResourceID = the path."""
        ts = self._now() if now is None else now
        user = username if username is not None else self.rng.choice(self._usernames)
        return event(
            "SEVT_ACCOUNT_LOGIN",
            actor=user,
            organization=self.users[user].get("OrganizationID", ""),
            resource=self.rng.choice(_LOGIN_PATHS),
            timestamp=ts,
        )

    def toggle_device(self, now: int | None = None) -> dict[str, Any]:
        """A random device connects (SEVT_DEVICE_LIVE_CONNECT) or disconnects (…_DISCONNECT)."""
        ts = self._now() if now is None else now
        user = self.rng.choice(self._usernames)
        profile = self.users[user]
        if not profile["Devices"]:  # every device was removed (remove_device)
            return self.login(user, now=ts)
        device_id = self.rng.choice(list(profile["Devices"]))
        if device_id in self.live:
            del self.live[device_id]
            type_name = "SEVT_DEVICE_LIVE_DISCONNECT"
        else:
            self._connect(user, device_id, ts)
            type_name = "SEVT_DEVICE_LIVE_CONNECT"
        return event(
            type_name,
            actor=user,
            organization=profile.get("OrganizationID", ""),
            resource=device_id,
            timestamp=ts,
        )

    def update_account(self, username: str | None = None, now: int | None = None) -> dict[str, Any]:
        """Change one thing in a profile; SEVT_ACCOUNT_UPDATED with the full profile as Data."""
        ts = self._now() if now is None else now
        user = username if username is not None else self.rng.choice(self._usernames)
        profile = self.users[user]
        change = self.rng.randrange(6)
        if (change == 3 and not profile["Devices"]) or (change == 4 and not profile["Sources"]):
            change = 2  # nothing to rename (remove_device took the last device)
        if change == 0:
            profile["AccountName"] = self._account_name(profile.get("OrganizationID", ""))
        elif change == 1:
            emails = profile["Emails"]
            if len(emails) > 1 and self.rng.random() < 0.5:
                emails.pop()
            else:
                emails.append(f"{user.split('.')[0]}+{self.rng.randrange(100)}@example.net")
        elif change == 2:
            profile["SendEmailReports"] = not profile["SendEmailReports"]
        elif change == 3:
            device = profile["Devices"][self.rng.choice(list(profile["Devices"]))]
            device["FriendlyName"] = (
                f"{device['FriendlyName'].split('-')[0]}-{self.rng.randrange(100, 999)}"
            )
        elif change == 4:
            source = profile["Sources"][self.rng.choice(list(profile["Sources"]))]
            source["Description"] = (
                f"{source['Description'].split(' #')[0]} #{self.rng.randrange(2, 9)}"
            )
            source["ModifyTime"] = ts
        else:
            enabled = not profile["AllProtectedItemsQuotaEnabled"]
            profile["AllProtectedItemsQuotaEnabled"] = enabled
            profile["AllProtectedItemsQuotaBytes"] = (
                self.rng.choice((500, 1000, 2000)) * 10**9 if enabled else 0
            )
        actor = self.admin if self.rng.random() < 0.6 else user
        return event(
            "SEVT_ACCOUNT_UPDATED",
            actor=actor,
            organization=profile.get("OrganizationID", ""),
            resource=user,
            data=profile,
            timestamp=ts,
        )

    def new_account(self, now: int | None = None) -> dict[str, Any]:
        """An admin creates a user; SEVT_ACCOUNT_NEW with the profile as Data."""
        ts = self._now() if now is None else now
        orgs = ["", *self.organizations]
        user = self._add_user(self.rng.choice(orgs), ts)
        profile = self.users[user]
        return event(
            "SEVT_ACCOUNT_NEW",
            actor=self.admin,
            organization=profile.get("OrganizationID", ""),
            resource=user,
            data=profile,
            timestamp=ts,
        )

    def remove_account(self, username: str, now: int | None = None) -> dict[str, Any]:
        """An admin deletes a user; SEVT_ACCOUNT_REMOVED whose Data is the username (a JSON string).

        The user's finished jobs stay in ``jobs``; running ones are left running.
        """
        ts = self._now() if now is None else now
        profile = self.users.pop(username)
        self._usernames.remove(username)
        for device_id in profile["Devices"]:
            self.live.pop(device_id, None)
        return event(
            "SEVT_ACCOUNT_REMOVED",
            actor=self.admin,
            organization=profile.get("OrganizationID", ""),
            resource=username,
            data=username,
            timestamp=ts,
        )

    def cancel_silently(
        self, guid: str, status: int = _STATUS_CANCELLED, now: int | None = None
    ) -> dict[str, Any]:
        """Finish a running job with a final `status` and NO event; return its BackupJobDetail.

        This is an admin cancelling a stuck job from the web UI (comet-api.md §1.3: no
        SEVT_JOB_* is emitted); the job, and the Protected Item's and vault's statistics, change
        exactly as with ``complete_job``. Raises LookupError if the job is not running and
        ValueError for a status that is not final (5xxx or 7xxx).
        """
        if not (5000 <= status <= 5999 or 7000 <= status <= 7999):
            raise ValueError(f"{status} is not a final job status")
        self.complete_job(guid, now, status=status)
        return self.jobs[guid]

    def abandon(self, guid: str, now: int | None = None) -> dict[str, Any]:
        """Mark a running job abandoned (7007) with NO event (like AdminJobAbandon); see cancel_silently."""
        return self.cancel_silently(guid, _STATUS_ABANDONED, now)

    def run_self_backup(self, index: int = 0, *, success: bool = True, size: int | None = None,
                        now: int | None = None) -> dict[str, Any]:
        """The server's self-backup `index` runs now and ends (no event); its statistics."""
        ts = self._now() if now is None else now
        run = self.self_backups[index]
        run.update(CurrentRunStart=0, LastRunStart=ts - 60, LastRunEnd=ts, LastRunSuccess=success,
                   LastRunSize=self._aux.randint(10**6, 10**9) if size is None else size)
        return run

    def add_device(self, username: str, now: int | None = None, *,
                   actor: str | None = None) -> dict[str, Any]:
        """Register a new device for `username`; SEVT_DEVICE_NEW (ResourceID = device ID,
        Data = DeviceConfig).

        The device joins the profile's ``Devices`` (without Protected Items and not live-connected).
        `actor`: who registered it (default the user; an administrator registering a device
        from the registration lobby is named instead). Raises LookupError for an unknown user.
        """
        ts = self._now() if now is None else now
        profile = self.users.get(username)
        if profile is None:
            raise LookupError(f"no user {username!r}")
        device_id, device, _ = self._new_device(username, ts)
        profile["Devices"][device_id] = device
        return event(
            "SEVT_DEVICE_NEW",
            actor=username if actor is None else actor,
            organization=profile.get("OrganizationID", ""),
            resource=device_id,
            data=device,
            timestamp=ts,
        )

    def connect_device(self, username: str, device_id: str,
                       now: int | None = None) -> dict[str, Any]:
        """`username`'s device `device_id` opens a live connection; SEVT_DEVICE_LIVE_CONNECT
        (the world changes whether or not the caller broadcasts it)."""
        ts = self._now() if now is None else now
        profile = self.users[username]
        self._connect(username, device_id, ts)
        return event(
            "SEVT_DEVICE_LIVE_CONNECT",
            actor=username,
            organization=profile.get("OrganizationID", ""),
            resource=device_id,
            timestamp=ts,
        )

    def remove_device(
        self, username: str, device_id: str, now: int | None = None
    ) -> dict[str, Any]:
        """An admin revokes a device; SEVT_DEVICE_REMOVED (ResourceID = device ID, no Data).

        The device leaves ``Devices``, its Protected Items leave ``Sources`` and its live connection
        ends (no DEVICE_LIVE_DISCONNECT event). A job running on it keeps running. Raises
        LookupError for an unknown user or device.
        """
        ts = self._now() if now is None else now
        profile = self.users.get(username)
        if profile is None:
            raise LookupError(f"no user {username!r}")
        if device_id not in profile["Devices"]:
            raise LookupError(f"user {username!r} has no device {device_id!r}")
        del profile["Devices"][device_id]
        sources = profile["Sources"]
        for source_id in [s for s, cfg in sources.items() if cfg["OwnerDevice"] == device_id]:
            del sources[source_id]
        self.live.pop(device_id, None)
        return event(
            "SEVT_DEVICE_REMOVED",
            actor=self.admin,
            organization=profile.get("OrganizationID", ""),
            resource=device_id,
            timestamp=ts,
        )

    # ----------------------------------------------------------------- queries (admin API shapes)

    def job(self, guid: str) -> dict[str, Any] | None:
        """One BackupJobDetail (AdminGetJobProperties), or None."""
        return self.jobs.get(guid)

    def incomplete_jobs(self) -> list[dict[str, Any]]:
        """Every running job (AdminGetJobsForDateRange with Start=End=0)."""
        return [self.jobs[g] for g in self.running]

    def jobs_for_date_range(self, start: int, end: int) -> list[dict[str, Any]]:
        """Jobs that started or ended within [start, end] (AdminGetJobsForDateRange semantics)."""
        if start == 0 and end == 0:
            return self.incomplete_jobs()
        if start > end:
            start, end = end, start
        if len(self.jobs) < _INDEX_FROM:
            return [
                j
                for j in self.jobs.values()
                if start <= j["StartTime"] <= end or (j["EndTime"] and start <= j["EndTime"] <= end)
            ]
        # a large world (a benchmark's gap of a million jobs): two sorted indexes, so that a
        # sync reading it span by span costs each span's jobs, not the world's
        if self._job_index is None:
            ranked = list(enumerate(self.jobs.values()))
            by_start = sorted(ranked, key=lambda rj: rj[1]["StartTime"])
            by_end = sorted(((r, j) for r, j in ranked if j["EndTime"]),
                            key=lambda rj: rj[1]["EndTime"])
            self._job_index = ((
                [j["StartTime"] for _, j in by_start], by_start), (
                [j["EndTime"] for _, j in by_end], by_end))
        found: dict[int, dict[str, Any]] = {}
        for times, jobs in self._job_index:
            lo, hi = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
            found.update(jobs[lo:hi])
        return [found[r] for r in sorted(found)]  # in the world's order, as the scan gives

    def recent_jobs(self, now: int | None = None, window: int = 86400) -> list[dict[str, Any]]:
        """Jobs that started or ended in the last `window` seconds, plus every running job
        (AdminGetJobsRecent: "recent and incomplete"; Comet's window is undocumented)."""
        ts = self._now() if now is None else now
        since = ts - window
        return [
            j
            for g, j in self.jobs.items()
            if g in self.running or j["StartTime"] >= since or j["EndTime"] >= since
        ]

    def jobs_for_user(self, username: str) -> list[dict[str, Any]]:
        """Every known job of one user (AdminGetJobsForUser)."""
        return [j for j in self.jobs.values() if j["Username"] == username]

    def list_users_full(self) -> dict[str, dict[str, Any]]:
        """``{username: UserProfileConfig}`` (AdminListUsersFull)."""
        return dict(self.users)

    def profile(self, username: str) -> dict[str, Any] | None:
        """One UserProfileConfig (AdminGetUserProfile), or None."""
        return self.users.get(username)

    def profile_hash(self, username: str) -> str | None:
        """An opaque digest of a profile's current state (AdminGetUserProfileHash), or None.

        Whether Comet's ProfileHash covers the job statistics is undocumented; by default it does
        (it changes after every job of the user), ``hash_statistics = False`` leaves them out.
        """
        profile = self.users.get(username)
        if profile is None:
            return None
        if not self.hash_statistics:
            profile = _without_statistics(profile)
        return hashlib.sha256(orjson.dumps(profile)).hexdigest()

    def live_connections(self) -> dict[str, dict[str, Any]]:
        """``{live-connection GUID: LiveUserConnection}`` (AdminDispatcherListActive)."""
        return {
            conn["_ID"]: {k: v for k, v in conn.items() if k != "_ID"}
            for conn in self.live.values()
        }

    def device_count(self) -> int:
        """Number of devices registered across all users."""
        return sum(len(p["Devices"] or ()) for p in self.users.values())

    # ----------------------------------------------------------------- internals

    def _now(self) -> int:
        return int(self._clock())

    def _guid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def _weighted(self, table: tuple[tuple[int, int], ...]) -> int:
        roll = self.rng.random() * sum(w for _, w in table)
        for value, weight in table:
            if roll < weight:
                return value
            roll -= weight
        return table[-1][0]

    def _log_uniform(self, low: float, high: float) -> int:
        return int(math.exp(self.rng.uniform(math.log(low), math.log(high))))

    def _user_busy(self, username: str) -> bool:
        return any(s in self._busy_sources for s in self.users[username]["Sources"])

    def _can_start(self) -> bool:
        total = sum(len(p["Sources"]) for p in self.users.values())
        return len(self._busy_sources) < max(1, total // 3)

    def _pick_idle_source(self, username: str | None) -> tuple[str, str]:
        for _ in range(20):
            user = username if username is not None else self.rng.choice(self._usernames)
            idle = [s for s in self.users[user]["Sources"] if s not in self._busy_sources]
            if idle:
                return user, self.rng.choice(idle)
            if username is not None:
                break
        pool = [
            (u, s)
            for u in ([username] if username is not None else self._usernames)
            for s in self.users[u]["Sources"]
            if s not in self._busy_sources
        ]
        if not pool:
            raise LookupError("no idle Protected Item")
        return self.rng.choice(pool)

    def _job_sizes(self, job: dict[str, Any], status: int) -> dict[str, int]:
        """Final sizes and counts of a finished job, by engine and classification."""
        engine = ""
        profile = self.users.get(job["Username"])
        if profile is not None:
            engine = profile["Sources"].get(job["SourceGUID"], {}).get("Engine", "")
        sizes: dict[str, int] = {}
        if job["Classification"] != _BACKUP:
            sizes.update(TotalDirectories=0, TotalFiles=0, TotalSize=0, TotalChunks=0)
            sizes.update(
                UploadSize=self.rng.randint(0, 2 * 10**6),
                DownloadSize=self.rng.randint(10**5, 5 * 10**7),
            )
            return sizes
        files = self._log_uniform(1e4, 1e6)
        total = self._log_uniform(1e9, 5e11)
        if engine in ("engine1/windisk", "engine1/hyperv"):
            files = self.rng.randint(2, 40)
        sizes["TotalDirectories"] = max(1, files // self.rng.randint(8, 30))
        sizes["TotalFiles"] = files
        sizes["TotalSize"] = total
        sizes["TotalChunks"] = max(1, total // self.rng.randint(3 * 2**20, 6 * 2**20))
        upload = int(total * self.rng.uniform(0.001, 0.05))
        if status == 7002:
            upload = int(upload * self.rng.uniform(0.05, 0.6))
        elif status == 7005:
            upload = int(upload * self.rng.uniform(0.0, 0.3))
        sizes["UploadSize"] = upload
        sizes["DownloadSize"] = self.rng.randint(0, 5 * 2**20)
        if engine == "engine1/hyperv":
            sizes["TotalVmCount"] = self.rng.randint(1, 12)
        elif engine == "engine1/winmsofficemail":
            accounts = self.rng.randint(5, 300)
            licensed = self.rng.randint(accounts // 2, accounts)
            sizes.update(
                TotalMailsCount=accounts * self.rng.randint(800, 20000),
                TotalSitesCount=self.rng.randint(0, 40),
                TotalAccountsCount=accounts,
                TotalLicensedMailsCount=licensed,
                TotalUnlicensedMailsCount=accounts - licensed,
            )
        return sizes

    def _account_name(self, organization: str) -> str:
        if organization:
            site = self.rng.choice(("Office", "Finance", "IT", "Front desk"))
            return f"{self.organizations[organization]['Name']} - {site}"
        return self.rng.choice(_COMPANIES)

    def _new_username(self) -> str:
        while True:
            first = self.rng.choice(_FIRST)
            last = self.rng.choice(_LAST)
            name = f"{first}.{last}"
            if name in self.users:
                self._name_counter += 1
                name = f"{name}{self._name_counter}"
            if name not in self.users:
                return name

    def _add_user(self, organization: str, created: int) -> str:
        username = self._new_username()
        rng = self.rng
        devices: dict[str, dict[str, Any]] = {}
        device_os: dict[str, str] = {}
        for _ in range(rng.choice((1, 1, 2, 2, 3))):
            device_id, device, os_name = self._new_device(username, created, spread_days=20)
            devices[device_id] = device
            device_os[device_id] = os_name
        destinations: dict[str, dict[str, Any]] = {}
        for _ in range(rng.choice((1, 1, 2))):
            dtype, ddesc, _ = _VAULTS[
                self._weighted(tuple((i, v[2]) for i, v in enumerate(_VAULTS)))
            ]
            size = self._log_uniform(1e10, 2e12)
            limited = self._aux.random() < 0.4  # a quota somewhat above today's size
            destinations[self._guid()] = {
                "Description": ddesc,
                "CreateTime": created,
                "ModifyTime": created,
                "DestinationType": dtype,
                "StorageLimitEnabled": limited,
                "StorageLimitBytes": -(-int(size * self._aux.uniform(1.05, 2.5)) // 10**9) * 10**9
                if limited else 0,
                "Statistics": {"ClientProvidedSize": _size(size, created, created)},
            }
        sources: dict[str, dict[str, Any]] = {}
        for device_id, os_name in device_os.items():
            engines = [(i, e[3]) for i, e in enumerate(_ENGINES) if os_name in e[2]]
            for _ in range(rng.choice((1, 1, 2))):
                engine, description, _, _ = _ENGINES[self._weighted(tuple(engines))]
                sources[self._guid()] = {
                    "Engine": engine,
                    "Description": description,
                    "OwnerDevice": device_id,
                    "CreateTime": created,
                    "ModifyTime": created,
                    "Statistics": {"LastStartTime": 0},
                }
        first = username.split(".")[0]
        profile: dict[str, Any] = {
            "Username": username,
            "AccountName": self._account_name(organization),
            "LocalTimezone": rng.choice(_TIMEZONES),
            "LanguageCode": rng.choice(_LANGUAGES),
        }
        if organization:
            profile["OrganizationID"] = organization
        profile.update(
            {
                "Emails": [f"{first}@example.net"],
                "OverrideEmailSettings": {},
                "SendEmailReports": rng.random() < 0.7,
                "Destinations": destinations,
                "Sources": sources,
                "BackupRules": {},
                "Devices": devices,
                "IsSuspended": False,
                "AllProtectedItemsQuotaEnabled": False,
                "AllProtectedItemsQuotaBytes": 0,
                "MaximumDevices": 0,
                "QuotaOffice365ProtectedAccounts": 0,
                "QuotaHyperVGuests": 0,
                "QuotaVMwareGuests": 0,
                "PolicyID": "",
                "Policy": {},
                "PasswordFormat": 12,
                "PasswordHash": f"sim-bcrypt${rng.getrandbits(192):048x}",
                "PasswordRecovery": "",
                "AllowPasswordLogin": True,
                "AllowPasswordAndTOTPLogin": False,
                "TOTPKeyEncryptionFormat": 0,
                "TOTPKey": "",
                "RequirePasswordChange": False,
                "CreateTime": created,
                "CreationGUID": self._guid(),
            }
        )
        self.users[username] = profile
        self._usernames.append(username)
        return username

    def _new_device(
        self, username: str, registered: int, *, spread_days: int = 0
    ) -> tuple[str, dict[str, Any], str]:
        """(device ID, DeviceConfig, os) of a new device, registered up to `spread_days` after."""
        rng = self.rng
        device_id = f"{rng.getrandbits(160):040x}"
        os_name, _, versions, arches, prefix = _PLATFORMS[
            self._weighted(tuple((i, p[1]) for i, p in enumerate(_PLATFORMS)))
        ]
        reported = {**rng.choice(versions), "os": os_name, "arch": rng.choice(arches)}
        platform = {k: reported[k] for k in _OSINFO_KEYS if k in reported}
        if spread_days:
            registered += rng.randint(0, spread_days) * 86400
        device = {
            "FriendlyName": f"{prefix}-{username.split('.')[0].upper()}-{rng.randrange(10, 99)}",
            "RegistrationTime": registered,
            "PlatformVersion": platform,
            "DeviceTimezone": rng.choice(_TIMEZONES),
            "ClientVersion": self._client_version(),
        }
        return device_id, device, os_name

    def _client_version(self) -> str:
        roll = self._aux.random() * 100
        for version, weight in _OLD_CLIENT_VERSIONS:
            if roll < weight:
                return version
            roll -= weight
        return CLIENT_VERSION

    def _seed_history(self, now: int, days: int) -> None:
        """Finished jobs over the last `days` days, so date-range queries have data from the start."""
        for username in list(self._usernames):
            for source_id in self.users[username]["Sources"]:
                for day in range(days, 0, -1):
                    start = now - day * 86400 + self.rng.randint(0, 6 * 3600)
                    self._finished_job(username, source_id, start)
        self.jobs = dict(sorted(self.jobs.items(), key=lambda item: int(item[1]["StartTime"])))
        self._job_index = None

    def _finished_job(self, username: str, source_id: str, start: int) -> None:
        """Record one past job of a given Protected Item without emitting anything."""
        profile = self.users[username]
        source = profile["Sources"][source_id]
        dest_id = self.rng.choice(list(profile["Destinations"]))
        dest_size = profile["Destinations"][dest_id]["Statistics"]["ClientProvidedSize"]["Size"]
        job = job_detail(
            GUID=self._guid(),
            Username=username,
            Classification=_BACKUP,
            Status=_STATUS_RUNNING,
            StartTime=start,
            EndTime=0,
            SourceGUID=source_id,
            DestinationGUID=dest_id,
            DeviceID=source["OwnerDevice"],
            ClientVersion=CLIENT_VERSION,
            Progress=_progress(1, start, start, 0, 0, 0),
            DestinationSizeStart=_size(dest_size, start, start + 2),
        )
        self.jobs[job["GUID"]] = job
        self.running[job["GUID"]] = None
        self._busy_sources.add(source_id)
        source["Statistics"]["LastStartTime"] = start
        self.complete_job(job["GUID"], start + self.rng.randint(120, 4 * 3600))

    def _connect(self, username: str, device_id: str, when: int) -> None:
        device = self.users[username]["Devices"][device_id]
        platform = device["PlatformVersion"]
        self.live[device_id] = {
            "_ID": self._guid(),
            "Username": username,
            "DeviceID": device_id,
            "ReportedVersion": device.get("ClientVersion") or CLIENT_VERSION,
            "ReportedPlatform": f"{platform['os']}/{platform['arch']}",
            "ReportedPlatformVersion": platform,
            "DeviceTimeZone": device["DeviceTimezone"],
            "IPAddress": f"203.0.113.{self.rng.randrange(1, 255)}",
            "ConnectionTime": when,
            "AllowsFilenames": True,
        }

    def _evict_history(self) -> None:
        """Past ``max_jobs``, forget the oldest finished jobs down to 90% of it (running ones stay)."""
        if len(self.jobs) <= self.max_jobs:
            return
        excess = len(self.jobs) - int(self.max_jobs * 0.9)
        for guid in [g for g in self.jobs if g not in self.running][:excess]:
            del self.jobs[guid]
        self._job_index = None
