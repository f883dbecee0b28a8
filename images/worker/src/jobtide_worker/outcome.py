"""What a delivery is, what running its task came to and the log line that says so: no broker,
no threads. The worker (consumer.py) and `run_local` (local.py) both decide through here."""

from __future__ import annotations

import time
from collections.abc import Callable, Container
from typing import Any, NamedTuple

from jobtide_worker.logs import INFO, WARNING, EventLog
from jobtide_worker.task import (
    ACQUIRED_COUNT_HEADER,
    TASK_PROPERTIES,
    PermanentError,
    Task,
    UndecodableBody,
)

HEADER_PREFIX = "x-jobtide-"
# Properties a dead letter keeps as they came. Not `delivery_mode` (a dead letter is persistent:
# it waits for a person), `expiration` (the copy would expire from the dead-letter queue) nor
# `user_id` (the broker refuses one that is not the worker's own user): the last two go into
# headers (`dead_letter_headers`).
DEAD_LETTER_PROPERTIES = (*TASK_PROPERTIES, "priority", "cluster_id")
ERROR_TEXT_LIMIT = 1000

Handler = Callable[[Task], object]


# NamedTuples rather than frozen dataclasses: a few are made for every task, and a frozen
# dataclass takes three times as long to make.
class Delivery(NamedTuple):
    generation: int  # the channel it came on: its ack is void on any later channel
    tag: int
    body: bytes
    properties: Any
    redelivered: bool


class Outcome(NamedTuple):
    kind: str  # done | duplicate | retry | dead-letter | ack-lost
    attempt: int = 0
    seconds: float = 0.0
    reason: str = ""
    error: BaseException | None = None


def execute(
    handler: Handler,
    delivery: Delivery,
    *,
    queue: str,
    max_attempts: int,
    done_recently: Container[str],
    count_header: str = ACQUIRED_COUNT_HEADER,
) -> Outcome:
    """Decode the task and run the handler; never raises. `count_header`: where the broker
    counts deliveries (jobtide_worker.task.count_header_of)."""
    props = delivery.properties
    started = time.monotonic()
    try:
        task = Task.decode(
            delivery.body,
            props,
            redelivered=delivery.redelivered,
            queue=queue,
            count_header=count_header,
        )
    except UndecodableBody as e:
        return Outcome("dead-letter", 1, 0.0, "undecodable", e)
    if task.redelivered and task.message_id and task.message_id in done_recently:
        return Outcome("duplicate", task.attempt, 0.0, "done before its ack was lost")
    if task.attempt > max_attempts:
        # Earlier deliveries ended without a verdict (crashes, lost connections).
        return Outcome("dead-letter", task.attempt, 0.0, "attempts-exhausted")
    try:
        handler(task)
    except PermanentError as e:
        return Outcome(
            "dead-letter", task.attempt, time.monotonic() - started, "permanent-error", e
        )
    except BaseException as e:
        seconds = time.monotonic() - started
        if task.attempt >= max_attempts:
            return Outcome("dead-letter", task.attempt, seconds, "max-attempts", e)
        return Outcome("retry", task.attempt, seconds, "handler-failed", e)
    return Outcome("done", task.attempt, time.monotonic() - started)


def dead_letter_headers(
    delivery: Delivery, outcome: Outcome, *, worker: str, pipeline: str, queue: str
) -> dict[str, Any]:
    """The original headers plus why, where and when the task failed."""
    error = outcome.error
    props = delivery.properties
    headers = dict(props.headers or {})
    # Properties that a dead letter cannot carry as they are (DEAD_LETTER_PROPERTIES says why).
    for name, value in (("expiration", props.expiration), ("user-id", props.user_id)):
        if value is not None:
            headers[f"{HEADER_PREFIX}original-{name}"] = value
    headers.update(
        {
            f"{HEADER_PREFIX}reason": outcome.reason,
            f"{HEADER_PREFIX}exception": type(error).__name__ if error else "",
            f"{HEADER_PREFIX}error": str(error)[:ERROR_TEXT_LIMIT] if error else "",
            f"{HEADER_PREFIX}attempts": outcome.attempt,
            f"{HEADER_PREFIX}worker": worker,
            f"{HEADER_PREFIX}pipeline": pipeline,
            f"{HEADER_PREFIX}queue": queue,
            f"{HEADER_PREFIX}failed-at": int(time.time()),
        }
    )
    return headers


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:ERROR_TEXT_LIMIT]


def log_task(log: EventLog, delivery: Delivery, outcome: Outcome, *, queue: str) -> None:
    """Queue the one line every task ends in (written by the next `flush` or `event`)."""
    extra: dict[str, str] = {}
    if outcome.reason:
        extra["reason"] = outcome.reason
    if outcome.error is not None:
        extra["error"] = f"{type(outcome.error).__name__}: {outcome.error}"[:300]
    log.defer(
        INFO if outcome.kind in ("done", "duplicate") else WARNING,
        "task",
        outcome=outcome.kind,
        queue=queue,
        message_id=delivery.properties.message_id,
        attempt=outcome.attempt,
        duration=f"{outcome.seconds:.3f}",
        **extra,
    )
