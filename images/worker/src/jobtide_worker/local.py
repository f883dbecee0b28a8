"""A handler run on tasks without a broker, as the worker would run them: for handler authors'
own tests (`run_local`) and the command line (`python -m jobtide_worker run-local`).

Each task becomes the message `publish` would send (publisher.message) and is run by the
worker's own decision code (outcome.execute): the handler gets the same `Task`, the outcome is
decided by the same rules (`max_attempts`, `PermanentError`, undecodable bodies), dead letters
carry the same headers (outcome.dead_letter_headers) and every task ends in the same log line
(outcome.log_task). Only the broker is played here, as one quorum queue with one worker at
prefetch 1: a task to retry is returned with `x-acquired-count` raised and `redelivered` set,
at the head of the queue, ahead of the tasks already waiting (where RabbitMQ 4.3's quorum
queue puts a message its consumer rejected with requeue; 3.x put it behind them: measured on
the test bed's broker, test_worker_local_parity.py).
Nothing is ever lost in transit here, so the `ack-lost` and `duplicate` outcomes of a worker
whose connection drops do not occur.
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jobtide_worker.logs import INFO, EventLog
from jobtide_worker.outcome import (
    HEADER_PREFIX,
    Delivery,
    Handler,
    Outcome,
    dead_letter_headers,
    execute,
    log_task,
)
from jobtide_worker.pipeline_settings import PipelineSettings
from jobtide_worker.publisher import message
from jobtide_worker.task import ACQUIRED_COUNT_HEADER, Task

# What dead-letter headers name as the worker.
LOCAL_WORKER = "run-local"
DEFAULT_QUEUE = "local"


@dataclass(frozen=True)
class Attempt:
    """One delivery: the task the handler received (None when the body could not be decoded,
    so the handler did not run) and what it came to."""

    task: Task | None
    outcome: Outcome


@dataclass(frozen=True)
class DeadLetter:
    """What the worker would publish to `<queue>.dlq` for one of the given tasks."""

    task: Any  # as given to run_local
    body: bytes
    headers: Mapping[str, Any]  # the message's own plus `x-jobtide-reason` and the others

    @property
    def reason(self) -> str:
        return str(self.headers[f"{HEADER_PREFIX}reason"])


@dataclass
class LocalRun:
    attempts: list[Attempt] = field(default_factory=list)  # every delivery, in order
    dead_letters: list[DeadLetter] = field(default_factory=list)
    # Each task's final outcome (done or dead-letter), in the order the tasks were given.
    final: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every task was done."""
        return all(kind == "done" for kind in self.final)


def run_local(
    handler: Handler,
    tasks: Iterable[Any],
    *,
    queue: str = DEFAULT_QUEUE,
    max_attempts: int = PipelineSettings().max_attempts,
    log: EventLog | None = None,
) -> LocalRun:
    """Run `handler` on each task (a JSON value, or `bytes` sent as they are) as a worker of
    a pipeline with this `queue` and `max_attempts` would, until each task is done or
    dead-lettered. The task lines go to `log` (default: a text EventLog on stderr)."""
    PipelineSettings(max_attempts=max_attempts)  # the pipeline's own bounds, checked once
    log = log or EventLog()
    result = LocalRun()
    received: list[Task] = []  # what the handler got on the current delivery

    def traced(task: Task) -> object:
        received.append(task)
        return handler(task)

    given = list(tasks)
    result.final = [""] * len(given)
    ready: collections.deque[tuple[int, Delivery]] = collections.deque()
    for index, task in enumerate(given):
        body, properties = message(task)
        ready.append((index, Delivery(1, index + 1, body, properties, False)))
    while ready:
        index, delivery = ready.popleft()
        received.clear()
        # No task done here is ever delivered again: nothing to recognise as a duplicate.
        outcome = execute(
            traced, delivery, queue=queue, max_attempts=max_attempts, done_recently=()
        )
        result.attempts.append(Attempt(received[0] if received else None, outcome))
        if outcome.kind == "retry":
            ready.appendleft((index, _returned(delivery)))
        else:
            result.final[index] = outcome.kind
        if outcome.kind == "dead-letter":
            headers = dead_letter_headers(
                delivery, outcome, worker=LOCAL_WORKER, pipeline=queue, queue=queue
            )
            result.dead_letters.append(DeadLetter(given[index], delivery.body, headers))
        log_task(log, delivery, outcome, queue=queue)
        log.flush()
    log.event(
        INFO,
        "run-local finished",
        tasks=len(given),
        done=result.final.count("done"),
        dead_lettered=result.final.count("dead-letter"),
        deliveries=len(result.attempts),
    )
    return result


def _returned(delivery: Delivery) -> Delivery:
    """The next delivery of a message the worker requeued, as a RabbitMQ 4 quorum queue makes
    it (a requeue counts in `x-acquired-count`, not in `x-delivery-count`)."""
    properties = copy.copy(delivery.properties)
    headers = dict(properties.headers or {})
    headers[ACQUIRED_COUNT_HEADER] = int(headers.get(ACQUIRED_COUNT_HEADER, 0)) + 1
    properties.headers = headers
    return delivery._replace(properties=properties, redelivered=True)
