"""Restart anything, lose nothing: the chart on the test bed's real node, with the broker's
data on a PersistentVolume, works through a stream of tasks while, one after the other, the
broker pod is deleted, a busy worker is killed with SIGKILL, the scaler pod is deleted and a
busy worker pod is deleted (SIGTERM). Every published task must still be done, nothing left
queued, unacked or dead-lettered, Jobs never above the cap, a scaler leading again and the
workers back to zero. How long each disruption took to heal and how many tasks ran twice are
printed, not asserted."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from jobtide_testbed.chartnode import (
    WORKER_SELECTOR,
    Helm,
    ReleaseBroker,
    Watcher,
    WorkerRecord,
    diagnostics,
    log_entry,
    write_values,
)
from jobtide_testbed.node import Node
from jobtide_testbed.process import wait_for
from jobtide_testbed.tools import kubectl
from jobtide_worker.publisher import publish
from test_chart_e2e import IDLE_EXITS, MAX_WORKERS, PIPELINE, QUEUE, e2e_values

pytestmark = pytest.mark.e2e

RELEASE = "chaos"
# Published in two waves around the broker's restart (a producer does not publish into an
# outage); together enough work to keep every worker busy through all four disruptions.
WAVES = (150, 150)
TASK_SECONDS = (0.5, 2.0)
# Long enough that a worker finishing while the broker is away (when the watcher's samples
# fail) is still there, with its log, when sampling resumes.
TTL_SECONDS = 60
BROKER_VOLUME_SIZE = "1Gi"
# The chart's rabbitmq.podSecurityContext: a hostPath volume is not chowned to fsGroup.
RABBITMQ_UID = 999
BROKER_SELECTOR = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=rabbitmq"
SCALER_SELECTOR = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=scaler"
RELEASE_WORKERS = f"app.kubernetes.io/instance={RELEASE},{WORKER_SELECTOR}"
SIGKILL_EXIT_CODE = 128 + signal.SIGKILL


def chaos_values(storage_class: str) -> dict[str, Any]:
    """The burst test's values, with the broker's data on a volume of `storage_class`."""
    values = e2e_values()
    values["rabbitmq"]["persistence"] = {
        "enabled": True,
        "storageClass": storage_class,
        "size": BROKER_VOLUME_SIZE,
    }
    values["pipelines"][PIPELINE]["ttlSecondsAfterFinished"] = TTL_SECONDS
    return values


@pytest.fixture
def broker_storage_class(kube_node: Node, node_namespace: str, tmp_path: Path) -> Iterator[str]:
    """A static hostPath PersistentVolume for the broker's claim (the test bed has no
    provisioner), in a storage class of its own; removed with its folder afterwards."""
    kubeconfig = kube_node.cluster.kubeconfig
    # Not under tmp_path: the broker's non-root user must be able to reach the folder.
    folder = Path(tempfile.mkdtemp(prefix="jobtide-e2e-broker-", dir="/var/tmp"))
    os.chown(folder, RABBITMQ_UID, RABBITMQ_UID)
    storage_class = name = f"{node_namespace}-broker"
    manifest = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name},
        "spec": {
            "storageClassName": storage_class,
            "capacity": {"storage": BROKER_VOLUME_SIZE},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": str(folder), "type": "Directory"},
        },
    }
    kubectl(kubeconfig, "apply", "-f", str(write_values(tmp_path / "pv.yaml", manifest)))
    try:
        yield storage_class
    finally:
        # The claim outlives the release only when the uninstall failed; its protection
        # finalizer holds it until the broker pod is gone, so the folder is no longer in use.
        kubectl(kubeconfig, "delete", "pvc", "-n", node_namespace, "-l", BROKER_SELECTOR,
                "--wait", "--timeout=120s", check=False, timeout=150)  # fmt: skip
        kubectl(kubeconfig, "delete", "pv", name, "--wait", "--timeout=60s",
                check=False, timeout=90)  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def release(
    kube_node: Node,
    chart_images: list[str],
    node_namespace: str,
    broker_storage_class: str,
    tmp_path: Path,
) -> Iterator[Helm]:
    helm = Helm(kube_node.cluster.kubeconfig, node_namespace)
    values = write_values(tmp_path / "values.yaml", chaos_values(broker_storage_class))
    helm.install(RELEASE, [values])
    yield helm
    helm("uninstall", RELEASE, "--wait", check=False)


def get_pods(kubeconfig: Path, namespace: str, selector: str) -> list[dict[str, Any]]:
    out = kubectl(kubeconfig, "get", "pods", "-n", namespace, "-o", "json", "-l", selector).stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def busy_worker_pods(
    broker: ReleaseBroker, kubeconfig: Path, namespace: str
) -> list[dict[str, Any]]:
    """Running worker pods holding an unacknowledged delivery, i.e. in the middle of a task:
    the broker's channels name their peer's address, which is the pod's IP."""
    busy_ips = {
        channel["connection_details"]["peer_host"]
        for channel in broker.api("channels")
        if channel.get("messages_unacknowledged", 0) > 0
    }
    return [
        pod
        for pod in get_pods(kubeconfig, namespace, RELEASE_WORKERS)
        if pod["status"].get("phase") == "Running"
        and "deletionTimestamp" not in pod["metadata"]
        and pod["status"].get("podIP") in busy_ips
    ]


def container_pid(node: Node, pod: dict[str, Any]) -> int:
    """The host PID of the pod's (only) container: the worker process itself, since the
    image's entrypoint runs the worker in exec form."""
    container_id = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    for line in node.ctr("tasks", "ls").stdout.splitlines()[1:]:
        task, pid, *_ = line.split()
        if task == container_id:
            return int(pid)
    raise LookupError(f"no containerd task for {pod['metadata']['name']}")


def log_message(line: str) -> str | None:
    message = log_entry(line).get("message")
    return None if message is None else str(message)


def is_task_done(line: str) -> bool:
    entry = log_entry(line)
    return (entry.get("message"), entry.get("outcome")) == ("task", "done")


class ContainerLog:
    """A worker pod's container log, read from kubelet's file on the host. Opened before the
    pod is disrupted, it stays readable after kubelet removes it with the pod, and a line
    shows there as soon as the worker writes it (no API round trip)."""

    def __init__(self, node: Node, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        container = pod["spec"]["containers"][0]["name"]
        folder = f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
        # restartPolicy Never: the first container's log is the only one.
        self._file = (node.root / "pod-logs" / folder / container / "0.log").open("rb")
        self.lines: list[str] = []
        self._unread = b""  # a record still being written
        self._unfinished = ""  # parts of a line split over records

    def read(self) -> list[str]:
        """Lines written since the last read. The file's lines are CRI records,
        `<time> <stream> <P|F> <text>`, P marking a part of a longer line."""
        *records, self._unread = (self._unread + self._file.read()).split(b"\n")
        new: list[str] = []
        for record in records:
            _, _, tag, text = record.decode().split(" ", 3)
            self._unfinished += text
            if tag == "F":
                new.append(self._unfinished)
                self._unfinished = ""
        self.lines += new
        return new

    def next_task_done(self, timeout: float) -> None:
        """Return as soon as the worker logs a task done after this call."""
        deadline = time.monotonic() + timeout
        self.read()
        while not any(is_task_done(line) for line in self.read()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no task done within {timeout:.0f} s")
            time.sleep(0.01)

    def text_until_exit(self, timeout: float) -> str:
        """The whole log, once the worker has logged its exit."""

        def exited() -> bool:
            self.read()
            return any(log_message(line) == "worker exiting" for line in self.lines)

        wait_for(exited, timeout=timeout, interval=0.2, what="the worker's exit line")
        return "".join(f"{line}\n" for line in self.lines)

    def __enter__(self) -> ContainerLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def executions(records: list[WorkerRecord]) -> Counter[str]:
    """Handler runs that succeeded, per message id: `done`, and `ack-lost` after a success
    whose ack the channel's loss swallowed (the broker then redelivers the task)."""
    runs: Counter[str] = Counter()
    for record in records:
        for entry in record.entries():
            if entry.get("message") != "task":
                continue
            ack_lost_after_success = entry.get("outcome") == "ack-lost" and str(
                entry.get("reason", "")
            ).endswith("before done")
            if entry.get("outcome") == "done" or ack_lost_after_success:
                runs[str(entry["message_id"])] += 1
    return runs


def completed_ids(records: list[WorkerRecord]) -> set[str]:
    """Message ids acknowledged after a successful run: `done`, or `duplicate` (the same
    worker did the task before its ack was lost, and acked the redelivery without a rerun)."""
    return {
        str(entry["message_id"])
        for record in records
        for entry in record.entries()
        if entry.get("message") == "task" and entry.get("outcome") in ("done", "duplicate")
    }


def lease_holder(kubeconfig: Path, namespace: str) -> str:
    # The scaler's Lease is named as its Deployment (both the chart's scaler fullname).
    deployment = kubectl(kubeconfig, "get", "deployment", "-n", namespace, "-l", SCALER_SELECTOR,
                         "-o", "jsonpath={.items[0].metadata.name}").stdout  # fmt: skip
    lease = json.loads(kubectl(kubeconfig, "get", "lease", deployment, "-n", namespace, "-o",
                               "json", check=False).stdout or "{}")  # fmt: skip
    return str(lease.get("spec", {}).get("holderIdentity") or "")


def scaler_metric(pod: dict[str, Any], name: str) -> float | None:
    port = next(
        p["containerPort"]
        for container in pod["spec"]["containers"]
        for p in container.get("ports", [])
        if p.get("name") == "metrics"
    )
    response = requests.get(f"http://{pod['status']['podIP']}:{port}/metrics", timeout=10)
    response.raise_for_status()
    for line in response.text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None


def test_restarts_of_broker_scaler_and_workers_lose_no_task(
    kube_node: Node, release: Helm, node_namespace: str
) -> None:
    kubeconfig = kube_node.cluster.kubeconfig
    namespace = node_namespace
    broker = ReleaseBroker.find(kubeconfig, namespace, RELEASE)
    claims = kubectl(kubeconfig, "get", "pvc", "-n", namespace, "-l", BROKER_SELECTOR,
                     "-o", "jsonpath={.items[*].status.phase}").stdout  # fmt: skip
    assert claims == "Bound"  # the broker really keeps its data on the volume
    rng = random.Random(19)
    published: list[str] = []
    healed: dict[str, float] = {}
    # Watcher-relative times during which its samples may fail: the broker is away, or a
    # deleted pod vanishes between the watcher's listing and its log read.
    disrupted: list[tuple[float, float]] = []

    def tasks(count: int) -> list[dict[str, float]]:
        return [{"seconds": round(rng.uniform(*TASK_SECONDS), 2)} for _ in range(count)]

    def running_workers() -> list[dict[str, Any]]:
        pods = get_pods(kubeconfig, namespace, RELEASE_WORKERS)
        return [p for p in pods if p["status"].get("phase") == "Running"]

    def busy_worker_once_all_are(timeout: float) -> dict[str, Any]:
        """A busy worker pod, from a look at the release that found every worker busy."""
        busy: list[dict[str, Any]] = []

        def all_busy() -> bool:
            busy[:] = busy_worker_pods(broker, kubeconfig, namespace)
            return len(busy) == MAX_WORKERS

        wait_for(all_busy, timeout=timeout, what="every worker busy with a task", interval=1)
        return busy[0]

    with Watcher(kubeconfig, namespace, broker, {PIPELINE: QUEUE}) as watcher:
        try:
            published += publish(QUEUE, tasks(WAVES[0]), broker=broker.config(), declare=False)
            busy_worker_once_all_are(timeout=180)

            # 1. The broker pod: the StatefulSet makes a new one on the same claim, so the
            # quorum queue's messages (ready, and those unacked at the time) come back.
            (old_broker,) = get_pods(kubeconfig, namespace, BROKER_SELECTOR)
            began, outage_from = time.monotonic(), time.monotonic() - watcher.started
            kubectl(kubeconfig, "delete", "pod", old_broker["metadata"]["name"], "-n",
                    namespace, "--wait=false")  # fmt: skip

            def new_broker_ready() -> bool:
                pods = get_pods(kubeconfig, namespace, BROKER_SELECTOR)
                return any(
                    p["metadata"]["uid"] != old_broker["metadata"]["uid"] and is_ready(p)
                    for p in pods
                )

            wait_for(new_broker_ready, timeout=180, what="a new broker pod ready", interval=1)
            broker = ReleaseBroker.find(kubeconfig, namespace, RELEASE)
            watcher.broker = broker
            # Healed once workers ack again: acks counted by the new broker process.
            wait_for(
                lambda: int(broker.queue(QUEUE).get("message_stats", {}).get("ack", 0)) > 0,
                timeout=120,
                what="workers acking tasks on the restarted broker",
                interval=1,
            )
            healed["broker pod deleted"] = time.monotonic() - began
            disrupted.append((outage_from, time.monotonic() - watcher.started + 2))
            published += publish(QUEUE, tasks(WAVES[1]), broker=broker.config(), declare=False)

            # 2. A crash: SIGKILL to a busy worker's process, found on the host. Its Job
            # fails (backoffLimit 0) and keeps the pod, so its log stays for the watcher.
            # A worker writes a task's line a moment after the ack, so a kill in between
            # would hide a task that is done: the kill comes right after a task's line,
            # while the next task (at least 0.5 s) runs, unacked, to be redelivered.
            crashed = busy_worker_once_all_are(timeout=120)
            crashed_name = crashed["metadata"]["name"]
            crashed_pid = container_pid(kube_node, crashed)
            with ContainerLog(kube_node, crashed) as crashed_log:
                crashed_log.next_task_done(timeout=30)
                os.kill(crashed_pid, signal.SIGKILL)
            began = time.monotonic()
            wait_for(
                lambda: (
                    crashed_name in watcher.workers
                    and watcher.workers[crashed_name].log is not None
                ),
                timeout=60,
                what="the killed worker's pod failed and its log kept",
                interval=1,
            )
            wait_for(
                lambda: (
                    crashed_name not in {p["metadata"]["name"] for p in running_workers()}
                    and len(running_workers()) == MAX_WORKERS
                ),
                timeout=120,
                what="a replacement worker running",
                interval=1,
            )
            healed["worker killed (SIGKILL)"] = time.monotonic() - began

            # 3. The scaler pod: the Deployment makes a new one, which takes the Lease (the
            # old one hands it back on SIGTERM).
            (old_scaler,) = get_pods(kubeconfig, namespace, SCALER_SELECTOR)
            old_holder = lease_holder(kubeconfig, namespace)
            assert old_holder.startswith(f"{old_scaler['metadata']['name']}_")
            began = time.monotonic()
            kubectl(kubeconfig, "delete", "pod", old_scaler["metadata"]["name"], "-n",
                    namespace, "--wait=false")  # fmt: skip

            def new_scaler_leads() -> bool:
                holder = lease_holder(kubeconfig, namespace)
                return any(
                    p["metadata"]["uid"] != old_scaler["metadata"]["uid"]
                    and holder.startswith(f"{p['metadata']['name']}_")
                    for p in get_pods(kubeconfig, namespace, SCALER_SELECTOR)
                )

            wait_for(
                new_scaler_leads, timeout=120, what="a new scaler holding the Lease", interval=1
            )
            healed["scaler pod deleted"] = time.monotonic() - began

            # 4. A busy worker pod deleted: SIGTERM, the running task finishes within the
            # grace (or is requeued). The pod goes away with its log, so its log file is
            # opened before the delete and read until the worker's exit line.
            stopped = busy_worker_once_all_are(timeout=120)
            stopped_name = stopped["metadata"]["name"]
            with ContainerLog(kube_node, stopped) as stopped_log:
                began, deleted_at = time.monotonic(), time.monotonic() - watcher.started
                kubectl(kubeconfig, "delete", "pod", stopped_name, "-n", namespace,
                        "--wait=false")  # fmt: skip
                stopped_text = stopped_log.text_until_exit(timeout=90)
            wait_for(
                lambda: stopped_name
                not in {p["metadata"]["name"] for p in get_pods(kubeconfig, namespace,
                                                                RELEASE_WORKERS)},
                timeout=60,
                what="the deleted worker pod gone", interval=1,
            )  # fmt: skip
            healed["worker pod deleted (SIGTERM)"] = time.monotonic() - began
            disrupted.append((deleted_at, time.monotonic() - watcher.started + 2))
            record = watcher.workers[stopped_name]
            if record.log is None or len(record.log) < len(stopped_text):
                record.log = stopped_text

            wait_for(
                lambda: completed_ids(list(watcher.workers.values())) >= set(published),
                timeout=300,
                what="every task logged done by an exited worker",
                interval=1,
            )
            wait_for(
                lambda: (
                    not any(
                        p["status"].get("phase") in ("Pending", "Running")
                        for p in get_pods(kubeconfig, namespace, RELEASE_WORKERS)
                    )
                    and watcher.latest is not None
                    and watcher.latest.active_jobs.get(PIPELINE, 0) == 0
                ),
                timeout=120,
                what="workers back to zero",
                interval=1,
            )
            wait_for(
                lambda: broker.depth(QUEUE) == 0 and broker.depth(f"{QUEUE}.dlq") == 0,
                timeout=60,
                what="the queue and its dead-letter queue counted empty",
                interval=1,
            )
        except BaseException:
            print("\n\n".join(diagnostics(kubeconfig, namespace)))
            unlogged = set(published) - completed_ids(list(watcher.workers.values()))
            print(f"{len(unlogged)} published tasks not logged done: {sorted(unlogged)[:10]}")
            for name, record in watcher.workers.items():
                for line in (record.log or "").splitlines():
                    if any(message_id in line for message_id in unlogged):
                        print(f"{name} (exit {record.exit_code}): {line}")
            raise
    finished_at = watcher.samples[-1].elapsed if watcher.samples else 0.0

    # Only the broker's absence and a vanishing pod may have spoiled a sample.
    for error in watcher.errors:
        at = float(error.split("s:", 1)[0])
        assert any(start <= at <= end for start, end in disrupted), error

    # Every published task done at least once; nothing queued, unacked or dead-lettered.
    workers = list(watcher.workers.values())
    assert len(published) == sum(WAVES)
    assert completed_ids(workers) >= set(published)
    queue, dead_letters = broker.queue(QUEUE), broker.queue(f"{QUEUE}.dlq")
    assert (queue["messages_ready"], queue["messages_unacknowledged"]) == (0, 0)
    assert dead_letters["messages"] == 0
    assert not [e for w in workers for e in w.entries() if e.get("outcome") == "dead-letter"]

    # The cap held through the scaler's handover and the replacement of failed Jobs.
    assert watcher.peak_active_jobs(PIPELINE) <= MAX_WORKERS
    # The crash shows as one; the SIGTERM'd worker finished its task and left cleanly; every
    # other worker left when idle, none gave up on the broker during its restart.
    assert watcher.workers[crashed_name].exit_code == SIGKILL_EXIT_CODE
    assert watcher.workers[stopped_name].exit_reason() == "sigterm"
    others = [w for name, w in watcher.workers.items() if name not in (crashed_name, stopped_name)]
    assert {w.exit_code for w in others} == {0}
    assert {w.exit_reason() for w in others} <= IDLE_EXITS

    # A scaler leads again: the new pod holds the Lease and says so in its metrics.
    (scaler,) = get_pods(kubeconfig, namespace, SCALER_SELECTOR)
    assert lease_holder(kubeconfig, namespace).startswith(f"{scaler['metadata']['name']}_")
    assert scaler_metric(scaler, "jobtide_leader") == 1.0

    runs = executions(workers)
    twice = sum(1 for count in runs.values() if count > 1)
    print(
        f"\n{len(published)} tasks through {len(watcher.jobs_seen)} worker Jobs "
        f"(cap {MAX_WORKERS}, peak {watcher.peak_active_jobs(PIPELINE)}); all done and "
        f"workers at zero {finished_at:.0f} s after the first publish"
    )
    for disruption, seconds in healed.items():
        print(f"  {disruption}: healed in {seconds:.1f} s")
    print(f"  tasks run more than once: {twice} ({sum(runs.values()) - len(runs)} extra runs)")
