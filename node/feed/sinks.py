"""Where the exporters deliver events: a NATS JetStream stream, or a webhook endpoint.

A sink's ``send`` delivers one batch of a shard's events, in offset order, or raises
``DeliveryFailed``; the exporter retries, commits its offset, and dead-letters (``node/feed/exporter.py``).

- **NATS JetStream**: each event is published to ``<prefix>.<shard>.<event type>`` with its id as the
  ``Nats-Msg-Id`` header, so the stream drops a redelivery within its duplicate window; the stream is
  created over ``<prefix>.>`` when missing. Events are published one after another, each awaiting its
  acknowledgement, which keeps them in order in the stream.
- **Webhook**: one POST per batch, ``{"events": [...]}``, signed with HMAC-SHA256 over
  ``<timestamp>.<body>`` under the shared secret; the timestamp (Unix seconds) travels in
  ``X-Raftledger-Timestamp``, the signature as ``v1=<hex>`` in ``X-Raftledger-Signature``. A receiver
  recomputes it and refuses an old timestamp (replays); ``verify_signature`` does both. Any 2xx answer
  is a delivery.
- **Kafka** (the ``raftledger[kafka]`` extra, aiokafka): each event is produced to topic
  ``<prefix>.<shard>``, partition 0 (so a shard's events keep their order whatever the topic's
  partition count), with its id as the message key and in the ``raftledger-event-id`` header, by an
  idempotent producer (``acks=all``) that awaits each acknowledgement in turn. A consumer de-duplicates
  by that id. No Kafka broker runs on the machines the tests run on: this sink is exercised against a
  stand-in producer only (docs/feed.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp
import nats
from nats.errors import Error as NatsError
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from ..http.context import NodeContext
from ..http.render import json_bytes

TIMESTAMP_HEADER = "X-Raftledger-Timestamp"
SIGNATURE_HEADER = "X-Raftledger-Signature"
DELIVERY_HEADER = "X-Raftledger-Delivery"  # <shard>:<first offset>-<last offset>
REDRIVE_HEADER = "X-Raftledger-Redrive"  # "true" on a batch sent again from the dead-letter store
MSG_ID_HEADER = "Nats-Msg-Id"
signature_tolerance_s_default = 300
jetstream_duplicate_window_s = 600.0  # a redelivery within it is dropped by the stream
nats_connect_timeout_s = 5
nats_publish_timeout_s = 10.0
KAFKA_ID_HEADER = "raftledger-event-id"
kafka_partition = 0  # one partition per shard's topic: its events in order
kafka_request_timeout_ms = 10_000

log = logging.getLogger(__name__)


class DeliveryFailed(Exception):
    """A batch was not (or not wholly) delivered; it is sent again."""


class Sink(Protocol):
    name: str  # names its consumer offset (sink.<name>), metrics and dead letters
    dead_letters: bool  # a batch failing attempts_max times goes to the dead-letter store

    async def send(self, shard: int, events: list[dict[str, Any]], redrive: bool = False) -> None: ...

    async def close(self) -> None: ...


def signature(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"v1={digest}"


def verify_signature(secret: str, timestamp: str, body: bytes, signed: str, now_s: float,
                     tolerance_s: float = signature_tolerance_s_default) -> bool:
    """What a Python receiver runs on each POST: the signature matches, and its timestamp is recent."""
    if not timestamp.isdigit() or abs(now_s - int(timestamp)) > tolerance_s:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), signed)


class WebhookSink:
    name = "webhook"
    dead_letters = True

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings.feed

    async def send(self, shard: int, events: list[dict[str, Any]], redrive: bool = False) -> None:
        body = json_bytes({"events": events})
        timestamp = str(self.ctx.clock.time_ns() // 1_000_000_000)
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: timestamp,
                   SIGNATURE_HEADER: signature(self.settings.webhook_secret, timestamp, body),
                   DELIVERY_HEADER: f"{shard}:{events[0]['offset']}-{events[-1]['offset']}"}
        if redrive:
            headers[REDRIVE_HEADER] = "true"
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s)
        try:
            async with self.ctx.client().post(self.settings.webhook_url, data=body, headers=headers,
                                              timeout=timeout) as resp:
                if not 200 <= resp.status < 300:
                    raise DeliveryFailed(f"{self.settings.webhook_url} answered {resp.status}")
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise DeliveryFailed(f"{self.settings.webhook_url}: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        return None


class NatsSink:
    name = "nats"
    dead_letters = False  # the broker is the durable store: the exporter waits for it, however long

    def __init__(self, ctx: NodeContext) -> None:
        self.settings = ctx.settings.feed
        self.connection: Any = None
        self.jetstream: Any = None
        self.lock = asyncio.Lock()

    async def _ready(self) -> Any:
        """One connection per node, shared by its shards' exporters; the stream made if missing."""
        async with self.lock:
            if self.connection is None or self.connection.is_closed:
                self.connection = await nats.connect(self.settings.nats_url, allow_reconnect=True,
                                                     connect_timeout=nats_connect_timeout_s,
                                                     max_reconnect_attempts=-1)
                self.jetstream = None
            if self.jetstream is None:
                jetstream = self.connection.jetstream()
                try:
                    await jetstream.stream_info(self.settings.nats_stream)
                except NotFoundError:
                    await jetstream.add_stream(StreamConfig(
                        name=self.settings.nats_stream, subjects=[f"{self.settings.nats_subject_prefix}.>"],
                        duplicate_window=jetstream_duplicate_window_s))
                self.jetstream = jetstream
            return self.jetstream

    async def send(self, shard: int, events: list[dict[str, Any]], redrive: bool = False) -> None:
        prefix = self.settings.nats_subject_prefix
        try:
            jetstream = await self._ready()
            for event in events:
                await jetstream.publish(f"{prefix}.{shard}.{event['type']}", json_bytes(event),
                                        timeout=nats_publish_timeout_s,
                                        headers={MSG_ID_HEADER: event["id"]})
        except (TimeoutError, OSError, NatsError) as exc:
            raise DeliveryFailed(f"{self.settings.nats_url}: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self.connection is not None and not self.connection.is_closed:
            await self.connection.close()


def aiokafka_producer(**config: Any) -> Any:
    """aiokafka is an extra; a node file that sets kafka_bootstrap without it is refused at start."""
    return importlib.import_module("aiokafka").AIOKafkaProducer(**config)


class KafkaSink:
    name = "kafka"
    dead_letters = False  # the broker is the durable store: the exporter waits for it, however long

    def __init__(self, ctx: NodeContext, producer: Callable[..., Any] = aiokafka_producer) -> None:
        self.settings = ctx.settings.feed
        self.make_producer = producer
        self.producer: Any = None
        self.lock = asyncio.Lock()

    async def _ready(self) -> Any:
        """One idempotent producer per node, shared by its shards' exporters."""
        async with self.lock:
            if self.producer is None:
                producer = self.make_producer(bootstrap_servers=self.settings.kafka_bootstrap, acks="all",
                                              enable_idempotence=True,
                                              request_timeout_ms=kafka_request_timeout_ms)
                await producer.start()
                self.producer = producer
            return self.producer

    async def send(self, shard: int, events: list[dict[str, Any]], redrive: bool = False) -> None:
        topic = f"{self.settings.kafka_topic_prefix}.{shard}"
        try:
            producer = await self._ready()
            for event in events:
                event_id = event["id"].encode()
                await producer.send_and_wait(topic, json_bytes(event), key=event_id,
                                             partition=kafka_partition,
                                             headers=[(KAFKA_ID_HEADER, event_id)])
        except Exception as exc:  # aiokafka's errors share no base class with the network's
            await self._drop_producer()
            raise DeliveryFailed(f"kafka {self.settings.kafka_bootstrap}: {type(exc).__name__}: {exc}"
                                 ) from exc

    async def _drop_producer(self) -> None:
        """A failed producer is started afresh on the next attempt."""
        async with self.lock:
            producer, self.producer = self.producer, None
        if producer is not None:
            try:
                await producer.stop()
            except Exception as exc:  # already broken: nothing more to release
                log.info("feed: a failed Kafka producer did not stop cleanly: %s", exc)

    async def close(self) -> None:
        await self._drop_producer()


def configured_sinks(ctx: NodeContext) -> list[Sink]:
    settings = ctx.settings.feed
    sinks: list[Sink] = []
    if settings.nats_url:
        sinks.append(NatsSink(ctx))
    if settings.webhook_url:
        sinks.append(WebhookSink(ctx))
    if settings.kafka_bootstrap:
        sinks.append(KafkaSink(ctx))
    return sinks
