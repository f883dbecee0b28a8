"""The scaler's one configuration object: the configuration file (validated against
config.schema.json) plus the broker's address and credentials from the environment. Both are
described in docs/architecture.md."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from jobtide_scaler.policy import PipelinePolicy

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
class BrokerSettings:
    host: str
    port: int
    management_port: int
    vhost: str
    username: str
    password: str = field(repr=False)
    tls: bool

    @property
    def management_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.management_port}"


@dataclass(frozen=True)
class LeaderElectionSettings:
    enabled: bool
    lease_name: str
    lease_duration_seconds: float
    renew_deadline_seconds: float
    retry_period_seconds: float


@dataclass(frozen=True)
class PipelineSettings:
    name: str
    queue: str
    policy: PipelinePolicy
    idle_timeout_seconds: float
    max_attempts: int
    max_task_seconds: float
    backoff_limit: int
    ttl_seconds_after_finished: int
    failed_jobs_history_limit: int
    # Kept as JSON text so the configuration stays immutable; jobs.build_job parses a copy.
    job_template_json: str


@dataclass(frozen=True)
class ScalerConfig:
    namespace: str
    release: str
    poll_interval_seconds: float
    broker_stale_after_seconds: float
    max_total_workers: int
    leader_election: LeaderElectionSettings
    metrics_port: int
    pipelines: tuple[PipelineSettings, ...]
    broker: BrokerSettings
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
    """The `default` of each property of the object at `pointer`, following one $ref."""
    node: Mapping[str, Any] = schema
    for part in pointer:
        node = node[part]
    result = {}
    for key, prop in node.get("properties", {}).items():
        if "default" in prop:
            result[key] = prop["default"]
    return result


def _cross_field_problems(document: Mapping[str, Any], release: str) -> list[str]:
    problems = []
    election = document.get("leaderElection", {})
    lease = election.get("leaseDurationSeconds", 15)
    renew = election.get("renewDeadlineSeconds", 10)
    retry = election.get("retryPeriodSeconds", 2)
    if not renew < lease:
        problems.append(
            "leaderElection.renewDeadlineSeconds: must be less than leaseDurationSeconds, "
            "or a stalled leader could still act after another took over"
        )
    if not retry < renew:
        problems.append("leaderElection.retryPeriodSeconds: must be less than renewDeadlineSeconds")
    for name, pipeline in document.get("pipelines", {}).items():
        if pipeline.get("minWorkers", 0) > pipeline.get("maxWorkers", 20):
            problems.append(f"pipelines.{name}.minWorkers: greater than maxWorkers")
        generated_length = len(release) + 1 + len(name) + 1 + _GENERATED_SUFFIX
        if generated_length > _MAX_JOB_NAME:
            problems.append(
                f"pipelines.{name}: release and pipeline name too long for Job names "
                f"({generated_length} > {_MAX_JOB_NAME} characters)"
            )
    return problems


def _env_value(env: Mapping[str, str], name: str, problems: list[str]) -> str | None:
    """`name` from the environment or from the file named by `name_FILE`."""
    file_name = env.get(f"{name}_FILE")
    if file_name:
        try:
            return Path(file_name).read_text().strip()
        except OSError as e:
            problems.append(f"{name}_FILE: cannot read {file_name}: {e.strerror}")
            return None
    return env.get(name)


def _env_int(env: Mapping[str, str], name: str, default: int, problems: list[str]) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        problems.append(f"{name}: not an integer: {raw!r}")
        return default
    if not 0 < value < 65536:
        problems.append(f"{name}: not a port number: {value}")
    return value


def broker_from_env(env: Mapping[str, str]) -> tuple[BrokerSettings | None, list[str]]:
    problems: list[str] = []
    host = env.get("JOBTIDE_BROKER_HOST", "")
    if not host:
        problems.append("JOBTIDE_BROKER_HOST: required")
    username = _env_value(env, "JOBTIDE_BROKER_USERNAME", problems)
    password = _env_value(env, "JOBTIDE_BROKER_PASSWORD", problems)
    if not username:
        problems.append("JOBTIDE_BROKER_USERNAME: required (or JOBTIDE_BROKER_USERNAME_FILE)")
    if not password:
        problems.append("JOBTIDE_BROKER_PASSWORD: required (or JOBTIDE_BROKER_PASSWORD_FILE)")
    tls_raw = env.get("JOBTIDE_BROKER_TLS", "false").strip().lower()
    if tls_raw not in ("true", "false"):
        problems.append(f"JOBTIDE_BROKER_TLS: must be true or false, not {tls_raw!r}")
    port = _env_int(env, "JOBTIDE_BROKER_PORT", 5672, problems)
    management_port = _env_int(env, "JOBTIDE_BROKER_MANAGEMENT_PORT", 15672, problems)
    if problems:
        return None, problems
    return (
        BrokerSettings(
            host=host,
            port=port,
            management_port=management_port,
            vhost=env.get("JOBTIDE_BROKER_VHOST") or "/",
            username=username or "",
            password=password or "",
            tls=tls_raw == "true",
        ),
        [],
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
    if not problems:
        problems += _cross_field_problems(document, document["release"])
    broker, broker_problems = broker_from_env(env)
    problems += broker_problems
    namespace = None
    if isinstance(document, dict):
        namespace = document.get("namespace") or own_namespace or _own_namespace()
        if not namespace:
            problems.append("namespace: not set and the scaler's own namespace is unknown")
    if problems or broker is None or namespace is None:
        raise ConfigError(problems)

    top = {**_defaults(schema), **document}
    election = {
        **_defaults(schema, "properties", "leaderElection"),
        **top.get("leaderElection", {}),
    }
    metrics = {**_defaults(schema, "properties", "metrics"), **top.get("metrics", {})}
    pipeline_defaults = _defaults(schema, "$defs", "pipeline")
    pipelines = []
    for name, raw in sorted(top["pipelines"].items()):
        p = {**pipeline_defaults, **raw}
        pipelines.append(
            PipelineSettings(
                name=name,
                queue=p["queue"],
                policy=PipelinePolicy(
                    messages_per_worker=p["messagesPerWorker"],
                    min_workers=p["minWorkers"],
                    max_workers=p["maxWorkers"],
                    max_new_per_cycle=p["maxNewPerCycle"],
                    activation_messages=p["activationMessages"],
                ),
                idle_timeout_seconds=p["idleTimeoutSeconds"],
                max_attempts=p["maxAttempts"],
                max_task_seconds=p["maxTaskSeconds"],
                backoff_limit=p["backoffLimit"],
                ttl_seconds_after_finished=p["ttlSecondsAfterFinished"],
                failed_jobs_history_limit=p["failedJobsHistoryLimit"],
                job_template_json=json.dumps(copy.deepcopy(p["jobTemplate"]), sort_keys=True),
            )
        )
    release = top["release"]
    return ScalerConfig(
        namespace=namespace,
        release=release,
        poll_interval_seconds=top["pollIntervalSeconds"],
        broker_stale_after_seconds=top["brokerStaleAfterSeconds"],
        max_total_workers=top["maxTotalWorkers"],
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
