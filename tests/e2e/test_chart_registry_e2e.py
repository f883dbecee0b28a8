"""The chart and its images from a private OCI registry, as a cluster gets them: the chart is
pushed to the test bed's registry and installed with `helm install oci://...`; the scaler and
worker images are pushed there too, the node's containerd trusts the registry's CA
(hosts.toml) and pulls them with the release's `imagePullSecrets`.

What is pushed are copies of the images the node holds whose every layer is new to the node
(`Registry.push_copy`), so the registry's log shows containerd fetching each layer of both
images as the registry's user. The scaler pod runs the pulled scaler, a worker Job pod the
pulled worker, which does the tasks published; a pull Secret with a wrong password gets a pod
the registry's 401 and nothing else. The node's image store is given back as found."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from jobtide_testbed.chartnode import (
    WORKER_SELECTOR,
    ReleaseBroker,
    diagnostics,
    log_entry,
    node_values,
    pool_toleration,
    write_values,
)
from jobtide_testbed.images import HELLO_IMAGE, SCALER_IMAGE
from jobtide_testbed.node import POOL_LABEL, Node
from jobtide_testbed.process import wait_for
from jobtide_testbed.registry import USERNAME, PushedImage, Registry
from jobtide_testbed.tools import CHART, helm, kubectl
from jobtide_worker.publisher import publish

pytestmark = pytest.mark.e2e

RELEASE = "from-registry"
# The image pull Secret of the release, as the README names it.
REGCRED = "regcred"
# A pull Secret with a wrong password, and the pod that names it.
WRONG_REGCRED = "regcred-wrong"
WRONG_POD = "wrong-password"
PULL_FAILURES = ("ErrImagePull", "ImagePullBackOff")
TASKS = 2


def copy_image(node: Node, registry: Registry, local: str, marker: str) -> PushedImage:
    """Push a copy of image `local` (loaded into the node) whose layers the node lacks."""
    repository, _, tag = local.rpartition(":")
    # `docker save` names carry no registry; containerd files them under docker.io.
    manifest = node.image_digest(f"docker.io/{local}")
    return registry.push_copy(node.blob, manifest, repository, tag, marker)


def registry_image(image: PushedImage) -> dict[str, str]:
    repository, _, tag = image.reference.rpartition(":")
    return {"repository": repository, "tag": tag, "pullPolicy": "Always"}


def pull_secret(kubeconfig: Path, namespace: str, name: str, host: str, password: str) -> None:
    kubectl(kubeconfig, "create", "secret", "docker-registry", name, "-n", namespace,
            f"--docker-server={host}", f"--docker-username={USERNAME}",
            f"--docker-password={password}")  # fmt: skip


def wrong_password_pod(namespace: str, image: str) -> dict[str, Any]:
    """A pod of `image` pulled with WRONG_REGCRED, on the pool node, restricted as the chart's
    pods are (it never starts)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": WRONG_POD, "namespace": namespace},
        "spec": {
            "imagePullSecrets": [{"name": WRONG_REGCRED}],
            "nodeSelector": {POOL_LABEL[0]: POOL_LABEL[1]},
            "tolerations": [pool_toleration()],
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 10001,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "worker",
                    "image": image,
                    "imagePullPolicy": "Always",
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def pods(kubeconfig: Path, namespace: str, selector: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(
        kubectl(kubeconfig, "get", "pods", "-n", namespace, "-o", "json", "-l", selector).stdout
    )["items"]
    return items


def waiting(kubeconfig: Path, namespace: str, pod: str) -> dict[str, str]:
    """The waiting state (reason, message) of the pod's container; {} if none."""
    found = json.loads(kubectl(kubeconfig, "get", "pod", pod, "-n", namespace, "-o", "json").stdout)
    statuses = found["status"].get("containerStatuses", [])
    return dict(statuses[0]["state"].get("waiting", {})) if statuses else {}


def done_tasks(kubeconfig: Path, namespace: str) -> set[str]:
    """The message ids the release's worker pods logged as done (JSON logs), so far."""
    out = kubectl(kubeconfig, "logs", "-n", namespace, "--tail=-1", "-l",
                  f"app.kubernetes.io/instance={RELEASE},{WORKER_SELECTOR}",
                  check=False).stdout  # fmt: skip
    entries = [log_entry(line) for line in out.splitlines()]
    return {
        str(e["message_id"])
        for e in entries
        if e.get("message") == "task" and e.get("outcome") == "done"
    }


def test_chart_and_images_come_from_the_registry(
    kube_node: Node, chart_images: list[str], registry: Registry, node_namespace: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    began = time.monotonic()
    kubeconfig = kube_node.cluster.kubeconfig
    images_found = kube_node.images()
    blobs_found = kube_node.blobs()
    try:
        kube_node.trust_registry(registry.host, registry.hosts_toml())
        # A marker never used before: no node holds a layer of these copies.
        marker = f"{RELEASE} {secrets.token_hex(8)}"
        scaler, hello = (
            copy_image(kube_node, registry, local, marker) for local in (SCALER_IMAGE, HELLO_IMAGE)
        )
        pushed = time.monotonic()
        assert not {scaler.reference, hello.reference} & images_found
        assert not {*scaler.layers, *hello.layers} & blobs_found

        credentials = tmp_path / "registry.json"
        registry.helm_login(credentials)
        version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
        helm("package", str(CHART), "--destination", str(tmp_path))
        registry.helm(credentials, "push", str(tmp_path / f"jobtide-{version}.tgz"),
                      f"oci://{registry.host}/charts")  # fmt: skip

        pull_secret(kubeconfig, node_namespace, REGCRED, registry.host, registry.password)
        pull_secret(kubeconfig, node_namespace, WRONG_REGCRED, registry.host,
                    registry.password + "x")  # fmt: skip
        values = node_values()
        values["imagePullSecrets"] = [{"name": REGCRED}]
        values["scaler"]["image"] = registry_image(scaler)
        values["scaler"]["pollIntervalSeconds"] = 1
        values["pipelineDefaults"]["image"] = registry_image(hello)
        values["pipelineDefaults"]["env"] = [{"name": "JOBTIDE_LOG_FORMAT", "value": "json"}]
        values["pipelines"] = {"hello": {"queue": "hello", "handler": "handler:handle"}}
        # What the registry logs from here on is the install's (the chart, then the images)
        # and the wrong password's.
        logged_before = registry.log_length()
        # The wrong password's pod tries while the release installs.
        kube_node.cluster.apply(wrong_password_pod(node_namespace, hello.reference))
        registry.helm(
            credentials, "install", RELEASE, f"oci://{registry.host}/charts/jobtide",
            "--version", version, "--values", str(write_values(tmp_path / "values.yaml", values)),
            "--wait", "--timeout", "6m", kubeconfig=kubeconfig, namespace=node_namespace,
        )  # fmt: skip
        installed = time.monotonic()

        release = f"app.kubernetes.io/instance={RELEASE}"
        scalers = pods(kubeconfig, node_namespace, f"{release},app.kubernetes.io/component=scaler")
        assert scalers, "no scaler pod"
        for pod in scalers:
            assert pod["status"]["phase"] == "Running", pod["status"]
            assert pod["spec"]["imagePullSecrets"] == [{"name": REGCRED}]
            [status] = pod["status"]["containerStatuses"]
            assert status["image"] == scaler.reference, status
            assert status["imageID"] == scaler.pinned, status

        # Tasks for the worker: the scaler starts a Job whose pod pulls the worker's copy.
        broker = ReleaseBroker.find(kubeconfig, node_namespace, RELEASE)
        published = publish("hello", [{"seconds": 0}] * TASKS, broker=broker.config(),
                            declare=False)  # fmt: skip
        wait_for(lambda: set(published) <= done_tasks(kubeconfig, node_namespace),
                 timeout=180, what="the tasks logged done by a worker", interval=1)  # fmt: skip
        worked = time.monotonic()
        workers = pods(kubeconfig, node_namespace, f"{release},{WORKER_SELECTOR}")
        assert workers, "no worker pod"
        for pod in workers:
            assert pod["spec"]["imagePullSecrets"] == [{"name": REGCRED}]
            [status] = pod["status"]["containerStatuses"]
            assert status["image"] == hello.reference, status
            assert status["imageID"] == hello.pinned, status

        # containerd fetched every layer of both copies from the registry, as its user.
        records = registry.records(since=logged_before)
        fetched = Counter(
            record["http.request.uri"]
            for record in records
            if record.get("msg") == "response completed"
            and record.get("http.request.method") == "GET"
            and record.get("http.response.status") == "200"
            and record.get("auth.user.name") == USERNAME
            and record.get("http.request.useragent", "").startswith("containerd/")
        )
        per_layer = {
            f"{image.repository} {digest[:19]}": fetched[f"/v2/{image.repository}/blobs/{digest}"]
            for image in (scaler, hello)
            for digest in image.layers
        }
        print(f"\nlayer GETs by containerd as {USERNAME}: {per_layer}")
        assert all(count >= 1 for count in per_layer.values()), (per_layer, fetched)

        # The wrong password: the registry's 401 is all the pod gets.
        failure: dict[str, str] = {}

        def refused() -> bool:
            failure.update(waiting(kubeconfig, node_namespace, WRONG_POD))
            return failure.get("reason") in PULL_FAILURES

        wait_for(refused, timeout=60, what=f"pod {WRONG_POD} failing to pull", interval=1)
        print(f"{WRONG_POD}: {failure}")
        assert re.search(r"401|unauthorized", failure["message"], re.IGNORECASE), failure
        # The registry refused containerd's password for the worker's manifest (a request
        # without one is "invalid authorization credential", the challenge before each pull).
        refusals = [
            record
            for record in registry.records(since=logged_before)
            if record.get("msg", "").endswith(": authentication failure")
            and record.get("http.request.uri") == f"/v2/{hello.repository}/manifests/{hello.tag}"
            and record.get("http.request.useragent", "").startswith("containerd/")
        ]
        print(f"registry refusals of the wrong password: {len(refusals)}")
        assert refusals, registry.process.tail()
        checked = time.monotonic()
    except BaseException:
        print("\n\n".join(diagnostics(kubeconfig, node_namespace)))
        raise
    finally:
        helm("uninstall", RELEASE, "--wait", kubeconfig=kubeconfig, namespace=node_namespace,
             check=False)  # fmt: skip
        # The copies, by every name the node's CRI gave them (tag, digest, image ID).
        kube_node.remove_images(*kube_node.images() - images_found)
        kube_node.distrust_registry(registry.host)
    # The node's image store as found: the copies and their blobs gone (their snapshots go
    # with the last container that used them).
    assert kube_node.images() == images_found
    assert not {*scaler.layers, *hello.layers, scaler.config, hello.config} & kube_node.blobs()
    print(
        f"registry e2e: push copies {pushed - began:.1f} s, chart push and install "
        f"{installed - pushed:.1f} s, tasks done by a pulled worker {worked - installed:.1f} s, "
        f"checks {checked - worked:.1f} s, in all {time.monotonic() - began:.1f} s"
    )
