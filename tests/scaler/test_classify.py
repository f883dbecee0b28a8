"""Classification of worker Jobs from their status."""

from __future__ import annotations

from typing import Any

import pytest
from jobtide_scaler.jobstate import JobCounts, JobState, classify, count_jobs, record_of

pytestmark = pytest.mark.unit


def job(status: dict[str, Any], pipeline: str = "p", name: str = "j") -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "uid": f"uid-{name}",
            "labels": {"jobtide.io/pipeline": pipeline},
            "annotations": {"jobtide.io/create-id": f"c-{name}"},
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "status": status,
    }


def cond(kind: str, status: str = "True", at: str = "2026-01-01T00:01:00Z") -> dict[str, str]:
    return {"type": kind, "status": status, "lastTransitionTime": at}


@pytest.mark.parametrize(
    ("status", "state"),
    [
        ({}, JobState.PENDING),  # just created: no pod yet
        ({"active": 1, "ready": 0}, JobState.PENDING),  # pod Pending or unschedulable
        ({"active": 1, "ready": 1}, JobState.RUNNING),
        ({"succeeded": 1, "conditions": [cond("SuccessCriteriaMet")]}, JobState.SUCCEEDED),
        (
            {"succeeded": 1, "conditions": [cond("SuccessCriteriaMet"), cond("Complete")]},
            JobState.SUCCEEDED,
        ),
        ({"failed": 1, "conditions": [cond("FailureTarget")]}, JobState.FAILED),
        ({"failed": 1, "conditions": [cond("FailureTarget"), cond("Failed")]}, JobState.FAILED),
        # A deleted worker still handing its task back: its place under the cap is taken.
        ({"terminating": 1, "conditions": [cond("FailureTarget")]}, JobState.RUNNING),
        ({"active": 1, "conditions": [cond("FailureTarget")]}, JobState.RUNNING),
        ({"terminating": 1, "conditions": [cond("SuccessCriteriaMet")]}, JobState.RUNNING),
        ({"failed": 1, "terminating": 0, "conditions": [cond("FailureTarget")]}, JobState.FAILED),
        ({"active": 1, "ready": 1, "conditions": [cond("Failed", "False")]}, JobState.RUNNING),
        ({"active": 1, "conditions": [cond("Suspended", "False")]}, JobState.PENDING),
    ],
)
def test_classify(status: dict[str, Any], state: JobState) -> None:
    assert classify(job(status)) is state


def test_record_keeps_pipeline_create_id_and_failure_time() -> None:
    record = record_of(job({"conditions": [cond("Failed", at="2026-01-02T03:04:05Z")]}, name="a"))
    assert (record.name, record.uid, record.pipeline, record.create_id) == (
        "a",
        "uid-a",
        "p",
        "c-a",
    )
    assert record.failed_at == "2026-01-02T03:04:05Z"
    assert record_of(job({"ready": 1})).failed_at == ""


def test_counts_per_pipeline() -> None:
    records = [
        record_of(job({}, "a", "1")),
        record_of(job({"ready": 1}, "a", "2")),
        record_of(job({"ready": 1}, "a", "3")),
        record_of(job({"conditions": [cond("Complete")]}, "a", "4")),
        record_of(job({"conditions": [cond("Failed")]}, "b", "5")),
    ]
    assert count_jobs(records) == {
        "a": JobCounts(active=3, pending=1, succeeded=1, failed=0),
        "b": JobCounts(active=0, pending=0, succeeded=0, failed=1),
    }
