"""The bad values only the cluster can see (`# expect-install:` in bad-values/): a real
`helm install` into the test bed's apiserver fails with the apiserver's message naming the
field, before any object of the release exists (the worker PodTemplate is a pre-install hook)."""

from __future__ import annotations

from pathlib import Path

import pytest
from chartlib import BAD_VALUES, CHART, expectations
from jobtide_testbed import tools
from jobtide_testbed.kube import KubeCluster
from test_chart_install import release_objects

pytestmark = pytest.mark.integration

INSTALL_CHECKED = [path for path in BAD_VALUES if expectations(path, install=True)]


@pytest.mark.parametrize("binary", ["helm3", "helm4"])
@pytest.mark.parametrize("values", INSTALL_CHECKED, ids=lambda p: p.stem)
def test_install_fails_naming_the_field_and_creates_nothing(
    values: Path, binary: str, kube: KubeCluster, namespace: str
) -> None:
    result = tools.helm(
        "install", "bad", str(CHART), "-f", str(values),
        kubeconfig=kube.kubeconfig, namespace=namespace, binary=binary, check=False, timeout=180,
    )  # fmt: skip
    assert result.returncode != 0, f"{values.name} was installed"
    output = result.stdout + result.stderr
    assert "pre-install" in output, output
    assert "PodTemplate" in output, output
    assert "bad-jobtide-resize" in output, output
    for line in expectations(values, install=True):
        # A line may give the messages of several helm versions, separated by ` || `.
        assert any(f in output for f in line.split(" || ")), f"{line!r} not in:\n{output}"
    assert release_objects(kube, namespace, "bad") == []
