"""The worker process against a real RabbitMQ node: acks, retries, dead letters, limits,
signals, crashes and broker outages."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
import pytest
from jobtide_testbed.process import wait_for
from jobtide_testbed.rabbitmq import wait_counts
from jobtide_worker import Task, WorkerConfig, run
from workerbed import Worker, WorkerBed

pytestmark = pytest.mark.integration


def test_tasks_published_by_the_cli_are_done_then_the_worker_exits_idle(bed: WorkerBed) -> None:
    lines = "".join(json.dumps({"id": i}) + "\n" for i in range(5))
    published = subprocess.run(
        [sys.executable, "-m", "jobtide_worker", "publish", "--queue", bed.queue],
        input=lines,
        text=True,
        capture_output=True,
        env=bed.env(),
        timeout=60,
        check=False,
    )
    assert published.returncode == 0, published.stderr
    wait_counts(bed.broker, bed.queue, ready=5, unacked=0)

    worker = bed.start_worker(JOBTIDE_IDLE_TIMEOUT_SECONDS="1.5", JOBTIDE_LOG_FORMAT="json")
    assert worker.wait(60) == 0

    assert sorted(r["id"] for r in bed.records("done")) == [0, 1, 2, 3, 4]
    wait_counts(bed.broker, bed.queue, ready=0, unacked=0)
    entries = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    task_entries = [e for e in entries if e["message"] == "task"]
    assert [e["outcome"] for e in task_entries] == ["done"] * 5
    assert all(float(e["duration"]) >= 0 for e in task_entries)
    assert entries[-1]["message"] == "worker exiting"
    assert entries[-1]["reason"] == "idle"
    assert bed.broker.password not in worker.log()


def test_task_lines_are_written_while_the_worker_runs_not_only_at_exit(bed: WorkerBed) -> None:
    # The consumer thread only queues them; the main thread writes them every 0.2 s.
    worker = bed.start_worker(JOBTIDE_IDLE_TIMEOUT_SECONDS="60")
    bed.publish({"id": 1}, {"id": 2})
    wait_for(lambda: len(worker.task_lines()) == 2, timeout=15, what="two task lines")
    assert worker.popen.poll() is None, "the worker should still be waiting for tasks"
    assert all("outcome=done" in line for line in worker.task_lines())
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0


def test_run_as_a_library_call_returns_its_exit_code_and_gives_the_signals_back(
    bed: WorkerBed,
) -> None:
    handled: list[int] = []

    def handle(task: Task) -> None:
        handled.append(task.json["id"])

    bed.publish({"id": 1}, {"id": 2}, {"id": 3})
    sigterm_before = signal.getsignal(signal.SIGTERM)
    config = WorkerConfig.from_env(bed.env(JOBTIDE_IDLE_TIMEOUT_SECONDS="1"))
    assert run(handle, config) == 0
    assert sorted(handled) == [1, 2, 3]
    assert signal.getsignal(signal.SIGTERM) is sigterm_before
    wait_counts(bed.broker, bed.queue, ready=0, unacked=0)


def test_handler_failing_twice_succeeds_on_the_third_attempt(bed: WorkerBed) -> None:
    bed.publish({"id": "flaky", "fail_until_attempt": 3})
    worker = bed.start_worker()
    assert worker.wait(60) == 0
    assert [r["attempt"] for r in bed.records("start")] == [1, 2, 3]
    assert [r["attempt"] for r in bed.records("done")] == [3]
    assert bed.dead_letters() == []
    wait_counts(bed.broker, bed.queue, ready=0, unacked=0)


@pytest.mark.broker_compat
def test_poison_message_reaches_the_dead_letter_queue_with_its_reason(bed: WorkerBed) -> None:
    bed.publish({"id": "poison", "always_fail": True}, {"id": "fine"})
    worker = bed.start_worker(JOBTIDE_WORKER_NAME="worker-a")
    assert worker.wait(60) == 0

    assert [r["attempt"] for r in bed.records("start") if r["id"] == "poison"] == [1, 2, 3]
    assert [r["id"] for r in bed.records("done")] == ["fine"]
    [(props, body)] = bed.dead_letters()
    assert json.loads(body) == {"id": "poison", "always_fail": True}
    headers = props.headers
    assert headers["x-jobtide-reason"] == "max-attempts"
    assert headers["x-jobtide-exception"] == "ValueError"
    assert headers["x-jobtide-error"] == "boom poison"
    assert headers["x-jobtide-attempts"] == 3
    assert headers["x-jobtide-worker"] == "worker-a"
    assert headers["x-jobtide-queue"] == bed.queue
    wait_counts(bed.broker, bed.queue, ready=0, unacked=0)


# RabbitMQ 4's quorum queues dead-letter a message after 20 failed deliveries unless a
# delivery limit is set: the chart's policy sets the pipeline's maxAttempts, here above 20.
MANY_ATTEMPTS = 22


@pytest.mark.broker_compat
def test_every_attempt_is_made_past_the_brokers_default_delivery_limit(bed: WorkerBed) -> None:
    """A handler failing every time: the worker requeues it (nack) until its last attempt,
    then dead-letters it with its reason. RabbitMQ 4 counts these requeues only in
    x-acquired-count, so the attempt number follows that header."""
    bed.define_topology(MANY_ATTEMPTS, max_task_seconds=30)
    bed.publish({"id": "poison", "always_fail": True})
    worker = bed.start_worker(JOBTIDE_MAX_ATTEMPTS=str(MANY_ATTEMPTS))
    assert worker.wait(120) == 0
    assert [r["attempt"] for r in bed.records("start")] == list(range(1, MANY_ATTEMPTS + 1))
    [(props, _body)] = bed.dead_letters()
    assert props.headers["x-jobtide-reason"] == "max-attempts"
    assert props.headers["x-jobtide-attempts"] == MANY_ATTEMPTS
    wait_counts(bed.broker, bed.queue, ready=0, unacked=0)


@pytest.mark.broker_compat
def test_a_crash_loop_ends_after_max_attempts_past_the_brokers_default(bed: WorkerBed) -> None:
    """Workers that die mid-task give no verdict: each lost delivery counts as a failed one.
    The policy lets the task be tried MANY_ATTEMPTS times (the broker's default would have
    dead-lettered it after 20 without the pipeline's say); the next worker to get it
    dead-letters it, unrun, with its reason."""
    bed.define_topology(MANY_ATTEMPTS, max_task_seconds=30)
    bed.publish({"id": "crasher"})
    with bed.channel() as channel:
        for attempt in range(1, MANY_ATTEMPTS + 1):
            # A worker that takes the task and dies: its channel goes, the task is returned
            # (a moment later: the queue handles the return after the close).
            crashed = channel.connection.channel()

            def taken(channel: Any = crashed) -> bool:
                method, _props, _body = channel.basic_get(bed.queue)
                return method is not None

            wait_for(taken, timeout=10, what=f"the task back for attempt {attempt}")
            crashed.close()
    worker = bed.start_worker(JOBTIDE_MAX_ATTEMPTS=str(MANY_ATTEMPTS))
    assert worker.wait(60) == 0
    assert bed.records("start") == []
    [(props, body)] = bed.dead_letters()
    assert json.loads(body) == {"id": "crasher"}
    assert props.headers["x-jobtide-reason"] == "attempts-exhausted"
    assert props.headers["x-jobtide-attempts"] == MANY_ATTEMPTS + 1
    wait_counts(bed.broker, bed.queue, ready=0, unacked=0)


def test_permanent_error_and_undecodable_body_are_dead_lettered_at_once(bed: WorkerBed) -> None:
    bed.publish({"id": "hopeless", "permanent": True})
    bed.publish_raw(b'{"id": "broken', "application/json")
    worker = bed.start_worker()
    assert worker.wait(60) == 0

    assert [r["id"] for r in bed.records("start")] == ["hopeless"]  # the broken one never ran
    reasons = {p.headers["x-jobtide-reason"]: (p.headers, body) for p, body in bed.dead_letters()}
    assert set(reasons) == {"permanent-error", "undecodable"}
    permanent, _ = reasons["permanent-error"]
    assert permanent["x-jobtide-exception"] == "PermanentError"
    assert permanent["x-jobtide-attempts"] == 1
    undecodable, body = reasons["undecodable"]
    assert body == b'{"id": "broken'
    assert undecodable["x-jobtide-exception"] == "UndecodableBody"
    wait_counts(bed.broker, bed.queue, ready=0, unacked=0)


def test_kill_9_mid_task_the_task_is_redone_by_another_worker(bed: WorkerBed) -> None:
    bed.publish({"id": "crash", "seconds": 1})
    first = bed.start_worker(JOBTIDE_IDLE_TIMEOUT_SECONDS="30")
    [started] = bed.wait_record("start")
    first.kill()
    assert bed.records("done") == []

    second = bed.start_worker()
    assert second.wait(60) == 0
    [done] = bed.records("done")
    assert done["pid"] == second.popen.pid
    assert done["pid"] != started["pid"]
    assert done["attempt"] == 2
    assert done["redelivered"] is True
    wait_counts(bed.broker, bed.queue, ready=0, unacked=0)


def test_sigterm_lets_the_running_task_finish_and_exits_0(bed: WorkerBed) -> None:
    bed.publish({"id": "busy", "seconds": 2}, {"id": "next"})
    worker = bed.start_worker(
        JOBTIDE_IDLE_TIMEOUT_SECONDS="30", JOBTIDE_SHUTDOWN_GRACE_SECONDS="20"
    )
    bed.wait_record("start")
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert [r["id"] for r in bed.records("done")] == ["busy"]
    assert [r["id"] for r in bed.records("start")] == ["busy"]  # took nothing new
    wait_counts(bed.broker, bed.queue, ready=1, unacked=0, consumers=0)
    # Its consumer was cancelled before the ack, so "next" was never delivered to it: the
    # following worker gets it as a first delivery.
    assert bed.start_worker().wait(60) == 0
    [later] = [r for r in bed.records("start") if r["id"] == "next"]
    assert (later["attempt"], later["redelivered"]) == (1, False)


def test_sigterm_past_the_grace_requeues_the_running_task(bed: WorkerBed) -> None:
    bed.publish({"id": "slow", "seconds": 60})
    worker = bed.start_worker(JOBTIDE_IDLE_TIMEOUT_SECONDS="30", JOBTIDE_SHUTDOWN_GRACE_SECONDS="1")
    bed.wait_record("start")
    worker.signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    assert bed.records("done") == []
    wait_counts(bed.broker, bed.queue, ready=1, unacked=0, consumers=0)
    assert "task still running at shutdown; requeued" in worker.log()


def test_max_tasks_stops_after_that_many(bed: WorkerBed) -> None:
    bed.publish({"id": 1}, {"id": 2}, {"id": 3})
    worker = bed.start_worker(JOBTIDE_MAX_TASKS="2", JOBTIDE_IDLE_TIMEOUT_SECONDS="30")
    assert worker.wait(30) == 0
    assert [r["id"] for r in bed.records("done")] == [1, 2]
    assert "reason=max-tasks" in worker.log()
    wait_counts(bed.broker, bed.queue, ready=1, unacked=0, consumers=0)


def test_max_lifetime_stops_a_busy_worker(bed: WorkerBed) -> None:
    bed.publish(*({"id": i, "seconds": 0.5} for i in range(20)))
    worker = bed.start_worker(
        JOBTIDE_MAX_LIFETIME_SECONDS="2", JOBTIDE_IDLE_TIMEOUT_SECONDS="30", JOBTIDE_PREFETCH="5"
    )
    assert worker.wait(30) == 0
    done = len(bed.records("done"))
    assert 1 <= done < 20
    assert "reason=max-lifetime" in worker.log()
    wait_counts(bed.broker, bed.queue, ready=20 - done, unacked=0, consumers=0)


def test_max_lifetime_gives_up_a_task_running_past_max_task_seconds(bed: WorkerBed) -> None:
    bed.publish({"id": "endless", "seconds": 60})
    worker = bed.start_worker(
        JOBTIDE_MAX_LIFETIME_SECONDS="1",
        JOBTIDE_MAX_TASK_SECONDS="1",
        JOBTIDE_IDLE_TIMEOUT_SECONDS="30",
    )
    assert worker.wait(30) == 0
    assert bed.records("done") == []
    log = worker.log()
    assert "task still running at shutdown; requeued" in log
    assert "reason=max-lifetime" in log
    wait_counts(bed.broker, bed.queue, ready=1, unacked=0, consumers=0)


def test_long_task_keeps_the_connection_alive_by_heartbeats(bed: WorkerBed) -> None:
    # The broker drops a connection silent for two heartbeat intervals; the task lasts four.
    bed.publish({"id": "long", "seconds": 4})
    worker = bed.start_worker(JOBTIDE_HEARTBEAT_SECONDS="1")
    assert worker.wait(60) == 0
    assert [(r["id"], r["attempt"]) for r in bed.records("start")] == [("long", 1)]
    assert [r["id"] for r in bed.records("done")] == ["long"]
    assert "connection lost" not in worker.log()


@pytest.mark.broker_compat
def test_the_queues_own_consumer_timeout_outlasts_a_shorter_broker_wide_one(
    private_bed: Callable[..., WorkerBed],
) -> None:
    """The chart's policy gives each queue its own consumer timeout (maxTaskSeconds + 60 s),
    which RabbitMQ 4 honours above the broker-wide `consumer_timeout`: a task outliving the
    broker-wide one keeps its delivery and is done once. (The worker's own `x-consumer-timeout`
    argument is not enough: 4.0 ignores it.) A consumer on a queue without the policy loses
    its delivery (RabbitMQ 4.0 closes its channel, 4.3 cancels the consumer), so the
    broker-wide timeout is really in force."""
    bed = private_bed(consumer_timeout_ms=1000)
    # The broker checks the timeout on each channel tick (one minute by default): tick faster
    # so the test takes seconds. The check itself is the broker's own.
    bed.broker.ctl("eval", "application:set_env(rabbit, channel_tick_interval, 300).")
    bed.define_topology(max_attempts=3, max_task_seconds=30)
    bed.publish({"id": "overdue", "seconds": 8})
    worker = bed.start_worker(JOBTIDE_IDLE_TIMEOUT_SECONDS="3")
    assert worker.wait(120) == 0
    assert [r["attempt"] for r in bed.records("start")] == [1]
    assert [r["id"] for r in bed.records("done")] == ["overdue"]
    log = worker.log()
    assert "channel closed by the broker" not in log
    assert "outcome=ack-lost" not in log
    wait_counts(bed.broker, bed.queue, ready=0, unacked=0)
    assert bed.dead_letters() == []

    bare = f"{bed.queue}.bare"
    connection = pika.BlockingConnection(pika.URLParameters(bed.broker.amqp_url))
    try:
        channel = connection.channel()
        channel.queue_declare(bare, durable=True, arguments={"x-queue-type": "quorum"})
        channel.basic_publish("", bare, b"held")
        # A callback consumer: pika's consume() generator fails on the broker's cancel.
        held: list[object] = []
        cancelled: list[object] = []
        channel.add_on_cancel_callback(cancelled.append)
        channel.basic_consume(bare, lambda _ch, method, _props, _body: held.append(method))

        def returned() -> bool:
            if channel.is_open:
                connection.process_data_events(time_limit=0.3)
            lost = bool(cancelled) or channel.is_closed
            counts = bed.broker.queue_counts(bare)
            return len(held) == 1 and lost and (counts.ready, counts.unacked) == (1, 0)

        wait_for(returned, timeout=30, what="the held delivery back in the queue")
    finally:
        # RabbitMQ 4.3.6 may repeat its cancel, which pika 1.4 cannot take (it drops the
        # connection): how the connection ends is not what this test is about.
        with contextlib.suppress(pika.exceptions.AMQPError):
            connection.close()
        bed.broker.delete_queue(bare)


def test_broker_restart_mid_stream_loses_nothing(private_bed: Callable[..., WorkerBed]) -> None:
    bed = private_bed()
    ids = list(range(30))
    bed.publish(*({"id": i, "seconds": 0.1} for i in ids))
    worker = bed.start_worker(JOBTIDE_RECONNECT_SECONDS="120", JOBTIDE_IDLE_TIMEOUT_SECONDS="3")
    bed.wait_record("done", count=5)
    bed.broker.restart()
    assert worker.wait(180) == 0
    assert sorted({r["id"] for r in bed.records("done")}) == ids
    assert "connection lost" in worker.log()
    wait_counts(bed.broker, bed.queue, ready=0, unacked=0)


def test_broker_gone_past_the_budget_exits_4_and_the_task_survives(
    private_bed: Callable[..., WorkerBed],
) -> None:
    bed = private_bed()
    bed.publish({"id": "orphan", "seconds": 30})
    worker = bed.start_worker(JOBTIDE_RECONNECT_SECONDS="3", JOBTIDE_IDLE_TIMEOUT_SECONDS="30")
    bed.wait_record("start")
    bed.broker.stop()
    assert worker.wait(60) == 4
    assert "broker unreachable, giving up" in worker.log()
    bed.broker.start()
    wait_counts(bed.broker, bed.queue, ready=1, unacked=0)


def test_bad_configuration_exits_2_naming_the_variable(bed: WorkerBed) -> None:
    worker = bed.start_worker(JOBTIDE_PREFETCH="many")
    assert worker.wait(30) == 2
    assert "JOBTIDE_PREFETCH" in worker.log()
    assert bed.broker.password not in worker.log()

    env = bed.env()
    del env["JOBTIDE_QUEUE"]
    missing = subprocess.run(
        [sys.executable, "-m", "jobtide_worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert missing.returncode == 2
    assert "JOBTIDE_QUEUE" in missing.stderr


def test_handler_that_cannot_be_loaded_exits_3(bed: WorkerBed) -> None:
    worker = bed.start_worker(JOBTIDE_HANDLER="no_such_module:handle")
    assert worker.wait(30) == 3
    assert "no_such_module" in worker.log()


def consumer_priority_of(worker: Worker) -> int:
    wait_for(lambda: " consuming " in worker.log(), timeout=30, what="worker consuming")
    found = re.search(r" consuming .*priority=(\S+)", worker.log())
    assert found, worker.log()
    return int(found.group(1))


def start_two_workers_a_second_apart(bed: WorkerBed, **settings: str) -> tuple[Worker, Worker]:
    """Priorities count whole seconds of start time: the younger starts in a later second."""
    older = bed.start_worker(JOBTIDE_IDLE_TIMEOUT_SECONDS="60", **settings)
    wait_for(lambda: " consuming " in older.log(), timeout=30, what="older worker consuming")
    time.sleep(1.05 - time.time() % 1)
    younger = bed.start_worker(JOBTIDE_IDLE_TIMEOUT_SECONDS="60", **settings)
    wait_for(lambda: " consuming " in younger.log(), timeout=30, what="younger worker consuming")
    wait_counts(bed.broker, bed.queue, ready=0, unacked=0, consumers=2)
    return older, younger


def publish_one_at_a_time(bed: WorkerBed, count: int) -> list[int]:
    """Each task once the one before is done: whoever takes it has a free slot; the pids."""
    for number in range(count):
        bed.publish({"id": number})
        bed.wait_record("done", count=number + 1)
    return [r["pid"] for r in bed.records("done")]


def test_the_older_worker_gets_every_task_while_it_has_a_free_slot(bed: WorkerBed) -> None:
    older, younger = start_two_workers_a_second_apart(bed, JOBTIDE_CONSUMER_PRIORITY="age")
    assert consumer_priority_of(older) > consumer_priority_of(younger)

    assert publish_one_at_a_time(bed, 6) == [older.popen.pid] * 6

    # With the older one busy, the younger one takes the next task at once.
    bed.publish({"id": "busy", "seconds": 2}, {"id": "overflow"})
    [overflow] = [r for r in bed.wait_record("done", count=8) if r["id"] == "overflow"]
    assert overflow["pid"] == younger.popen.pid
    for worker in (older, younger):
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0


def test_the_older_nodes_workers_share_every_task_while_they_have_a_free_slot(
    bed: WorkerBed,
) -> None:
    """The default, node priority: two workers on a node booted 100 s ago, one on a node
    booted 50 s ago (each in a time namespace that reads as its node's boot). The younger
    node's worker starts first, so its worker is the oldest: the node decides, not the age."""
    now = time.time()
    settings = {"JOBTIDE_IDLE_TIMEOUT_SECONDS": "60"}
    young_node = bed.start_worker(node_booted_at=now - 50, **settings)
    old_node = [bed.start_worker(node_booted_at=now - 100, **settings) for _ in range(2)]
    wait_counts(bed.broker, bed.queue, ready=0, unacked=0, consumers=3)
    first, second = (consumer_priority_of(worker) for worker in old_node)
    assert first == second > consumer_priority_of(young_node)

    pids = publish_one_at_a_time(bed, 6)
    assert set(pids) == {worker.popen.pid for worker in old_node}, pids

    # With both of the older node's workers busy, the younger node's takes the next task.
    bed.publish({"id": "busy-1", "seconds": 2}, {"id": "busy-2", "seconds": 2}, {"id": "overflow"})
    [overflow] = [r for r in bed.wait_record("done", count=9) if r["id"] == "overflow"]
    assert overflow["pid"] == young_node.popen.pid
    for worker in (young_node, *old_node):
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0


def test_without_consumer_priorities_both_workers_share_the_tasks(bed: WorkerBed) -> None:
    older, younger = start_two_workers_a_second_apart(bed, JOBTIDE_CONSUMER_PRIORITY="none")
    assert "priority=none" in older.log()

    pids = publish_one_at_a_time(bed, 6)
    assert set(pids) == {older.popen.pid, younger.popen.pid}
    for worker in (older, younger):
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0
