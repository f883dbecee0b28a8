"""The chaos run: the chart on the test bed's real node, with the broker's data on a
PersistentVolume, works through two pipelines' tasks while, in a random order, the broker
pod is restarted twice (every member once when the broker runs several replicas), the scaler
pod is deleted, the kube-apiserver and etcd are restarted once each and busy worker pods are
deleted (SIGTERM); all along, one worker in ten is killed with SIGKILL in the middle of a
task. A ledger on the host, which the handler posts every attempt to (jobtide_testbed.ledger),
decides: every task done at least once, none lost, every task run again explained by a
disruption, the poison tasks (and only they) dead-lettered, queues empty, active Jobs never
above a cap at any look, every Job gone by its TTL and the workers back to zero. The ledger's
summary and how long consumption stopped around each disruption are printed, not asserted.

The broker's replica count comes from JOBTIDE_CHAOS_BROKER_REPLICAS (`rabbitmq.replicas`;
unset: the chart's default single broker). The CI run has 1,500 tasks; `-m bench` runs
10,000."""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from jobtide_scaler.status import STATUS_KEY
from jobtide_testbed.chartnode import (
    ContainerLog,
    Helm,
    ReleaseBroker,
    Sample,
    Watcher,
    component_selector,
    diagnostics,
    get_pods,
    host_path_volumes,
    is_ready,
    lease_holder,
    local_image,
    log_entry,
    node_values,
    scaler_metric,
    task_pid,
    worker_objects,
    write_values,
)
from jobtide_testbed.images import LEDGER_IMAGE, ledger_images, load_into
from jobtide_testbed.ledger import Exposure, Ledger, stall, summarize
from jobtide_testbed.node import NODE_IP, Node
from jobtide_testbed.process import wait_for
from jobtide_testbed.tools import kubectl
from jobtide_worker.publisher import publish
from test_chart_e2e import IDLE_EXITS

pytestmark = pytest.mark.e2e

RELEASE = "chaos"
PIPELINES = ("alpha", "beta")  # each pipeline's queue has its name
MAX_WORKERS = 5  # per pipeline
MAX_TOTAL_WORKERS = 8  # over both: the release's cap binds before the pipelines' do
POISON_PER_QUEUE = 3
KILL_ONE_IN = 10  # workers killed with SIGKILL mid-task: one in ten
IDLE_TIMEOUT_SECONDS = 8
TTL_SECONDS = 30
BROKER_VOLUME_SIZE = "1Gi"
BROKER_REPLICAS = int(os.environ.get("JOBTIDE_CHAOS_BROKER_REPLICAS", "0")) or None
SIGKILL_EXIT_CODE = 128 + signal.SIGKILL
RELEASE_WORKERS = component_selector(RELEASE, "worker")
BROKER_SELECTOR = component_selector(RELEASE, "rabbitmq")
SCALER_SELECTOR = component_selector(RELEASE, "scaler")
# Disruptions begin once this share of the tasks is done, each at a random point in it.
DISRUPT_BETWEEN = (0.05, 0.7)


@dataclass(frozen=True)
class Size:
    tasks: int  # over both pipelines, poison tasks apart
    seconds: tuple[float, float]  # each task's duration, uniform
    timeout: float  # for everything to be done after the last disruption


CI = Size(1500, (0.3, 1.1), 600)
BENCH = Size(10_000, (0.2, 0.8), 1800)


@dataclass
class Disruption:
    name: str
    began: float  # host monotonic clock, as the ledger's
    healed: float = 0.0  # consumption resumed after it
    progress: float = 0.0  # share of the tasks done when it began
    pod: str = ""  # the worker pod it hit, if any


def chaos_values(ledger_url: str, storage_class: str) -> dict[str, Any]:
    values = node_values()
    values["scaler"].update(pollIntervalSeconds=2, maxTotalWorkers=MAX_TOTAL_WORKERS)
    values["pipelineDefaults"].update(
        image=local_image(LEDGER_IMAGE),
        env=[
            {"name": "JOBTIDE_LOG_FORMAT", "value": "json"},
            {"name": "LEDGER_URL", "value": ledger_url},
        ],
    )
    values["pipelines"] = {
        name: {
            "queue": name,
            "maxWorkers": MAX_WORKERS,
            "maxNewPerCycle": MAX_WORKERS,
            "idleTimeoutSeconds": IDLE_TIMEOUT_SECONDS,
            "ttlSecondsAfterFinished": TTL_SECONDS,
        }
        for name in PIPELINES
    }
    values["rabbitmq"]["persistence"] = {
        "enabled": True,
        "storageClass": storage_class,
        "size": BROKER_VOLUME_SIZE,
    }
    if BROKER_REPLICAS is not None:
        values["rabbitmq"]["replicas"] = BROKER_REPLICAS
    return values


@pytest.fixture(scope="session")
def ledger_image(kube_node: Node, tmp_path_factory: pytest.TempPathFactory) -> str:
    load_into(kube_node.load_image, ledger_images, tmp_path_factory.mktemp("ledger-image"))
    return LEDGER_IMAGE


@pytest.fixture
def ledger(kube_node: Node) -> Iterator[Ledger]:
    # On the node address: the host's side of the pod network (the node's bridge).
    with Ledger(NODE_IP) as running:
        yield running


@pytest.fixture
def release(
    kube_node: Node,
    chart_images: list[str],
    ledger_image: str,
    ledger: Ledger,
    node_namespace: str,
    tmp_path: Path,
) -> Iterator[Helm]:
    kubeconfig = kube_node.cluster.kubeconfig
    helm = Helm(kubeconfig, node_namespace)
    volumes = host_path_volumes(kubeconfig, f"{node_namespace}-broker", BROKER_REPLICAS or 1,
                                BROKER_VOLUME_SIZE, BROKER_SELECTOR)  # fmt: skip
    with volumes as storage_class:
        values = write_values(tmp_path / "values.yaml", chaos_values(ledger.url, storage_class))
        helm.install(RELEASE, [values])
        try:
            yield helm
        finally:
            helm("uninstall", RELEASE, "--wait", check=False)


class KillLottery:
    """One worker pod in KILL_ONE_IN, counted in the order pods first post to the ledger
    (the first one among the first MAX_TOTAL_WORKERS), is doomed: SIGKILL to its process at
    its next task's start. None after `until` returns True (little work left to redo)."""

    def __init__(
        self, node: Node, ledger: Ledger, rng: random.Random, until: Callable[[], bool]
    ) -> None:
        self.node, self.ledger, self.until = node, ledger, until
        self.offset = rng.randrange(MAX_TOTAL_WORKERS)
        self.judged: list[str] = []
        self.doomed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kill-lottery", daemon=True)
        self.errors: list[str] = []

    def __enter__(self) -> KillLottery:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for pod, container in self.ledger.pods().items():
                if pod in self.judged:
                    continue
                self.judged.append(pod)
                if (len(self.judged) - 1) % KILL_ONE_IN != self.offset or self.until():
                    continue
                try:
                    pid = task_pid(self.node, container)
                except Exception as error:  # gone already: the next pod's turn
                    self.errors.append(f"{pod}: {error!r}")
                    self.offset += 1
                    continue
                self.doomed.append(pod)
                self.ledger.doom(pod, functools.partial(os.kill, pid, signal.SIGKILL))


def test_chaos_run_loses_nothing(
    kube_node: Node, release: Helm, ledger: Ledger, node_namespace: str
) -> None:
    run_chaos(kube_node, ledger, node_namespace, CI)


@pytest.mark.bench
def test_chaos_run_bench(
    kube_node: Node, release: Helm, ledger: Ledger, node_namespace: str
) -> None:
    run_chaos(kube_node, ledger, node_namespace, BENCH)


def scaler_status(watcher: Watcher) -> dict[str, dict[str, Any]]:
    """Per pipeline, the scaler's latest figures, from its status document."""
    (config_map,) = watcher.core.list_namespaced_config_map(
        watcher.namespace, label_selector=component_selector(RELEASE, "scaler-status")
    ).items
    document = json.loads((config_map.data or {}).get(STATUS_KEY, "{}"))
    return dict(document.get("pipelines", {}))


def scaler_decisions(watcher: Watcher) -> str:
    """Per pipeline, the scaler's last decision and its reason."""
    return "; ".join(
        f"{name}: {p.get('decision')} ({p.get('reason')})"
        for name, p in sorted(scaler_status(watcher).items())
    )


def run_chaos(kube_node: Node, ledger: Ledger, namespace: str, size: Size) -> None:
    cluster = kube_node.cluster
    kubeconfig = cluster.kubeconfig
    broker = ReleaseBroker.find(kubeconfig, namespace, RELEASE)
    claims = kubectl(kubeconfig, "get", "pvc", "-n", namespace, "-l", BROKER_SELECTOR,
                     "-o", "jsonpath={.items[*].status.phase}").stdout  # fmt: skip
    assert claims.split() == ["Bound"] * (BROKER_REPLICAS or 1)  # the data is on the volumes
    rng = random.Random(17)
    per_queue = size.tasks // len(PIPELINES)
    expected: set[str] = set()
    poison: set[str] = set()
    tasks: dict[str, list[dict[str, Any]]] = {}
    for queue in PIPELINES:
        batch: list[dict[str, Any]] = [
            {"id": f"{queue}-{i}", "seconds": round(rng.uniform(*size.seconds), 2)}
            for i in range(per_queue)
        ]
        batch += [{"id": f"{queue}-poison-{i}", "poison": True} for i in range(POISON_PER_QUEUE)]
        rng.shuffle(batch)
        tasks[queue] = batch
        expected |= {t["id"] for t in batch if not t.get("poison")}
        poison |= {t["id"] for t in batch if t.get("poison")}

    def progress() -> float:
        return ledger.done_count() / len(expected)

    def reached(share: float) -> bool:
        return progress() >= share

    def dead_letters_are(dlq: str, count: int) -> bool:
        return broker.depth(dlq) == count

    def done_since(moment: float) -> bool:
        return any(e.event == "done" and e.at > moment for e in ledger.events())

    disruptions: list[Disruption] = []
    exposures: list[Exposure] = []
    sigterm_logs: dict[str, str] = {}

    def restart_broker(member: str) -> None:
        nonlocal broker
        (old,) = [p for p in get_pods(kubeconfig, namespace, BROKER_SELECTOR)
                  if p["metadata"]["name"] == member]  # fmt: skip
        kubectl(kubeconfig, "delete", "pod", member, "-n", namespace, "--wait=false")

        def back() -> bool:
            return any(
                p["metadata"]["name"] == member
                and p["metadata"]["uid"] != old["metadata"]["uid"]
                and is_ready(p)
                for p in get_pods(kubeconfig, namespace, BROKER_SELECTOR)
            )

        wait_for(back, timeout=240, what=f"broker member {member} back and ready", interval=1)
        broker = ReleaseBroker.find(kubeconfig, namespace, RELEASE)
        watcher.broker = broker

    def delete_scaler() -> None:
        (old,) = get_pods(kubeconfig, namespace, SCALER_SELECTOR)
        kubectl(kubeconfig, "delete", "pod", old["metadata"]["name"], "-n", namespace,
                "--wait=false")  # fmt: skip

        def new_scaler_leads() -> bool:
            holder = lease_holder(kubeconfig, namespace, RELEASE)
            return any(
                p["metadata"]["uid"] != old["metadata"]["uid"]
                and holder.startswith(f"{p['metadata']['name']}_")
                for p in get_pods(kubeconfig, namespace, SCALER_SELECTOR)
            )

        wait_for(new_scaler_leads, timeout=120, what="a new scaler holding the Lease", interval=1)

    def delete_busy_worker(disruption: Disruption) -> None:
        """SIGTERM: the pod's log file is opened before the delete and read until the
        worker's exit line (the pod goes away with its log)."""
        pod: dict[str, Any] = {}

        def found_busy() -> bool:
            busy = set(ledger.busy_pods()) - set(lottery.doomed)
            running = [
                p for p in get_pods(kubeconfig, namespace, RELEASE_WORKERS)
                if p["metadata"]["name"] in busy and p["status"].get("phase") == "Running"
                and "deletionTimestamp" not in p["metadata"]
            ]  # fmt: skip
            pod.update(running[0] if running else {})
            return bool(running)

        wait_for(found_busy, timeout=120, what="a busy worker pod", interval=0.2)
        name = disruption.pod = pod["metadata"]["name"]
        with ContainerLog(kube_node, pod) as log:
            kubectl(kubeconfig, "delete", "pod", name, "-n", namespace, "--wait=false")
            sigterm_logs[name] = log.text_until_exit(timeout=90)
        wait_for(
            lambda: name not in {p["metadata"]["name"] for p in get_pods(kubeconfig, namespace,
                                                                         RELEASE_WORKERS)},
            timeout=90, what=f"deleted worker pod {name} gone", interval=1,
        )  # fmt: skip

    members = (
        [f"{RELEASE}-jobtide-rabbitmq-{i}" for i in range(BROKER_REPLICAS)]
        if BROKER_REPLICAS and BROKER_REPLICAS > 1
        else [f"{RELEASE}-jobtide-rabbitmq-0"] * 2
    )
    # name -> (action, whether it can lose acknowledgements of tasks already done)
    plan: list[tuple[str, Callable[[Disruption], None], bool]] = [
        *[(f"broker pod {m} restarted", lambda d, m=m: restart_broker(m), True) for m in members],
        ("scaler pod deleted", lambda d: delete_scaler(), False),
        ("kube-apiserver restarted", lambda d: cluster.restart_apiserver(), False),
        ("etcd restarted", lambda d: cluster.restart_etcd(), False),
        ("busy worker pod deleted (SIGTERM)", delete_busy_worker, True),
        ("busy worker pod deleted (SIGTERM)", delete_busy_worker, True),
    ]
    rng.shuffle(plan)
    thresholds = sorted(rng.uniform(*DISRUPT_BETWEEN) for _ in plan)

    queues = {name: name for name in PIPELINES}
    watcher = Watcher(kubeconfig, namespace, broker, queues)
    decisions: dict[float, str] = {}  # the scaler's decisions, by sample, every 10 s

    def note_decisions(sample: Sample) -> None:
        if decisions and sample.elapsed - max(decisions) < 10:
            return
        try:
            decisions[sample.elapsed] = scaler_decisions(watcher)
        except Exception as error:  # the apiserver away: noted, not fatal
            decisions[sample.elapsed] = repr(error)

    watcher.on_sample(note_decisions)
    with (
        watcher,
        KillLottery(kube_node, ledger, rng, lambda: progress() > 0.85) as lottery,
    ):
        began_at = time.monotonic()
        try:
            for queue, batch in tasks.items():
                publish(queue, batch, broker=broker.config(), declare=False)
            for (name, act, loses_acks), threshold in zip(plan, thresholds, strict=True):
                wait_for(functools.partial(reached, threshold), timeout=size.timeout,
                         what=f"{threshold:.0%} of the tasks done", interval=0.5)  # fmt: skip
                time.sleep(rng.uniform(0.5, 3))
                disruption = Disruption(name, time.monotonic(), progress=progress())
                act(disruption)
                acted = time.monotonic()
                wait_for(functools.partial(done_since, acted), timeout=180,
                         what=f"tasks done again after: {name}", interval=0.2)  # fmt: skip
                disruption.healed = time.monotonic()
                disruptions.append(disruption)
                if loses_acks:
                    pod = disruption.pod or None
                    exposures.append(Exposure(name, disruption.began - 1, disruption.healed, pod))
            wait_for(lambda: ledger.done_count() == len(expected), timeout=size.timeout,
                     what="every task done in the ledger", interval=1)  # fmt: skip
            wait_for(
                lambda: not worker_objects(kubeconfig, namespace, RELEASE),
                timeout=TTL_SECONDS + 120,
                what="workers at zero and every worker Job gone by its TTL",
                interval=1,
            )
        except BaseException:
            print("\n\n".join(diagnostics(kubeconfig, namespace)))
            print("\n".join(summarize(ledger.events(), expected, poison, exposures).lines()))
            raise
    finished_at = time.monotonic()
    # A kill's lost acknowledgement: the task done just before it, on that pod.
    exposures += [Exposure("SIGKILL", k.at - 2, k.at, k.pod) for k in ledger.kills]
    summary = summarize(ledger.events(), expected, poison, exposures)
    done_times = [e.at for e in ledger.events() if e.event == "done"]
    print()
    print("\n".join(summary.lines()))
    print(f"  {len(ledger.kills)} of {len(lottery.judged)} worker pods killed mid-task (SIGKILL)")
    for d in disruptions:
        where = f" ({d.pod})" if d.pod else ""
        stalled = stall(done_times, d.began, d.healed)
        print(f"  {d.name}{where} at {d.progress:.0%} done: consumption resumed "
              f"{d.healed - d.began:.1f} s later; stall {stalled:.1f} s")  # fmt: skip
    print("  every 10 s: seconds; ready/unacked and active Jobs per pipeline; the scaler's")
    for sample in watcher.samples:
        if sample.elapsed in decisions:
            counts = " ".join(
                f"{q} {sample.ready[q]}/{sample.unacked[q]} {sample.active_jobs[q]}"
                for q in PIPELINES
            )
            print(f"    {sample.elapsed:4.0f} s  {counts}  {decisions[sample.elapsed]}")
    print(f"  {len(watcher.jobs_seen)} worker Jobs; everything done and gone "
          f"{finished_at - began_at:.0f} s after the first publish")  # fmt: skip

    # The ledger: nothing lost, every rerun explained, poison dead-lettered and never done.
    assert not ledger.rejected, ledger.rejected
    assert summary.lost == []
    assert summary.unexplained == []
    assert (summary.poison_done, summary.poison_missing) == ([], [])
    # Every disruption happened, one in ten workers at least once killed.
    assert len(disruptions) == len(plan)
    assert ledger.kills, f"no worker was killed mid-task ({lottery.errors})"

    # The broker: queues empty, each dead-letter queue holding its poison tasks exactly.
    for queue in PIPELINES:
        counts = broker.queue(queue)
        assert (counts["messages_ready"], counts["messages_unacknowledged"]) == (0, 0)
        dlq = f"{queue}.dlq"
        wait_for(functools.partial(dead_letters_are, dlq, POISON_PER_QUEUE), timeout=30,
                 what=f"{dlq} counted", interval=1)  # fmt: skip

    # Caps held at every look at the cluster, through every disruption.
    for queue in PIPELINES:
        assert watcher.peak_active_jobs(queue) <= MAX_WORKERS
    assert watcher.peak_total_active_jobs <= MAX_TOTAL_WORKERS
    # Only the disruptions may have spoiled a look (broker, apiserver or etcd away, a pod
    # vanishing between the listing and its log read).
    windows = [(d.began, d.healed + 3) for d in disruptions]
    for error in watcher.errors:
        at = watcher.started + float(error.split("s:", 1)[0])
        assert any(start <= at <= end for start, end in windows), error

    # Workers: the killed ones show their crash, the deleted ones left on SIGTERM, every
    # other one left by itself, idle, exit 0, none gave up on the restarting broker.
    killed = {k.pod for k in ledger.kills}
    for pod in killed:
        assert watcher.workers[pod].exit_code == SIGKILL_EXIT_CODE, pod
    for pod, text in sigterm_logs.items():
        reasons = [e.get("reason") for e in map(log_entry, text.splitlines())
                   if e.get("message") == "worker exiting"]  # fmt: skip
        assert reasons == ["sigterm"], (pod, reasons)
    others = [w for n, w in watcher.workers.items() if n not in killed | set(sigterm_logs)]
    assert {w.exit_code for w in others} == {0}
    assert {w.exit_reason() for w in others} <= IDLE_EXITS

    # A scaler leads again: the new pod holds the Lease and says so in its metrics.
    (scaler,) = get_pods(kubeconfig, namespace, SCALER_SELECTOR)
    assert lease_holder(kubeconfig, namespace, RELEASE).startswith(f"{scaler['metadata']['name']}_")
    assert scaler_metric(scaler, "jobtide_leader") == 1.0
    # And it decides on the broker's counts again after every disruption (after a broker
    # restart the management API once gave no publish counter, and the counts went stale
    # for good: no worker was replaced for minutes).
    wait_for(
        lambda: {p.get("decision") for p in scaler_status(watcher).values()} == {"none"},
        timeout=60,
        what="the scaler's decisions on fresh counts of the empty queues",
        interval=1,
    )
