"""run-local against the real thing: the same tasks through the worker on the real broker and
through `run_local` give the same task lines, in the same order, and the same dead letters."""

from __future__ import annotations

import io
import json
from typing import Any

import handlers
import pytest
from jobtide_testbed.rabbitmq import wait_counts
from jobtide_worker import Task, WorkerConfig, run, run_local
from jobtide_worker.logs import EventLog
from workerbed import WorkerBed

pytestmark = pytest.mark.integration

TASKS = [
    {"id": "fine"},
    {"id": "flaky", "fail_until_attempt": 3},
    {"id": "poison", "always_fail": True},
    {"id": "hopeless", "permanent": True},
    {"id": "last"},
]
# What differs between two runs by nature: when, where, and the fresh message ids.
RUN_SPECIFIC = {"time", "message_id", "duration", "x-jobtide-worker", "x-jobtide-failed-at"}
# The dead-letter queue (a quorum queue) sets its own count on the message it delivers.
SET_BY_THE_DLQ = {"x-delivery-count"}


def task_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [without_run_specific(e) for e in entries if e["message"] == "task"]


def without_run_specific(
    fields: dict[str, Any], also: frozenset[str] = frozenset()
) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k not in RUN_SPECIFIC | also}


class Seen:
    """The handler of both runs; records what each delivery's Task was."""

    def __init__(self) -> None:
        self.tasks: list[tuple[Any, ...]] = []

    def __call__(self, task: Task) -> None:
        self.tasks.append(
            (task.json, task.attempt, task.redelivered, dict(task.headers), task.content_type)
        )
        handlers.fail_as_told(task)


def test_run_local_logs_and_dead_letters_as_the_worker_on_the_real_broker(
    bed: WorkerBed,
) -> None:
    bed.publish(*TASKS)
    wait_counts(bed.broker, bed.queue, ready=len(TASKS), unacked=0)
    worker_log = io.StringIO()
    config = WorkerConfig.from_env(
        bed.env(JOBTIDE_IDLE_TIMEOUT_SECONDS="1", JOBTIDE_WORKER_NAME="parity")
    )
    on_worker = Seen()
    assert run(on_worker, config, EventLog("json", worker_log)) == 0
    wait_counts(bed.broker, bed.queue, ready=0, unacked=0)

    local_log = io.StringIO()
    on_local = Seen()
    result = run_local(
        on_local,
        TASKS,
        queue=bed.queue,
        max_attempts=config.max_attempts,
        log=EventLog("json", local_log),
    )

    worker_lines = task_lines(worker_log)
    # Requeued tasks go back ahead of those waiting (RabbitMQ 4.3; 3.x put them behind).
    assert [(e["outcome"], e["attempt"]) for e in worker_lines] == [
        ("done", 1),
        ("retry", 1),
        ("retry", 2),
        ("done", 3),
        ("retry", 1),
        ("retry", 2),
        ("dead-letter", 3),
        ("dead-letter", 1),
        ("done", 1),
    ]
    assert task_lines(local_log) == worker_lines
    assert on_local.tasks == on_worker.tasks
    on_broker = [
        (json.loads(body), without_run_specific(properties.headers, SET_BY_THE_DLQ))
        for properties, body in bed.dead_letters()
    ]
    local = [
        (dead.task, without_run_specific(dict(dead.headers), SET_BY_THE_DLQ))
        for dead in result.dead_letters
    ]
    assert local == on_broker
    assert [reason["x-jobtide-reason"] for _, reason in local] == [
        "max-attempts",
        "permanent-error",
    ]
