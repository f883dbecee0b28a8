"""Both helm majors install into and uninstall from the test bed's control plane."""

from __future__ import annotations

from pathlib import Path

import pytest
from testbed.kube import KubeCluster, tool
from testbed.process import run

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("helm", ["helm3", "helm4"])
def test_helm_installs_and_uninstalls_a_chart(
    helm: str, kube: KubeCluster, namespace: str, tmp_path: Path
) -> None:
    chart = tmp_path / "trivial"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: trivial\nversion: 0.1.0\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-cm\n"
        "data:\n  greeting: {{ .Values.greeting | quote }}\n"
    )
    base = [tool(helm), "--kubeconfig", str(kube.kubeconfig), "-n", namespace]

    run([*base, "install", "smoke", str(chart), "--set", "greeting=hello", "--wait"])
    got = kube.kubectl(
        "get", "configmap", "smoke-cm", "-n", namespace, "-o", "jsonpath={.data.greeting}"
    ).stdout
    assert got == "hello"
    assert "smoke" in run([*base, "list", "-q"]).stdout.split()

    run([*base, "uninstall", "smoke", "--wait"])
    gone = kube.kubectl("get", "configmap", "smoke-cm", "-n", namespace, check=False)
    assert gone.returncode != 0
    assert "NotFound" in gone.stderr
    assert run([*base, "list", "-q"]).stdout.split() == []
