"""The test bed's real node: pods of the worker image run on it as the chart will run them
(pool label and taint, non-root, read-only root filesystem) and reach the apiserver, the
cluster DNS and a RabbitMQ through Services; their logs come back through the apiserver."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from jobtide_testbed.node import NODE_IP, PAUSE_IMAGE, POOL_LABEL, POOL_TAINT, Node
from jobtide_testbed.nodepods import WORKER_UID, create_pod, get_pod, logs, pool_pod, wait_phase
from jobtide_testbed.process import wait_for
from jobtide_testbed.rabbitmq import RabbitMQ, wait_counts
from jobtide_worker.config import BrokerConfig
from jobtide_worker.publisher import publish

pytestmark = pytest.mark.e2e

PROBE_SOURCE = Path(__file__).with_name("probe.py").read_text()


def test_node_registers_ready_as_a_tainted_pool_node(kube_node: Node) -> None:
    node = json.loads(kube_node.cluster.kubectl("get", "node", kube_node.name, "-o", "json").stdout)
    assert node["metadata"]["labels"][POOL_LABEL[0]] == POOL_LABEL[1]
    assert POOL_TAINT in node["spec"]["taints"]
    assert {"type": "InternalIP", "address": NODE_IP} in node["status"]["addresses"]
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    assert ready[0]["status"] == "True"


def test_pod_without_the_pool_toleration_is_not_scheduled(
    kube_node: Node, node_namespace: str
) -> None:
    cluster = kube_node.cluster
    create_pod(cluster, node_namespace, pool_pod("intruder", PAUSE_IMAGE, tolerate_pool=False))

    def unschedulable() -> bool:
        conditions = get_pod(cluster, node_namespace, "intruder")["status"].get("conditions", [])
        return any(
            c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable" for c in conditions
        )

    wait_for(unschedulable, timeout=60, what="scheduler to reject the pod")
    pod = get_pod(cluster, node_namespace, "intruder")
    message = next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
    assert "untolerated taint" in message["message"]
    assert "nodeName" not in pod["spec"]


def test_pod_reaches_apiserver_with_its_token_and_resolves_cluster_names(
    kube_node: Node, node_images: dict[str, str], node_namespace: str
) -> None:
    cluster = kube_node.cluster
    cluster.kubectl("create", "serviceaccount", "probe", "-n", node_namespace)
    names = "kubernetes.default.svc.cluster.local kubernetes.default example.com"
    manifest = pool_pod(
        "probe",
        node_images["hello"],
        command=["/usr/bin/python3", "-c", PROBE_SOURCE],
        env=[{"name": "PROBE_RESOLVE", "value": names}],
        service_account="probe",
    )
    create_pod(cluster, node_namespace, manifest)
    wait_phase(cluster, node_namespace, "probe", ("Succeeded",), timeout=120)

    report = json.loads(logs(cluster, node_namespace, "probe").strip().splitlines()[-1])
    cluster_ip = cluster.kubectl(
        "get", "service", "kubernetes", "-n", "default", "-o", "jsonpath={.spec.clusterIP}"
    ).stdout.strip()
    assert report["username"] == f"system:serviceaccount:{node_namespace}:probe"
    assert report["kubernetes_service_host"] == cluster_ip
    assert report["resolve:kubernetes.default.svc.cluster.local"] == cluster_ip
    assert report["resolve:kubernetes.default"] == cluster_ip  # through the search path
    # The cluster DNS answers only for the cluster: nothing resolves off the machine.
    assert str(report["resolve:example.com"]).startswith("error")
    assert report["uid"] == WORKER_UID
    assert report["gid"] == WORKER_UID
    assert report["root_filesystem_writable"] is False


def test_worker_pod_drains_a_queue_through_a_service_name(
    kube_node: Node, node_images: dict[str, str], node_namespace: str, rabbitmq: RabbitMQ
) -> None:
    cluster = kube_node.cluster
    (relay,) = kube_node.expose_host_port(node_namespace, "rabbitmq", rabbitmq.amqp_port)
    try:
        cluster.kubectl(
            "create",
            "secret",
            "generic",
            "broker",
            "-n",
            node_namespace,
            f"--from-literal=username={rabbitmq.username}",
            f"--from-literal=password={rabbitmq.password}",
        )
        queue = f"e2e-node-{secrets.token_hex(3)}"
        broker = BrokerConfig(
            host=rabbitmq.host,
            port=rabbitmq.amqp_port,
            username=rabbitmq.username,
            password=rabbitmq.password,
        )
        published = publish(queue, [{"seconds": 0.1} for _ in range(5)], broker=broker)

        def secret(key: str) -> dict[str, Any]:
            return {"secretKeyRef": {"name": "broker", "key": key}}

        env: list[dict[str, Any]] = [
            # The short name resolves through the pod's DNS search path to the Service.
            {"name": "JOBTIDE_BROKER_HOST", "value": "rabbitmq"},
            {"name": "JOBTIDE_BROKER_PORT", "value": str(rabbitmq.amqp_port)},
            {"name": "JOBTIDE_BROKER_USERNAME", "valueFrom": secret("username")},
            {"name": "JOBTIDE_BROKER_PASSWORD", "valueFrom": secret("password")},
            {"name": "JOBTIDE_QUEUE", "value": queue},
            {"name": "JOBTIDE_IDLE_TIMEOUT_SECONDS", "value": "3"},
            {"name": "JOBTIDE_LOG_FORMAT", "value": "json"},
        ]
        create_pod(cluster, node_namespace, pool_pod("worker", node_images["hello"], env=env))
        # The worker exits 0 by itself once the queue has been idle for its timeout.
        wait_phase(cluster, node_namespace, "worker", ("Succeeded",), timeout=120)

        entries = [
            json.loads(line) for line in logs(cluster, node_namespace, "worker").splitlines()
        ]
        done = [
            e["message_id"] for e in entries if e["message"] == "task" and e["outcome"] == "done"
        ]
        assert sorted(done) == sorted(published)
        wait_counts(rabbitmq, queue, ready=0, unacked=0)
    finally:
        relay.stop()
