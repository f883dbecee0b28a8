"""Which answers of the management API the scaler scales on (pure checks; the same faults
through a real proxy in front of the real broker are in test_scaler_faults.py)."""

from __future__ import annotations

from typing import Any

import pytest
from jobtide_scaler.broker import InvalidAnswer, validated_queues
from jobtide_scaler.retry import MAX_RETRY_AFTER, retry_after

pytestmark = pytest.mark.unit


def queue(**fields: Any) -> dict[str, Any]:
    return {
        "name": "q",
        "vhost": "/",
        "messages_ready": 3,
        "messages_unacknowledged": 1,
        "consumers": 1,
        **fields,
    }


def test_a_well_formed_answer_is_used_as_it_is() -> None:
    answer = [queue(), queue(name="fresh", messages_ready=None), queue(message_stats={})]
    assert validated_queues(answer, "/") == answer


def test_no_publish_counted_since_a_restart_is_a_well_formed_answer() -> None:
    # What RabbitMQ answers for `columns=...,message_stats.publish` once it restarted and
    # nothing was published since: the counts stand, 0 published since the restart
    # (jobtide_worker.management.published_count, tests/worker/test_worker_quiet_units.py).
    answer = [queue(message_stats=[])]
    assert validated_queues(answer, "/") == answer


@pytest.mark.parametrize(
    ("answer", "named"),
    [
        ({"name": "q"}, "expected a list of queues, got dict"),
        ([queue(), "q"], "a queue without a name"),
        ([queue(vhost="other")], "queue 'q' is of vhost 'other', not '/'"),
        ([queue(messages_ready=-1)], "queue 'q': messages_ready is -1, not a count"),
        ([queue(messages_unacknowledged=2.5)], "messages_unacknowledged is 2.5, not a count"),
        ([queue(consumers="1")], "consumers is '1', not a count"),
        ([queue(messages_ready=True)], "messages_ready is True, not a count"),
        ([queue(message_stats={"publish": -4})], "queue 'q': message_stats.publish is -4, not a"),
        ([queue(message_stats=[1])], "queue 'q': message_stats.publish is not a count"),
    ],
)
def test_a_malformed_or_foreign_answer_is_refused_naming_what_is_wrong(
    answer: Any, named: str
) -> None:
    with pytest.raises(InvalidAnswer, match=named.replace(".", r"\.")):
        validated_queues(answer, "/")


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("7", 7.0),
        ("0.5", 0.5),
        ("-3", 0.0),
        ("86400", MAX_RETRY_AFTER),
        ("Wed, 21 Oct 2026 07:28:00 GMT", 1.0),
        ("nan", 1.0),
    ],
)
def test_retry_after_in_seconds_bounded(header: str | None, seconds: float | None) -> None:
    assert retry_after(header) == seconds
