"""Throughput of the worker runner against a bare pika consumer on the same broker, in the
same run, with the same prefetch and a manual ack per message; and an idle worker's RSS."""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from pathlib import Path

import pika
import pytest
from jobtide_worker import BrokerConfig, Task, WorkerConfig
from jobtide_worker.logs import _TextFormatter
from jobtide_worker.runner import Runner
from testbed.process import wait_for
from testbed.rabbitmq import RabbitMQ, wait_counts
from workerbed import WorkerBed

pytestmark = pytest.mark.bench

MESSAGES = 4000


def fill(broker: RabbitMQ, queue: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    channel = connection.channel()
    channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    body = b'{"n": 0, "payload": "' + b"x" * 40 + b'"}'
    props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    for _ in range(MESSAGES):
        channel.basic_publish("", queue, body, props)
    connection.close()
    wait_counts(broker, queue, ready=MESSAGES, unacked=0, timeout=60)


def bare_pika_rate(broker: RabbitMQ, queue: str, prefetch: int) -> float:
    started = time.perf_counter()
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=prefetch)
    seen = 0

    def on_message(ch: object, method: object, props: object, body: bytes) -> None:
        nonlocal seen
        channel.basic_ack(method.delivery_tag)  # type: ignore[attr-defined]
        seen += 1
        if seen == MESSAGES:
            channel.stop_consuming()

    channel.basic_consume(queue, on_message)
    channel.start_consuming()
    connection.close()
    return MESSAGES / (time.perf_counter() - started)


def worker_rate(broker: RabbitMQ, queue: str, prefetch: int) -> float:
    done = 0

    def trivial(task: Task) -> None:
        nonlocal done
        done += 1

    config = WorkerConfig(
        broker=BrokerConfig(
            host=broker.host,
            port=broker.amqp_port,
            username=broker.username,
            password=broker.password,
        ),
        queue=queue,
        pipeline="bench",
        prefetch=prefetch,
        max_tasks=MESSAGES,
        idle_timeout_seconds=30,
        declare_topology=False,
    )
    # The worker's one log line per task is part of its cost: formatted as in production,
    # written to /dev/null.
    logger = logging.getLogger("jobtide_worker.bench")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    started = time.perf_counter()
    with open(os.devnull, "w") as sink:
        handler = logging.StreamHandler(sink)
        handler.setFormatter(_TextFormatter())
        logger.handlers[:] = [handler]
        try:
            assert Runner(trivial, config, logger).run() == 0
        finally:
            logger.handlers.clear()
    rate = MESSAGES / (time.perf_counter() - started)
    assert done == MESSAGES
    return rate


@pytest.mark.parametrize("prefetch", [1, 50])
def test_worker_throughput_against_bare_pika(rabbitmq: RabbitMQ, prefetch: int) -> None:
    queues = [f"bench-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    try:
        for q in queues:
            fill(rabbitmq, q)
        bare = bare_pika_rate(rabbitmq, queues[0], prefetch)
        worker = worker_rate(rabbitmq, queues[1], prefetch)
        for q in queues:
            wait_counts(rabbitmq, q, ready=0, unacked=0)
    finally:
        for q in queues:
            rabbitmq.delete_queue(q)
    print(
        f"\nprefetch {prefetch}: bare pika {bare:.0f} msg/s, worker {worker:.0f} msg/s, "
        f"ratio {worker / bare:.2f} (goal >= 0.90), {MESSAGES} messages"
    )


def test_idle_worker_rss(bed: WorkerBed, tmp_path: Path) -> None:
    worker = bed.start_worker(JOBTIDE_IDLE_TIMEOUT_SECONDS="60")
    wait_for(lambda: "consuming" in worker.log(), timeout=30, what="worker consuming")
    time.sleep(1)
    status = Path(f"/proc/{worker.popen.pid}/status").read_text()
    rss_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    print(f"\nidle worker RSS: {rss_kib / 1024:.1f} MiB")
