"""The webhook sink against real aiohttp receivers on 127.0.0.1, driven through the daemon:
events come from the simulator over a real websocket, a file sink runs beside the webhook."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from cometstream.config import Section
from cometstream.errors import ConfigError, SinkError
from cometstream.events import Event
from cometstream.protocol import decode_frame
from cometstream.simulator import Simulator
from cometstream.sinks.webhook import (
    RETRY_AFTER_MAX,
    WebhookSink,
    parse_retry_after,
    signature,
)

from .conftest import MEMORY, make_config, running, wait_until

#: a URL path that stands for a secret (Slack/Teams-style webhook URLs): it must never be logged
HOOK_PATH = "/hooks/s3cr3t-path-token"


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    sleep: float = 0.0  # answer only after this long (past the sink's timeout: a timeout)
    delay: float = 0.0  # answer ``status`` after this long (within the sink's timeout)
    hang: bool = False  # never answer (until the test ends)


@dataclass
class Req:
    body: bytes
    headers: CIMultiDictProxy[str]
    at: float
    #: the status answered at once; None for a request that slept or hung (the client gave up)
    status: int | None = None
    #: when the reply was sent (0: not yet)
    ended: float = 0.0

    @property
    def events(self) -> list[Any]:
        doc = orjson.loads(self.body)
        return doc if isinstance(doc, list) else [doc]


class Receiver:
    """An HTTP endpoint that records every POST and answers from ``plan`` (in order), else from
    ``rule(req)``, else 200."""

    def __init__(self) -> None:
        self.requests: list[Req] = []
        self.plan: list[Reply] = []
        self.rule: Callable[[Req], Reply | None] = lambda req: None
        self.release = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(HOOK_PATH, self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}{HOOK_PATH}"

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        req = Req(await request.read(), request.headers, time.monotonic())
        self.requests.append(req)
        reply = self.plan.pop(0) if self.plan else (self.rule(req) or Reply())
        if reply.hang:
            await self.release.wait()
            # released in time, the client gets this 200: it counts as accepted
            req.status = reply.status
        elif reply.sleep:
            await asyncio.sleep(reply.sleep)
        else:
            if reply.delay:
                await asyncio.sleep(reply.delay)
            req.status = reply.status
        req.ended = time.monotonic()
        return web.Response(status=reply.status, headers=reply.headers, body=reply.body)

    @property
    def accepted(self) -> list[Req]:
        return [r for r in self.requests if r.status is not None and 200 <= r.status < 300]

    def accepted_events(self) -> list[bytes]:
        """The event bytes of the accepted POSTs (batch 1), in order, HELLO (4000) left out."""
        return [r.body for r in self.accepted if r.events[0].get("Type") != 4000]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


def _hook(receiver: Receiver, **opts: Any) -> dict[str, Any]:
    return {"type": "webhook", "url": receiver.url, "timeout": 2.0, **opts}


def _fast_retries(d: Any) -> None:
    """Quick retries (set before the workers start, like the pipeline tests do)."""
    d.daemon.pipeline.retry_initial = 0.01
    d.daemon.pipeline.retry_max = 0.05


def _dead_letters(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def _job(guid: str) -> dict[str, Any]:
    return {"Actor": "a", "Type": 4201, "Timestamp": 1733400000,
            "Data": {"GUID": guid, "Username": "alice", "Status": 5000, "EndTime": 1733400000}}


# --- the happy path ----------------------------------------------------------------------------------
async def test_each_event_is_posted_as_the_servers_bytes_with_headers(
        sim: Simulator, tmp_path: Path, receiver: Receiver,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """batch = 1: one POST per event whose body is the event's bytes, with the documented headers
    and the configured ones (inline, from env, from a file); the file sink gets the same."""
    monkeypatch.setenv("HOOK_TOKEN_TEST", "Bearer from-env")
    (tmp_path / "team").write_text("ops-from-file\n", encoding="utf-8")
    path = tmp_path / "ev.jsonl"
    cfg = make_config(sim.url, tmp_path, exact=True, sinks={
        "hook": _hook(receiver, headers={
            "X-Inline": "inline-value",
            "Authorization": {"env": "HOOK_TOKEN_TEST"},
            "X-Team": {"file": str(tmp_path / "team")},
        }),
        "file": {"type": "file", "path": str(path), "format": "event"},
    })
    async with running(cfg) as d:
        await wait_until(lambda: d.sink_stats("hook").delivered == 1, what="HELLO posted")
        sent = sim.emit_many(30)
        await wait_until(lambda: d.sink_stats("hook").delivered == 31
                         and d.sink_stats("file").delivered == 31, what="delivery")
    # several POSTs in flight: every event once, in order per resource
    assert sorted(receiver.accepted_events()) == sorted(sent)
    assert _per_resource(receiver.accepted_events()) == _per_resource(sent)
    assert path.read_bytes().splitlines()[1:] == sent
    reqs = receiver.requests
    assert len(reqs) == 31  # nothing retried, nothing doubled
    for req in reqs:
        h = req.headers
        assert h["Content-Type"] == "application/json"
        assert h["User-Agent"].startswith("cometstream/")
        assert h["cometstream-origin"] == "stream"
        assert h["cometstream-server"] == "sim"
        assert abs(float(h["cometstream-received-at"]) - time.time()) < 60
        assert h["X-Inline"] == "inline-value"
        assert h["Authorization"] == "Bearer from-env"
        assert h["X-Team"] == "ops-from-file"
        assert len(h["Idempotency-Key"]) == 32
        assert "X-Cometstream-Signature" not in h  # no secret configured
    assert len({r.headers["X-Comet-Tracing-Id"] for r in reqs}) == 31
    assert len({r.headers["Idempotency-Key"] for r in reqs}) == 31


async def test_signature_verifies_with_the_secret(sim: Simulator, tmp_path: Path,
                                                  receiver: Receiver,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With a secret (here from COMETSTREAM_WEBHOOK_SECRET_<NAME>), each POST carries a timestamp
    and an HMAC-SHA256 of "timestamp.body" that the receiver can recompute."""
    secret = "wh-s3cret-é"
    monkeypatch.setenv("COMETSTREAM_WEBHOOK_SECRET_MY_HOOK_1", secret)
    cfg = make_config(sim.url, tmp_path, exact=True, sinks={
        "my-hook.1": _hook(receiver, format="envelope")})
    async with running(cfg) as d:
        await wait_until(lambda: d.sink_stats("my-hook.1").delivered == 1, what="HELLO")
        await d.synced()
        sim.emit_many(5)
        await wait_until(lambda: d.sink_stats("my-hook.1").delivered == 6, what="delivery")
    assert len(receiver.requests) == 6
    for req in receiver.requests:
        ts = req.headers["X-Cometstream-Timestamp"]
        assert abs(int(ts) - time.time()) < 60
        mac = hmac.new(secret.encode(), ts.encode() + b"." + req.body, hashlib.sha256)
        assert hmac.compare_digest(req.headers["X-Cometstream-Signature"],
                                   "sha256=" + mac.hexdigest())
        assert set(orjson.loads(req.body)) == {"server", "origin", "received_at", "type_name",
                                                "event"}
    # the helper computes the same; a changed body or timestamp does not verify
    req = receiver.requests[-1]
    ts = req.headers["X-Cometstream-Timestamp"]
    assert signature(secret.encode(), ts, req.body) == req.headers["X-Cometstream-Signature"]
    assert signature(secret.encode(), ts, req.body + b" ") != req.headers["X-Cometstream-Signature"]
    assert signature(secret.encode(), str(int(ts) + 1), req.body) != \
        req.headers["X-Cometstream-Signature"]


async def test_batch_posts_a_json_array_of_the_events_bytes(sim: Simulator, tmp_path: Path,
                                                            receiver: Receiver) -> None:
    """batch = 5: up to five events per POST, the body their bytes joined into a JSON array."""
    cfg = make_config(sim.url, tmp_path, exact=True, sinks={
        "hook": _hook(receiver, batch=5, concurrency=1)})
    async with running(cfg) as d:
        await wait_until(lambda: d.sink_stats("hook").delivered == 1, what="HELLO")
        await d.synced()
        sent = sim.emit_many(200)
        await wait_until(lambda: d.sink_stats("hook").delivered == 201, what="delivery")
    bodies = [r.body for r in receiver.accepted]
    assert all(b.startswith(b"[") and b.endswith(b"]") for b in bodies)
    sizes = [len(r.events) for r in receiver.accepted]
    assert max(sizes) == 5 and sum(sizes) == 201
    # the bytes of the events, joined: nothing re-serialized
    assert b"".join(bodies[1:]) == b"".join(
        b"[" + b",".join(sent[i:i + n]) + b"]"
        for i, n in zip(_offsets(sizes[1:]), sizes[1:], strict=True))
    assert all(r.headers["cometstream-origin"] == "stream" for r in receiver.accepted)


def _offsets(sizes: list[int]) -> list[int]:
    out, at = [], 0
    for n in sizes:
        out.append(at)
        at += n
    return out


# --- retries -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [503, 409, 425])
async def test_503_then_200_delivers_each_event_once(sim: Simulator, tmp_path: Path,
                                                     receiver: Receiver, status: int) -> None:
    """Two 503s (or a 409, "the first attempt with this Idempotency-Key is still being
    processed", or a 425 Too Early, then a 503) then 200s: every event is accepted exactly once,
    in order; retries of an event keep its Idempotency-Key and get a new X-Comet-Tracing-Id."""
    cfg = make_config(sim.url, tmp_path, exact=True, sinks={
        "hook": _hook(receiver, concurrency=1)})
    async with running(cfg) as d:
        _fast_retries(d)
        await wait_until(lambda: d.sink_stats("hook").delivered == 1, what="HELLO")
        receiver.plan = [Reply(status, body=b"busy"), Reply(503)]
        sent = sim.emit_many(10)
        await wait_until(lambda: d.sink_stats("hook").delivered == 11, what="delivery")
        st = d.sink_stats("hook")
        assert st.errors == 2 and not st.failing and st.dropped["rejected"] == 0
    assert receiver.accepted_events() == sent
    first_three = receiver.requests[1:4]
    assert [r.status for r in first_three] == [status, 503, 200]
    assert len({r.headers["Idempotency-Key"] for r in first_three}) == 1
    assert len({r.headers["X-Comet-Tracing-Id"] for r in first_three}) == 3
    assert len(receiver.requests) == 13


async def test_429_retry_after_is_honoured(sim: Simulator, tmp_path: Path,
                                           receiver: Receiver) -> None:
    """A 429 with Retry-After: 1 holds the retry back a second, though the backoff is 10 ms."""
    cfg = make_config(sim.url, tmp_path, exact=True, sinks={"hook": _hook(receiver)})
    async with running(cfg) as d:
        _fast_retries(d)
        await wait_until(lambda: d.sink_stats("hook").delivered == 1, what="HELLO")
        # the baseline sync first: an event it synthesized must not take the reply planned
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        base = d.sink_stats("hook").delivered
        await wait_until(lambda: len(receiver.requests) == base, what="baseline delivered")
        receiver.plan = [Reply(429, headers={"Retry-After": "1"})]
        sent = sim.emit_many(1)
        await wait_until(lambda: d.sink_stats("hook").delivered == base + 1, what="delivery")
    refused, retried = receiver.requests[base:]
    assert refused.status == 429 and retried.status == 200
    assert retried.at - refused.at >= 0.95
    assert [r.body for r in receiver.requests[base:] if r.status == 200] == sent


async def test_a_receiver_that_times_out_then_recovers_gets_the_event(
        sim: Simulator, tmp_path: Path, receiver: Receiver) -> None:
    """A POST that outlasts ``timeout`` is retried; the retry (same Idempotency-Key) is accepted."""
    cfg = make_config(sim.url, tmp_path, exact=True, sinks={
        "hook": _hook(receiver, timeout=0.3, concurrency=1)})
    async with running(cfg) as d:
        _fast_retries(d)
        await wait_until(lambda: d.sink_stats("hook").delivered == 1, what="HELLO")
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        base = d.sink_stats("hook").delivered
        await wait_until(lambda: len(receiver.requests) == base, what="baseline delivered")
        receiver.plan = [Reply(sleep=1.5)]
        sent = sim.emit_many(3)
        await wait_until(lambda: d.sink_stats("hook").delivered == base + 3, what="delivery")
        assert d.sink_stats("hook").errors == 1
    slow, retry = receiver.requests[base:base + 2]
    assert slow.status is None and retry.status == 200
    assert slow.body == retry.body == sent[0]
    assert slow.headers["Idempotency-Key"] == retry.headers["Idempotency-Key"]
    assert retry.at - slow.at >= 0.25
    assert receiver.accepted_events() == sent


async def test_a_hung_receiver_does_not_delay_the_file_sink(sim: Simulator, tmp_path: Path,
                                                            receiver: Receiver) -> None:
    """With the webhook hung (drop_newest, small buffer), the file sink beside it still gets every
    event at once; the webhook's overflow is counted as dropped, and it catches up afterwards."""
    path = tmp_path / "ev.jsonl"
    cfg = make_config(sim.url, tmp_path, exact=True, spool=MEMORY, sinks={
        "hook": _hook(receiver, max_retries=-1, buffer=10, when_full="drop_newest",
                      concurrency=1),
        "file": {"type": "file", "path": str(path), "format": "event"},
    })
    async with running(cfg) as d:
        _fast_retries(d)
        await wait_until(lambda: d.sink_stats("hook").delivered == 1, what="HELLO")
        receiver.rule = lambda req: Reply(hang=True) if not receiver.release.is_set() else None
        sent = sim.emit_many(300)
        await wait_until(lambda: d.sink_stats("file").delivered == 301, what="file delivery")
        hook = d.sink_stats("hook")
        # not held back by the webhook: the file had every event while the webhook's first
        # POST (if it was sent yet) still hung, before its timeout (2 s) let it try again
        assert hook.errors == 0 and len(receiver.requests) <= 2, len(receiver.requests)
        assert path.read_bytes().splitlines()[1:] == sent
        assert hook.delivered == 1
        assert hook.dropped["queue_full"] > 0
        await wait_until(lambda: hook.failing, what="webhook reported failing")
        assert "timed out" in hook.last_error
        receiver.release.set()
        await wait_until(lambda: hook.delivered + hook.dropped["queue_full"] == 301,
                         what="webhook catches up")
        assert not hook.failing
    # a POST released just as the client timed out may be answered 200 and then retried:
    # at least once per event, so compare the distinct events
    delivered = list(dict.fromkeys(receiver.accepted_events()))
    assert len(delivered) == 300 - hook.dropped["queue_full"]
    assert _is_subsequence(delivered, sent)  # in order; what is missing was dropped


def _per_resource(bodies: list[bytes]) -> dict[str, list[bytes]]:
    """The events grouped by ResourceID (job events also by GUID), each group in order."""
    out: dict[str, list[bytes]] = {}
    for body in bodies:
        doc = orjson.loads(body)
        keys = []
        if doc.get("ResourceID"):
            keys.append("r:" + doc["ResourceID"])
        if doc.get("Type") in (4200, 4201):
            keys.append("j:" + doc["Data"]["GUID"])
        for k in keys:
            out.setdefault(k, []).append(body)
    return out


def _is_subsequence(part: list[bytes], whole: list[bytes]) -> bool:
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


# --- refusals --------------------------------------------------------------------------------------------
async def test_a_400_dead_letters_that_event_and_the_next_ones_go_through(
        sim: Simulator, tmp_path: Path, receiver: Receiver) -> None:
    """A 400 refuses only its event: it goes to the dead-letter file with the status and the
    reply's excerpt; the events after it are still delivered."""
    dl = tmp_path / "dead.jsonl"
    cfg = make_config(sim.url, tmp_path, exact=True, sinks={
        "hook": _hook(receiver, dead_letter=str(dl))})

    def rule(req: Req) -> Reply | None:
        data = req.events[0].get("Data")
        guid = data.get("GUID") if isinstance(data, dict) else None
        if guid == "bad":
            return Reply(400, body=b'{"error": "unknown field \\"Pad\\""}\n' + b"x" * 1000)
        return None

    receiver.rule = rule
    async with running(cfg) as d:
        _fast_retries(d)
        await wait_until(lambda: d.sink_stats("hook").delivered == 1, what="HELLO")
        sent = [sim.emit(_job(g)) for g in ("ok-1", "bad", "ok-2", "ok-3")]
        await wait_until(lambda: d.sink_stats("hook").delivered == 4
                         and d.sink_stats("hook").dropped["rejected"] == 1, what="outcomes")
    assert sorted(receiver.accepted_events()) == sorted([sent[0], sent[2], sent[3]])
    assert len(receiver.requests) == 5  # a refusal is not retried
    letters = _dead_letters(dl)
    assert [dl_["event"]["Data"]["GUID"] for dl_ in letters] == ["bad"]
    (bad,) = letters
    assert bad["sink"] == "hook" and abs(bad["failed_at"] - time.time()) < 60
    assert "HTTP 400" in bad["error"] and 'unknown field' in bad["error"]
    assert len(bad["error"]) < 400  # an excerpt, not the whole reply
    assert orjson.dumps(bad["event"]) == orjson.dumps(orjson.loads(sent[1]))
    for letter in letters:
        assert "s3cr3t" not in letter["error"]  # the URL's path is never in messages


async def test_max_retries_exhausted_dead_letters_the_event(sim: Simulator, tmp_path: Path,
                                                            receiver: Receiver) -> None:
    """An event refused with 503 past max_retries = 2 (three attempts) is dead-lettered; the
    next event is delivered."""
    dl = tmp_path / "dead.jsonl"
    cfg = make_config(sim.url, tmp_path, exact=True, sinks={
        "hook": _hook(receiver, max_retries=2, dead_letter=str(dl))})
    receiver.rule = lambda req: Reply(503) if b'"doomed"' in req.body else None
    async with running(cfg) as d:
        _fast_retries(d)
        await wait_until(lambda: d.sink_stats("hook").delivered == 1, what="HELLO")
        sim.emit(_job("doomed"))
        ok = await _flowing(sim, lambda: d.sink_stats("hook").dropped["rejected"] == 1)
        await wait_until(lambda: d.sink_stats("hook").delivered == 1 + len(ok), what="the rest")
    doomed = [r for r in receiver.requests if b'"doomed"' in r.body]
    assert len(doomed) >= 3  # the first POST and two retries while others were accepted
    assert len({r.headers["Idempotency-Key"] for r in doomed}) == 1
    (letter,) = _dead_letters(dl)
    assert letter["event"]["Data"]["GUID"] == "doomed"
    assert "HTTP 503" in letter["error"]
    assert "2 of them while the sink accepted others" in letter["error"]
    assert sorted(receiver.accepted_events()) == sorted(ok)


async def _flowing(sim: Simulator, done: Callable[[], bool], every: float = 0.02,
                   timeout: float = 20.0) -> list[bytes]:
    """Job completions emitted one at a time until ``done()``: what a sink with one failing
    event keeps accepting meanwhile (the failures of that event count only then)."""
    sent: list[bytes] = []
    async with asyncio.timeout(timeout):
        while not done():
            sent.append(sim.emit(_job(f"fine-{len(sent)}")))
            await asyncio.sleep(every)
    return sent


@pytest.mark.parametrize(("status", "concurrency"), [
    (401, 32), (403, 32), (404, 32), (301, 32), (503, 32), (401, 1), (301, 1)])
async def test_a_receiver_refusing_every_post_dead_letters_nothing(
        sim: Simulator, tmp_path: Path, receiver: Receiver, status: int,
        concurrency: int) -> None:
    """A receiver that refuses every POST (an expired token: 401; a wrong url: 404, 301; down:
    503), for far longer than max_retries: the sink reports failing, with the status, and no
    event is dead-lettered; once the receiver is fixed, every event is delivered. Serial too,
    for the answers about the sink."""
    dl = tmp_path / "dead.jsonl"
    cfg = make_config(sim.url, tmp_path, exact=True, sinks={
        "hook": _hook(receiver, max_retries=2, dead_letter=str(dl), concurrency=concurrency)})
    receiver.rule = lambda req: Reply(status, headers={"Location": "http://elsewhere.invalid/"})
    async with running(cfg) as d:
        _fast_retries(d)
        await wait_until(lambda: len(receiver.requests) >= 1, what="the HELLO's POST")
        sent = [sim.emit(_job(f"j-{i}")) for i in range(20)]
        if concurrency > 1:  # (serial: the HELLO is refused over and over, the rest waits)
            await wait_until(lambda: {r.body for r in receiver.requests} >= set(sent),
                             what="every event refused")
        await wait_until(lambda: len(receiver.requests) >= (200 if concurrency > 1 else 40),
                         what="many refusals (max_retries = 2)")
        st = d.sink_stats("hook")
        assert st.failing and f"HTTP {status}" in st.last_error
        assert st.dropped["rejected"] == 0 and st.delivered == 0 and not dl.exists()
        reasons = " ".join(d.daemon.not_ready_reasons())  # what /readyz answers, with 503
        assert "hook" in reasons and f"HTTP {status}" in reasons
        receiver.rule = lambda req: None  # the token renewed, the url fixed, the server back
        await wait_until(lambda: d.sink_stats("hook").delivered == 21, what="all delivered")
        assert not d.sink_stats("hook").failing
    assert sorted(receiver.accepted_events()) == sorted(sent)
    assert not dl.exists()


# --- several POSTs in flight -------------------------------------------------------------------------
def _jobs_start_and_complete(sim: Simulator, n: int) -> list[bytes]:
    """``n`` jobs, each started and completed back to back: 2n events emitted at once."""
    sent = []
    for _ in range(n):
        start = sim.world.start_job()
        sent.append(sim.emit(start))
        sent.append(sim.emit(sim.world.complete_job(start["Data"]["GUID"])))
    return sent


def _max_in_flight(reqs: list[Req]) -> int:
    marks = sorted([(r.at, 1) for r in reqs] + [(r.ended, -1) for r in reqs])
    most = now = 0
    for _t, d in marks:
        now += d
        most = max(most, now)
    return most


async def test_concurrent_posts_keep_each_jobs_start_before_its_completion(
        sim: Simulator, tmp_path: Path, receiver: Receiver) -> None:
    """With the default concurrency several POSTs are in flight at once, yet a job's start and
    completion (same ResourceID and GUID) are never in flight together: the completion is sent
    only once the start was answered. Every event is accepted once."""
    import random
    rng = random.Random(5)
    receiver.rule = lambda req: Reply(delay=rng.uniform(0.0, 0.03))
    cfg = make_config(sim.url, tmp_path, exact=True, sinks={"hook": _hook(receiver)})
    async with running(cfg) as d:
        await wait_until(lambda: d.sink_stats("hook").delivered == 1, what="HELLO")
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        base = d.sink_stats("hook").delivered
        await wait_until(lambda: len(receiver.requests) == base, what="baseline delivered")
        sent = _jobs_start_and_complete(sim, 60)
        await wait_until(lambda: d.sink_stats("hook").delivered == base + 120, timeout=15,
                         what="delivery")
    reqs = receiver.requests[base:]
    assert sorted(r.body for r in reqs) == sorted(sent)  # each once, nothing retried
    assert _max_in_flight(reqs) > 4  # really concurrent
    by_body = {r.body: r for r in reqs}
    for start, done in zip(sent[::2], sent[1::2], strict=True):
        assert by_body[start].ended <= by_body[done].at, "completion sent before start answered"


async def test_fail_once_receiver_gets_every_event_and_the_file_sink_is_not_held(
        sim: Simulator, tmp_path: Path, receiver: Receiver) -> None:
    """The first POST of each event answered 503, or 429 with Retry-After: 1, or held past the
    sink's timeout, each for a fifth of the events: all are accepted (progress resets the
    backoff, a request retries while the others go on), none dead-lettered, and the file sink
    beside it has them all while the webhook is still retrying."""
    attempts: dict[str, int] = {}

    def rule(req: Req) -> Reply | None:
        key = req.headers["Idempotency-Key"]
        n = attempts[key] = attempts.get(key, 0) + 1
        if n > 1:
            return None
        kind = int(key, 16) % 5
        return [Reply(503), Reply(429, headers={"Retry-After": "1"}), Reply(sleep=1.0),
                None, None][kind]
    receiver.rule = rule
    path = tmp_path / "ev.jsonl"
    cfg = make_config(sim.url, tmp_path, exact=True, sinks={
        "hook": _hook(receiver, timeout=0.5),
        "file": {"type": "file", "path": str(path), "format": "event"}})
    async with running(cfg) as d:
        # the pipeline's default backoff (0.5 s growing to 30 s), not the tests' fast one
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        hook, file = d.sink_stats("hook"), d.sink_stats("file")
        await wait_until(lambda: hook.delivered == file.delivered, what="baseline delivered")
        base = hook.delivered
        sent = [sim.emit(_job(f"job-{i}")) for i in range(60)]
        await wait_until(lambda: file.delivered == base + 60, what="file delivery")
        assert hook.delivered < base + 60  # the file sink did not wait for the webhook
        await wait_until(lambda: hook.delivered == base + 60, timeout=60, what="all accepted")
        assert hook.dropped["rejected"] == 0 and not hook.failing
    assert sorted(set(receiver.accepted_events())) == sorted(sent)
    kinds = [int(k, 16) % 5 for k in attempts]
    assert kinds.count(0) and kinds.count(1) and kinds.count(2)  # every kind of failure met


async def test_a_429_pauses_every_post_of_the_sink(sim: Simulator, tmp_path: Path,
                                                   receiver: Receiver) -> None:
    """A 429 with Retry-After: 1 pauses the whole sink, not only the refused request: no POST
    starts until the second has passed."""
    refused: list[Req] = []

    def rule(req: Req) -> Reply | None:
        if not refused and b'"slow-down"' in req.body:
            refused.append(req)
            return Reply(429, headers={"Retry-After": "1"})
        return None
    receiver.rule = rule
    cfg = make_config(sim.url, tmp_path, exact=True, sinks={"hook": _hook(receiver)})
    async with running(cfg) as d:
        _fast_retries(d)
        await wait_until(lambda: d.sink_stats("hook").delivered == 1, what="HELLO")
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        base = d.sink_stats("hook").delivered
        await wait_until(lambda: len(receiver.requests) == base, what="baseline delivered")
        sim.emit(_job("slow-down"))
        await wait_until(lambda: refused and refused[0].ended, what="the 429")
        sent = [sim.emit(_job(f"after-{i}")) for i in range(20)]
        await wait_until(lambda: d.sink_stats("hook").delivered == base + 21, what="delivery")
    t429 = refused[0].ended
    later = [r for r in receiver.requests[base:] if r is not refused[0]]
    assert len(later) == 21 and all(r.status == 200 for r in later)
    assert min(r.at for r in later) - t429 >= 0.9
    assert sorted(r.body for r in later if b'"slow-down"' not in r.body) == sorted(sent)


async def test_an_event_past_max_retries_is_dead_lettered_while_the_others_go_on(
        sim: Simulator, tmp_path: Path, receiver: Receiver) -> None:
    """One event always answered 503: the events after it are accepted while it is retried;
    past max_retries only it is dead-lettered."""
    dl = tmp_path / "dead.jsonl"
    cfg = make_config(sim.url, tmp_path, exact=True, sinks={
        "hook": _hook(receiver, max_retries=3, dead_letter=str(dl))})
    receiver.rule = lambda req: Reply(503) if b'"doomed"' in req.body else None
    async with running(cfg) as d:
        d.daemon.pipeline.retry_initial = 0.2  # (the three retries take a moment)
        d.daemon.pipeline.retry_max = 0.2
        await wait_until(lambda: d.sink_stats("hook").delivered == 1, what="HELLO")
        sim.emit(_job("doomed"))
        ok = await _flowing(sim, lambda: d.sink_stats("hook").dropped["rejected"] == 1,
                            every=0.05)
        await wait_until(lambda: d.sink_stats("hook").delivered == 1 + len(ok),
                         what="the others")
    doomed = [r for r in receiver.requests if b'"doomed"' in r.body]
    assert len(doomed) >= 4  # the first POST and three retries while others were accepted
    fine = [r for r in receiver.accepted if b'"fine-' in r.body]
    # they did not wait for it: others were accepted between its first and its last attempt
    # (one sent beside its last attempt may end after it: that one proves nothing either way)
    during = [r for r in fine if doomed[0].ended < r.ended < doomed[-1].at]
    assert len(during) >= 3, (len(during), len(fine))
    assert sorted(receiver.accepted_events()) == sorted(ok)
    (letter,) = _dead_letters(dl)
    assert letter["event"]["Data"]["GUID"] == "doomed"


async def test_an_unreachable_receiver_is_retried(sim: Simulator, tmp_path: Path) -> None:
    """Connection refused is retryable (the sink reports failing, nothing is dropped), and
    max_retries = -1 means the pipeline never gives up."""
    dead = Receiver()
    await dead.start()
    url = dead.url
    await dead.stop()  # the port now refuses connections
    cfg = make_config(sim.url, tmp_path, exact=True, shutdown={"timeout": 0.3}, spool=MEMORY,
                      sinks={"hook": {"type": "webhook", "url": url, "max_retries": -1}})
    async with running(cfg) as d:
        _fast_retries(d)
        await wait_until(lambda: d.sink_stats("hook").failing, what="failing")
        assert "cannot connect to http://127.0.0.1:" in d.sink_stats("hook").last_error
        await wait_until(lambda: d.sink_stats("hook").errors >= 15, what="more retries")
        st = d.sink_stats("hook")
        assert st.delivered == 0 and st.dropped["rejected"] == 0  # 15 > max_retries' default
        assert d.sink("hook").max_retries is None
    assert d.sink_stats("hook").dropped["shutdown"] == 1  # the HELLO, counted, not lost silently


# --- configuration ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("opts", "key", "words"), [
    ({}, "sinks.hook.url", "is required"),
    ({"url": "ftp://127.0.0.1/x"}, "sinks.hook.url", "http or https"),
    ({"url": "https://user:pa55word@example.com/x"}, "sinks.hook.url", "credentials"),
    ({"url": "https:///x"}, "sinks.hook.url", "no host"),
    ({"url": "https://example.com:99999/"}, "sinks.hook.url", "not a valid URL"),
    ({"headers": "Authorization: x"}, "sinks.hook.headers", "expected a table"),
    ({"headers": {"X-Num": 5}}, "sinks.hook.headers.X-Num", "expected a string"),
    ({"headers": {"X-A": {"env": "COMETSTREAM_TEST_SURELY_UNSET"}}}, "sinks.hook.headers.X-A",
     "COMETSTREAM_TEST_SURELY_UNSET"),
    ({"headers": {"X-A": {"file": "/nonexistent/token"}}}, "sinks.hook.headers.X-A",
     "file not found"),
    ({"headers": {"X-A": {"file": "a", "env": "B"}}}, "sinks.hook.headers.X-A", "exactly one"),
    ({"headers": {"X-A": {}}}, "sinks.hook.headers.X-A", "exactly one"),
    ({"headers": {"Content-Type": "text/plain"}}, "sinks.hook.headers.Content-Type",
     "set by the webhook sink"),
    ({"headers": {"x-cometstream-signature": "x"}}, "sinks.hook.headers.x-cometstream-signature",
     "set by the webhook sink"),
    ({"headers": {"Bad Name": "x"}}, "sinks.hook.headers.Bad Name", "header name"),
    ({"headers": {"X-A": "a\r\nInjected: 1"}}, "sinks.hook.headers.X-A", "line breaks"),
    ({"batch": 0}, "sinks.hook.batch", "between 1 and 1000"),
    ({"batch": 1.5}, "sinks.hook.batch", "integer"),
    ({"timeout": 0}, "sinks.hook.timeout", "> 0"),
    ({"concurrency": 0}, "sinks.hook.concurrency", "between 1 and 256"),
    ({"concurrency": "8"}, "sinks.hook.concurrency", "integer"),
    ({"max_retries": -2}, "sinks.hook.max_retries", ">= -1"),
    ({"format": "xml"}, "sinks.hook.format", "event, envelope"),
    ({"secret": "a", "secret_file": "/x"}, "sinks.hook.secret_file", "not both"),
    ({"secret": ""}, "sinks.hook.secret", "empty"),
    ({"secret_file": "/nonexistent/secret"}, "sinks.hook.secret_file", "file not found"),
    ({"tls_verify": "no"}, "sinks.hook.tls_verify", "true or false"),
    ({"ca_file": "/nonexistent/ca.pem"}, "sinks.hook.ca_file", "file not found"),
    ({"retries": 3}, "sinks.hook.retries", "unknown key"),
])
def test_config_errors_name_the_key(tmp_path: Path, opts: dict[str, Any], key: str,
                                    words: str) -> None:
    """Each bad option is a ConfigError naming sinks.hook.<key> and saying what is wrong."""
    sink = {"type": "webhook", "url": "https://example.com/hook", **opts}
    if not opts:  # the first case: no url at all
        del sink["url"]
    with pytest.raises(ConfigError) as info:
        make_config("http://127.0.0.1:9/", tmp_path, sinks={"hook": sink})
    assert info.value.key == key, str(info.value)
    assert words in info.value.problem, str(info.value)
    assert "pa55word" not in str(info.value)


async def test_the_environment_s_secret_wins_over_the_config_s(
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sink without a secret signs nothing; with one in the config and another in
    COMETSTREAM_WEBHOOK_SECRET_<NAME>, its POSTs are signed with the environment's."""
    monkeypatch.setenv("COMETSTREAM_WEBHOOK_SECRET_B", "from-env")
    ev = decode_frame(orjson.dumps(_job("signed")), received_at=time.time(), server="sim")
    assert isinstance(ev, Event)
    for name, extra in (("a", {}), ("b", {"secret": "from-config"})):
        sink = WebhookSink.from_config(name, Section(
            {"url": receiver.url, "format": "event", **extra}, f"sinks.{name}"))
        await sink.open()
        try:
            await sink.send([ev])
        finally:
            await sink.aclose()
    unsigned, signed = receiver.requests
    assert "X-Cometstream-Signature" not in unsigned.headers
    ts = signed.headers["X-Cometstream-Timestamp"]
    assert signed.headers["X-Cometstream-Signature"] == signature(b"from-env", ts, signed.body)


def test_options_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults follow the contract; max_retries = -1 means forever (None for the pipeline);
    header secrets come from env and files; the env secret wins over the config's."""
    monkeypatch.setenv("COMETSTREAM_WEBHOOK_SECRET_B", "from-env")
    (tmp_path / "tok").write_text("Bearer t0ken\r\n", encoding="utf-8")
    a = WebhookSink.from_config("a", Section({"url": "https://example.com/x", "format": "event"},
                                             "sinks.a"))
    assert (a.timeout, a.max_retries, a.batch, a.format, a.tls_verify) == (10.0, 10, 1, "event",
                                                                            True)
    assert a.headers == {}
    assert (a.concurrency, a.max_batch) == (16, 1)
    assert "example.com/x" not in repr(a) and "https://example.com:443" in repr(a)
    b = WebhookSink.from_config("b", Section(
        {"url": "http://h:8080/", "format": "envelope", "max_retries": -1, "batch": 50,
         "secret": "from-config", "headers": {"Authorization": {"file": "tok"}}},
        "sinks.b", base_dir=tmp_path))
    assert b.max_retries is None and b.batch == 50 and b.format == "envelope"
    assert (b.concurrency, b.max_batch) == (16, 50)
    assert b.headers == {"Authorization": "Bearer t0ken"}
    cfg = make_config("http://127.0.0.1:9/", tmp_path,
                      sinks={"hook": {"type": "webhook", "url": "https://example.com/"}})
    assert cfg.sinks[0].format == "event"


def test_retry_after_seconds_and_dates() -> None:
    """Retry-After in seconds or as an HTTP date, never negative, capped; junk is ignored."""
    now = 1_700_000_000.0
    assert parse_retry_after("1", now) == 1.0
    assert parse_retry_after(" 120 ", now) == 120.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:40 GMT", now) == pytest.approx(20.0)
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:00 GMT", now) == 0.0  # in the past
    assert parse_retry_after("99999", now) == RETRY_AFTER_MAX
    assert parse_retry_after("-5", now) == 0.0
    for junk in (None, "", "soon", "nan"):
        assert parse_retry_after(junk, now) is None


async def test_a_reply_cut_off_in_its_headers_is_retried_without_showing_them() -> None:
    """A receiver that closes the connection halfway through its reply's headers: retryable,
    and the message does not quote the partial headers (they may carry a cookie)."""
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nSet-Cookie: sess=c00kie-value-7\r\nContent-Le")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(half, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sink = WebhookSink.from_config("a", Section({"url": f"http://127.0.0.1:{port}/x"},
                                                "sinks.a"))
    await sink.open()
    try:
        event = Event(b'{"Type":4000}', {"Type": 4000}, 4000)
        with pytest.raises(SinkError) as info:
            await sink.send([event])
    finally:
        await sink.aclose()
        server.close()
        await server.wait_closed()
    assert info.value.retryable
    assert "c00kie" not in str(info.value) and "Set-Cookie" not in str(info.value)
    assert f"POST to http://127.0.0.1:{port} failed:" in str(info.value)


async def test_send_before_open_is_retryable() -> None:
    """A send on a sink that is not open is a retryable SinkError, not a crash."""
    sink = WebhookSink.from_config("a", Section({"url": "http://127.0.0.1:9/", "format": "event"},
                                                "sinks.a"))
    with pytest.raises(SinkError) as info:
        await sink.send([])
    assert info.value.retryable


# --- TLS ---------------------------------------------------------------------------------------------------
@pytest.fixture
def tls_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (made with the openssl command-line tool)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


async def test_https_verifies_with_ca_file_and_refuses_an_unknown_ca(
        tmp_path: Path, tls_cert: tuple[Path, Path]) -> None:
    """https: a private CA works with ca_file; without it the certificate is refused (retryable,
    said in the error); tls_verify = false accepts it."""
    cert, key = tls_cert
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    got: list[bytes] = []

    async def handle(request: web.Request) -> web.Response:
        got.append(await request.read())
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    url = f"https://127.0.0.1:{runner.addresses[0][1]}/hook"
    ev = decode_frame(orjson.dumps(_job("tls")), received_at=time.time(), server="sim")
    assert isinstance(ev, Event)

    async def deliver(**opts: Any) -> SinkError | None:
        sink = WebhookSink.from_config("t", Section({"url": url, "format": "event", **opts},
                                                    "sinks.t"))
        await sink.open()
        try:
            await sink.send([ev])
        except SinkError as exc:
            return exc
        finally:
            await sink.aclose()
        return None

    try:
        assert await deliver(ca_file=str(cert)) is None
        refused = await deliver()
        assert refused is not None and refused.retryable
        assert "certificate" in str(refused).lower() and "/hook" not in str(refused), refused
        assert await deliver(tls_verify=False) is None
    finally:
        await runner.cleanup()
    assert got == [ev.raw, ev.raw]
