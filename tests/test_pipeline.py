"""Delivery through the pipeline: order, formats, filters, buffers, failures, shutdown."""

from __future__ import annotations

import array
import asyncio
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest

from cometstream.errors import SinkError
from cometstream.simulator import Simulator
from cometstream.sinks import Sink
from cometstream.sinks.memory import MemorySink

from .conftest import (
    MEMORY,
    PASSWORD,
    cli_env,
    make_config,
    run_cli,
    running,
    wait_until,
    write_config,
)
from .peers import read_log


async def test_two_file_sinks_get_every_event_in_order_in_both_formats(sim: Simulator,
                                                                       tmp_path: Path) -> None:
    """2,000 generated events reach an event-format and an envelope-format file, in order."""
    ev_path, env_path = tmp_path / "ev.jsonl", tmp_path / "sub" / "env.jsonl"
    cfg = make_config(sim.url, tmp_path, exact=True, sinks={
        "raw": {"type": "file", "path": str(ev_path), "format": "event"},
        "wrapped": {"type": "file", "path": str(env_path), "format": "envelope", "fsync": "always"},
    })
    async with running(cfg) as d:
        await d.synced()
        sent = sim.emit_many(2000)
        await wait_until(lambda: d.sink_stats("raw").delivered == 2001
                         and d.sink_stats("wrapped").delivered == 2001, timeout=15,
                         what="delivery to both sinks")
    raw_lines = ev_path.read_bytes().splitlines()
    assert orjson.loads(raw_lines[0])["Type"] == 4000
    assert raw_lines[1:] == sent
    env_lines = env_path.read_bytes().splitlines()
    assert len(env_lines) == 2001
    for line, original in zip(env_lines[1:], sent, strict=True):
        env = orjson.loads(line)
        assert set(env) == {"server", "origin", "received_at", "type_name", "event"}
        assert env["server"] == "sim" and env["origin"] == "stream"
        assert env["event"] == orjson.loads(original)
        assert line.endswith(b',"event":' + original + b"}")  # the server's bytes, spliced
        assert env["type_name"].startswith("SEVT_")
    assert d.stats.events_received == 2001


async def test_filter_routes_only_matching_types(sim: Simulator, tmp_path: Path) -> None:
    """A sink with types = [...] gets only those; the rest are counted as filtered."""
    cfg = make_config(sim.url, tmp_path, sinks={
        "jobs": {"type": "memory", "types": ["SEVT_JOB_COMPLETED", 4999]},
        "all": {"type": "memory"},
    })
    async with running(cfg) as d:
        await wait_until(lambda: d.stats.received.get(4000), what="HELLO")
        for i, t in enumerate((4200, 4201, 4102, 4999, 4201, 4998)):
            sim.emit({"Type": t, "Data": {"GUID": f"g{i}"}})
        await wait_until(lambda: d.sink_stats("all").delivered == 7, what="all")
        await wait_until(lambda: d.sink_stats("jobs").delivered == 3, what="jobs")
        assert [ev.type for ev in d.sink("jobs").events] == [4201, 4999, 4201]
        assert d.sink_stats("jobs").filtered == 4


async def test_queued_events_keep_only_their_bytes_when_no_sink_reads_the_document(
        sim: Simulator, tmp_path: Path) -> None:
    """With only sinks that do not read the parsed document (file, webhook) a queued event holds
    its bytes and its dedup key, not the document (which is parsed again if asked for), and the
    event types no sink takes are not redacted at all."""
    cfg = make_config(sim.url, tmp_path, sinks={
        "jobs": {"type": "file", "path": str(tmp_path / "jobs.jsonl"), "format": "event",
                 "types": ["SEVT_JOB_COMPLETED"]},
    })
    async with running(cfg) as d:
        await wait_until(lambda: d.stats.received.get(4000), what="HELLO")
        assert d.daemon.gate.keep_doc is False
        seen: list[Any] = []
        d.daemon.pipeline.add_ack_listener(
            lambda _r, batch: seen.extend((ev, ev._doc, ev.dedup_key()) for ev in batch))
        job = sim.world.complete_job(sim.world.start_job()["Data"]["GUID"])
        sim.emit({"Type": 4101, "Data": {"Username": "u", "PasswordHash": "x"}})
        sim.emit(job)
        await wait_until(lambda: len(seen) == 1, what="the completion delivered")
        ev, doc, key = seen[0]
        guid, end = job["Data"]["GUID"], job["Data"]["EndTime"]
        assert doc is None and key == f"4201:{guid}:{end}"
        assert ev.doc["Data"]["GUID"] == guid  # parsed again on demand
        assert d.stats.received[4101] == 1
        assert d.daemon.redactor.redacted_events == 0  # the profile went to no sink


async def test_drop_newest_sink_never_blocks_the_others(sim: Simulator, tmp_path: Path) -> None:
    """A hung sink with drop_newest drops and counts; the file sink beside it gets everything."""
    path = tmp_path / "ev.jsonl"
    cfg = make_config(sim.url, tmp_path, exact=True, spool=MEMORY, sinks={
        "stuck": {"type": "memory", "buffer": 10, "when_full": "drop_newest"},
        "file": {"type": "file", "path": str(path), "format": "event"},
    })
    async with running(cfg) as d:
        stuck = d.sink("stuck")
        stuck.hang.clear()
        await d.synced()
        sent = sim.emit_many(500)
        await wait_until(lambda: d.sink_stats("file").delivered == 501, what="file delivery")
        st = d.sink_stats("stuck")
        queued = d.daemon.pipeline.routes[0].depth
        assert st.dropped["queue_full"] > 0
        assert st.dropped["queue_full"] + queued + st.delivered == 501
        assert path.read_bytes().splitlines()[1:] == sent
        stuck.hang.set()
        await wait_until(lambda: st.delivered == 501 - st.dropped["queue_full"], what="unstuck")


async def test_retryable_failures_are_retried_until_delivered(sim: Simulator,
                                                              tmp_path: Path) -> None:
    """A sink failing three times (retryable) gets the same batch again; nothing lost, errors counted."""
    cfg = make_config(sim.url, tmp_path, exact=True)
    async with running(cfg) as d:
        d.daemon.pipeline.retry_initial = 0.01
        mem = d.sink("mem")
        await wait_until(lambda: d.sink_stats("mem").delivered == 1, what="HELLO delivered")
        await d.synced()
        mem.fail_next = 3
        sent = sim.emit_many(50)
        await wait_until(lambda: d.sink_stats("mem").delivered == 51, timeout=10, what="retries")
        assert [ev.raw for ev in mem.events[1:]] == sent
        st = d.sink_stats("mem")
        assert st.errors == 3 and not st.failing


async def test_permanent_failure_drops_the_batch_and_counts_it(sim: Simulator,
                                                               tmp_path: Path) -> None:
    """A non-retryable SinkError drops that batch as rejected; later batches go through."""
    cfg = make_config(sim.url, tmp_path)
    async with running(cfg) as d:
        mem = d.sink("mem")
        await wait_until(lambda: d.sink_stats("mem").delivered == 1, what="HELLO delivered")
        mem.fail_next, mem.fail_permanently = 1, True
        sim.emit({"Type": 4201, "Data": {"GUID": "lost"}})
        await wait_until(lambda: d.sink_stats("mem").dropped["rejected"] == 1, what="rejected")
        sim.emit({"Type": 4201, "Data": {"GUID": "kept"}})
        await wait_until(lambda: d.sink_stats("mem").delivered == 2, what="next batch")
        assert mem.events[-1].doc["Data"]["GUID"] == "kept"


async def test_pipeline_watermark_follows_acks(sim: Simulator, tmp_path: Path) -> None:
    """delivered_through() only passes events every sink has finished with."""
    cfg = make_config(sim.url, tmp_path, exact=True, sinks={"a": {"type": "memory"}, "b": {"type": "memory"}})
    async with running(cfg) as d:
        p = d.daemon.pipeline
        await wait_until(lambda: p.delivered_through() == 1, what="HELLO acked")
        d.sink("b").hang.clear()
        sim.emit_many(5)
        await wait_until(lambda: d.sink_stats("a").delivered == 6, what="a acks")
        assert p.delivered_through() == 1
        d.sink("b").hang.set()
        await wait_until(lambda: p.delivered_through() == 6, what="b acks")


def _conf(tmp_path: Path, sim: Simulator, path: Path, extra: str = "") -> Path:
    return write_config(tmp_path, sim.url, f"""
[log]
format = "json"
[redact]
enabled = false
[sinks.file]
type = "file"
path = "{path}"
format = "event"
{extra}
""")


async def test_sigterm_drains_queues_and_exits_0(sim: Simulator, tmp_path: Path) -> None:
    """SIGTERM stops reading, delivers what is queued (a slow sink), and exits 0."""
    path = tmp_path / "out.jsonl"
    conf = _conf(tmp_path, sim, path)
    proc = await run_cli("run", "-c", str(conf))
    try:
        await sim.wait_for_clients(1, timeout=10)
        sent = sim.emit_many(3000)
        # stopped while the events stream in: once the sink has begun to write them
        await wait_until(lambda: path.exists() and len(path.read_bytes().splitlines()) > 1,
                         what="the first events written")
        proc.send_signal(signal.SIGTERM)
        _out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    logs = [orjson.loads(line) for line in err.splitlines()]
    assert any(rec["event"] == "stopping" for rec in logs)
    stopped = next(rec for rec in logs if rec["event"] == "stopped")
    lines = path.read_bytes().splitlines()
    # everything the daemon had received was written before exit
    assert stopped["complete"] is True
    assert stopped["delivered"]["file"] == len(lines)
    assert lines[1:] == sent[: len(lines) - 1]
    assert PASSWORD not in err.decode()


async def test_sighup_reopens_the_file_for_logrotate(sim: Simulator, tmp_path: Path) -> None:
    """After the file is moved away, SIGHUP makes the sink write to a new file at the path."""
    path = tmp_path / "out.jsonl"
    conf = _conf(tmp_path, sim, path, extra='fsync = "always"')
    proc = await run_cli("run", "-c", str(conf), env=cli_env())
    try:
        await sim.wait_for_clients(1, timeout=10)
        first = sim.emit_many(10)
        await wait_until(lambda: path.exists() and len(path.read_bytes().splitlines()) == 11,
                         what="first events")
        rotated = tmp_path / "out.jsonl.1"
        path.rename(rotated)
        proc.send_signal(signal.SIGHUP)
        await read_log(proc.stderr, "reopening files")
        second = sim.emit_many(10)
        await wait_until(lambda: path.exists() and len(path.read_bytes().splitlines()) == 10,
                         what="events in the new file")
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 0
    assert rotated.read_bytes().splitlines()[1:] == first
    assert path.read_bytes().splitlines() == second


async def test_run_on_a_terminal_stops_when_the_terminal_hangs_up(
        sim: Simulator, tmp_path: Path) -> None:
    """`cometstream run` in the foreground of a terminal: SIGHUP while the terminal is there
    reopens the files (logrotate, `kill -HUP`); SIGHUP once the terminal has hung up (its
    window closed, the ssh connection gone) stops the daemon, exit 0, rather than leave it
    running orphaned, holding the state lock."""
    import os
    import pty
    import sys

    path = tmp_path / "out.jsonl"
    conf = _conf(tmp_path, sim, path)
    master, slave = pty.openpty()
    shown = bytearray()
    loop = asyncio.get_running_loop()

    def drain() -> None:
        try:
            shown.extend(os.read(master, 65536))
        except OSError:
            loop.remove_reader(master)

    loop.add_reader(master, drain)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cometstream", "run", "-c", str(conf),
        stdin=slave, stdout=slave, stderr=slave, env=cli_env(), start_new_session=True)
    os.close(slave)
    try:
        await sim.wait_for_clients(1, timeout=10)
        proc.send_signal(signal.SIGHUP)  # the terminal is there: reopen
        await wait_until(lambda: b"reopening files" in shown, what="reopened")
        assert proc.returncode is None
        loop.remove_reader(master)
        os.close(master)  # the terminal goes: its side of the pty hangs up
        master = -1
        proc.send_signal(signal.SIGHUP)  # (what the kernel sends the terminal's session)
        await asyncio.wait_for(proc.wait(), 20)
    finally:
        if master >= 0:
            loop.remove_reader(master)
            os.close(master)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0


async def test_stop_drains_what_is_queued_before_closing(sim: Simulator, tmp_path: Path) -> None:
    """Events still queued for a slow sink at stop are delivered (within shutdown.timeout)."""
    cfg = make_config(sim.url, tmp_path, exact=True, shutdown={"timeout": 10.0},
                      sinks={"slow": {"type": "memory", "delay": 0.05}})
    async with running(cfg) as d:
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        d.daemon.pipeline.batch_max = 5
        sent = sim.emit_many(60)
        await wait_until(lambda: d.stats.events_received == 61, what="all received")
        queued = d.daemon.pipeline.routes[0].depth
        assert queued > 20  # most of it is still waiting for the slow sink
        await d.stopped()  # a clean stop: it raises otherwise
    assert [ev.raw for ev in d.sink("slow").events[1:]] == sent
    assert d.sink("slow").closed
    assert d.sink_stats("slow").dropped["shutdown"] == 0


async def test_shutdown_timeout_bounds_a_hung_sink(sim: Simulator, tmp_path: Path) -> None:
    """A sink that never returns cannot hold the daemon past shutdown.timeout; its queue is
    counted as dropped at shutdown."""
    cfg = make_config(sim.url, tmp_path, exact=True, spool=MEMORY, shutdown={"timeout": 0.3})
    async with running(cfg) as d:
        await wait_until(lambda: d.sink_stats("mem").delivered == 1, what="HELLO")
        d.sink("mem").hang.clear()
        sim.emit_many(10)
        await wait_until(lambda: d.stats.events_received == 11, what="received")
        # the sink never returns: without the bound the stop would hang
        await d.stopped(timeout=30)  # a clean stop: it raises otherwise
    assert d.sink_stats("mem").dropped["shutdown"] == 10


async def test_sigterm_exits_even_when_stdout_is_never_read(sim: Simulator, tmp_path: Path) -> None:
    """A stdout sink blocked on a full pipe does not keep the process alive after SIGTERM."""
    conf = write_config(tmp_path, sim.url, """
[spool]
buffer = "memory"
[shutdown]
timeout = 1.0
[sinks.out]
type = "stdout"
""")
    import fcntl
    import os
    import sys
    import termios

    unread, stdout = os.pipe()  # its stdout: a pipe we never read
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cometstream", "run", "-c", str(conf), stdout=stdout,
            stderr=asyncio.subprocess.PIPE, env=cli_env())
    finally:
        os.close(stdout)

    def pipe_full() -> bool:  # (within a page of its capacity: pages are its unit)
        held = array.array("i", [0])
        fcntl.ioctl(unread, termios.FIONREAD, held)
        return held[0] > fcntl.fcntl(unread, fcntl.F_GETPIPE_SZ) - os.sysconf("SC_PAGE_SIZE")

    try:
        await sim.wait_for_clients(1, timeout=10)
        sim.emit_many(2000)  # ~2 MB: far more than a pipe holds
        await wait_until(pipe_full, timeout=20, what="the stdout pipe full")
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
        os.close(unread)
        assert proc.stderr is not None
        err = await proc.stderr.read()
        await proc.wait()
    assert proc.returncode == 0
    assert b"events not delivered at shutdown" in err


async def test_refused_events_go_to_the_dead_letter_file(sim: Simulator, tmp_path: Path) -> None:
    """A permanent refusal writes the events, with the reason, to the sink's dead_letter file."""
    dlq = tmp_path / "dead" / "mem.jsonl"
    cfg = make_config(sim.url, tmp_path, exact=True,
                      sinks={"mem": {"type": "memory", "dead_letter": str(dlq)}})
    async with running(cfg) as d:
        await wait_until(lambda: d.sink_stats("mem").delivered == 1, what="HELLO")
        mem = d.sink("mem")
        mem.fail_next, mem.fail_permanently = 1, True
        lost = sim.emit({"Type": 4201, "Data": {"GUID": "refused"}})
        await wait_until(dlq.exists, what="dead letter")
        sim.emit({"Type": 4201, "Data": {"GUID": "kept"}})
        await wait_until(lambda: d.sink_stats("mem").delivered == 2, what="next event")
    rec = orjson.loads(dlq.read_bytes().splitlines()[0])
    assert rec["sink"] == "mem" and "injected failure" in rec["error"]
    assert orjson.dumps(rec["event"]) == lost and rec["failed_at"] > 1.7e9


class _HalfSink(Sink):
    """A sink that accepts the first two events of each batch, then fails (retryable) once."""

    default_format = "event"

    def __init__(self) -> None:
        self.name = "half"
        self.got: list[bytes] = []
        self.calls = 0

    @classmethod
    def from_config(cls, name: str, options: Any) -> Any:
        raise NotImplementedError

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

    def reopen(self) -> None: ...

    async def send(self, batch: Any) -> None:
        from cometstream.errors import SinkError

        self.calls += 1
        if self.calls == 1 and len(batch) > 2:
            self.got.extend(ev.raw for ev in batch[:2])
            raise SinkError("half", "connection reset after 2", accepted=2, retry_after=0.01)
        self.got.extend(ev.raw for ev in batch)


async def test_partially_accepted_batches_are_not_sent_twice() -> None:
    """accepted=k acknowledges the head of the batch; only the rest is retried."""
    from cometstream.config import SinkConfig
    from cometstream.observe.metrics import Metrics
    from cometstream.pipeline import Pipeline
    from cometstream.protocol import decode_frame

    sink = _HalfSink()
    cfg = SinkConfig(name="half", type="x", types=None, format="event", buffer=100,
                     when_full="block", options={})
    p = Pipeline([(cfg, sink)], Metrics("s"), retry_initial=0.01)  # type: ignore[list-item]
    frames = [orjson.dumps({"Type": 4103, "N": i}) for i in range(5)]
    for f in frames:
        p.publish(decode_frame(f, received_at=0.0, server="s"))  # type: ignore[arg-type]
    p.start()
    await wait_until(lambda: len(sink.got) == 5, what="all five")
    assert sink.got == frames and sink.calls == 2
    assert p.routes[0].stats.delivered == 5 and p.routes[0].stats.errors == 1
    await p.drain(1.0)


class _OneAtATimeSink(_HalfSink):
    """Accepts one event per send, then fails (retryable): progress on every call."""

    async def send(self, batch: Any) -> None:
        from cometstream.errors import SinkError

        self.calls += 1
        self.got.append(batch[0].raw)
        if len(batch) > 1:
            raise SinkError("half", "connection reset after 1", accepted=1)


async def test_progress_resets_the_backoff() -> None:
    """A sink that accepts part of each batch before failing makes progress: the delay before
    each retry starts from the initial backoff again instead of growing to the cap (0.5 s, not
    up to 30 s)."""
    from cometstream.config import SinkConfig
    from cometstream.observe.metrics import Metrics
    from cometstream.pipeline import Pipeline
    from cometstream.protocol import decode_frame

    pauses: list[float] = []

    class Recording(Pipeline):
        async def _pause(self, delay: float) -> None:  # the delay asked for, not slept
            pauses.append(delay)
            await asyncio.sleep(0)

    sink = _OneAtATimeSink()
    cfg = SinkConfig(name="half", type="x", types=None, format="event", buffer=100,
                     when_full="block", options={})
    p = Recording([(cfg, sink)], Metrics("s"), retry_initial=0.5,  # type: ignore[list-item]
                  retry_max=30.0)
    frames = [orjson.dumps({"Type": 4103, "N": i}) for i in range(20)]
    for f in frames:
        p.publish(decode_frame(f, received_at=0.0, server="s"))  # type: ignore[arg-type]
    p.start()
    await wait_until(lambda: len(sink.got) == 20, what="all twenty")
    assert sink.got == frames
    assert len(pauses) == 19 and max(pauses) <= 0.5
    await p.drain(1.0)


class _ConcurrentSink(_HalfSink):
    """Several sends at once (like the webhook): "bad" events fail (retryable) ``fail`` times,
    a "cancel" event's first send lets a CancelledError of its own out."""

    concurrency = 4
    max_batch = 1
    max_retries = 3

    def __init__(self, fail: int) -> None:
        super().__init__()
        self.fail = fail
        self.tries: dict[bytes, int] = {}

    async def send(self, batch: Any) -> None:
        from cometstream.errors import SinkError

        (ev,) = batch
        n = self.tries[ev.raw] = self.tries.get(ev.raw, 0) + 1
        await asyncio.sleep(0.001)
        if b'"bad"' in ev.raw and n <= self.fail:
            raise SinkError("c", "HTTP 503")
        if b'"cancel"' in ev.raw and n == 1:
            raise asyncio.CancelledError  # (not the pipeline cancelling it)
        self.got.append(ev.raw)


def _concurrent_pipeline(sink: Any, pauses: list[float]) -> Any:
    from cometstream.config import SinkConfig
    from cometstream.observe.metrics import Metrics
    from cometstream.pipeline import Pipeline

    class Recording(Pipeline):
        async def _pause(self, delay: float) -> None:
            pauses.append(delay)
            await asyncio.sleep(0.002)

    cfg = SinkConfig(name="c", type="x", types=None, format="event", buffer=1000,
                     when_full="block", options={})
    p = Recording([(cfg, sink)], Metrics("s"), retry_initial=0.5,  # type: ignore[list-item]
                  retry_max=30.0)
    p.rand = lambda: 1.0  # the delays are the backoff's ceilings
    return p


async def test_a_retried_send_keeps_its_own_backoff_while_others_succeed() -> None:
    """With several sends in flight, one send that keeps failing backs off 0.5, 1, 2 s... even
    though the sends beside it succeed meanwhile: the others' progress does not shorten its
    retries (which would spend max_retries in a moment and dead-letter it)."""
    from cometstream.protocol import decode_frame

    pauses: list[float] = []
    sink = _ConcurrentSink(fail=3)
    p = _concurrent_pipeline(sink, pauses)
    frames = [orjson.dumps({"Type": 4103, "ResourceID": "bad" if i == 0 else f"ok{i}"})
              for i in range(200)]
    for f in frames:
        p.publish(decode_frame(f, received_at=0.0, server="s"))  # type: ignore[arg-type]
    p.start()
    await wait_until(lambda: len(sink.got) == 200, what="all")
    assert pauses == [0.5, 1.0, 2.0]
    assert p.routes[0].stats.dropped["rejected"] == 0 and p.routes[0].acked_seq == 200
    assert not p.routes[0].stats.failing
    await p.drain(1.0)


async def test_a_send_that_lets_a_cancellation_out_is_retried_not_stuck() -> None:
    """A sink whose send raises a CancelledError of its own (not the pipeline's) costs a retry,
    not the sink: the window does not wait for it for ever."""
    from cometstream.protocol import decode_frame

    pauses: list[float] = []
    sink = _ConcurrentSink(fail=0)
    p = _concurrent_pipeline(sink, pauses)
    frames = [orjson.dumps({"Type": 4103, "ResourceID": "cancel" if i == 2 else f"r{i}"})
              for i in range(20)]
    for f in frames:
        p.publish(decode_frame(f, received_at=0.0, server="s"))  # type: ignore[arg-type]
    p.start()
    await wait_until(lambda: p.routes[0].acked_seq == 20, what="all acknowledged")
    assert sorted(sink.got) == sorted(frames) and len(pauses) == 1
    assert await p.drain(1.0)


class _Fatal(BaseException):
    """What no retry covers: a plugin's own exception type outside ``Exception``."""


class _DyingSink(MemorySink):
    """A plugin sink that hangs until released, then lets out an exception of its own type."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.die = False

    async def send(self, batch: Any) -> None:
        await self.hang.wait()
        if self.die:
            raise _Fatal("the plugin gave up")
        await super().send(batch)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _http_get(url: str) -> tuple[int, str]:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(url) as r:
        return r.status, await r.text()


async def test_a_sink_worker_that_dies_is_logged_marked_failing_and_blocks_nobody(
        sim: Simulator, tmp_path: Path) -> None:
    """A plugin sink raising an exception no retry covers, while the read loop waits for room
    in its full ``block`` queue: the death is logged once with its traceback, the sink shows
    failing in /readyz and cometstream_sink_failing, the waiting read loop is released and the
    file sink beside it gets every event."""
    from structlog.testing import capture_logs

    path = tmp_path / "ev.jsonl"
    port = _free_port()
    cfg = make_config(sim.url, tmp_path, exact=True, spool=MEMORY,
                      http={"listen": f"127.0.0.1:{port}"}, sinks={
        "dies": {"type": "memory", "buffer": 5, "when_full": "block"},
        "file": {"type": "file", "path": str(path), "format": "event"},
    })
    dying = _DyingSink("dies")
    with capture_logs() as logs:
        async with running(cfg, sinks={"dies": dying}) as d:
            dying.hang.clear()
            await d.synced()
            sent = sim.emit_many(50)
            route = d.daemon.pipeline.routes[0]
            # (beyond its bound: a producer queued its event and waits for room)
            await wait_until(lambda: len(route.queue) > 5, what="a producer waiting")
            dying.die = True
            dying.hang.set()
            await wait_until(lambda: d.sink_stats("file").delivered == 51, what="file delivery")
            assert path.read_bytes().splitlines()[1:] == sent
            st = d.sink_stats("dies")
            assert st.failing and "worker stopped" in st.last_error
            status, body = await _http_get(f"http://127.0.0.1:{port}/readyz")
            assert status == 503 and "sink dies: worker stopped: _Fatal" in body
            _status, text = await _http_get(f"http://127.0.0.1:{port}/metrics")
            assert 'cometstream_sink_failing{sink="dies"} 1.0' in text
            more = sim.emit_many(20)  # a dead sink's full queue holds up nothing
            await wait_until(lambda: d.sink_stats("file").delivered == 71, what="more")
            assert path.read_bytes().splitlines()[51:] == more
            await d.stopped()
    deaths = [e for e in logs if e["event"] == "background task died"]
    assert len(deaths) == 1 and isinstance(deaths[0]["exc_info"], _Fatal)
    assert deaths[0]["log_level"] == "error" and deaths[0]["task"] == "sink dies"


async def test_an_ack_listener_that_raises_fails_the_sink_instead_of_hanging() -> None:
    """An acknowledgement listener that raises ends the worker: the sink is failing, the
    producer waiting for room in its full queue is released, and drain does not hang."""
    from cometstream.config import SinkConfig
    from cometstream.observe.metrics import Metrics
    from cometstream.pipeline import Pipeline
    from cometstream.protocol import decode_frame

    sink = MemorySink("m")
    sink.hang.clear()
    cfg = SinkConfig(name="m", type="memory", types=None, format="event", buffer=3,
                     when_full="block", options={})
    p = Pipeline([(cfg, sink)], Metrics("s"))

    def boom(route: Any, batch: Any) -> None:
        raise RuntimeError("listener bug")

    p.add_ack_listener(boom)
    p.start()
    route = p.routes[0]
    p.publish(decode_frame(b'{"Type": 4103}', received_at=0.0, server="s"))  # type: ignore[arg-type]
    await wait_until(lambda: route.inflight == 1, what="the first send hanging")
    waiting = None
    for i in range(10):
        waiting = p.publish(decode_frame(orjson.dumps({"Type": 4103, "N": i}),
                                         received_at=0.0, server="s"))  # type: ignore[arg-type]
        if waiting is not None:
            break
    assert waiting is not None  # the queue is full: the producer waits for room
    sink.hang.set()
    await asyncio.wait_for(waiting, 5)  # released, not left waiting for ever
    with pytest.raises(SinkError, match="worker stopped"):
        await route.wait_for_space()  # (the route's error, which the read loop goes past)
    assert route.stats.failing and "RuntimeError: listener bug" in route.stats.last_error
    assert p.publish(decode_frame(b'{"Type": 4103}', received_at=0.0,  # type: ignore[arg-type]
                                  server="s")) is None  # no longer blocks
    assert not await asyncio.wait_for(p.drain(1.0), 5)
