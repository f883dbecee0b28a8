"""The chart, installed unmodified on the test bed's real node with only image, node-pool and
pipeline settings, scales the hello example's workers up from zero to the cap and back down
to zero: every task is done, none is lost, finished Jobs go away by their TTL, `helm test`
passes and `helm uninstall` leaves nothing of the release."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jobtide_testbed.chartnode import (
    Helm,
    ReleaseBroker,
    Watcher,
    diagnostics,
    node_values,
    release_objects,
    worker_objects,
    write_values,
)
from jobtide_testbed.node import POOL_LABEL, Node
from jobtide_testbed.process import wait_for
from jobtide_testbed.tools import kubectl
from jobtide_worker.handover import State
from jobtide_worker.publisher import publish

pytestmark = pytest.mark.e2e

# A worker leaving by itself when idle: its idle timeout, or its queue silent.
IDLE_EXITS = {State.IDLE.value, State.QUEUE_SILENT.value}
RELEASE = "e2e"
PIPELINE, QUEUE = "hello", "hello"
TASKS = 500
MAX_WORKERS = 5
IDLE_TIMEOUT_SECONDS = 8
TTL_SECONDS = 10


def e2e_values() -> dict[str, Any]:
    values = node_values()
    values["scaler"]["pollIntervalSeconds"] = 2
    values["pipelineDefaults"]["env"] = [
        # Each done task is a JSON line with its message id: the test reads them back.
        {"name": "JOBTIDE_LOG_FORMAT", "value": "json"}
    ]
    values["pipelines"] = {
        PIPELINE: {
            "queue": QUEUE,
            "maxWorkers": MAX_WORKERS,
            "maxNewPerCycle": MAX_WORKERS,
            "idleTimeoutSeconds": IDLE_TIMEOUT_SECONDS,
            "ttlSecondsAfterFinished": TTL_SECONDS,
        }
    }
    return values


# Run inside a worker pod: what the worker process (PID 1) has in its environment and what
# it can read from the mounted credentials. Prints the password's digest, never the password.
INSPECT_WORKER = """
import hashlib, json, os, stat
environ = open("/proc/1/environ", "rb").read().decode(errors="replace")
path = os.environ["JOBTIDE_BROKER_PASSWORD_FILE"]
mode = stat.S_IMODE(os.stat(os.path.realpath(path)).st_mode)
digest = hashlib.sha256(open(path, "rb").read().strip()).hexdigest()
print(json.dumps({"environ": environ, "file": path, "mode": oct(mode), "sha256": digest}))
"""


def inspect_running_worker(kubeconfig: Path, namespace: str) -> dict[str, Any] | None:
    """INSPECT_WORKER's findings in one running worker pod of the release, with the pod's
    spec as the apiserver holds it (`spec`); None when none runs or the one picked left
    before the look (workers exit on their own)."""
    pods = json.loads(
        kubectl(kubeconfig, "get", "pods", "-n", namespace, "-o", "json",
                "-l", f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=worker",
                "--field-selector", "status.phase=Running").stdout
    )["items"]  # fmt: skip
    for pod in pods:
        result = kubectl(kubeconfig, "exec", "-n", namespace, pod["metadata"]["name"],
                         "-c", "worker", "--", "python", "-c", INSPECT_WORKER,
                         check=False)  # fmt: skip
        if result.returncode == 0:
            found: dict[str, Any] = json.loads(result.stdout)
            return {**found, "spec": pod["spec"]}
    return None


@pytest.fixture
def release(
    kube_node: Node, chart_images: list[str], node_namespace: str, tmp_path: Path
) -> Iterator[Helm]:
    kubeconfig = kube_node.cluster.kubeconfig
    helm = Helm(kubeconfig, node_namespace)
    helm.install(RELEASE, [write_values(tmp_path / "values.yaml", e2e_values())])
    yield helm
    helm("uninstall", RELEASE, "--wait", check=False)


def test_burst_scales_to_the_cap_drains_and_returns_to_zero(
    kube_node: Node, release: Helm, node_namespace: str, request: pytest.FixtureRequest
) -> None:
    kubeconfig = kube_node.cluster.kubeconfig
    broker = ReleaseBroker.find(kubeconfig, node_namespace, RELEASE)
    rng = random.Random(6)
    tasks = [{"seconds": round(rng.uniform(0.2, 2.0), 2)} for _ in range(TASKS)]

    with Watcher(kubeconfig, node_namespace, broker, {PIPELINE: QUEUE}) as watcher:
        try:
            assert watcher.jobs_seen == set()  # nothing runs before the burst
            published = publish(QUEUE, tasks, broker=broker.config(), declare=False)
            # A live worker holds the broker's credentials as a mounted file only.
            looks: list[dict[str, Any]] = []

            def looked_inside() -> bool:
                found = inspect_running_worker(kubeconfig, node_namespace)
                looks.extend([found] if found else [])
                return found is not None

            wait_for(
                looked_inside,
                timeout=120,
                what="a running worker pod looked at from inside",
                interval=1,
            )
            # Workers hand in their logs when they exit: all tasks done means drained and idle.
            wait_for(
                lambda: set(watcher.done_message_ids()) >= set(published),
                timeout=420,
                what="every task logged done by an exited worker",
                interval=1,
            )
            # Idle workers leave by themselves, then each finished Job goes by its TTL.
            wait_for(
                lambda: not worker_objects(kubeconfig, node_namespace, RELEASE),
                timeout=120,
                what="worker Jobs and pods removed by their TTL",
                interval=1,
            )
        except BaseException:
            print("\n\n".join(diagnostics(kubeconfig, node_namespace)))
            raise
    assert not watcher.errors, watcher.errors

    # The worker process's environment names the credentials' files and holds neither the
    # password nor the user name; the file it reads is the Secret's, readable by its owner
    # and the pod's group only.
    inside = looks[-1]
    assert broker.password not in inside["environ"]
    assert "JOBTIDE_BROKER_PASSWORD=" not in inside["environ"]
    assert "JOBTIDE_BROKER_USERNAME=" not in inside["environ"]
    assert f"JOBTIDE_BROKER_PASSWORD_FILE={inside['file']}" in inside["environ"]
    assert inside["sha256"] == hashlib.sha256(broker.password.encode()).hexdigest()
    assert inside["mode"] == "0o440"
    # The pod's spec, as the apiserver holds it: no variable from a Secret, no password.
    worker_env = {e["name"]: e for e in inside["spec"]["containers"][0]["env"]}
    assert not [e for e in worker_env.values() if "valueFrom" in e]
    assert "JOBTIDE_BROKER_PASSWORD" not in worker_env
    assert broker.password not in json.dumps(inside["spec"])
    # Nor does what `helm get values` shows of the release.
    assert broker.password not in json.dumps(release.values(RELEASE))

    # Up to the cap and never above it.
    assert watcher.peak_active_jobs(PIPELINE) == MAX_WORKERS
    assert max(s.running_pods for s in watcher.samples) <= MAX_WORKERS
    # Every task done at least once; none dead-lettered or left behind.
    done = watcher.done_message_ids()
    assert set(done) == set(published)
    assert len(published) == TASKS
    assert broker.depth(QUEUE) == 0
    assert broker.depth(f"{QUEUE}.dlq") == 0
    # Each worker exited 0 by itself (its idle timeout, or the queue silent at one of its reads
    # of the management API), having run on the pool node.
    finished = list(watcher.workers.values())
    assert finished
    assert {w.exit_code for w in finished} == {0}
    assert {w.exit_reason() for w in finished} <= IDLE_EXITS
    assert len(watcher.jobs_seen) == len(finished)
    nodes = kubectl(kubeconfig, "get", "nodes", "-l", f"{POOL_LABEL[0]}={POOL_LABEL[1]}",
                    "-o", "name").stdout  # fmt: skip
    assert nodes.split() == [f"node/{kube_node.name}"]

    # The status view, as a user sees it with the cluster's kubeconfig: the figures the
    # scaler's pod wrote, as the Lease's holder, after the drain.
    def status_view() -> dict[str, Any]:
        argv = [sys.executable, "-m", "jobtide_scaler", "status", "-n", node_namespace,
                RELEASE, "-o", "json"]  # fmt: skip
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    wait_for(
        lambda: status_view()["pipelines"][PIPELINE].get("ready") == 0,
        timeout=60, what="status figures of the drained queue", interval=1,
    )  # fmt: skip
    view = status_view()
    hello = view["pipelines"][PIPELINE]
    assert view["figures"]["stale"] is False
    assert view["leader"]["identity"] == view["figures"]["writer"]
    assert (hello["deadLettered"], hello["active"], hello["maxWorkers"]) == (0, 0, MAX_WORKERS)
    assert hello["lastCreated"] >= 1
    print(f"\nstatus: {json.dumps(hello, sort_keys=True)}")

    # The test pod is deleted once it succeeds (hook-succeeded), so its phase is the verdict.
    test_output = release("test", RELEASE, timeout=300)
    assert re.search(r"TEST SUITE:\s+e2e-jobtide-test\n.*\n.*\nPhase:\s+Succeeded", test_output)
    # The broker's liveness probe (its management port) passed throughout: no failure, no restart.
    broker_pod = f"{RELEASE}-jobtide-rabbitmq-0"
    pod = kubectl(kubeconfig, "get", "pod", broker_pod, "-n", node_namespace, "-o", "json")
    assert [c["restartCount"] for c in json.loads(pod.stdout)["status"]["containerStatuses"]] == [0]
    events = kubectl(kubeconfig, "get", "events", "-n", node_namespace, "-o", "json",
                     "--field-selector", f"involvedObject.name={broker_pod}").stdout  # fmt: skip
    messages = [event["message"] for event in json.loads(events)["items"]]
    assert messages  # the pod's own events (scheduled, pulled, started) are there to look at
    assert not [m for m in messages if m.startswith("Liveness probe failed")], messages

    release("uninstall", RELEASE, "--wait", timeout=300)
    wait_for(
        lambda: not release_objects(kubeconfig, node_namespace, RELEASE),
        timeout=90,
        what="release objects deleted",
        interval=1,
    )
    drained = next(s.elapsed for s in watcher.samples if s.done_tasks >= TASKS)
    print(
        f"\n{TASKS} tasks through {len(watcher.jobs_seen)} worker Jobs (cap {MAX_WORKERS}); "
        f"all done and workers exited {drained:.0f} s after the publish began"
    )
