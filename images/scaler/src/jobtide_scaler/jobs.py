"""The worker Job manifest: the pipeline's jobTemplate, owned by the user, with what jobtide
needs merged in (docs/architecture.md, "Scaler configuration file" and "Labels"). Pure."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from jobtide_worker.config import PIPELINE_VARIABLES, Variable

from jobtide_scaler.config import PipelineConfig

# The labels the scaler puts on every worker Job and its pod, the one place they are built: the
# ones its Job cache selects on, its own name as the manager, and the pipeline. The rest of a
# worker's labels (app name, version, commonLabels) come with the chart's jobTemplate.
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PIPELINE = "jobtide.io/pipeline"
WORKER_COMPONENT = "worker"
MANAGER = "jobtide-scaler"
# Unique per create call: lets the scaler recognise, in its Job cache, a Job whose create
# call had an unknown outcome (see loop.CreateLedger).
ANNOTATION_CREATE_ID = "jobtide.io/create-id"
WORKER_CONTAINER = "worker"


def job_labels(release: str, pipeline: str) -> dict[str, str]:
    """The labels of a worker Job and its pod; they win over the template's."""
    return {
        LABEL_INSTANCE: release,
        LABEL_COMPONENT: WORKER_COMPONENT,
        LABEL_MANAGED_BY: MANAGER,
        LABEL_PIPELINE: pipeline,
    }


def cache_selector(release: str) -> str:
    """The label selector of the scaler's Job cache: every pipeline of the release."""
    return f"{LABEL_INSTANCE}={release},{LABEL_COMPONENT}={WORKER_COMPONENT}"


def worker_env(pipeline: PipelineConfig) -> list[dict[str, str]]:
    settings = pipeline.settings
    return [
        {"name": Variable.PIPELINE, "value": pipeline.name},
        {"name": Variable.QUEUE, "value": pipeline.queue},
        *(
            {"name": variable, "value": _number(getattr(settings, field_name))}
            for field_name, variable in PIPELINE_VARIABLES.items()
        ),
    ]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _merge_env(container: dict[str, Any], ours: list[dict[str, str]]) -> None:
    """Our variables replace the template's of the same name; the template's others stay in
    their order, ahead of ours, so `$(VAR)` references among them keep working."""
    names = {item["name"] for item in ours}
    kept = [item for item in container.get("env") or [] if item.get("name") not in names]
    container["env"] = kept + ours


def owner_reference(deployment: Mapping[str, Any]) -> dict[str, Any]:
    """An owner reference to the scaler's Deployment, so that deleting the release (or the
    Deployment) lets the garbage collector delete the worker Jobs, and their pods with them.
    Not the Jobs' controller: no Kubernetes controller manages Jobs for a Deployment."""
    metadata = deployment["metadata"]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": metadata["name"],
        "uid": metadata["uid"],
    }


def build_job(
    pipeline: PipelineConfig,
    release: str,
    create_id: str,
    owner: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The Job to POST for one new worker of `pipeline`, owned by `owner` if given."""
    job: dict[str, Any] = json.loads(pipeline.job_template_json)
    labels = job_labels(release, pipeline.name)

    metadata = job.setdefault("metadata", {}) or {}
    job["metadata"] = metadata
    for key in ("name", "namespace", "resourceVersion", "uid"):
        metadata.pop(key, None)
    metadata["generateName"] = f"{release}-{pipeline.name}-"
    metadata["labels"] = {**(metadata.get("labels") or {}), **labels}
    metadata["annotations"] = {
        **(metadata.get("annotations") or {}),
        ANNOTATION_CREATE_ID: create_id,
    }
    if owner is not None:
        metadata["ownerReferences"] = [dict(owner)]
    job["apiVersion"] = "batch/v1"
    job["kind"] = "Job"
    job.pop("status", None)

    spec = job["spec"]
    spec["backoffLimit"] = pipeline.settings.backoff_limit
    spec["ttlSecondsAfterFinished"] = pipeline.settings.ttl_seconds_after_finished
    template = spec["template"]
    pod_metadata = template.setdefault("metadata", {}) or {}
    template["metadata"] = pod_metadata
    pod_metadata["labels"] = {**(pod_metadata.get("labels") or {}), **labels}
    pod_spec = template["spec"]
    pod_spec["restartPolicy"] = "Never"

    containers = pod_spec["containers"]
    worker = next((c for c in containers if c.get("name") == WORKER_CONTAINER), containers[0])
    _merge_env(worker, worker_env(pipeline))
    return job
