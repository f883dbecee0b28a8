"""Putting tasks on a pipeline's queue: persistent messages, each confirmed by the broker."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import pika  # type: ignore[import-untyped]

from jobtide_worker import topology
from jobtide_worker.config import BrokerConfig


def publish(
    queue: str,
    tasks: Iterable[Any],
    *,
    broker: BrokerConfig | None = None,
    headers: Mapping[str, Any] | None = None,
    declare: bool = True,
) -> list[str]:
    """Publish each task to `queue` and wait for the broker's confirm of each; return their
    message ids. A task that is `bytes` goes as it is (application/octet-stream); anything
    else is sent as JSON. The broker comes from the environment when not given."""
    broker = broker or BrokerConfig.from_env()
    connection = broker.connect("jobtide-publisher")
    message_ids: list[str] = []
    try:
        channel = connection.channel()
        if declare:
            topology.declare(channel, queue, broker.quorum_group_size)
        channel.confirm_delivery()
        for task in tasks:
            body, properties = message(task, headers)
            # mandatory: a missing queue raises UnroutableError instead of dropping the task.
            channel.basic_publish("", queue, body, properties, mandatory=True)
            message_ids.append(properties.message_id)
    finally:
        connection.close()
    return message_ids


def message(task: Any, headers: Mapping[str, Any] | None = None) -> tuple[bytes, Any]:
    """The body and pika.BasicProperties `publish` sends for one task: `bytes` as they are
    (application/octet-stream), anything else as JSON; persistent, with a fresh message id."""
    if isinstance(task, bytes):
        body, content_type = task, "application/octet-stream"
    else:
        body, content_type = json.dumps(task).encode(), "application/json"
    properties = pika.BasicProperties(
        content_type=content_type,
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=uuid.uuid4().hex,
        headers=dict(headers or {}),
    )
    return body, properties
