"""The chart through a real OCI registry (the test bed's, with TLS and a password), as users
install it from one: `helm package`, `helm registry login`, `helm push` to oci://, then
`helm install oci://...` on the real control plane. The registry refuses a wrong password and
a client without credentials (its own 401), so the install really went through the login."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from chartlib import CHART
from jobtide_testbed import tools
from jobtide_testbed.kube import KubeCluster
from jobtide_testbed.registry import Registry

pytestmark = pytest.mark.integration

MINIMAL = CHART / "ci" / "minimal-values.yaml"


def test_chart_installs_from_the_oci_registry(
    kube: KubeCluster, namespace: str, registry: Registry, tmp_path: Path
) -> None:
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    tools.helm("package", str(CHART), "--destination", str(tmp_path))
    package = tmp_path / f"jobtide-{version}.tgz"
    assert package.is_file(), list(tmp_path.iterdir())
    config = tmp_path / "registry.json"
    repository = f"oci://{registry.host}/charts"

    refused = registry.helm_login(config, password=registry.password + "x")
    assert "401" in refused, refused  # helm quotes the registry's answer
    assert not config.exists() or registry.host not in config.read_text()

    registry.helm_login(config)
    pushed = registry.helm(config, "push", str(package), repository)
    assert f"{registry.host}/charts/jobtide:{version}" in pushed, pushed
    tags = registry.get("charts/jobtide/tags/list").json()
    assert tags == {"name": "charts/jobtide", "tags": [version]}

    # Without the login's credentials the registry refuses the chart (its own 401).
    before = len(registry.access_log())
    anonymous = registry.helm(
        tmp_path / "anonymous.json", "show", "chart", f"{repository}/jobtide",
        "--version", version, check=False,
    )  # fmt: skip
    assert "basic credential not found" in anonymous, anonymous
    refusals = registry.access_log()[before:]
    assert any(f'/manifests/{version} HTTP/1.1" 401' in line for line in refusals), refusals

    release = "from-oci"
    registry.helm(
        config, "install", release, f"{repository}/jobtide", "--version", version,
        "--values", str(MINIMAL), kubeconfig=kube.kubeconfig, namespace=namespace,
    )  # fmt: skip
    listed = tools.helm(
        "list", "--output", "json", kubeconfig=kube.kubeconfig, namespace=namespace
    ).stdout
    releases = {r["name"]: (r["status"], r["chart"]) for r in yaml.safe_load(listed)}
    assert releases == {release: ("deployed", f"jobtide-{version}")}, releases
    deployment = f"{release}-jobtide-scaler"
    kube.kubectl("get", "deployment", deployment, "-n", namespace)
    # The registry served the chart's manifest to the logged-in client: the install came from it.
    served = f'"GET /v2/charts/jobtide/manifests/{version} HTTP/1.1" 200'
    assert any(served in line for line in registry.access_log()), registry.process.tail()
