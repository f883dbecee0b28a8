"""A worker Job's state and the Jobs counted per pipeline, from the Jobs' JSON alone: pure (the
scaler's Job cache in cluster.py and the status command's Job list both count with it).

Pending accounting reads the Job's own status, not its pods: an unfinished Job with no Ready
pod (`status.ready == 0`: no pod yet, pod Pending or unschedulable, containers starting) is
pending. That costs no pod watch and no pod list; it needs Kubernetes 1.29+ (Job
`status.ready`). Worker containers have no readiness probe, so Ready means running."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from jobtide_scaler.jobs import ANNOTATION_CREATE_ID, LABEL_PIPELINE


class JobState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class JobRecord:
    name: str
    uid: str
    pipeline: str
    create_id: str
    state: JobState
    # When it failed (the Failed condition's transition time, RFC 3339); "" otherwise.
    failed_at: str


@dataclass(frozen=True)
class JobCounts:
    active: int = 0  # not finished, pending ones included
    pending: int = 0
    succeeded: int = 0
    failed: int = 0


def _condition_true(status: Mapping[str, Any], *types: str) -> Mapping[str, Any] | None:
    for condition in status.get("conditions") or []:
        if condition.get("type") in types and condition.get("status") == "True":
            return condition  # type: ignore[no-any-return]
    return None


def classify(job: Mapping[str, Any]) -> JobState:
    """The state of a Job from its status alone. SuccessCriteriaMet and FailureTarget are the
    early forms of Complete and Failed (Kubernetes 1.31+); they are set while the pod may still
    be shutting down (a deleted worker hands its task back for up to its grace period). Such a
    pod still holds its node's resources and a place under the cap, so the Job counts as
    running until its pods are gone (`status.terminating`, Kubernetes 1.29+)."""
    status = job.get("status") or {}
    finished = _condition_true(status, "Failed", "Complete")
    early = _condition_true(status, "FailureTarget", "SuccessCriteriaMet")
    if early and not finished and (status.get("terminating") or 0) + (status.get("active") or 0):
        return JobState.RUNNING
    if _condition_true(status, "Failed", "FailureTarget"):
        return JobState.FAILED
    if _condition_true(status, "Complete", "SuccessCriteriaMet"):
        return JobState.SUCCEEDED
    if (status.get("ready") or 0) > 0:
        return JobState.RUNNING
    return JobState.PENDING


def record_of(job: Mapping[str, Any]) -> JobRecord:
    metadata = job.get("metadata") or {}
    state = classify(job)
    failed_at = ""
    if state is JobState.FAILED:
        condition = _condition_true(job.get("status") or {}, "Failed", "FailureTarget") or {}
        failed_at = condition.get("lastTransitionTime") or metadata.get("creationTimestamp", "")
    return JobRecord(
        name=metadata.get("name", ""),
        uid=metadata.get("uid", ""),
        pipeline=(metadata.get("labels") or {}).get(LABEL_PIPELINE, ""),
        create_id=(metadata.get("annotations") or {}).get(ANNOTATION_CREATE_ID, ""),
        state=state,
        failed_at=failed_at,
    )


def count_jobs(records: Iterator[JobRecord] | list[JobRecord]) -> dict[str, JobCounts]:
    totals: dict[str, dict[str, int]] = {}
    for record in records:
        t = totals.setdefault(
            record.pipeline, {"active": 0, "pending": 0, "succeeded": 0, "failed": 0}
        )
        if record.state is JobState.SUCCEEDED:
            t["succeeded"] += 1
        elif record.state is JobState.FAILED:
            t["failed"] += 1
        else:
            t["active"] += 1
            if record.state is JobState.PENDING:
                t["pending"] += 1
    return {pipeline: JobCounts(**t) for pipeline, t in totals.items()}
