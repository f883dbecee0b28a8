"""Pods on the test bed's real node: manifests that fit its pool (label and taint) and the
project's security defaults, and waits on their phase."""

from __future__ import annotations

import json
import time
from typing import Any

from jobtide_testbed.kube import KubeCluster
from jobtide_testbed.node import POOL_LABEL, POOL_TAINT
from jobtide_testbed.process import wait_for

WORKER_UID = 10001


def pool_pod(
    name: str,
    image: str,
    *,
    command: list[str] | None = None,
    env: list[dict[str, Any]] | None = None,
    service_account: str = "default",
    tolerate_pool: bool = True,
) -> dict[str, Any]:
    """A run-once pod for the worker pool: non-root, read-only root filesystem, no
    capabilities, the runtime's seccomp profile."""
    container: dict[str, Any] = {
        "name": "main",
        "image": image,
        "imagePullPolicy": "Never",
        "env": env or [],
        "securityContext": {
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if command is not None:
        container["command"] = command
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": service_account,
        "nodeSelector": {POOL_LABEL[0]: POOL_LABEL[1]},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": WORKER_UID,
            "runAsGroup": WORKER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationGracePeriodSeconds": 5,
        "containers": [container],
    }
    if tolerate_pool:
        spec["tolerations"] = [{**POOL_TAINT, "operator": "Equal"}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def get_pod(cluster: KubeCluster, namespace: str, name: str) -> dict[str, Any]:
    out = cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json")
    pod: dict[str, Any] = json.loads(out.stdout)
    return pod


def create_pod(cluster: KubeCluster, namespace: str, manifest: dict[str, Any]) -> float:
    """Create the pod; returns the monotonic time of creation."""
    cluster.kubectl("create", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))
    return time.monotonic()


def wait_phase(
    cluster: KubeCluster, namespace: str, name: str, phases: tuple[str, ...], timeout: float
) -> str:
    """Wait until the pod is in one of `phases`; fail at once, with its description, when
    it ends in another phase or the time runs out."""
    phase = ""

    def failure() -> AssertionError:
        describe = cluster.kubectl("describe", "pod", name, "-n", namespace, check=False).stdout
        log = cluster.kubectl("logs", name, "-n", namespace, check=False)
        return AssertionError(
            f"pod {namespace}/{name} is {phase or 'unknown'}, wanted {phases}\n{describe}\n"
            f"log:\n{log.stdout}{log.stderr}"
        )

    def reached() -> bool:
        nonlocal phase
        phase = str(get_pod(cluster, namespace, name).get("status", {}).get("phase", ""))
        if phase not in phases and phase in ("Succeeded", "Failed"):
            raise failure()
        return phase in phases

    try:
        wait_for(reached, timeout=timeout, what=f"pod {namespace}/{name} {phases}")
    except TimeoutError:
        raise failure() from None
    return phase


def logs(cluster: KubeCluster, namespace: str, name: str) -> str:
    """The pod's log, fetched from the kubelet through the apiserver."""
    return str(cluster.kubectl("logs", name, "-n", namespace).stdout)
