"""The chart's Grafana dashboard and PrometheusRule: off by default (no CRD needed), every query
names only metrics the scaler really exports, and the rules pass Prometheus' own `promtool
check rules` and the alert unit tests in promtool/alerts.test.yaml (`promtool test rules`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartlib import find, render
from jobtide_scaler.metrics import Metrics
from jobtide_testbed.tools import CHART, tool

pytestmark = pytest.mark.unit

HERE = Path(__file__).resolve().parent
ALERT_TESTS = HERE / "promtool" / "alerts.test.yaml"
DASHBOARD_FILE = CHART / "files" / "grafana-dashboard.json"
ONE_PIPELINE = ["pipelines.resize.queue=resize"]
DASHBOARD_ON = [*ONE_PIPELINE, "scaler.metrics.grafanaDashboard.enabled=true"]
RULE_ON = [*ONE_PIPELINE, "scaler.metrics.prometheusRule.enabled=true"]
# What the sample names of each metric type are in the exposition format.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
}
METRIC_NAME = re.compile(r"\bjobtide_[a-z0-9_]+\b")


def exported_names() -> set[str]:
    """The sample names the scaler's registry exposes on /metrics."""
    names = set()
    for family in Metrics().registry.collect():
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    queries += [
        variable["query"]["query"]
        for variable in dashboard["templating"]["list"]
        if variable["type"] == "query"
    ]
    return queries


def rule_document(set_values: list[str]) -> dict[str, Any]:
    return find(render(set_values=set_values), "PrometheusRule", "-scaler")


def test_off_by_default_so_the_default_install_needs_no_crd() -> None:
    docs = render(set_values=ONE_PIPELINE)
    assert not [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert not [d for d in docs if d["metadata"]["name"].endswith("-dashboard")]
    # The dashboard alone adds one plain ConfigMap.
    before = {(d["apiVersion"], d["kind"], d["metadata"]["name"]) for d in docs}
    after = {
        (d["apiVersion"], d["kind"], d["metadata"]["name"]) for d in render(set_values=DASHBOARD_ON)
    }
    assert after - before == {("v1", "ConfigMap", "jobs-jobtide-scaler-dashboard")}


def test_the_dashboard_configmap_carries_the_sidecars_label_and_the_file() -> None:
    docs = render(set_values=DASHBOARD_ON)
    config_map = find(docs, "ConfigMap", "-scaler-dashboard")
    assert config_map["metadata"]["namespace"] == "pipelines"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert "annotations" not in config_map["metadata"]
    [(key, text)] = config_map["data"].items()
    assert key.endswith(".json")
    assert json.loads(text) == json.loads(DASHBOARD_FILE.read_text())

    elsewhere = render(
        set_values=[
            *DASHBOARD_ON,
            "scaler.metrics.grafanaDashboard.namespace=monitoring",
            "scaler.metrics.grafanaDashboard.annotations.grafana_folder=Pipelines",
        ]
    )
    moved = find(elsewhere, "ConfigMap", "-scaler-dashboard")
    assert moved["metadata"]["namespace"] == "monitoring"
    assert moved["metadata"]["annotations"] == {"grafana_folder": "Pipelines"}


def test_every_dashboard_query_names_only_metrics_the_scaler_exports() -> None:
    exported = exported_names()
    queries = dashboard_queries(json.loads(DASHBOARD_FILE.read_text()))
    assert len(queries) >= 10
    for query in queries:
        named = set(METRIC_NAME.findall(query))
        assert named, f"a query without a jobtide metric: {query}"
        assert named <= exported, f"not exported by the scaler: {named - exported} in {query}"


def test_the_dashboard_shows_every_metric_a_pipeline_is_watched_by() -> None:
    queried = {
        name
        for query in dashboard_queries(json.loads(DASHBOARD_FILE.read_text()))
        for name in METRIC_NAME.findall(query)
    }
    # The list: queue, oldest message, dead letters, workers against caps, Jobs
    # created and failed, decisions, errors, cycle time, leader.
    assert {
        "jobtide_queue_messages_ready",
        "jobtide_queue_messages_unacked",
        "jobtide_queue_oldest_message_age_seconds",
        "jobtide_dead_letter_messages",
        "jobtide_jobs_active",
        "jobtide_jobs_pending",
        "jobtide_pipeline_max_workers",
        "jobtide_max_total_workers",
        "jobtide_jobs_created_total",
        "jobtide_jobs_failed_total",
        "jobtide_decisions_total",
        "jobtide_errors_total",
        "jobtide_cycle_duration_seconds_bucket",
        "jobtide_leader",
    } <= queried


def test_every_alert_names_only_metrics_the_scaler_exports() -> None:
    exported = exported_names()
    rules = rule_document(RULE_ON)["spec"]["groups"][0]["rules"]
    assert {rule["alert"] for rule in rules} == {
        "JobtideScalerDown",
        "JobtideNoLeader",
        "JobtideBrokerCountsStale",
        "JobtideOldestMessageTooOld",
        "JobtideDeadLetterQueueGrowing",
        "JobtideJobCreationFailing",
        "JobtideWorkerJobsFailing",
        "JobtidePipelineAtCap",
    }
    for rule in rules:
        named = set(METRIC_NAME.findall(rule["expr"]))
        assert named <= exported, f"{rule['alert']}: not exported: {named - exported}"
        assert 'namespace="pipelines", job="jobs-jobtide-scaler"' in rule["expr"]


def test_rule_values_reach_the_rules() -> None:
    document = rule_document(
        [
            *RULE_ON,
            "scaler.metrics.prometheusRule.labels.release=prometheus",
            "scaler.metrics.prometheusRule.alertLabels.team=data",
            "scaler.metrics.prometheusRule.oldestMessageAgeSeconds=60",
            "scaler.metrics.prometheusRule.atCapFor=2h",
        ]
    )
    assert document["metadata"]["labels"]["release"] == "prometheus"
    rules = {rule["alert"]: rule for rule in document["spec"]["groups"][0]["rules"]}
    assert rules["JobtideOldestMessageTooOld"]["expr"].endswith("> 60")
    assert rules["JobtidePipelineAtCap"]["for"] == "2h"
    assert {rule["labels"]["team"] for rule in rules.values()} == {"data"}
    assert rules["JobtideScalerDown"]["labels"]["severity"] == "critical"


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def rule_files(tmp_path: Path) -> Path:
    """The rendered rules as a Prometheus rule file, beside the alert unit tests."""
    spec = rule_document(RULE_ON)["spec"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    return tmp_path


def test_promtool_checks_the_rendered_rules(rule_files: Path) -> None:
    result = promtool("check", "rules", "rules.yaml", cwd=rule_files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout


def test_the_alerts_pass_their_unit_tests(rule_files: Path) -> None:
    result = promtool("test", "rules", ALERT_TESTS.name, cwd=rule_files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# Grafana's variables in the panels' queries, as Grafana would fill them in.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$namespace": "pipelines",
    "$job": "jobs-jobtide-scaler",
    "$pipeline": "resize|thumbs",
}


def test_every_dashboard_panel_query_is_valid_promql(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable, value in GRAFANA_VARIABLES.items():
        queries = [q.replace(variable, value) for q in queries]
    assert not [q for q in queries if "$" in q]
    # promtool parses each one as a recording rule's expression.
    rules = [{"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(queries)]
    (tmp_path / "dashboard.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    result = promtool("check", "rules", "dashboard.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_the_alert_unit_tests_fail_on_a_rule_that_no_longer_fires(rule_files: Path) -> None:
    rules = rule_files / "rules.yaml"
    rules.write_text(rules.read_text().replace("> 900", "> 90000"))
    result = promtool("test", "rules", ALERT_TESTS.name, cwd=rule_files)
    assert result.returncode == 1
    assert "JobtideOldestMessageTooOld" in result.stdout + result.stderr
