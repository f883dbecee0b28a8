"""What a handler receives, and how it says a task can never succeed."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

JSON_CONTENT_TYPES = ("application/json",)
# Set by a quorum queue on a redelivery: how many earlier deliveries of the message came back.
DELIVERY_COUNT_HEADER = "x-delivery-count"
# RabbitMQ 4: every earlier delivery of the message, requeued ones included.
ACQUIRED_COUNT_HEADER = "x-acquired-count"
# Any publisher can set both headers. Measured on RabbitMQ 4.3.6: a first delivery carries
# them as published (with `redelivered` false); a redelivery carries the broker's own
# `x-acquired-count` in place of the publisher's, but keeps a published `x-delivery-count` until
# the broker has a count of its own to put there.

# The AMQP properties a Task carries under the same names (pika's BasicProperties attributes).
TASK_PROPERTIES = (
    "message_id",
    "content_type",
    "content_encoding",
    "correlation_id",
    "reply_to",
    "timestamp",
    "type",
    "app_id",
)

# JSON bodies are UTF-8 (RFC 8259, 8.1), parsed by one decoder made once: json.loads would
# look for another encoding and check its arguments on every task, a third of its time here.
_parse_json = json.JSONDecoder().decode


class PermanentError(Exception):
    """Raised by a handler when retrying cannot help: the message goes to the dead-letter
    queue at once, whatever attempt this is."""


class UndecodableBody(ValueError):
    """The body does not match its content type (e.g. invalid JSON)."""


@dataclass(frozen=True)
class Task:
    body: bytes
    json: Any = field(default=None, repr=False)  # the parsed body when content_type is JSON
    # Header values keep their AMQP type where Python has none of its own: jobtide_worker.fields.
    headers: Mapping[str, Any] = field(default_factory=dict)
    message_id: str | None = None
    content_type: str | None = None
    attempt: int = 1  # 1 on first delivery, counted by the broker across crashes
    redelivered: bool = False
    queue: str = ""
    # The other AMQP properties a handler may need (None when the publisher set none).
    content_encoding: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    timestamp: int | None = None  # seconds since the epoch, as the publisher set it
    type: str | None = None
    app_id: str | None = None

    @classmethod
    def decode(cls, body: bytes, properties: Any, *, redelivered: bool, queue: str) -> Task:
        """Build the task of one delivery from its body and properties (pika's
        BasicProperties); UndecodableBody if its JSON body is not JSON."""
        content_type = properties.content_type
        parsed: Any = None
        media_type = (content_type or "").split(";")[0].strip().lower()
        if media_type in JSON_CONTENT_TYPES or media_type.endswith("+json"):
            try:
                parsed = _parse_json(body.decode())
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                # RecursionError: nesting deeper than Python's stack, valid JSON all the same.
                problem = "nested too deeply" if isinstance(e, RecursionError) else str(e)
                raise UndecodableBody(f"{media_type} body is not valid JSON: {problem}") from None
        headers = dict(properties.headers or {})
        return cls(
            body=body,
            json=parsed,
            headers=headers,
            attempt=attempt_of(headers, redelivered=redelivered),
            redelivered=redelivered,
            queue=queue,
            **{name: getattr(properties, name) for name in TASK_PROPERTIES},
        )


def attempt_of(headers: Mapping[str, Any], *, redelivered: bool) -> int:
    """Which delivery of its message this is, from the counts that only the broker sets.

    A first delivery (`redelivered` false) is attempt 1 whatever its headers say: counts there
    came from the publisher. On a redelivery, RabbitMQ 4 counts every earlier delivery in
    `x-acquired-count` (requeues by nack included; `x-delivery-count` counts only lost ones
    and may still be the publisher's), written by the broker over any published value. A
    redelivery without it (a queue that counts nothing, e.g. a classic one) is at least the
    second attempt."""
    if not redelivered:
        return 1
    return max(_count(headers, ACQUIRED_COUNT_HEADER), 1) + 1


def _count(headers: Mapping[str, Any], name: str) -> int:
    raw = headers.get(name)
    try:
        earlier = int(raw) if raw is not None else 0
    except (TypeError, ValueError):
        earlier = 0
    return max(earlier, 0)
