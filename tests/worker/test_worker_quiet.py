"""Leaving when the queue is silent, against a real RabbitMQ node and its management API: an
idle worker leaves once nothing is published and nothing is ready, stays while the queue is
fed, reads over HTTPS when the broker is reached over TLS, and leaves by its idle timeout
alone when the management API fails or answers oddly (through the test bed's fault proxy)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jobtide_testbed.faultproxy import Fault, FaultProxy
from jobtide_testbed.process import wait_for
from jobtide_testbed.rabbitmq import RabbitMQ, wait_counts
from jobtide_worker.quiet import COLUMNS
from workerbed import Worker, WorkerBed

pytestmark = pytest.mark.integration

# Far above how long each test takes: a worker that leaves before it left because the queue
# fell silent, which its exit line's reason says.
LONG_IDLE = "60"
QUIET = {"JOBTIDE_QUIET_CHECK_SECONDS": "5"}


def exit_line(worker: Worker) -> dict[str, object]:
    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    [exiting] = [line for line in lines if line["message"] == "worker exiting"]
    return exiting


def published_before_the_workers(bed: WorkerBed, count: int) -> None:
    """The queue has statistics from the workers' first read on (a queue nothing was ever
    published to has none yet)."""
    bed.publish(*({"id": number} for number in range(count)))
    wait_counts(bed.broker, bed.queue, ready=count)


def test_an_idle_worker_leaves_once_the_queue_is_silent(bed: WorkerBed) -> None:
    published_before_the_workers(bed, 2)
    worker = bed.start_worker(
        JOBTIDE_IDLE_TIMEOUT_SECONDS=LONG_IDLE, JOBTIDE_LOG_FORMAT="json", **QUIET
    )
    bed.wait_record("done", count=2)
    assert worker.wait(int(LONG_IDLE) - 10) == 0
    exiting = exit_line(worker)
    assert exiting["reason"] == "queue-silent", worker.log()
    assert exiting["tasks"] == 2
    assert "queue counters unreadable" not in worker.log()


def test_after_a_broker_restart_an_idle_worker_still_leaves_once_the_queue_is_silent(
    private_bed: Callable[..., WorkerBed],
) -> None:
    """A restarted broker keeps the queue's messages but not its publish counter: until
    something is published again it answers `message_stats: []`, which is 0 published since
    the restart. Idle workers once took it for an odd answer and stayed up to their idle
    timeout after every broker restart."""
    bed = private_bed()
    published_before_the_workers(bed, 3)
    bed.broker.restart()
    with bed.channel() as channel:  # a delivery gives the queue statistics again
        method, _properties, _body = channel.basic_get(bed.queue)
        channel.basic_ack(method.delivery_tag)

    def counters() -> Any:
        path = f"queues/%2F/{bed.queue}"
        return bed.broker.api("GET", path, params={"columns": COLUMNS}).json()

    wait_for(
        lambda: counters().get("message_stats") == [],
        timeout=30,
        what="the restarted broker's statistics without a publish count",
    )
    worker = bed.start_worker(
        JOBTIDE_IDLE_TIMEOUT_SECONDS=LONG_IDLE, JOBTIDE_LOG_FORMAT="json", **QUIET
    )
    bed.wait_record("done", count=2)
    started = time.monotonic()
    assert worker.wait(int(LONG_IDLE) - 10) == 0
    print(f"left {time.monotonic() - started:.1f} s after its last task")
    exiting = exit_line(worker)
    assert exiting["reason"] == "queue-silent", worker.log()
    assert exiting["tasks"] == 2
    # No answer taken for an odd one (a read cut by the network would not be about this).
    assert "OddAnswer" not in worker.log()
    # What it read all along: nothing has been published since the restart.
    after = counters()
    assert (after["message_stats"], after["messages_ready"]) == ([], 0)


class Feeder:
    """Publishes a task to the bed's queue every second, from `start` until `stop`."""

    def __init__(self, bed: WorkerBed) -> None:
        self._bed = bed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._feed, daemon=True)

    def _feed(self) -> None:
        number = 0
        while not self._stop.wait(1.0):
            number += 1
            self._bed.publish({"id": f"fed-{number}"})

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)


@pytest.fixture
def feeder(bed: WorkerBed) -> Iterator[Feeder]:
    feeding = Feeder(bed)
    try:
        yield feeding
    finally:
        feeding.stop()


def test_an_idle_worker_stays_while_the_queue_is_fed(bed: WorkerBed, feeder: Feeder) -> None:
    # The node priority (the default) gives every task to the worker of the older node, so
    # the younger node's worker is idle the whole time, as the surplus worker of a falling
    # load; the queue is fed all along. (Each worker reads its node's boot time.)
    published_before_the_workers(bed, 1)
    settings = {"JOBTIDE_IDLE_TIMEOUT_SECONDS": LONG_IDLE, "JOBTIDE_LOG_FORMAT": "json", **QUIET}
    now = time.time()
    older = bed.start_worker(node_booted_at=now - 100, **settings)
    wait_for(lambda: '"consuming"' in older.log(), timeout=30, what="older worker consuming")
    feeder.start()
    younger = bed.start_worker(node_booted_at=now - 50, **settings)
    wait_for(lambda: '"consuming"' in younger.log(), timeout=30, what="younger worker consuming")
    # Three reads of the younger worker's counters (every 5 s), each finding new publishes.
    time.sleep(16.0)
    assert younger.popen.poll() is None, younger.log()
    assert older.popen.poll() is None, older.log()
    feeder.stop()
    for worker in (younger, older):
        assert worker.wait(int(LONG_IDLE) - 10) == 0
        assert exit_line(worker)["reason"] == "queue-silent", worker.log()
    pids = {record["pid"] for record in bed.records("done")}
    assert pids == {older.popen.pid}
    assert exit_line(younger)["tasks"] == 0


# What the management API may do instead of answering with the queue's counters.
FAULTS = {
    "server error": Fault("status", path_contains="/api/queues/", status=500),
    "connection reset": Fault("reset", path_contains="/api/queues/"),
    "not JSON": Fault("malform", path_contains="/api/queues/"),
    "no statistics": Fault("replace", path_contains="/api/queues/", body=b'{"messages_ready": 0}'),
    "a count that is not one": Fault(
        "replace",
        path_contains="/api/queues/",
        body=b'{"messages_ready": 0, "message_stats": {"publish": "many"}}',
    ),
}


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_an_odd_or_failed_read_leaves_the_idle_timeout_in_charge(
    bed: WorkerBed, fault: Fault
) -> None:
    with FaultProxy("127.0.0.1", bed.broker.management_port) as proxy:
        proxy.inject(fault)
        worker = bed.start_worker(
            JOBTIDE_IDLE_TIMEOUT_SECONDS="12",
            JOBTIDE_LOG_FORMAT="json",
            JOBTIDE_BROKER_MANAGEMENT_PORT=str(proxy.port),
            **QUIET,
        )
        bed.publish({"id": 1})
        bed.wait_record("done")
        wait_counts(bed.broker, bed.queue, ready=0, unacked=0)
        assert worker.wait(40) == 0
        # Reads were made all along the idle spell (0.5 s into it, then every 5 s) and met
        # the fault each time.
        assert proxy.applied[fault.kind] >= 3
    log = worker.log()
    assert exit_line(worker)["reason"] == "idle", log
    problems = [line for line in log.splitlines() if "queue counters unreadable" in line]
    assert len(problems) == 1, log
    assert bed.broker.password not in log


def test_over_tls_the_counters_are_read_over_https(rabbitmq_tls: RabbitMQ, tmp_path: Path) -> None:
    # A node reached over TLS only: AMQPS and the management API over HTTPS, trusting the test
    # CA alone, the certificate checked for the host name as AMQP's is.
    bed = WorkerBed(rabbitmq_tls, tmp_path)
    try:
        published_before_the_workers(bed, 1)
        worker = bed.start_worker(
            **rabbitmq_tls.tls_client_env(),
            JOBTIDE_IDLE_TIMEOUT_SECONDS=LONG_IDLE,
            JOBTIDE_LOG_FORMAT="json",
            **QUIET,
        )
        bed.wait_record("done")
        assert worker.wait(int(LONG_IDLE) - 10) == 0
        assert exit_line(worker)["reason"] == "queue-silent", worker.log()
        assert "queue counters unreadable" not in worker.log()
    finally:
        bed.close()
