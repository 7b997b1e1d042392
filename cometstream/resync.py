"""Remedial sync: after every (re)connect, catch up through the admin API on what was missed.

Comet drops a client that drains too slowly, and a client that is down misses everything; the API
Guide's answer is a "remedial sync using the standard Comet Server APIs". Two parts:

:class:`Tracker` keeps what has been **delivered** (acknowledged by every sink), in memory and in
the checkpoint: the dedup window, the watermark (server time up to which every sink acknowledged
every event), the jobs seen running, the account digests and the device IDs. The daemon tells it
about every event it publishes (``admit`` → ``published``); each event's effect on that state is
applied only when the pipeline reports it acknowledged (``settle``), so a crash before delivery
never makes the next sync skip anything.

:class:`Resyncer` runs one catch-up (comet-api.md §14) and hands each synthesized event to the
daemon as it goes (``emit``), a day of jobs at a time:

- jobs: ``get-jobs-for-date-range(watermark - overlap, now)`` plus ``(0, 0)`` (every incomplete
  job); jobs believed running and in neither list are re-checked with ``get-job-properties``
  (a job cancelled from the web UI may emit no event). A completed job not yet delivered becomes a
  synthesized ``SEVT_JOB_COMPLETED``; a running job not seen before a ``SEVT_JOB_NEW``.
- accounts: ``list-users-full`` diffed against the stored digests, which leave out the statistics
  that change after every job and the device list: ``SEVT_ACCOUNT_NEW`` / ``_UPDATED`` /
  ``_REMOVED`` (a changed ``CreationGUID`` is REMOVED then NEW); devices: the set of device IDs
  across all profiles against the stored one, ``SEVT_DEVICE_NEW`` / ``_REMOVED``.
- the first sync of a process without a checkpoint only records a baseline.
- a new ``ServerStartHash`` (the server restarted) widens the job window.

Synthesized events have the StreamableEvent shape (Actor, OwnerOrganizationID, ResourceID, Type,
Timestamp, TypeString, Data), origin ``resync``, and server-clock timestamps.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final

import orjson
import structlog

from .api import AdminClient
from .constants import SEVT
from .errors import ApiError
from .events import Event, completion_key, parse_raw
from .redact import Redactor
from .state import Checkpoint, Dedup, fingerprint, profile_digest

__all__ = ["RESTART_WINDOW", "ResyncResult", "Resyncer", "Tracker", "account_entry"]

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
#: the job window is read a day at a time
CHUNK: Final = 86400
#: timestamps more than this far in the server's future are not trusted for the watermark
_FUTURE_SLACK: Final = 60
_LIVE_LAG: Final = 5

Action = tuple[Any, ...] | None
ServerClock = Callable[[], float]


def account_entry(profile: dict[str, Any]) -> list[Any]:
    """What the checkpoint keeps of a profile: [digest without statistics and devices, CreationGUID]."""
    return [profile_digest(profile), profile.get("CreationGUID", "") or ""]


def _timestamp(doc: dict[str, Any], ev: Event) -> int:
    """What the tracker records as an event's time: the server's ``Timestamp``, or when it was
    received if the server gave none."""
    ts = doc.get("Timestamp")
    return ts if type(ts) is int and ts else int(ev.received_at)


def _devices_of(users: dict[str, dict[str, Any]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, profile in users.items():
        devices = profile.get("Devices")
        if isinstance(devices, dict):
            for dev in devices:
                out[str(dev)] = name
    return out


class Tracker:
    """What has been delivered; the in-memory side of the checkpoint."""

    def __init__(self, cp: Checkpoint | None = None, *, dedup: Dedup | None = None,
                 clock: ServerClock = time.time) -> None:
        cp = cp or Checkpoint()
        self.clock = clock
        self.has_checkpoint = cp.watermark > 0
        self.watermark = cp.watermark
        self.server_start_hash = cp.server_start_hash
        self.running_jobs: dict[str, list[Any]] = dict(cp.running_jobs)
        #: username -> [digest, CreationGUID], or the bytes of the account event delivered
        #: last, digested on demand (:meth:`account_entries`)
        self.accounts: dict[str, list[Any] | bytes] = dict(cp.accounts)
        self.devices: dict[str, str] = dict(cp.devices)
        self.accounts_baseline = cp.accounts_baseline
        self.dedup = dedup or Dedup()
        self.dedup.load(cp.dedup)
        #: published, not yet acknowledged by every sink: (seq, dedup fingerprint or None,
        #: timestamp, action)
        self._pending: deque[tuple[int, int | None, int, Action]] = deque()
        #: the pending timestamps' running minimum, (seq, timestamp) with rising timestamps: the
        #: oldest pending timestamp without a scan of every pending event at each settle
        self._low: deque[tuple[int, int]] = deque()
        #: a resync's account/device snapshot, committed once its events are acknowledged
        self._staged: tuple[int, dict[str, list[Any]], dict[str, str]] | None = None
        #: True until a resync has covered the current gap: the watermark must not pass it
        self.frozen = self.has_checkpoint
        #: server time of this process's first HELLO (the baseline's horizon), 0 = not yet
        self.baseline_before = 0
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

    @staticmethod
    def job_event(ev: Event) -> tuple[int | None, int, Action]:
        """A job event's dedup fingerprint, timestamp (as :meth:`published` takes it) and
        tracked-state change, from one look at its data (the hot path: job events are most of
        the stream). As ``dedup_key``/``action``; (None, 0, None) for a job without a GUID."""
        doc = ev.doc
        data = doc.get("Data")
        if type(data) is not dict:
            return None, 0, None
        guid = data.get("GUID")
        if type(guid) is not str or not guid:
            return None, 0, None
        ts = _timestamp(doc, ev)
        if ev.type == JOB_COMPLETED:
            end = data.get("EndTime")
            key = ev._key = f"{JOB_COMPLETED}:{guid}:{end if type(end) is int else 0}"
            return fingerprint(key), ts, ("job_done", guid)
        user = data.get("Username")
        start = data.get("StartTime")
        key = ev._key = f"{JOB_NEW}:{guid}"  # kept: a sink may ask once ``doc`` is released
        return fingerprint(key), ts, ("job_new", guid, user if type(user) is str else "",
                                      start if type(start) is int else 0)

    def published(self, ev: Event, key: str | int | bool | None, action: Action) -> None:
        """Record a published event: its dedup key (or fingerprint; None/True for none) and
        ``action`` (from :meth:`action`, taken before redaction)."""
        ts = _timestamp(ev.doc, ev)
        if key is None or key is True:
            self._pending.append((ev.seq, None, ts, action))
            self._track_low(ev.seq, ts)
        else:
            self.published_job(ev.seq, fingerprint(key), ts, action)  # type: ignore[arg-type]

    def published_job(self, seq: int, fp: int, ts: int, action: Action) -> None:
        """:meth:`published` for a job event whose fingerprint, timestamp (a positive int) and
        action are known (:meth:`job_event`, or the resync that synthesized it)."""
        self.dedup.inflight[fp] = seq
        self._pending.append((seq, fp, ts, action))
        self._track_low(seq, ts)

    def _track_low(self, seq: int, ts: int) -> None:
        """The running minimum of pending timestamps (the watermark may not pass it)."""
        low = self._low
        while low and low[-1][1] >= ts:
            low.pop()
        low.append((seq, ts))

    @staticmethod
    def action(ev: Event) -> Action:
        """The change this event makes to the tracked state, applied once it is delivered."""
        t = ev.type
        if t == JOB_NEW or t == JOB_COMPLETED:
            job = ev.job
            guid = job.get("GUID") if job else None
            if isinstance(guid, str) and guid:
                if t == JOB_NEW:
                    user = job.get("Username")  # type: ignore[union-attr]
                    start = job.get("StartTime")  # type: ignore[union-attr]
                    return ("job_new", guid, user if isinstance(user, str) else "",
                            start if type(start) is int else 0)
                return ("job_done", guid)
            return None
        if ev.origin != "stream":
            return None  # a resync stages its account/device state as a whole
        data = ev.data
        if t == ACCOUNT_NEW or t == ACCOUNT_UPDATED:
            if isinstance(data, dict) and isinstance(data.get("Username"), str):
                # the server's bytes, not yet redacted: digested only when the checkpoint or a
                # resync needs it (see account_entries)
                return ("account", data["Username"], ev.raw)
        elif t == ACCOUNT_REMOVED:
            name = data if isinstance(data, str) else (
                data.get("Username") if isinstance(data, dict) else None)
            name = name or ev.doc.get("ResourceID")
            if isinstance(name, str) and name:
                return ("account_removed", name)
        elif t == DEVICE_NEW or t == DEVICE_REMOVED:
            dev = ev.doc.get("ResourceID")
            if isinstance(dev, str) and dev:
                actor = ev.doc.get("Actor")
                return ("device", dev, t == DEVICE_NEW, actor if isinstance(actor, str) else "")
        return None

    def _apply(self, action: tuple[Any, ...]) -> None:
        kind = action[0]
        if kind == "job_new":
            self.running_jobs[action[1]] = [action[2], action[3]]
        elif kind == "job_done":
            self.running_jobs.pop(action[1], None)
        elif kind == "account":
            self.accounts[action[1]] = action[2]
        elif kind == "account_removed":
            self.accounts.pop(action[1], None)
        elif kind == "device":
            if action[2]:
                self.devices[action[1]] = action[3]
            else:
                self.devices.pop(action[1], None)

    def account_entries(self) -> dict[str, list[Any]]:
        """The accounts' checkpoint entries. A profile's digest (tens of microseconds for a real
        profile) is taken here rather than per event: an account updated after every job then
        costs one digest per checkpoint, however many updates it had."""
        accounts = self.accounts
        for name, entry in accounts.items():
            if type(entry) is bytes:
                data = parse_raw(entry).get("Data")
                accounts[name] = account_entry(data) if isinstance(data, dict) else ["", ""]
        return accounts  # type: ignore[return-value]

    def stage_accounts(self, upto_seq: int, accounts: dict[str, list[Any]],
                       devices: dict[str, str]) -> None:
        """A resync's snapshot: committed once every event up to ``upto_seq`` is delivered."""
        self._staged = (upto_seq, accounts, devices)

    # --- acknowledgements --------------------------------------------------------------------------
    def settle(self, delivered_through: int, *, live_until: float | None) -> None:
        """Apply the acknowledged events, move their keys into the dedup window, and advance the
        watermark. ``live_until``: server time up to which the live stream is known complete
        (connected, caught up, and heard from), or None."""
        pending = self._pending
        if pending and pending[0][0] <= delivered_through:
            # a server bug (or clock) must not push the watermark into the future for good
            latest = int(self.clock()) + _FUTURE_SLACK
            acked = self.dedup.acked_fp
            running = self.running_jobs
            newest = self.newest_acked
            while pending and pending[0][0] <= delivered_through:
                _seq, fp, ts, action = pending.popleft()
                if ts > latest:
                    ts = latest
                if fp is not None:
                    acked(fp, ts)
                if action is not None:
                    kind = action[0]  # the job cases of _apply inline: they are the bulk
                    if kind == "job_done":
                        running.pop(action[1], None)
                    elif kind == "job_new":
                        running[action[1]] = [action[2], action[3]]
                    else:
                        self._apply(action)
                if ts > newest:
                    newest = ts
            self.newest_acked = newest
            self.changed = True
        low = self._low
        while low and low[0][0] <= delivered_through:
            low.popleft()
        staged = self._staged
        if staged is not None and staged[0] <= delivered_through:
            self.accounts, self.devices = staged[1], staged[2]
            self._staged = None
            self.changed = True
        if self.frozen:
            return
        if pending:
            candidate = low[0][1] - 1  # the oldest timestamp still pending
        else:
            candidate = self.newest_acked
            if live_until is not None:
                candidate = max(candidate, int(live_until) - _LIVE_LAG)
        candidate = min(candidate, int(self.clock()))
        if candidate > self.watermark:
            self.watermark = candidate
            self.changed = True
        self.dedup.prune(self.watermark)

    def drop_pending(self) -> None:
        """Events that will never be acknowledged (dropped at shutdown): forget them."""
        for _seq, key, _ts, _a in self._pending:
            if key is not None:
                self.dedup.forget_inflight(key)
        self._pending.clear()
        self._low.clear()
        self._staged = None

    def snapshot(self) -> Checkpoint:
        self.changed = False
        return Checkpoint(
            watermark=self.watermark,
            server_start_hash=self.server_start_hash,
            running_jobs=dict(self.running_jobs),
            accounts=dict(self.account_entries()),
            devices=dict(self.devices),
            accounts_baseline=self.accounts_baseline,
            dedup=self.dedup.dump(),
        )


class ResyncResult:
    def __init__(self) -> None:
        self.count = 0
        self.kinds: dict[str, int] = {}
        self.baseline = False
        self.window: tuple[int, int] = (0, 0)
        #: jobs this sync reported completed, and accounts it reported (username -> digest):
        #: their held live events would repeat what it said
        self.completed: set[str] = set()
        self.accounts: dict[str, str] = {}
        self.staged: tuple[dict[str, list[Any]], dict[str, str]] | None = None


#: hands one synthesized event to the daemon (dedup, tracking, redaction, pipeline); returns
#: an awaitable only when a sink's queue is full
Emit = Callable[[Event], Awaitable[None] | None]
#: the same for a synthesized job event, with what the sync already knows of it: its dedup
#: fingerprint, timestamp and tracked-state change (:meth:`Tracker.job_event` would find the same)
EmitJob = Callable[[Event, int, int, Action], Awaitable[None] | None]
#: a job event to synthesize: (timestamp, type, BackupJobDetail, username, organization,
#: GUID, dedup key, its fingerprint, action)
_Plan = tuple[int, int, dict[str, Any], str, str, str, str, int, Action]
#: synthesized job events are handed over in runs of this many before the sinks get a turn
_RUN: Final = 1024


class Resyncer:
    """Computes the catch-up events for one (re)connect and hands them to ``emit`` in order."""

    def __init__(self, api: AdminClient, tracker: Tracker, *, server: str, overlap: float,
                 redactor: Redactor, clock: ServerClock = time.time,
                 held: Callable[[str], bool] = lambda key: False) -> None:
        self.api = api
        #: whether a live event with this dedup key is held behind the sync: it is the better
        #: copy (the server's own bytes), so the sync leaves that job to it
        self.held = held
        self.tracker = tracker
        self.server = server
        self.overlap = overlap
        self.redactor = redactor
        self.clock = clock  # the server's clock (ours plus the skew seen in the HELLO)
        #: the start of a job event's line, per (type, actor, organization)
        self._heads: dict[tuple[int, str, str], bytes] = {}

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
        return Event.synthesize(doc, origin="resync", received_at=time.time(), server=self.server)

    def _job_event(self, type_: int, ts: int, job: dict[str, Any], user: str, org: str,
                   guid: str) -> Event:
        """``_event(type_, ts, job, actor=user, org=org, resource=guid)``, with the same document
        and the same bytes (orjson's compact encoding of it), assembled around the job's own
        encoding: one exactly sized line. (orjson's result for a ~1 kB document is a larger
        allocation; 100,000 of them queued cost more in page faults than the encoding itself.)"""
        if type(org) is not str:  # (a server's odd OrganizationID: encoded as it is)
            return self._event(type_, ts, job, actor=user, org=org, resource=guid)
        head = self._heads.get((type_, user, org))
        if head is None:
            head = self._heads[(type_, user, org)] = (
                b'{"Actor":' + orjson.dumps(user) + b',"OwnerOrganizationID":' + orjson.dumps(org)
                + b',"ResourceID":')
            if len(self._heads) > 10_000:  # bounded: one per (type, user, organization)
                self._heads.clear()
        raw = b"".join((head, orjson.dumps(guid), _TYPE_TS[type_], b"%d" % ts, _TYPE_DATA[type_],
                        orjson.dumps(job), b"}"))
        doc = {"Actor": user, "OwnerOrganizationID": org, "ResourceID": guid, "Type": type_,
               "Timestamp": ts, "TypeString": _NAMES[type_], "Data": job}
        return Event(raw, doc, type_, "resync", time.time(), self.server)

    async def run(self, hello: dict[str, Any], emit: Emit, emit_job: EmitJob) -> ResyncResult:
        tr = self.tracker
        res = ResyncResult()
        now = int(self.clock())
        start_hash = hello.get("ServerStartHash") if isinstance(hello.get("ServerStartHash"), str) else ""
        restarted = bool(tr.server_start_hash and start_hash and start_hash != tr.server_start_hash)

        users = await self.api.list_users_full()
        orgs = {name: p.get("OrganizationID", "") or "" for name, p in users.items()}
        incomplete = await self.api.jobs_for_date_range(0, 0)
        if not tr.has_checkpoint:
            await self._baseline(incomplete, res, now)
        # after a baseline too: what happened since this process's first HELLO is ours (a
        # baseline that comes late, after a failed first sync and a gap, must not skip it)
        await self._jobs(incomplete, orgs, res, now, restarted and not res.baseline, emit_job)
        await self._accounts(users, res, emit)
        if start_hash:
            tr.server_start_hash = start_hash
        tr.has_checkpoint = True
        tr.changed = True
        return res

    async def _baseline(self, incomplete: list[dict[str, Any]], res: ResyncResult,
                        now: int) -> None:
        """First start: what happened before it is history (`backfill`'s job). Record the running
        jobs, and the completions of the last `overlap` seconds as if delivered, so that the next
        sync's overlap does not replay them."""
        tr = self.tracker
        res.baseline = True
        # strictly before this process's first HELLO: a job that ended after it has its live
        # event held behind this sync (or delivered since), it is not history
        horizon = tr.baseline_before or now
        for job in incomplete:
            guid = job.get("GUID")
            user, start = job.get("Username"), job.get("StartTime")
            # started before the first HELLO: history; after it, the sync reports its start
            if isinstance(guid, str) and guid and not job.get("EndTime") \
                    and type(start) is int and start < horizon:
                tr.running_jobs[guid] = [user if isinstance(user, str) else "", start]
        since = max(0, horizon - int(self.overlap))
        res.window = (since, horizon)
        for job in await self.api.jobs_for_date_range(since, horizon):
            guid, end = job.get("GUID"), job.get("EndTime")
            if isinstance(guid, str) and guid and type(end) is int and 0 < end < horizon:
                tr.dedup.acked(completion_key(guid, end), end)
        tr.watermark = max(tr.watermark, horizon - 1)

    async def _jobs(self, incomplete: list[dict[str, Any]], orgs: dict[str, str],
                    res: ResyncResult, now: int, restarted: bool, emit_job: EmitJob) -> None:
        tr = self.tracker
        window = self.overlap
        if restarted:
            window = max(window, RESTART_WINDOW)
            log.info("server restarted since the checkpoint: widening the resync window",
                     server=self.server, window=window)
        since = max(0, tr.watermark - int(window))
        end = now + 60
        res.window = (since, end)
        found: set[str] = set()
        # a day at a time, oldest first: bounded responses, and events go out in time order
        start = since
        while start < end:
            stop = min(start + CHUNK, end)
            # the chunk's jobs and events are hundreds of thousands of objects that live until
            # it is done and are freed by reference counting: the cyclic collector, left on,
            # would walk them all again and again (a third of a large sync's time)
            with _gc_paused():
                await self._chunk(start, stop, stop >= end, incomplete, found, res, orgs,
                                  emit_job)
            start = stop

    async def _chunk(self, start: int, stop: int, last: bool, incomplete: list[dict[str, Any]],
                     found: set[str], res: ResyncResult, orgs: dict[str, str],
                     emit_job: EmitJob) -> None:
        """One chunk of the job window: its completions, and in the ``last`` one the running
        jobs too. ``found``: the GUIDs of the chunks before."""
        tr = self.tracker
        chunk = await self.api.jobs_for_date_range(start, stop)
        if last:
            chunk = [*chunk, *incomplete]
        jobs: dict[str, dict[str, Any]] = {}
        for job in chunk:
            guid = job.get("GUID")
            if isinstance(guid, str) and guid and guid not in found:
                ended = job.get("EndTime")
                # a completed job belongs to the chunk it ended in (it is listed in the one
                # it started in too); running ones to the last chunk
                if type(ended) is int and ended > 0 and not last and not start <= ended < stop:
                    continue
                jobs[guid] = job
        if last:
            for guid in [g for g in tr.running_jobs if g not in jobs and g not in found]:
                rechecked = await self._recheck(guid)
                if rechecked is not None:
                    jobs[guid] = rechecked
        found.update(jobs)
        await self._emit_jobs(self._job_plans(jobs.values(), res, orgs), emit_job)

    async def _emit_jobs(self, plans: list[_Plan], emit_job: EmitJob) -> None:
        """Synthesize and hand over the chunk's job events, oldest first, each as it is made
        (no list of events). The sinks get a turn every ``_RUN`` events, so they write while
        the rest is synthesized."""
        event = self._job_event
        for i, (ts, type_, job, user, org, guid, key, fp, action) in enumerate(plans, 1):
            ev = event(type_, ts, job, user, org, guid)
            ev._key = key  # as Tracker.job_event does: a sink may ask once ``doc`` is released
            waiting = emit_job(ev, fp, ts, action)
            if waiting is not None:
                await _wait_for_room(waiting)
            elif not i % _RUN:
                await asyncio.sleep(0)

    async def _recheck(self, guid: str) -> dict[str, Any] | None:
        """A job believed running that no list returned: ask for it by GUID."""
        try:
            job = await self.api.job_properties(guid)
        except ApiError as exc:
            if exc.retryable or exc.status != 400:
                raise  # the API is down or refuses us: not evidence that the job is gone
            log.info("job believed running is gone", job=guid, error=str(exc))
            self.tracker.running_jobs.pop(guid, None)
            self.tracker.changed = True
            return None
        return job if isinstance(job.get("GUID"), str) else None

    def _job_plans(self, jobs: Any, res: ResyncResult, orgs: dict[str, str]) -> list[_Plan]:
        """The job events to synthesize for ``jobs`` (those neither delivered, in flight, nor
        held), sorted by timestamp (stable: ties keep the chunk's order)."""
        tr = self.tracker
        delivered, inflight = tr.dedup.delivered, tr.dedup.inflight
        running = tr.running_jobs
        held = self.held
        completed = res.completed
        out: list[_Plan] = []
        n_completed = n_new = 0
        for job in jobs:
            guid: str = job["GUID"]
            user = job.get("Username")
            if not isinstance(user, str):
                user = ""
            end = job.get("EndTime")
            if type(end) is int and end > 0:
                key = f"{JOB_COMPLETED}:{guid}:{end}"  # completion_key(guid, end)
                fp = fingerprint(key)
                if fp not in delivered and fp not in inflight and not held(key):
                    out.append((end, JOB_COMPLETED, job, user, orgs.get(user, ""), guid, key,
                                fp, ("job_done", guid)))
                    if not n_completed:
                        res.kinds.setdefault("job_completed", 0)  # (the kinds' order as found)
                    n_completed += 1
                    completed.add(guid)
            elif guid not in running:
                key = f"{JOB_NEW}:{guid}"
                fp = fingerprint(key)
                if fp not in delivered and fp not in inflight and not held(key):
                    start = job.get("StartTime")
                    start = start if type(start) is int else 0
                    ts = start if start > 0 else int(self.clock())
                    out.append((ts, JOB_NEW, job, user, orgs.get(user, ""), guid, key, fp,
                                ("job_new", guid, user, start)))
                    if not n_new:
                        res.kinds.setdefault("job_new", 0)
                    n_new += 1
        if n_completed:
            res.kinds["job_completed"] += n_completed
        if n_new:
            res.kinds["job_new"] += n_new
        res.count += n_completed + n_new
        out.sort(key=_first)
        return out

    async def _accounts(self, users: dict[str, dict[str, Any]], res: ResyncResult,
                        emit: Emit) -> None:
        tr = self.tracker
        now = int(self.clock())
        current = {name: account_entry(p) for name, p in users.items()}
        devices = _devices_of(users)
        if not tr.accounts_baseline:
            tr.accounts, tr.devices = current, devices
            tr.accounts_baseline = True
            tr.changed = True
            return
        old, old_devices = tr.account_entries(), tr.devices

        async def send(type_: int, kind: str, data: Any, *, org: str = "", resource: str = "",
                       actor: str = "") -> None:
            res.kinds[kind] = res.kinds.get(kind, 0) + 1
            res.count += 1
            waiting = emit(self._event(type_, now, data, org=org, resource=resource, actor=actor))
            if waiting is not None:
                await waiting

        for name, entry in current.items():
            profile = users[name]
            org = profile.get("OrganizationID", "") or ""
            before = old.get(name)
            if before is None or before[1] != entry[1]:
                if before is not None:  # same name, new CreationGUID: re-created
                    await send(ACCOUNT_REMOVED, "account_removed", name, org=org, resource=name)
                await send(ACCOUNT_NEW, "account_new", self.redactor.profile(profile), org=org,
                           resource=name)
                res.accounts[name] = entry[0]
            elif before[0] != entry[0]:
                await send(ACCOUNT_UPDATED, "account_updated", self.redactor.profile(profile),
                           org=org, resource=name)
                res.accounts[name] = entry[0]
        for name in sorted(set(old) - set(current)):
            await send(ACCOUNT_REMOVED, "account_removed", name, resource=name)
        for dev in sorted(set(devices) - set(old_devices)):
            owner = devices[dev]
            config = users[owner].get("Devices", {}).get(dev)
            await send(DEVICE_NEW, "device_new", self.redactor.profile(config)
                       if isinstance(config, dict) else config, actor=owner,
                       org=orgs_of(users, owner), resource=dev)
        for dev in sorted(set(old_devices) - set(devices)):
            owner = old_devices[dev]
            await send(DEVICE_REMOVED, "device_removed", None, actor=owner,
                       org=orgs_of(users, owner), resource=dev)
        res.staged = (current, devices)


_gc_pausers = 0
_gc_was_enabled = False


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the block (which may await); a count, so that
    overlapping pauses (a cancelled sync's cleanup, the next one) turn it back on only at the
    end of the last, and only if it was on."""
    global _gc_pausers, _gc_was_enabled
    if not _gc_pausers:
        _gc_was_enabled = gc.isenabled()
        gc.disable()
    _gc_pausers += 1
    try:
        yield
    finally:
        _gc_pausers -= 1
        if not _gc_pausers and _gc_was_enabled:
            gc.enable()


@contextlib.contextmanager
def _gc_resumed() -> Iterator[None]:
    """Within a pause, the collector back on (if it was) for a wait that may be long."""
    if not (_gc_pausers and _gc_was_enabled):
        yield
        return
    gc.enable()
    try:
        yield
    finally:
        if _gc_pausers:
            gc.disable()


#: a wait for queue room longer than this is a sink down, not one catching up
_LONG_WAIT: Final = 1.0


async def _wait_for_room(waiting: Awaitable[None]) -> None:
    """Wait until a full queue has room again: within a collector pause, which a short wait (a
    sink or the spool catching up, many times in a large sync) keeps, and a long one (a sink
    down) suspends."""
    if not (_gc_pausers and _gc_was_enabled):
        await waiting
        return
    task = asyncio.ensure_future(waiting)
    try:
        done, _ = await asyncio.wait((task,), timeout=_LONG_WAIT)
        if not done:
            with _gc_resumed():
                await task
        else:
            task.result()
    except asyncio.CancelledError:
        task.cancel()
        raise


def _first(plan: _Plan) -> int:
    return plan[0]


def orgs_of(users: dict[str, dict[str, Any]], name: str) -> str:
    profile = users.get(name)
    return (profile.get("OrganizationID", "") or "") if isinstance(profile, dict) else ""


_NAMES: Final = {v: k for k, v in SEVT.items()}
#: a job event's line around its Timestamp and Data, per type (see Resyncer._job_event)
_TYPE_TS: Final = {t: b',"Type":%d,"Timestamp":' % t for t in (JOB_NEW, JOB_COMPLETED)}
_TYPE_DATA: Final = {t: b',"TypeString":' + orjson.dumps(_NAMES[t]) + b',"Data":'
                     for t in (JOB_NEW, JOB_COMPLETED)}
