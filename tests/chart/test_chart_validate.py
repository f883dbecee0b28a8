"""The chart lints with both helm majors, and every rendering validates strictly against the
Kubernetes schemas of each supported minor version, including the worker Jobs the scaler
builds from the rendered configuration."""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartlib import (
    CHART,
    KUBE_SCHEMAS,
    OPERATOR_KINDS,
    SCENARIOS,
    VALIDATED_KUBE_VERSIONS,
    VALUES_CASES,
    case_id,
    render,
    scaler_jobs,
)
from jobtide_testbed.tools import HELM_KUBE_VERSION, helm, tool

pytestmark = pytest.mark.unit

SCHEMA_LOCATION = (
    "{{ .NormalizedKubernetesVersion }}-standalone{{ .StrictSuffix }}/"
    "{{ .ResourceKind }}{{ .KindSuffix }}.json"
)


@pytest.mark.parametrize("binary", ["helm3", "helm4"])
@pytest.mark.parametrize("values", VALUES_CASES, ids=case_id)
def test_helm_lint_strict(binary: str, values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART), "--kube-version", HELM_KUBE_VERSION]
    if values is not None:
        args += ["-f", str(values)]
    result = helm(*args, binary=binary, check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@functools.cache
def _rendered(values: Path | None) -> tuple[dict[str, Any], ...]:
    return tuple(render([values]))


@pytest.mark.parametrize("kube_version", VALIDATED_KUBE_VERSIONS)
def test_kubeconform_strict(kube_version: str, tmp_path: Path) -> None:
    """Defaults, values.example.yaml and every scenario, in one kubeconform run per version."""
    kubeconform = tool("kubeconform")  # its set-up stage also writes the schemas
    schema_dir = KUBE_SCHEMAS / f"v{kube_version}-standalone-strict"
    assert schema_dir.is_dir(), f"{schema_dir} missing: run ci/setup (ci/lib/kube_schemas.py)"
    manifests, expected_valid, expected_skipped = [], 0, 0
    for values in VALUES_CASES:
        docs = _rendered(values)
        jobs = scaler_jobs(list(docs))
        manifest = tmp_path / f"{case_id(values)}.rendered.yaml"
        manifest.write_text(yaml.safe_dump_all([*docs, *jobs]))
        manifests.append(str(manifest))
        skipped = sum(1 for d in docs if d["kind"] in OPERATOR_KINDS)
        expected_skipped += skipped
        expected_valid += len(docs) + len(jobs) - skipped
    result = subprocess.run(
        [
            kubeconform,
            "-strict",
            "-summary",
            "-output",
            "json",
            "-kubernetes-version",
            kube_version,
            "-schema-location",
            f"{KUBE_SCHEMAS}/{SCHEMA_LOCATION}",
            "-skip",
            ",".join(OPERATOR_KINDS),
            *manifests,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)["summary"]
    assert summary["invalid"] == summary["errors"] == 0
    assert summary["skipped"] == expected_skipped
    assert summary["valid"] == expected_valid


def test_scenarios_cover_the_documented_cases() -> None:
    assert {p.name for p in SCENARIOS} == {
        f"{n}-values.yaml"
        for n in ("external-broker", "two-pipelines", "node-pool", "existing-secrets",
                  "replicas-2", "minimal", "ha-broker")
    }  # fmt: skip


# Objects whose own properties only add the chart's rules to a closed Kubernetes shape (the
# pod spec under podTemplate, see test_chart_schema.py), label maps whose properties are the
# keys refused (any other label is allowed), and the condition that picks out the worker
# container among podTemplate's containers.
PASS_THROUGH = {
    "/definitions/podTemplate/properties/spec",
    "/definitions/userLabels",
    "/definitions/podTemplateContainer/allOf/1/if",
    "/definitions/podTemplateContainer/allOf/1/then",
}


def test_schema_closes_every_object_it_describes() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                open_objects.append(where)
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}/{index}")

    walk(schema, "")
    assert set(open_objects) == PASS_THROUGH
