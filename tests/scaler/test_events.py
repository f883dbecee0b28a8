"""When the scaler reports Events: on changes of state, and Job creations and failures summed
up at most once a minute per pipeline."""

from __future__ import annotations

import pytest
from jobtide_scaler.events import EventPolicy, PipelineFacts

pytestmark = pytest.mark.unit


def facts(**changes: object) -> PipelineFacts:
    base: dict[str, object] = {
        "pipeline": "resize", "queue": "resize-q", "broker_fresh": True, "cap": None,
        "active_jobs": 2, "backlog": 10, "created": 0,
    }  # fmt: skip
    base.update(changes)
    return PipelineFacts(**base)  # type: ignore[arg-type]


def reasons(policy: EventPolicy, now: float, **changes: object) -> list[str]:
    return [e.reason for e in policy.observe(facts(**changes), now)]


def test_creations_are_reported_at_once_then_summed_up_once_a_minute() -> None:
    policy = EventPolicy(summary_seconds=60)
    assert reasons(policy, 0, created=3) == ["JobsCreated"]
    assert reasons(policy, 10, created=2) == []
    assert reasons(policy, 30, created=4) == []
    (event,) = policy.observe(facts(created=0), 60)
    assert event.reason == "JobsCreated"
    assert "created 6 worker Job(s) for pipeline resize" in event.message
    assert reasons(policy, 200) == []  # nothing new, nothing said


def test_a_cap_and_stale_broker_counts_are_reported_when_they_begin() -> None:
    policy = EventPolicy()
    assert reasons(policy, 0, cap="maxWorkers") == ["AtCap"]
    assert reasons(policy, 1, cap="maxWorkers") == []
    assert reasons(policy, 2) == []
    (event,) = policy.observe(facts(cap="maxTotalWorkers", active_jobs=7, backlog=40), 3)
    assert event.message == (
        "pipeline resize held at maxTotalWorkers with 7 active worker Job(s) and a backlog of "
        "40 message(s)"
    )
    stale = policy.observe(facts(broker_fresh=False), 4)
    assert [(e.reason, e.warning) for e in stale] == [("BrokerCountsStale", True)]
    assert "queue resize-q" in stale[0].message
    assert reasons(policy, 5, broker_fresh=False) == []
    assert reasons(policy, 6) == ["BrokerCountsBack"]


def test_failed_creates_are_warned_about_once_a_minute_with_the_latest_reason() -> None:
    policy = EventPolicy(summary_seconds=60)
    (first,) = policy.observe(facts(create_failed="403 Forbidden"), 0)
    assert (first.reason, first.warning) == ("JobCreateFailed", True)
    assert reasons(policy, 5, create_failed="429 Too Many Requests") == []
    assert reasons(policy, 6, create_failed="429 Too Many Requests") == []
    (summary,) = policy.observe(facts(), 61)
    assert summary.message.endswith("failed 2 time(s): 429 Too Many Requests")


def test_pipelines_are_reported_apart() -> None:
    policy = EventPolicy()
    assert reasons(policy, 0, created=1) == ["JobsCreated"]
    assert [e.reason for e in policy.observe(facts(pipeline="other", created=1), 1)] == [
        "JobsCreated"
    ]
