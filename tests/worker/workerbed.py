"""Real worker processes against the test bed's RabbitMQ, for the worker tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pika
from jobtide_testbed.nodeboot import booted_at
from jobtide_testbed.process import wait_for
from jobtide_testbed.rabbitmq import RabbitMQ
from jobtide_worker import topology

HERE = Path(__file__).resolve().parent


def broker_env(broker: RabbitMQ) -> dict[str, str]:
    return {
        "JOBTIDE_BROKER_HOST": broker.host,
        "JOBTIDE_BROKER_PORT": str(broker.amqp_port),
        "JOBTIDE_BROKER_USERNAME": broker.username,
        "JOBTIDE_BROKER_PASSWORD": broker.password,
    }


class Worker:
    """`python -m jobtide_worker` as a real process, output in a log file."""

    def __init__(self, env: dict[str, str], log_path: Path, prefix: Sequence[str] = ()) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(
            [*prefix, sys.executable, "-m", "jobtide_worker"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker still running after {timeout} s:\n{self.log()}") from None

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def task_lines(self) -> list[str]:
        return [
            line
            for line in self.log().splitlines()
            if " INFO task " in line or " WARNING task " in line
        ]

    def close(self) -> None:
        if self.popen.poll() is None:
            self.kill()
        self._log.close()


class WorkerBed:
    """One test's queue, record file and workers."""

    def __init__(self, broker: RabbitMQ, tmp_path: Path) -> None:
        self.broker = broker
        self.tmp_path = tmp_path
        self.queue = f"wt-{uuid.uuid4().hex[:10]}"
        self.record_path = tmp_path / "record.jsonl"
        self.workers: list[Worker] = []
        self._policies: list[str] = []

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBTIDE_")}
        env.update(broker_env(self.broker))
        env.update(
            JOBTIDE_QUEUE=self.queue,
            JOBTIDE_HANDLER="handlers:handle",
            JOBTIDE_IDLE_TIMEOUT_SECONDS="2",
            # Off unless a test turns it on (test_worker_quiet.py): the other tests wait for
            # their workers by the idle timeout alone.
            JOBTIDE_QUIET_CHECK_SECONDS="0",
            JOBTIDE_BROKER_MANAGEMENT_PORT=str(self.broker.management_port),
            JOBTIDE_MAX_ATTEMPTS="3",
            JOBTIDE_TEST_RECORD=str(self.record_path),
            PYTHONPATH=str(HERE),
        )
        env.update(overrides)
        return env

    def start_worker(self, node_booted_at: float | None = None, **overrides: str) -> Worker:
        """A worker with the bed's settings and `overrides`; with `node_booted_at`, on a node
        booted then (its own time namespace: jobtide_testbed.nodeboot)."""
        prefix = booted_at(node_booted_at) if node_booted_at is not None else []
        log_path = self.tmp_path / f"worker-{len(self.workers)}.log"
        worker = Worker(self.env(**overrides), log_path, prefix)
        self.workers.append(worker)
        return worker

    def publish(self, *tasks: Any) -> list[str]:
        from jobtide_worker import BrokerConfig, publish

        broker = BrokerConfig(
            host=self.broker.host,
            port=self.broker.amqp_port,
            username=self.broker.username,
            password=self.broker.password,
        )
        return publish(self.queue, list(tasks), broker=broker)

    def publish_raw(self, body: bytes, content_type: str) -> None:
        with self.channel() as channel:
            channel.basic_publish(
                "",
                self.queue,
                body,
                pika.BasicProperties(
                    content_type=content_type, delivery_mode=2, message_id=uuid.uuid4().hex
                ),
            )

    @contextlib.contextmanager
    def channel(self) -> Iterator[Any]:
        connection = pika.BlockingConnection(pika.URLParameters(self.broker.amqp_url))
        try:
            yield connection.channel()
        finally:
            connection.close()

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        if not self.record_path.exists():
            return []
        rows = [json.loads(line) for line in self.record_path.read_text().splitlines()]
        return [r for r in rows if event is None or r["event"] == event]

    def wait_record(self, event: str, count: int = 1, timeout: float = 30) -> list[dict[str, Any]]:
        wait_for(
            lambda: len(self.records(event)) >= count,
            timeout=timeout,
            what=f"{count} {event!r} records",
            interval=0.1,
        )
        return self.records(event)

    def dead_letters(self) -> list[tuple[Any, bytes]]:
        """Everything in the dead-letter queue (taken off it)."""
        found = []
        with self.channel() as channel:
            while True:
                method, props, body = channel.basic_get(f"{self.queue}.dlq", auto_ack=True)
                if method is None:
                    return found
                found.append((props, body))

    def define_topology(
        self, max_attempts: int, max_task_seconds: float, group_size: int = 0
    ) -> dict[str, Any]:
        """Load the chart's definitions of this queue (jobtide_worker.topology, its quorum
        queues of `group_size` members) and wait until the broker applies its policy; returns
        the policy's definition. Removed by close()."""
        pipelines = [(self.queue, max_attempts, max_task_seconds)]
        definitions = topology.definitions(pipelines, group_size=group_size)
        response = self.broker.api("POST", "definitions", json=definitions)
        assert response.status_code in (200, 204), response.text
        self._policies.append(topology.policy_name(self.queue))
        [policy] = definitions["policies"]
        expected: dict[str, Any] = policy["definition"]

        def applied() -> bool:
            queue = self.broker.api("GET", f"queues/%2F/{self.queue}").json()
            return bool(queue.get("effective_policy_definition") == expected)

        wait_for(applied, timeout=30, what=f"policy {expected} on the queue")
        return expected

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        with contextlib.suppress(Exception):
            for policy in self._policies:
                self.broker.api("DELETE", f"policies/%2F/{policy}")
            self.broker.delete_queue(self.queue)
            self.broker.delete_queue(f"{self.queue}.dlq")
