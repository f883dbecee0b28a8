"""The chart and its images from a private OCI registry, as a cluster gets them: the chart is
pushed to the test bed's registry and installed with `helm install oci://...`; the scaler and
worker images are pushed there too, the node's containerd trusts the registry's CA
(hosts.toml) and pulls them with the release's `imagePullSecrets`. The scaler pod runs the
pulled image, and the registry's log shows containerd fetching it as the registry's user."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from jobtide_testbed.chartnode import node_values, write_values
from jobtide_testbed.images import HELLO_IMAGE, SCALER_IMAGE
from jobtide_testbed.node import Node
from jobtide_testbed.registry import USERNAME, Registry
from jobtide_testbed.tools import CHART, helm, kubectl

pytestmark = pytest.mark.e2e

RELEASE = "from-registry"
# The image pull Secret of the release, as the README names it.
REGCRED = "regcred"


def push_image(node: Node, registry: Registry, hosts_dir: Path, local: str) -> str:
    """Push image `local` (loaded into the node) to the registry, trusting it as `hosts_dir`
    says; the registry's name for it, which the node then does not have, so a pod of it must
    be pulled."""
    remote = f"{registry.host}/{local}"
    # `docker save` names carry no registry; containerd files them under docker.io.
    node.ctr("images", "tag", "--force", f"docker.io/{local}", remote)
    node.ctr("images", "push", "--hosts-dir", str(hosts_dir),
             "--user", f"{USERNAME}:{registry.password}", remote)  # fmt: skip
    node.ctr("images", "rm", remote)
    return remote


def registry_image(remote: str) -> dict[str, str]:
    repository, _, tag = remote.rpartition(":")
    return {"repository": repository, "tag": tag, "pullPolicy": "Always"}


def test_chart_and_images_come_from_the_registry(
    kube_node: Node, chart_images: list[str], registry: Registry, node_namespace: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    kubeconfig = kube_node.cluster.kubeconfig
    kube_node.trust_registry(registry.host, registry.hosts_toml())
    pusher = tmp_path / "hosts" / registry.host
    pusher.mkdir(parents=True)
    (pusher / "hosts.toml").write_text(registry.hosts_toml(push=True))
    scaler, hello = (
        push_image(kube_node, registry, pusher.parent, tag) for tag in (SCALER_IMAGE, HELLO_IMAGE)
    )
    listed = kube_node.ctr("images", "ls", "--quiet").stdout.split()
    assert scaler not in listed, listed

    credentials = tmp_path / "registry.json"
    registry.helm_login(credentials)
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    helm("package", str(CHART), "--destination", str(tmp_path))
    registry.helm(credentials, "push", str(tmp_path / f"jobtide-{version}.tgz"),
                  f"oci://{registry.host}/charts")  # fmt: skip

    kubectl(kubeconfig, "create", "secret", "docker-registry", REGCRED, "-n", node_namespace,
            f"--docker-server={registry.host}", f"--docker-username={USERNAME}",
            f"--docker-password={registry.password}")  # fmt: skip
    values = node_values()
    values["imagePullSecrets"] = [{"name": REGCRED}]
    values["scaler"]["image"] = registry_image(scaler)
    values["pipelineDefaults"]["image"] = registry_image(hello)
    values["pipelines"] = {"hello": {"queue": "hello", "handler": "handler:handle"}}
    # What the registry logs from here on is the install's: the chart, then the images.
    logged_before = len(registry.log_path.read_text().splitlines())
    registry.helm(
        credentials, "install", RELEASE, f"oci://{registry.host}/charts/jobtide",
        "--version", version, "--values", str(write_values(tmp_path / "values.yaml", values)),
        "--wait", "--timeout", "6m", kubeconfig=kubeconfig, namespace=node_namespace,
    )  # fmt: skip
    try:
        pods = json.loads(
            kubectl(kubeconfig, "get", "pods", "-n", node_namespace, "-o", "json", "-l",
                    f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=scaler"
                    ).stdout
        )["items"]  # fmt: skip
        assert pods, "no scaler pod"
        for pod in pods:
            assert pod["status"]["phase"] == "Running", pod["status"]
            assert pod["spec"]["imagePullSecrets"] == [{"name": REGCRED}]
            [status] = pod["status"]["containerStatuses"]
            assert status["image"] == scaler, status
        assert scaler in kube_node.ctr("images", "ls", "--quiet").stdout.split()
        name, _, tag = scaler.removeprefix(f"{registry.host}/").rpartition(":")
        # containerd resolves the tag (as the registry's user) before fetching by digest.
        requests = [
            line
            for line in registry.log_path.read_text().splitlines()[logged_before:]
            if f"http.request.uri=/v2/{name}/manifests/{tag} " in line
        ]
        pulls = [
            line
            for line in requests
            if "auth.user.name=jobtide" in line
            and re.search(r'http\.request\.useragent="?containerd/', line)
        ]
        assert pulls, requests
    finally:
        helm("uninstall", RELEASE, "--wait", kubeconfig=kubeconfig, namespace=node_namespace,
             check=False)  # fmt: skip
