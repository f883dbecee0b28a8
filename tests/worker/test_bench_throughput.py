"""Throughput of the worker runner against a bare pika consumer on the same broker, in the
same run, with the same prefetch and a manual ack per message; and an idle worker's RSS.

Bare and worker rounds alternate, and which of the two goes first alternates too, so a change
in the machine's load during the run weighs on both alike; the median ratio is the figure."""

from __future__ import annotations

import os
import signal
import statistics
import time
import uuid
from pathlib import Path

import pika
import pytest
from jobtide_testbed.process import wait_for
from jobtide_testbed.rabbitmq import RabbitMQ, wait_counts
from jobtide_worker import BrokerConfig, Task, WorkerConfig
from jobtide_worker.logs import EventLog
from jobtide_worker.runner import Runner
from workerbed import WorkerBed

pytestmark = pytest.mark.bench

MESSAGES = 4000
ROUNDS = 4  # even: as many rounds with the bare loop first as with the worker first


def fill(broker: RabbitMQ, *queues: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    channel = connection.channel()
    body = b'{"n": 0, "payload": "' + b"x" * 40 + b'"}'
    props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    for queue in queues:
        channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        for _ in range(MESSAGES):
            channel.basic_publish("", queue, body, props)
    connection.close()
    for queue in queues:
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
    started = time.perf_counter()
    with open(os.devnull, "w") as sink:
        assert Runner(trivial, config, EventLog("text", sink)).run() == 0
    rate = MESSAGES / (time.perf_counter() - started)
    assert done == MESSAGES
    return rate


@pytest.mark.parametrize("prefetch", [1, 50])
def test_worker_throughput_against_bare_pika(rabbitmq: RabbitMQ, prefetch: int) -> None:
    print()
    ratios, bare_rates, worker_rates = [], [], []
    for round_number in range(1, ROUNDS + 1):
        queues = {
            "bare": f"bench-{uuid.uuid4().hex[:8]}",
            "worker": f"bench-{uuid.uuid4().hex[:8]}",
        }
        try:
            fill(rabbitmq, *queues.values())
            order = ["bare", "worker"] if round_number % 2 else ["worker", "bare"]
            rates = {}
            for kind in order:
                measure = bare_pika_rate if kind == "bare" else worker_rate
                rates[kind] = measure(rabbitmq, queues[kind], prefetch)
            for q in queues.values():
                wait_counts(rabbitmq, q, ready=0, unacked=0)
        finally:
            for q in queues.values():
                rabbitmq.delete_queue(q)
        ratios.append(rates["worker"] / rates["bare"])
        bare_rates.append(rates["bare"])
        worker_rates.append(rates["worker"])
        print(
            f"prefetch {prefetch} round {round_number} ({order[0]} first): "
            f"bare pika {rates['bare']:.0f} msg/s, worker {rates['worker']:.0f} msg/s, "
            f"ratio {ratios[-1]:.2f}"
        )
    print(
        f"prefetch {prefetch}: median bare pika {statistics.median(bare_rates):.0f} msg/s, "
        f"median worker {statistics.median(worker_rates):.0f} msg/s, "
        f"median ratio {statistics.median(ratios):.2f} (goal >= 0.90), "
        f"{ROUNDS} rounds of {MESSAGES} messages each"
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
