"""Benchmark of the autoscaled pool: a trace of 1,500 tasks over 5 minutes that rises for 1
minute and declines slowly for 4, through the chart (maxWorkers 60) onto a node pool that
Karpenter scales from zero (four workers fill a node; a node registers 20 s after launch), run
three times: with the default scheduling (no packing affinity, no consumer priorities), with
jobtide's defaults (packing and the node priority) and with the age priority of charts 0.3.x
(packing, older workers first). Each run prints node-seconds, peak nodes, nodes
launched, pod-seconds, task waits (p50, p95), the time from the first publish to the first node
Ready and to the first task started, and from the last task done to zero nodes, and each
node's tail broken down (its last pod's exit and deletion, the last pod event Karpenter
recorded, its Consolidatable condition, the disruption decision, the node and its claim gone);
then the same trace through the simulator's node model with the latencies measured in that run
(each node's launch to Ready and each worker's bound to consuming replayed in their order, the
median decision to node gone), the same pool shape and consolidation, simulated against
measured, the model's tail beside the measured one, the cold start instant by instant and the
task waits by arrival window. Last, the node-seconds ratios of jobtide's defaults to the two
others, measured and simulated. Each run's figures are written as JSON beside its values
(measured-<n>.json), to replay the model on them.
Asserts only that every task was done, the Jobs kept to their cap and the pool emptied: the
figures are timings, printed."""

from __future__ import annotations

import itertools
import json
import random
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
from jobtide_scaler.simulate.cli import levers_from_values, pool_from_values, settings_from_values
from jobtide_scaler.simulate.engine import Settings, SimulationResult, percentile, simulate
from jobtide_scaler.simulate.nodes import (
    Autoscaler,
    Consolidation,
    NodeLife,
    NodePool,
    parse_quantity,
)
from jobtide_scaler.simulate.scalers import JobtideScaler
from jobtide_scaler.simulate.workloads import Task, Workload
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
    NodeRecord,
    NodeWatch,
    pool_chart_values,
)
from jobtide_testbed.node import Node
from jobtide_testbed.process import wait_for
from jobtide_worker.publisher import publish

pytestmark = pytest.mark.bench

RELEASE, PIPELINE, QUEUE = "pool-bench", "bench", "bench"
# Half the 3,000 tasks over 10 minutes, at the same rates (10 tasks/s at the peak), so
# that every scheduling runs in one benchmark.
TASKS, RISE_SECONDS, TRACE_SECONDS = 1500, 60.0, 300.0
TASK_SECONDS = (2.0, 8.0)  # uniform
MAX_WORKERS, MAX_NEW_PER_CYCLE = 60, 20
IDLE_TIMEOUT_SECONDS = 20
REGISTRATION_DELAY = "20s"
CONSOLIDATE_AFTER_SECONDS = 30
POOL = NodePoolSpec(consolidate_after=f"{CONSOLIDATE_AFTER_SECONDS}s", limits={"cpu": "40"})
# The replay gives the n-th worker created the n-th measured start-up and the n-th node launched
# the n-th measured provisioning: the cold start's workers start as fast as they did, not as
# those started when 60 host processes share the machine's two cores. Workers and nodes the
# simulation creates beyond the measured ones draw uniformly with the measured latencies' mean
# and standard deviation (mean -+ sqrt(3) sd). The figures with every latency drawn so (the
# replay before the sequences) are printed beside.
LATENCY_PERCENTILES = (0.05, 0.95)
SIMULATION_SEEDS = range(1, 11)
# Task waits compared by arrival window (seconds after the first publish): the cold start in
# short windows, the rest in minutes.
WAIT_WINDOWS = (0.0, 10.0, 20.0, 30.0, 40.0, 60.0, 120.0, 180.0, 240.0, 300.0, float("inf"))
# The cold start compared at these instants (seconds after the first publish).
RAMP_CHECKS = (10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 90.0)


@dataclass(frozen=True)
class Scheduling:
    """How the worker pods are placed and fed; None keeps the chart's default."""

    name: str
    pack_workers: bool | None = None
    consumer_priority: str | None = None


SCHEDULINGS = (
    Scheduling(
        "default scheduling (packWorkers false, JOBTIDE_CONSUMER_PRIORITY=none)", False, "none"
    ),
    Scheduling("jobtide's defaults (packing, the node priority)"),
    Scheduling("the age priority of 0.3 (packing, JOBTIDE_CONSUMER_PRIORITY=age)", None, "age"),
)


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


def bench_values(scheduling: Scheduling) -> dict[str, Any]:
    values = pool_chart_values(
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
    if scheduling.pack_workers is not None:
        values["nodePool"]["packWorkers"] = scheduling.pack_workers
    if scheduling.consumer_priority is not None:
        values["pipelineDefaults"]["env"].append(
            {"name": "JOBTIDE_CONSUMER_PRIORITY", "value": scheduling.consumer_priority}
        )
    return values


@dataclass(frozen=True)
class Measured:
    """One run of the trace: its figures, and what the simulator needs to replay it."""

    node_seconds: float
    peak_nodes: int
    nodes_launched: int
    pod_seconds: float
    worker_jobs: int
    peak_jobs: int
    waits: list[float]  # each task's, in the order of `tasks`
    first_node_ready: float  # after the first publish
    first_task_started: float
    zero_nodes_after_last_task: float
    tasks: tuple[Task, ...]  # published (after the first publish) and run for
    provisioning: list[float]  # each node's launch to Ready, in launch order
    startups: list[float]  # each worker pod's binding to its broker consumer, in creation order
    terminations: list[float]  # each node's disruption decision to its removal
    node_allocatable: dict[str, str]
    # Each node's launch and Ready after the first publish, in launch order.
    node_times: list[tuple[float, float | None]]
    # The watcher's samples (every second): seconds after the first publish, ready messages,
    # worker Jobs not finished.
    ramp: list[tuple[float, int, int]]
    tail: dict[str, list[float]]  # each phase of the nodes' tails (measured_tail)

    def report(self) -> str:
        return (
            f"  node-seconds {self.node_seconds:.0f} (launch to removal), peak nodes "
            f"{self.peak_nodes}, nodes launched {self.nodes_launched}\n"
            f"  pod-seconds {self.pod_seconds:.0f} ({self.worker_jobs} worker Jobs, peak "
            f"{self.peak_jobs})\n"
            f"  wait p50 {percentile(self.waits, 0.5):.1f} s, p95 "
            f"{percentile(self.waits, 0.95):.1f} s\n"
            f"  first publish -> first node Ready {self.first_node_ready:.1f} s, -> first task "
            f"started {self.first_task_started:.1f} s\n"
            f"  last task done -> zero nodes {self.zero_nodes_after_last_task:.1f} s\n"
            f"  node launch -> Ready {describe(self.provisioning)} ({len(self.provisioning)} "
            f"nodes); pod bound -> consuming {describe(self.startups)} "
            f"({len(self.startups)} workers)"
        )


# Each node's tail, phase by phase: measured from the node's pods and Karpenter's NodeClaim,
# simulated from the model's NodeLife. "-" where a phase has no counterpart.
TAIL_PHASES = (
    "last pod exit -> its deletion",
    "last pod exit -> last pod event",
    "last pod event -> Consolidatable",
    "Consolidatable -> decision",
    "last pod event -> decision",
    "decision -> node gone",
    "decision -> claim gone",
    "last pod exit -> node gone",
)


def gap(start: float | None, end: float | None) -> list[float]:
    return [] if start is None or end is None else [end - start]


def measured_tail(records: Sequence[NodeRecord]) -> dict[str, list[float]]:
    phases: dict[str, list[float]] = {phase: [] for phase in TAIL_PHASES}
    for r in records:
        exited = r.last("exited")
        for phase, values in zip(
            TAIL_PHASES,
            (
                gap(exited, r.last("deleted")),
                gap(exited, r.last_pod_event),
                gap(r.last_pod_event, r.consolidatable),
                gap(r.consolidatable, r.decided),
                gap(r.last_pod_event, r.decided),
                gap(r.decided, r.gone),
                gap(r.decided, r.claim_gone),
                gap(exited, r.gone),
            ),
            strict=True,
        ):
            phases[phase] += values
    return phases


def simulated_tail(lives: Sequence[NodeLife], consolidate_after: float) -> dict[str, list[float]]:
    phases: dict[str, list[float]] = {phase: [] for phase in TAIL_PHASES}
    for life in lives:
        consolidatable = (
            None if life.last_pod_event is None else (life.last_pod_event + consolidate_after)
        )
        phases["last pod exit -> last pod event"] += gap(life.emptied, life.last_pod_event)
        phases["last pod event -> Consolidatable"] += gap(life.last_pod_event, consolidatable)
        phases["Consolidatable -> decision"] += gap(consolidatable, life.decided)
        phases["last pod event -> decision"] += gap(life.last_pod_event, life.decided)
        phases["decision -> node gone"] += gap(life.decided, life.gone)
        phases["last pod exit -> node gone"] += gap(life.emptied, life.gone)
    return phases


def tail_report(measured: dict[str, list[float]], simulated: dict[str, list[float]]) -> str:
    """Medians per phase, measured beside simulated (nodes counted)."""

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):6.1f} s ({len(values)})" if values else "     -"

    lines = ["  tail per node, median (nodes): measured | simulated"]
    for phase in TAIL_PHASES:
        lines.append(f"    {phase:34} {cell(measured[phase]):>14} | {cell(simulated[phase])}")
    return "\n".join(lines)


def describe(latencies: Sequence[float]) -> str:
    low, high = latency_range(latencies)
    mean, sd = statistics.mean(latencies), statistics.pstdev(latencies)
    return (
        f"median {statistics.median(latencies):.1f} s, p5-p95 {low:.1f}-{high:.1f} s, mean "
        f"{mean:.1f} s, sd {sd:.1f} s"
    )


def latency_range(latencies: Sequence[float]) -> tuple[float, float]:
    low, high = (percentile(latencies, fraction) for fraction in LATENCY_PERCENTILES)
    return max(0.0, low), max(0.0, high)


def latency_moments(latencies: Sequence[float]) -> tuple[float, float]:
    """The uniform with the latencies' mean and standard deviation (clipped at 0)."""
    mean, spread = statistics.mean(latencies), 3**0.5 * statistics.pstdev(latencies)
    return max(0.0, mean - spread), mean + spread


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


def run_trace(
    kube_node: Node, bench_pool: AutoscaledPool, namespace: str, values: dict[str, Any],
    values_path: Path,
) -> Measured:  # fmt: skip
    """Install the chart with `values`, publish the trace, wait for every task and for zero
    nodes, uninstall; the run's figures."""
    kubeconfig = kube_node.cluster.kubeconfig
    helm = Helm(kubeconfig, namespace)
    helm.install(RELEASE, [write_values(values_path, values)])
    published: dict[str, float] = {}
    try:
        broker = ReleaseBroker.find(kubeconfig, namespace, RELEASE)
        watcher = Watcher(
            kubeconfig, namespace, broker, {PIPELINE: QUEUE},
            read_log=bench_pool.host_pods.read_log,
        )  # fmt: skip
        nodes = NodeWatch(kubeconfig, POOL.name, namespace)
        watcher.on_sample(nodes.sample)
        with watcher:
            first_publish = time.time()
            publisher = threading.Thread(target=publish_trace, args=(broker, trace(), published))
            publisher.start()
            publisher.join()
            wait_for(
                lambda: len(set(watcher.done_message_ids()) & set(published)) >= TASKS,
                timeout=900,
                what="every task logged done by an exited worker",
                interval=1,
            )
            wait_for(
                lambda: not worker_objects(kubeconfig, namespace, RELEASE),
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
    assert watcher.peak_active_jobs(PIPELINE) <= MAX_WORKERS
    started = {mid: log_time(e) - float(e["duration"]) for mid, e in done.items()}
    in_order = sorted(published, key=lambda mid: published[mid])
    # Creation order: first seen by the watcher (1 s samples), then bound to a node (the
    # scheduler binds pending pods oldest first).
    workers = sorted(
        (w for w in watcher.workers.values() if w.created is not None),
        key=lambda w: (w.created or 0.0, w.scheduled_epoch or float("inf")),
    )
    startups = []
    for worker in workers:
        consuming = [log_time(e) for e in worker.entries() if e.get("message") == "consuming"]
        if consuming and worker.scheduled_epoch is not None:
            startups.append(consuming[0] - worker.scheduled_epoch)
    records = sorted(nodes.records.values(), key=lambda r: r.billed_from)
    end = watcher.samples[-1].elapsed
    since_publish = nodes.started_epoch - first_publish  # node watch times -> after publish
    zero_at = (nodes.zero_since() or 0.0) + nodes.started_epoch
    return Measured(
        node_seconds=nodes.node_seconds(),
        peak_nodes=nodes.peak,
        nodes_launched=len(records),
        pod_seconds=sum((w.finished or end) - (w.created or 0.0) for w in workers),
        worker_jobs=len(workers),
        peak_jobs=watcher.peak_active_jobs(PIPELINE),
        waits=[started[mid] - published[mid] for mid in in_order],
        first_node_ready=(nodes.first_ready() or 0.0) + nodes.started_epoch - first_publish,
        first_task_started=min(started.values()) - first_publish,
        zero_nodes_after_last_task=zero_at - max(log_time(e) for e in entries),
        tasks=tuple(
            Task(published[mid] - first_publish, float(done[mid]["duration"])) for mid in in_order
        ),
        provisioning=[r.ready - r.billed_from for r in records if r.ready is not None],
        startups=startups,
        terminations=[
            r.gone - r.decided for r in records if r.gone is not None and r.decided is not None
        ],
        node_allocatable=dict(records[0].allocatable),
        node_times=[
            (r.billed_from + since_publish, None if r.ready is None else r.ready + since_publish)
            for r in records
        ],
        # (the watcher started just before the first publish)
        ramp=[
            (sample.elapsed, sample.ready[QUEUE], sample.active_jobs[PIPELINE])
            for sample in watcher.samples
        ],
        tail=measured_tail(records),
    )


def simulated(
    measured: Measured, values: dict[str, Any], replay: bool = True
) -> list[SimulationResult]:
    """The run's trace through the simulator's node model, once per seed: jobtide's scaler
    with the run's settings and levers (read from its chart values, as `simulate --values`
    reads them), the measured latencies (start-ups and provisionings replayed in their order
    when `replay`, past their end and otherwise drawn with their mean and standard deviation;
    the median termination), nodes of the shape Karpenter launched, Karpenter's
    consolidation as the NodePool sets it."""
    allocatable = measured.node_allocatable
    base = Settings(
        startup_seconds=latency_moments(measured.startups),
        startup_sequence=tuple(measured.startups) if replay else (),
    )
    settings = settings_from_values(values, PIPELINE, base)
    pool = pool_from_values(
        values,
        PIPELINE,
        NodePool(
            node_cpu=parse_quantity(allocatable["cpu"], "node cpu"),
            node_memory_gib=parse_quantity(allocatable["memory"], "node memory") / 2.0**30,
            node_max_pods=int(parse_quantity(allocatable["pods"], "node pods")),
            provisioning_seconds=latency_moments(measured.provisioning),
            provisioning_sequence=tuple(measured.provisioning) if replay else (),
            autoscaler=Autoscaler.KARPENTER,
            consolidation=Consolidation(POOL.consolidation_policy),
            consolidate_after_seconds=CONSOLIDATE_AFTER_SECONDS,
            termination_seconds=statistics.median(measured.terminations),
        ),
    )
    scaler = JobtideScaler(settings, levers=levers_from_values(values, PIPELINE))
    workload = Workload("karpenter-bench", measured.tasks, measured.tasks[-1].arrival)
    return [simulate(workload, settings, scaler, seed, pool) for seed in SIMULATION_SEEDS]


def ratio(simulated_figure: float, measured_figure: float) -> str:
    if measured_figure <= 0:
        return "ratio n/a"
    return f"x{simulated_figure / measured_figure:.2f} of measured"


def wait_report(measured: Measured, results: list[SimulationResult]) -> str:
    """Task waits by arrival window: mean and max measured | simulated (each seed's mean and
    max, averaged over the seeds), and how many of the window's tasks waited longer than the
    p95 wait, measured | simulated (mean over the seeds)."""
    measured_p95 = percentile(measured.waits, 0.95)
    lines = ["  waits by arrival window: tasks; mean, max, above p95 (measured | simulated)"]
    for low, high in itertools.pairwise(WAIT_WINDOWS):
        chosen = [i for i, task in enumerate(measured.tasks) if low <= task.arrival < high]
        if not chosen:
            continue
        real = [measured.waits[i] for i in chosen]
        runs = [[result.waits[i] for i in chosen] for result in results]
        above = [
            sum(w > percentile(r.waits, 0.95) for w in run)
            for r, run in zip(results, runs, strict=True)
        ]
        lines.append(
            f"    {low:5.0f}-{high:<4.0f} s {len(chosen):5d}; "
            f"{statistics.mean(real):5.1f} | {statistics.mean(map(statistics.mean, runs)):5.1f} s, "
            f"{max(real):5.1f} | {statistics.mean(map(max, runs)):5.1f} s, "
            f"{sum(w > measured_p95 for w in real):3d} | {statistics.mean(above):5.1f}"
        )
    return "\n".join(lines)


def ramp_report(measured: Measured, results: list[SimulationResult]) -> str:
    """The cold start, instant by instant: ready messages, worker Jobs, nodes launched and
    nodes Ready, measured | simulated (mean over the seeds)."""

    def at(timeline: Sequence[tuple[float, int, int]], when: float) -> tuple[int, int]:
        seen = [(ready, jobs) for t, ready, jobs in timeline if t <= when]
        return seen[-1] if seen else (0, 0)

    def nodes(times: Sequence[tuple[float, float | None]], when: float) -> tuple[int, int]:
        launched = sum(launch <= when for launch, _ in times)
        return launched, sum(ready is not None and ready <= when for _, ready in times)

    lines = ["  cold start, after the first publish: ready messages, worker Jobs, nodes launched,"
             " nodes Ready (measured | simulated)"]  # fmt: skip
    for when in RAMP_CHECKS:
        real = at(measured.ramp, when) + nodes(measured.node_times, when)
        simulated_runs = [
            at([(t, ready, jobs) for t, ready, jobs, _ in result.timeline], when)
            + nodes([(life.launched, life.ready) for life in result.nodes], when)
            for result in results
        ]
        cells = [
            f"{figure:3d} | {statistics.mean(run[i] for run in simulated_runs):5.1f}"
            for i, figure in enumerate(real)
        ]
        lines.append(f"    {when:4.0f} s: " + ", ".join(cells))
    return "\n".join(lines)


def compare(
    measured: Measured, results: list[SimulationResult], drawn: list[SimulationResult]
) -> tuple[float, str]:
    """The simulated mean node-seconds, and the lines comparing them with the measured; the
    figures with every latency drawn (none replayed) beside."""
    runs = [result.metrics for result in results]
    other = [result.metrics for result in drawn]
    other_node_seconds = statistics.mean(m.node_seconds for m in other)
    other_p95 = statistics.mean(m.wait_p95 for m in other)
    lives = [life for result in results for life in result.nodes]
    node_seconds = statistics.mean(m.node_seconds for m in runs)
    p95 = statistics.mean(m.wait_p95 for m in runs)
    measured_p95 = percentile(measured.waits, 0.95)
    lines = (
        f"  simulated (node model, mean of {len(runs)} seeds): node-seconds {node_seconds:.0f} "
        f"({ratio(node_seconds, measured.node_seconds)}), wait p95 {p95:.1f} s "
        f"({ratio(p95, measured_p95)}), peak nodes "
        f"{statistics.mean(m.peak_nodes for m in runs):.1f}, nodes launched "
        f"{statistics.mean(m.nodes_launched for m in runs):.1f}, pod-seconds "
        f"{statistics.mean(m.pod_seconds for m in runs):.0f}, busy workers disrupted "
        f"{max(m.busy_pods_disrupted for m in runs)}\n"
        f"  (every latency drawn, none replayed: node-seconds {other_node_seconds:.0f} "
        f"({ratio(other_node_seconds, measured.node_seconds)}), wait p95 {other_p95:.1f} s "
        f"({ratio(other_p95, measured_p95)}))\n"
        + wait_report(measured, results)
        + "\n"
        + ramp_report(measured, results)
        + "\n"
        + tail_report(measured.tail, simulated_tail(lives, CONSOLIDATE_AFTER_SECONDS))
    )
    return node_seconds, lines


def test_trace_through_the_autoscaled_pool(
    kube_node: Node, chart_images: list[str], bench_pool: AutoscaledPool, node_namespace: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    bench_pool.apply_node_pool(POOL)
    print(
        f"\nautoscaled pool: {TASKS} tasks over {TRACE_SECONDS:.0f} s (rise {RISE_SECONDS:.0f} s), "
        f"{TASK_SECONDS[0]:.0f}-{TASK_SECONDS[1]:.0f} s each; maxWorkers {MAX_WORKERS}, "
        f"idle timeout {IDLE_TIMEOUT_SECONDS} s; node registration {REGISTRATION_DELAY}, "
        f"{POOL.consolidation_policy} after {POOL.consolidate_after}"
    )
    node_seconds: dict[Scheduling, tuple[float, float]] = {}  # measured, simulated
    for number, scheduling in enumerate(SCHEDULINGS):
        values = bench_values(scheduling)
        measured = run_trace(
            kube_node, bench_pool, node_namespace, values, tmp_path / f"values-{number}.yaml"
        )
        saved = tmp_path / f"measured-{number}.json"
        saved.write_text(json.dumps({"values": values, "measured": asdict(measured)}))
        simulated_node_seconds, comparison = compare(
            measured, simulated(measured, values), simulated(measured, values, replay=False)
        )
        node_seconds[scheduling] = (measured.node_seconds, simulated_node_seconds)
        print(f"{scheduling.name}:\n{measured.report()}\n{comparison}", flush=True)
    default, ours, age = (node_seconds[scheduling] for scheduling in SCHEDULINGS)
    for label, (numerator, denominator) in {
        "jobtide's defaults / default scheduling": (ours, default),
        "jobtide's defaults / the age priority": (ours, age),
    }.items():
        print(
            f"node-seconds, {label}: measured x{numerator[0] / denominator[0]:.3f}, "
            f"simulated x{numerator[1] / denominator[1]:.3f}"
        )
