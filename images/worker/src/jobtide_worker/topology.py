"""The queue topology of docs/architecture.md ("Queue topology"), defined once.

The worker and the publisher declare it over AMQP (`declare`). The chart's broker definitions
are generated from `definitions(...)` (`python -m jobtide_scaler.contracts --write` writes the
skeleton charts/jobtide/files/queue-topology.json, which the chart fills in per pipeline; a
unit test fails when it is stale). Everything except `declare` is pure data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

DEAD_LETTER_EXCHANGE = "jobtide.dlx"
# The queue argument giving a quorum queue its number of members. Declared with the broker
# cluster's size (the chart's `rabbitmq.replicas` above 1), so every member holds a replica;
# a redeclare must carry the same value, or the broker refuses it (PRECONDITION_FAILED).
GROUP_SIZE_ARGUMENT = "x-quorum-initial-group-size"

# A delivery unacked longer than its consumer timeout makes RabbitMQ close the channel. Since
# 3.12 (so on every supported 4.x) the broker honours a per-consumer `x-consumer-timeout`
# (what the worker sets) and a per-queue `consumer-timeout` policy key (what the chart's
# definitions set), above the broker-wide `consumer_timeout`. The margin covers the broker's
# periodic check and the ack's trip back after a task that used its whole `maxTaskSeconds`.
CONSUMER_TIMEOUT_MARGIN_SECONDS = 60.0
# RabbitMQ's own default (30 min): never configure a broker below it.
BROKER_DEFAULT_CONSUMER_TIMEOUT_MS = 1_800_000


def dead_letter_queue(queue: str) -> str:
    return f"{queue}.dlq"


def policy_name(queue: str) -> str:
    return f"jobtide-{queue}"


def queue_arguments(queue: str, group_size: int = 0) -> dict[str, Any]:
    """The pipeline queue's arguments; `group_size` 0 leaves the members to the broker."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-routing-key": queue,
        **_group_size(group_size),
    }


def dead_letter_queue_arguments(group_size: int = 0) -> dict[str, Any]:
    return {"x-queue-type": "quorum", **_group_size(group_size)}


def _group_size(group_size: int) -> dict[str, Any]:
    return {GROUP_SIZE_ARGUMENT: group_size} if group_size else {}


def policy(queue: str, max_attempts: int, max_task_seconds: float) -> dict[str, Any]:
    """The policy `jobtide-Q`. `delivery-limit`: the broker dead-letters a message after
    `max_attempts` deliveries even when no worker lives long enough to do it (crash loops);
    set explicitly, because quorum queues since 4.0 apply a default of 20 otherwise, which
    would cut a pipeline allowing more attempts short. `consumer-timeout`: the queue's own
    (`maxTaskSeconds` plus the margin), for any consumer that does not set one."""
    return {
        "name": policy_name(queue),
        "pattern": f"^{regex_escape(queue)}$",
        "apply-to": "queues",
        "priority": 0,
        "definition": {
            "delivery-limit": max_attempts,
            "consumer-timeout": consumer_timeout_ms(max_task_seconds),
        },
    }


def consumer_timeout_ms(max_task_seconds: float) -> int:
    """`x-consumer-timeout` for a consumer whose tasks take up to `max_task_seconds`."""
    return math.ceil((max_task_seconds + CONSUMER_TIMEOUT_MARGIN_SECONDS) * 1000)


def broker_consumer_timeout_ms(max_task_seconds: Iterable[float]) -> int:
    """The broker-wide `consumer_timeout` (rabbitmq.conf) that covers every pipeline: the
    backstop for a consumer on a queue without the policy (a queue the chart did not define)."""
    longest = max((consumer_timeout_ms(s) for s in max_task_seconds), default=0)
    return max(longest, BROKER_DEFAULT_CONSUMER_TIMEOUT_MS)


def definitions(
    pipelines: Iterable[tuple[str, int, float]], vhost: str = "/", group_size: int = 0
) -> dict[str, Any]:
    """RabbitMQ definitions (the JSON of `rabbitmqctl import_definitions`) for pipelines given
    as `(queue, max_attempts, max_task_seconds)`: queues (of `group_size` members, 0: the
    broker's default), the shared exchange, bindings and policies."""
    queues: list[dict[str, Any]] = []
    bindings: list[dict[str, Any]] = []
    policies: list[dict[str, Any]] = []
    for queue, max_attempts, max_task_seconds in sorted(set(pipelines)):
        queues.append(_queue_definition(queue, vhost, queue_arguments(queue, group_size)))
        queues.append(
            _queue_definition(
                dead_letter_queue(queue), vhost, dead_letter_queue_arguments(group_size)
            )
        )
        bindings.append(
            {
                "source": DEAD_LETTER_EXCHANGE,
                "vhost": vhost,
                "destination": dead_letter_queue(queue),
                "destination_type": "queue",
                "routing_key": queue,
                "arguments": {},
            }
        )
        policies.append({"vhost": vhost, **policy(queue, max_attempts, max_task_seconds)})
    return {
        "queues": queues,
        "exchanges": [
            {
                "name": DEAD_LETTER_EXCHANGE,
                "vhost": vhost,
                "type": "direct",
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
        ],
        "bindings": bindings,
        "policies": policies,
    }


def _queue_definition(name: str, vhost: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "vhost": vhost,
        "durable": True,
        "auto_delete": False,
        "arguments": arguments,
    }


def regex_escape(name: str) -> str:
    """`name` matched literally by a RabbitMQ (PCRE) pattern."""
    return "".join("\\" + c if c in r".^$*+?()[]{}|\/" else c for c in name)


def declare(channel: Any, queue: str, group_size: int = 0) -> None:
    """Declare the pipeline's queue, the dead-letter exchange and queue, and their binding on a
    pika BlockingChannel, the queues with `group_size` members (0: the broker's default).
    Idempotent; a queue that exists with other arguments makes the broker close the channel
    with PRECONDITION_FAILED, which is the check we want. The policy is not an AMQP object: the
    chart's definitions create it."""
    channel.exchange_declare(DEAD_LETTER_EXCHANGE, "direct", durable=True)
    channel.queue_declare(
        dead_letter_queue(queue), durable=True, arguments=dead_letter_queue_arguments(group_size)
    )
    channel.queue_bind(dead_letter_queue(queue), DEAD_LETTER_EXCHANGE, queue)
    channel.queue_declare(queue, durable=True, arguments=queue_arguments(queue, group_size))
