"""kube-score, a widely used manifest linter, with its default checks over every object the
chart renders and every worker Job the scaler builds from it (its own build_job), for each
values file the tests know. Each finding is either fixed in the chart or listed, with its
reason, in the chart's kube-score.yaml: the test fails on a finding that is neither, and on a
listed exception that no finding needs any more."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartlib import VALUES_CASES, case_id, render, scaler_jobs
from jobtide_scaler.jobs import LABEL_COMPONENT
from jobtide_testbed.tools import CHART, HELM_KUBE_VERSION, tool

pytestmark = pytest.mark.unit

EXCEPTIONS_FILE = CHART / "kube-score.yaml"
ONE_PIPELINE = ["pipelines.resize.queue=resize"]
NAMESPACE = "pipelines"
# kube-score's grades (scorecard.Grade): below OK is a finding.
GRADE_OK = 10
# kube-score judges deprecated API versions and some checks by the cluster's version.
KUBE_SCORE_KUBE_VERSION = "v" + ".".join(HELM_KUBE_VERSION.split(".")[:2])


@dataclass(frozen=True)
class Finding:
    check: str
    message: str
    component: str
    where: str  # kind/name (container), for the failure message

    def __str__(self) -> str:
        return f"{self.where}: {self.check}: {self.message}"


def exceptions() -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = yaml.safe_load(EXCEPTIONS_FILE.read_text())["exceptions"]
    return entries


def explains(entry: dict[str, Any], finding: Finding) -> bool:
    return (
        entry["check"] == finding.check
        and finding.message in entry["messages"]
        and finding.component in entry["components"]
    )


def lint_objects(values: Path | None, set_values: list[str]) -> list[dict[str, Any]]:
    """What the chart renders and a Job per pipeline as the scaler would create it, in the
    release's namespace (where the scaler creates them)."""
    docs = render([values], set_values)
    jobs = scaler_jobs(docs)
    for job in jobs:
        metadata = job["metadata"]
        metadata["name"] = metadata.pop("generateName") + "lint"
        metadata["namespace"] = NAMESPACE
    return docs + jobs


def kube_score(objects: list[dict[str, Any]], tmp_path: Path) -> list[dict[str, Any]]:
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump_all(objects))
    argv = [tool("kube-score"), "score", "--kubernetes-version", KUBE_SCORE_KUBE_VERSION]
    result = subprocess.run(
        [*argv, "--output-format", "json", str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    # 1 means it found something critical; anything else is kube-score failing.
    assert result.returncode in (0, 1), result.stderr
    scored: list[dict[str, Any]] = json.loads(result.stdout)
    return scored


def findings(scored: list[dict[str, Any]]) -> list[Finding]:
    found = []
    for scored_object in scored:
        meta = scored_object["object_meta"]
        where = f"{scored_object['type_meta']['kind']}/{meta['name']}"
        component = (meta.get("labels") or {}).get(LABEL_COMPONENT, "")
        for result in scored_object["checks"]:
            if result["skipped"] or result["grade"] >= GRADE_OK:
                continue
            for comment in result["comments"] or [{"path": "", "summary": ""}]:
                container = f" ({comment['path']})" if comment["path"] else ""
                found.append(
                    Finding(result["check"]["id"], comment["summary"], component, where + container)
                )
    return found


@cache
def lint(values: Path | None, set_values: tuple[str, ...] = ()) -> tuple[list[str], list[Finding]]:
    """The kinds kube-score scored and what it found, for `values` (the defaults get a
    pipeline, so that there is a worker Job)."""
    extra = list(set_values) + (ONE_PIPELINE if values is None else [])
    with tempfile.TemporaryDirectory() as tmp:
        scored = kube_score(lint_objects(values, extra), Path(tmp))
    return [s["type_meta"]["kind"] for s in scored], findings(scored)


@pytest.mark.parametrize("values", VALUES_CASES, ids=case_id)
def test_every_finding_is_fixed_or_explained(values: Path | None) -> None:
    kinds, found = lint(values)
    # The worker Jobs are linted, not only what helm renders.
    assert {"Deployment", "Job", "Pod"} <= set(kinds), kinds
    entries = exceptions()
    unexplained = [f for f in found if not any(explains(e, f) for e in entries)]
    print(f"{case_id(values)}: {len(kinds)} objects, {len(found)} findings by check:")
    for check, count in sorted(Counter(f.check for f in found).items()):
        print(f"  {check}: {count}")
    listed = "\n".join(map(str, unexplained))
    assert not unexplained, f"kube-score findings neither fixed nor in kube-score.yaml:\n{listed}"


def test_every_exception_is_still_needed() -> None:
    found = [f for values in VALUES_CASES for f in lint(values)[1]]
    for entry in exceptions():
        assert entry["reason"].strip(), entry
        for message in entry["messages"]:
            for component in entry["components"]:
                needed = [
                    f
                    for f in found
                    if (f.check, f.message, f.component) == (entry["check"], message, component)
                ]
                assert needed, f"nothing needs {entry['check']}: {message!r} for {component}"


def test_the_fixes_are_what_clears_their_findings() -> None:
    """Without the chart's own NetworkPolicies, and with the broker's liveness probe the same as
    its readiness probe, kube-score finds what the chart fixes, and the test above would fail."""
    same_probe = "rabbitmq.livenessProbe.tcpSocket.port=amqp"
    _, found = lint(None, ("networkPolicy.enabled=false", same_probe))
    entries = exceptions()
    unexplained = {
        (f.check, f.message, f.component) for f in found if not any(explains(e, f) for e in entries)
    }
    no_policy = ("pod-networkpolicy", "The pod does not have a matching NetworkPolicy")
    assert {(*no_policy, c) for c in ("scaler", "rabbitmq", "worker", "test")} <= unexplained
    identical = ("pod-probes-identical", "Container has the same readiness and liveness probe")
    assert (*identical, "rabbitmq") in unexplained
