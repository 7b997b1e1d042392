"""The Kafka sink against a real Kafka-protocol broker (Tansu) on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from cometstream.config import Section
from cometstream.errors import ConfigError
from cometstream.simulator import Simulator
from cometstream.sinks.kafka import KafkaSink

from .conftest import make_config, run_cli, running, wait_until, write_config
from .kafka_broker import Broker


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    b = Broker()
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


def _kafka(broker: Broker, **opts: Any) -> dict[str, Any]:
    return {"type": "kafka", "bootstrap_servers": broker.bootstrap, "topic": "comet.{type_name}",
            "key": "{ResourceID}", "linger_ms": 1, "request_timeout_ms": 2000, **opts}


async def test_every_event_lands_once_keyed_and_with_headers(sim: Simulator, broker: Broker,
                                                              tmp_path: Path) -> None:
    """Each event becomes one message: topic from the template, key from ResourceID, the
    server's bytes as value, and the three cometstream-* headers. The broker refuses the
    idempotent producer: with idempotence = "auto" that is one warning, not a failure."""
    cfg = make_config(sim.url, tmp_path, exact=True,
                      sinks={"bus": _kafka(broker, compression="gzip")})
    with structlog.testing.capture_logs() as logs:
        async with running(cfg) as d:
            d.daemon.pipeline.retry_initial = 0.05
            await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
            sent = sim.emit_many(300)
            await wait_until(lambda: d.sink_stats("bus").delivered == 301, timeout=20,
                             what="delivery to kafka")
            assert d.sink_stats("bus").errors == 0
    refused = [e for e in logs if "refuses the idempotent producer" in e["event"]]
    assert [(e["log_level"], e["sink"]) for e in refused] == [("warning", "bus")], logs
    msgs = await broker.consume(pattern=r"comet\..*", expect=301)
    assert len(msgs) == 301
    values = Counter(m.value for m in msgs)
    hello = [v for v in values if b'"Type":4000' in v]
    assert len(hello) == 1
    assert values - Counter(hello) == Counter(sent)  # each sent frame exactly as often as sent
    for m in msgs:
        doc = orjson.loads(m.value)
        assert m.topic == f"comet.{doc['TypeString']}"
        assert m.key == (doc["ResourceID"].encode() if doc.get("ResourceID") else None)
        headers = dict(m.headers)
        assert headers["cometstream-origin"] == b"stream"
        assert headers["cometstream-server"] == b"sim"
        assert float(headers["cometstream-received-at"]) > 1.7e9


async def test_keyed_events_go_to_the_java_clients_partition_in_order(sim: Simulator,
                                                                       broker: Broker,
                                                                       tmp_path: Path) -> None:
    """Record batches per partition: a keyed event lands on murmur2(key) % partitions (where the
    Java client and aiokafka's send() put it), and each key's events keep the stream's order."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.partitioner import murmur2

    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("parts", num_partitions=4, replication_factor=1)])
    finally:
        await admin.close()
    cfg = make_config(sim.url, tmp_path, exact=True,
                      sinks={"bus": _kafka(broker, topic="parts", max_batch_bytes=16384)})
    async with running(cfg) as d:
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        sent = sim.emit_many(600)
        await wait_until(lambda: d.sink_stats("bus").delivered == 601, timeout=20,
                         what="delivery to kafka")
    msgs = await broker.consume(["parts"], expect=601)
    assert len(msgs) == 601
    by_key: dict[bytes, list[bytes]] = {}
    for m in sorted(msgs, key=lambda m: (m.partition, m.offset)):
        if m.key is not None:
            assert m.partition == (murmur2(m.key) & 0x7FFFFFFF) % 4, m.key
            by_key.setdefault(m.key, []).append(m.value)
    assert len({m.partition for m in msgs if m.key is not None}) == 4
    expected: dict[bytes, list[bytes]] = {}
    for frame in sent:
        rid = orjson.loads(frame).get("ResourceID")
        if rid:
            expected.setdefault(rid.encode(), []).append(frame)
    assert by_key == expected


async def test_acks_0_delivers_every_event_once(sim: Simulator, broker: Broker,
                                                tmp_path: Path) -> None:
    """With acks = 0 the producer's futures hold no metadata: sent is delivered."""
    cfg = make_config(sim.url, tmp_path, exact=True,
                      sinks={"bus": _kafka(broker, topic="fire", acks=0, idempotence=False)})
    async with running(cfg) as d:
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        sim.emit_many(50)
        await wait_until(lambda: d.sink_stats("bus").delivered == 51, timeout=20,
                         what="delivery to kafka")
        assert d.sink_stats("bus").errors == 0
    assert len(await broker.consume(["fire"], expect=51)) == 51


async def test_a_failed_hand_over_after_an_oversized_event_is_retried_not_refused() -> None:
    """The producer refuses to take a record batch (timed out, closed, not authorized) after
    the sink found an oversized event further on: the events before it are retried, and none
    is refused for the oversized one's sake. (A fake producer: a real broker cannot be made to
    fail at that exact step.)"""
    from aiokafka.errors import KafkaTimeoutError, ProducerClosed, TopicAuthorizationFailedError
    from aiokafka.producer.message_accumulator import BatchBuilder

    from cometstream.errors import SinkError
    from cometstream.events import Event
    from cometstream.sinks.kafka import Template

    class Producer:
        _max_request_size = 1 << 20

        def __init__(self, fail: BaseException | None) -> None:
            self.fail = fail
            self.client = None

        async def partitions_for(self, topic: str) -> set[int]:
            return {0, 1, 2, 3}

        def create_batch(self) -> BatchBuilder:
            return BatchBuilder(16384, 0)

        async def send_batch(self, builder: BatchBuilder, topic: str, *,
                             partition: int) -> asyncio.Future[str]:
            if self.fail is not None:
                raise self.fail
            fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            fut.set_result("metadata")
            return fut

    def event(i: int, size: int = 100) -> Event:
        raw = b'{"Type":5000,"ResourceID":"r%d","Data":"%s"}' % (i, b"x" * size)
        return Event(raw, None, 5000, "stream", 1.0, "srv")  # type: ignore[arg-type]

    batch = [event(0), event(1), event(2, size=2 << 20)]  # the third is over the limit
    outcomes = []
    for fail in (None, KafkaTimeoutError(), ProducerClosed(), TopicAuthorizationFailedError()):
        sink = KafkaSink("k", bootstrap=["127.0.0.1:1"], topic=Template("t"),
                         key=Template("{ResourceID}"), fmt="event", acks="all",
                         idempotence="false", compression="none", linger_ms=1,
                         max_batch_bytes=1 << 20, request_timeout_ms=2000, client_id="x",
                         security={})
        sink._producer = Producer(fail)
        with pytest.raises(SinkError) as info:
            await sink.send(batch)
        outcomes.append((info.value.accepted, info.value.failed, info.value.retryable))
    # an ACL refusal is not the event's fault: retried, not dead-lettered event by event
    assert outcomes == [(2, 1, False), (0, 0, True), (0, 0, True), (0, 0, True)]


async def test_the_retry_rule_reads_aiokafka_s_retriable_flag() -> None:
    """A broker's answer on a record batch's future: a retriable one (a leader moving) is
    retried; a final refusal of the record (too large, corrupt) dead-letters that one event; a
    final refusal about the sink (not authorized) is retried. (A fake producer: Tansu, the
    tests' broker, accepts records of any size and moves no leaders.)"""
    from aiokafka.errors import (
        CorruptRecordException,
        MessageSizeTooLargeError,
        NotLeaderForPartitionError,
        RequestTimedOutError,
        TopicAuthorizationFailedError,
    )
    from aiokafka.producer.message_accumulator import BatchBuilder

    from cometstream.errors import SinkError
    from cometstream.events import Event
    from cometstream.sinks.kafka import Template

    class Producer:
        _max_request_size = 1 << 20
        client = None

        def __init__(self, answer: BaseException) -> None:
            self.answer = answer

        async def partitions_for(self, topic: str) -> set[int]:
            return {0}

        def create_batch(self) -> BatchBuilder:
            return BatchBuilder(16384, 0)

        async def send_batch(self, builder: BatchBuilder, topic: str, *,
                             partition: int) -> asyncio.Future[str]:
            fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            fut.set_exception(self.answer)
            return fut

    batch = [Event(b'{"Type":5000,"N":%d}' % i, None, 5000, "stream", 1.0, "srv")  # type: ignore[arg-type]
             for i in range(3)]
    outcomes = {}
    for answer in (NotLeaderForPartitionError(), RequestTimedOutError(),
                   MessageSizeTooLargeError(), CorruptRecordException(),
                   TopicAuthorizationFailedError()):
        sink = KafkaSink("k", bootstrap=["127.0.0.1:1"], topic=Template("t"), key=None,
                         fmt="event", acks="all", idempotence="false", compression="none",
                         linger_ms=1, max_batch_bytes=1 << 20, request_timeout_ms=2000,
                         client_id="x", security={})
        sink._producer = Producer(answer)
        with pytest.raises(SinkError) as info:
            await sink.send(batch)
        outcomes[type(answer).__name__] = (info.value.retryable, info.value.failed)
    assert outcomes == {"NotLeaderForPartitionError": (True, 0),
                        "RequestTimedOutError": (True, 0),
                        "MessageSizeTooLargeError": (False, 1),
                        "CorruptRecordException": (False, 1),
                        "TopicAuthorizationFailedError": (True, 0)}


async def test_a_broker_outage_loses_nothing_queued_or_sent_after(sim: Simulator, broker: Broker,
                                                                    tmp_path: Path) -> None:
    """The broker dies mid-stream and comes back (empty: memory storage). Events queued while
    it was down and events after it came back all land; the sink reported failing meanwhile,
    and a file sink beside it never waited."""
    path = tmp_path / "events.jsonl"
    cfg = make_config(sim.url, tmp_path, exact=True, sinks={
        "bus": _kafka(broker, topic="comet.events", key="{Data.GUID}"),
        "file": {"type": "file", "path": str(path), "format": "event"},
    })
    async with running(cfg) as d:
        d.daemon.pipeline.retry_initial = 0.05
        d.daemon.pipeline.retry_max = 0.5
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        before = sim.emit_many(50)
        await wait_until(lambda: d.sink_stats("bus").delivered == 51, timeout=20, what="before")
        # on the broker before the outage (which empties it: memory storage)
        landed = await broker.consume(["comet.events"], expect=51)
        assert set(before) <= {m.value for m in landed}
        await broker.stop()
        during = sim.emit_many(100)
        await wait_until(lambda: d.sink_stats("file").delivered == 151, what="file goes on")
        await wait_until(lambda: d.sink_stats("bus").failing, timeout=10, what="failing")
        assert d.daemon.not_ready_reasons()  # /readyz would say 503
        await broker.start()
        after = sim.emit_many(50)
        await wait_until(lambda: d.sink_stats("bus").delivered == 201, timeout=30,
                         what="catch-up after the outage")
        assert not d.sink_stats("bus").failing
        assert d.sink_stats("bus").dropped == {} or sum(d.sink_stats("bus").dropped.values()) == 0
    msgs = await broker.consume(["comet.events"], expect=150)
    got = Counter(m.value for m in msgs)
    assert all(got[raw] >= 1 for raw in during + after)  # at least once, nothing lost
    assert len(path.read_bytes().splitlines()) == 201


def _opts(**kw: Any) -> Section:
    base = {"bootstrap_servers": "127.0.0.1:9092", "topic": "t", "format": "event"}
    base.update(kw)
    return Section(base, "sinks.bus")


@pytest.mark.parametrize(("opts", "key", "words"), [
    ({"bootstrap_servers": "nohostport"}, "sinks.bus.bootstrap_servers", "host:port"),
    ({"topic": ""}, "sinks.bus.topic", "empty"),
    ({"topic": "a.{Data..x}"}, "sinks.bus.topic", "bad field"),
    ({"key": "{Data..x}"}, "sinks.bus.key", "bad field"),
    ({"acks": "two"}, "sinks.bus.acks", 'expected 0, 1 or "all"'),
    ({"acks": 1, "idempotence": True}, "sinks.bus.idempotence", 'acks = "all"'),
    ({"compression": "brotli"}, "sinks.bus.compression", "expected one of"),
    ({"security_protocol": "SASL_SSL"}, "sinks.bus.sasl_username", "required"),
    ({"sasl_username": "u"}, "sinks.bus.sasl_username", "SASL"),
    ({"lingerms": 5}, "sinks.bus.lingerms", "unknown key"),
])
def test_kafka_options_are_validated(opts: dict[str, Any], key: str, words: str) -> None:
    """Bad Kafka options are one ConfigError naming the key."""
    with pytest.raises(ConfigError) as info:
        KafkaSink.from_config("bus", _opts(**opts))
    assert info.value.key == key and words in str(info.value)


def test_templates_render_event_fields() -> None:
    """Topic and key templates take SEVT names and dotted fields; missing fields are empty."""
    from cometstream.protocol import decode_frame
    from cometstream.sinks.kafka import Template

    ev = decode_frame(b'{"Type":4102,"ResourceID":"r1","Data":{"Username":"alice"}}',
                      received_at=1.0, server="comet1")
    assert Template("comet.{type_name}.{server}").render(ev) == "comet.SEVT_ACCOUNT_UPDATED.comet1"  # type: ignore[arg-type]
    assert Template("{Data.Username}/{ResourceID}/{Data.Missing}").render(ev) == "alice/r1/"  # type: ignore[arg-type]


async def test_kafka_down_at_start_is_retried_until_it_comes(sim: Simulator, tmp_path: Path) -> None:
    """A broker that is not there yet: the sink fails open, retries, then delivers the queue."""
    b = Broker()
    cfg = make_config(sim.url, tmp_path, exact=True, sinks={"bus": _kafka(b, topic="late")})
    async with running(cfg) as d:
        d.daemon.pipeline.retry_initial = 0.05
        d.daemon.pipeline.retry_max = 0.3
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        sent = sim.emit_many(20)
        await wait_until(lambda: d.sink_stats("bus").failing, timeout=10, what="failing open")
        await b.start()
        try:
            await wait_until(lambda: d.sink_stats("bus").delivered == 21, timeout=30,
                             what="delivery once the broker is up")
            msgs = await b.consume(["late"], expect=21)
        finally:
            await b.stop()
    assert {m.value for m in msgs} >= set(sent)
    await asyncio.sleep(0)


async def test_check_connect_tries_the_brokers(sim: Simulator, broker: Broker,
                                               tmp_path: Path) -> None:
    """check --connect starts the producer as the sink would (nothing sent) and says what
    answered; brokers that are not there: one line naming the sink, exit 1."""
    body = ('[sinks.bus]\ntype = "kafka"\n'
            f'bootstrap_servers = ["{broker.bootstrap}"]\ntopic = "t"\n')
    conf = write_config(tmp_path, sim.url, body, mode=0o600)
    proc = await run_cli("check", "-c", str(conf), "--connect")
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().splitlines()[-1] == (f"ok: sink bus: Kafka at {broker.bootstrap} "
                                             "answers (1 broker in the cluster)")
    gone = Broker()  # a port where no broker listens
    conf = write_config(tmp_path, sim.url, body.replace(broker.bootstrap, gone.bootstrap),
                        mode=0o600)
    proc = await run_cli("check", "-c", str(conf), "--connect")
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 1
    assert err.decode().startswith(f"cometstream: sink bus: cannot connect to Kafka "
                                   f"{gone.bootstrap}: "), err.decode()


async def test_an_oversized_event_is_refused_alone(sim: Simulator, broker: Broker,
                                                   tmp_path: Path) -> None:
    """A message over the producer's size limit is dead-lettered; the events before and after
    it in the same batch are delivered once."""
    dlq = tmp_path / "dead.jsonl"
    cfg = make_config(sim.url, tmp_path, exact=True, sinks={
        "bus": _kafka(broker, topic="sized", key="", max_batch_bytes=1024,
                      dead_letter=str(dlq))})
    async with running(cfg) as d:
        d.daemon.pipeline.retry_initial = 0.05
        await wait_until(lambda: d.daemon.resyncs_ok == 1, what="baseline")
        d.sink("bus")._producer._max_request_size = 2048  # a small limit: the client refuses
        small = [orjson.dumps({"Type": 4103, "N": i}) for i in range(5)]
        big = orjson.dumps({"Type": 4103, "Blob": "x" * 5000})
        for frame in (*small[:2], big, *small[2:]):
            sim.emit(frame)
        await wait_until(lambda: d.sink_stats("bus").dropped.get("rejected") == 1, what="refused")
        await wait_until(lambda: d.sink_stats("bus").delivered == 6, what="the others")
    msgs = await broker.consume(["sized"], expect=6)
    values = [m.value for m in msgs]
    assert Counter(values) == Counter([v for v in values if b"4000" in v] + small)
    assert orjson.loads(dlq.read_bytes().splitlines()[0])["event"]["Blob"] == "x" * 5000
