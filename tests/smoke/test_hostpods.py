"""The test bed's host-process pods (jobtide_testbed/hostpods.py) get a pod's Secret volumes
as files, as kubelet would mount them: in a private folder, readable by their user only, the
environment pointing there, and gone when the pod ends. The Secret comes from the real
apiserver; the Karpenter end-to-end test (tests/e2e/test_karpenter.py) runs the whole pod."""

from __future__ import annotations

import base64
import stat
from pathlib import Path
from typing import Any

import pytest
from jobtide_testbed import hostpods
from jobtide_testbed.hostpods import HostPod, HostPods, PodSpecError
from jobtide_testbed.images import HELLO_IMAGE
from jobtide_testbed.kube import KubeCluster

pytestmark = pytest.mark.integration

MOUNT = "/etc/jobtide/broker-credentials"


def worker_pod(namespace: str, secret_name: str) -> dict[str, Any]:
    """A worker pod as the chart renders it: the credentials' two keys from a Secret volume."""
    items = [{"key": "username", "path": "username"}, {"key": "password", "path": "password"}]
    volume = {"secretName": secret_name, "items": items, "defaultMode": 0o440}
    env = [
        {"name": "JOBTIDE_BROKER_USERNAME_FILE", "value": f"{MOUNT}/username"},
        {"name": "JOBTIDE_BROKER_PASSWORD_FILE", "value": f"{MOUNT}/password"},
        {"name": "OUTPUT", "value": "/etc/jobtide/broker-credentials-not-a-mount/x"},
    ]
    return {
        "metadata": {"name": "w-1", "namespace": namespace, "uid": "0000-test"},
        "spec": {
            "nodeName": "fake",
            "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "creds", "secret": volume}],
            "containers": [
                {
                    "name": "worker",
                    "image": HELLO_IMAGE,
                    "env": env,
                    "volumeMounts": [
                        {"name": "tmp", "mountPath": "/tmp"},
                        {"name": "creds", "mountPath": MOUNT, "readOnly": True},
                    ],
                }
            ],
        },
    }


def host_pod(pod: dict[str, Any], root: Path) -> HostPod:
    meta = pod["metadata"]
    return HostPod(
        namespace=meta["namespace"],
        name=meta["name"],
        uid=meta["uid"],
        node="fake",
        container="worker",
        image=HELLO_IMAGE,
        log_path=root / "w-1.log",
        started_at="",
    )


def create_secret(kube: KubeCluster, namespace: str, name: str, data: dict[str, str]) -> None:
    encoded = {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}
    metadata = {"name": name, "namespace": namespace}
    kube.apply({"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "data": encoded})


def test_secret_volumes_become_private_files_the_environment_points_to(
    kube: KubeCluster, namespace: str, tmp_path: Path
) -> None:
    password = "p4ss-from-the-secret"  # noqa: S105 - a test's own stand-in
    data = {"username": "jobtide", "password": password, "erlang-cookie": "C" * 20}
    create_secret(kube, namespace, "broker", data)
    pod = worker_pod(namespace, "broker")
    runner = HostPods(kube.kubeconfig, tmp_path)
    running = host_pod(pod, tmp_path)

    _, env, _ = runner._command(pod, running)

    folder = running.volumes_dir
    assert folder is not None
    assert env["JOBTIDE_BROKER_PASSWORD_FILE"] == str(folder / "creds" / "password")
    assert env["JOBTIDE_BROKER_USERNAME_FILE"] == str(folder / "creds" / "username")
    assert env["OUTPUT"] == "/etc/jobtide/broker-credentials-not-a-mount/x"  # not under it
    assert password not in "".join(env.values())
    assert Path(env["JOBTIDE_BROKER_PASSWORD_FILE"]).read_text() == password
    # Only the items asked for, each readable by this user alone.
    assert sorted(p.name for p in (folder / "creds").iterdir()) == ["password", "username"]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in (folder / "creds").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

    hostpods._remove_volumes(running)
    assert not folder.exists()
    assert running.volumes_dir is None


def test_a_missing_secret_key_fails_the_pod_naming_the_mount(
    kube: KubeCluster, namespace: str, tmp_path: Path
) -> None:
    create_secret(kube, namespace, "partial", {"username": "jobtide"})
    pod = worker_pod(namespace, "partial")
    runner = HostPods(kube.kubeconfig, tmp_path)
    failed = host_pod(pod, tmp_path)
    with pytest.raises(PodSpecError, match=r"volumeMounts\[1\] \(creds\): key 'password'"):
        runner._command(pod, failed)
    hostpods._remove_volumes(failed)  # what the runner does with a pod that cannot start
