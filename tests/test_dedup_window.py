"""The de-duplication window's 24-hour bound (docs/guarantees.md): a job event's key is kept
for 24 hours of server time, then leaves the window, in memory and in the ledger, however few
keys the window holds."""

from __future__ import annotations

import time
from pathlib import Path

import orjson

from cometstream.delivery.identity import job_event
from cometstream.delivery.ledger import Ledger
from cometstream.delivery.tracker import Tracker
from cometstream.events import Event
from cometstream.protocol import decode_frame

from .ledger_client import Client

DAY = 86400
T0 = 1733400000  # server time of the first completion


def _completion(guid: str, end: int) -> Event:
    doc = {"Actor": "u", "Type": 4201, "Timestamp": end, "TypeString": "SEVT_JOB_COMPLETED",
           "Data": {"GUID": guid, "EndTime": end, "Username": "u", "Status": 5000}}
    ev = decode_frame(orjson.dumps(doc), received_at=time.time(), server="s")
    assert isinstance(ev, Event)
    return ev


def _keep(tr: Tracker, seq: int, ev: Event) -> str:
    """Publish a job event and keep it (as a commit does); returns its dedup key."""
    fp, ts, act = job_event(ev)
    assert fp is not None
    tr.published_job(seq, fp, ts, act)
    tr.settle(seq, live_until=None)
    key = ev.dedup_key()
    assert key is not None
    return key


def _ledger(state: Path, client: Client | None = None) -> Ledger:
    return Ledger(state, ["f"], server="s", max_bytes=1 << 30, max_age=7 * DAY,
                  fsync_interval=1.0, events=False, client=client)


def _client(seq: list[int]) -> Client:
    """The daemon's wiring of a ledger (memory buffer) and its tracker: every event up to
    ``seq[0]`` is kept at the next commit (the tracker is set once the state is loaded)."""
    return Client(lambda: {"f": seq[0]}, through=lambda: seq[0])


async def test_a_key_leaves_the_window_after_24_hours_in_memory_and_in_the_ledger(
        tmp_path: Path) -> None:
    """Three completions kept at T0, T0 + 2 h and T0 + 24 h (one commit each), in a window far
    below its size bound. When the watermark reaches T0 + 25 h, the first has left the window
    (a replay of it would be delivered again) and the second has not; the next commit deletes
    its row, and a restart does not bring it back."""
    state = tmp_path / "state"
    seq = [0]
    client = _client(seq)
    lg = _ledger(state, client)
    lg.open()
    clock = [float(T0)]
    tr = Tracker(lg.state, clock=lambda: clock[0])
    tr.frozen = False
    client.tracker = tr

    keys = []
    for guid, end in (("old", T0), ("recent", T0 + 2 * 3600), ("new", T0 + DAY)):
        clock[0] = end
        seq[0] += 1
        keys.append(_keep(tr, seq[0], _completion(guid, end)))
        await lg.commit()
    old, recent, new = keys
    assert tr.watermark == T0 + DAY and len(tr.dedup) == 3
    assert tr.dedup.seen(old)  # exactly 24 h old: still in the window

    clock[0] = T0 + DAY + 3600
    seq[0] += 1
    _keep(tr, seq[0], _completion("later", T0 + DAY + 3600))
    assert tr.watermark == T0 + DAY + 3600
    assert not tr.dedup.seen(old), "a key 25 h old is still in the window"
    assert tr.dedup.seen(recent) and tr.dedup.seen(new)
    await lg.commit()
    await lg.close()

    lg = _ledger(state)
    lg.open()
    assert len(lg.state.dedup) == 3  # the row of the first is gone
    back = Tracker(lg.state, clock=lambda: clock[0])
    await lg.close()
    assert back.watermark == T0 + DAY + 3600
    assert not back.dedup.seen(old)
    assert back.dedup.seen(recent) and back.dedup.seen(new) and len(back.dedup) == 3


async def test_keys_of_a_kept_ledger_row_older_than_24_hours_are_not_loaded_back(
        tmp_path: Path) -> None:
    """The ledger keeps the window as one row per commit and deletes a row once its newest key
    is 24 h old: a row's older keys outlive their 24 h in it. At the next start they are not
    loaded back into the window; the row's younger keys are."""
    state = tmp_path / "state"
    seq = [0]
    client = _client(seq)
    lg = _ledger(state, client)
    lg.open()
    clock = [float(T0)]
    tr = Tracker(lg.state, clock=lambda: clock[0])
    tr.frozen = False
    client.tracker = tr
    keys = []
    for guid, end in (("old", T0), ("recent", T0 + 2 * 3600)):  # one commit: one row
        clock[0] = end
        seq[0] += 1
        keys.append(_keep(tr, seq[0], _completion(guid, end)))
    old, recent = keys
    await lg.commit()
    clock[0] = T0 + DAY + 1800
    seq[0] += 1
    _keep(tr, seq[0], _completion("later", T0 + DAY + 1800))
    await lg.commit()
    await lg.close()

    lg = _ledger(state)
    lg.open()
    st = lg.state
    await lg.close()
    assert st.watermark == T0 + DAY + 1800
    assert len(st.dedup) == 3  # the first row stays: its newest key is 22.5 h old
    back = Tracker(st, clock=lambda: clock[0])
    assert not back.dedup.seen(old), "a key 24.5 h old was loaded back into the window"
    assert back.dedup.seen(recent) and len(back.dedup) == 2


def test_a_key_s_fingerprint_is_what_ledgers_already_hold() -> None:
    """The window's fingerprints are kept in the ledger across versions: the same key must
    give the same signed 64-bit number (the first 8 bytes of its BLAKE2b, little-endian)
    forever, or an upgraded daemon would deliver again what the old one kept."""
    from cometstream.delivery.identity import fingerprint

    assert fingerprint("4201:ab6e8212-5522-434d-a44a-4112f351247e:1796669529") == \
        -3221118520244099415
    assert fingerprint("4200:x") == 3773805257761076428
    assert fingerprint("é\ud800") == 9187530268824829771  # (a lone surrogate, as received)
    assert fingerprint(42) == 42


def test_a_full_window_keeps_its_size_and_its_shared_timestamps_bounded() -> None:
    """A busy server's window is full after a day: every prune pushes the oldest keys out.
    The window stays at its size, the newest keys stay in it, and the timestamps it shares
    between keys (one object per second) stay bounded by its age (twice its seconds at most),
    not by the keys it saw, without a look at each of them at every prune."""
    from cometstream.delivery.window import Dedup

    d = Dedup(max_size=1000)
    table, rebuilt = d._ts, 0
    for i in range(30_000):  # a key every 10 s for a month and more, each kept and pruned
        ts = T0 + 10 * i
        d.acked_fp(i, ts)
        d.prune(ts)
        if d._ts is not table:
            table, rebuilt = d._ts, rebuilt + 1
    assert len(d) == 1000
    assert d.seen(29_999) and d.seen(29_000) and not d.seen(28_999)
    assert len(d._ts) <= 2 * (DAY // 10) + 2
    # the table is rebuilt once it has doubled, not at every prune that dropped a key (a look
    # at each second of the day per acknowledgement, in a busy server's full window)
    assert 0 < rebuilt <= 10
