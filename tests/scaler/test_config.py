"""The configuration file and the broker environment: validation names the field, defaults
come from the schema, secrets stay out of the log view."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import BROKER_ENV, config_document, pipeline_document
from jobtide_scaler.config import ConfigError, build_config, load_config

pytestmark = pytest.mark.unit


def problems_of(document: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        build_config(document, BROKER_ENV if env is None else env)
    return raised.value.problems


def test_defaults_come_from_the_settings_and_the_schema() -> None:
    config = build_config(config_document(), BROKER_ENV)
    assert config.namespace == "jobs"
    assert config.settings.broker_stale_after_seconds == 30
    assert config.settings.max_total_workers == 100
    assert config.leader_election.lease_name == "rel-jobtide-scaler"
    assert config.leader_election.enabled is True
    assert config.metrics_port == 8080
    (pipeline,) = config.pipelines
    assert pipeline.name == "resize"
    assert pipeline.queue == "resize-q"
    assert pipeline.settings.max_workers == 20
    assert pipeline.settings.messages_per_worker == 1
    assert pipeline.settings.failed_jobs_history_limit == 5
    assert pipeline.settings.ttl_seconds_after_finished == 300
    assert config.broker.port == 5672
    assert config.broker.management_port == 15672
    assert config.broker.vhost == "/"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"pollIntervalSeconds": 0}, "pollIntervalSeconds"),
        ({"maxTotalWorkers": -1}, "maxTotalWorkers"),
        ({"release": "Bad_Name"}, "release"),
        ({"pollIntervalSecs": 5}, "pollIntervalSecs"),
        ({"leaderElection": {"leaseDurationSeconds": "15"}}, "leaderElection.leaseDurationSeconds"),
        ({"metrics": {"port": 70000}}, "metrics.port"),
        (
            {"pipelines": {"resize": pipeline_document("q", maxWorkers=-2)}},
            "pipelines.resize.maxWorkers",
        ),
        (
            {"pipelines": {"resize": pipeline_document("q", messagesPerWorker=0)}},
            "pipelines.resize.messagesPerWorker",
        ),
        (
            {"pipelines": {"resize": pipeline_document("q", maxWorker=3)}},
            "pipelines.resize.maxWorker",
        ),
        ({"pipelines": {"Resize_Images": pipeline_document("q")}}, "pipelines.Resize_Images"),
        ({"pipelines": {"x" * 41: pipeline_document("q")}}, "pipelines." + "x" * 41),
        ({"pipelines": {"resize": {"jobTemplate": {"spec": {}}}}}, "pipelines.resize.queue"),
        (
            {"pipelines": {"resize": {"queue": "q", "jobTemplate": {"spec": {}}}}},
            "pipelines.resize.jobTemplate.spec.template",
        ),
        (
            {"pipelines": {"resize": pipeline_document("q", minWorkers=5, maxWorkers=2)}},
            "pipelines.resize.minWorkers",
        ),
        (
            {"leaderElection": {"leaseDurationSeconds": 10, "renewDeadlineSeconds": 10}},
            "leaderElection.renewDeadlineSeconds",
        ),
        (
            {"release": "r" * 30, "pipelines": {"p" * 30: pipeline_document("q")}},
            "pipelines." + "p" * 30,
        ),
    ],
)
def test_each_error_names_its_field(change: dict[str, Any], field: str) -> None:
    problems = problems_of(config_document(**change))
    assert any(p.startswith(f"{field}:") for p in problems), problems


def test_missing_release_and_container_image_are_named() -> None:
    document = config_document()
    del document["release"]
    containers = document["pipelines"]["resize"]["jobTemplate"]["spec"]["template"]["spec"][
        "containers"
    ]
    del containers[0]["image"]
    problems = problems_of(document)
    assert "release: required field is missing" in problems
    assert (
        "pipelines.resize.jobTemplate.spec.template.spec.containers.0.image: "
        "required field is missing" in problems
    )


def test_every_problem_is_reported_at_once() -> None:
    problems = problems_of(config_document(maxTotalWorkers=-1, pollIntervalSeconds=0), env={})
    fields = {p.split(":", 1)[0] for p in problems}
    assert {
        "maxTotalWorkers",
        "pollIntervalSeconds",
        "JOBTIDE_BROKER_HOST",
        "JOBTIDE_BROKER_USERNAME",
        "JOBTIDE_BROKER_PASSWORD",
    } <= fields


@pytest.mark.parametrize(
    ("env_change", "variable"),
    [
        ({"JOBTIDE_BROKER_PORT": "amqp"}, "JOBTIDE_BROKER_PORT"),
        ({"JOBTIDE_BROKER_MANAGEMENT_PORT": "0"}, "JOBTIDE_BROKER_MANAGEMENT_PORT"),
        ({"JOBTIDE_BROKER_TLS": "maybe"}, "JOBTIDE_BROKER_TLS"),
        ({"JOBTIDE_BROKER_PASSWORD_FILE": "/nonexistent/password"}, "JOBTIDE_BROKER_PASSWORD_FILE"),
    ],
)
def test_environment_errors_name_the_variable(env_change: dict[str, str], variable: str) -> None:
    problems = problems_of(config_document(), env={**BROKER_ENV, **env_change})
    assert any(p.startswith(f"{variable}:") for p in problems), problems


def test_credentials_from_files(tmp_path: Path) -> None:
    (tmp_path / "user").write_text("from-file\n")
    (tmp_path / "pass").write_text("file-password\n")
    env = {
        "JOBTIDE_BROKER_HOST": "rabbit",
        "JOBTIDE_BROKER_USERNAME_FILE": str(tmp_path / "user"),
        "JOBTIDE_BROKER_PASSWORD_FILE": str(tmp_path / "pass"),
        # The worker's spelling: one parser of the broker variables for both programs.
        "JOBTIDE_BROKER_TLS": "yes",
        "JOBTIDE_BROKER_VHOST": "pipelines",
    }
    broker = build_config(config_document(), env).broker
    assert (broker.username, broker.password) == ("from-file", "file-password")
    assert broker.management_url == "https://rabbit:15672"
    assert broker.vhost == "pipelines"


def test_redacted_view_and_repr_hide_the_credentials() -> None:
    config = build_config(config_document(), BROKER_ENV)
    text = json.dumps(config.redacted()) + repr(config)
    assert "s3cret-password" not in text
    assert "scaler" not in json.dumps(config.redacted()["broker"])
    view = config.redacted()
    assert view["broker"]["host"] == "127.0.0.1"
    # The rest is all there, the Job template as an object.
    assert view["pipelines"][0]["job_template"]["metadata"]["labels"] == {"team": "imaging"}


def test_namespace_defaults_to_the_scalers_own() -> None:
    document = config_document()
    del document["namespace"]
    config = build_config(document, BROKER_ENV, own_namespace="scaler-ns")
    assert config.namespace == "scaler-ns"


def test_load_config_reads_yaml_and_reports_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("release: rel\nnamespace: jobs\npipelines: {}\n")
    assert load_config(path, BROKER_ENV).release == "rel"
    path.write_text("release: [unclosed\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, BROKER_ENV)
    assert raised.value.problems[0].startswith("--config:")
