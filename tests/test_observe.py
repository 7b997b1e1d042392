"""Metrics, health endpoints and logging, scraped over HTTP like Prometheus does."""

from __future__ import annotations

import gzip
import socket
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from cometstream.simulator import Simulator

from .conftest import MEMORY, make_config, running, wait_until


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _get(url: str, **kw: Any) -> tuple[int, bytes, dict[str, str]]:
    async with aiohttp.ClientSession(auto_decompress=False) as http, http.get(url, **kw) as r:
        return r.status, await r.read(), dict(r.headers)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    _status, body, headers = await _get(f"http://127.0.0.1:{port}/metrics")
    if headers.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    return _samples(body.decode())


def _v(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_metrics_values_match_a_scripted_session(sim: Simulator, tmp_path: Path) -> None:
    """After known events, a malformed frame, a filtered sink, drops and rejected re-logins,
    /metrics reports exactly those numbers (not just the names)."""
    port = _port()
    cfg = make_config(sim.url, tmp_path, spool=MEMORY, http={"listen": f"127.0.0.1:{port}"}, sinks={
        "all": {"type": "memory"},
        "jobs": {"type": "memory", "types": ["SEVT_JOB_COMPLETED"]},
        "tiny": {"type": "memory", "buffer": 1, "when_full": "drop_newest"},
    })
    async with running(cfg) as d:
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        d.sink("tiny").hang.clear()
        frames = [
            {"Type": 4201, "Data": {"GUID": "a", "Status": 5000}},
            {"Type": 4201, "Data": {"GUID": "b", "Status": 7002}},
            {"Type": 4201, "Data": {"GUID": "c", "Status": 7999}},
            {"Type": 4103, "Actor": "u", "ResourceID": "/x"},
            {"Type": 4999, "TypeString": "SEVT_NEW_KIND"},
            {"Type": 4600},
        ]
        for f in frames:
            sim.emit(f)
        sim.emit(b"{broken")
        await wait_until(lambda: d.sink_stats("all").delivered == 7, what="delivery")
        await wait_until(lambda: d.sink_stats("jobs").delivered == 3, what="filtered delivery")
        sim.faults.reject_next = 2
        await sim.drop_clients()
        await wait_until(lambda: d.daemon.resyncs_ok == 2, timeout=10, what="re-login")
        status, body, headers = await _get(f"http://127.0.0.1:{port}/metrics",
                                           headers={"Accept-Encoding": "identity"})
        d.sink("tiny").hang.set()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    m = _samples(body.decode())
    srv = {"server": "sim"}
    assert _v(m, "cometstream_events_received_total", type="SEVT_JOB_COMPLETED", **srv) == 3
    assert _v(m, "cometstream_events_received_total", type="SEVT_META_HELLO", **srv) == 2
    assert _v(m, "cometstream_events_received_total", type="SEVT_ACCOUNT_LOGIN", **srv) == 1
    assert _v(m, "cometstream_events_received_total", type="SEVT_POLICY_NEW", **srv) == 1
    assert _v(m, "cometstream_events_received_total", type="other", **srv) == 1
    assert _v(m, "cometstream_events_malformed_total", reason="invalid_json", **srv) == 1
    for reason in ("binary", "duplicate_key", "too_deep", "oversized", "processing_error"):
        assert _v(m, "cometstream_events_malformed_total", reason=reason, **srv) == 0  # from 0
    assert _v(m, "cometstream_jobs_completed_total", status="JOB_STATUS_STOP_SUCCESS", **srv) == 1
    assert _v(m, "cometstream_jobs_completed_total", status="JOB_STATUS_FAILED_ERROR", **srv) == 1
    assert _v(m, "cometstream_jobs_completed_total", status="JOB_STATUS_FAILED_OTHER", **srv) == 1
    assert _v(m, "cometstream_connects_total", result="ok", **srv) == 2
    assert _v(m, "cometstream_connects_total", result="rejected", **srv) == 2
    assert _v(m, "cometstream_connection_up", **srv) == 1
    assert sum(v for (n, _l), v in m.items() if n == "cometstream_disconnects_total") == 1
    assert _v(m, "cometstream_resync_runs_total", result="baseline", **srv) == 1
    assert _v(m, "cometstream_resync_runs_total", result="ok", **srv) == 1
    assert _v(m, "cometstream_events_delivered_total", sink="all") == 8  # + the 2nd HELLO
    assert _v(m, "cometstream_events_delivered_total", sink="jobs") == 3
    assert _v(m, "cometstream_events_filtered_total", sink="jobs") == 5
    tiny_dropped = _v(m, "cometstream_events_dropped_total", sink="tiny", reason="queue_full")
    tiny_depth = _v(m, "cometstream_sink_queue_depth", sink="tiny")
    tiny_delivered = _v(m, "cometstream_events_delivered_total", sink="tiny")
    assert tiny_dropped >= 5 and tiny_dropped + tiny_depth + tiny_delivered == 8
    assert _v(m, "cometstream_delivery_latency_seconds_count", sink="all") == 8
    assert _v(m, "cometstream_delivery_latency_seconds_bucket", sink="all", le="+Inf") == 8
    assert _v(m, "cometstream_last_event_timestamp_seconds", **srv) > 1.7e9
    assert any(n.startswith("process_") for n, _l in m)
    assert any(n.startswith("python_") for n, _l in m)


async def test_completions_are_counted_by_the_status_they_carry(sim: Simulator,
                                                                  tmp_path: Path) -> None:
    """Known codes by name, unknown ones by their range, anything that is not an integer (a
    float equal to a known code, a boolean, text, no Data) as "other"."""
    port = _port()
    cfg = make_config(sim.url, tmp_path, spool=MEMORY, http={"listen": f"127.0.0.1:{port}"},
                      resync={"enabled": False}, sinks={"all": {"type": "memory"}})
    statuses: list[Any] = [5000, 5000, 7002, 5999, 6500, 9000, 5000.0, True, "5000", None]
    async with running(cfg) as d:
        await wait_until(lambda: d.stats.received.get(4000), what="HELLO")
        for i, status in enumerate(statuses):
            sim.emit({"Type": 4201, "Data": {"GUID": f"g{i}", "Status": status}})
        sim.emit({"Type": 4201, "Data": "not an object"})
        await wait_until(lambda: d.sink("all").events and len(d.sink("all").events) == 12,
                         what="delivery")
        m = await _scrape(port)
    srv = {"server": "sim"}
    got = {labels[1][1]: v for (name, labels), v in m.items()
           if name == "cometstream_jobs_completed_total"}
    assert got == {"JOB_STATUS_STOP_SUCCESS": 2, "JOB_STATUS_FAILED_ERROR": 1,
                   "JOB_STATUS_STOP_SUCCESS_OTHER": 1, "JOB_STATUS_RUNNING_OTHER": 1,
                   "other": 6}, got
    assert _v(m, "cometstream_events_received_total", type="SEVT_JOB_COMPLETED", **srv) == 11


async def test_metrics_are_gzipped_when_asked(sim: Simulator, tmp_path: Path) -> None:
    """Prometheus asks for gzip; the body is gzip and decodes to the exposition."""
    port = _port()
    cfg = make_config(sim.url, tmp_path, http={"listen": f"127.0.0.1:{port}"})
    async with running(cfg) as d:
        await wait_until(lambda: d.daemon.http is not None, what="http")
        status, body, headers = await _get(f"http://127.0.0.1:{port}/metrics",
                                           headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("Content-Encoding") == "gzip"
    assert b"cometstream_connection_up" in gzip.decompress(body)


async def test_readyz_turns_503_with_reasons_when_the_stream_or_a_sink_fails(
        sim: Simulator, tmp_path: Path) -> None:
    """/readyz is 200 when logged in with healthy sinks, 503 naming the cause otherwise;
    /healthz stays 200."""
    port = _port()
    base = f"http://127.0.0.1:{port}"
    cfg = make_config(sim.url, tmp_path, http={"listen": f"127.0.0.1:{port}"})
    async with running(cfg) as d:
        d.daemon.pipeline.retry_initial = 0.01
        await wait_until(lambda: d.daemon.supervisor.connected, what="login")
        status, body, _h = await _get(base + "/readyz")
        assert status == 200 and b'"ready":true' in body
        sim.faults.reject_logins = True
        await sim.drop_clients()
        await wait_until(lambda: not d.daemon.supervisor.connected, what="disconnect")
        status, body, _h = await _get(base + "/readyz")
        assert status == 503 and b"stream:" in body
        assert (await _get(base + "/healthz"))[0] == 200
        sim.faults.reject_logins = False
        await wait_until(lambda: d.daemon.supervisor.connected, timeout=10, what="reconnect")
        d.sink("mem").fail_next = 10**6
        sim.emit({"Type": 4103})
        await wait_until(lambda: d.sink_stats("mem").failing, what="sink failing")
        status, body, _h = await _get(base + "/readyz")
        assert status == 503 and b"sink mem: injected failure" in body
        assert b"sink mem: sink mem:" not in body
        d.sink("mem").fail_next = 0
        await wait_until(lambda: not d.sink_stats("mem").failing, what="sink recovers")
        assert (await _get(base + "/readyz"))[0] == 200


async def test_http_listen_in_use_is_a_config_error(sim: Simulator, tmp_path: Path) -> None:
    """A busy http.listen port stops `run` with exit 2 and a line naming the key."""
    from cometstream.daemon import Daemon
    from cometstream.errors import ConfigError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = make_config(sim.url, tmp_path, http={"listen": f"127.0.0.1:{port}"})
        import asyncio

        try:
            await Daemon(cfg).run(asyncio.Event())
        except ConfigError as exc:
            assert exc.key == "http.listen" and "in use" in str(exc)
        else:
            raise AssertionError("expected ConfigError")


async def test_readyz_counts_down_to_the_next_connection_attempt(sim: Simulator,
                                                                 tmp_path: Path) -> None:
    """While the stream waits to reconnect, /readyz says how long is left as of the request,
    not as of the disconnect."""
    port = _port()
    cfg = make_config(sim.url, tmp_path, http={"listen": f"127.0.0.1:{port}"},
                      stream={"backoff_initial": 40.0, "backoff_max": 60.0})
    async with running(cfg) as d:  # rand = 1.0: the first delay is backoff_initial
        await wait_until(lambda: d.daemon.supervisor.connected, what="login")
        await sim.drop_clients()
        await wait_until(lambda: d.daemon.status[0] == "reconnecting", what="the wait")
        _s, body, _h = await _get(f"http://127.0.0.1:{port}/readyz")
        assert b'"stream: reconnecting in 40 s: ' in body or b'"stream: reconnecting in 39 s: ' in body
        d.daemon.supervisor.retry_at -= 25.0  # as if 25 s had passed
        _s, body, _h = await _get(f"http://127.0.0.1:{port}/readyz")
        assert b'"stream: reconnecting in 15 s: ' in body or b'"stream: reconnecting in 14 s: ' in body


async def test_lag_metrics_are_exported_with_either_buffer(sim: Simulator,
                                                          tmp_path: Path) -> None:
    """cometstream_sink_lag_events/_seconds exist with the memory buffer too (the
    CometstreamSinkLagging alert reads them), and show a stuck sink falling behind."""
    port = _port()
    cfg = make_config(sim.url, tmp_path, http={"listen": f"127.0.0.1:{port}"}, spool=MEMORY)
    async with running(cfg) as d:
        d.daemon.pipeline.retry_initial = 0.01
        d.daemon.pipeline.retry_max = 0.05
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        await wait_until(lambda: d.sink_stats("mem").delivered >= 1, what="the HELLO")
        d.sink("mem").fail_next = 10**6
        sim.emit({"Type": 4103})
        sim.emit({"Type": 4103})
        await wait_until(lambda: d.sink_stats("mem").failing, what="sink failing")
        samples = await _scrape(port)
        assert _v(samples, "cometstream_sink_lag_events", sink="mem") == 2
        assert _v(samples, "cometstream_sink_lag_seconds", sink="mem") > 0
        assert not any(name.startswith("cometstream_spool_") for name, _l in samples)
        d.sink("mem").fail_next = 0
        await wait_until(lambda: not d.sink_stats("mem").failing, what="sink recovers")
        samples = await _scrape(port)
        assert _v(samples, "cometstream_sink_lag_events", sink="mem") == 0
        assert _v(samples, "cometstream_sink_lag_seconds", sink="mem") == 0


async def test_a_long_extra_text_arrives_whole_in_pieces() -> None:
    """The extra text (the fleet's: a hundred MB at 10,000 users) is written in pieces, large
    parts sliced and small ones joined: the body is the registry's text then every part, byte
    for byte, of the announced length; HEAD announces it and sends nothing; gzip decodes to
    the same."""
    from prometheus_client import CollectorRegistry, Counter

    from cometstream.observe.http import HttpServer

    registry = CollectorRegistry()
    Counter("cometstream_test_total", "a series of ours", registry=registry).inc()
    big = bytes(range(256)) * (3 * 4096 + 17)  # 3 MiB and a bit: sliced
    small = [b"x_%d 1\n" % i for i in range(200_000)]  # 2 MB in small parts: joined
    parts = [b"# head\n", big, b"", *small, big[:1000], b"# tail\n"]

    async def extra(keep: bool) -> list[bytes]:
        return parts

    server = HttpServer(registry, list, host="127.0.0.1", port=0, extra=extra)
    await server.start()
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            async with http.get(server.url + "/metrics",
                                headers={"Accept-Encoding": "identity"}) as r:
                body = await r.read()
                length = int(r.headers["Content-Length"])
            async with http.head(server.url + "/metrics",
                                 headers={"Accept-Encoding": "identity"}) as h:
                assert await h.read() == b""
                assert int(h.headers["Content-Length"]) == length
            async with http.get(server.url + "/metrics",
                                headers={"Accept-Encoding": "gzip"}) as g:
                zipped = gzip.decompress(await g.read())
    finally:
        await server.stop()
    ours = body[:body.index(b"# head\n")]
    assert b"cometstream_test_total 1.0" in ours
    assert body == ours + b"".join(parts)
    assert length == len(body)
    assert zipped == body


def test_a_batch_observed_at_once_lands_where_each_value_would() -> None:
    """Acknowledgements observe their batch's latencies at once (sorted, then bisected per
    bucket): the buckets, the count and the sum must be those of observing each value, bounds
    themselves (a value equal to a bound belongs to it), values below the first and beyond the
    last included. Seeded."""
    import random

    from cometstream.observe.metrics import LATENCY_BUCKETS, Histogram

    rng = random.Random(3)
    for _ in range(500):
        one, many = Histogram(), Histogram()
        values = [rng.choice([rng.random() * 90, rng.choice(LATENCY_BUCKETS), 0.0, -0.5,
                              rng.expovariate(50)]) for _ in range(rng.randrange(300))]
        for v in values:
            one.observe(v)
        many.observe_many(v for v in values)  # (any iterable)
        assert many.counts == one.counts and many.count == one.count == len(values)
        assert abs(many.sum - one.sum) < 1e-6
