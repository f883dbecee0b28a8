"""Both helm majors install into and uninstall from the test bed's control plane."""

from __future__ import annotations

from pathlib import Path

import pytest
from jobtide_testbed import tools
from jobtide_testbed.kube import KubeCluster

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("binary", ["helm3", "helm4"])
def test_helm_installs_and_uninstalls_a_chart(
    binary: str, kube: KubeCluster, namespace: str, tmp_path: Path
) -> None:
    chart = tmp_path / "trivial"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: trivial\nversion: 0.1.0\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-cm\n"
        "data:\n  greeting: {{ .Values.greeting | quote }}\n"
    )

    def helm(*args: str) -> str:
        return tools.helm(
            *args, kubeconfig=kube.kubeconfig, namespace=namespace, binary=binary
        ).stdout

    helm("install", "smoke", str(chart), "--set", "greeting=hello", "--wait")
    got = kube.kubectl(
        "get", "configmap", "smoke-cm", "-n", namespace, "-o", "jsonpath={.data.greeting}"
    ).stdout
    assert got == "hello"
    assert "smoke" in helm("list", "-q").split()

    helm("uninstall", "smoke", "--wait")
    gone = kube.kubectl("get", "configmap", "smoke-cm", "-n", namespace, check=False)
    assert gone.returncode != 0
    assert "NotFound" in gone.stderr
    assert helm("list", "-q").split() == []
