"""Rotating the broker's credentials needs no pod restart (charts/jobtide README, "Rotating the
broker's credentials"), shown on the test bed's real node: the chart runs against an external
broker (the test bed's host RabbitMQ) as a user of the test's own, named with its password by
`externalBroker.existingSecret`. The user's password is changed on the broker (the old one is
then refused, and the scaler's reads fail: it stops deciding on stale counts), then in the
Secret. Once kubelet has rewritten the mounted files, the same scaler pod decides on fresh
counts again; a worker pod running since before the rotation reconnects with the new password
when the broker closes its connection and does new tasks; a new worker Job connects too; no pod
restarts. How long kubelet took to rewrite the files is printed, never asserted."""

from __future__ import annotations

import dataclasses
import functools
import json
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika  # type: ignore[import-untyped]
import pika.exceptions  # type: ignore[import-untyped]
import pytest
import requests
from jobtide_testbed.chartnode import (
    ContainerLog,
    Helm,
    WorkerRecord,
    completed_ids,
    component_selector,
    diagnostics,
    get_pods,
    log_message,
    node_values,
    scaler_metric,
    write_values,
)
from jobtide_testbed.node import Node
from jobtide_testbed.process import wait_for
from jobtide_testbed.rabbitmq import RabbitMQ, wait_counts
from jobtide_testbed.tools import kubectl
from jobtide_worker.config import BrokerConfig
from jobtide_worker.publisher import publish

pytestmark = pytest.mark.e2e

RELEASE = "rotation"
PIPELINE = "hello"
SECRET = "broker-credentials"  # noqa: S105 (the Secret's name)
SERVICE = "broker"  # the host broker's Service in the namespace
MAX_WORKERS = 2
STALE_AFTER_SECONDS = 3  # the scaler's brokerStaleAfterSeconds: its refused reads show soon
SCALER = component_selector(RELEASE, "scaler")
WORKERS = component_selector(RELEASE, "worker")
# The worker's line for a connection refused while its credentials' files may still change.
RETRYING = "the broker refused the password, retrying with the credentials' files"
AUTH_REFUSED = (pika.exceptions.ProbableAuthenticationError, pika.exceptions.AuthenticationError)


def put_secret(kubeconfig: Path, namespace: str, user: str, password: str) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET},
              "stringData": {"username": user, "password": password}}  # fmt: skip
    kubectl(kubeconfig, "apply", "-n", namespace, "-f", "-", stdin=json.dumps(secret))


@pytest.fixture
def user(rabbitmq: RabbitMQ) -> Iterator[BrokerConfig]:
    """A broker user of the test's own with all rights on the vhost, as the host reaches it;
    removed at the end with the test's queues."""
    name = f"rotation-{secrets.token_hex(3)}"
    password = secrets.token_urlsafe(18)
    rabbitmq.set_user(name, password)
    try:
        yield BrokerConfig(host=rabbitmq.host, port=rabbitmq.amqp_port, vhost=rabbitmq.vhost,
                           username=name, password=password,
                           management_port=rabbitmq.management_port)  # fmt: skip
    finally:
        rabbitmq.delete_user(name)
        for queue in (name, f"{name}.dlq"):
            rabbitmq.delete_queue(queue)


@pytest.fixture
def release(
    kube_node: Node,
    node_namespace: str,
    rabbitmq: RabbitMQ,
    user: BrokerConfig,
    chart_images: list[str],
    tmp_path: Path,
) -> Iterator[Helm]:
    kubeconfig = kube_node.cluster.kubeconfig
    ports = (rabbitmq.amqp_port, rabbitmq.management_port)
    relays = kube_node.expose_host_port(node_namespace, SERVICE, *ports)
    try:
        put_secret(kubeconfig, node_namespace, user.username, user.password)
        values = node_values()
        values["scaler"].update(pollIntervalSeconds=1, brokerStaleAfterSeconds=STALE_AFTER_SECONDS)
        values["rabbitmq"]["enabled"] = False
        values["externalBroker"] = {"host": SERVICE, "port": ports[0], "managementPort": ports[1],
                                    "vhost": rabbitmq.vhost, "existingSecret": SECRET}  # fmt: skip
        values["pipelineDefaults"]["env"] = [{"name": "JOBTIDE_LOG_FORMAT", "value": "json"}]
        # Workers stay until the namespace goes: the one started first lives through the rotation.
        values["pipelines"] = {PIPELINE: {
            "queue": user.username, "maxWorkers": MAX_WORKERS, "maxNewPerCycle": MAX_WORKERS,
            "idleTimeoutSeconds": 600, "quietCheckSeconds": 0,
        }}  # fmt: skip
        helm = Helm(kubeconfig, node_namespace)
        helm.install(RELEASE, [write_values(tmp_path / "values.yaml", values)])
        try:
            yield helm
        finally:
            helm("uninstall", RELEASE, "--wait", check=False)
    finally:
        for relay in relays:
            relay.stop()


def secret_file(node: Node, pod: dict[str, Any], key: str) -> Path:
    """Where kubelet keeps `key` of the Secret's volume of `pod` on the host (the files the
    pod's containers see)."""
    (volume,) = [str(v["name"]) for v in pod["spec"]["volumes"]
                 if v.get("secret", {}).get("secretName") == SECRET]  # fmt: skip
    volumes = Path(node.root) / "kubelet" / "pods" / str(pod["metadata"]["uid"]) / "volumes"
    return volumes / "kubernetes.io~secret" / volume / key


def identity(pod: dict[str, Any]) -> tuple[str, list[int]]:
    """The pod's UID and its containers' restart counts."""
    statuses = pod["status"].get("containerStatuses", [])
    return pod["metadata"]["uid"], [c["restartCount"] for c in statuses]


def done_in(lines: list[str]) -> set[str]:
    return completed_ids([WorkerRecord(job="", pipeline=PIPELINE, log="\n".join(lines))])


def test_rotated_password_reaches_running_pods_without_restart(
    kube_node: Node, release: Helm, rabbitmq: RabbitMQ, user: BrokerConfig, node_namespace: str
) -> None:
    kubeconfig = kube_node.cluster.kubeconfig
    queue = user.username
    pods = functools.partial(get_pods, kubeconfig, node_namespace)
    (scaler,) = pods(SCALER)

    def decisions(result: str) -> float:
        series = f'jobtide_decisions_total{{pipeline="{PIPELINE}",result="{result}"}}'
        return scaler_metric(scaler, series) or 0.0

    def worker_connections() -> dict[str, dict[str, Any]]:
        """The broker's connections of the release's workers, by pod name."""
        found = {}
        for c in rabbitmq.connections():
            name = str(c.get("client_properties", {}).get("connection_name", ""))
            if c.get("user") == queue and name.startswith("jobtide-worker "):
                found[name.split(" ", 1)[1]] = c
        return found

    began = time.monotonic()
    try:
        # A worker pod runs the first tasks with the first password.
        first = publish(queue, [{"seconds": 0.2}] * 2, broker=user)
        wait_for(lambda: any(p["status"].get("phase") == "Running" for p in pods(WORKERS)),
                 timeout=120, what="a running worker pod", interval=1)  # fmt: skip
        (worker,) = pods(WORKERS)
        with ContainerLog(kube_node, worker) as worker_log:

            def worker_done() -> set[str]:
                worker_log.read()
                return done_in(worker_log.lines)

            def worker_said() -> list[str | None]:
                worker_log.read()
                return [log_message(line) for line in worker_log.lines]

            wait_for(lambda: worker_done() >= set(first), timeout=60,
                     what="the first tasks done", interval=0.5)  # fmt: skip
            worker_name = worker["metadata"]["name"]
            # The management API lists a connection once its statistics come in.
            wait_for(lambda: worker_name in worker_connections(), timeout=30,
                     what="the worker's connection listed", interval=0.5)  # fmt: skip
            before = worker_connections()[worker_name]

            # Rotate: a real change on the broker, so the old password is refused.
            new = secrets.token_urlsafe(18)
            rabbitmq.set_user(queue, new)
            with pytest.raises(AUTH_REFUSED):
                user.connect("rotation-old-password").close()
            old_api = requests.get(f"{user.management_url}/api/overview",
                                   auth=(queue, user.password), timeout=10)  # fmt: skip
            assert old_api.status_code == 401
            # The scaler's management reads are refused: its counts go stale, it creates nothing.
            stale = decisions("stale")
            wait_for(lambda: decisions("stale") > stale, timeout=60,
                     what="the scaler deciding on stale counts", interval=0.5)  # fmt: skip
            # The broker closes the worker's connection: it tries again with its files, refused.
            rabbitmq.close_connection(before["name"])
            wait_for(lambda: RETRYING in worker_said(), timeout=60,
                     what="the worker refused with the old password", interval=0.5)  # fmt: skip

            put_secret(kubeconfig, node_namespace, queue, new)
            updated = time.monotonic()
            fresh = decisions("none")
            scaler_file = secret_file(kube_node, scaler, "password")
            worker_file = secret_file(kube_node, worker, "password")
            # Seconds after the Secret's update each was first seen.
            checks: dict[str, Callable[[], bool]] = {
                "scaler file": lambda: scaler_file.read_text() == new,
                "worker file": lambda: worker_file.read_text() == new,
                "scaler fresh": lambda: decisions("none") > fresh,
            }
            seen: dict[str, float] = {}

            def rotation_reached() -> bool:
                for what, check in checks.items():
                    if what not in seen and check():
                        seen[what] = time.monotonic() - updated
                return len(seen) == len(checks)

            wait_for(rotation_reached, timeout=180, interval=0.2,
                     what="kubelet rewriting the Secret's files, the scaler deciding on "
                     "fresh counts again")  # fmt: skip

            # The worker, still the same process, connects with the new password.
            def reconnected() -> bool:
                now = worker_connections().get(worker_name)
                return now is not None and now["name"] != before["name"]

            wait_for(reconnected, timeout=60, what="the worker reconnected", interval=0.5)
            reconnected_after = time.monotonic() - updated
            rotated = dataclasses.replace(user, password=new)
            second = publish(queue, [{"seconds": 0.2}] * 2, broker=rotated, declare=False)
            wait_for(lambda: worker_done() >= set(second), timeout=60,
                     what="the reconnected worker doing new tasks", interval=0.5)  # fmt: skip

            # More tasks than one worker's share: the scaler starts a new worker Job.
            third = publish(queue, [{"seconds": 3}] * 6, broker=rotated, declare=False)
            wait_for(lambda: len(worker_connections()) == MAX_WORKERS, timeout=120,
                     what="a new worker connected", interval=0.5)  # fmt: skip
            (newcomer,) = [p for p in pods(WORKERS) if p["metadata"]["name"] != worker_name]

            def newcomer_done() -> set[str]:
                name = newcomer["metadata"]["name"]
                return done_in(kubectl(kubeconfig, "logs", "-n", node_namespace, name).stdout
                               .splitlines())  # fmt: skip

            wait_for(lambda: worker_done() | newcomer_done() >= set(third), timeout=120,
                     what="every task done", interval=1)  # fmt: skip
    except BaseException:
        print("\n\n".join(diagnostics(kubeconfig, node_namespace)))
        raise

    # Nothing restarted: the same scaler and first worker pods, no container restart.
    after = {p["metadata"]["name"]: p for p in pods(SCALER) + pods(WORKERS)}
    assert identity(after[scaler["metadata"]["name"]]) == (scaler["metadata"]["uid"], [0])
    assert identity(after[worker["metadata"]["name"]]) == (worker["metadata"]["uid"], [0])
    assert {p["status"]["phase"] for p in after.values()} == {"Running"}
    # The worker connected anew once (after the broker closed it), refused until its files
    # changed, and did the new tasks itself.
    messages = [log_message(line) for line in worker_log.lines]
    assert messages.count("consuming") == 2, worker_log.lines
    refused = messages.count(RETRYING)
    assert refused >= 1
    assert "worker exiting" not in messages
    assert done_in(worker_log.lines) >= set(first) | set(second)
    # The new worker Job connected with the new password and did its share.
    newcomer_tasks = newcomer_done() & set(third)
    assert newcomer_tasks
    assert done_in(worker_log.lines) | newcomer_tasks >= set(third)
    wait_counts(rabbitmq, queue, ready=0, unacked=0)
    # Two worker Jobs in all: none was created while the credentials were wrong.
    assert scaler_metric(scaler, f'jobtide_jobs_created_total{{pipeline="{PIPELINE}"}}') == 2
    print(
        f"\nkubelet rewrote the Secret's files {seen['scaler file']:.1f} s (scaler pod) and "
        f"{seen['worker file']:.1f} s (worker pod) after the Secret's update; the scaler "
        f"decided on fresh counts {seen['scaler fresh']:.1f} s after it and the worker (refused "
        f"{refused} times with the old password) reconnected {reconnected_after:.1f} s after "
        f"it; the new worker did {len(newcomer_tasks)} of {len(third)} tasks; "
        f"{time.monotonic() - began:.0f} s in all"
    )
