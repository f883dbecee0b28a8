"""Render the chart with the real helm binaries and pick objects out of the output."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import certifi
import yaml
from jobtide_testbed.tools import CACHE, CHART, HELM_KUBE_VERSION, REPO, helm

EXAMPLE_VALUES = REPO / "values.example.yaml"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_SCHEMAS = CACHE / "kube-schemas"
VALIDATED_KUBE_VERSIONS = ("1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0")
# The Prometheus Operator's kinds the chart can render (off by default): the test bed has no
# CRDs and no schema for them; the render and monitoring tests check them instead.
OPERATOR_KINDS = ("ServiceMonitor", "PrometheusRule")
BAD_VALUES = sorted((Path(__file__).parent / "bad-values").glob("*.yaml"))
# Every values file a user might start from: defaults (None), the example, each scenario.
VALUES_CASES: list[Path | None] = [None, EXAMPLE_VALUES, *SCENARIOS]


def expectations(path: Path, install: bool = False) -> list[str]:
    """The `# expect:` lines of a bad-values file (`# expect-install:` ones with `install`)."""
    prefix = "# expect-install: " if install else "# expect: "
    lines = path.read_text().splitlines()
    return [line.removeprefix(prefix) for line in lines if line.startswith(prefix)]


def case_id(values: Path | None) -> str:
    return "defaults" if values is None else values.name


def template_args(
    values: Iterable[Path | None] = (),
    set_values: Iterable[str] = (),
    release: str = "jobs",
    namespace: str = "pipelines",
) -> list[str]:
    args = ["template", release, str(CHART), "--namespace", namespace]
    args += ["--kube-version", HELM_KUBE_VERSION]
    for path in values:
        if path is not None:
            args += ["-f", str(path)]
    for item in set_values:
        args += ["--set", item]
    return args


def render_text(
    values: Iterable[Path | None] = (),
    set_values: Iterable[str] = (),
    release: str = "jobs",
    namespace: str = "pipelines",
    extra: Iterable[str] = (),
) -> str:
    args = template_args(values, set_values, release, namespace) + list(extra)
    return helm(*args, timeout=120).stdout


def render(
    values: Iterable[Path | None] = (),
    set_values: Iterable[str] = (),
    release: str = "jobs",
    namespace: str = "pipelines",
    extra: Iterable[str] = (),
) -> list[dict[str, Any]]:
    text = render_text(values, set_values, release, namespace, extra)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def find(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(matches) == 1, f"expected one {kind} named *{name_suffix}, found {len(matches)}"
    return matches[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def scaler_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    config_map = find(docs, "ConfigMap", "-scaler")
    config: dict[str, Any] = yaml.safe_load(config_map["data"]["config.yaml"])
    return config


def worker_pod_spec(docs: list[dict[str, Any]], pipeline: str) -> dict[str, Any]:
    spec: dict[str, Any] = scaler_config(docs)["pipelines"][pipeline]["jobTemplate"]["spec"]
    return spec["template"]["spec"]  # type: ignore[no-any-return]


def worker_container(docs: list[dict[str, Any]], pipeline: str) -> dict[str, Any]:
    containers = worker_pod_spec(docs, pipeline)["containers"]
    worker: dict[str, Any] = next(c for c in containers if c["name"] == "worker")
    return worker


def scaler_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The scaler container's environment, with stand-ins for the files mounted from Secrets:
    the broker's credentials are files of stand-in text, its CA bundle is certifi's (and
    any variable the user's extraEnv takes from a Secret is stand-in text)."""
    pod = find(docs, "Deployment", "-scaler")["spec"]["template"]["spec"]
    env: dict[str, str] = {}
    for variable in pod["containers"][0]["env"]:
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        else:
            key = variable["valueFrom"]["secretKeyRef"]["key"]
            env[variable["name"]] = f"stand-in-{key}"
    for name in ("JOBTIDE_BROKER_USERNAME_FILE", "JOBTIDE_BROKER_PASSWORD_FILE"):
        if name in env:
            env[name] = str(_stand_in_file(Path(env[name]).name))
    if "JOBTIDE_BROKER_CA_FILE" in env:
        env["JOBTIDE_BROKER_CA_FILE"] = certifi.where()
    return env


def _stand_in_file(key: str) -> Path:
    """A file holding `stand-in-<key>`, in a folder of this test process's own."""
    global _stand_ins
    if _stand_ins is None:
        _stand_ins = tempfile.TemporaryDirectory(prefix="jobtide-chart-stand-ins-")
    path = Path(_stand_ins.name) / key
    path.write_text(f"stand-in-{key}\n")
    return path


_stand_ins: tempfile.TemporaryDirectory[str] | None = None


def scaler_settings(docs: list[dict[str, Any]]) -> Any:
    """The rendered configuration file and environment, loaded by the scaler's own code."""
    from jobtide_scaler.config import build_config

    return build_config(scaler_config(docs), scaler_env(docs))


def scaler_jobs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Job the scaler would create for each pipeline (its own build_job)."""
    from jobtide_scaler.jobs import build_job

    settings = scaler_settings(docs)
    return [build_job(p, settings.release, "chart-test") for p in settings.pipelines]
