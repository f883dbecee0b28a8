"""The scaler's one configuration object: the configuration file (validated against
config.schema.json) plus the broker's address and credentials from the environment. Both are
described in docs/architecture.md. The settings come from their single definitions
(`jobtide_worker.pipeline_settings`, `jobtide_scaler.settings`), the broker from the one
parser of `JOBTIDE_BROKER_*` (`jobtide_worker.config.BrokerConfig`)."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from jobtide_worker.config import BrokerConfig
from jobtide_worker.config import ConfigError as BrokerEnvironmentError
from jobtide_worker.pipeline_settings import PipelineSettings, SettingsError, read_settings

from jobtide_scaler.settings import ScalerSettings

SERVICE_ACCOUNT_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
REDACTED = "<redacted>"
# Job names end in 5 random characters from generateName and must stay a DNS label (63), as
# the Job controller copies the name into the pods' job-name label.
_MAX_JOB_NAME = 63
_GENERATED_SUFFIX = 5


class ConfigError(Exception):
    """The configuration is invalid; `problems` each start with the field they are about."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class LeaderElectionSettings:
    enabled: bool
    lease_name: str
    lease_duration_seconds: float
    renew_deadline_seconds: float
    retry_period_seconds: float


@dataclass(frozen=True)
class PipelineConfig:
    name: str
    queue: str
    settings: PipelineSettings
    # Kept as JSON text so the configuration stays immutable; jobs.build_job parses a copy.
    job_template_json: str


@dataclass(frozen=True)
class ScalerConfig:
    namespace: str
    release: str
    settings: ScalerSettings
    leader_election: LeaderElectionSettings
    metrics_port: int
    pipelines: tuple[PipelineConfig, ...]
    broker: BrokerConfig
    # The Deployment whose deletion deletes the worker Jobs (jobs.build_job's owner); None
    # when the scaler runs outside the chart.
    owner_deployment: str | None = None
    # The ConfigMap the leader writes its status figures into (status.py); None: none.
    status_config_map: str | None = None
    dry_run: bool = False
    once: bool = False

    def redacted(self) -> dict[str, Any]:
        """Everything, for the start-up log line, with the credentials replaced."""
        view = asdict(self)
        view["broker"]["username"] = REDACTED
        view["broker"]["password"] = REDACTED
        for pipeline in view["pipelines"]:
            pipeline["job_template"] = json.loads(pipeline.pop("job_template_json"))
        return view


def load_schema() -> dict[str, Any]:
    text = resources.files("jobtide_scaler").joinpath("config.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def _field_path(path: Any) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def schema_problems(document: Any, schema: Mapping[str, Any] | None = None) -> list[str]:
    """Every schema violation of `document`, each prefixed with the dotted field path."""
    validator = jsonschema.Draft202012Validator(schema or load_schema())
    problems = []
    for error in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path)):
        path = list(error.absolute_path)
        if error.validator == "required":
            # The message names the missing key; so should the path.
            missing = [k for k in error.validator_value if k not in (error.instance or {})]
            for key in missing:
                problems.append(f"{_field_path([*path, key])}: required field is missing")
            continue
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            allowed = set(error.schema.get("properties", {}))
            for key in sorted(set(error.instance) - allowed):
                problems.append(f"{_field_path([*path, key])}: unknown field")
            continue
        if "propertyNames" in error.schema_path:
            # The error is about a key (a pipeline name), reported at its parent's path.
            problems.append(
                f"{_field_path([*path, error.instance])}: not a valid name "
                f"(lowercase DNS label of at most 40 characters)"
            )
            continue
        problems.append(f"{_field_path(path)}: {error.message}")
    return list(dict.fromkeys(problems))


def _defaults(schema: Mapping[str, Any], *pointer: str) -> dict[str, Any]:
    """The `default` of each property of the object at `pointer` (the settings' defaults come
    from their dataclasses; the schema's copies of those are generated documentation)."""
    node: Mapping[str, Any] = schema
    for part in pointer:
        node = node[part]
    result = {}
    for key, prop in node.get("properties", {}).items():
        if "default" in prop:
            result[key] = prop["default"]
    return result


def _leader_election_problems(election: Mapping[str, Any]) -> list[str]:
    problems = []
    if not election["renewDeadlineSeconds"] < election["leaseDurationSeconds"]:
        problems.append(
            "leaderElection.renewDeadlineSeconds: must be less than leaseDurationSeconds, "
            "or a stalled leader could still act after another took over"
        )
    if not election["retryPeriodSeconds"] < election["renewDeadlineSeconds"]:
        problems.append("leaderElection.retryPeriodSeconds: must be less than renewDeadlineSeconds")
    return problems


def _job_name_problem(release: str, pipeline: str) -> str | None:
    generated_length = len(release) + 1 + len(pipeline) + 1 + _GENERATED_SUFFIX
    if generated_length > _MAX_JOB_NAME:
        return (
            f"pipelines.{pipeline}: release and pipeline name too long for Job names "
            f"({generated_length} > {_MAX_JOB_NAME} characters)"
        )
    return None


def _read_pipeline(name: str, document: Mapping[str, Any], problems: list[str]) -> PipelineConfig:
    try:
        settings = read_settings(PipelineSettings, document)
    except SettingsError as e:
        problems += [f"pipelines.{name}.{problem}" for problem in e.problems]
        settings = PipelineSettings()
    return PipelineConfig(
        name=name,
        queue=document["queue"],
        settings=settings,
        job_template_json=json.dumps(copy.deepcopy(document["jobTemplate"]), sort_keys=True),
    )


def _own_namespace() -> str | None:
    try:
        return SERVICE_ACCOUNT_NAMESPACE_FILE.read_text().strip() or None
    except OSError:
        return None


def build_config(
    document: Any,
    env: Mapping[str, str],
    *,
    dry_run: bool = False,
    once: bool = False,
    own_namespace: str | None = None,
) -> ScalerConfig:
    """Validate the parsed file and the environment together and report every problem."""
    schema = load_schema()
    problems = schema_problems(document, schema)
    try:
        broker: BrokerConfig | None = BrokerConfig.from_env(env)
    except BrokerEnvironmentError as e:
        broker = None
        problems += e.problems
    namespace = None
    if isinstance(document, dict):
        namespace = document.get("namespace") or own_namespace or _own_namespace()
        if not namespace:
            problems.append("namespace: not set and the scaler's own namespace is unknown")
    if problems or broker is None or namespace is None:
        raise ConfigError(problems)

    release = document["release"]
    election = {
        **_defaults(schema, "properties", "leaderElection"),
        **document.get("leaderElection", {}),
    }
    problems += _leader_election_problems(election)
    metrics = {**_defaults(schema, "properties", "metrics"), **document.get("metrics", {})}
    pipelines = []
    for name, raw in sorted(document["pipelines"].items()):
        pipelines.append(_read_pipeline(name, raw, problems))
        if (problem := _job_name_problem(release, name)) is not None:
            problems.append(problem)
    try:
        settings = read_settings(ScalerSettings, document)
    except SettingsError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    return ScalerConfig(
        namespace=namespace,
        release=release,
        settings=settings,
        leader_election=LeaderElectionSettings(
            enabled=election["enabled"],
            lease_name=election.get("leaseName") or f"{release}-jobtide-scaler",
            lease_duration_seconds=election["leaseDurationSeconds"],
            renew_deadline_seconds=election["renewDeadlineSeconds"],
            retry_period_seconds=election["retryPeriodSeconds"],
        ),
        metrics_port=metrics["port"],
        pipelines=tuple(pipelines),
        broker=broker,
        owner_deployment=document.get("ownerDeployment"),
        status_config_map=document.get("statusConfigMap"),
        dry_run=dry_run,
        once=once,
    )


def load_config(
    path: Path,
    env: Mapping[str, str] | None = None,
    *,
    dry_run: bool = False,
    once: bool = False,
) -> ScalerConfig:
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError([f"--config: cannot read {path}: {e.strerror}"]) from e
    except yaml.YAMLError as e:
        raise ConfigError([f"--config: {path} is not valid YAML: {e}"]) from e
    return build_config(document, os.environ if env is None else env, dry_run=dry_run, once=once)
