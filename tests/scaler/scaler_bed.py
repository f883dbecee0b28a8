"""The scaler as a real process against the test bed: the control plane (as the chart's own
ServiceAccount and Role, rendered with helm) and RabbitMQ. Fixtures are in conftest.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika  # type: ignore[import-untyped]
import requests
import yaml
from jobtide_testbed.kube import KubeCluster
from jobtide_testbed.process import Process, free_port, wait_for
from jobtide_testbed.rabbitmq import RabbitMQ
from jobtide_testbed.tools import CHART, HELM_KUBE_VERSION, helm
from jobtide_worker import topology
from kubernetes import client as k8s
from prometheus_client.parser import text_string_to_metric_families

RELEASE = "rel"
# Fake pods keep running this long (jobtide_testbed/kwok/stages.yaml), so Jobs stay active.
KWOK_RUN_FOR = "jobtide.io/kwok-run-for"


def chart_rbac(namespace: str) -> list[dict[str, Any]]:
    """The chart's ServiceAccount, Role and RoleBinding for the scaler, and the ConfigMap it
    writes its status figures into, as helm renders them."""
    out = helm(
        "template", RELEASE, str(CHART), "--namespace", namespace,
        "--kube-version", HELM_KUBE_VERSION,
        "--show-only", "templates/scaler-serviceaccount.yaml",
        "--show-only", "templates/scaler-rbac.yaml",
        "--show-only", "templates/scaler-status-configmap.yaml",
        timeout=120,
    ).stdout  # fmt: skip
    return [doc for doc in yaml.safe_load_all(out) if doc]


def job_template(
    *,
    run_for: str = "1h",
    node_selector: dict[str, str] | None = None,
) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "containers": [{"name": "worker", "image": "example.invalid/jobtide-worker:test"}],
    }
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    return {
        "metadata": {"labels": {"team": "test"}},
        "spec": {
            "template": {"metadata": {"annotations": {KWOK_RUN_FOR: run_for}}, "spec": pod_spec}
        },
    }


def pipeline(queue: str, **settings: Any) -> dict[str, Any]:
    template = settings.pop("jobTemplate", None) or job_template()
    # One worker per message keeps the expected Job counts easy to read.
    return {"queue": queue, "jobTemplate": template, "messagesPerWorker": 1, **settings}


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


@dataclass
class ScalerProcess:
    process: Process
    metrics_port: int

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        self.process.check_alive()
        return scrape(self.metrics_port)

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def cycles(self, pipeline: str) -> float:
        return sum(
            v
            for (n, labels), v in self.metrics().items()
            if n == "jobtide_decisions_total" and ("pipeline", pipeline) in labels
        )

    def wait_cycles(self, pipeline: str, count: int, timeout: float = 60) -> None:
        """Let `count` more cycles pass (counted by the scaler itself, not by the clock)."""
        target = self.cycles(pipeline) + count
        wait_for(
            lambda: self.cycles(pipeline) >= target, timeout=timeout, what=f"{count} scaler cycles"
        )

    def log(self) -> str:
        return self.process.log_path.read_text(errors="replace")


@dataclass
class ScalerBed:
    kube: KubeCluster
    namespace: str
    broker: RabbitMQ
    root: Path
    kubeconfig: Path
    processes: list[ScalerProcess] = field(default_factory=list)
    # Set to a proxy's port to put it between the scaler and the management API.
    management_port: int | None = None
    # The scaler's JOBTIDE_BROKER_* variables when not the broker's plain ones (TLS).
    broker_env: dict[str, str] | None = None

    def config(self, pipelines: dict[str, dict[str, Any]], **top: Any) -> Path:
        document = {
            "namespace": self.namespace,
            "release": RELEASE,
            "pollIntervalSeconds": 0.5,
            "leaderElection": {"enabled": False},
            "pipelines": pipelines,
        }
        document.update(top)
        path = self.root / f"config-{len(list(self.root.glob('config-*')))}.yaml"
        path.write_text(yaml.safe_dump(document))
        return path

    def env(self, metrics_port: int) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("KUBERNETES_", "JOBTIDE_BROKER_"))
        }
        env.update(
            KUBECONFIG=str(self.kubeconfig),
            JOBTIDE_BROKER_HOST="127.0.0.1",
            JOBTIDE_BROKER_PORT=str(self.broker.amqp_port),
            JOBTIDE_BROKER_MANAGEMENT_PORT=str(self.management_port or self.broker.management_port),
            JOBTIDE_BROKER_VHOST=self.broker.vhost,
            JOBTIDE_BROKER_USERNAME=self.broker.username,
            JOBTIDE_BROKER_PASSWORD=self.broker.password,
            PYTHONUNBUFFERED="1",
        )
        env.update(self.broker_env or {})
        return env

    def _patch_metrics_port(self, config: Path, port: int) -> None:
        document = yaml.safe_load(config.read_text())
        document["metrics"] = {"port": port}
        config.write_text(yaml.safe_dump(document))

    def start(self, config: Path, *args: str, name: str = "scaler") -> ScalerProcess:
        port = free_port()
        own = self.root / f"{name}-{port}.yaml"
        own.write_text(config.read_text())
        self._patch_metrics_port(own, port)
        argv = [sys.executable, "-m", "jobtide_scaler", "run", "--config", str(own), *args]
        process = Process(f"{name}-{port}", argv, self.root / "logs", env=self.env(port))
        scaler = ScalerProcess(process.start(), port)
        self.processes.append(scaler)
        wait_for(lambda: scaler.metrics() is not None, timeout=60, what=f"{name} metrics")
        return scaler

    def run(self, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
        port = free_port()
        own = self.root / f"once-{port}.yaml"
        own.write_text(config.read_text())
        self._patch_metrics_port(own, port)
        argv = [sys.executable, "-m", "jobtide_scaler", "run", "--config", str(own), *args]
        return subprocess.run(
            argv, env=self.env(port), capture_output=True, text=True, timeout=120, check=False
        )

    # -- the broker ---------------------------------------------------------------------
    def _channel_do(self, action: Callable[[Any], None]) -> None:
        b = self.broker
        parameters = pika.ConnectionParameters(
            "127.0.0.1", b.amqp_port, b.vhost, pika.PlainCredentials(b.username, b.password)
        )
        connection = pika.BlockingConnection(parameters)
        try:
            action(connection.channel())
        finally:
            connection.close()

    def declare(self, queue: str) -> None:
        self._channel_do(lambda channel: topology.declare(channel, queue))

    def publish(self, queue: str, count: int) -> None:
        def send(channel: Any) -> None:
            topology.declare(channel, queue)
            channel.confirm_delivery()
            for i in range(count):
                channel.basic_publish(
                    "", queue, f"task {i}".encode(), pika.BasicProperties(delivery_mode=2)
                )

        self._channel_do(send)

    # -- the cluster, as the admin ----------------------------------------------------------
    def jobs(self, pipeline: str | None = None) -> list[Any]:
        selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=worker"
        if pipeline:
            selector += f",jobtide.io/pipeline={pipeline}"
        batch = k8s.BatchV1Api(self.kube.api_client())
        return list(batch.list_namespaced_job(self.namespace, label_selector=selector).items)

    def wait_jobs(self, count: int, pipeline: str | None = None, timeout: float = 60) -> None:
        wait_for(
            lambda: len(self.jobs(pipeline)) >= count,
            timeout=timeout,
            what=f"{count} Jobs of {pipeline or 'any pipeline'}",
        )

    def stop_all(self) -> None:
        for scaler in self.processes:
            scaler.process.stop(timeout=10)


def make_bed(
    kube: KubeCluster, namespace: str, broker: RabbitMQ, root: Path, *, server: str | None = None
) -> ScalerBed:
    """`server`: where the scaler finds the apiserver (a proxy in front of it), if not at home."""
    docs = chart_rbac(namespace)
    kube.apply(docs)
    account = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]
    token = kube.service_account_token(namespace, account)
    kubeconfig = kube.kubeconfig_for_token(token, root / "scaler.kubeconfig", server=server)
    return ScalerBed(kube, namespace, broker, root, kubeconfig)
