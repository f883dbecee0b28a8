"""Benchmark on the real node: a fixed workload (200 tasks of 1 s, maxWorkers 8) through the
installed chart, against the ideal (work / cap + pod start-up) and against the simulator run
with the pod start-up measured here. Prints figures; asserts only that the run completed."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from jobtide_scaler.simulate.engine import Settings, simulate
from jobtide_scaler.simulate.scalers import JobtideScaler
from jobtide_scaler.simulate.workloads import Task, Workload
from jobtide_testbed.chartnode import (
    Helm,
    ReleaseBroker,
    Watcher,
    log_time,
    node_values,
    write_values,
)
from jobtide_testbed.node import Node
from jobtide_testbed.process import wait_for
from jobtide_worker.publisher import publish

pytestmark = pytest.mark.bench

RELEASE, PIPELINE, QUEUE = "bench", "bench", "bench"
TASKS, TASK_SECONDS, MAX_WORKERS = 200, 1.0, 8
POLL_SECONDS, IDLE_SECONDS = 2, 5


def bench_values() -> dict[str, Any]:
    values = node_values()
    values["scaler"]["pollIntervalSeconds"] = POLL_SECONDS
    # Acknowledgement counts every second, for the watcher's end-of-run check.
    values["rabbitmq"]["extraConfig"] = "collect_statistics_interval = 1000"
    values["pipelines"] = {
        PIPELINE: {
            "queue": QUEUE,
            "maxWorkers": MAX_WORKERS,
            "maxNewPerCycle": MAX_WORKERS,
            "idleTimeoutSeconds": IDLE_SECONDS,
            "ttlSecondsAfterFinished": 10,
            # The drain time is read from the task lines' times.
            "env": [{"name": "JOBTIDE_LOG_FORMAT", "value": "json"}],
        }
    }
    return values


def test_drain_reaction_and_simulator_agreement(
    kube_node: Node, chart_images: list[str], node_namespace: str, tmp_path: Path
) -> None:
    kubeconfig = kube_node.cluster.kubeconfig
    helm = Helm(kubeconfig, node_namespace)
    helm.install(RELEASE, [write_values(tmp_path / "values.yaml", bench_values())])
    try:
        broker = ReleaseBroker.find(kubeconfig, node_namespace, RELEASE)
        watcher = Watcher(kubeconfig, node_namespace, broker, {PIPELINE: QUEUE}, interval=0.5)
        with watcher:
            published_at = time.time()
            publish(QUEUE, [{"seconds": TASK_SECONDS}] * TASKS, broker=broker.config(),
                    declare=False)  # fmt: skip

            def all_gone() -> bool:
                s = watcher.latest
                return (
                    s is not None
                    and s.acked[QUEUE] >= TASKS
                    and s.depth == 0
                    and s.running_pods + s.pending_pods == 0
                    and s.active_jobs[PIPELINE] == 0
                )

            wait_for(all_gone, timeout=420, what="workload done and workers gone", interval=1)
    finally:
        helm("uninstall", RELEASE, "--wait", check=False)

    samples = watcher.samples
    # The drain time from the workers' own log times (same host clock): the management API's
    # counts of a quorum queue lag by up to 5 s.
    done_at = [log_time(entry) for entry in watcher.done_entries()]
    assert len(done_at) == TASKS
    drained = max(done_at) - published_at
    workers = [w for w in watcher.workers.values() if w.running is not None]
    reaction = min(w.running for w in workers if w.running is not None)
    startups = [w.running - w.created for w in workers if w.running and w.created is not None]
    startup = statistics.median(startups)
    pod_seconds = sum((w.finished or samples[-1].elapsed) - (w.created or 0.0) for w in workers)
    ideal = TASKS * TASK_SECONDS / MAX_WORKERS + startup

    settings = Settings(
        poll_interval_seconds=POLL_SECONDS,
        messages_per_worker=1,
        max_workers=MAX_WORKERS,
        max_new_per_cycle=MAX_WORKERS,
        idle_timeout_seconds=IDLE_SECONDS,
        startup_seconds=(startup, startup),
    )
    workload = Workload("bench", tuple(Task(0.0, TASK_SECONDS) for _ in range(TASKS)), 0.0)
    simulated = simulate(workload, settings, JobtideScaler(settings), seed=1)
    simulated_drain = max(simulated.waits) + TASK_SECONDS

    print(
        f"\nreal node: {TASKS} tasks x {TASK_SECONDS:.0f} s, maxWorkers {MAX_WORKERS}, "
        f"poll {POLL_SECONDS} s, idle timeout {IDLE_SECONDS} s\n"
        f"  reaction (publish -> first worker Running): {reaction:.1f} s "
        f"(sampled every {watcher.interval} s)\n"
        f"  pod start-up (seen -> Running), median of {len(startups)}: {startup:.1f} s\n"
        f"  drain time (publish -> last task logged done) {drained:.1f} s; "
        f"ideal (work/cap + start-up) {ideal:.1f} s; ratio {drained / ideal:.2f}\n"
        f"  Jobs {len(watcher.jobs_seen)}, peak active {watcher.peak_active_jobs(PIPELINE)}\n"
        f"simulator with the measured start-up:\n"
        f"  drain {simulated_drain:.1f} s vs measured {drained:.1f} s "
        f"(ratio {drained / simulated_drain:.2f})\n"
        f"  pod-seconds {simulated.metrics.pod_seconds:.0f} vs measured {pod_seconds:.0f} "
        f"(ratio {pod_seconds / simulated.metrics.pod_seconds:.2f}); "
        f"Jobs {simulated.metrics.jobs_created} vs {len(watcher.jobs_seen)}"
    )
    assert watcher.peak_active_jobs(PIPELINE) <= MAX_WORKERS
    assert simulated.metrics.tasks_unfinished == 0
