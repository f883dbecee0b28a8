"""Benchmark of the autoscaled pool: a trace of 3,000 tasks over 10 minutes that rises for 2
minutes and declines slowly for 8, through the chart (maxWorkers 60) onto a node pool that
Karpenter scales from zero (four workers fill a node; a node registers 20 s after launch).
Prints node-seconds, peak nodes, nodes launched, pod-seconds, task waits (p50, p95), the time
from the first publish to the first node Ready and to the first task started, and from the
last task done to zero nodes. Asserts only that every task was done and the pool emptied."""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jobtide_testbed.chartnode import (
    Helm,
    ReleaseBroker,
    Watcher,
    log_time,
    worker_objects,
    write_values,
)
from jobtide_testbed.karpenter import (
    AutoscaledPool,
    NodePoolSpec,
    NodeWatch,
    pool_chart_values,
)
from jobtide_testbed.node import Node
from jobtide_testbed.process import wait_for
from jobtide_worker.publisher import publish

pytestmark = pytest.mark.bench

RELEASE, PIPELINE, QUEUE = "pool-bench", "bench", "bench"
TASKS, RISE_SECONDS, TRACE_SECONDS = 3000, 120.0, 600.0
TASK_SECONDS = (2.0, 8.0)  # uniform
MAX_WORKERS, MAX_NEW_PER_CYCLE = 60, 20
IDLE_TIMEOUT_SECONDS = 20
REGISTRATION_DELAY = "20s"
POOL = NodePoolSpec(consolidate_after="30s", limits={"cpu": "40"})


def trace(seed: int = 13) -> list[tuple[float, float]]:
    """(arrival, duration) of every task: the arrival rate rises linearly to its peak over
    RISE_SECONDS, then falls linearly to zero at TRACE_SECONDS (inverse-CDF sampling)."""
    rng = random.Random(seed)
    rise_share = RISE_SECONDS / TRACE_SECONDS
    tasks = []
    for _ in range(TASKS):
        u = rng.random()
        if u < rise_share:
            at = RISE_SECONDS * (u / rise_share) ** 0.5
        else:
            fall = TRACE_SECONDS - RISE_SECONDS
            at = TRACE_SECONDS - fall * ((1 - u) / (1 - rise_share)) ** 0.5
        tasks.append((at, rng.uniform(*TASK_SECONDS)))
    return sorted(tasks)


def bench_values() -> dict[str, Any]:
    return pool_chart_values(
        POOL,
        {
            PIPELINE: {
                "queue": QUEUE,
                "maxWorkers": MAX_WORKERS,
                "maxNewPerCycle": MAX_NEW_PER_CYCLE,
                "idleTimeoutSeconds": IDLE_TIMEOUT_SECONDS,
                "ttlSecondsAfterFinished": 30,
            }
        },
    )


@pytest.fixture
def bench_pool(
    kube_node: Node, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AutoscaledPool]:
    root = tmp_path_factory.mktemp("karpenter-bench")
    with AutoscaledPool(kube_node.cluster, root, registration_delay=REGISTRATION_DELAY) as pool:
        yield pool


def publish_trace(
    broker: ReleaseBroker, tasks: list[tuple[float, float]], published: dict[str, float]
) -> None:
    """Publish each task at its arrival time (in one-second batches); `published` maps each
    message id to its publish time (epoch seconds)."""
    began = time.time()
    pending = list(tasks)
    while pending:
        due = [t for t in pending if t[0] <= time.time() - began]
        pending = pending[len(due) :]
        if due:
            at = time.time()
            ids = publish(QUEUE, [{"seconds": round(d, 2)} for _, d in due],
                          broker=broker.config(), declare=False)  # fmt: skip
            published.update(dict.fromkeys(ids, at))
        time.sleep(1.0)


def test_trace_through_the_autoscaled_pool(
    kube_node: Node, chart_images: list[str], bench_pool: AutoscaledPool, node_namespace: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    kubeconfig = kube_node.cluster.kubeconfig
    bench_pool.apply_node_pool(POOL)
    helm = Helm(kubeconfig, node_namespace)
    helm.install(RELEASE, [write_values(tmp_path / "values.yaml", bench_values())])
    tasks = trace()
    published: dict[str, float] = {}
    try:
        broker = ReleaseBroker.find(kubeconfig, node_namespace, RELEASE)
        watcher = Watcher(
            kubeconfig, node_namespace, broker, {PIPELINE: QUEUE},
            read_log=bench_pool.host_pods.read_log,
        )  # fmt: skip
        nodes = NodeWatch(kubeconfig, POOL.name)
        watcher.on_sample(nodes.sample)
        with watcher:
            first_publish = time.time()
            publisher = threading.Thread(target=publish_trace, args=(broker, tasks, published))
            publisher.start()
            publisher.join()
            wait_for(
                lambda: len(set(watcher.done_message_ids()) & set(published)) >= TASKS,
                timeout=900,
                what="every task logged done by an exited worker",
                interval=1,
            )
            wait_for(
                lambda: not worker_objects(kubeconfig, node_namespace, RELEASE),
                timeout=180,
                what="worker Jobs gone",
                interval=1,
            )
            wait_for(
                lambda: nodes.zero_since() is not None, timeout=300, what="zero nodes", interval=1
            )
    finally:
        helm("uninstall", RELEASE, "--wait", check=False)

    entries = watcher.done_entries()
    done = {str(e["message_id"]): e for e in entries}
    assert set(done) >= set(published)
    started = {mid: log_time(e) - float(e["duration"]) for mid, e in done.items()}
    waits = sorted(started[mid] - published[mid] for mid in published)
    last_done = max(log_time(e) for e in entries)
    workers = [w for w in watcher.workers.values() if w.created is not None]
    pod_seconds = sum((w.finished or watcher.samples[-1].elapsed) - (w.created or 0.0)
                      for w in workers)  # fmt: skip
    zero_at = (nodes.zero_since() or 0.0) + nodes.started_epoch
    first_ready = (nodes.first_ready() or 0.0) + nodes.started_epoch
    print(
        f"\nautoscaled pool: {TASKS} tasks over {TRACE_SECONDS:.0f} s (rise {RISE_SECONDS:.0f} s), "
        f"{TASK_SECONDS[0]:.0f}-{TASK_SECONDS[1]:.0f} s each; maxWorkers {MAX_WORKERS}, "
        f"idle timeout {IDLE_TIMEOUT_SECONDS} s; node registration {REGISTRATION_DELAY}, "
        f"consolidateAfter {POOL.consolidate_after}\n"
        f"  node-seconds {nodes.node_seconds():.0f}, peak nodes {nodes.peak}, "
        f"nodes launched {len(nodes.records)}\n"
        f"  pod-seconds {pod_seconds:.0f} ({len(workers)} worker Jobs, peak "
        f"{watcher.peak_active_jobs(PIPELINE)})\n"
        f"  wait p50 {statistics.median(waits):.1f} s, p95 {waits[int(0.95 * len(waits))]:.1f} s\n"
        f"  first publish -> first node Ready {first_ready - first_publish:.1f} s, "
        f"-> first task started {min(started.values()) - first_publish:.1f} s\n"
        f"  last task done -> zero nodes {zero_at - last_done:.1f} s"
    )
    assert watcher.peak_active_jobs(PIPELINE) <= MAX_WORKERS
