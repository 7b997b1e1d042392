"""Remedial sync: after every (re)connect, catch up through the admin API on what was missed.

Comet drops a client that drains too slowly, and a client that is down misses everything; the API
Guide's answer is a "remedial sync using the standard Comet Server APIs". Two parts:

:class:`Tracker` keeps, in memory and in the checkpoint, what has been delivered: the dedup
window, the watermark (server time up to which every sink acknowledged every event), the jobs seen
running, and digests of the account profiles. The daemon feeds it every event it publishes
(``admit`` → ``observe``) and, once a second, the pipeline's acknowledgements (``settle``).

:class:`Resyncer` runs one catch-up (comet-api.md §14):

- jobs: ``get-jobs-for-date-range(watermark - overlap, now)`` plus ``(0, 0)`` (every incomplete
  job); jobs believed running and in neither list are re-checked with ``get-job-properties``
  (a job cancelled from the web UI may emit no event). A completed job not yet delivered becomes a
  synthesized ``SEVT_JOB_COMPLETED``; a running job not seen before a ``SEVT_JOB_NEW``.
- accounts: ``list-users-full`` diffed against the stored digests, which leave out the statistics
  that change after every job: ``SEVT_ACCOUNT_NEW`` / ``_UPDATED`` / ``_REMOVED`` (a changed
  ``CreationGUID`` is REMOVED then NEW) and ``SEVT_DEVICE_NEW`` / ``_REMOVED`` for devices added
  to or removed from a profile. The first run only records a baseline.
- a new ``ServerStartHash`` (the server restarted) widens the job window.

Synthesized events have the StreamableEvent shape (Actor, OwnerOrganizationID, ResourceID, Type,
Timestamp, TypeString, Data) and origin ``resync``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import structlog

from .api import AdminClient
from .constants import SEVT
from .errors import ApiError
from .events import Event
from .redact import Redactor
from .state import Checkpoint, Dedup, profile_digest

__all__ = ["RESTART_WINDOW", "ResyncResult", "Resyncer", "Tracker"]

log = structlog.get_logger("cometstream.resync")

JOB_NEW: Final = SEVT["SEVT_JOB_NEW"]
JOB_COMPLETED: Final = SEVT["SEVT_JOB_COMPLETED"]
ACCOUNT_NEW: Final = SEVT["SEVT_ACCOUNT_NEW"]
ACCOUNT_REMOVED: Final = SEVT["SEVT_ACCOUNT_REMOVED"]
ACCOUNT_UPDATED: Final = SEVT["SEVT_ACCOUNT_UPDATED"]
DEVICE_NEW: Final = SEVT["SEVT_DEVICE_NEW"]
DEVICE_REMOVED: Final = SEVT["SEVT_DEVICE_REMOVED"]
#: after a server restart the job window reaches back at least this far
RESTART_WINDOW: Final = 3600.0
#: the watermark trails the server's clock by this much while the stream is live and idle
_LIVE_LAG: Final = 5


class Tracker:
    """What has been delivered; the in-memory side of the checkpoint."""

    def __init__(self, cp: Checkpoint | None = None, *, dedup: Dedup | None = None) -> None:
        cp = cp or Checkpoint()
        self.has_checkpoint = cp.watermark > 0
        self.watermark = cp.watermark
        self.server_start_hash = cp.server_start_hash
        self.running_jobs: dict[str, list[Any]] = dict(cp.running_jobs)
        self.accounts: dict[str, list[Any]] = dict(cp.accounts)
        self.accounts_baseline = cp.accounts_baseline
        self.dedup = dedup or Dedup()
        self.dedup.load(cp.dedup)
        #: published, not yet acknowledged by every sink: (seq, dedup key, timestamp)
        self._pending: deque[tuple[int, str, int]] = deque()  # key "" = not de-duplicated
        #: True until a resync has covered the current gap: the watermark must not pass it
        self.frozen = self.has_checkpoint
        self.changed = False
        #: the newest timestamp of any acknowledged event
        self.newest_acked = 0

    # --- the publish path ------------------------------------------------------------------------
    def admit(self, ev: Event) -> str | bool:
        """False for a duplicate (counted); else the event's dedup key, or True if it has none."""
        key = ev.dedup_key()
        if key is None:
            return True
        if self.dedup.seen(key):
            self.dedup.duplicates += 1
            return False
        return key

    def published(self, ev: Event, key: str | bool) -> None:
        if isinstance(key, str):
            self.dedup.add_inflight(key, ev.seq)
            self._pending.append((ev.seq, key, ev.timestamp or int(ev.received_at)))
        else:
            self._pending.append((ev.seq, "", ev.timestamp or int(ev.received_at)))

    def observe(self, ev: Event) -> None:
        """Keep running jobs and account digests current from the events that go out."""
        t = ev.type
        if t == JOB_NEW or t == JOB_COMPLETED:
            job = ev.job
            guid = job.get("GUID") if job else None
            if isinstance(guid, str) and guid:
                if t == JOB_NEW:
                    self.running_jobs[guid] = [job.get("Username", ""), job.get("StartTime", 0)]  # type: ignore[union-attr]
                else:
                    self.running_jobs.pop(guid, None)
                self.changed = True
        elif ev.origin != "stream":
            # resync set the account state itself (and its events carry redacted profiles,
            # whose digests would not match the next diff)
            return
        elif t == ACCOUNT_NEW or t == ACCOUNT_UPDATED:
            data = ev.data
            if isinstance(data, dict) and isinstance(data.get("Username"), str):
                self.accounts[data["Username"]] = account_entry(data)
                self.changed = True
        elif t == ACCOUNT_REMOVED:
            data = ev.data
            name = data if isinstance(data, str) else (
                data.get("Username") if isinstance(data, dict) else None)
            name = name or ev.doc.get("ResourceID")
            if isinstance(name, str) and self.accounts.pop(name, None) is not None:
                self.changed = True

    # --- acknowledgements --------------------------------------------------------------------------
    def settle(self, delivered_through: int, *, live: bool, server_now: float) -> None:
        """Move acknowledged keys into the dedup window and advance the watermark.

        ``live``: the stream is connected and caught up, so "nothing pending" means nothing
        happened up to about ``server_now``.
        """
        pending = self._pending
        while pending and pending[0][0] <= delivered_through:
            _seq, key, ts = pending.popleft()
            if key:
                self.dedup.acked(key, ts)
            if ts > self.newest_acked:
                self.newest_acked = ts
            self.changed = True
        if self.frozen:
            return
        if pending:
            candidate = min(ts for _s, _k, ts in pending) - 1
        else:
            candidate = self.newest_acked
            if live:
                candidate = max(candidate, int(server_now) - _LIVE_LAG)
        if candidate > self.watermark:
            self.watermark = candidate
            self.changed = True
        self.dedup.prune(self.watermark)

    def drop_pending(self) -> None:
        """Events that will never be acknowledged (dropped at shutdown): forget their keys."""
        for _seq, key, _ts in self._pending:
            if key:
                self.dedup.forget_inflight(key)
        self._pending.clear()

    def snapshot(self) -> Checkpoint:
        self.changed = False
        return Checkpoint(
            watermark=self.watermark,
            server_start_hash=self.server_start_hash,
            running_jobs=dict(self.running_jobs),
            accounts=dict(self.accounts),
            accounts_baseline=self.accounts_baseline,
            dedup=self.dedup.dump(),
        )


def account_entry(profile: dict[str, Any]) -> list[Any]:
    devices = profile.get("Devices")
    return [profile_digest(profile), profile.get("CreationGUID", ""),
            sorted(devices) if isinstance(devices, dict) else []]


class ResyncResult:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.kinds: dict[str, int] = {}
        self.baseline = False
        self.window: tuple[int, int] = (0, 0)

    def add(self, ev: Event, kind: str) -> None:
        self.events.append(ev)
        self.kinds[kind] = self.kinds.get(kind, 0) + 1


class Resyncer:
    """Computes the catch-up events for one (re)connect; publishing is the daemon's."""

    def __init__(self, api: AdminClient, tracker: Tracker, *, server: str, overlap: float,
                 redactor: Redactor, clock: Callable[[], float] = time.time) -> None:
        self.api = api
        self.tracker = tracker
        self.server = server
        self.overlap = overlap
        self.redactor = redactor
        self.clock = clock

    def _event(self, type_: int, ts: int, data: Any, *, actor: str = "", org: str = "",
               resource: str = "") -> Event:
        doc: dict[str, Any] = {"Actor": actor, "OwnerOrganizationID": org}
        if resource:
            doc["ResourceID"] = resource
        doc["Type"] = type_
        doc["Timestamp"] = ts
        doc["TypeString"] = _NAMES[type_]
        if data is not None:
            doc["Data"] = data
        return Event.synthesize(doc, origin="resync", received_at=self.clock(),
                                server=self.server)

    async def run(self, hello: dict[str, Any]) -> ResyncResult:
        tr = self.tracker
        res = ResyncResult()
        server_now = hello.get("CurrentTime")
        now = int(server_now) if isinstance(server_now, int) and server_now > 0 else int(self.clock())
        start_hash = hello.get("ServerStartHash") if isinstance(hello.get("ServerStartHash"), str) else ""
        restarted = bool(tr.server_start_hash and start_hash and start_hash != tr.server_start_hash)

        users = await self.api.list_users_full()
        orgs = {name: p.get("OrganizationID", "") or "" for name, p in users.items()}
        incomplete = await self.api.jobs_for_date_range(0, 0)
        if not tr.has_checkpoint:
            # First start: what happened before it is history (that is `backfill`'s job). Record
            # the running jobs, and the completions of the last `overlap` seconds as if delivered,
            # so that the next resync's overlap window does not replay them.
            res.baseline = True
            for job in incomplete:
                guid = job.get("GUID")
                if isinstance(guid, str) and guid and not job.get("EndTime"):
                    tr.running_jobs[guid] = [job.get("Username", ""), job.get("StartTime", 0)]
            since = max(0, now - int(self.overlap))
            res.window = (since, now + 60)
            for job in await self.api.jobs_for_date_range(since, now):
                guid, end = job.get("GUID"), job.get("EndTime")
                # strictly before the HELLO: a job that ended since then has its live event
                # held behind this resync, and must not be mistaken for history
                if isinstance(guid, str) and guid and isinstance(end, int) and 0 < end < now:
                    tr.dedup.acked(f"{JOB_COMPLETED}:{guid}", end)
            tr.watermark = max(tr.watermark, now - 1)
        else:
            window = self.overlap
            if restarted:
                window = max(window, RESTART_WINDOW)
                log.info("server restarted since the checkpoint: widening the resync window",
                         server=self.server, window=window)
            since = max(0, tr.watermark - int(window))
            res.window = (since, now + 60)
            recent = await self.api.jobs_for_date_range(since, now + 60)
            jobs: dict[str, dict[str, Any]] = {}
            for job in (*recent, *incomplete):
                guid = job.get("GUID")
                if isinstance(guid, str) and guid:
                    jobs[guid] = job
            for guid in [g for g in tr.running_jobs if g not in jobs]:
                try:
                    job = await self.api.job_properties(guid)
                except ApiError as exc:
                    if exc.retryable:
                        raise
                    log.info("job believed running is gone", job=guid, error=str(exc))
                    tr.running_jobs.pop(guid, None)
                    tr.changed = True
                    continue
                if isinstance(job.get("GUID"), str):
                    jobs[guid] = job
            for job in jobs.values():
                self._job_events(job, res, orgs)
        self._account_events(users, res)
        if start_hash:
            tr.server_start_hash = start_hash
        tr.has_checkpoint = True
        tr.changed = True
        res.events.sort(key=lambda ev: ev.timestamp)
        return res

    def _job_events(self, job: dict[str, Any], res: ResyncResult, orgs: dict[str, str]) -> None:
        tr = self.tracker
        guid: str = job["GUID"]
        user = job.get("Username") if isinstance(job.get("Username"), str) else ""
        end = job.get("EndTime")
        start = job.get("StartTime")
        if isinstance(end, int) and end > 0:
            if not tr.dedup.seen(f"{JOB_COMPLETED}:{guid}"):
                res.add(self._event(JOB_COMPLETED, end, job, actor=user or "",
                                    org=orgs.get(user or "", ""), resource=guid), "job_completed")
        elif guid not in tr.running_jobs and not tr.dedup.seen(f"{JOB_NEW}:{guid}"):
            ts = start if isinstance(start, int) and start > 0 else int(self.clock())
            res.add(self._event(JOB_NEW, ts, job, actor=user or "", org=orgs.get(user or "", ""),
                                resource=guid), "job_new")

    def _account_events(self, users: dict[str, dict[str, Any]], res: ResyncResult) -> None:
        tr = self.tracker
        now = int(self.clock())
        current = {name: account_entry(p) for name, p in users.items()}
        if not tr.accounts_baseline:
            tr.accounts = current
            tr.accounts_baseline = True
            tr.changed = True
            return
        old = tr.accounts
        for name, entry in current.items():
            profile = users[name]
            org = profile.get("OrganizationID", "") or ""
            before = old.get(name)
            if before is None or before[1] != entry[1]:
                if before is not None:  # same name, new CreationGUID: re-created
                    res.add(self._event(ACCOUNT_REMOVED, now, name, org=org, resource=name),
                            "account_removed")
                res.add(self._event(ACCOUNT_NEW, now, self.redactor.profile(profile), org=org,
                                    resource=name), "account_new")
                continue
            if before[0] != entry[0]:
                res.add(self._event(ACCOUNT_UPDATED, now, self.redactor.profile(profile),
                                    org=org, resource=name), "account_updated")
            devices = profile.get("Devices") if isinstance(profile.get("Devices"), dict) else {}
            for dev in sorted(set(entry[2]) - set(before[2])):
                res.add(self._event(DEVICE_NEW, now, devices.get(dev), actor=name, org=org,
                                    resource=dev), "device_new")
            for dev in sorted(set(before[2]) - set(entry[2])):
                res.add(self._event(DEVICE_REMOVED, now, None, actor=name, org=org,
                                    resource=dev), "device_removed")
        for name in sorted(set(old) - set(current)):
            res.add(self._event(ACCOUNT_REMOVED, now, name, resource=name), "account_removed")
        tr.accounts = current
        tr.changed = True


_NAMES: Final = {v: k for k, v in SEVT.items()}
