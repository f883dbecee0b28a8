"""The status view's document and formatting (jobtide_scaler.status): pure, no cluster. The
command against a real apiserver, with the scaler's own writing code, is in
test_status_integration.py."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from jobtide_scaler.jobstate import JobCounts
from jobtide_scaler.policy import Observation
from jobtide_scaler.status import (
    LeaseInfo,
    PipelineStatus,
    StatusDocument,
    StatusView,
    explain,
    format_json,
    format_table,
    parse_rfc3339,
    rfc3339,
)
from jobtide_worker.pipeline_settings import PipelineSettings

pytestmark = pytest.mark.unit

WRITTEN = parse_rfc3339("2026-12-01T07:00:00Z")


def pipeline(**overrides: object) -> PipelineStatus:
    fields: dict[str, object] = {
        "queue": "resize-images",
        "ready": 120,
        "in_flight": 8,
        "dead_lettered": 3,
        "oldest_age_seconds": 95.4,
        "broker_fresh": True,
        "active": 4,
        "pending": 1,
        "max_workers": 20,
        "desired": 20,
        "decision": "create",
        "reason": "backlog 128 wants 20 worker(s), 0 active: created 4",
        "created": 4,
        "last_created": 4,
        "last_created_at": "2026-12-01T07:00:00Z",
    }
    fields.update(overrides)
    return PipelineStatus(**fields)  # type: ignore[arg-type]


def document(**overrides: object) -> StatusDocument:
    fields: dict[str, object] = {
        "release": "jobs",
        "namespace": "pipelines",
        "writer": "jobs-jobtide-scaler-5f7c9-x2kqp_1a2b3c4d",
        "lease_name": "jobs-jobtide-scaler",
        "written_at": rfc3339(WRITTEN),
        "refresh_seconds": 15.0,
        "poll_interval_seconds": 5.0,
        "max_total_workers": 100,
        "pipelines": {
            "resize-images": pipeline(),
            "train-models": pipeline(
                queue="train-models", ready=0, in_flight=2, dead_lettered=0,
                oldest_age_seconds=0.0, active=2, pending=0, max_workers=4, desired=1,
                decision="none", reason="backlog 2 wants 1 worker(s), 2 active", created=0,
                last_created=2, last_created_at="2026-12-01T06:58:00Z",
            ),
        },
    }  # fmt: skip
    fields.update(overrides)
    return StatusDocument(**fields)  # type: ignore[arg-type]


LEASE = LeaseInfo("jobs-jobtide-scaler-5f7c9-x2kqp_1a2b3c4d", WRITTEN + 2, 15)
JOBS = {"resize-images": JobCounts(6, 2), "train-models": JobCounts(2, 0)}


def test_the_document_round_trips_as_camel_case_json() -> None:
    doc = document()
    text = doc.to_json()
    raw = json.loads(text)
    assert raw["version"] == 1
    assert raw["maxTotalWorkers"] == 100
    assert raw["pipelines"]["resize-images"]["deadLettered"] == 3
    assert raw["pipelines"]["train-models"]["lastCreatedAt"] == "2026-12-01T06:58:00Z"
    assert StatusDocument.from_json(text) == doc


def test_fields_a_newer_writer_added_are_skipped() -> None:
    raw = json.loads(document().to_json())
    raw["leaderZone"] = "eu-west-1a"
    raw["pipelines"]["resize-images"]["queueType"] = "quorum"
    assert StatusDocument.from_json(json.dumps(raw)) == document()


def test_a_document_of_another_version_is_refused() -> None:
    raw = json.loads(document().to_json())
    raw["version"] = 2
    with pytest.raises(ValueError, match="version 2"):
        StatusDocument.from_json(json.dumps(raw))


def test_table_of_fresh_figures_with_live_workers_and_the_leader() -> None:
    view = StatusView("jobs", "pipelines", document(), LEASE, JOBS)
    assert format_table(view, WRITTEN + 4) == (
        "release jobs in namespace pipelines\n"
        "leader: jobs-jobtide-scaler-5f7c9-x2kqp_1a2b3c4d (Lease renewed 2s ago)\n"
        "figures: 4s old, by jobs-jobtide-scaler-5f7c9-x2kqp_1a2b3c4d\n"
        "PIPELINE       READY  IN FLIGHT  DEAD  OLDEST  WORKERS  PENDING  DECISION  REASON\n"
        "resize-images    120          8     3   1m35s     6/20        2  create    "
        "backlog 128 wants 20 worker(s), 0 active: created 4\n"
        "train-models       0          2     0      0s      2/4        0  none      "
        "backlog 2 wants 1 worker(s), 2 active (last created 2 2m04s ago)\n"
        "(all)                                            8/100                     "
        "maxTotalWorkers\n"
        "WORKERS and PENDING: worker Jobs now; the other columns: the figures.\n"
    )


def test_old_figures_are_flagged_stale_and_an_expired_lease_shows_no_leader() -> None:
    doc = document()
    now = WRITTEN + doc.stale_after() + 1
    table = format_table(StatusView("jobs", "pipelines", doc, LEASE, JOBS), now)
    assert "figures: 36s old" in table
    assert "STALE: older than 35s" in table
    assert "leader: none (Lease of jobs-jobtide-scaler-5f7c9-x2kqp_1a2b3c4d expired" in table
    fresh = format_table(StatusView("jobs", "pipelines", doc, LEASE, JOBS), now - 2)
    assert "STALE" not in fresh
    data = json.loads(format_json(StatusView("jobs", "pipelines", doc, LEASE, JOBS), now))
    assert data["figures"]["stale"] is True
    assert data["leader"] == {
        "identity": None,
        "source": "lease",
        "renewedSecondsAgo": 34.0,
        "expiredHolder": LEASE.holder,
    }


def test_json_has_the_figures_and_the_live_workers() -> None:
    view = StatusView("jobs", "pipelines", document(), LEASE, JOBS)
    data = json.loads(format_json(view, WRITTEN + 4))
    resize = data["pipelines"]["resize-images"]
    assert (resize["ready"], resize["inFlight"], resize["deadLettered"]) == (120, 8, 3)
    assert (resize["active"], resize["pending"], resize["workersFrom"]) == (6, 2, "jobs")
    assert (resize["maxWorkers"], data["maxTotalWorkers"], data["activeTotal"]) == (20, 100, 8)
    assert (resize["decision"], resize["oldestAgeSeconds"]) == ("create", 95.4)
    assert data["leader"]["identity"] == LEASE.holder
    assert data["figures"] == {
        "writtenAt": "2026-12-01T07:00:00Z",
        "ageSeconds": 4.0,
        "stale": False,
        "staleAfterSeconds": 35.0,
        "writer": LEASE.holder,
    }


def test_unreadable_jobs_fall_back_to_the_figures_and_say_so() -> None:
    problem = "worker Jobs: HTTP 403 Forbidden; WORKERS from the figures"
    view = StatusView("jobs", "pipelines", document(), LEASE, None, problems=(problem,))
    table = format_table(view, WRITTEN + 4)
    assert "     4/20        1  create" in table
    assert table.endswith(f"note: {problem}\n")
    assert "worker Jobs now" not in table
    data = json.loads(format_json(view, WRITTEN + 4))
    assert data["pipelines"]["resize-images"]["workersFrom"] == "figures"
    assert data["problems"] == [problem]


def test_before_the_first_write_the_live_jobs_are_shown() -> None:
    view = StatusView("jobs", "pipelines", None, None, {"resize-images": JobCounts(1, 1)})
    table = format_table(view, WRITTEN)
    assert "figures: none yet" in table
    assert "leader: unknown" in table
    assert "resize-images" in table
    assert "no figures for this pipeline" in table


def test_with_leader_election_off_the_writer_is_the_leader() -> None:
    view = StatusView("jobs", "pipelines", document(lease_name=None), None, JOBS)
    assert "leader: jobs-jobtide-scaler-5f7c9-x2kqp_1a2b3c4d (leader election off)" in (
        format_table(view, WRITTEN)
    )


def test_at_cap_and_unknown_counts_read_plainly() -> None:
    doc = document(pipelines={"resize-images": pipeline(
        decision="none", cap="maxWorkers", ready=None, in_flight=None, dead_lettered=None,
        oldest_age_seconds=None, last_created_at=None, last_created=0,
    )})  # fmt: skip
    row = format_table(StatusView("jobs", "pipelines", doc, LEASE, JOBS), WRITTEN).splitlines()[4]
    assert row.split()[:8] == ["resize-images", "-", "-", "-", "-", "6/20", "2", "at"]


@pytest.mark.parametrize(
    ("decision", "ready", "active", "created", "cap", "reason"),
    [
        ("create", 10, 2, 3, None, "backlog 10 wants 5 worker(s), 2 active: created 3"),
        ("none", 10, 2, 0, None, "backlog 10 wants 5 worker(s), 2 active: at most "
         "maxNewPerCycle 10 a cycle"),
        ("none", 100, 20, 0, "maxWorkers", "backlog 100 wants 20 worker(s), 20 active: held "
         "at maxWorkers 20"),
        ("create", 100, 2, 1, "maxTotalWorkers", "backlog 100 wants 20 worker(s), 2 active: "
         "held at maxTotalWorkers 3 after creating 1"),
        ("none", 0, 0, 0, None, "backlog 0 wants 0 worker(s), 0 active"),
        ("stale", 0, 0, 0, None, "no fresh broker counts: creating nothing"),
        ("in_doubt", 4, 0, 0, None, "an earlier create's outcome is unknown: creating nothing "
         "until the Job cache shows it"),
    ],
)  # fmt: skip
def test_explain_says_why(
    decision: str, ready: int, active: int, created: int, cap: str | None, reason: str
) -> None:
    settings = PipelineSettings(messages_per_worker=2, max_workers=20)
    observation = Observation(ready=ready, unacked=0, active_jobs=active, broker_fresh=True)
    assert explain(decision, settings, observation, created, cap, 3) == reason


def test_stale_after_is_two_refreshes_and_a_cycle() -> None:
    assert replace(document(), refresh_seconds=10, poll_interval_seconds=1).stale_after() == 21
