"""A long gap is read span by span, each span sized by what the answers before it held: answers
stay near the target whatever the gap, spans grow back after a dense stretch, and a long sync
shows how far it is (log lines, /readyz's body, metrics). Against the simulator, whose clock
runs ahead once the gap is over (the gap lasted hours of the server's time)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import structlog

from cometstream.resync import SPAN_GROWTH
from cometstream.simulator import Simulator

from .conftest import PASSWORD, USER, make_config, running, wait_until

COMPLETED = 4201
JOBS = "/api/v1/admin/get-jobs-for-date-range"
#: the span target of these tests: about 50 of the simulator's jobs per answer
TARGET = 64 * 1024


class Clock:
    """The server's clock: ours, plus an offset set when the gap is over."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def _jobs_at(sim: Simulator, times: list[int]) -> list[str]:
    """A job started and completed (30 s later) at each time, without any event."""
    guids = []
    for t in times:
        guid = sim.world.start_job(now=t)["Data"]["GUID"]
        sim.world.complete_job(guid, now=t + 30)
        guids.append(guid)
    return guids


def _resync_completions(path: Path) -> list[str]:
    out = []
    for line in path.read_bytes().splitlines():
        env = orjson.loads(line)
        if env["origin"] == "resync" and env["event"]["Type"] == COMPLETED:
            out.append(env["event"]["Data"]["GUID"])
    return out


@contextmanager
def _gap_over(sim: Simulator, clock: Clock, seconds: float) -> Iterator[None]:
    """Logins refused within the block; after it the server's clock is ``seconds`` ahead."""
    sim.faults.reject_logins = True
    try:
        yield
    finally:
        clock.offset = seconds
        sim.faults.reject_logins = False


async def _sync_a_gap(tmp_path: Path, times_after: Any, *, gap: float,
                      api_delay: float = 0.0, listen: str = "") -> tuple[Any, list[str], Path]:
    """Baseline, then a gap of ``gap`` seconds of the server's clock with jobs at
    ``times_after(begin)``, then the sync: (its result, the gap's jobs, the sink's file)."""
    clock = Clock()
    path = tmp_path / "events.jsonl"
    async with Simulator(username=USER, password=PASSWORD, rate=0, seed=11,
                         clock=clock) as sim:
        sim.world.max_jobs = 100_000
        cfg = make_config(sim.url, tmp_path, sinks={"f": {"type": "file", "path": str(path)}},
                          http={"listen": listen})
        async with running(cfg) as d:
            d.daemon.resyncer.span_bytes = TARGET
            await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
            with _gap_over(sim, clock, gap):
                await sim.drop_clients()
                await wait_until(lambda: d.stats.connects["rejected"] >= 1, what="gap open")
                guids = _jobs_at(sim, times_after(int(clock()) + 1))
                sim.faults.api_delay = api_delay
            await wait_until(lambda: d.daemon.resyncs_ok == 2, timeout=60, what="the sync")
            await wait_until(lambda: set(guids) <= set(_resync_completions(path)),
                             timeout=30, what="every gap job written")
            res = d.daemon.last_resync
            assert res is not None and res.spans <= sim.api_calls[JOBS]
    return res, guids, path


async def test_a_long_gap_is_read_in_answers_near_the_target(tmp_path: Path) -> None:
    """1,500 jobs over two hours: every completion once, in time order, and no job-list
    answer of the sync larger than the span target's bound (the target times the growth
    allowed between two spans), however many jobs the gap holds."""
    res, guids, path = await _sync_a_gap(
        tmp_path, lambda begin: [begin + i * 4 for i in range(1500)], gap=2 * 3600 + 600)
    got = _resync_completions(path)
    assert [g for g in got if g in set(guids)] == guids  # once each, in time order
    assert 0 < res.largest_answer <= SPAN_GROWTH * TARGET, res.largest_answer
    assert res.spans >= 1500 * 1000 // (SPAN_GROWTH * TARGET)  # (about 1.3 kB a job)


async def test_spans_grow_back_after_a_dense_stretch(tmp_path: Path) -> None:
    """1,200 jobs in the gap's first five minutes, then 20 over the next eleven hours: the
    first span's answer, far past the target, is refused and asked for again shorter; the
    spans stay short for the dense stretch and grow again after it, so the sparse hours take
    a few calls (the dense stretch's spans kept to the end would take about 2,000)."""
    def times(begin: int) -> list[int]:
        dense = [begin + i // 4 for i in range(1200)]
        sparse = [begin + 300 + i * 2000 for i in range(20)]
        return dense + sparse

    res, guids, path = await _sync_a_gap(tmp_path, times, gap=12 * 3600)
    assert set(guids) <= set(_resync_completions(path))
    assert res.split >= 1 and res.spans <= 80, (res.split, res.spans)
    assert res.largest_answer <= SPAN_GROWTH * TARGET


async def test_a_long_sync_shows_its_progress_and_stays_ready(tmp_path: Path,
                                                              unused_tcp_port: int) -> None:
    """While a sync reads a long gap: "resync progress" lines whose share grows, /readyz 200
    with a catching_up object in its body, and the progress gauge between 0 and 1; none of
    them once the sync is over."""
    listen = f"127.0.0.1:{unused_tcp_port}"
    seen: list[dict[str, Any]] = []
    gauges: list[float] = []

    async def poll(session: aiohttp.ClientSession) -> None:
        async with session.get(f"http://{listen}/readyz") as r:
            body = await r.json()
            if "catching_up" in body:
                assert r.status == 200, body
                seen.append(body["catching_up"])
        async with session.get(f"http://{listen}/metrics") as r:
            for line in (await r.text()).splitlines():
                if line.startswith("cometstream_resync_progress_ratio{"):
                    gauges.append(float(line.rsplit(" ", 1)[1]))

    clock = Clock()
    path = tmp_path / "events.jsonl"
    with structlog.testing.capture_logs() as logs:
        async with Simulator(username=USER, password=PASSWORD, rate=0, seed=11,
                             clock=clock) as sim, aiohttp.ClientSession() as http:
            cfg = make_config(sim.url, tmp_path, http={"listen": listen},
                              sinks={"f": {"type": "file", "path": str(path)}})
            async with running(cfg) as d:
                d.daemon.resyncer.span_bytes = TARGET
                d.daemon.resyncer.progress_interval = 0.0  # every span
                await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
                mark = len(logs)
                with _gap_over(sim, clock, 3 * 3600):
                    await sim.drop_clients()
                    await wait_until(lambda: d.stats.connects["rejected"] >= 1, what="gap")
                    begin = int(clock()) + 1
                    _jobs_at(sim, [begin + i * 10 for i in range(1000)])
                    sim.faults.api_delay = 0.05  # each span's answer takes a moment

                async def polled() -> bool:
                    await poll(http)
                    return d.daemon.resyncs_ok == 2

                deadline = time.monotonic() + 60
                while not await polled():
                    assert time.monotonic() < deadline, "the sync did not end"
                await poll(http)
                after = await (await http.get(f"http://{listen}/readyz")).json()
    progress = [e for e in logs[mark:] if e["event"] == "resync progress"]
    assert len(progress) >= 3, [e["event"] for e in logs]
    shares = [e["progress_pct"] for e in progress]
    assert shares == sorted(shares) and shares[-1] > shares[0]
    assert seen and all(0.0 <= c["progress"] <= 1.0 for c in seen)
    assert [c["progress"] for c in seen] == sorted(c["progress"] for c in seen)
    assert any(0.0 < g < 1.0 for g in gauges), gauges
    assert "catching_up" not in after and gauges[-1] == 0.0


async def test_a_refused_answer_is_freed_at_once(tmp_path: Path) -> None:
    """An answer past the limit is refused, and the bytes read of it are freed then, not when
    the exception (whose traceback holds the reading frame, and so its buffer) is collected: a
    large sync pauses the cyclic collector, and refused answers would pile up."""
    import pytest

    from cometstream.api import AdminClient
    from cometstream.errors import ResponseTooLarge

    async with Simulator(username=USER, password=PASSWORD, rate=0, seed=11) as sim:
        sim.world.max_jobs = 100_000
        now = int(time.time())
        _jobs_at(sim, [now - 3000 + i for i in range(3000)])  # about 3 MB of job list
        async with AdminClient(make_config(sim.url, tmp_path).server) as api:
            with pytest.raises(ResponseTooLarge) as caught:
                await api.jobs_for_date_range(now - 3600, now, limit=1 << 20)
    assert caught.value.limit == 1 << 20
    # every buffer the traceback's frames still hold
    held, frames = 0, 0
    tb = caught.value.__traceback__
    while tb is not None:
        frames += 1
        held += sum(len(v) for v in tb.tb_frame.f_locals.values()
                    if isinstance(v, bytes | bytearray))
        tb = tb.tb_next
    assert frames >= 3 and held < 64 * 1024, (frames, held)
