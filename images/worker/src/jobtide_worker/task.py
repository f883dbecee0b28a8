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
    headers: Mapping[str, Any] = field(default_factory=dict)
    message_id: str | None = None
    content_type: str | None = None
    attempt: int = 1  # 1 on first delivery, counted by the broker across crashes
    redelivered: bool = False
    queue: str = ""

    @classmethod
    def decode(
        cls,
        body: bytes,
        *,
        content_type: str | None,
        headers: Mapping[str, Any] | None,
        message_id: str | None,
        redelivered: bool,
        queue: str,
    ) -> Task:
        """Build the task of one delivery; UndecodableBody if its JSON body is not JSON."""
        parsed: Any = None
        media_type = (content_type or "").split(";")[0].strip().lower()
        if media_type in JSON_CONTENT_TYPES or media_type.endswith("+json"):
            try:
                parsed = _parse_json(body.decode())
            except (UnicodeDecodeError, ValueError) as e:
                raise UndecodableBody(f"{media_type} body is not valid JSON: {e}") from None
        headers = dict(headers or {})
        return cls(
            body=body,
            json=parsed,
            headers=headers,
            message_id=message_id,
            content_type=content_type,
            attempt=attempt_of(headers),
            redelivered=redelivered,
            queue=queue,
        )


def attempt_of(headers: Mapping[str, Any]) -> int:
    """Quorum queues count the earlier deliveries of a message; both headers are absent on the
    first. RabbitMQ 4 counts every earlier one in `x-acquired-count` and only the failed ones
    (lost channel, crashed worker; not a nack with requeue) in `x-delivery-count`: a handler
    failure requeued by nack shows only in the former. RabbitMQ 3 counted them all in
    `x-delivery-count`. The larger of the two is right for both."""
    return max(_count(headers, ACQUIRED_COUNT_HEADER), _count(headers, DELIVERY_COUNT_HEADER)) + 1


def _count(headers: Mapping[str, Any], name: str) -> int:
    raw = headers.get(name)
    try:
        earlier = int(raw) if raw is not None else 0
    except (TypeError, ValueError):
        earlier = 0
    return max(earlier, 0)
