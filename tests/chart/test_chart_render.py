"""Fields of the rendered chart (helm template), asserted one concern at a time."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from chartlib import (
    CHART,
    EXAMPLE_VALUES,
    REPO,
    SCENARIOS,
    VALUES_CASES,
    case_id,
    find,
    render,
    render_text,
    scaler_config,
    scaler_jobs,
    scaler_settings,
    worker_container,
    worker_pod_spec,
)
from jobtide_scaler.contracts import reserved_label_keys
from jobtide_scaler.jobs import LABEL_PIPELINE, WORKER_CONTAINER, job_labels
from jobtide_scaler.statuscmd import STATUS_COMPONENT, status_selector
from jobtide_testbed.tools import HELM_KUBE_VERSION, helm
from jobtide_worker import topology

pytestmark = pytest.mark.unit

SCENARIO = {path.name.removesuffix("-values.yaml"): path for path in SCENARIOS}
SCALER_CONFIG_SCHEMA = REPO / "images/scaler/src/jobtide_scaler/config.schema.json"
ONE_PIPELINE = ["pipelines.resize.queue=resize"]
NO_EVICTION = {
    "cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
    "karpenter.sh/do-not-disrupt": "true",
}


def render_values(tmp_path: Path, values: dict[str, Any], *set_values: str) -> list[dict[str, Any]]:
    """Render with `values` written to a file, as a user's values file would be."""
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return render([path], set_values)


def built_jobs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The Jobs the scaler builds from the rendered configuration, by pipeline."""
    return {job["metadata"]["labels"][LABEL_PIPELINE]: job for job in scaler_jobs(docs)}


def pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod the chart runs or makes the scaler run, by a readable name."""
    pods = {
        f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"]["spec"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "Job")
    }
    pods.update({f"Pod/{d['metadata']['name']}": d["spec"] for d in docs if d["kind"] == "Pod"})
    for name in scaler_config(docs)["pipelines"]:
        pods[f"worker/{name}"] = worker_pod_spec(docs, name)
    return pods


# -- security ---------------------------------------------------------------------------


@pytest.mark.parametrize("values", VALUES_CASES, ids=case_id)
def test_every_pod_and_container_runs_locked_down(values: Path | None) -> None:
    docs = render([values], ONE_PIPELINE if values is None else ())
    pods = pod_specs(docs)
    assert len(pods) >= 3
    for name, pod in pods.items():
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True, name
        assert security["runAsUser"] > 0, name
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod.get("initContainers", []) + pod["containers"]:
            context = container["securityContext"]
            where = f"{name}/{container['name']}"
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where


def test_service_account_tokens_reach_only_the_scaler() -> None:
    docs = render(set_values=ONE_PIPELINE)
    for name, pod in pod_specs(docs).items():
        expected = name.startswith("Deployment/") and name.endswith("-scaler")
        assert pod["automountServiceAccountToken"] is expected, name
    assert find(docs, "ServiceAccount", "-scaler")["automountServiceAccountToken"] is False


def test_worker_pods_have_the_secure_defaults() -> None:
    docs = render(set_values=ONE_PIPELINE)
    pod = worker_pod_spec(docs, "resize")
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["runAsGroup"] == 10001
    assert pod["restartPolicy"] == "Never"
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}} in pod["volumes"]
    assert {"name": "tmp", "mountPath": "/tmp"} in worker_container(docs, "resize")["volumeMounts"]


def test_scaler_role_allows_exactly_what_the_scaler_calls() -> None:
    docs = render(set_values=ONE_PIPELINE)
    rules = find(docs, "Role", "-scaler")["rules"]
    assert [(r["apiGroups"], r["resources"], r["verbs"]) for r in rules] == [
        (["batch"], ["jobs"], ["list", "watch", "create", "delete"]),
        (["apps"], ["deployments"], ["get"]),
        ([""], ["configmaps"], ["patch"]),
        ([""], ["events"], ["create"]),
        (["coordination.k8s.io"], ["leases"], ["get", "create", "update"]),
    ]
    # The Deployment rule names the scaler's own Deployment, the owner of its Jobs, only.
    assert rules[1]["resourceNames"] == [find(docs, "Deployment", "-scaler")["metadata"]["name"]]
    assert scaler_config(docs)["ownerDeployment"] == rules[1]["resourceNames"][0]
    # The ConfigMap rule names the status ConfigMap only: not the scaler's configuration.
    status = find(docs, "ConfigMap", "-scaler-status")
    assert rules[2]["resourceNames"] == [status["metadata"]["name"]]
    assert scaler_config(docs)["statusConfigMap"] == rules[2]["resourceNames"][0]
    assert all(set(r) - {"resourceNames"} == {"apiGroups", "resources", "verbs"} for r in rules)
    assert [r for r in rules if "resourceNames" in r] == [rules[1], rules[2]]
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    binding = find(docs, "RoleBinding", "-scaler")
    assert binding["roleRef"]["name"] == find(docs, "Role", "-scaler")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "jobs-jobtide-scaler", "namespace": "pipelines"}
    ]
    deployment = find(docs, "Deployment", "-scaler")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "jobs-jobtide-scaler"


def test_catalogue_images_annotation_lists_exactly_the_images_a_default_install_runs() -> None:
    """Chart.yaml's artifacthub.io/images (generated from values.yaml) against the rendering:
    every container and init container of every pod, the worker's and the test's included."""
    docs = render(set_values=ONE_PIPELINE)
    rendered = {
        container["image"]
        for spec in pod_specs(docs).values()
        for container in [*spec.get("initContainers", []), *spec["containers"]]
    }
    annotations = yaml.safe_load((CHART / "Chart.yaml").read_text())["annotations"]
    listed = {entry["image"] for entry in yaml.safe_load(annotations["artifacthub.io/images"])}
    assert listed == rendered


def test_status_config_map_is_empty_and_found_by_the_status_command() -> None:
    """Created without `data`, so an upgrade leaves the key the scaler writes; found by the
    label selector `python -m jobtide_scaler status` lists with, whatever its name."""
    for override in ([], ["fullnameOverride=other"]):
        docs = render(set_values=[*ONE_PIPELINE, *override])
        status = find(docs, "ConfigMap", "-scaler-status")
        assert "data" not in status
        assert "binaryData" not in status
        wanted = dict(term.split("=") for term in status_selector("jobs").split(","))
        assert wanted.items() <= status["metadata"]["labels"].items()
        assert scaler_config(docs)["statusConfigMap"] == status["metadata"]["name"]


@pytest.mark.parametrize("values", VALUES_CASES, ids=case_id)
def test_no_credentials_in_any_config_map(values: Path | None) -> None:
    docs = render([values], ONE_PIPELINE if values is None else ())
    secrets = [d for d in docs if d["kind"] == "Secret"]
    secret_values = [base64.b64decode(v).decode() for s in secrets for v in s["data"].values()]
    config_text = json.dumps([d for d in docs if d["kind"] == "ConfigMap"])
    for value in secret_values:
        assert len(value) >= 7
        if value != "jobtide":  # the user name is not a credential
            assert value not in config_text


def test_no_value_takes_a_credential() -> None:
    """`helm get values` and the release's stored values hold no secret: the chart takes the
    broker's credentials from a Secret (generated, or named by `existingSecret`), never as a
    value. Its own keys (Kubernetes' objects passed through aside) only name Secrets."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    keys: set[str] = set()

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            properties = node.get("properties")
            keys.update(properties if isinstance(properties, dict) else ())
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    own = {k: v for k, v in schema.get("definitions", {}).items() if not k.startswith("io.k8s.")}
    collect({**schema, "definitions": own})
    assert {"existingSecret", "caSecret", "imagePullSecrets"} <= keys
    sensitive = re.compile(r"password|passwd|cookie|token|secret|credential", re.IGNORECASE)
    assert sorted(k for k in keys if sensitive.search(k)) == [
        "caSecret",
        "existingSecret",
        "imagePullSecrets",
    ]


CREDENTIALS_VOLUME = "jobtide-broker-credentials"
CREDENTIALS_DIR = "/etc/jobtide/broker-credentials"


def broker_secret_name(docs: list[dict[str, Any]], values: Path | None) -> str:
    """The Secret of the broker's credentials, found from the values, not the templates."""
    given = yaml.safe_load(values.read_text()) if values is not None else {}
    rabbitmq, external = given.get("rabbitmq") or {}, given.get("externalBroker") or {}
    if rabbitmq.get("enabled", True) is False:
        return str(external["existingSecret"])
    if rabbitmq.get("existingSecret"):
        return str(rabbitmq["existingSecret"])
    return str(find(docs, "Secret", "-rabbitmq")["metadata"]["name"])


def every_pod(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod spec in the rendered chart (workloads, hooks, tests, PodTemplates, each
    pipeline's jobTemplate) and in the Jobs the scaler builds from it, by a readable name."""
    pods = pod_specs(docs)
    pods.update(
        {f"PodTemplate/{d['metadata']['name']}": d["template"]["spec"]
         for d in docs if d["kind"] == "PodTemplate"}
    )  # fmt: skip
    pods.update(
        {f"built Job/{name}": job["spec"]["template"]["spec"]
         for name, job in built_jobs(docs).items()}
    )  # fmt: skip
    return pods


@pytest.mark.parametrize("values", VALUES_CASES, ids=case_id)
def test_broker_credentials_reach_containers_as_mounted_files_only(values: Path | None) -> None:
    """No environment anywhere holds a broker credential or takes one from the broker's
    Secret: the scaler and every worker read them from a read-only Secret volume of the two
    keys, readable by the owner and the pod's fsGroup."""
    docs = render([values], ONE_PIPELINE if values is None else ())
    secret = broker_secret_name(docs, values)
    secret_values = {
        base64.b64decode(v).decode()
        for d in docs if d["kind"] == "Secret"
        for k, v in d["data"].items() if k != "username"
    }  # fmt: skip
    pods = every_pod(docs)
    readers = []
    for name, pod in pods.items():
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{name}: {container['name']}"
            for source in container.get("envFrom", []):
                assert source.get("secretRef", {}).get("name") != secret, where
            env = {variable["name"]: variable for variable in container.get("env", [])}
            for variable in env.values():
                ref = variable.get("valueFrom", {}).get("secretKeyRef", {})
                assert ref.get("name") != secret, f"{where}: {variable['name']}"
                assert variable.get("value") not in secret_values, f"{where}: {variable['name']}"
            assert not {"JOBTIDE_BROKER_USERNAME", "JOBTIDE_BROKER_PASSWORD"} & set(env), where
            if "JOBTIDE_BROKER_PASSWORD_FILE" not in env:
                continue
            readers.append(name)
            assert env["JOBTIDE_BROKER_USERNAME_FILE"]["value"] == f"{CREDENTIALS_DIR}/username"
            assert env["JOBTIDE_BROKER_PASSWORD_FILE"]["value"] == f"{CREDENTIALS_DIR}/password"
            mounts = [m for m in container["volumeMounts"] if m["name"] == CREDENTIALS_VOLUME]
            assert mounts == [
                {"name": CREDENTIALS_VOLUME, "mountPath": CREDENTIALS_DIR, "readOnly": True}
            ], where
            volumes = [v for v in pod["volumes"] if v["name"] == CREDENTIALS_VOLUME]
            assert volumes == [{"name": CREDENTIALS_VOLUME, "secret": {
                "secretName": secret,
                "items": [{"key": "username", "path": "username"},
                          {"key": "password", "path": "password"}],
                "defaultMode": 0o440,
            }}], where  # fmt: skip
            # 0440: the non-root user reads them as a member of the pod's fsGroup.
            assert pod["securityContext"]["fsGroup"] > 0, where
            assert pod["securityContext"]["runAsUser"] != 0, where
    pipelines = scaler_config(docs)["pipelines"]
    scaler = find(docs, "Deployment", "-scaler")["metadata"]["name"]
    expected = {f"Deployment/{scaler}"}
    expected |= {f"{kind}/{p}" for p in pipelines for kind in ("worker", "built Job")}
    expected |= {n for n in pods if n.startswith("PodTemplate/")}
    assert set(readers) == expected


def test_generated_secret_holds_random_credentials() -> None:
    first = find(render(set_values=ONE_PIPELINE), "Secret", "-rabbitmq")
    second = find(render(set_values=ONE_PIPELINE), "Secret", "-rabbitmq")
    decoded = {k: base64.b64decode(v).decode() for k, v in first["data"].items()}
    assert decoded["username"] == "jobtide"
    assert len(decoded["password"]) == 32
    assert decoded["password"].isalnum()
    assert len(decoded["erlang-cookie"]) == 48
    # No lookup offline, so two renders generate two passwords (upgrades reuse the live one):
    # why the chart's README sends GitOps users, who render this way, to an existing Secret.
    assert first["data"]["password"] != second["data"]["password"]
    assert first["data"]["erlang-cookie"] != second["data"]["erlang-cookie"]


@pytest.mark.parametrize("scenario", ["existing-secrets", "external-broker"])
def test_renders_with_an_existing_secret_are_stable(scenario: str) -> None:
    """As a GitOps tool renders (`helm template`, no cluster to look up): with the credentials
    in an existing Secret, no Secret is rendered and two renders are the same, byte for byte."""
    first = render_text([SCENARIO[scenario]])
    assert first == render_text([SCENARIO[scenario]])
    docs = [doc for doc in yaml.safe_load_all(first) if doc]
    assert [d for d in docs if d["kind"] == "Secret"] == []
    assert docs  # the release itself is rendered


def test_existing_secret_replaces_the_generated_one() -> None:
    docs = render([SCENARIO["existing-secrets"]])
    assert not [d for d in docs if d["kind"] == "Secret"]
    statefulset = find(docs, "StatefulSet", "-rabbitmq")
    volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    assert volumes["credentials"]["secret"]["secretName"] == "jobtide-rabbitmq-credentials"
    volumes = {v["name"]: v for v in worker_pod_spec(docs, "resize")["volumes"]}
    assert volumes[CREDENTIALS_VOLUME]["secret"]["secretName"] == "jobtide-rabbitmq-credentials"
    env = {e["name"]: e for e in worker_container(docs, "resize")["env"]}
    assert env["STORAGE_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "storage-token"
    assert worker_pod_spec(docs, "resize")["imagePullSecrets"] == [{"name": "registry-credentials"}]


def test_image_pull_secrets_reach_every_pod() -> None:
    """A private registry's pull Secret goes on every pod the chart runs: the scaler,
    RabbitMQ, each pipeline's workers and the `helm test` pod."""
    docs = render([SCENARIO["existing-secrets"]])
    pod_specs = {}
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] == "Pod":
            pod_specs[name] = d["spec"]
        elif d["kind"] == "PodTemplate":
            pod_specs[name] = d["template"]["spec"]
        elif d["kind"] in ("Deployment", "StatefulSet"):
            pod_specs[name] = d["spec"]["template"]["spec"]
    kinds_seen = {name.split("/")[0] for name in pod_specs}
    assert kinds_seen == {"Deployment", "StatefulSet", "PodTemplate", "Pod"}, sorted(pod_specs)
    pull_secrets = {name: spec.get("imagePullSecrets") for name, spec in pod_specs.items()}
    assert pull_secrets == {name: [{"name": "registry-credentials"}] for name in pod_specs}


# -- labels and names -------------------------------------------------------------------


@pytest.mark.parametrize("values", VALUES_CASES, ids=case_id)
def test_standard_labels_on_every_object(values: Path | None) -> None:
    docs = render([values], ONE_PIPELINE if values is None else ())
    chart_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    for doc in docs:
        labels = doc["metadata"]["labels"]
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        assert labels["app.kubernetes.io/name"] == "jobtide", where
        assert labels["app.kubernetes.io/instance"] == "jobs", where
        assert labels["app.kubernetes.io/version"] == "0.1.0", where
        assert labels["app.kubernetes.io/managed-by"] == "Helm", where
        components = (
            "scaler", STATUS_COMPONENT, "rabbitmq", "rabbitmq-uninstall", "worker", "test"
        )  # fmt: skip
        assert labels["app.kubernetes.io/component"] in components, where
        assert labels["helm.sh/chart"] == f"jobtide-{chart_version}", where
        assert doc["metadata"]["namespace"] == "pipelines", where
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            selector = doc["spec"]["selector"]["matchLabels"]
            pod_labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= pod_labels.items()
            assert "app.kubernetes.io/version" not in selector  # selectors are immutable


@pytest.mark.parametrize("values", [None, SCENARIO["two-pipelines"]], ids=case_id)
def test_the_schema_reserves_every_label_key_the_chart_and_the_scaler_set(
    values: Path | None,
) -> None:
    """A user's label of one of these keys would be overwritten: the schema refuses them.
    (Rendered without labels of the user's: these are the chart's and the scaler's alone.)"""
    docs = render([values], ONE_PIPELINE if values is None else ())
    label_maps = [doc["metadata"]["labels"] for doc in docs]
    for doc in docs:
        template = doc.get("template") or doc.get("spec", {}).get("template")
        if template:
            label_maps.append(template["metadata"].get("labels", {}))
    for job in scaler_jobs(docs):
        label_maps += [job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]]
    set_keys = {key for labels in label_maps for key in labels}
    assert set_keys == set(reserved_label_keys())


@pytest.mark.parametrize("name", ["jobtide", "etl"])
def test_worker_labels_follow_name_override_and_carry_what_the_scaler_selects_on(
    name: str,
) -> None:
    override = [] if name == "jobtide" else [f"nameOverride={name}"]
    docs = render([SCENARIO["two-pipelines"]], ["commonLabels.team=data", *override])
    chart_labels = {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/part-of": "jobtide",
        "app.kubernetes.io/version": "0.1.0",
        "team": "data",
    }
    jobs = built_jobs(docs)
    assert set(jobs) == {"resize", "report"}
    for pipeline, job in jobs.items():
        expected = {**chart_labels, **job_labels("jobs", pipeline)}
        assert job["metadata"]["labels"] == expected, pipeline
        assert job["spec"]["template"]["metadata"]["labels"] == expected, pipeline
    # The chart's own objects follow the same name.
    scaler = find(docs, "Deployment", "-scaler")
    assert scaler["metadata"]["labels"]["app.kubernetes.io/name"] == name
    assert scaler["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == name


def test_two_releases_share_no_object_name() -> None:
    first = render([SCENARIO["two-pipelines"]], release="alpha")
    second = render([SCENARIO["two-pipelines"]], release="beta")
    names = {(d["kind"], d["metadata"]["name"]) for d in first}
    assert not names & {(d["kind"], d["metadata"]["name"]) for d in second}
    assert scaler_config(first)["leaderElection"]["leaseName"] == "alpha-jobtide-scaler"
    assert scaler_config(second)["release"] == "beta"


# -- the scaler's configuration ---------------------------------------------------------


@pytest.mark.parametrize("values", VALUES_CASES, ids=case_id)
def test_scaler_config_validates_against_the_scalers_schema(values: Path | None) -> None:
    assert SCALER_CONFIG_SCHEMA.exists(), f"{SCALER_CONFIG_SCHEMA} is missing"
    schema = json.loads(SCALER_CONFIG_SCHEMA.read_text())
    docs = render([values], ONE_PIPELINE if values is None else ())
    jsonschema.Draft202012Validator(schema).validate(scaler_config(docs))
    # And the scaler's own loader accepts file and environment together.
    settings = scaler_settings(docs)
    assert settings.release == "jobs"
    assert settings.namespace == "pipelines"
    assert {p.name for p in settings.pipelines} == set(scaler_config(docs)["pipelines"])


def test_scaler_config_carries_every_setting() -> None:
    docs = render([EXAMPLE_VALUES])
    config = scaler_config(docs)
    assert config["maxTotalWorkers"] == 40
    assert config["leaderElection"] == {
        "enabled": True,
        "leaseName": "jobs-jobtide-scaler",
        "leaseDurationSeconds": 15,
        "renewDeadlineSeconds": 10,
        "retryPeriodSeconds": 2,
    }
    train = config["pipelines"]["train-models"]
    assert {k: v for k, v in train.items() if k != "jobTemplate"} == {
        "queue": "train-models",
        "messagesPerWorker": 1,
        "minWorkers": 0,
        "maxWorkers": 8,
        "maxNewPerCycle": 2,
        "activationMessages": 0,
        "idleTimeoutSeconds": 300,
        "quietCheckSeconds": 5,
        "maxAttempts": 3,
        "maxTaskSeconds": 14400,
        "backoffLimit": 0,
        "ttlSecondsAfterFinished": 300,
        "failedJobsHistoryLimit": 5,
    }
    container = worker_container(docs, "train-models")
    assert container["image"] == "registry.example.com/acme/train-models:0.9.0"
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "8Gi"},
        "limits": {"memory": "8Gi"},
    }
    assert {"name": "scratch", "mountPath": "/scratch"} in container["volumeMounts"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["JOBTIDE_HANDLER"] == "train:run"
    assert env["JOBTIDE_BROKER_HOST"] == "jobs-jobtide-rabbitmq.pipelines.svc"
    assert env["JOBTIDE_BROKER_PORT"] == "5672"
    # An idle worker reads its queue's counters there (quietCheckSeconds): the Service's port.
    assert env["JOBTIDE_BROKER_MANAGEMENT_PORT"] == "15672"


def test_explicit_zero_in_a_pipeline_wins_over_a_nonzero_default() -> None:
    docs = render(
        set_values=[
            "pipelineDefaults.minWorkers=2",
            "pipelineDefaults.activationMessages=5",
            "pipelines.a.queue=a",
            "pipelines.a.minWorkers=0",
            "pipelines.a.activationMessages=0",
            "pipelines.b.queue=b",
        ]
    )
    pipelines = scaler_config(docs)["pipelines"]
    assert (pipelines["a"]["minWorkers"], pipelines["a"]["activationMessages"]) == (0, 0)
    assert (pipelines["b"]["minWorkers"], pipelines["b"]["activationMessages"]) == (2, 5)


def test_scaler_gets_its_config_and_broker_address() -> None:
    docs = render([SCENARIO["external-broker"]])
    container = find(docs, "Deployment", "-scaler")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["--config", "/etc/jobtide/scaler/config.yaml"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["JOBTIDE_BROKER_HOST"] == "rabbitmq.messaging.svc"
    assert env["JOBTIDE_BROKER_PORT"] == "5671"
    assert env["JOBTIDE_BROKER_MANAGEMENT_PORT"] == "15671"
    assert env["JOBTIDE_BROKER_VHOST"] == "jobs"
    assert env["JOBTIDE_BROKER_TLS"] == "true"
    probes = (container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"])
    assert probes == (
        {"path": "/healthz", "port": "metrics"},
        {"path": "/readyz", "port": "metrics"},
    )
    assert container["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]


def test_external_broker_renders_no_rabbitmq() -> None:
    docs = render([SCENARIO["external-broker"]])
    assert not [
        d for d in docs if d["metadata"]["labels"]["app.kubernetes.io/component"] == "rabbitmq"
    ]
    volumes = {v["name"]: v for v in worker_pod_spec(docs, "resize")["volumes"]}
    assert volumes[CREDENTIALS_VOLUME]["secret"]["secretName"] == "jobtide-broker"
    env = {e["name"]: e for e in worker_container(docs, "resize")["env"]}
    # The external broker's management API, over its TLS like AMQP.
    assert env["JOBTIDE_BROKER_MANAGEMENT_PORT"]["value"] == "15671"
    assert env["JOBTIDE_BROKER_TLS"]["value"] == "true"


def test_config_checksum_follows_the_config_and_nothing_else() -> None:
    def checksum(*set_values: str) -> str:
        deployment = find(render(set_values=[*ONE_PIPELINE, *set_values]), "Deployment", "-scaler")
        value: str = deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return value

    base = checksum()
    assert len(base) == 64
    assert checksum() == base
    assert checksum("scaler.resources.limits.memory=512Mi") == base
    assert checksum("pipelines.resize.maxWorkers=3") != base
    assert checksum("nodePool.nodeSelector.pool=jobs") != base
    assert checksum("scaler.pollIntervalSeconds=7") != base


def test_rabbitmq_checksum_follows_its_config() -> None:
    def checksum(*set_values: str) -> str:
        statefulset = find(render(set_values=[*ONE_PIPELINE, *set_values]), "StatefulSet", "")
        value: str = statefulset["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return value

    assert checksum() == checksum()
    assert checksum("pipelines.resize.maxAttempts=7") != checksum()


# -- node pool and pass-through pod template -------------------------------------------


def test_node_pool_settings_reach_every_worker_job() -> None:
    docs = render([SCENARIO["node-pool"]])
    resize = worker_pod_spec(docs, "resize")
    assert resize["nodeSelector"] == {"cloud.google.com/gke-nodepool": "jobs"}
    assert resize["tolerations"] == [
        {"key": "jobtide.io/pool", "operator": "Equal", "value": "jobs", "effect": "NoSchedule"}
    ]
    assert resize["priorityClassName"] == "batch-low"
    terms = resize["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert terms[0]["preference"]["matchExpressions"][0]["key"] == "cloud.google.com/gke-spot"
    # The Jobs the scaler builds keep them.
    built = {j["metadata"]["labels"]["jobtide.io/pipeline"]: j for j in scaler_jobs(docs)}
    assert built["resize"]["spec"]["template"]["spec"]["nodeSelector"] == resize["nodeSelector"]


def test_pipeline_pod_template_overrides_the_node_pool_key_by_key() -> None:
    docs = render([SCENARIO["node-pool"]])
    gpu = worker_pod_spec(docs, "gpu")
    assert gpu["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert gpu["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert gpu["priorityClassName"] == "batch-low"  # not overridden: the pool's default
    metadata = scaler_config(docs)["pipelines"]["gpu"]["jobTemplate"]["spec"]["template"][
        "metadata"
    ]
    assert metadata["annotations"] == {**NO_EVICTION, "example.com/cost-center": "research"}
    assert worker_container(docs, "gpu")["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_worker_pods_ask_every_node_autoscaler_not_to_evict_them() -> None:
    docs = render([EXAMPLE_VALUES])
    for name in ("resize-images", "train-models"):
        template = scaler_config(docs)["pipelines"][name]["jobTemplate"]["spec"]["template"]
        assert template["metadata"]["annotations"] == NO_EVICTION
        assert template["spec"]["nodeSelector"]["jobtide.io/pool"] == "jobs"
    train = worker_pod_spec(docs, "train-models")
    assert train["terminationGracePeriodSeconds"] == 600
    assert {"name": "scratch", "emptyDir": {"sizeLimit": "50Gi"}} in train["volumes"]
    # Each annotation can be dropped on its own.
    dropped = render(
        set_values=[*ONE_PIPELINE, "nodePool.podAnnotations.karpenter\\.sh/do-not-disrupt=null"]
    )
    pod = built_jobs(dropped)["resize"]["spec"]["template"]
    assert pod["metadata"]["annotations"] == {
        "cluster-autoscaler.kubernetes.io/safe-to-evict": "false"
    }


# -- packing the workers ----------------------------------------------------------------


def packing_selector(pod: dict[str, Any]) -> dict[str, str]:
    """The label selector of the one preferred pod affinity term, checked to be a packing one."""
    assert set(pod["affinity"]) == {"podAffinity"}
    (term,) = pod["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["weight"] == 100
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert set(term["podAffinityTerm"]["labelSelector"]) == {"matchLabels"}
    selector: dict[str, str] = term["podAffinityTerm"]["labelSelector"]["matchLabels"]
    return selector


@pytest.mark.parametrize("override", [[], ["nameOverride=etl"]], ids=["name", "nameOverride"])
def test_workers_prefer_nodes_running_workers_of_the_release(override: list[str]) -> None:
    docs = render([SCENARIO["two-pipelines"]], override)
    jobs = built_jobs(docs)
    selectors = [packing_selector(job["spec"]["template"]["spec"]) for job in jobs.values()]
    assert len(selectors) == 2
    other_release = built_jobs(render([SCENARIO["two-pipelines"]], override, release="other"))
    for selector in selectors:
        # It matches the worker pods the scaler creates, of every pipeline of the release ...
        for job in jobs.values():
            assert selector.items() <= job["spec"]["template"]["metadata"]["labels"].items()
        # ... and no pod of another release or component.
        for job in other_release.values():
            assert not selector.items() <= job["spec"]["template"]["metadata"]["labels"].items()
        assert selector["app.kubernetes.io/component"] == "worker"


def test_own_affinity_or_pack_workers_false_turns_packing_off(tmp_path: Path) -> None:
    # The node pool's affinity replaces it for every pipeline.
    node_pool = render([SCENARIO["node-pool"]])
    for pipeline in ("resize", "gpu"):
        affinity = worker_pod_spec(node_pool, pipeline)["affinity"]
        assert set(affinity) == {"nodeAffinity"}, pipeline
    # A pipeline's own affinity replaces it for that pipeline only.
    in_zone_b = {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["b"]}
    zone = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [in_zone_b]}]
            }
        }
    }
    docs = render_values(tmp_path, {"pipelines": {
        "pinned": {"queue": "pinned", "podTemplate": {"spec": {"affinity": zone}}},
        "free": {"queue": "free"},
    }})  # fmt: skip
    assert worker_pod_spec(docs, "pinned")["affinity"] == zone
    packing_selector(worker_pod_spec(docs, "free"))
    # Or switched off.
    off = render(set_values=[*ONE_PIPELINE, "nodePool.packWorkers=false"])
    assert "affinity" not in worker_pod_spec(off, "resize")


# -- the pass-through pod template: containers by name, sidecars, secure defaults --------


def test_pod_template_containers_merge_by_name_with_the_worker(tmp_path: Path) -> None:
    sidecar = {
        "name": "proxy",
        "image": "envoy:1.31",
        "args": ["--config", "/etc/envoy.yaml"],
        "volumeMounts": [{"name": "shared", "mountPath": "/shared", "readOnly": True}],
    }
    worker_fields = {
        "name": "worker",
        "command": ["python", "-m", "wrapper"],
        "envFrom": [{"secretRef": {"name": "storage-credentials"}}],
        "livenessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 30},
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "2"]}}},
    }
    docs = render_values(tmp_path, {"pipelines": {"resize": {
        "queue": "resize",
        "image": {"repository": "registry.example.com/resize", "tag": "2"},
        "env": [{"name": "OUTPUT_BUCKET", "value": "thumbs"}],
        "extraVolumes": [{"name": "shared", "emptyDir": {}}],
        "extraVolumeMounts": [{"name": "shared", "mountPath": "/shared"}],
        "podTemplate": {"spec": {"containers": [sidecar, worker_fields]}},
    }}})  # fmt: skip
    pod = worker_pod_spec(docs, "resize")
    assert [c["name"] for c in pod["containers"]] == ["proxy", "worker"]  # the user's order
    proxy, worker = pod["containers"]
    # The sidecar as given, with the secure defaults added.
    assert {k: v for k, v in proxy.items() if k != "securityContext"} == sidecar
    # The worker: the user's fields, and jobtide's.
    assert {k: worker[k] for k in worker_fields} == worker_fields
    assert worker["image"] == "registry.example.com/resize:2"
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["OUTPUT_BUCKET"] == "thumbs"
    assert env["JOBTIDE_HANDLER"] == "handler:handle"
    assert env["JOBTIDE_BROKER_PASSWORD_FILE"] == f"{CREDENTIALS_DIR}/password"
    # The user's volume beside jobtide's, each mounted where it was asked.
    assert worker["volumeMounts"] == [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": CREDENTIALS_VOLUME, "mountPath": CREDENTIALS_DIR, "readOnly": True},
        {"name": "shared", "mountPath": "/shared"},
    ]
    assert [v["name"] for v in pod["volumes"]] == ["tmp", CREDENTIALS_VOLUME, "shared"]
    assert {"name": "shared", "emptyDir": {}} in pod["volumes"]
    # The scaler finds the worker by name, not by position: its variables go there only.
    built = built_jobs(docs)["resize"]["spec"]["template"]["spec"]["containers"]
    by_name = {c["name"]: c for c in built}
    assert "env" not in by_name["proxy"]
    assert "JOBTIDE_QUEUE" in {e["name"] for e in by_name[WORKER_CONTAINER]["env"]}


def test_without_a_worker_entry_the_worker_comes_first(tmp_path: Path) -> None:
    docs = render_values(tmp_path, {"pipelines": {"resize": {
        "queue": "resize",
        "podTemplate": {"spec": {"containers": [{"name": "agent", "image": "agent:1"}]}},
    }}})  # fmt: skip
    assert [c["name"] for c in worker_pod_spec(docs, "resize")["containers"]] == [
        "worker",
        "agent",
    ]


def test_worker_pods_request_resources_by_default_and_pipelines_merge_over_them(
    tmp_path: Path,
) -> None:
    """Without requests a node autoscaler has nothing to size a node for."""
    docs = render_values(tmp_path, {"pipelines": {
        "plain": {"queue": "plain"},
        "big": {"queue": "big", "resources": {"requests": {"memory": "2Gi"},
                                              "limits": {"memory": "4Gi"}}},
    }})  # fmt: skip
    assert worker_container(docs, "plain")["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"}
    }
    assert worker_container(docs, "big")["resources"] == {
        "requests": {"cpu": "100m", "memory": "2Gi"},
        "limits": {"memory": "4Gi"},
    }


def test_each_pipeline_pod_goes_to_the_apiserver_first_as_a_pod_template() -> None:
    """A pre-install/pre-upgrade hook: the apiserver checks the workers' pod before anything
    of the release exists; it is deleted once accepted."""
    docs = render([SCENARIO["two-pipelines"]])
    pipelines = scaler_config(docs)["pipelines"]
    templates = [d for d in docs if d["kind"] == "PodTemplate"]
    assert len(templates) == len(pipelines) == 2
    for name in pipelines:
        pod_template = find(docs, "PodTemplate", f"-{name}")
        job_template = pipelines[name]["jobTemplate"]["spec"]["template"]
        assert pod_template["template"] == job_template
        annotations = pod_template["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert "hook-succeeded" in annotations["helm.sh/hook-delete-policy"]


def test_pod_security_level_privileged_lets_a_pipeline_run_as_root(tmp_path: Path) -> None:
    """The restricted check (bad-values/pod-security-context-runs-as-root.yaml) is the
    default; a cluster that does not enforce that level can turn it off."""
    values = {"pipelines": {"build": {
        "queue": "build",
        "podTemplate": {"spec": {"securityContext": {"runAsUser": 0, "runAsNonRoot": False}}},
    }}}  # fmt: skip
    docs = render_values(tmp_path, {**values, "podSecurityLevel": "privileged"})
    security = worker_pod_spec(docs, "build")["securityContext"]
    assert security["runAsUser"] == 0
    assert security["runAsNonRoot"] is False
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}  # the other defaults stay


def test_secure_defaults_merge_under_overrides(tmp_path: Path) -> None:
    docs = render_values(tmp_path, {"pipelines": {"resize": {
        "queue": "resize",
        "podTemplate": {"spec": {
            "securityContext": {"runAsUser": 20000, "supplementalGroups": [5]},
            "containers": [
                {"name": "worker",
                 "securityContext": {"capabilities": {"add": ["NET_BIND_SERVICE"]}}},
                {"name": "cache", "image": "cache:1",
                 "securityContext": {"readOnlyRootFilesystem": False}},
            ],
            "initContainers": [{"name": "shipper", "image": "shipper:1",
                                "restartPolicy": "Always"}],
        }},
    }}})  # fmt: skip
    pod = worker_pod_spec(docs, "resize")
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 20000,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "supplementalGroups": [5],
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    contexts = {c["name"]: c["securityContext"] for c in pod["containers"] + pod["initContainers"]}
    defaults = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert contexts == {
        "worker": {**defaults, "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}},
        # An explicit false wins over the default's true.
        "cache": {**defaults, "readOnlyRootFilesystem": False},
        "shipper": defaults,
    }
    assert pod["initContainers"][0]["restartPolicy"] == "Always"


# -- RabbitMQ ---------------------------------------------------------------------------


def rabbitmq_files(docs: list[dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = find(docs, "ConfigMap", "-rabbitmq")["data"]
    return data


@pytest.mark.parametrize("values", [EXAMPLE_VALUES, SCENARIO["two-pipelines"]], ids=case_id)
def test_definitions_match_the_worker_topology(values: Path) -> None:
    docs = render([values])
    definitions = json.loads(rabbitmq_files(docs)["definitions.json"])
    pipelines = scaler_config(docs)["pipelines"].values()
    expected = topology.definitions(
        [(p["queue"], p["maxAttempts"], p["maxTaskSeconds"]) for p in pipelines], "/"
    )

    def by_name(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return sorted(items, key=lambda i: json.dumps(i, sort_keys=True))

    assert set(definitions) == {*expected, "vhosts"}
    for key, items in expected.items():
        assert by_name(definitions[key]) == by_name(items), key
    assert definitions["vhosts"] == [{"name": "/"}]


def test_definitions_fill_in_the_vhost_and_escape_queue_names(tmp_path: Path) -> None:
    # The chart fills in the skeleton generated from the topology (files/queue-topology.json);
    # a queue name with a regex-special character and fractional seconds take the same path.
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "rabbitmq": {"vhost": "jobs"},
                "pipelines": {
                    "a": {"queue": "a.b:c", "maxAttempts": 7},
                    "b": {"queue": "bq", "maxTaskSeconds": 5400.5, "idleTimeoutSeconds": 2.5},
                },
            }
        )
    )
    docs = render([values])
    files = rabbitmq_files(docs)
    definitions = json.loads(files["definitions.json"])
    default_seconds = scaler_config(docs)["pipelines"]["a"]["maxTaskSeconds"]
    expected = topology.definitions([("a.b:c", 7, default_seconds), ("bq", 3, 5400.5)], "jobs")

    def as_text(items: list[dict[str, Any]]) -> list[str]:
        return sorted(json.dumps(item, sort_keys=True) for item in items)

    for key, items in expected.items():
        assert as_text(definitions[key]) == as_text(items), key
    assert definitions["vhosts"] == [{"name": "jobs"}]
    timeout = topology.broker_consumer_timeout_ms([3600, 5400.5])
    assert f"consumer_timeout = {timeout}\n" in files["rabbitmq.conf"]
    assert scaler_config(docs)["pipelines"]["b"]["idleTimeoutSeconds"] == 2.5


def test_consumer_timeout_covers_the_longest_task() -> None:
    docs = render([EXAMPLE_VALUES])
    conf = rabbitmq_files(docs)["rabbitmq.conf"]
    settings = dict(line.split(" = ", 1) for line in conf.splitlines() if " = " in line)
    expected = topology.broker_consumer_timeout_ms([120, 14400])
    assert int(settings["consumer_timeout"]) == expected == (14400 + 60) * 1000
    assert settings["definitions.local.path"] == "/etc/jobtide/rabbitmq/definitions.json"
    short = rabbitmq_files(render(set_values=[*ONE_PIPELINE, "pipelines.resize.maxTaskSeconds=5"]))
    assert "consumer_timeout = 1800000\n" in short["rabbitmq.conf"]
    fixed = rabbitmq_files(
        render(set_values=[*ONE_PIPELINE, "rabbitmq.consumerTimeoutSeconds=7200"])
    )
    assert "consumer_timeout = 7200000\n" in fixed["rabbitmq.conf"]


def test_rabbitmq_statefulset_persists_and_runs_any_image() -> None:
    docs = render(
        set_values=[
            *ONE_PIPELINE,
            "rabbitmq.image.repository=local/rabbitmq-debian",
            "rabbitmq.image.tag=3.10",
            "rabbitmq.command={/usr/lib/rabbitmq/bin/rabbitmq-server}",
            "rabbitmq.persistence.storageClass=fast",
            "rabbitmq.persistence.size=2Gi",
        ]
    )
    statefulset = find(docs, "StatefulSet", "-rabbitmq")
    spec = statefulset["spec"]
    claim = spec["volumeClaimTemplates"][0]
    assert claim["spec"]["storageClassName"] == "fast"
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert spec["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Delete"
    pod = spec["template"]["spec"]
    server = pod["containers"][0]
    assert server["image"] == "local/rabbitmq-debian:3.10"
    assert server["command"] == ["/usr/lib/rabbitmq/bin/rabbitmq-server"]
    env = {e["name"]: e["value"] for e in server["env"]}
    assert env["RABBITMQ_CONFIG_FILE"] == "/etc/jobtide/rabbitmq/rabbitmq.conf"
    assert env["RABBITMQ_ENABLED_PLUGINS_FILE"] == "/etc/jobtide/rabbitmq/enabled_plugins"
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    assert mounts == {
        "/etc/jobtide/rabbitmq": "config",
        "/var/lib/rabbitmq": "data",
        "/var/log/rabbitmq": "logs",
        "/tmp": "tmp",
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["emptyDir"]["medium"] == "Memory"
    assert {"startupProbe", "livenessProbe", "readinessProbe"} <= server.keys()
    # Ready while clients can connect; alive while the node answers at all.
    assert server["readinessProbe"]["tcpSocket"] == {"port": "amqp"}
    assert server["livenessProbe"]["tcpSocket"] == {"port": "management"}
    assert server["resources"]["limits"]["memory"] == "1Gi"
    no_pvc = find(
        render(set_values=[*ONE_PIPELINE, "rabbitmq.persistence.enabled=false"]), "StatefulSet", ""
    )
    assert "volumeClaimTemplates" not in no_pvc["spec"]
    data = [v for v in no_pvc["spec"]["template"]["spec"]["volumes"] if v["name"] == "data"]
    assert data == [{"name": "data", "emptyDir": {}}]


def test_rabbitmq_services_pdb_and_network_policy() -> None:
    docs = render(set_values=ONE_PIPELINE)
    service = find(docs, "Service", "-rabbitmq")
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [
        ("amqp", 5672),
        ("management", 15672),
    ]
    assert find(docs, "PodDisruptionBudget", "-rabbitmq")["spec"]["maxUnavailable"] == 1
    policy = find(docs, "NetworkPolicy", "-rabbitmq")["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "rabbitmq"
    assert policy["policyTypes"] == ["Ingress"]
    (source,) = policy["ingress"][0]["from"]
    assert source["podSelector"]["matchLabels"] == {"app.kubernetes.io/instance": "jobs"}
    assert source["podSelector"]["matchExpressions"] == [
        {
            "key": "app.kubernetes.io/component",
            "operator": "In",
            "values": ["scaler", "worker", "test"],
        }
    ]
    without = render(set_values=[*ONE_PIPELINE, "networkPolicy.enabled=false"])
    assert not [d for d in without if d["kind"] == "NetworkPolicy"]


HA = ["rabbitmq.replicas=3"]
MEMBERS = [f"jobs-jobtide-rabbitmq-{i}" for i in range(3)]
NODE_NAMES = [f"rabbit@{m}.jobs-jobtide-rabbitmq-headless.pipelines" for m in MEMBERS]


def test_a_clustered_broker_forms_from_its_members_stable_names() -> None:
    docs = render(set_values=[*ONE_PIPELINE, *HA])
    spec = find(docs, "StatefulSet", "-rabbitmq")["spec"]
    assert (spec["replicas"], spec["podManagementPolicy"]) == (3, "Parallel")
    assert spec["serviceName"] == "jobs-jobtide-rabbitmq-headless"
    pod = spec["template"]["spec"]
    server = pod["containers"][0]
    env = {e["name"]: e for e in server["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["RABBITMQ_USE_LONGNAME"]["value"] == "true"
    node_name = "rabbit@$(POD_NAME).jobs-jobtide-rabbitmq-headless.pipelines"
    assert env["RABBITMQ_NODENAME"]["value"] == node_name
    # Distribution on the pod's address (no loopback-only settings), on the fixed ports.
    assert {"ERL_EPMD_ADDRESS", "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"}.isdisjoint(env)
    assert env["RABBITMQ_DIST_PORT"]["value"] == "25672"
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert (ports["epmd"], ports["dist"]) == (4369, 25672)
    # Classic peer discovery lists every member's stable name.
    conf = rabbitmq_files(docs)["rabbitmq.conf"].splitlines()
    assert "cluster_formation.peer_discovery_backend = classic_config" in conf
    listed = [line.split(" = ")[1] for line in conf if ".classic_config.nodes." in line]
    assert listed == NODE_NAMES
    assert "quorum_queue.continuous_membership_reconciliation.target_group_size = 3" in conf
    # Members prefer different nodes unless the user set an affinity.
    term = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    labels = spec["template"]["metadata"]["labels"]
    assert term[0]["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    term = "rabbitmq.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
    expression = f"{term}.nodeSelectorTerms[0].matchExpressions[0]"
    own_affinity = [f"{expression}.key=pool", f"{expression}.operator=Exists"]
    own = find(render(set_values=[*ONE_PIPELINE, *HA, *own_affinity]), "StatefulSet")
    assert list(own["spec"]["template"]["spec"]["affinity"]) == ["nodeAffinity"]


def test_a_clustered_broker_replicates_every_queue_on_every_member() -> None:
    docs = render(set_values=[*ONE_PIPELINE, *HA])
    definitions = json.loads(rabbitmq_files(docs)["definitions.json"])
    (pipeline,) = scaler_config(docs)["pipelines"].values()
    expected = topology.definitions(
        [(pipeline["queue"], pipeline["maxAttempts"], pipeline["maxTaskSeconds"])], "/", 3
    )
    assert sorted(definitions["queues"], key=lambda q: q["name"]) == sorted(
        expected["queues"], key=lambda q: q["name"]
    )
    assert {q["arguments"][topology.GROUP_SIZE_ARGUMENT] for q in definitions["queues"]} == {3}
    # The workers (and the scaler) declare the queues with the same argument.
    assert worker_env(docs)["JOBTIDE_QUORUM_INITIAL_GROUP_SIZE"] == "3"
    # One member: no argument anywhere, as before.
    single = render(set_values=ONE_PIPELINE)
    assert "JOBTIDE_QUORUM_INITIAL_GROUP_SIZE" not in worker_env(single)
    queues = json.loads(rabbitmq_files(single)["definitions.json"])["queues"]
    assert not [q for q in queues if topology.GROUP_SIZE_ARGUMENT in q["arguments"]]


def worker_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in worker_container(docs, "resize")["env"]}


def test_a_clustered_broker_admits_erlang_distribution_from_its_members_only() -> None:
    docs = render(set_values=[*ONE_PIPELINE, *HA])
    clients, peers = find(docs, "NetworkPolicy", "-rabbitmq")["spec"]["ingress"]
    assert [p["port"] for p in clients["ports"]] == ["amqp", "management"]
    assert [p["port"] for p in peers["ports"]] == ["epmd", "dist"]
    (source,) = peers["from"]
    members = find(docs, "StatefulSet", "-rabbitmq")["spec"]["template"]["metadata"]["labels"]
    assert selects(source["podSelector"], members)
    for kind, suffix in (("Deployment", "-scaler"), ("Job", "-uninstall")):
        labels = find(docs, kind, suffix)["spec"]["template"]["metadata"]["labels"]
        assert not selects(source["podSelector"], labels)
    (job,) = scaler_jobs(docs)
    assert not selects(source["podSelector"], job["spec"]["template"]["metadata"]["labels"])


def test_a_clustered_member_stops_only_once_its_queues_keep_a_majority() -> None:
    docs = render(set_values=[*ONE_PIPELINE, *HA])
    pod = find(docs, "StatefulSet", "-rabbitmq")["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    script = server["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert "await_online_quorum_plus_one" in script
    # ... unless the pre-delete hook marked it: read through the downward API.
    assert "jobtide.io/uninstalling" in script
    volumes = {v["name"]: v for v in pod["volumes"]}
    (item,) = volumes["podinfo"]["downwardAPI"]["items"]
    assert item["fieldRef"]["fieldPath"] == "metadata.annotations"
    assert pod["terminationGracePeriodSeconds"] > 120  # the pre-stop's own limit
    # The budget leaves a majority; the one-member broker has none of this.
    assert find(docs, "PodDisruptionBudget", "-rabbitmq")["spec"]["maxUnavailable"] == 1
    single = find(render(set_values=ONE_PIPELINE), "StatefulSet", "-rabbitmq")["spec"]
    assert "lifecycle" not in single["template"]["spec"]["containers"][0]
    assert single["podManagementPolicy"] == "OrderedReady"


def test_the_uninstall_hook_may_annotate_the_members_and_nothing_else() -> None:
    docs = render(set_values=[*ONE_PIPELINE, *HA])
    hook = [d for d in docs if d["metadata"].get("annotations", {}).get("helm.sh/hook")]
    uninstall = [d for d in hook if d["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"]
    assert sorted(d["kind"] for d in uninstall) == ["Job", "Role", "RoleBinding", "ServiceAccount"]
    role = find(docs, "Role", "-rabbitmq-uninstall")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "resourceNames": MEMBERS, "verbs": ["patch"]}
    ]
    binding = find(docs, "RoleBinding", "-rabbitmq-uninstall")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    job = find(docs, "Job", "-rabbitmq-uninstall")["spec"]["template"]["spec"]
    assert job["serviceAccountName"] == binding["subjects"][0]["name"]
    (container,) = job["containers"]
    scaler = find(docs, "Deployment", "-scaler")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == scaler["image"]
    assert container["args"] == [
        "annotate", "--namespace", "pipelines", "jobtide.io/uninstalling=true", *MEMBERS
    ]  # fmt: skip
    # Its pod admits no connection, as the workers' do.
    policy = find(docs, "NetworkPolicy", "-workers")["spec"]
    assert selects(policy["podSelector"], find(docs, "Job", "-uninstall")["spec"]["template"]
                   ["metadata"]["labels"])  # fmt: skip
    assert not [d for d in render(set_values=ONE_PIPELINE) if d["kind"] == "Role" and
                d["metadata"]["name"].endswith("-uninstall")]  # fmt: skip


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, and `In` expressions) selects `labels`."""
    if not selector["matchLabels"].items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def test_scaler_admits_connections_on_its_metrics_port_only() -> None:
    docs = render(set_values=ONE_PIPELINE)
    policy = find(docs, "NetworkPolicy", "-scaler")["spec"]
    pod = find(docs, "Deployment", "-scaler")["spec"]["template"]
    assert selects(policy["podSelector"], pod["metadata"]["labels"])
    assert policy["policyTypes"] == ["Ingress"]
    # One rule: any client, to the named port that the container serves its metrics on.
    assert policy["ingress"] == [{"ports": [{"port": "metrics", "protocol": "TCP"}]}]
    ports = pod["spec"]["containers"][0]["ports"]
    assert [(p["name"], p["containerPort"]) for p in ports] == [("metrics", 8080)]


def test_worker_and_test_pods_admit_no_connections() -> None:
    docs = render(set_values=ONE_PIPELINE)
    policy = find(docs, "NetworkPolicy", "-workers")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    assert "ingress" not in policy  # no rule: nothing is admitted
    (job,) = scaler_jobs(docs)
    test_pod = find(docs, "Pod", "-test")
    assert selects(policy["podSelector"], job["spec"]["template"]["metadata"]["labels"])
    assert selects(policy["podSelector"], test_pod["metadata"]["labels"])
    # Nothing else of the release: the scaler and the broker have their own policies.
    for kind, suffix in (("Deployment", "-scaler"), ("StatefulSet", "-rabbitmq")):
        labels = find(docs, kind, suffix)["spec"]["template"]["metadata"]["labels"]
        assert not selects(policy["podSelector"], labels)
    # Another release's workers in the same namespace are another release's business.
    other = render(set_values=ONE_PIPELINE, release="other")
    (other_job,) = scaler_jobs(other)
    assert not selects(policy["podSelector"], other_job["spec"]["template"]["metadata"]["labels"])


# -- optional objects -------------------------------------------------------------------


def test_scaler_pdb_and_service_monitor_only_when_asked() -> None:
    single = render(set_values=ONE_PIPELINE)
    assert [d["metadata"]["name"] for d in single if d["kind"] == "PodDisruptionBudget"] == [
        "jobs-jobtide-rabbitmq"
    ]
    assert not [d for d in single if d["kind"] == "ServiceMonitor"]
    docs = render([SCENARIO["replicas-2"]])
    assert find(docs, "Deployment", "-scaler")["spec"]["replicas"] == 2
    assert find(docs, "PodDisruptionBudget", "-scaler")["spec"]["minAvailable"] == 1
    monitor = find(docs, "ServiceMonitor", "-scaler")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "30s"}
    ]
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "scaler"


def test_helm_test_checks_scaler_readiness_and_broker_port() -> None:
    docs = render(set_values=ONE_PIPELINE)
    pod = find(docs, "Pod", "-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    assert container["command"][:2] == ["python", "-c"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {
        "SCALER_READYZ": "http://jobs-jobtide-scaler.pipelines.svc:8080/readyz",
        "JOBTIDE_BROKER_HOST": "jobs-jobtide-rabbitmq.pipelines.svc",
        "JOBTIDE_BROKER_PORT": "5672",
    }
    compile(container["command"][2], "helm-test", "exec")


def rendered_notes(tmp_path: Path, values: Path | None) -> str:
    """NOTES.txt as `helm install` prints it. `helm template` leaves the notes out, so a copy
    of the chart carries one more template that includes them into a ConfigMap."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "notes-under-test.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes-under-test}\n"
        'data: {notes: {{ include (print $.Template.BasePath "/NOTES.txt") . | toJson }}}\n'
    )
    args = ["template", "jobs", str(chart), "--namespace", "pipelines"]
    args += ["--kube-version", HELM_KUBE_VERSION, "--show-only", "templates/notes-under-test.yaml"]
    args += ["-f", str(values)] if values is not None else ["--set", ONE_PIPELINE[0]]
    notes: str = yaml.safe_load(helm(*args, timeout=120).stdout)["data"]["notes"]
    return notes


@pytest.mark.parametrize("values", [None, SCENARIO["external-broker"]], ids=case_id)
def test_notes_publish_pod_gets_the_credentials_as_files(
    tmp_path: Path, values: Path | None
) -> None:
    """The notes' throw-away publishing pod reaches the broker as the workers do."""
    notes = rendered_notes(tmp_path, values)
    overrides = re.search(r"--overrides='(.*?)'", notes, re.DOTALL)
    assert overrides is not None, notes
    pod = json.loads(overrides.group(1))["spec"]
    worker = worker_pod_spec(render([values], ONE_PIPELINE if values is None else ()), "resize")
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert not [e for e in env.values() if "valueFrom" in e]
    assert env["JOBTIDE_BROKER_PASSWORD_FILE"]["value"] == f"{CREDENTIALS_DIR}/password"
    # Every file the environment names is mounted, from the workers' own volumes.
    mounted = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    for name, variable in env.items():
        if name.endswith("_FILE"):
            assert str(Path(variable["value"]).parent) in mounted, name
    volumes = {v["name"]: v for v in worker["volumes"]}
    assert pod["volumes"] == [volumes[name] for name in mounted.values()]
    assert pod["securityContext"] == worker["securityContext"]


def test_values_example_and_scenarios_are_valid_yaml_maps() -> None:
    for path in [EXAMPLE_VALUES, *SCENARIOS, CHART / "values.yaml"]:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path
