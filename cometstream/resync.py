"""Remedial sync: after every (re)connect, catch up through the admin API on what was missed.

Comet drops a client that drains too slowly, and a client that is down misses everything; the API
Guide's answer is a "remedial sync using the standard Comet Server APIs". What has been kept (the
dedup window, the watermark, the jobs seen running, the account digests and device IDs) is the
:class:`~cometstream.delivery.tracker.Tracker`'s, stored in the ledger.

The :class:`Resyncer` runs one catch-up and hands each synthesized event to the
daemon as it goes (``emit``), a day of jobs at a time:

- jobs: ``get-jobs-for-date-range(watermark - overlap, now)`` plus ``(0, 0)`` (every incomplete
  job); jobs believed running and in neither list are re-checked with ``get-job-properties``
  (a job cancelled from the web UI may emit no event). A completed job not yet delivered becomes a
  synthesized ``SEVT_JOB_COMPLETED``; a running job not seen before a ``SEVT_JOB_NEW``.
- accounts: ``list-users-full`` diffed against the stored digests, which leave out the statistics
  that change after every job and the device list: ``SEVT_ACCOUNT_NEW`` / ``_UPDATED`` /
  ``_REMOVED`` (a changed ``CreationGUID`` is REMOVED then NEW); devices: the set of device IDs
  across all profiles against the stored one, ``SEVT_DEVICE_NEW`` / ``_REMOVED``.
- the first sync of a daemon without a watermark in its ledger only records a baseline.
- a new ``ServerStartHash`` (the server restarted) widens the job window.

Synthesized events have the StreamableEvent shape (Actor, OwnerOrganizationID, ResourceID, Type,
Timestamp, TypeString, Data), origin ``resync``, and server-clock timestamps.
"""

from __future__ import annotations

import asyncio
import bisect
import ctypes
import sys
import time
from array import array
from collections.abc import Awaitable, Callable, Mapping
from operator import itemgetter
from typing import Any, Final, TypeVar

import orjson
import structlog

from .api import JOBS_PATH, USERS_PATH, AdminClient, ProfileMap
from .constants import SEVT
from .delivery.identity import (
    ACCOUNT_NEW,
    ACCOUNT_REMOVED,
    ACCOUNT_UPDATED,
    DEVICE_NEW,
    DEVICE_REMOVED,
    JOB_NEW,
    Action,
    account_entry,
    completion_key,
    fingerprint,
)
from .delivery.tracker import Tracker
from .errors import ApiError, ResponseTooLarge
from .events import JOB_COMPLETED, Event, dump_json
from .redact import Redactor
from .runtime import gc_paused

__all__ = ["RESTART_WINDOW", "ResyncResult", "Resyncer"]

log = structlog.get_logger("cometstream.resync")

#: after a server restart the job window reaches back at least this far
RESTART_WINDOW: Final = 3600.0
#: the longest span of the job window asked for in one call
CHUNK: Final = 86400
#: the shortest span the job list is asked for when a longer one's answer is too large
MIN_CHUNK: Final = 1
#: the first span asked for; the next ones are sized by what the previous answers held
FIRST_SPAN: Final = 300
#: the size of job-list answer the spans aim at: a span's jobs are parsed, planned and handed
#: over before the next is asked for, so the sync's memory follows this, not the gap
SPAN_BYTES: Final = 4 * 1024 * 1024
#: a span grows at most this many times over the previous one (a sparse stretch may be
#: followed by a dense one)
SPAN_GROWTH: Final = 4
#: a long sync says how far it is at most this often (log line, systemd STATUS)
PROGRESS_INTERVAL: Final = 5.0
ServerClock = Callable[[], float]
_T = TypeVar("_T")
#: a sync that read more than this (bytes of answers) gives the freed memory back at its end
TRIM_AFTER_BYTES: Final = 16 * 1024 * 1024


def _ended(status: object) -> bool:
    """A job Status of a finished job (5xxx success, 7xxx warning, quota or error), whatever its
    EndTime says; 6xxx is running, 0 or a non-number unknown."""
    return type(status) is int and status >= 5000 and not 6000 <= status <= 6999


def _time(value: object) -> int:
    """A job's StartTime or EndTime as a synthesized event's timestamp: a positive integer
    within 64 bits (what the ledger can keep; as the live path's rule), else 0."""
    return value if type(value) is int and 0 < value < 1 << 63 else 0


#: profiles looked at between two turns given to the event loop
_PROFILES_PER_TURN: Final = 500


async def _survey(users: Mapping[str, dict[str, Any]]) -> tuple[
        dict[str, str], dict[str, list[Any]], dict[str, str]]:
    """One look at every profile (each is parsed when read, from the answer's bytes): each
    user's organization, account entry (see :func:`~.delivery.identity.account_entry`) and
    devices ({device ID: owner}), in objects of their own (see Resyncer._accounts)."""
    orgs: dict[str, str] = {}
    entries: dict[str, list[Any]] = {}
    devices: dict[str, str] = {}
    # a ProfileMap's profiles are parsed for each reading: ours to digest in place (a plain
    # map's are the answer itself, which another reader may share)
    ours = isinstance(users, ProfileMap)
    for i, (name, profile) in enumerate(users.items(), 1):
        orgs[name] = profile.get("OrganizationID", "") or ""
        its_devices = profile.get("Devices")
        if isinstance(its_devices, dict):
            for dev in its_devices:
                devices[str(dev)] = name
        entries[name] = account_entry(profile, owned=ours)  # (last: it may strip the profile)
        if not i % _PROFILES_PER_TURN:
            await asyncio.sleep(0)  # (the stream is read meanwhile)
    return _fresh(orgs), _fresh(entries), _fresh(devices)


#: a GUID's 64-bit fingerprint within this process (a GuidSet never leaves it): its string's
#: hash where that has 64 bits, computed once per string (a sync's GUIDs were hashed already,
#: as keys of its dicts), else the dedup window's BLAKE2b fingerprint (0.65 µs a GUID)
_guid_fp: Final[Callable[[str], int]] = hash if sys.hash_info.width >= 64 else fingerprint


class GuidSet:
    """The GUIDs of the jobs a sync reported completed, as their 64-bit fingerprints in one
    array: 8 bytes each. (A set of the strings took about 120 bytes each: a sync of a million
    completions kept some 120 MB alive, until the next sync.) Sorted once, when first asked."""

    __slots__ = ("_fps", "_sorted")

    def __init__(self) -> None:
        self._fps = array("q")
        self._sorted = True

    def add(self, guid: str) -> None:
        self._fps.append(_guid_fp(guid))
        self._sorted = False

    def extend(self, guids: list[str]) -> None:
        if guids:
            self._fps.extend(map(_guid_fp, guids))
            self._sorted = False

    def __len__(self) -> int:
        return len(self._fps)

    def __contains__(self, guid: object) -> bool:
        if not isinstance(guid, str):
            return False
        fps = self._fps
        if not self._sorted:
            fps = self._fps = array("q", sorted(fps))
            self._sorted = True
        fp = _guid_fp(guid)
        i = bisect.bisect_left(fps, fp)
        return i < len(fps) and fps[i] == fp


class ResyncResult:
    def __init__(self) -> None:
        self.count = 0
        self.kinds: dict[str, int] = {}
        self.baseline = False
        self.window: tuple[int, int] = (0, 0)
        #: how many times a span of the job window was asked for again in halves
        self.split = 0
        #: jobs this sync reported completed, and accounts it reported (username -> digest):
        #: their held live events would repeat what it said
        self.completed = GuidSet()
        self.accounts: dict[str, str] = {}
        self.staged: tuple[dict[str, list[Any]], dict[str, str]] | None = None
        #: how far the job window has been read (server time): ``window[0]`` until the first
        #: span is in, ``window[1]`` at the end
        self.position = 0
        #: job-list calls made, and the largest answer among them (bytes)
        self.spans = 0
        self.largest_answer = 0
        #: bytes of answers read (the account list and the job spans)
        self.read_bytes = 0

    def progress(self) -> float:
        """The share of the job window read so far, 0 to 1."""
        since, end = self.window
        if end <= since:
            return 0.0
        return min(1.0, max(0.0, (self.position - since) / (end - since)))


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
                 held: Callable[[str], bool] = lambda key: False,
                 on_progress: Callable[[ResyncResult], None] | None = None) -> None:
        self.api = api
        #: called every ``progress_interval`` seconds while a long sync reads its job window
        self.on_progress = on_progress
        self.progress_interval = PROGRESS_INTERVAL
        #: the size of job-list answer the spans aim at (SPAN_BYTES)
        self.span_bytes = SPAN_BYTES
        #: the sync running now (None between syncs): its progress, for /readyz and metrics
        self.current: ResyncResult | None = None
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
                        dump_json(job), b"}"))
        doc = {"Actor": user, "OwnerOrganizationID": org, "ResourceID": guid, "Type": type_,
               "Timestamp": ts, "TypeString": _NAMES[type_], "Data": job}
        return Event(raw, doc, type_, "resync", time.time(), self.server)

    async def run(self, hello: dict[str, Any], emit: Emit, emit_job: EmitJob) -> ResyncResult:
        res = ResyncResult()
        self.current = res
        try:
            return await self._run(res, hello, emit, emit_job)
        finally:
            if self.current is res:
                self.current = None
            if res.read_bytes > TRIM_AFTER_BYTES:  # (the answers are freed by now)
                trim_heap()

    async def _run(self, res: ResyncResult, hello: dict[str, Any], emit: Emit,
                   emit_job: EmitJob) -> ResyncResult:
        tr = self.tracker
        now = int(self.clock())
        start_hash = hello.get("ServerStartHash") if isinstance(hello.get("ServerStartHash"), str) else ""
        restarted = bool(tr.server_start_hash and start_hash and start_hash != tr.server_start_hash)

        users = await self.api.list_users_full()
        res.read_bytes += self.api.answer_bytes.get(USERS_PATH, 0)
        orgs, current, devices = await _survey(users)
        incomplete = await self.api.jobs_for_date_range(0, 0)
        if not tr.has_checkpoint:
            await self._baseline(incomplete, res, now)
        # after a baseline too: what happened since this process's first HELLO is ours (a
        # baseline that comes late, after a failed first sync and a gap, must not skip it)
        await self._jobs(incomplete, orgs, res, now, restarted and not res.baseline, emit_job)
        await self._accounts(users, current, devices, orgs, res, emit)
        if start_hash:
            tr.server_start_hash = start_hash
        tr.has_checkpoint = True
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
                tr.set_running(guid, user if isinstance(user, str) else "", start)
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
        res.position = since
        # the GUIDs of the spans before that a later span may list again: jobs not yet ended
        # (or with odd times), and those the last span looks at anyway (the running ones);
        # not every job of the gap, which would grow with it
        found: set[str] = set()
        watch = {g for j in incomplete if isinstance(g := j.get("GUID"), str)}
        watch.update(tr.running_jobs)
        # a span at a time, oldest first: the events go out in time order, and each span's
        # jobs are parsed, planned and handed over before the next is asked for. A span is
        # sized by what the previous answers held (aiming at SPAN_BYTES), so memory follows
        # the span, not the gap; an answer past the client's bound is refused (and freed) and
        # the span asked for again shorter. The job list is the one answer the API lets us page.
        span = FIRST_SPAN
        start = since
        reported = time.monotonic()
        while start < end:
            stop = min(start + span, end)
            try:
                size = await self._chunk(start, stop, stop >= end, incomplete, found, res,
                                         orgs, emit_job, watch)
            except ResponseTooLarge as exc:
                if stop - start <= MIN_CHUNK:
                    raise
                # the span holds more than ``exc.limit`` bytes: at that density at least, the
                # target fits in this much
                span = max(MIN_CHUNK, min((stop - start) // SPAN_GROWTH,
                                          (stop - start) * self.span_bytes // exc.limit))
                res.split += 1
                if exc.limit >= self.api.max_jobs_response:  # (not just past the target)
                    log.warning("job list too large for one answer: asking for shorter spans",
                                server=self.server, span=span, limit_mib=exc.limit / 2**20)
                continue
            res.spans += 1
            res.read_bytes += size
            res.largest_answer = max(res.largest_answer, size)
            span = _next_span(stop - start, size, self.span_bytes)
            start = res.position = stop
            if self.on_progress is not None and \
                    time.monotonic() - reported >= self.progress_interval:
                reported = time.monotonic()
                self.on_progress(res)

    async def _chunk(self, start: int, stop: int, last: bool, incomplete: list[dict[str, Any]],
                     found: set[str], res: ResyncResult, orgs: dict[str, str],
                     emit_job: EmitJob, watch: set[str] | None = None) -> int:
        """One span of the job window: its completions, and in the ``last`` one the running
        jobs too. ``found``: the GUIDs of the spans before. Returns the size of the answer
        (bytes).

        The span's jobs and events are many objects that live until it is done and are freed
        by reference counting: the cyclic collector, left on, would walk them all again and
        again while they are made. It is paused (:func:`gc_paused`) around each synchronous
        stretch, the answer's parse included, and never across an ``await``: the loop's other
        tasks always run with the collector as it was."""
        tr = self.tracker
        # an answer far beyond the target (a dense stretch after a sparse one) is refused and
        # the span asked for again shorter, while it can be shorter
        limit = self.span_bytes * SPAN_GROWTH if stop - start > MIN_CHUNK else None
        chunk = await self.api.jobs_for_date_range(start, stop, limit=limit)
        size = self.api.answer_bytes.get(JOBS_PATH, 0)
        with gc_paused():
            jobs = self._span_jobs(chunk, incomplete if last else None, found, start, stop)
        if last:
            for guid in [g for g in tr.running_jobs if g not in jobs and g not in found]:
                rechecked = await self._recheck(guid)
                if rechecked is not None:
                    jobs[guid] = rechecked
        with gc_paused():
            if watch is None:
                found.update(jobs)
            elif not last:
                found.update(g for g, job in jobs.items()
                             if g in watch or not _settled(job, start, stop))
            del chunk  # (the plans keep the jobs they report; the rest goes now)
            plans = self._job_plans(jobs.values(), res, orgs)
        await self._emit_jobs(plans, emit_job)
        return size

    @staticmethod
    def _span_jobs(chunk: list[dict[str, Any]], incomplete: list[dict[str, Any]] | None,
                   found: set[str], start: int, stop: int) -> dict[str, dict[str, Any]]:
        """A span's jobs by GUID, without those of the spans before (``found``); with
        ``incomplete`` (the last span) the running jobs too."""
        last = incomplete is not None
        if incomplete is not None:
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
        return jobs

    async def _emit_jobs(self, plans: list[_Plan], emit_job: EmitJob) -> None:
        """Synthesize and hand over the chunk's job events, oldest first, each as it is made
        (no list of events). The sinks get a turn every ``_RUN`` events, so they write while
        the rest is synthesized; the collector is paused for each run of synthesis, not for the
        sinks' turn nor a wait for room in a full queue."""
        event = self._job_event
        n = len(plans)
        i = 0
        while i < n:
            waiting = None
            with gc_paused():
                while i < n:
                    ts, type_, job, user, org, guid, key, fp, action = plans[i]
                    i += 1
                    ev = event(type_, ts, job, user, org, guid)
                    ev.key = key  # as Tracker.job_event does: a sink may ask once ``doc`` is released
                    waiting = emit_job(ev, fp, ts, action)
                    if waiting is not None or not i % _RUN:
                        break
            if waiting is not None:
                await waiting
            elif i < n:
                await asyncio.sleep(0)

    async def _recheck(self, guid: str) -> dict[str, Any] | None:
        """A job believed running that no list returned: ask for it by GUID."""
        try:
            job = await self.api.job_properties(guid)
        except ApiError as exc:
            if exc.retryable or exc.status != 400:
                raise  # the API is down or refuses us: not evidence that the job is gone
            log.info("job believed running is gone", job=guid, error=str(exc))
            self.tracker.drop_running(guid)
            return None
        return job if isinstance(job.get("GUID"), str) else None

    def _job_plans(self, jobs: Any, res: ResyncResult, orgs: dict[str, str]) -> list[_Plan]:
        """The job events to synthesize for ``jobs`` (those neither delivered, in flight, nor
        held), sorted by timestamp (stable: ties keep the chunk's order)."""
        tr = self.tracker
        delivered, inflight = tr.dedup.delivered, tr.dedup.inflight
        running = tr.running_jobs
        held = self.held
        completed: list[str] = []  # (res.completed takes them at the end, at once)
        out: list[_Plan] = []
        n_new = 0
        for job in jobs:
            guid: str = job["GUID"]
            user = job.get("Username")
            if not isinstance(user, str):
                user = ""
            end = job.get("EndTime")
            if (type(end) is int and end > 0) or _ended(job.get("Status")):
                # (an EndTime that is not a plain positive integer — a float, beyond 64 bits,
                # negative — keys as the live path keys it: completion_key)
                key = f"{_DONE}{guid}:{end}" if type(end) is int else completion_key(guid, end)
                fp = fingerprint(key)
                if fp not in delivered and fp not in inflight and not held(key):
                    ts = end if type(end) is int and 0 < end < 1 << 63 else (
                        _time(end) or _time(job.get("StartTime")) or int(self.clock()))
                    out.append((ts, JOB_COMPLETED, job, user, orgs.get(user, ""), guid, key,
                                fp, ("job_done", guid)))
                    if not completed:
                        res.kinds.setdefault("job_completed", 0)  # (the kinds' order as found)
                    completed.append(guid)
                elif guid in running and fp in delivered:
                    # its completion is kept, yet it is believed running: its start, reported
                    # by a sync that outlasted the hold, was kept after its live completion
                    tr.drop_running(guid)
            elif guid not in running:
                key = f"{JOB_NEW}:{guid}"
                fp = fingerprint(key)
                if fp not in delivered and fp not in inflight and not held(key):
                    start = job.get("StartTime")  # (kept as the live path keeps it)
                    start = start if type(start) is int and -(1 << 63) <= start < 1 << 63 else 0
                    ts = _time(start) or int(self.clock())
                    out.append((ts, JOB_NEW, job, user, orgs.get(user, ""), guid, key, fp,
                                ("job_new", guid, user, start)))
                    if not n_new:
                        res.kinds.setdefault("job_new", 0)
                    n_new += 1
        if completed:
            res.kinds["job_completed"] += len(completed)
            res.completed.extend(completed)
        if n_new:
            res.kinds["job_new"] += n_new
        res.count += len(completed) + n_new
        out.sort(key=_first)
        return out

    async def _accounts(self, users: Mapping[str, dict[str, Any]],
                        current: dict[str, list[Any]], devices: dict[str, str],
                        orgs: dict[str, str], res: ResyncResult, emit: Emit) -> None:
        """The account and device events of what ``current`` (each user's account entry) and
        ``devices`` ({device ID: owner}), read from ``users``, say changed. What is kept past
        this sync is in objects of its own (:func:`_survey`): names and IDs taken from parsed
        profiles would pin their memory (scattered among it, a few strings keep hundreds of
        MB of freed objects' arenas from being given back)."""
        tr = self.tracker
        now = int(self.clock())
        if not tr.accounts_baseline:
            tr.replace_accounts(current, devices)
            tr.accounts_baseline = True
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
            org = orgs.get(name, "")
            before = old.get(name)
            if before is None or before[1] != entry[1]:
                if before is not None:  # same name, new CreationGUID: re-created
                    await send(ACCOUNT_REMOVED, "account_removed", name, org=org, resource=name)
                await send(ACCOUNT_NEW, "account_new", self.redactor.profile(users[name]),
                           org=org, resource=name)
                res.accounts[name] = entry[0]
            elif before[0] != entry[0]:
                await send(ACCOUNT_UPDATED, "account_updated",
                           self.redactor.profile(users[name]), org=org, resource=name)
                res.accounts[name] = entry[0]
        for name in sorted(set(old) - set(current)):
            await send(ACCOUNT_REMOVED, "account_removed", name, resource=name)
        devices_of: dict[str, Any] = {}  # read once an owner (a profile is parsed per read)
        for dev in sorted(set(devices) - set(old_devices)):
            owner = devices[dev]
            if owner not in devices_of:
                devices_of[owner] = users[owner].get("Devices", {})
            config = devices_of[owner].get(dev)
            await send(DEVICE_NEW, "device_new", self.redactor.profile(config)
                       if isinstance(config, dict) else config, actor=owner,
                       org=orgs.get(owner, ""), resource=dev)
        for dev in sorted(set(old_devices) - set(devices)):
            owner = old_devices[dev]
            await send(DEVICE_REMOVED, "device_removed", None, actor=owner,
                       org=orgs.get(owner, ""), resource=dev)
        res.staged = (current, devices)


def _fresh(value: _T) -> _T:
    """A deep copy of a JSON-like value in new objects (see Resyncer._accounts)."""
    try:
        return orjson.loads(orjson.dumps(value))  # type: ignore[no-any-return]
    except TypeError:  # (not JSON: kept as it is)
        return value


def trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc's ``malloc_trim``): after a
    large answer is freed, most of it stays in the process otherwise. Nothing elsewhere."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def _settled(job: dict[str, Any], start: int, stop: int) -> bool:
    """Whether no later span lists ``job`` again: it started, then ended, before ``stop``."""
    ended, started = job.get("EndTime"), job.get("StartTime")
    return (type(ended) is int and start <= ended < stop and type(started) is int
            and started <= ended)


def _next_span(span: int, size: int, target: int) -> int:
    """The span to ask for after one of ``span`` seconds whose answer was ``size`` bytes: sized
    to hold about ``target`` bytes at the same density, growing at most SPAN_GROWTH times."""
    grown = span * SPAN_GROWTH
    if size > 0:
        grown = min(grown, span * target // size)
    return max(MIN_CHUNK, min(CHUNK, grown))


#: a plan's timestamp, what a span's plans are sorted by
_first: Final = itemgetter(0)
_NAMES: Final = {v: k for k, v in SEVT.items()}
#: a completion's dedup key up to its GUID (completion_key's, for an integer EndTime)
_DONE: Final = f"{JOB_COMPLETED}:"
#: a job event's line around its Timestamp and Data, per type (see Resyncer._job_event)
_TYPE_TS: Final = {t: b',"Type":%d,"Timestamp":' % t for t in (JOB_NEW, JOB_COMPLETED)}
_TYPE_DATA: Final = {t: b',"TypeString":' + orjson.dumps(_NAMES[t]) + b',"Data":'
                     for t in (JOB_NEW, JOB_COMPLETED)}
