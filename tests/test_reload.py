"""Hot reload: SIGHUP reads the configuration again, validates it whole, and applies only what
changed, while the stream stays up.

The real-process tests run `cometstream run` against the in-process simulator with a notify
socket of their own (what systemd would read): a reload is over when ``READY=1`` follows its
``RELOADING=1``. Job completions flow the whole time; the file sinks' files are read at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import generate_latest

from cometstream.config import load_config
from cometstream.observe.systemd import Notifier
from cometstream.simulator import Simulator
from cometstream.sinks import resolve_sink_class
from cometstream.store import FILENAME

from .conftest import PASSWORD, USER, running, wait_until, write_config
from .test_faults import DaemonProcess, Key, _completion_key, _config, _file_completions


class NotifySocket:
    """systemd's side of ``$NOTIFY_SOCKET``: every datagram the daemon sends, in order."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="cs-notify-", dir="/tmp")  # (a short path)
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def read(self) -> list[str]:
        with contextlib.suppress(BlockingIOError):
            while True:
                self.messages.append(self.sock.recv(4096).decode())
        return self.messages

    def count(self, prefix: str) -> int:
        return sum(1 for m in self.read() if m.startswith(prefix))

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


class NotifiedDaemon(DaemonProcess):
    """:class:`DaemonProcess` with a notify socket, and a reload that waits for its end."""

    def __init__(self, conf: Path, logdir: Path, notify: NotifySocket) -> None:
        super().__init__(conf, logdir)
        self.notify = notify
        self.env["NOTIFY_SOCKET"] = notify.path

    async def ready(self) -> None:
        await wait_until(lambda: self.notify.count("READY=1") >= self.runs, timeout=30,
                         what="READY=1")

    async def reload(self) -> list[str]:
        """SIGHUP, then until the reload's READY=1; returns the messages it sent."""
        assert self.proc is not None
        before = len(self.notify.read())
        readies = self.notify.count("READY=1")
        self.proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: self.notify.count("READY=1") > readies, timeout=30,
                         what="READY=1 after the reload")
        return self.notify.read()[before:]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [doc for doc in self.log() if doc.get("event") == name]


class Completions:
    """A job completing every ``tick`` seconds while the test runs."""

    def __init__(self, sim: Simulator, tick: float = 0.01) -> None:
        self.sim = sim
        self.tick = tick
        self.made: set[Key] = set()
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        world = self.sim.world
        while True:
            ev = world.complete_job(world.start_job()["Data"]["GUID"])
            self.made.add(_completion_key(ev))
            if self.sim.clients:
                self.sim.emit(ev)
            await asyncio.sleep(self.tick)

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


def _file_sink(name: str, path: Path, extra: str = "") -> str:
    return f"""
[sinks.{name}]
type = "file"
path = "{path}"
format = "event"
types = ["SEVT_JOB_COMPLETED"]
{extra}"""


@contextlib.asynccontextmanager
async def _setup(tmp_path: Path, sinks: str) -> AsyncIterator[tuple[Simulator, NotifiedDaemon,
                                                                    Completions]]:
    notify = NotifySocket()
    async with Simulator(username=USER, password=PASSWORD, rate=0, seed=11,
                         record=False) as sim:
        conf = _config(tmp_path, sim.url, sinks)
        daemon = NotifiedDaemon(conf, tmp_path, notify)
        jobs = Completions(sim)
        try:
            await daemon.start()
            await daemon.ready()
            await wait_until(daemon.settled_since, timeout=20, what="the baseline resync")
            jobs.start()
            yield sim, daemon, jobs
        except BaseException:
            daemon.report()
            raise
        finally:
            await jobs.stop()
            await daemon.close()
            notify.close()


def _rewrite(conf: Path, old: str, new: str) -> None:
    text = conf.read_text()
    assert old in text
    conf.write_text(text.replace(old, new, 1))


def _counts(*paths: Path) -> Counter[Key]:
    out: Counter[Key] = Counter()
    for p in paths:
        keys, other = _file_completions(p)
        assert not other, other[:3]
        out.update(keys)
    return out


async def _all_in(jobs: Completions, *paths: Path) -> None:
    await jobs.stop()
    made = set(jobs.made)
    await wait_until(lambda: made <= set(_counts(*paths)), timeout=30,
                     what="every completion in the files")


@pytest.mark.timeout(90)
async def _reloaded(d: Any) -> None:
    """Until the reload the last SIGHUP started has ended."""
    task = d.reloader.task
    assert task is not None
    await task


async def _reload_past_a_send(d: Any, route: Any, held: Any) -> None:
    """SIGHUP while ``held`` (a memory sink) keeps a send in flight: the reload waits for that
    send, which is then let go; returns once the reload has ended."""
    d.hangup()
    await wait_until(lambda: route.retiring, what="the reload waiting for the send")
    held.hang.set()
    await _reloaded(d)


async def test_adding_and_changing_sinks_keeps_one_login_and_every_completion_once(
        tmp_path: Path) -> None:
    """Three reloads under a steady stream of job completions (a sink added, the file sink
    moved to a new path, nothing changed): one stream login throughout; the moved sink's two
    files together hold every completion exactly once; the added sink has everything from its
    first event on, once."""
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    async with _setup(tmp_path, _file_sink("f", a)) as (sim, daemon, jobs):
        logins = sim.logins_ok
        await wait_until(lambda: len(_counts(a)) >= 20, what="completions in a")
        with open(daemon.conf, "a") as fh:
            fh.write(_file_sink("g", c))
        sent = await daemon.reload()
        assert sent[0].startswith("RELOADING=1\nMONOTONIC_USEC="), sent
        await wait_until(lambda: len(_counts(c)) >= 20, what="completions in the added sink")
        _rewrite(daemon.conf, f'path = "{a}"', f'path = "{b}"')
        await daemon.reload()
        size_a = a.stat().st_size
        await wait_until(lambda: len(_counts(b)) >= 20, what="completions at the new path")
        await daemon.reload()  # (nothing changed)
        await _all_in(jobs, a, b)
        assert a.stat().st_size == size_a, "the old path was written after the swap"
        assert [d["sink"] for d in daemon.events("sink added")] == ["g"]
        assert [d["sink"] for d in daemon.events("sink reopened with its new settings")] == ["f"]
        assert len(daemon.events("configuration reloaded")) == 3
        assert sim.logins_ok == logins == 1
        rc = await daemon.terminate()
        assert rc == 0, daemon.tail()
    counts = _counts(a, b)
    assert set(counts) == jobs.made
    assert [k for k, n in counts.items() if n > 1] == []
    added = _counts(c)
    assert [k for k, n in added.items() if n > 1] == []
    print(f"\nreload: completions={len(jobs.made)} a={len(_counts(a))} b={len(_counts(b))} "
          f"c={len(added)} logins={sim.logins_ok}")


@pytest.mark.timeout(60)
async def test_a_refused_reload_names_the_key_and_changes_nothing(tmp_path: Path) -> None:
    """A reload whose file has an unknown key (and a new sink) is refused whole: the log names
    the key, STATUS= says it failed, READY=1 follows, the new sink is not started and the
    running sink goes on."""
    a, c = tmp_path / "a.jsonl", tmp_path / "c.jsonl"
    async with _setup(tmp_path, _file_sink("f", a)) as (sim, daemon, jobs):
        good = daemon.conf.read_text()
        daemon.conf.write_text(good + _file_sink("g", c, 'colour = "red"'))
        sent = await daemon.reload()
        assert any(m.startswith("STATUS=reload failed") for m in sent), sent
        assert sent[-1] == "READY=1"
        refused = daemon.events("reload refused")
        assert [d["key"] for d in refused] == ["sinks.g.colour"], refused
        assert not daemon.events("sink added")
        # the running configuration stays: the next completions still reach a
        await _all_in(jobs, a)
        assert not c.exists()
        assert sim.logins_ok == 1
        # the same file fixed is applied
        daemon.conf.write_text(good + _file_sink("g", c))
        await daemon.reload()
        assert [d["sink"] for d in daemon.events("sink added")] == ["g"]


@pytest.mark.timeout(60)
async def test_keys_that_need_a_restart_refuse_the_reload(tmp_path: Path) -> None:
    """A changed ``state.dir`` (and ``[http] listen``) refuses the reload with a line
    "restart to change KEY" for each."""
    a = tmp_path / "a.jsonl"
    async with _setup(tmp_path, _file_sink("f", a)) as (_sim, daemon, _jobs):
        _rewrite(daemon.conf, f'dir = "{tmp_path / "state"}"', f'dir = "{tmp_path / "s2"}"')
        _rewrite(daemon.conf, 'listen = ""', 'listen = "127.0.0.1:0"')
        await daemon.reload()
        problems = {d["key"]: d["problem"] for d in daemon.events("reload refused")}
        assert problems == {"state.dir": "state.dir: restart to change state.dir",
                            "http.listen": "http.listen: restart to change http.listen"}
        assert not (tmp_path / "s2").exists()


@pytest.mark.timeout(90)
async def test_sigkill_right_after_a_reload_loses_nothing(tmp_path: Path) -> None:
    """The file sink moved to a new path, then SIGKILL as soon as the reload says READY=1:
    after a restart the two files together hold every completion exactly once."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    async with _setup(tmp_path, _file_sink("f", a)) as (_sim, daemon, jobs):
        await wait_until(lambda: _counts(a), what="completions in a")
        _rewrite(daemon.conf, f'path = "{a}"', f'path = "{b}"')
        await daemon.reload()
        await daemon.kill()
        await daemon.start("after sigkill")
        await daemon.ready()
        await _all_in(jobs, a, b)
        rc = await daemon.terminate()
        assert rc == 0, daemon.tail()
    counts = _counts(a, b)
    assert set(counts) == jobs.made
    assert [k for k, n in counts.items() if n > 1] == []


@pytest.mark.timeout(60)
async def test_a_removed_sink_stops_and_its_cursor_goes(tmp_path: Path) -> None:
    """A sink removed from the file stops getting events, the count it had not got is logged,
    and its cursor is gone from the ledger."""
    a, c = tmp_path / "a.jsonl", tmp_path / "c.jsonl"
    async with _setup(tmp_path, _file_sink("f", a) + _file_sink("g", c)) as (_s, daemon, jobs):
        await wait_until(lambda: _counts(c), what="completions in c")
        text = daemon.conf.read_text()
        daemon.conf.write_text(text[:text.index("\n[sinks.g]")] + "\n")
        await daemon.reload()
        removed = daemon.events("sink removed")
        assert [d["sink"] for d in removed] == ["g"]
        assert isinstance(removed[0]["events_not_delivered"], int)
        size_c = c.stat().st_size
        await _all_in(jobs, a)
        assert c.stat().st_size == size_c
        rc = await daemon.terminate()
        assert rc == 0, daemon.tail()
    db = sqlite3.connect(tmp_path / "state" / FILENAME)
    try:
        sinks = {row[0] for row in db.execute("SELECT sink FROM cursors")}
    finally:
        db.close()
    assert sinks == {"f"}


@pytest.mark.timeout(60)
async def test_a_server_change_reconnects_and_resyncs(tmp_path: Path) -> None:
    """A changed ``[stream]`` setting logs in again with it, and the remedial sync runs."""
    a = tmp_path / "a.jsonl"
    async with _setup(tmp_path, _file_sink("f", a)) as (sim, daemon, jobs):
        assert sim.logins_ok == 1
        offset = daemon.log_size()
        _rewrite(daemon.conf, "connect_timeout = 1.0", "connect_timeout = 2.0")
        await daemon.reload()
        await wait_until(lambda: sim.logins_ok == 2, what="a second login")
        await wait_until(lambda: daemon.settled_since(offset), timeout=20,
                         what="the resync after the new login")
        await _all_in(jobs, a)
        assert [k for k, n in _counts(a).items() if n > 1] == []


@pytest.mark.timeout(60)
async def test_a_failing_sink_fixed_by_a_reload_gets_what_it_missed(tmp_path: Path) -> None:
    """A file sink whose path is a folder cannot open (it fails, its events wait); the path
    fixed and reloaded, the new file gets every completion, once."""
    a, good = tmp_path / "a.jsonl", tmp_path / "good.jsonl"
    a.mkdir()
    async with _setup(tmp_path, _file_sink("f", a)) as (sim, daemon, jobs):
        await wait_until(lambda: len(jobs.made) >= 20, what="completions made")
        assert any(d.get("event") == "sink open failed" for d in daemon.log())
        _rewrite(daemon.conf, f'path = "{a}"', f'path = "{good}"')
        await daemon.reload()
        await _all_in(jobs, good)
        assert [k for k, n in _counts(good).items() if n > 1] == []
        assert sim.logins_ok == 1


@pytest.mark.timeout(60)
async def test_the_log_level_applies_at_once(tmp_path: Path) -> None:
    """``[log] level`` changes with the reload itself: at "warning" the reload's own info line
    is not written; back at "info", the next one is."""
    a = tmp_path / "a.jsonl"
    async with _setup(tmp_path, _file_sink("f", a)) as (_sim, daemon, _jobs):
        _rewrite(daemon.conf, 'format = "json"', 'format = "json"\nlevel = "warning"')
        await daemon.reload()
        assert daemon.events("configuration reloaded") == []
        _rewrite(daemon.conf, 'level = "warning"', 'level = "info"')
        await daemon.reload()
        assert [d["log_level"] for d in daemon.events("configuration reloaded")] == ["info"]


# --------------------------------------------------------------------------- in one process

MEMORY_SINK = '[sinks.mem]\ntype = "memory"'


async def test_signals_during_a_reload_make_one_more(tmp_path: Path, sim: Simulator) -> None:
    """SIGHUPs that come while a reload waits for a sink's send in flight (the handler's own
    path) make one more reload after it, not one each."""
    conf = write_config(tmp_path, sim.url, MEMORY_SINK)
    cfg = load_config(conf, env={}, resolve_sink=resolve_sink_class)
    async with running(cfg) as rd:
        d = rd.daemon
        sink = rd.sink("mem")
        await wait_until(lambda: d.resyncs_ok >= 1, what="the first resync")
        sink.hang.clear()  # (its next send stays in flight)
        sim.emit()
        route = d.pipeline.routes[0]
        await wait_until(lambda: route.inflight, what="a send in flight")
        conf.write_text(conf.read_text() + "delay = 0.001\n")  # (the sink changes)
        d.hangup()
        await wait_until(lambda: route.retiring, what="the reload waiting for the send")
        d.hangup()
        d.hangup()
        sink.hang.set()
        await _reloaded(d)
        assert d.metrics.reloads == {"success": 2, "failure": 0}
        assert d.sinks["mem"] is not sink
        assert sink.events and sink.closed  # (its send in flight ended before the swap)


async def test_a_changed_sink_gets_what_its_old_instance_had_not_taken(
        tmp_path: Path, sim: Simulator) -> None:
    """A changed sink's old instance finishes its send in flight; the events queued behind it
    go to the new instance, in order, none twice."""
    conf = write_config(tmp_path, sim.url, MEMORY_SINK + "\n[spool]\nbuffer = \"memory\"")
    cfg = load_config(conf, env={}, resolve_sink=resolve_sink_class)
    async with running(cfg) as rd:
        d = rd.daemon
        old = rd.sink("mem")
        await wait_until(lambda: d.resyncs_ok >= 1, what="the first resync")
        old.hang.clear()
        sim.emit()
        route = d.pipeline.routes[0]
        await wait_until(lambda: route.inflight, what="a send in flight")
        for _ in range(5):
            sim.emit()
        await wait_until(lambda: len(route.queue) >= 5, what="events queued behind it")
        queued = [ev.raw for ev in route.queue]
        conf.write_text(conf.read_text().replace('type = "memory"',
                                                 'type = "memory"\ndelay = 0.001'))
        await _reload_past_a_send(d, route, old)
        new = rd.sink("mem")
        assert new is not old
        await wait_until(lambda: len(new.events) >= len(queued), what="the queue delivered")
        assert [ev.raw for ev in new.events][:len(queued)] == queued
        assert not {ev.raw for ev in old.events} & {ev.raw for ev in new.events}


async def test_reload_metrics_say_the_outcome(tmp_path: Path, sim: Simulator) -> None:
    """cometstream_config_* follow each reload: success, then a refused one."""
    conf = write_config(tmp_path, sim.url, MEMORY_SINK)
    body = conf.read_text()
    cfg = load_config(conf, env={}, resolve_sink=resolve_sink_class)
    async with running(cfg) as rd:
        d = rd.daemon

        def scrape() -> str:
            return generate_latest(d.registry).decode()

        assert 'cometstream_config_last_reload_successful{server="' in scrape()
        assert await d.reloader.reload()
        text = scrape()
        assert 'cometstream_config_reloads_total{result="success",server=' in text \
            or 'result="success"} 1.0' in text
        conf.write_text(body + "bogus = 1\n")
        assert not await d.reloader.reload()
        text = scrape()
        assert "cometstream_config_last_reload_successful" in text
        assert d.metrics.reloads == {"success": 1, "failure": 1}
        assert d.metrics.reload_ok == 0
        line = next(ln for ln in text.splitlines()
                    if ln.startswith("cometstream_config_last_reload_successful{"))
        assert line.endswith(" 0.0")
        ts = next(ln for ln in text.splitlines()
                  if ln.startswith("cometstream_config_last_reload_success_timestamp_seconds{"))
        assert float(ts.split()[-1]) > 0



async def test_an_unchanged_sink_is_not_touched(tmp_path: Path, sim: Simulator) -> None:
    """A reload that adds a sink leaves the other one as it was: the same sink object, open,
    the same route (queue, cursor); the added one gets the events from then on."""
    conf = write_config(tmp_path, sim.url, MEMORY_SINK)
    cfg = load_config(conf, env={}, resolve_sink=resolve_sink_class)
    async with running(cfg) as rd:
        d = rd.daemon
        await wait_until(lambda: d.resyncs_ok >= 1, what="the first resync")
        sink, route = rd.sink("mem"), d.pipeline.routes[0]
        conf.write_text(conf.read_text() + '[sinks.other]\ntype = "memory"\n')
        assert await d.reloader.reload()
        assert rd.sink("mem") is sink and d.pipeline.routes[0] is route
        assert sink.opened and not sink.closed
        other = rd.sink("other")
        sim.emit()
        await wait_until(lambda: other.events, what="an event in the added sink")
        assert other.events[-1].raw == sink.events[-1].raw


async def test_a_sighup_before_the_start_is_done_reloads_after_it(
        tmp_path: Path, sim: Simulator) -> None:
    """The handler is there before READY=1; a SIGHUP that comes before the start is done
    waits for it (RELOADING=1 comes after the start's READY=1), then reloads."""
    conf = write_config(tmp_path, sim.url, MEMORY_SINK)
    cfg = load_config(conf, env={}, resolve_sink=resolve_sink_class)
    notify = NotifySocket()
    try:
        async with running(cfg) as rd:
            d = rd.daemon
            d.notifier = Notifier({"NOTIFY_SOCKET": notify.path})
            conf.write_text(conf.read_text() + '[sinks.other]\ntype = "memory"\n')
            d.hangup()  # (run() has not started yet)
            assert not d.reloader.started.is_set()
            await _reloaded(d)
            assert [r.name for r in d.pipeline.routes] == ["mem", "other"]
            assert d.metrics.reloads == {"success": 1, "failure": 0}
            sent = [m.split("\n")[0] for m in notify.read() if not m.startswith("STATUS=")]
            assert sent == ["READY=1", "RELOADING=1", "READY=1"], sent
    finally:
        notify.close()


async def test_a_read_loop_blocked_on_a_full_queue_goes_on_after_a_swap(
        tmp_path: Path, sim: Simulator) -> None:
    """``when_full = "block"``: the read loop waits for room in a changed sink's queue; the
    sink swapped (with a new filter: a queue of its own), it goes on, and every completion
    reaches the old or the new instance, once, in order."""
    conf = write_config(tmp_path, sim.url, MEMORY_SINK + '\nbuffer = 2\nwhen_full = "block"'
                        '\n[spool]\nbuffer = "memory"')
    cfg = load_config(conf, env={}, resolve_sink=resolve_sink_class)
    async with running(cfg) as rd:
        d = rd.daemon
        old = rd.sink("mem")
        await wait_until(lambda: d.resyncs_ok >= 1, what="the first resync")
        old.hang.clear()
        world = sim.world
        made = []

        def complete() -> None:
            ev = world.complete_job(world.start_job()["Data"]["GUID"])
            made.append(orjson.dumps(ev))
            sim.emit(ev)

        complete()
        route = d.pipeline.routes[0]
        await wait_until(lambda: route.inflight, what="a send in flight")
        for _ in range(4):
            complete()
        await wait_until(lambda: len(route.queue) > route.maxlen, what="the read loop waiting")
        conf.write_text(conf.read_text().replace(
            'when_full = "block"', 'when_full = "block"\ntypes = ["SEVT_JOB_COMPLETED"]'))
        await _reload_past_a_send(d, route, old)
        new = rd.sink("mem")
        for _ in range(3):
            complete()

        def got() -> list[dict[str, Any]]:
            return [orjson.loads(ev.raw) for ev in [*old.events, *new.events]
                    if orjson.loads(ev.raw).get("Type") == 4201]

        await wait_until(lambda: len(got()) >= len(made), what="every completion delivered")
        assert [orjson.dumps(doc) for doc in got()] == made


@pytest.mark.timeout(120)
async def test_a_reload_during_a_resync_and_20_sighups_lose_and_repeat_nothing(
        tmp_path: Path) -> None:
    """A sink added while a remedial sync runs (its API calls slowed down), then twenty SIGHUPs
    within about a second while the file sink moves to a new path: the sync's completions and
    the live ones all reach the moved sink's two files exactly once, the added sink gets none
    twice, the last configuration is the one applied, and the only new login is the drop's."""
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    async with _setup(tmp_path, _file_sink("f", a)) as (sim, daemon, jobs):
        await wait_until(lambda: len(_counts(a)) >= 20, what="completions in a")
        synced = len(daemon.events("resync done"))
        sim.faults.api_delay = 0.5  # (the next sync's calls wait: it runs through the reload)
        await sim.drop_clients()
        await wait_until(lambda: sim.logins_ok == 2, what="the reconnect")
        with open(daemon.conf, "a") as fh:
            fh.write(_file_sink("g", c))
        await daemon.reload()
        assert len(daemon.events("resync done")) == synced, "the sync ended before the reload"
        assert [d["sink"] for d in daemon.events("sink added")] == ["g"]
        sim.faults.api_delay = 0
        await wait_until(lambda: len(daemon.events("resync done")) > synced, timeout=30,
                         what="the sync's end")
        _rewrite(daemon.conf, f'path = "{a}"', f'path = "{b}"')
        assert daemon.proc is not None
        for _ in range(20):
            daemon.proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.05)  # (the burst's pace, not a wait for anything)
            daemon.notify.read()  # (as systemd does: a queue of unread datagrams is short)
        # every reload over: each RELOADING=1 has had its READY=1 (one more: the start's)
        await wait_until(lambda: daemon.notify.count("READY=1")
                         == daemon.notify.count("RELOADING=1") + 1, timeout=30,
                         what="the last reload's READY=1")
        await wait_until(lambda: len(_counts(b)) >= 20, what="completions at the new path")
        size_a = a.stat().st_size
        await _all_in(jobs, a, b)
        assert a.stat().st_size == size_a, "the old path was written after the swap"
        reopened = [d["sink"] for d in daemon.events("sink reopened with its new settings")]
        assert reopened == ["f"]  # (the later reloads found nothing changed)
        assert sim.logins_ok == 2
        rc = await daemon.terminate()
        assert rc == 0, daemon.tail()
    counts = _counts(a, b)
    assert set(counts) == jobs.made
    assert [k for k, n in counts.items() if n > 1] == []
    added = _counts(c)
    assert added and [k for k, n in added.items() if n > 1] == []
