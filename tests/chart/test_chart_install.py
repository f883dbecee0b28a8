"""The chart on a real control plane (RBAC on): the apiserver accepts every rendering, the
scaler's ServiceAccount may do exactly what the scaler needs, upgrades keep the generated
credentials, releases share a namespace, and uninstalling leaves nothing behind: the worker
Jobs the scaler created included (they are owned by its Deployment), another release's not."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartlib import (
    CHART,
    EXAMPLE_VALUES,
    OPERATOR_KINDS,
    VALUES_CASES,
    case_id,
    render,
    scaler_jobs,
    scaler_settings,
)
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


def create_worker_job_as_scaler(
    kube: KubeCluster, namespace: str, release: str, tmp_path: Path, values: Path = MINIMAL
) -> dict[str, Any]:
    """The Job the scaler builds for the release's first pipeline, owned by the Deployment it
    reads with its own code, created with its own ServiceAccount's token (the real RBAC)."""
    from jobtide_scaler.cluster import Cluster
    from jobtide_scaler.jobs import build_job, cache_selector, owner_reference
    from kubernetes import config as k8s_config

    service_account = f"{release}-jobtide-scaler"
    token = kube.service_account_token(namespace, service_account)
    kubeconfig = kube.kubeconfig_for_token(token, tmp_path / f"{release}-scaler.kubeconfig")
    settings = scaler_settings(render([values], namespace=namespace, release=release))
    cluster = Cluster(
        k8s_config.new_client_from_config(config_file=str(kubeconfig)),
        namespace,
        cache_selector(release),
    )
    owner = owner_reference(cluster.read_deployment(settings.owner_deployment))
    job = build_job(settings.pipelines[0], release, "chart-test", owner)
    created = cluster.create_job(job)
    assert created.name.startswith(f"{release}-{settings.pipelines[0].name}-"), created
    out = kube.kubectl("get", "job", created.name, "-n", namespace, "-o", "json").stdout
    stored: dict[str, Any] = json.loads(out)
    return stored


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
    served = [d for d in docs if d["kind"] not in OPERATOR_KINDS]
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
    kube: KubeCluster, namespace: str, tmp_path: Path
) -> None:
    for release in ("alpha", "beta"):
        helm(kube, namespace, "install", release, str(CHART), "-f", str(MINIMAL))
        job = create_worker_job_as_scaler(kube, namespace, release, tmp_path)
        (owner,) = job["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"]) == ("Deployment", f"{release}-jobtide-scaler")
        # Its pod (no node here: it stays Pending) is made by the Job controller; wait for it
        # so that the release's objects below are complete.
        wait_for(
            lambda name=job["metadata"]["name"]: kube.kubectl(
                "get", "pods", "-n", namespace, "-o", "name", "-l", f"job-name={name}"
            ).stdout.strip(),
            timeout=30, what="the worker Job's pod", interval=0.5,
        )  # fmt: skip
    alpha, beta = (release_objects(kube, namespace, r) for r in ("alpha", "beta"))
    assert any(o.startswith("job.batch/alpha-hello-") for o in alpha)
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
ALLOWED = (
    [("batch", "jobs", verb) for verb in ("list", "watch", "create", "delete")]
    + [("coordination.k8s.io", "leases", verb) for verb in ("get", "create", "update")]
    + [("", "events", "create")]
)
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
    ("", "events", "update"), ("", "events", "list"), ("events.k8s.io", "events", "create"),
]  # fmt: skip


def can(
    kube: KubeCluster, user: str, namespace: str, group: str, resource: str, verb: str,
    name: str = "",
) -> bool:  # fmt: skip
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
                "subresource": subresource, "verb": verb, "name": name,
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
    # Its own Deployment (the owner of its Jobs) and no other.
    assert can(kube, user, namespace, "apps", "deployments", "get", "jobs-jobtide-scaler")
    assert not can(kube, user, namespace, "apps", "deployments", "get", "jobs-jobtide-rabbitmq")
    assert not can(kube, user, namespace, "apps", "deployments", "get")
    assert not can(kube, user, namespace, "apps", "deployments", "list")
    # A patch of its status ConfigMap by name; no other ConfigMap, no read of any.
    assert can(kube, user, namespace, "", "configmaps", "patch", "jobs-jobtide-scaler-status")
    assert not can(kube, user, namespace, "", "configmaps", "patch", "jobs-jobtide-scaler")
    for verb in ("get", "list", "watch", "update", "create", "delete"):
        assert not can(kube, user, namespace, "", "configmaps", verb, "jobs-jobtide-scaler-status")
    # Nothing outside its own namespace, nothing cluster-wide.
    assert not can(kube, user, "kube-system", "batch", "jobs", "create")
    assert not can(kube, user, "", "", "nodes", "list")

    # And for real, with the ServiceAccount's own token: it reads its owner and creates the
    # Job the scaler builds from the rendered configuration, and cannot read the broker's
    # Secret.
    created_job = create_worker_job_as_scaler(kube, namespace, "jobs", tmp_path)
    assert created_job["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    as_scaler = tmp_path / "jobs-scaler.kubeconfig"
    # It reports an Event on its Deployment, the owner of the Jobs, as the scaler does.
    from jobtide_scaler.cluster import Cluster
    from jobtide_scaler.events import Event
    from kubernetes import config as k8s_config

    cluster = Cluster(k8s_config.new_client_from_config(config_file=str(as_scaler)), namespace, "")
    owner = created_job["metadata"]["ownerReferences"][0]
    cluster.post_event(owner, Event("AtCap", "pipeline hello held at maxWorkers"))
    events = json.loads(kube.kubectl(
        "get", "events", "-n", namespace, "-o", "json",
        "--field-selector", f"involvedObject.uid={owner['uid']}",
    ).stdout)["items"]  # fmt: skip
    ours = [e for e in events if e["source"].get("component") == "jobtide-scaler"]
    assert [(e["reason"], e["type"], e["message"]) for e in ours] == [
        ("AtCap", "Normal", "pipeline hello held at maxWorkers")
    ]
    secret = kube.kubectl(
        "get", "secret", "jobs-jobtide-rabbitmq", "-n", namespace,
        kubeconfig=as_scaler, check=False,
    )  # fmt: skip
    assert secret.returncode != 0
    assert "Forbidden" in secret.stderr
    kube.kubectl(
        "delete", "job", created_job["metadata"]["name"], "-n", namespace, kubeconfig=as_scaler
    )


HA_BROKER = CHART / "ci" / "ha-broker-values.yaml"


def test_uninstall_hook_may_annotate_the_broker_members_and_nothing_else(
    kube: KubeCluster, namespace: str, tmp_path: Path
) -> None:
    """The pre-delete hook's ServiceAccount patches the members' pods (the scaler image's
    `annotate` command, run here with its token) and nothing else; the hook runs at uninstall
    (its Job succeeds on the kwok node) and leaves nothing behind."""
    from jobtide_scaler.annotate import annotate
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config

    helm(kube, namespace, "install", "jobs", str(CHART), "-f", str(HA_BROKER))
    # The hook's ServiceAccount and Role exist only while `helm uninstall` runs: create them
    # as rendered, to check them before.
    hook = [
        d
        for d in render([HA_BROKER], namespace=namespace)
        if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "pre-delete"
        and d["kind"] != "Job"
    ]
    kube.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all(hook))
    account = "jobs-jobtide-rabbitmq-uninstall"
    user = f"system:serviceaccount:{namespace}:{account}"
    members = [f"jobs-jobtide-rabbitmq-{i}" for i in range(3)]
    assert all(can(kube, user, namespace, "", "pods", "patch", m) for m in members)
    assert not can(kube, user, namespace, "", "pods", "patch", "jobs-jobtide-rabbitmq-3")
    assert not can(kube, user, namespace, "", "pods", "patch")
    for verb in ("get", "list", "watch", "update", "delete", "create"):
        assert not can(kube, user, namespace, "", "pods", verb, members[0]), verb
    assert not can(kube, user, namespace, "", "pods/exec", "create", members[0])
    assert not can(kube, user, namespace, "", "secrets", "get", "jobs-jobtide-rabbitmq")
    assert not can(kube, user, namespace, "apps", "statefulsets", "patch", "jobs-jobtide-rabbitmq")

    def member_annotations() -> dict[str, str]:
        out = kube.kubectl("get", "pods", "-n", namespace, "-o", "json", "-l",
                           "app.kubernetes.io/component=rabbitmq").stdout  # fmt: skip
        return {
            p["metadata"]["name"]: p["metadata"].get("annotations", {}).get(UNINSTALLING, "")
            for p in json.loads(out)["items"]
        }

    wait_for(lambda: set(member_annotations()) == set(members), timeout=60,
             what="the StatefulSet's three pods")  # fmt: skip
    token = kube.service_account_token(namespace, account)
    kubeconfig = kube.kubeconfig_for_token(token, tmp_path / "uninstall-hook.kubeconfig")
    core = k8s.CoreV1Api(k8s_config.new_client_from_config(config_file=str(kubeconfig)))
    assert annotate(core, namespace, UNINSTALLING, "true", members) == 3
    assert member_annotations() == dict.fromkeys(members, "true")
    scaler = kube.kubectl("get", "pods", "-n", namespace, "-o", "name", "-l",
                          "app.kubernetes.io/component=scaler").stdout.split()  # fmt: skip
    with pytest.raises(k8s.ApiException) as refused:
        annotate(core, namespace, UNINSTALLING, "true", [scaler[0].removeprefix("pod/")])
    assert refused.value.status == 403

    helm(kube, namespace, "uninstall", "jobs", "--wait")
    assert wait_until_gone(kube, namespace, "jobs") == []


UNINSTALLING = "jobtide.io/uninstalling"


@pytest.mark.parametrize("binary", ["helm3", "helm4"])
def test_status_figures_written_as_the_scaler_survive_an_upgrade(
    binary: str, kube: KubeCluster, namespace: str, tmp_path: Path
) -> None:
    """The scaler's own writing code with its ServiceAccount's token fills the ConfigMap the
    chart created empty; an upgrade (Helm 3's three-way merge, Helm 4's apply) leaves it."""
    from jobtide_scaler.cluster import Cluster
    from jobtide_scaler.status import STATUS_KEY
    from kubernetes import config as k8s_config

    helm(kube, namespace, "install", "jobs", str(CHART), "-f", str(MINIMAL), binary=binary)
    settings = scaler_settings(render([MINIMAL], namespace=namespace))
    token = kube.service_account_token(namespace, "jobs-jobtide-scaler")
    as_scaler = kube.kubeconfig_for_token(token, tmp_path / "scaler.kubeconfig")
    cluster = Cluster(k8s_config.new_client_from_config(config_file=str(as_scaler)), namespace, "")
    cluster.write_status(settings.status_config_map, '{"version": 1}')

    def stored() -> dict[str, str]:
        out = kube.kubectl(
            "get", "configmap", settings.status_config_map, "-n", namespace, "-o", "json"
        ).stdout  # fmt: skip
        return json.loads(out).get("data") or {}  # type: ignore[no-any-return]

    assert stored() == {STATUS_KEY: '{"version": 1}'}
    helm(
        kube, namespace, "upgrade", "jobs", str(CHART), "-f", str(MINIMAL),
        "--set", "scaler.pollIntervalSeconds=7", binary=binary,
    )  # fmt: skip
    assert stored() == {STATUS_KEY: '{"version": 1}'}


RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


@pytest.mark.parametrize("values", [MINIMAL, EXAMPLE_VALUES], ids=["minimal", "example"])
def test_every_pod_is_admitted_under_the_restricted_pod_security_level(
    kube: KubeCluster, namespace: str, tmp_path: Path, values: Path
) -> None:
    """The apiserver's own PodSecurity admission, enforcing `restricted` on the namespace,
    admits the broker's, the scaler's and a worker Job's pods (created by their controllers;
    no node here, so they stay Pending: admission is at creation)."""
    labels = [f"{key}={value}" for key, value in RESTRICTED.items()]
    kube.kubectl("label", "namespace", namespace, *labels)
    helm(kube, namespace, "install", "jobs", str(CHART), "-f", str(values))
    create_worker_job_as_scaler(kube, namespace, "jobs", tmp_path, values=values)

    def components() -> set[str]:
        out = kube.kubectl(
            "get", "pods", "-n", namespace, "-l", "app.kubernetes.io/instance=jobs",
            "-o", "jsonpath={.items[*].metadata.labels.app\\.kubernetes\\.io/component}",
        ).stdout  # fmt: skip
        return set(str(out).split())

    expected = {"rabbitmq", "scaler", "worker"}
    try:
        wait_for(lambda: components() >= expected, timeout=60, what="every pod created")
    except TimeoutError:
        refused = kube.kubectl(
            "get", "events", "-n", namespace, "--field-selector", "reason=FailedCreate",
            "-o", "jsonpath={range .items[*]}{.message}{'\\n'}{end}",
        ).stdout  # fmt: skip
        pytest.fail(f"pods {expected - components()} not created:\n{refused}")
