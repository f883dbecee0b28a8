"""The Job manifest: the user's template passes through; jobtide's parts are merged in."""

from __future__ import annotations

import pytest
from helpers import BROKER_ENV, config_document, pipeline_document
from jobtide_scaler.config import build_config
from jobtide_scaler.jobs import ANNOTATION_CREATE_ID, build_job, cache_selector, job_labels

pytestmark = pytest.mark.unit

LABELS = job_labels("rel", "resize")


def test_worker_labels_are_the_documented_ones() -> None:
    # docs/architecture.md, "Labels on worker Jobs and their pods".
    assert LABELS == {
        "app.kubernetes.io/instance": "rel",
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": "jobtide-scaler",
        "jobtide.io/pipeline": "resize",
    }


def test_manifest_merges_jobtide_into_the_users_template() -> None:
    (pipeline,) = build_config(config_document(), BROKER_ENV).pipelines
    job = build_job(pipeline, "rel", "abc-0")

    assert job["apiVersion"] == "batch/v1"
    assert job["kind"] == "Job"
    meta = job["metadata"]
    assert meta["generateName"] == "rel-resize-"
    assert "name" not in meta
    assert meta["labels"] == {"team": "imaging", **LABELS}
    assert meta["annotations"] == {"owner": "ops", ANNOTATION_CREATE_ID: "abc-0"}

    spec = job["spec"]
    assert spec["backoffLimit"] == 0
    assert spec["ttlSecondsAfterFinished"] == 300
    assert "activeDeadlineSeconds" not in spec
    pod = spec["template"]
    assert pod["metadata"]["labels"] == {"sidecar.istio.io/inject": "false", **LABELS}
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["tolerations"] == [{"key": "batch", "operator": "Exists"}]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "registry.example/resize:1"
    assert container["env"] == [
        {"name": "LOG_LEVEL", "value": "debug"},
        {"name": "JOBTIDE_PIPELINE", "value": "resize"},
        {"name": "JOBTIDE_QUEUE", "value": "resize-q"},
        {"name": "JOBTIDE_IDLE_TIMEOUT_SECONDS", "value": "15"},
        {"name": "JOBTIDE_QUIET_CHECK_SECONDS", "value": "5"},
        {"name": "JOBTIDE_MAX_ATTEMPTS", "value": "3"},
        {"name": "JOBTIDE_MAX_TASK_SECONDS", "value": "3600"},
    ]


def test_settings_win_over_the_template_and_the_worker_container_is_found_by_name() -> None:
    document = pipeline_document(
        "q", backoffLimit=2, ttlSecondsAfterFinished=30, idleTimeoutSeconds=7.5, maxAttempts=9
    )
    spec = document["jobTemplate"]["spec"]
    spec["backoffLimit"] = 6
    spec["activeDeadlineSeconds"] = 900
    spec["template"]["spec"]["restartPolicy"] = "OnFailure"
    spec["template"]["spec"]["containers"] = [
        {"name": "proxy", "image": "proxy:1"},
        {"name": "worker", "image": "w:1", "env": [{"name": "JOBTIDE_QUEUE", "value": "spoofed"}]},
    ]
    config = build_config(config_document(pipelines={"resize": document}), BROKER_ENV)
    job = build_job(config.pipelines[0], "rel", "id")

    assert job["spec"]["backoffLimit"] == 2
    assert job["spec"]["ttlSecondsAfterFinished"] == 30
    assert job["spec"]["activeDeadlineSeconds"] == 900
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    proxy, worker = job["spec"]["template"]["spec"]["containers"]
    assert "env" not in proxy
    env = {e["name"]: e["value"] for e in worker["env"]}
    assert env["JOBTIDE_QUEUE"] == "q"
    assert env["JOBTIDE_IDLE_TIMEOUT_SECONDS"] == "7.5"
    assert env["JOBTIDE_MAX_ATTEMPTS"] == "9"
    assert [e["name"] for e in worker["env"]].count("JOBTIDE_QUEUE") == 1


def test_first_container_gets_the_variables_when_none_is_named_worker() -> None:
    document = pipeline_document("q")
    containers = document["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    containers[0]["name"] = "main"
    config = build_config(config_document(pipelines={"resize": document}), BROKER_ENV)
    job = build_job(config.pipelines[0], "rel", "id")
    names = [e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert "JOBTIDE_PIPELINE" in names


def test_building_does_not_change_the_configuration() -> None:
    (pipeline,) = build_config(config_document(), BROKER_ENV).pipelines
    first = build_job(pipeline, "rel", "one")
    first["spec"]["template"]["spec"]["containers"][0]["env"].clear()
    second = build_job(pipeline, "rel", "two")
    assert len(second["spec"]["template"]["spec"]["containers"][0]["env"]) == 7


def test_cache_selector_covers_every_pipeline_of_the_release() -> None:
    assert (
        cache_selector("rel") == "app.kubernetes.io/instance=rel,app.kubernetes.io/component=worker"
    )
