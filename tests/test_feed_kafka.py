"""The Kafka exporter's contract, against a stand-in producer: no Kafka broker runs where the tests run
(docs/feed.md says so). The producer is aiokafka's ``AIOKafkaProducer`` interface: start, send_and_wait,
stop."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from raftledger.node import settings as settings_module
from raftledger.node.feed.sinks import DeliveryFailed, KafkaSink, configured_sinks
from raftledger.node.http.context import NodeContext
from raftledger.node.settings import FeedSettings, NodeSettings, load_sections


def context(**feed: Any) -> NodeContext:
    settings = NodeSettings(feed=dataclasses.replace(FeedSettings(), **feed))
    return NodeContext(node_id="n0", shards={}, shard_count=2, settings=settings)


class Producer:
    """Records what aiokafka's producer would have sent; fails the sends it is told to."""

    def __init__(self, fail_on: set[str] | None = None, **config: Any) -> None:
        self.config = config
        self.fail_on = fail_on or set()
        self.sent: list[tuple[str, bytes, bytes, int, list[tuple[str, bytes]]]] = []
        self.started = self.stopped = 0

    async def start(self) -> None:
        self.started += 1

    async def stop(self) -> None:
        self.stopped += 1

    async def send_and_wait(self, topic: str, value: bytes, *, key: bytes, partition: int,
                            headers: list[tuple[str, bytes]]) -> None:
        if key.decode() in self.fail_on:
            raise ConnectionError("broker went away")
        self.sent.append((topic, value, key, partition, headers))


def events(shard: int, first: int, last: int) -> list[dict[str, Any]]:
    return [{"id": f"{shard}:{o}", "shard": shard, "offset": o, "type": "transaction.posted",
             "timestamp": o, "data": {"amount": 100 * o}} for o in range(first, last + 1)]


def test_each_event_goes_to_its_shards_topic_partition_zero_keyed_by_its_id_in_order() -> None:
    made: list[Producer] = []

    def factory(**config: Any) -> Producer:
        made.append(Producer(**config))
        return made[-1]

    sink = KafkaSink(context(kafka_bootstrap="k1:9092,k2:9092", kafka_topic_prefix="ledger"), factory)

    async def go() -> None:
        await sink.send(1, events(1, 1, 3))
        await sink.send(0, events(0, 7, 7))
        await sink.close()

    asyncio.run(go())
    assert len(made) == 1  # one producer for every shard's exporter
    producer = made[0]
    assert producer.config["bootstrap_servers"] == "k1:9092,k2:9092"
    assert producer.config["acks"] == "all" and producer.config["enable_idempotence"] is True
    assert [(t, k, p) for t, _, k, p, _ in producer.sent] == [
        ("ledger.1", b"1:1", 0), ("ledger.1", b"1:2", 0), ("ledger.1", b"1:3", 0), ("ledger.0", b"0:7", 0)]
    assert all(h == [("raftledger-event-id", k)] for _, _, k, _, h in producer.sent)
    assert b'"amount":300' in producer.sent[2][1]
    assert producer.started == 1 and producer.stopped == 1


def test_a_failed_send_is_a_delivery_failure_and_the_next_attempt_starts_a_new_producer() -> None:
    made: list[Producer] = []

    def factory(**config: Any) -> Producer:
        made.append(Producer(fail_on={"0:2"} if not made else set(), **config))
        return made[-1]

    sink = KafkaSink(context(kafka_bootstrap="k:9092"), factory)

    async def go() -> None:
        with pytest.raises(DeliveryFailed, match="broker went away"):
            await sink.send(0, events(0, 1, 3))
        await sink.send(0, events(0, 1, 3))  # the exporter sends the whole batch again

    asyncio.run(go())
    assert made[0].stopped == 1 and [k for _, _, k, _, _ in made[0].sent] == [b"0:1"]
    assert [k for _, _, k, _, _ in made[1].sent] == [b"0:1", b"0:2", b"0:3"]  # consumers de-duplicate 0:1


def test_kafka_is_configured_by_its_bootstrap_servers_only() -> None:
    assert [s.name for s in configured_sinks(context())] == []
    assert [s.name for s in configured_sinks(context(kafka_bootstrap="k:9092"))] == ["kafka"]


def test_a_node_file_with_kafka_but_without_the_extra_is_refused_saying_what_to_install(monkeypatch) -> None:
    monkeypatch.setattr(settings_module.importlib.util, "find_spec", lambda name: None)
    problems: list[str] = []
    load_sections({"feed": {"kafka_bootstrap": "k:9092"}}, problems)
    assert problems == ["feed: kafka_bootstrap needs aiokafka: pip install 'raftledger[kafka]'"]
