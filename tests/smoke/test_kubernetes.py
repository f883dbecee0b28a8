"""The test bed's control plane is real: RBAC is enforced for ServiceAccount tokens, and the
controllers run Jobs to completion and clean them up."""

from __future__ import annotations

from pathlib import Path

import pytest
from jobtide_testbed.kube import KubeCluster
from jobtide_testbed.process import wait_for
from kubernetes import client
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.integration


def job_manifest(name: str, ttl: int | None = None) -> dict[str, object]:
    spec: dict[str, object] = {
        "backoffLimit": 0,
        "template": {
            "spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "main", "image": "example.invalid/x"}],
            }
        },
    }
    if ttl is not None:
        spec["ttlSecondsAfterFinished"] = ttl
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": spec}


def test_rbac_is_enforced_for_service_account_tokens(
    kube: KubeCluster, namespace: str, tmp_path: Path
) -> None:
    kube.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": "jobs-only", "namespace": namespace},
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "jobs-only", "namespace": namespace},
                "rules": [
                    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "list"]}
                ],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "jobs-only", "namespace": namespace},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": "jobs-only",
                },
                "subjects": [
                    {"kind": "ServiceAccount", "name": "jobs-only", "namespace": namespace}
                ],
            },
        ]
    )
    token = kube.service_account_token(namespace, "jobs-only")
    as_sa = kube.api_client(kube.kubeconfig_for_token(token, tmp_path / "sa.kubeconfig"))
    batch, core = client.BatchV1Api(as_sa), client.CoreV1Api(as_sa)

    created = batch.create_namespaced_job(namespace, job_manifest("allowed"))
    assert created.metadata.name == "allowed"
    assert [j.metadata.name for j in batch.list_namespaced_job(namespace).items] == ["allowed"]

    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "denied"},
        "spec": {"containers": [{"name": "c", "image": "example.invalid/x"}]},
    }
    with pytest.raises(ApiException) as pod_denied:
        core.create_namespaced_pod(namespace, pod)
    assert pod_denied.value.status == 403
    with pytest.raises(ApiException) as secret_denied:
        core.read_namespaced_secret("anything", namespace)
    assert secret_denied.value.status == 403
    with pytest.raises(ApiException) as other_ns_denied:
        batch.list_namespaced_job("default")
    assert other_ns_denied.value.status == 403


def test_job_runs_on_fake_node_completes_and_ttl_removes_it(
    kube: KubeCluster, namespace: str
) -> None:
    admin = kube.api_client()
    batch, core = client.BatchV1Api(admin), client.CoreV1Api(admin)
    batch.create_namespaced_job(namespace, job_manifest("runs", ttl=2))

    def pod_scheduled_on_fake_node() -> bool:
        pods = core.list_namespaced_pod(namespace, label_selector="job-name=runs").items
        return len(pods) == 1 and pods[0].spec.node_name == "kwok-node-0"

    wait_for(pod_scheduled_on_fake_node, timeout=60, what="Job pod scheduled on kwok-node-0")

    def job_complete() -> bool:
        job = batch.read_namespaced_job("runs", namespace)
        return any(
            c.type == "Complete" and c.status == "True" for c in (job.status.conditions or [])
        )

    wait_for(job_complete, timeout=60, what="Job condition Complete")

    def job_gone() -> bool:
        try:
            batch.read_namespaced_job("runs", namespace)
        except ApiException as e:
            return e.status == 404
        return False

    wait_for(job_gone, timeout=60, what="Job removed by ttlSecondsAfterFinished")
