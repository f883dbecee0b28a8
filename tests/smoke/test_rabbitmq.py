"""The test bed's RabbitMQ is a real broker: AMQP and the management API agree."""

from __future__ import annotations

import pika
import pytest
from jobtide_testbed.rabbitmq import RabbitMQ, wait_counts

pytestmark = pytest.mark.integration


def test_publish_consume_and_management_counts(rabbitmq: RabbitMQ) -> None:
    queue = "smoke.counts"
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq.amqp_url))
    try:
        ch = conn.channel()
        ch.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        ch.confirm_delivery()
        for i in range(7):
            ch.basic_publish("", queue, f"task-{i}".encode(), pika.BasicProperties(delivery_mode=2))
        wait_counts(rabbitmq, queue, ready=7, unacked=0)

        # Take three without acking: they move from ready to unacked.
        ch.basic_qos(prefetch_count=3)
        bodies = []
        for method, _props, body in ch.consume(queue, inactivity_timeout=5):
            assert method is not None, "no delivery within 5 s"
            bodies.append(body)
            if len(bodies) == 3:
                break
        assert bodies == [b"task-0", b"task-1", b"task-2"]
        wait_counts(rabbitmq, queue, ready=4, unacked=3, consumers=1)

        ch.close()  # unacked deliveries go back to the queue
        wait_counts(rabbitmq, queue, ready=7, unacked=0, consumers=0)
    finally:
        conn.close()
        rabbitmq.delete_queue(queue)
