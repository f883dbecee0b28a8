"""TLS to an external broker in the rendered chart: the CA bundle from the user's Secret
mounted read-only into the scaler and every worker, the variables that point the programs at
it, and nothing else of the pods changed (the secure defaults stay)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from chartlib import CHART, find, render, scaler_settings, worker_container, worker_pod_spec

pytestmark = pytest.mark.unit

SCENARIO = CHART / "ci" / "external-broker-values.yaml"
CA_DIR = "/etc/jobtide/broker-ca"


def external(tmp_path: Path, tls: dict[str, Any] | None) -> list[dict[str, Any]]:
    values: dict[str, Any] = {
        "rabbitmq": {"enabled": False},
        "externalBroker": {"host": "10.0.0.5", "port": 5671, "existingSecret": "broker"},
        "pipelines": {"resize": {"queue": "resize"}, "train": {"queue": "train"}},
    }
    if tls is not None:
        values["externalBroker"]["tls"] = tls
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return render([path])


def scaler_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod: dict[str, Any] = find(docs, "Deployment", "-scaler")["spec"]["template"]["spec"]
    return pod


def pods(docs: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """The scaler's and each worker's pod spec and main container."""
    scaler = scaler_pod(docs)
    found = {"scaler": (scaler, scaler["containers"][0])}
    for pipeline in ("resize", "train"):
        found[pipeline] = (worker_pod_spec(docs, pipeline), worker_container(docs, pipeline))
    return found


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container["env"]}


def test_the_ca_bundle_is_mounted_read_only_into_the_scaler_and_every_worker(
    tmp_path: Path,
) -> None:
    docs = external(tmp_path, {"enabled": True, "caSecret": {"name": "broker-ca", "key": "ca.pem"}})
    for name, (pod, container) in pods(docs).items():
        [volume] = [v for v in pod["volumes"] if v["name"] == "broker-ca"]
        assert volume == {
            "name": "broker-ca",
            "secret": {
                "secretName": "broker-ca",
                "items": [{"key": "ca.pem", "path": "ca.crt"}],
                "defaultMode": 0o444,
            },
        }, name
        [mount] = [m for m in container["volumeMounts"] if m["name"] == "broker-ca"]
        assert mount == {"name": "broker-ca", "mountPath": CA_DIR, "readOnly": True}, name
        env = env_of(container)
        assert env["JOBTIDE_BROKER_TLS"] == "true", name
        assert env["JOBTIDE_BROKER_CA_FILE"] == f"{CA_DIR}/ca.crt", name
        assert "JOBTIDE_BROKER_SERVER_NAME" not in env, name


def test_tls_changes_nothing_else_of_the_pods(tmp_path: Path) -> None:
    """The CA's volume, mount and variables are all TLS adds: the security contexts, the
    other volumes and everything else stay as without TLS."""
    plain = pods(external(tmp_path, None))
    tls = pods(
        external(
            tmp_path,
            {"enabled": True, "caSecret": {"name": "broker-ca"}, "serverName": "rabbitmq.internal"},
        )
    )
    added = {"JOBTIDE_BROKER_CA_FILE", "JOBTIDE_BROKER_SERVER_NAME"}
    for name, (pod, container) in tls.items():
        plain_pod, plain_container = plain[name]
        assert env_of(container)["JOBTIDE_BROKER_SERVER_NAME"] == "rabbitmq.internal"
        assert env_of(plain_container)["JOBTIDE_BROKER_TLS"] == "false"
        for key in set(pod) | set(plain_pod):
            if key == "volumes":
                kept = [v for v in pod["volumes"] if v["name"] != "broker-ca"]
                assert kept == plain_pod["volumes"], name
            elif key not in ("containers", "annotations"):
                assert pod.get(key) == plain_pod.get(key), f"{name}: {key}"
        for key in set(container) | set(plain_container):
            if key == "env":
                kept = [e for e in container["env"] if e["name"] not in added]
                changed = [e for e in kept if e not in plain_container["env"]]
                assert changed == [{"name": "JOBTIDE_BROKER_TLS", "value": "true"}], name
            elif key == "volumeMounts":
                kept = [m for m in container["volumeMounts"] if m["name"] != "broker-ca"]
                assert kept == plain_container["volumeMounts"], name
            else:
                assert container.get(key) == plain_container.get(key), f"{name}: {key}"
        assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_without_a_ca_secret_the_system_bundle_is_used_and_nothing_is_mounted(
    tmp_path: Path,
) -> None:
    docs = external(tmp_path, {"enabled": True})
    for name, (pod, container) in pods(docs).items():
        assert "broker-ca" not in [v["name"] for v in pod["volumes"]], name
        env = env_of(container)
        assert env["JOBTIDE_BROKER_TLS"] == "true", name
        assert "JOBTIDE_BROKER_CA_FILE" not in env, name


def test_the_scaler_reads_the_rendered_tls_settings_with_its_own_code() -> None:
    settings = scaler_settings(render([SCENARIO]))
    assert settings.broker.tls is True
    assert (settings.broker.port, settings.broker.management_port) == (5671, 15671)
    assert settings.broker.ca_file is not None
    assert settings.broker.management_url == "https://rabbitmq.messaging.svc:15671"
