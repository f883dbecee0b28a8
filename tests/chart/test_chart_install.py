"""The chart on a real control plane (RBAC on): the apiserver accepts every rendering, the
scaler's ServiceAccount may do exactly what the scaler needs, upgrades keep the generated
credentials, releases share a namespace, and uninstalling leaves nothing behind."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartlib import CHART, EXAMPLE_VALUES, VALUES_CASES, case_id, render, scaler_jobs
from jobtide_testbed import tools
from jobtide_testbed.kube import KubeCluster
from jobtide_testbed.process import wait_for

pytestmark = pytest.mark.integration

MINIMAL = CHART / "ci" / "minimal-values.yaml"
# Cluster-side objects the chart creates; a release must leave none of them behind.
RELEASE_KINDS = (
    "statefulsets,deployments,replicasets,pods,services,configmaps,secrets,serviceaccounts,"
    "roles,rolebindings,poddisruptionbudgets,networkpolicies,persistentvolumeclaims,jobs,"
    "podtemplates"
)


def helm(kube: KubeCluster, namespace: str, *args: str, binary: str = "helm3") -> str:
    return tools.helm(
        *args, kubeconfig=kube.kubeconfig, namespace=namespace, binary=binary, timeout=180
    ).stdout


def secret_data(kube: KubeCluster, namespace: str, name: str) -> dict[str, str]:
    out = kube.kubectl("get", "secret", name, "-n", namespace, "-o", "json").stdout
    data: dict[str, str] = json.loads(out)["data"]
    return {k: base64.b64decode(v).decode() for k, v in data.items()}


def release_objects(kube: KubeCluster, namespace: str, release: str) -> list[str]:
    out = kube.kubectl(
        "get", RELEASE_KINDS, "-n", namespace, "-o", "name",
        "-l", f"app.kubernetes.io/instance={release}",
    ).stdout  # fmt: skip
    return sorted(str(out).split())


def left_behind(kube: KubeCluster, namespace: str, release: str) -> list[str]:
    """Objects of the release not deleted. A deleted PVC held only by the
    kubernetes.io/pvc-protection finalizer counts as deleted: the test bed's
    controller-manager runs no pvc-protection controller to release it."""
    out = kube.kubectl(
        "get", RELEASE_KINDS, "-n", namespace, "-o", "json",
        "-l", f"app.kubernetes.io/instance={release}",
    ).stdout  # fmt: skip
    left = []
    for item in json.loads(out)["items"]:
        metadata = item["metadata"]
        released = metadata.get("deletionTimestamp") and metadata.get("finalizers") == [
            "kubernetes.io/pvc-protection"
        ]
        if not released:
            left.append(f"{item['kind']}/{metadata['name']}")
    return sorted(left)


def wait_until_gone(kube: KubeCluster, namespace: str, release: str) -> list[str]:
    """Owned objects (pods, PVCs) are removed by the garbage collector, shortly after; what
    is still left after a minute is returned for the test to show."""
    with contextlib.suppress(TimeoutError):
        wait_for(
            lambda: not left_behind(kube, namespace, release),
            timeout=60,
            what=f"release {release} gone",
            interval=1,
        )
    return left_behind(kube, namespace, release)


@pytest.mark.parametrize("values", [v for v in VALUES_CASES], ids=case_id)
def test_apiserver_accepts_every_rendering(
    values: Path | None, kube: KubeCluster, namespace: str, tmp_path: Path
) -> None:
    docs = render([values], ["pipelines.resize.queue=resize"] if values is None else (),
                  namespace=namespace)  # fmt: skip
    # No Prometheus Operator CRDs in the test bed: the ServiceMonitor is checked by render tests.
    served = [d for d in docs if d["kind"] != "ServiceMonitor"]
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(served))
    result = kube.kubectl(
        "apply", "--server-side", "--dry-run=server", "-f", str(manifest), "-n", namespace
    )
    assert result.stdout.count("(server dry run)") == len(served)
    # The worker Jobs the scaler builds from the rendered configuration (generateName: create).
    jobs = scaler_jobs(docs)
    created = kube.kubectl(
        "create", "--dry-run=server", "-f", "-", "-n", namespace, "-o", "name",
        stdin=yaml.safe_dump_all(jobs),
    ).stdout  # fmt: skip
    assert created.count("job.batch/") == len(jobs) > 0


def assert_notes_explain_publishing(notes: str, namespace: str) -> None:
    assert '"python","-m","jobtide_worker","publish","--queue","resize-images"' in notes
    assert "--image=registry.example.com/acme/resize-images:2.4.1" in notes
    assert "app.kubernetes.io/component=test" in notes  # admitted by the NetworkPolicy
    watch = "get jobs -l app.kubernetes.io/instance=jobs,app.kubernetes.io/component=worker -w"
    assert watch in notes
    assert f"helm test jobs -n {namespace}" in notes
    assert "{{" not in notes


@pytest.mark.parametrize("binary", ["helm3", "helm4"])
def test_install_upgrade_keeps_the_generated_secret(
    binary: str, kube: KubeCluster, namespace: str
) -> None:
    installed = helm(
        kube, namespace, "install", "jobs", str(CHART), "-f", str(EXAMPLE_VALUES), binary=binary
    )
    assert_notes_explain_publishing(installed.split("NOTES:", 1)[1], namespace)
    first = secret_data(kube, namespace, "jobs-jobtide-rabbitmq")
    assert len(first["password"]) == 32
    helm(
        kube, namespace, "upgrade", "jobs", str(CHART), "-f", str(EXAMPLE_VALUES),
        "--set", "pipelines.resize-images.maxWorkers=12", binary=binary,
    )  # fmt: skip
    assert secret_data(kube, namespace, "jobs-jobtide-rabbitmq") == first
    config = kube.kubectl(
        "get", "configmap", "jobs-jobtide-scaler", "-n", namespace,
        "-o", "jsonpath={.data.config\\.yaml}",
    ).stdout  # fmt: skip
    assert yaml.safe_load(config)["pipelines"]["resize-images"]["maxWorkers"] == 12
    # No ConfigMap in the namespace holds the password.
    config_maps = kube.kubectl("get", "configmaps", "-n", namespace, "-o", "json").stdout
    assert first["password"] not in config_maps


def test_two_releases_share_a_namespace_and_uninstall_cleanly(
    kube: KubeCluster, namespace: str
) -> None:
    for release in ("alpha", "beta"):
        helm(kube, namespace, "install", release, str(CHART), "-f", str(MINIMAL))
    alpha, beta = (release_objects(kube, namespace, r) for r in ("alpha", "beta"))
    assert alpha
    assert len(alpha) == len(beta)
    assert not set(alpha) & set(beta)
    assert (
        secret_data(kube, namespace, "alpha-jobtide-rabbitmq")["password"]
        != secret_data(kube, namespace, "beta-jobtide-rabbitmq")["password"]
    )
    helm(kube, namespace, "uninstall", "alpha", "--wait")
    assert wait_until_gone(kube, namespace, "alpha") == []
    assert release_objects(kube, namespace, "beta") == beta
    helm(kube, namespace, "uninstall", "beta", "--wait")
    assert wait_until_gone(kube, namespace, "beta") == []


# What the scaler calls (images/scaler: cluster.py and leader.py), and what it must not.
ALLOWED = [("batch", "jobs", verb) for verb in ("list", "watch", "create", "delete")] + [
    ("coordination.k8s.io", "leases", verb) for verb in ("get", "create", "update")
]
FORBIDDEN = [
    ("batch", "jobs", "get"), ("batch", "jobs", "update"), ("batch", "jobs", "patch"),
    ("batch", "jobs", "deletecollection"),
    ("batch", "cronjobs", "create"), ("", "pods", "get"), ("", "pods", "list"),
    ("", "pods", "create"), ("", "pods", "delete"), ("", "pods/exec", "create"),
    ("", "pods/log", "get"), ("", "secrets", "get"), ("", "secrets", "list"),
    ("", "configmaps", "get"), ("", "configmaps", "update"), ("", "serviceaccounts", "create"),
    ("", "serviceaccounts/token", "create"), ("coordination.k8s.io", "leases", "delete"),
    ("coordination.k8s.io", "leases", "list"), ("apps", "deployments", "create"),
    ("apps", "statefulsets", "update"), ("rbac.authorization.k8s.io", "roles", "create"),
    ("", "events", "create"), ("events.k8s.io", "events", "create"),
]  # fmt: skip


def can(kube: KubeCluster, user: str, namespace: str, group: str, resource: str, verb: str) -> bool:
    subresource = ""
    if "/" in resource:
        resource, subresource = resource.split("/", 1)
    review: dict[str, Any] = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": user,
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"],
            "resourceAttributes": {
                "namespace": namespace, "group": group, "resource": resource,
                "subresource": subresource, "verb": verb,
            },
        },
    }  # fmt: skip
    out = kube.kubectl("create", "-o", "json", "-f", "-", stdin=json.dumps(review)).stdout
    return bool(json.loads(out)["status"].get("allowed", False))


def test_scaler_service_account_can_do_exactly_what_the_scaler_needs(
    kube: KubeCluster, namespace: str, tmp_path: Path
) -> None:
    helm(kube, namespace, "install", "jobs", str(CHART), "-f", str(MINIMAL))
    user = f"system:serviceaccount:{namespace}:jobs-jobtide-scaler"
    denied = [rule for rule in ALLOWED if not can(kube, user, namespace, *rule)]
    assert denied == []
    granted = [rule for rule in FORBIDDEN if can(kube, user, namespace, *rule)]
    assert granted == []
    # Nothing outside its own namespace, nothing cluster-wide.
    assert not can(kube, user, "kube-system", "batch", "jobs", "create")
    assert not can(kube, user, "", "", "nodes", "list")

    # And for real, with the ServiceAccount's own token: it creates the Job the scaler
    # builds from the rendered configuration, and cannot read the broker's Secret.
    token = kube.service_account_token(namespace, "jobs-jobtide-scaler")
    as_scaler = kube.kubeconfig_for_token(token, tmp_path / "scaler.kubeconfig")
    docs = render([MINIMAL], namespace=namespace)
    (job,) = scaler_jobs(docs)
    created = kube.kubectl(
        "create", "-n", namespace, "-o", "json", "-f", "-",
        stdin=json.dumps(job), kubeconfig=as_scaler,
    ).stdout  # fmt: skip
    created_job = json.loads(created)
    assert created_job["metadata"]["name"].startswith("jobs-hello-")
    assert created_job["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    secret = kube.kubectl(
        "get", "secret", "jobs-jobtide-rabbitmq", "-n", namespace,
        kubeconfig=as_scaler, check=False,
    )  # fmt: skip
    assert secret.returncode != 0
    assert "Forbidden" in secret.stderr
    kube.kubectl(
        "delete", "job", created_job["metadata"]["name"], "-n", namespace, kubeconfig=as_scaler
    )
