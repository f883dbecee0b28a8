"""What a handler receives, and how it says a task can never succeed."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

JSON_CONTENT_TYPES = ("application/json",)
# Set by a quorum queue on a redelivery: how many earlier deliveries of the message there were.
# Measured on the test bed: RabbitMQ 4.0.5 counts every earlier one (requeues by nack
# included) in `x-delivery-count` and never sets `x-acquired-count`; 4.3.6 counts every one in
# `x-acquired-count` and only the lost ones (closed channel, crashed worker) in
# `x-delivery-count`. `x-acquired-count` came with RabbitMQ 4.3.
DELIVERY_COUNT_HEADER = "x-delivery-count"
ACQUIRED_COUNT_HEADER = "x-acquired-count"
ACQUIRED_COUNT_SINCE = (4, 3)
# Any publisher can set both headers. Measured: a first delivery carries them as published
# (with `redelivered` false); a redelivery carries the broker's own count in the header its
# version keeps, written over the publisher's, and the other header as published.

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
    def decode(
        cls,
        body: bytes,
        properties: Any,
        *,
        redelivered: bool,
        queue: str,
        count_header: str = ACQUIRED_COUNT_HEADER,
    ) -> Task:
        """Build the task of one delivery from its body and properties (pika's
        BasicProperties); UndecodableBody if its JSON body is not JSON. `count_header`: the
        header in which the broker counts deliveries (`count_header_of`)."""
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
            attempt=attempt_of(headers, redelivered=redelivered, count_header=count_header),
            redelivered=redelivered,
            queue=queue,
            **{name: getattr(properties, name) for name in TASK_PROPERTIES},
        )


def attempt_of(
    headers: Mapping[str, Any], *, redelivered: bool, count_header: str = ACQUIRED_COUNT_HEADER
) -> int:
    """Which delivery of its message this is, from the count that only the broker sets.

    A first delivery (`redelivered` false) is attempt 1 whatever its headers say: counts there
    came from the publisher. A redelivery is one more than the broker's count of the earlier
    ones, in `count_header`; a redelivery without it (a queue that counts nothing, e.g. a
    classic one) is at least the second attempt. The other header is never read: on that
    broker it may still be the publisher's."""
    if not redelivered:
        return 1
    return max(_count(headers, count_header), 1) + 1


def count_header_of(server_version: object) -> str:
    """The header in which a RabbitMQ of `server_version` (the `version` it announces when a
    connection opens) counts earlier deliveries; the newest behaviour when unknown."""
    text = server_version.decode() if isinstance(server_version, bytes) else str(server_version)
    try:
        major, minor = (int(part) for part in text.split(".")[:2])
    except ValueError:
        return ACQUIRED_COUNT_HEADER
    return (
        ACQUIRED_COUNT_HEADER if (major, minor) >= ACQUIRED_COUNT_SINCE else DELIVERY_COUNT_HEADER
    )


def _count(headers: Mapping[str, Any], name: str) -> int:
    raw = headers.get(name)
    try:
        earlier = int(raw) if raw is not None else 0
    except (TypeError, ValueError):
        earlier = 0
    return max(earlier, 0)
