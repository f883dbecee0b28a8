"""The chart on a node pool that Karpenter scales from zero and back: a burst of tasks makes
the scaler create worker Jobs, their pending pods make Karpenter launch nodes (kwok nodes,
whose worker pods run as host processes: jobtide_testbed/hostpods.py), every task is done and none
lost, Jobs never exceed the cap, workers leave by their idle timeout, Karpenter consolidates
the empty nodes back to zero, no worker was disrupted while it held a message, and
`helm uninstall` leaves nothing. The scaler and the broker run on the real node."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jobtide_testbed.chartnode import (
    Helm,
    ReleaseBroker,
    Watcher,
    diagnostics,
    release_objects,
    worker_objects,
    write_values,
)
from jobtide_testbed.karpenter import (
    AutoscaledPool,
    NodePoolSpec,
    NodeWatch,
    karpenter_events,
    pool_chart_values,
)
from jobtide_testbed.node import Node
from jobtide_testbed.process import wait_for
from jobtide_worker.priority import consumer_priority
from jobtide_worker.publisher import publish
from test_chart_e2e import IDLE_EXITS

pytestmark = pytest.mark.e2e

RELEASE = "autoscaled"
PIPELINE, QUEUE = "hello", "hello"
TASKS = 300
MAX_WORKERS = 12
IDLE_TIMEOUT_SECONDS = 10
TTL_SECONDS = 10
# Underutilized nodes may be consolidated too: only the workers' do-not-disrupt annotation
# keeps a busy one in place.
POOL = NodePoolSpec(
    consolidation_policy="WhenEmptyOrUnderutilized", consolidate_after="10s", limits={"cpu": "16"}
)


def autoscaled_values() -> dict[str, Any]:
    return pool_chart_values(
        POOL,
        {
            PIPELINE: {
                "queue": QUEUE,
                "maxWorkers": MAX_WORKERS,
                "maxNewPerCycle": MAX_WORKERS,
                "idleTimeoutSeconds": IDLE_TIMEOUT_SECONDS,
                "ttlSecondsAfterFinished": TTL_SECONDS,
            }
        },
    )


@pytest.fixture(scope="module")
def autoscaled_pool(
    kube_node: Node, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AutoscaledPool]:
    with AutoscaledPool(kube_node.cluster, tmp_path_factory.mktemp("karpenter")) as pool:
        yield pool


def test_pool_scales_from_zero_to_the_backlog_and_back_to_zero(
    kube_node: Node,
    chart_images: list[str],
    autoscaled_pool: AutoscaledPool,
    node_namespace: str,
    tmp_path: Path,
) -> None:
    pool, cluster = autoscaled_pool, kube_node.cluster
    kubeconfig = cluster.kubeconfig
    pool.apply_node_pool(POOL)
    assert pool.nodes() == []  # from zero nodes
    helm = Helm(kubeconfig, node_namespace)
    helm.install(RELEASE, [write_values(tmp_path / "values.yaml", autoscaled_values())])
    broker = ReleaseBroker.find(kubeconfig, node_namespace, RELEASE)
    rng = random.Random(13)
    tasks = [{"seconds": round(rng.uniform(0.5, 3.0), 2)} for _ in range(TASKS)]
    nodes = NodeWatch(kubeconfig, POOL.name)
    watcher = Watcher(
        kubeconfig, node_namespace, broker, {PIPELINE: QUEUE}, read_log=pool.host_pods.read_log
    )
    watcher.on_sample(nodes.sample)
    with watcher:
        try:
            published = publish(QUEUE, tasks, broker=broker.config(), declare=False)
            wait_for(
                lambda: set(watcher.done_message_ids()) >= set(published),
                timeout=420,
                what="every task logged done by an exited worker",
                interval=1,
            )
            wait_for(
                lambda: not worker_objects(kubeconfig, node_namespace, RELEASE),
                timeout=120,
                what="worker Jobs and pods removed by their TTL",
                interval=1,
            )
            wait_for(
                lambda: nodes.zero_since() is not None,
                timeout=240,
                what="Karpenter's nodes consolidated to zero",
                interval=1,
            )
        except BaseException:
            print("\n\n".join(diagnostics(kubeconfig, node_namespace)))
            print(f"==== karpenter\n{pool.karpenter.tail(60)}")
            print(f"==== host pods: errors {pool.host_pods.errors}")
            for host_pod in pool.host_pods.pods()[-3:]:
                print(f"==== {host_pod}\n{host_pod.log_path.read_text(errors='replace')[-2000:]}")
            raise
    assert not watcher.errors, watcher.errors
    assert not pool.host_pods.errors, pool.host_pods.errors

    # Every task done at least once; none dead-lettered or left behind.
    done = watcher.done_message_ids()
    assert set(done) == set(published)
    assert broker.depth(QUEUE) == 0
    assert broker.depth(f"{QUEUE}.dlq") == 0
    # Never more Jobs than the cap.
    assert 0 < watcher.peak_active_jobs(PIPELINE) <= MAX_WORKERS
    # Every worker ran on one of Karpenter's nodes as a host process and left by itself when
    # idle (its idle timeout, or the queue silent) with exit code 0: none was sent SIGTERM by a
    # deletion or eviction.
    host_pods = [p for p in pool.host_pods.pods() if p.namespace == node_namespace]
    assert len(host_pods) == len(watcher.jobs_seen) == len(watcher.workers)
    assert {p.node for p in host_pods} <= set(nodes.records)
    assert [p.key for p in host_pods if p.signalled] == []
    assert {p.exit_code for p in host_pods} == {0}
    assert {w.exit_code for w in watcher.workers.values()} == {0}
    assert {w.exit_reason() for w in watcher.workers.values()} <= IDLE_EXITS
    # Each worker consumed with its node's priority (the default), from the node's boot time,
    # which each kwok node's processes read from the kernel as on a real node: one priority
    # per node, a higher one for an older node.
    by_node: dict[str, set[int]] = {}
    for host_pod in host_pods:
        assert host_pod.node_booted is not None
        lines = [json.loads(line) for line in host_pod.log_path.read_text().splitlines()]
        priorities = {line["priority"] for line in lines if line["message"] == "consuming"}
        assert priorities == {consumer_priority("node", 0, host_pod.node_booted)}, host_pod.key
        by_node.setdefault(host_pod.node, set()).update(priorities)
    assert all(len(priorities) == 1 for priorities in by_node.values()), by_node
    # Karpenter launched nodes for the backlog and removed every one of them; it evicted no
    # pod of the release.
    assert nodes.records
    assert all(r.gone is not None for r in nodes.records.values())
    events = list(karpenter_events(kubeconfig))
    evictions = [
        e for e in events
        if e["involvedObject"].get("namespace") == node_namespace and e["reason"] == "Evicted"
    ]  # fmt: skip
    assert evictions == []

    helm("uninstall", RELEASE, "--wait", timeout=300)
    wait_for(
        lambda: not release_objects(kubeconfig, node_namespace, RELEASE),
        timeout=90,
        what="release objects deleted",
        interval=1,
    )
    assert pool.nodes() == []
    assert pool.node_claims() == []

    samples = watcher.samples
    first_task = min(w.running for w in watcher.workers.values() if w.running is not None)
    drained = next(s.elapsed for s in samples if s.done_tasks >= TASKS)
    last_node_gone = max(r.gone for r in nodes.records.values() if r.gone is not None)
    reasons = sorted({f"{e['involvedObject']['kind']}:{e['reason']}" for e in events})
    print(
        f"\n{TASKS} tasks through {len(watcher.jobs_seen)} worker Jobs (cap {MAX_WORKERS}, "
        f"peak {watcher.peak_active_jobs(PIPELINE)}) on {len(nodes.records)} Karpenter nodes "
        f"(peak {nodes.peak}, {nodes.node_seconds():.0f} node-seconds)\n"
        f"first node Ready {nodes.first_ready() or 0:.1f} s, first worker Running "
        f"{first_task:.1f} s, all done and workers exited {drained:.0f} s, last node gone "
        f"{last_node_gone:.0f} s after the publish began\n"
        f"Karpenter's events: {', '.join(reasons)}"
    )
