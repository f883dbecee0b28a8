"""Each contract has one definition; what is generated from it is current, and the one parser
of the broker environment accepts and rejects the same values for every program."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from jobtide_scaler import contracts
from jobtide_worker.config import BrokerConfig, ConfigError, WorkerConfig
from jobtide_worker.pipeline_settings import PipelineSettings, SettingsError, read_settings

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
BROKER_ENV = {
    "JOBTIDE_BROKER_HOST": "rabbit",
    "JOBTIDE_BROKER_USERNAME": "jobtide",
    "JOBTIDE_BROKER_PASSWORD": "hunter2-secret",
}


@pytest.mark.parametrize("path", sorted(contracts.GENERATORS))
def test_generated_file_is_current(path: str) -> None:
    expected = contracts.expected_files(REPO)[path]
    assert (REPO / path).read_text() == expected, f"{path} is stale: run `{contracts.COMMAND}`"


def copy_generated_files(to: Path) -> None:
    """The generated files and the other sources some are made from."""
    for path in [*contracts.GENERATORS, contracts.CHART_CHANGELOG, contracts.SCALER_PROJECT]:
        (to / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / path, to / path)


def test_a_stale_file_is_found_and_rewritten(tmp_path: Path) -> None:
    copy_generated_files(tmp_path)
    values = tmp_path / contracts.CHART_VALUES
    values.write_text(values.read_text().replace("  maxWorkers: 20\n", "  maxWorkers: 7\n"))
    (tmp_path / contracts.CHART_TOPOLOGY).unlink()
    assert contracts.stale_files(tmp_path) == [contracts.CHART_VALUES, contracts.CHART_TOPOLOGY]
    assert contracts.main(["--check", "--repo", str(tmp_path)]) == 1
    assert contracts.main(["--write", "--repo", str(tmp_path)]) == 0
    assert contracts.stale_files(tmp_path) == []
    assert values.read_text() == (REPO / contracts.CHART_VALUES).read_text()


def test_a_stale_list_of_variable_names_is_found_and_rewritten(tmp_path: Path) -> None:
    copy_generated_files(tmp_path)
    generated = tmp_path / contracts.CHART_ENV_NAMES
    current = generated.read_text()
    # A name changed by hand (or in Variable without regenerating).
    generated.write_text(current.replace("}}JOBTIDE_BROKER_HOST{{", "}}JOBTIDE_HOST{{"))
    assert contracts.stale_files(tmp_path) == [contracts.CHART_ENV_NAMES]
    assert contracts.main(["--check", "--repo", str(tmp_path)]) == 1
    assert contracts.main(["--write", "--repo", str(tmp_path)]) == 0
    assert generated.read_text() == current


def test_the_chart_names_jobtides_variables_by_their_generated_templates() -> None:
    """Every variable of `Variable` has its template, and the chart's templates spell none of
    those names themselves (the helm test pod's script reads two of its own variables, named
    in the same file)."""
    names = contracts.variable_names()
    assert names
    assert all(name.startswith("JOBTIDE_") for name in names.values())
    generated = (REPO / contracts.CHART_ENV_NAMES).read_text()
    for attribute, name in names.items():
        assert f'{{{{- define "jobtide.env.{attribute}" -}}}}{name}{{{{- end }}}}' in generated
    templates = REPO / contracts.CHART_ENV_NAMES.rsplit("/", 1)[0]
    for template in sorted(templates.glob("*.*")):
        if template.name != Path(contracts.CHART_ENV_NAMES).name:
            spelled = set(re.findall(r"JOBTIDE_[A-Z_]+", template.read_text()))
            assert not spelled & set(names.values()), template.name


def test_chart_annotations_follow_the_changelog_and_the_image_defaults(tmp_path: Path) -> None:
    for path in [contracts.CHART_METADATA, contracts.CHART_VALUES, contracts.CHART_CHANGELOG,
                 contracts.SCALER_PROJECT]:  # fmt: skip
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / path, tmp_path / path)
    changelog = tmp_path / contracts.CHART_CHANGELOG
    chart = tmp_path / contracts.CHART_METADATA
    version = yaml.safe_load(chart.read_text())["version"]
    changelog.write_text(
        changelog.read_text().replace(
            f"## {version}\n", f"## {version}\n\n### Fixed\n- A fix first.\n", 1
        )
    )
    values = tmp_path / contracts.CHART_VALUES
    values.write_text(values.read_text().replace('tag: "4.3"', 'tag: "4.2"', 1))
    chart.write_text(contracts.chart_metadata(chart.read_text(), tmp_path))
    annotations = yaml.safe_load(chart.read_text())["annotations"]
    changes = yaml.safe_load(annotations["artifacthub.io/changes"])
    assert changes[0] == {"kind": "fixed", "description": "A fix first."}
    assert {"name": "rabbitmq", "image": "rabbitmq:4.2"} in yaml.safe_load(
        annotations["artifacthub.io/images"]
    )
    # Everything above the annotations stays as written.
    assert (
        chart.read_text().split("annotations:")[0]
        == ((REPO / contracts.CHART_METADATA).read_text().split("annotations:")[0])
    )


@pytest.mark.parametrize(
    ("changelog", "problem"),
    [
        ("## 1.0.0\n### Added\n- a\n", "no entry for the chart's version 2.0.0"),
        ("## 2.0.0\n\n## 1.0.0\n### Added\n- a\n", "no entry for the chart's version 2.0.0"),
        ("## 2.0.0\n### Improved\n- a\n", "unknown kind of change 'Improved'"),
        ("## 2.0.0\n- a\n", "a change of 2.0.0 under no kind"),
    ],
)
def test_a_changelog_without_a_proper_entry_is_refused(changelog: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        contracts.changelog_entry(changelog, "2.0.0")


def test_values_whose_settings_are_split_up_are_refused() -> None:
    text = (REPO / contracts.CHART_VALUES).read_text()
    moved = text.replace("  maxAttempts: 3\n", "").replace(
        "\n  env: []", "\n  env: []\n  maxAttempts: 3"
    )
    with pytest.raises(ValueError, match="must stand together"):
        contracts.chart_values(moved)


def test_setting_errors_name_the_key() -> None:
    with pytest.raises(SettingsError) as raised:
        read_settings(
            PipelineSettings, {"maxWorkers": -1, "idleTimeoutSeconds": 0, "maxAttempts": True}
        )
    assert sorted(p.split(":")[0] for p in raised.value.problems) == [
        "idleTimeoutSeconds",
        "maxAttempts",
        "maxWorkers",
    ]
    with pytest.raises(SettingsError, match=r"^minWorkers: must not exceed maxWorkers"):
        PipelineSettings(min_workers=3, max_workers=2)
    # Keys that are not settings (the queue, the worker's pod) are the caller's to check.
    assert read_settings(PipelineSettings, {"maxWorkers": 1, "queue": "q"}).max_workers == 1


def test_a_workers_pipeline_variables_have_the_settings_bounds() -> None:
    base = {**BROKER_ENV, "JOBTIDE_QUEUE": "q"}
    assert (
        WorkerConfig.from_env(base).idle_timeout_seconds == PipelineSettings().idle_timeout_seconds
    )
    with pytest.raises(ConfigError) as raised:
        WorkerConfig.from_env({**base, "JOBTIDE_IDLE_TIMEOUT_SECONDS": "0"})
    assert raised.value.variable == "JOBTIDE_IDLE_TIMEOUT_SECONDS"


@pytest.mark.parametrize(
    ("value", "tls"),
    [
        ("", False),
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("Off", False),
    ],
)
def test_tls_spellings_accepted(value: str, tls: bool) -> None:
    broker = BrokerConfig.from_env({**BROKER_ENV, "JOBTIDE_BROKER_TLS": value})
    assert broker.tls is tls
    assert broker.management_url == f"{'https' if tls else 'http'}://rabbit:15672"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("JOBTIDE_BROKER_TLS", "maybe"),
        ("JOBTIDE_BROKER_TLS", "2"),
        ("JOBTIDE_BROKER_PORT", "amqp"),
        ("JOBTIDE_BROKER_PORT", "0"),
        ("JOBTIDE_BROKER_PORT", "65536"),
        ("JOBTIDE_BROKER_MANAGEMENT_PORT", "-1"),
        ("JOBTIDE_BROKER_HOST", " "),
        ("JOBTIDE_BROKER_HOST", "amqp://rabbit.example.com:5672"),
        ("JOBTIDE_BROKER_HOST", "rabbit.example.com:5672"),
        ("JOBTIDE_BROKER_USERNAME", ""),
        ("JOBTIDE_BROKER_PASSWORD", ""),
        ("JOBTIDE_BROKER_PASSWORD_FILE", "/nonexistent/password"),
    ],
)
def test_bad_broker_variables_are_named(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        BrokerConfig.from_env({**BROKER_ENV, variable: value})
    assert raised.value.variable == variable
    assert raised.value.problems == [str(raised.value)]
    assert str(raised.value).startswith(f"{variable}:")
    assert "hunter2-secret" not in str(raised.value)


def test_every_bad_broker_variable_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as raised:
        BrokerConfig.from_env({"JOBTIDE_BROKER_TLS": "maybe", "JOBTIDE_BROKER_PORT": "x"})
    variables = [p.split(":")[0] for p in raised.value.problems]
    assert variables == [
        "JOBTIDE_BROKER_HOST",
        "JOBTIDE_BROKER_PORT",
        "JOBTIDE_BROKER_USERNAME",
        "JOBTIDE_BROKER_PASSWORD",
        "JOBTIDE_BROKER_TLS",
    ]


def test_one_set_of_connection_parameters() -> None:
    broker = BrokerConfig.from_env({**BROKER_ENV, "JOBTIDE_BROKER_TLS": "true"})
    worker = broker.connection_parameters("worker")
    scaler = broker.connection_parameters("scaler", heartbeat_seconds=0, socket_timeout=3)
    assert (worker.host, worker.port, worker.heartbeat) == ("rabbit", 5672, 30)
    assert (scaler.heartbeat, scaler.socket_timeout) == (0, 3)
    assert worker.ssl_options is not None
    assert scaler.ssl_options is not None
    assert worker.credentials.password == BROKER_ENV["JOBTIDE_BROKER_PASSWORD"]
