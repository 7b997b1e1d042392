"""The Kafka sink (``type = "kafka"``, extra ``cometstream[kafka]``, aiokafka).

Options (``[sinks.NAME]``):

- ``bootstrap_servers`` (required): ``"host:port"``, a comma-separated string or a list;
- ``topic`` (required): a name or a template, e.g. ``"comet.{type_name}"``;
- ``key``: a template for the message key, e.g. ``"{ResourceID}"`` or ``"{Data.Username}"``
  (empty = no key: the partitioner spreads the messages);
- ``acks``: ``0``, ``1`` or ``"all"`` (default ``"all"``);
- ``idempotence``: ``"auto"`` (default: on where the broker supports it, else off with one
  warning), ``true`` (fail loudly where it is not supported) or ``false``;
- ``compression``: ``none`` (default), ``gzip``, ``snappy``, ``lz4``, ``zstd`` (the last three need
  the codecs of ``cometstream[kafka]``: checked when the config is read);
- ``linger_ms`` (default 5), ``max_batch_bytes`` (default 1 MiB), ``request_timeout_ms``
  (default 30000), ``client_id``;
- ``security_protocol``: ``PLAINTEXT`` (default), ``SSL``, ``SASL_PLAINTEXT``, ``SASL_SSL``;
  ``sasl_mechanism`` (``PLAIN``, ``SCRAM-SHA-256``, ``SCRAM-SHA-512``), ``sasl_username``,
  ``sasl_password`` / ``sasl_password_file`` / env ``COMETSTREAM_KAFKA_PASSWORD``;
  ``ssl_cafile``, ``ssl_certfile``, ``ssl_keyfile``.

``check --connect`` starts a producer as the sink does (the bootstrap servers answer with the
cluster's metadata; nothing is sent) and stops it.

Templates: ``{type_name}``, ``{Type}``, ``{server}``, ``{origin}``, and any field of the event by
dotted path (``{ResourceID}``, ``{Data.Username}``, ``{Data.GUID}``); a missing field is empty.
Topic names keep only ``[A-Za-z0-9._-]`` (other characters become ``_``).

Every message carries the headers ``cometstream-origin``, ``cometstream-server`` and
``cometstream-received-at``; the value is the event in the sink's ``format`` (``event`` by
default: the server's bytes). ``send`` returns once the broker acknowledged every message of the
batch (per ``acks``); while the broker is down, the batch fails as retryable and the pipeline
retries it (the producer is rebuilt), so nothing queued is dropped. Only a refusal of one message
(too large, corrupt) is permanent: that event goes to the dead letters and the others on. Any
other refusal (an ACL, a fenced producer) is retried with backoff until fixed.

Messages go out as one record batch per partition (``send_batch``): keyed ones to the partition
the Java client would choose (murmur2), unkeyed ones to one partition with a leader per batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import structlog

from ..errors import SinkError
from .base import Sink

if TYPE_CHECKING:
    from typing import Self

    from ..events import Event
    from ..section import Section

__all__ = ["KafkaSink", "Template"]

log = structlog.get_logger("cometstream.sinks.kafka")


class _InitPidNoise(logging.Filter):
    """aiokafka logs an ERROR when a broker refuses InitProducerId; with idempotence = "auto"
    that is handled (one warning of ours), so its line is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "InitProducerIdRequest" not in record.getMessage()


logging.getLogger("aiokafka.producer.sender").addFilter(_InitPidNoise())

COMPRESSIONS: Final = ("none", "gzip", "snappy", "lz4", "zstd")
PROTOCOLS: Final = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS: Final = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_FIELD = re.compile(r"\{([^{}]*)\}")
#: topic, key, value, headers, and the headers' size in bytes
_Message = tuple[str, bytes | None, bytes, list[tuple[str, bytes]], int]
_TOPIC_BAD = re.compile(r"[^A-Za-z0-9._-]")


class Template:
    """``"comet.{type_name}"`` → a function of an event, parsed once."""

    SPECIAL: Final = ("type_name", "server", "origin")

    def __init__(self, text: str) -> None:
        self.text = text
        self.parts: list[str | tuple[str, ...]] = []
        pos = 0
        for m in _FIELD.finditer(text):
            if m.start() > pos:
                self.parts.append(text[pos:m.start()])
            name = m.group(1).strip()
            if not name or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", name):
                raise ValueError(f"bad field {{{m.group(1)}}} in template {text!r}")
            self.parts.append(tuple(name.split(".")))
            pos = m.end()
        if pos < len(text):
            self.parts.append(text[pos:])
        if "{" in "".join(p for p in self.parts if isinstance(p, str)) or \
                "}" in "".join(p for p in self.parts if isinstance(p, str)):
            raise ValueError(f"unbalanced braces in template {text!r}")
        self.constant = all(isinstance(p, str) for p in self.parts)
        #: whether rendering reads the event's fields (not only type_name, server, origin)
        self.reads_fields = any(not isinstance(p, str) and not (len(p) == 1 and p[0] in
                                                               self.SPECIAL) for p in self.parts)

    def render(self, ev: Event) -> str:
        if self.constant:
            return self.text
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            if len(part) == 1 and part[0] in self.SPECIAL:
                out.append(str(getattr(ev, part[0])))
                continue
            value: Any = ev.doc
            for step in part:
                value = value.get(step) if isinstance(value, dict) else None
            if value is None or isinstance(value, dict | list):
                continue
            out.append(str(value).lower() if isinstance(value, bool) else str(value))
        return "".join(out)


def _codec_available(name: str) -> bool:
    from aiokafka import codec

    available: dict[str, bool] = {
        "none": True, "gzip": codec.has_gzip(), "snappy": codec.has_snappy(),
        "lz4": codec.has_lz4(), "zstd": codec.has_zstd()}
    return available[name]


class KafkaSink(Sink):
    default_format = "event"

    def __init__(self, name: str, *, bootstrap: list[str], topic: Template, key: Template | None,
                 fmt: str, acks: int | str, idempotence: str, compression: str, linger_ms: int,
                 max_batch_bytes: int, request_timeout_ms: int, client_id: str,
                 security: dict[str, Any]) -> None:
        self.name = name
        self.bootstrap = bootstrap
        self.topic = topic
        self.key = key
        self.uses_doc = topic.reads_fields or (key is not None and key.reads_fields)
        self.format = fmt
        self.acks = acks
        self.idempotence = idempotence
        self.compression = compression
        self.linger_ms = linger_ms
        self.max_batch_bytes = max_batch_bytes
        self.request_timeout_ms = request_timeout_ms
        self.client_id = client_id
        self.security = security
        self._producer: Any = None
        self._idempotent = idempotence in ("auto", "true")
        self.sent = 0
        #: the topic, when the template names no field
        self._topic: str | None = (_TOPIC_BAD.sub("_", topic.text) or "cometstream") \
            if topic.constant else None
        #: (origin, server) -> their two headers, and those headers' size in bytes
        self._headers: dict[tuple[str, str], tuple[tuple[tuple[str, bytes], ...], int]] = {}
        #: (topic, key) -> (number of partitions, partition)
        self._key_partitions: dict[tuple[str, bytes], tuple[int, int]] = {}

    @classmethod
    def from_config(cls, name: str, options: Section) -> Self:
        try:
            import aiokafka  # noqa: F401
        except ImportError:
            raise options.error("type", 'the kafka sink needs aiokafka: pip install '
                                '"cometstream[kafka]"') from None
        raw = options.raw("bootstrap_servers")
        if isinstance(raw, str):
            bootstrap = [s.strip() for s in raw.split(",") if s.strip()]
        elif isinstance(raw, list) and all(isinstance(s, str) for s in raw):
            bootstrap = [s.strip() for s in raw if s.strip()]
        else:
            raise options.error("bootstrap_servers", 'expected "host:port" or a list of them')
        if not bootstrap:
            raise options.error("bootstrap_servers", "is required")
        for server in bootstrap:
            host, sep, port = server.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise options.error("bootstrap_servers", f'expected "host:port", got "{server}"')
        try:
            topic = Template(options.str("topic", required=True, allow_empty=False))
        except ValueError as exc:
            raise options.error("topic", str(exc)) from None
        key_text = options.str("key", "")
        try:
            key = Template(key_text) if key_text else None
        except ValueError as exc:  # (a bad key template is the key's problem, not the topic's)
            raise options.error("key", str(exc)) from None
        fmt = options.str("format", cls.default_format)
        acks_raw = options.raw("acks", "all")
        if acks_raw not in (0, 1, "all", -1) or isinstance(acks_raw, bool):
            raise options.error("acks", f'expected 0, 1 or "all", got {acks_raw!r}')
        acks: int | str = "all" if acks_raw in ("all", -1) else int(acks_raw)
        idem_raw = options.raw("idempotence", "auto")
        if idem_raw not in ("auto", True, False):
            raise options.error("idempotence", f'expected "auto", true or false, got {idem_raw!r}')
        idempotence = "auto" if idem_raw == "auto" else ("true" if idem_raw else "false")
        if idempotence != "false" and acks != "all":
            if idempotence == "true":
                raise options.error("idempotence", 'an idempotent producer needs acks = "all"')
            idempotence = "false"
        compression = options.str("compression", "none", choices=COMPRESSIONS)
        if not _codec_available(compression):
            raise options.error("compression", f"{compression} needs its codec: pip install "
                                '"cometstream[kafka]" (cramjam)')
        linger_ms = options.int("linger_ms", 5, min=0, max=60_000)
        max_batch = options.int("max_batch_bytes", 1 << 20, min=1024, max=1 << 30)
        req_timeout = options.int("request_timeout_ms", 30_000, min=1000, max=600_000)
        client_id = options.str("client_id", f"cometstream-{name}")
        security: dict[str, Any] = {
            "security_protocol": options.str("security_protocol", "PLAINTEXT", choices=PROTOCOLS)}
        if security["security_protocol"].startswith("SASL"):
            security["sasl_mechanism"] = options.str("sasl_mechanism", "PLAIN", choices=MECHANISMS)
            security["sasl_plain_username"] = options.str("sasl_username", required=True)
            security["sasl_plain_password"] = _password(options)
        else:
            for k in ("sasl_mechanism", "sasl_username", "sasl_password", "sasl_password_file"):
                if options.has(k):
                    raise options.error(k, "needs security_protocol = SASL_PLAINTEXT or SASL_SSL")
        ssl_paths = {k: options.path(k) for k in ("ssl_cafile", "ssl_certfile", "ssl_keyfile")}
        for k, path in ssl_paths.items():
            if path is not None and not path.is_file():
                raise options.error(k, f"file not found: {path}")
        if ssl_paths["ssl_keyfile"] is not None:  # a private key: check warns if others read it
            from ..section import note_secret

            note_secret(options.key("ssl_keyfile"), ssl_paths["ssl_keyfile"])
        if security["security_protocol"].endswith("SSL"):
            security["ssl_paths"] = ssl_paths
        options.done()
        return cls(name, bootstrap=bootstrap, topic=topic, key=key, fmt=fmt, acks=acks,
                   idempotence=idempotence, compression=compression, linger_ms=linger_ms,
                   max_batch_bytes=max_batch, request_timeout_ms=req_timeout,
                   client_id=client_id, security=security)

    # --- producer lifecycle --------------------------------------------------------------------
    def _make_producer(self) -> Any:
        from aiokafka import AIOKafkaProducer

        sec = {k: v for k, v in self.security.items() if k != "ssl_paths"}
        paths = self.security.get("ssl_paths")
        if paths is not None:
            ctx = ssl.create_default_context(cafile=str(paths["ssl_cafile"]) if paths["ssl_cafile"] else None)
            if paths["ssl_certfile"]:
                ctx.load_cert_chain(str(paths["ssl_certfile"]),
                                    str(paths["ssl_keyfile"]) if paths["ssl_keyfile"] else None)
            sec["ssl_context"] = ctx
        return AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id=self.client_id,
            acks=self.acks,
            enable_idempotence=self._idempotent,
            compression_type=None if self.compression == "none" else self.compression,
            linger_ms=self.linger_ms,
            max_batch_size=min(self.max_batch_bytes, 16 << 20),
            max_request_size=max(self.max_batch_bytes, 1 << 20),
            request_timeout_ms=self.request_timeout_ms,
            **sec,
        )

    async def open(self) -> None:
        if self._producer is not None:
            return
        password = self.security.get("sasl_plain_password")
        if password:  # masked in logs and errors, like the server's password
            from ..observe.logging import register_secret

            register_secret(password)
        producer = self._make_producer()
        try:
            await producer.start()
        except Exception as exc:
            await _stop_quietly(producer)
            if self._idempotent and self.idempotence == "auto" and _refuses_idempotence(exc):
                self._no_idempotence()
                return await self.open()
            hint = ""
            if self._idempotent and _refuses_idempotence(exc):
                hint = " (the broker refuses the idempotent producer: set idempotence = \"auto\")"
            raise SinkError(self.name, f"cannot connect to Kafka {','.join(self.bootstrap)}: "
                            f"{_describe(exc)}{hint}", retryable=True) from exc
        self._producer = producer

    def _no_idempotence(self) -> None:
        log.warning("kafka broker refuses the idempotent producer: continuing without it "
                    "(set idempotence = false to silence this)", sink=self.name,
                    bootstrap=",".join(self.bootstrap))
        self._idempotent = False

    async def _reset(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await _stop_quietly(producer)

    async def probe(self) -> str | None:
        await self.open()  # the producer's start: the bootstrap servers, the cluster's metadata
        try:
            assert self._producer is not None
            brokers = len(self._producer.client.cluster.brokers())
        finally:
            await self.aclose()
        return f"Kafka at {','.join(self.bootstrap)} answers ({brokers} broker" \
               f"{'s' if brokers != 1 else ''} in the cluster)"

    async def aclose(self) -> None:
        if self._producer is not None:
            try:
                await asyncio.wait_for(self._producer.stop(), 10)
            except Exception as exc:  # noqa: BLE001 - closing: any failure is logged, not raised
                log.warning("kafka producer close failed", sink=self.name, error=_describe(exc))
            self._producer = None

    # --- delivery --------------------------------------------------------------------------------
    def _message(self, ev: Event) -> _Message:
        """topic, key, value, headers, and the headers' size in bytes."""
        topic = self._topic
        if topic is None:
            topic = _TOPIC_BAD.sub("_", self.topic.render(ev)) or "cometstream"
        key = self.key.render(ev).encode() if self.key is not None else b""
        fixed = self._headers.get((ev.origin, ev.server))
        if fixed is None:
            pairs = (("cometstream-origin", ev.origin.encode()),
                     ("cometstream-server", ev.server.encode()))
            fixed = self._headers[(ev.origin, ev.server)] = (
                pairs, sum(len(k) + len(v) for k, v in pairs))
        received = repr(ev.received_at).encode()
        headers = [*fixed[0], ("cometstream-received-at", received)]
        return topic, key or None, ev.render(self.format), headers, fixed[1] + 23 + len(received)

    def _partition(self, topic: str, key: bytes | None, partitions: list[int],
                   unkeyed: dict[str, int]) -> int:
        """The partition the Java client (and aiokafka's ``send``) would choose for a key:
        murmur2 over all partitions, cached per key (ResourceIDs repeat). Messages without a key
        go to one partition per ``send`` and topic, picked at random among those with a leader
        (Kafka's sticky partitioning)."""
        if key is None:
            p = unkeyed.get(topic)
            if p is None:
                available = _available_partitions(self._producer, topic)
                p = unkeyed[topic] = random.choice(available or partitions)
            return p
        cache = self._key_partitions
        found = cache.get((topic, key))
        if found is not None and found[0] == len(partitions):
            return found[1]
        if len(cache) >= _KEY_CACHE:
            cache.clear()
        from aiokafka.partitioner import murmur2

        chosen: int = partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
        cache[(topic, key)] = (len(partitions), chosen)
        return chosen

    async def send(self, batch: Sequence[Event]) -> None:
        """One record batch per partition (aiokafka's ``send_batch``), rather than a ``send``
        per message (~30 µs each in aiokafka); acknowledged once the broker has every batch."""
        if self._producer is None:
            await self.open()
        batches = _RecordBatches(self, self._producer)
        await batches.hand_over(batch)
        accepted, exc = await batches.outcome()
        self.sent += accepted
        if exc is None:
            return
        if self._idempotent and self.idempotence == "auto" and _refuses_idempotence(exc):
            self._no_idempotence()
        retryable = not _refuses_the_record(exc)
        if retryable:
            await self._reset()  # a fresh producer: reconnects, new metadata
        # a permanent refusal concerns the one event (too large, invalid): the rest goes on
        raise SinkError(self.name, f"Kafka: {_describe(exc)}", retryable=retryable,
                        accepted=accepted, failed=0 if retryable else 1) \
            from (exc if isinstance(exc, Exception) else None)


class _RecordBatches:
    """One ``send``'s record batches: one per topic and partition, built as the events come in
    order, handed to the producer as each fills and once all are appended; then read back in
    the events' order. A failure does not raise: it ends the appending (``stopped``) or the
    handing over (``unsent``), and :meth:`outcome` says what it cost."""

    def __init__(self, sink: KafkaSink, producer: Any) -> None:
        self._sink = sink
        self._producer = producer
        self._limit = getattr(producer, "_max_request_size", sink.max_batch_bytes)
        #: per record batch: its future once submitted (``_UNSENT`` until then)
        self._futures: list[Any] = []
        #: per event appended, in order: the index of its record batch
        self._owner: list[int] = []
        self._open: dict[tuple[str, int], tuple[int, Any]] = {}
        self._partitions_of: dict[str, list[int]] = {}
        self._unkeyed: dict[str, int] = {}
        #: what stopped the batch at event ``len(owner)`` (that event was not appended)
        self._stopped: BaseException | None = None
        #: what kept a record batch from being submitted (its events are not delivered)
        self._unsent: BaseException | None = None

    async def hand_over(self, batch: Sequence[Event]) -> None:
        """Append the events in order until one cannot be, then hand every record batch
        still open to the producer (none once the producer failed one)."""
        try:
            for ev in batch:
                topic, key, value, headers = self._record(ev)
                partitions = self._partitions_of.get(topic)
                if partitions is None:
                    partitions = self._partitions_of[topic] = await self._partitions_for(topic)
                partition = self._sink._partition(topic, key, partitions, self._unkeyed)
                slot = self._open.get((topic, partition))
                if slot is not None and slot[1].append(timestamp=None, key=key, value=value,
                                                       headers=headers) is not None:
                    self._owner.append(slot[0])
                else:  # none open for its partition, or full
                    await self._start_batch(topic, partition, slot, key, value, headers)
        except Exception as failure:  # noqa: BLE001 - aiokafka raises asserts too (a shrunk topic)
            self._stopped = failure
        for (topic, partition), slot in self._open.items():
            if self._unsent is not None:
                break  # the producer is failing: the rest is not handed over
            try:
                await self._submit(topic, partition, *slot)
            except Exception as failed:  # noqa: BLE001 - what stops the producer ends the send
                self._unsent = failed

    def _record(self, ev: Event) -> tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]:
        """``ev``'s topic, key, value and headers; a message over the producer's limit raises."""
        limit = self._limit
        topic, key, value, headers, header_bytes = self._sink._message(ev)
        size = len(value) + (len(key) if key else 0) + header_bytes
        if size + _RECORD_SLACK > limit and _record_size(key, value, headers) > limit:
            raise ValueError(f"the message is {len(value)} bytes, over the producer's "
                             f"limit of {limit} (max_batch_bytes)")
        return topic, key, value, headers

    async def _partitions_for(self, topic: str) -> list[int]:
        partitions = sorted(await self._producer.partitions_for(topic))
        if not partitions:
            from aiokafka.errors import KafkaError

            raise KafkaError(f"no partitions known for topic {topic}")
        return partitions

    async def _start_batch(self, topic: str, partition: int, full: tuple[int, Any] | None,
                           key: bytes | None, value: bytes,
                           headers: list[tuple[str, bytes]]) -> None:
        """A new record batch for the partition, starting with this record; the partition's
        ``full`` one, if any, is handed over first."""
        if full is not None:
            del self._open[(topic, partition)]
            try:
                await self._submit(topic, partition, *full)
            except Exception as failed:
                self._unsent = failed
                raise
        builder = self._producer.create_batch()
        if builder.append(timestamp=None, key=key, value=value, headers=headers) is None:
            raise ValueError("the message does not fit an empty record batch "
                             "(max_batch_bytes)")
        self._open[(topic, partition)] = (len(self._futures), builder)
        self._futures.append(_UNSENT)
        self._owner.append(len(self._futures) - 1)

    async def _submit(self, topic: str, partition: int, index: int, builder: Any) -> None:
        builder.close()
        self._futures[index] = await self._producer.send_batch(builder, topic,
                                                               partition=partition)

    async def outcome(self) -> tuple[int, BaseException | None]:
        """The head of the events whose record batches all arrived, and what failed the rest
        (``None``: every event arrived)."""
        futures = self._futures
        # wait for what was handed to the producer before anything else: it may be delivered
        gathered = iter(await asyncio.gather(*(f for f in futures if f is not _UNSENT),
                                             return_exceptions=True))
        # (with acks = 0 a batch's future holds None: sent, nothing to wait for)
        results = [next(gathered) if f is not _UNSENT else _UNSENT for f in futures]
        accepted = 0
        for index in self._owner:  # events in order: the head whose record batches all arrived
            res = results[index]
            if res is _UNSENT:
                if self._unsent is None and self._stopped is None:
                    from aiokafka.errors import KafkaError

                    return accepted, KafkaError("record batch not handed to the producer")
                return accepted, self._unsent or self._stopped
            if isinstance(res, BaseException):
                return accepted, res
            accepted += 1
        return accepted, self._stopped  # every appended event arrived: what stopped the rest


#: a record batch not handed to the producer
_UNSENT: Final = object()
#: bytes a record adds to its key, value and headers (lengths, attributes, offsets): below
#: this margin under the limit, the exact size is not computed
_RECORD_SLACK: Final = 256
#: keys whose partition is remembered (then the cache starts again)
_KEY_CACHE: Final = 100_000


def _available_partitions(producer: Any, topic: str) -> list[int]:
    """The topic's partitions that have a leader (aiokafka's cluster metadata), or []."""
    try:
        return sorted(producer.client.cluster.available_partitions_for_topic(topic) or ())
    except Exception:  # noqa: BLE001 - an aiokafka internal: fall back to every partition
        return []


def _record_size(key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> int:
    from aiokafka.record.default_records import DefaultRecordBatchBuilder

    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers))


def _refuses_the_record(exc: BaseException) -> bool:
    """Whether a failed send is a final refusal of the record itself: then that one event is
    dead-lettered and the others go on. The retry rule, read from aiokafka's own flag:

    - ``exc.retriable`` (the broker down or electing a leader, a request timed out): retried;
    - not retriable, and about the record: the broker's or the client's refusal of its size or
      its bytes (``MessageSizeTooLargeError``, ``RecordListTooLargeError``,
      ``CorruptRecordException``; the sink's own size checks raise ``ValueError``): refused;
    - not retriable, and about the sink (not authorized, the producer closed or fenced, the
      delivery deadline, which aiokafka leaves unmarked): retried with backoff, with a fresh
      producer, until fixed: dead-lettering event after event would empty the queue into the
      dead letters while an operator fixes a permission.
    """
    if getattr(exc, "retriable", False):
        return False
    from aiokafka.errors import (
        CorruptRecordException,
        MessageSizeTooLargeError,
        RecordListTooLargeError,
    )

    return isinstance(exc, (ValueError, MessageSizeTooLargeError, RecordListTooLargeError,
                            CorruptRecordException))


def _refuses_idempotence(exc: BaseException) -> bool:
    """Whether ``exc`` is the broker's refusal of the idempotent producer. aiokafka asks for a
    producer id (InitProducerId) in ``start()``, and again from its sender task, and raises the
    broker's answer itself, final (not ``retriable``): UNKNOWN_SERVER_ERROR from brokers that do
    not implement the request, UNSUPPORTED_VERSION from old ones, CLUSTER_AUTHORIZATION_FAILED
    where the principal may not write idempotently."""
    from aiokafka.errors import (
        ClusterAuthorizationFailedError,
        UnknownError,
        UnsupportedVersionError,
    )

    return not getattr(exc, "retriable", False) and isinstance(
        exc, (UnknownError, UnsupportedVersionError, ClusterAuthorizationFailedError))


def _describe(exc: BaseException) -> str:
    text, kind = str(exc), type(exc).__name__
    text = text.removeprefix(f"{kind}: ")  # (aiokafka's own messages often begin with it)
    return f"{kind}: {text}" if text else kind


def _password(options: Section) -> str:
    env = os.environ.get("COMETSTREAM_KAFKA_PASSWORD")
    if env is not None:
        return env
    inline = options.opt_str("sasl_password", secret=True)
    if inline is not None and options.path("sasl_password_file") is not None:
        raise options.error("sasl_password_file", "set either sasl_password or sasl_password_file")
    if inline is not None:
        return inline
    from ..config import read_secret_file  # (the one rule: tap/dlq list, line breaks, errors)

    secret = read_secret_file(options, "sasl_password_file")
    if secret is None:
        raise options.error("sasl_password", "is required for SASL (or sasl_password_file, or "
                            "COMETSTREAM_KAFKA_PASSWORD)")
    return secret.reveal()


async def _stop_quietly(producer: Any) -> None:
    try:
        await asyncio.wait_for(producer.stop(), 5)
    except Exception as exc:  # noqa: BLE001 - a producer thrown away: its close may fail any way
        log.debug("discarded kafka producer failed to close", error=_describe(exc))
