"""The scaler's broker adapter against a real RabbitMQ node: live counts from a passive declare
win over the management API's, which lag by the broker's statistics interval."""

from __future__ import annotations

import time
import uuid

import pika
import pytest
from jobtide_scaler.broker import Broker
from jobtide_testbed.process import wait_for
from jobtide_testbed.rabbitmq import RabbitMQ
from jobtide_worker import topology
from jobtide_worker.config import BrokerConfig

pytestmark = [pytest.mark.integration, pytest.mark.broker_compat]


def test_live_ready_count_wins_even_when_the_management_request_starts_late(
    rabbitmq: RabbitMQ,
) -> None:
    queue = f"broker-{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq.amqp_url))
    channel = connection.channel()
    topology.declare(channel, queue)
    broker = Broker(
        BrokerConfig(
            host=rabbitmq.host,
            port=rabbitmq.amqp_port,
            management_port=rabbitmq.management_port,
            vhost=rabbitmq.vhost,
            username=rabbitmq.username,
            password=rabbitmq.password,
            tls=False,
        )
    )
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
        channel.queue_delete(queue)
        connection.close()
