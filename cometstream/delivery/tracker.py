"""What has been kept: the in-memory side of the ledger's delivery state.

The :class:`Tracker` holds the dedup window, the watermark (server time up to which every event
has been kept), the jobs seen running, the account digests and the device IDs. The gate tells it
about every event it publishes (:meth:`published_job`, :meth:`published`); each event's effect
on that state is applied only when the event is kept (:meth:`settle`): spooled durably (disk
buffer) or acknowledged by every sink (memory buffer). So a crash before an event is kept never
makes the next sync skip it.

The ledger writes the tracker's changes in the same transaction as the events and cursors they
belong to: :meth:`diff` hands over what changed since the last commit (and forgets it),
:meth:`restore` takes it back if the commit failed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from ..events import Event, parse_raw
from ..store.state import State, StateDiff
from .identity import Action, account_entry, timestamp
from .window import Dedup

__all__ = ["Tracker"]

#: timestamps more than this far in the server's future are not trusted for the watermark
_FUTURE_SLACK: Final = 60
_LIVE_LAG: Final = 5

ServerClock = Callable[[], float]


class Tracker:
    """What has been kept; the in-memory side of the ledger."""

    def __init__(self, state: State | None = None, *, clock: ServerClock = time.time,
                 dedup: Dedup | None = None) -> None:
        st = state or State()
        self.clock = clock
        self.has_checkpoint = st.watermark > 0
        self.watermark = st.watermark
        self.server_start_hash = st.server_start_hash
        self.running_jobs: dict[str, list[Any]] = dict(st.running_jobs)
        #: username -> [digest, CreationGUID], or the bytes of the account event kept last,
        #: digested on demand (:meth:`account_entries`)
        self.accounts: dict[str, list[Any] | bytes] = dict(st.accounts)
        self.devices: dict[str, str] = dict(st.devices)
        self.accounts_baseline = st.accounts_baseline
        self.dedup = dedup or Dedup()
        self.dedup.load(st.dedup)
        if st.watermark:
            self.dedup.prune(st.watermark)  # (the ledger may hold a few rows beyond the size)
        self.dedup.journal.clear()  # (loaded rows are in the ledger already)
        #: published, not yet kept: (seq, dedup fingerprint or None, timestamp, action)
        self._pending: deque[tuple[int, int | None, int, Action]] = deque()
        #: the pending timestamps' running minimum, (seq, timestamp) with rising timestamps
        self._low: deque[tuple[int, int]] = deque()
        #: a resync's account/device snapshot, applied once its events are kept
        self._staged: tuple[int, dict[str, list[Any]], dict[str, str]] | None = None
        #: True until a resync has covered the current gap: the watermark must not pass it
        self.frozen = self.has_checkpoint
        #: server time of this process's first HELLO (the baseline's horizon), 0 = not yet
        self.baseline_before = 0
        #: the newest timestamp of any kept event
        self.newest_acked = 0
        # what changed since the last diff (keys; their values are read at diff time)
        self._dirty_jobs: set[str] = set()
        #: the running jobs as the ledger holds them: a job that started and ended between two
        #: commits (most, in a burst) costs the ledger nothing
        self._stored_jobs: dict[str, Any] = dict(self.running_jobs)
        self._dirty_accounts: set[str] = set()
        self._dirty_devices: set[str] = set()

    # --- the publish path ------------------------------------------------------------------------
    def published(self, ev: Event, action: Action) -> None:
        """A published event without a dedup key, and its ``action`` (taken before redaction)."""
        ts = timestamp(ev.doc, ev)
        self._pending.append((ev.seq, None, ts, action))
        self._track_low(ev.seq, ts)

    def published_job(self, seq: int, fp: int, ts: int, action: Action) -> None:
        """A published job event whose fingerprint, timestamp (a positive int) and action are
        known (:func:`~.identity.job_event`, or the resync that synthesized it)."""
        self.dedup.inflight[fp] = seq
        self._pending.append((seq, fp, ts, action))
        self._track_low(seq, ts)

    def _track_low(self, seq: int, ts: int) -> None:
        """The running minimum of pending timestamps (the watermark may not pass it)."""
        low = self._low
        while low and low[-1][1] >= ts:
            low.pop()
        low.append((seq, ts))

    # --- changes made by a resync ------------------------------------------------------------------
    def set_running(self, guid: str, user: str, start: int) -> None:
        self.running_jobs[guid] = [user, start]
        self._dirty_jobs.add(guid)

    def drop_running(self, guid: str) -> None:
        self.running_jobs.pop(guid, None)
        self._dirty_jobs.add(guid)

    def replace_accounts(self, accounts: dict[str, list[Any]], devices: dict[str, str]) -> None:
        self._dirty_accounts.update(self.accounts, accounts)
        self._dirty_devices.update(self.devices, devices)
        self.accounts, self.devices = dict(accounts), dict(devices)

    def _apply(self, action: tuple[Any, ...]) -> None:
        kind = action[0]
        if kind == "job_new":
            self.running_jobs[action[1]] = [action[2], action[3]]
            self._dirty_jobs.add(action[1])
        elif kind == "job_done":
            self.running_jobs.pop(action[1], None)
            self._dirty_jobs.add(action[1])
        elif kind == "account":
            self.accounts[action[1]] = action[2]
            self._dirty_accounts.add(action[1])
        elif kind == "account_removed":
            self.accounts.pop(action[1], None)
            self._dirty_accounts.add(action[1])
        elif kind == "device":
            if action[2]:
                self.devices[action[1]] = action[3]
            else:
                self.devices.pop(action[1], None)
            self._dirty_devices.add(action[1])

    def account_entries(self) -> dict[str, list[Any]]:
        """The accounts' ledger entries. A profile's digest (tens of microseconds for a real
        profile) is taken here rather than per event: an account updated after every job then
        costs one digest per commit, however many updates it had."""
        accounts = self.accounts
        for name, entry in accounts.items():
            if type(entry) is bytes:
                accounts[name] = _entry_of(entry)
        return accounts  # type: ignore[return-value]

    def stage_accounts(self, upto_seq: int, accounts: dict[str, list[Any]],
                       devices: dict[str, str]) -> None:
        """A resync's snapshot: applied once every event up to ``upto_seq`` is kept."""
        self._staged = (upto_seq, accounts, devices)

    # --- settling ----------------------------------------------------------------------------------
    def settle(self, kept_through: int, *, live_until: float | None) -> None:
        """Apply the kept events, move their keys into the dedup window, and advance the
        watermark. ``live_until``: server time up to which the live stream is known complete
        (connected, caught up, and heard from), or None."""
        pending = self._pending
        if pending and pending[0][0] <= kept_through:
            # a server bug (or clock) must not push the watermark into the future for good
            latest = int(self.clock()) + _FUTURE_SLACK
            kept: list[tuple[int, int]] = []  # (the window takes them at once)
            running = self.running_jobs
            dirty_jobs = self._dirty_jobs
            newest = self.newest_acked
            while pending and pending[0][0] <= kept_through:
                _seq, fp, ts, action = pending.popleft()
                if ts > latest:
                    ts = latest
                if fp is not None:
                    kept.append((fp, ts))
                if action is not None:
                    kind = action[0]  # the job cases of _apply inline: they are the bulk
                    if kind == "job_done":
                        running.pop(action[1], None)
                        dirty_jobs.add(action[1])
                    elif kind == "job_new":
                        running[action[1]] = [action[2], action[3]]
                        dirty_jobs.add(action[1])
                    else:
                        self._apply(action)
                if ts > newest:
                    newest = ts
            self.newest_acked = newest
            if kept:
                self.dedup.acked_all(kept)
        low = self._low
        while low and low[0][0] <= kept_through:
            low.popleft()
        staged = self._staged
        if staged is not None and staged[0] <= kept_through:
            self.replace_accounts(staged[1], staged[2])
            self._staged = None
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
        self.dedup.prune(self.watermark)

    def drop_pending(self) -> None:
        """Events that will never be kept (dropped at shutdown): forget them."""
        for _seq, fp, _ts, _a in self._pending:
            if fp is not None:
                self.dedup.forget_inflight(fp)
        self._pending.clear()
        self._low.clear()
        self._staged = None

    # --- the ledger's side ---------------------------------------------------------------------------
    def diff(self) -> StateDiff:
        """What changed since the last diff, for the ledger's next commit (and forgotten here)."""
        jobs, self._dirty_jobs = self._dirty_jobs, set()
        names, self._dirty_accounts = self._dirty_accounts, set()
        devs, self._dirty_devices = self._dirty_devices, set()
        running, devices = self.running_jobs, self.devices
        stored = self._stored_jobs
        jobs_diff: dict[str, list[Any] | None] = {}
        for g in jobs:
            v = running.get(g)
            if stored.get(g, _ABSENT) != (v if v is not None else _ABSENT):
                jobs_diff[g] = v
                if v is None:
                    del stored[g]
                else:
                    stored[g] = v
        accounts = self.accounts
        acc: dict[str, list[Any] | None] = {}
        for name in names:
            entry = accounts.get(name)
            if type(entry) is bytes:
                entry = accounts[name] = _entry_of(entry)
            acc[name] = entry  # type: ignore[assignment]
        dd = self.dedup
        return StateDiff(
            watermark=self.watermark,
            server_start_hash=self.server_start_hash,
            accounts_baseline=self.accounts_baseline,
            dedup=dd.take_journal(),
            horizon=dd.horizon,
            max_size=dd.max_size,
            running_jobs=jobs_diff,
            accounts=acc,
            devices={d: devices.get(d) for d in devs},
        )

    def restore(self, diff: StateDiff) -> None:
        """The commit of ``diff`` failed: its changes go with the next one."""
        self.dedup.restore_journal(diff.dedup)
        self._dirty_jobs.update(diff.running_jobs)
        for g in diff.running_jobs:  # what the ledger holds for them is not known now
            self._stored_jobs[g] = _UNKNOWN
        self._dirty_accounts.update(diff.accounts)
        self._dirty_devices.update(diff.devices)


_ABSENT: Final = object()
_UNKNOWN: Final = object()


def _entry_of(raw: bytes) -> list[Any]:
    data = parse_raw(raw).get("Data")  # (parsed for this alone: digested in place)
    return account_entry(data, owned=True) if isinstance(data, dict) else ["", ""]



