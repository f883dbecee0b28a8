"""The scaler's broker adapter against a real RabbitMQ node: live counts from a passive declare
win over the management API's, which lag by the broker's statistics interval."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
import requests
from jobtide_scaler.broker import Broker, QueueReading
from jobtide_testbed.process import wait_for
from jobtide_testbed.rabbitmq import RabbitMQ
from jobtide_worker import topology
from jobtide_worker.config import BrokerConfig
from jobtide_worker.task import ACQUIRED_COUNT_HEADER, DELIVERY_COUNT_HEADER

pytestmark = [pytest.mark.integration, pytest.mark.broker_compat]


def broker_config(rabbitmq: RabbitMQ) -> BrokerConfig:
    return BrokerConfig(
        host=rabbitmq.host,
        port=rabbitmq.amqp_port,
        management_port=rabbitmq.management_port,
        vhost=rabbitmq.vhost,
        username=rabbitmq.username,
        password=rabbitmq.password,
        tls=False,
    )


@pytest.fixture
def pipeline_queue(rabbitmq: RabbitMQ) -> Iterator[tuple[str, Any]]:
    """A pipeline's queue (a quorum queue) and a channel to it, deleted afterwards."""
    name = f"broker-{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq.amqp_url))
    channel = connection.channel()
    topology.declare(channel, name)
    try:
        yield name, channel
    finally:
        channel.queue_delete(name)
        connection.close()


def test_live_ready_count_wins_even_when_the_management_request_starts_late(
    rabbitmq: RabbitMQ, pipeline_queue: tuple[str, Any]
) -> None:
    queue, channel = pipeline_queue
    broker = Broker(broker_config(rabbitmq))
    try:
        # The management API lists the queue, empty, before anything is published.
        wait_for(lambda: queue in broker.read([queue]), timeout=30, what="queue listed")
        assert broker.read([queue])[queue].ready == 0
        channel.confirm_delivery()
        for i in range(3):
            channel.basic_publish("", queue, f"task {i}".encode())
        # A busy machine starts the management request late (its thread is not scheduled):
        # occupying the adapter's one management thread does the same on demand. Its figures
        # still say 0 (they lag by the statistics interval); the passive declare says 3.
        broker._pool.submit(time.sleep, 0.5)
        reading = broker.read([queue])[queue]
        assert reading.ready == 3
    finally:
        broker.close()


def test_the_oldest_waiting_message_is_dated_by_the_publish_counter_without_touching_it(
    rabbitmq: RabbitMQ, pipeline_queue: tuple[str, Any]
) -> None:
    queue, channel = pipeline_queue
    channel.confirm_delivery()
    now = [1000.0]
    broker = Broker(broker_config(rabbitmq), clock=lambda: now[0])

    def reading_when(what: str, ok: Callable[[QueueReading], bool]) -> QueueReading:
        # The management API's figures lag by the broker's statistics interval.
        wait_for(lambda: ok(broker.read([queue])[queue]), timeout=30, what=what)
        return broker.read([queue])[queue]

    try:
        # No timestamp property: nothing of the message is read.
        for i in range(3):
            channel.basic_publish("", queue, f"early {i}".encode())
        # The publish counter and the ready count are not updated at the same instant.
        early = reading_when(
            "3 published and waiting",
            lambda r: r.published == 3 and r.oldest_waiting_since is not None,
        )
        assert early.oldest_waiting_since == 1000.0
        now[0] = 1100.0
        for i in range(2):
            channel.basic_publish("", queue, f"late {i}".encode())
        later = reading_when("5 published", lambda r: r.published == 5)
        assert later.oldest_waiting_since == 1000.0  # the early ones still wait
        for _ in range(3):
            method, _props, body = channel.basic_get(queue)
            assert body.startswith(b"early")
            channel.basic_ack(method.delivery_tag)
        now[0] = 1200.0
        # The oldest waiting one was first counted at 1100.
        reading_when("the early ones gone", lambda r: r.oldest_waiting_since == 1100.0)
        # Read again and again, the messages were never delivered: no delivery counted.
        method, props, body = channel.basic_get(queue)
        assert body == b"late 0"
        assert method.redelivered is False
        assert (props.headers or {}).get(DELIVERY_COUNT_HEADER, 0) == 0
        assert (props.headers or {}).get(ACQUIRED_COUNT_HEADER, 0) == 0
        channel.basic_ack(method.delivery_tag)
        channel.queue_purge(queue)
        emptied = reading_when("empty", lambda r: r.ready == 0 and r.oldest_waiting_since is None)
        assert emptied.published == 5
    finally:
        broker.close()


def test_counts_stay_fresh_after_the_broker_restarts_with_nothing_published_since(
    tmp_path: Path,
) -> None:
    """A restarted broker keeps the queue's messages but not its publish counter: until
    something is published again it answers `message_stats: []`. The counts must still be
    read (they once went stale for good there, and no Job was created for minutes)."""
    rabbitmq = RabbitMQ(tmp_path / "broker").start()
    try:
        connection = pika.BlockingConnection(pika.URLParameters(rabbitmq.amqp_url))
        channel = connection.channel()
        topology.declare(channel, "restarted")
        channel.confirm_delivery()
        for i in range(4):
            channel.basic_publish("", "restarted", f"task {i}".encode())
        connection.close()
        rabbitmq.restart()
        # A delivery after the restart gives the queue statistics without a publish count.
        connection = pika.BlockingConnection(pika.URLParameters(rabbitmq.amqp_url))
        channel = connection.channel()
        method, _props, _body = channel.basic_get("restarted")
        channel.basic_ack(method.delivery_tag)
        connection.close()
        broker = Broker(broker_config(rabbitmq))
        try:
            management = f"{rabbitmq.management_url}/api/queues/%2F/restarted"
            auth = (rabbitmq.username, rabbitmq.password)
            columns = {"columns": "name,message_stats.publish"}
            wait_for(
                lambda: requests.get(management, auth=auth, params=columns, timeout=10).json()
                .get("message_stats") == [],
                timeout=30,
                what="the restarted broker's statistics without a publish count",
            )  # fmt: skip
            wait_for(
                lambda: (r := broker.read(["restarted"]).get("restarted")) is not None
                and (r.ready, r.unacked, r.published) == (3, 0, 0),
                timeout=30,
                what="3 ready from the management API, 0 published since the restart",
            )  # fmt: skip
            # The waiting messages' age counts again from the restart (a lower bound,
            # backlog.py), not first from the next publish.
            reading = broker.read(["restarted"])["restarted"]
            assert reading.oldest_waiting_since is not None
        finally:
            broker.close()
    finally:
        rabbitmq.close()
