"""A three-member broker on the test bed's real node (`rabbitmq.replicas: 3`, each member's
data on a volume of its own): the members form one cluster from empty volumes, the pipeline's
quorum queues live on all three, and a stream of tasks goes on through two disruptions, first
the deletion of the member holding the queue's leader mid-stream, then a rolling restart of
every member by a `helm upgrade` that changes a broker setting (a second wave published as it
begins). Every task must be done at least once, none left queued or dead-lettered, every worker
must leave by itself, the scaler never restarts, Jobs never exceed the cap, and `helm
uninstall` (its pre-delete hook lets the members stop without waiting for a majority) removes
the release. How long consumption stalled around each disruption (the longest gap between two
acknowledged tasks in the workers' logs), how long each took to be over, the uninstall and the
whole test are printed, not asserted."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jobtide_testbed.chartnode import (
    Helm,
    ReleaseBroker,
    Watcher,
    WorkerRecord,
    completed_ids,
    component_selector,
    diagnostics,
    executions,
    get_pods,
    host_path_volumes,
    is_ready,
    log_time,
    release_objects,
    write_values,
)
from jobtide_testbed.node import Node
from jobtide_testbed.process import wait_for
from jobtide_testbed.tools import CHART, kubectl
from jobtide_worker.publisher import publish
from test_chart_e2e import IDLE_EXITS, PIPELINE, QUEUE, e2e_values

pytestmark = pytest.mark.e2e

RELEASE = "ha"
REPLICAS = 3
WAVE = 2000
MAX_WORKERS = 8
# Short tasks, so that 2,000 of them take about half a minute on MAX_WORKERS workers; the
# second wave's are longer, so that it lasts through the rolling restart.
FIRST_WAVE_SECONDS = (0.05, 0.15)
SECOND_WAVE_SECONDS = (0.1, 0.3)
# Finished workers' logs are read when their pod ends; the TTL keeps them past an outage of
# the watcher's broker reads.
TTL_SECONDS = 60
VOLUME_SIZE = "1Gi"
BROKER_SELECTOR = component_selector(RELEASE, "rabbitmq")
SCALER_SELECTOR = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=scaler"
# The broker setting the upgrade changes (it rolls the members: the configuration's checksum).
UPGRADED_CONSUMER_TIMEOUT_SECONDS = 7200


def ha_values(storage_class: str) -> dict[str, Any]:
    values = e2e_values()
    values["rabbitmq"].update(
        replicas=REPLICAS,
        persistence={"enabled": True, "storageClass": storage_class, "size": VOLUME_SIZE},
        # Three members, the scaler and MAX_WORKERS workers share the node's two cores.
        resources={"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
    )
    values["pipelines"][PIPELINE].update(
        maxWorkers=MAX_WORKERS, maxNewPerCycle=MAX_WORKERS, ttlSecondsAfterFinished=TTL_SECONDS
    )
    return values


@pytest.fixture
def release(
    kube_node: Node, chart_images: list[str], node_namespace: str, tmp_path: Path
) -> Iterator[Helm]:
    kubeconfig = kube_node.cluster.kubeconfig
    helm = Helm(kubeconfig, node_namespace)
    with host_path_volumes(
        kubeconfig, f"{node_namespace}-broker", REPLICAS, VOLUME_SIZE, BROKER_SELECTOR
    ) as storage_class:
        values = write_values(tmp_path / "values.yaml", ha_values(storage_class))
        try:
            began = time.monotonic()
            helm.install(RELEASE, [values])
            print(f"\nhelm install --wait (three members): {time.monotonic() - began:.1f} s")
            yield helm
        finally:
            # The test uninstalls; this is for a test that failed before it.
            helm("uninstall", RELEASE, "--wait", "--timeout", "5m", check=False, timeout=330)


def member_of(node_name: str) -> str:
    """The pod of an Erlang node name `rabbit@POD.HEADLESS.NAMESPACE`."""
    return node_name.split("@", 1)[1].split(".", 1)[0]


def longest_gap(times: list[float], start: float, end: float) -> float:
    """The longest time without an acknowledged task in [start, end], from the sorted epoch
    times of every ack (the last one before `start` and the first after `end` included)."""
    before = [t for t in times if t < start][-1:]
    after = [t for t in times if t > end][:1]
    inside = before + [t for t in times if start <= t <= end] + after
    if len(inside) < 2:
        return end - start
    return max(b - a for a, b in itertools.pairwise(inside))


def ack_times(records: list[WorkerRecord]) -> list[float]:
    """Epoch times of every task a worker logged done (right after its ack)."""
    return sorted(
        log_time(entry)
        for record in records
        for entry in record.entries()
        if entry.get("message") == "task" and entry.get("outcome") == "done"
    )


def reconnections(record: WorkerRecord) -> int:
    """How often the worker lost its connection and consumed again; -1 when it lost one and
    never came back."""
    messages = [entry.get("message") for entry in record.entries()]
    lost = [i for i, message in enumerate(messages) if message == "connection lost"]
    if lost and "consuming" not in messages[lost[-1] :]:
        return -1
    return len(lost)


def test_three_member_broker_loses_no_task_through_a_leader_loss_and_a_rolling_restart(
    kube_node: Node, release: Helm, node_namespace: str, tmp_path: Path
) -> None:
    test_began = time.monotonic()
    kubeconfig = kube_node.cluster.kubeconfig
    namespace = node_namespace
    rng = random.Random(14)
    published: list[str] = []
    over: dict[str, float] = {}
    stalled: dict[str, float] = {}
    windows: dict[str, tuple[float, float]] = {}  # epoch seconds of each disruption

    def broker(avoid: tuple[str, ...] = ()) -> ReleaseBroker:
        return ReleaseBroker.find(kubeconfig, namespace, RELEASE, avoid)

    def tasks(count: int, seconds: tuple[float, float]) -> list[dict[str, float]]:
        return [{"seconds": round(rng.uniform(*seconds), 3)} for _ in range(count)]

    def members() -> list[dict[str, Any]]:
        return get_pods(kubeconfig, namespace, BROKER_SELECTOR)

    def cluster_whole() -> bool:
        """Every member ready and running in one cluster, the queue's replicas on all."""
        pods = members()
        if len(pods) != REPLICAS or not all(
            is_ready(p) and "deletionTimestamp" not in p["metadata"] for p in pods
        ):
            return False
        # The queue's members online on every member: the cluster is whole (the release's
        # user may read queues, not the broker's nodes).
        queue = broker().queue(QUEUE)
        everyone = {p["metadata"]["name"] for p in pods}
        replicas = {member_of(n) for n in queue.get("members", [])}
        online = {member_of(n) for n in queue.get("online", [])}
        return replicas == online == everyone

    # One cluster of three from empty volumes; both queues replicated on every member.
    try:
        wait_for(cluster_whole, timeout=180, what="three members in one cluster", interval=1)
    except BaseException:
        print("\n\n".join(diagnostics(kubeconfig, namespace)))
        raise
    formed = time.monotonic() - test_began
    first = broker()
    for name in (QUEUE, f"{QUEUE}.dlq"):
        queue = first.queue(name)
        assert queue["type"] == "quorum"
        assert len(set(queue["members"])) == REPLICAS, (name, queue["members"])
        assert queue["arguments"]["x-quorum-initial-group-size"] == REPLICAS

    stop_following = threading.Event()

    def follow_the_cluster(watcher: Watcher) -> None:
        """Keep the watcher on a member that serves (members restart under it)."""
        while not stop_following.wait(1.0):
            try:
                watcher.broker = broker()
            except Exception as error:  # the next look tries again
                watcher.errors.append(f"following the cluster: {error!r}")

    def timed(name: str, until: Callable[[], bool], began: float, timeout: float) -> None:
        """Wait for the disruption `name` begun at epoch `began` to be over."""
        wait_for(until, timeout=timeout, what=f"{name}: over", interval=1)
        windows[name] = (began, time.time())
        over[name] = windows[name][1] - began

    with Watcher(kubeconfig, namespace, first, {PIPELINE: QUEUE}) as watcher:
        follower = threading.Thread(target=follow_the_cluster, args=(watcher,), daemon=True)
        follower.start()
        try:
            published += publish(
                QUEUE, tasks(WAVE, FIRST_WAVE_SECONDS), broker=first.config(), declare=False
            )
            # Mid-stream: once a sixth of the wave is done.
            wait_for(
                lambda: (depth := first.depth(QUEUE)) is not None and depth <= WAVE * 5 // 6,
                timeout=180,
                what="workers through a sixth of the first wave",
                interval=0.5,
            )

            # 1. The member holding the queue's leader is deleted.
            leader = member_of(first.queue(QUEUE)["leader"])
            old_uid = {p["metadata"]["name"]: p["metadata"]["uid"] for p in members()}[leader]
            watcher.broker = broker(avoid=(leader,))
            began = time.time()
            kubectl(kubeconfig, "delete", "pod", leader, "-n", namespace, "--wait=false")

            def leader_member_back() -> bool:
                back = any(
                    p["metadata"]["name"] == leader and p["metadata"]["uid"] != old_uid
                    for p in members()
                )
                return back and cluster_whole()

            timed("leader's member deleted", leader_member_back, began, timeout=240)
            new_leader = member_of(broker().queue(QUEUE)["leader"])
            print(f"\nleader {leader} deleted; leader now {new_leader}")

            # 2. A rolling restart: the upgrade changes a broker setting, each member in turn.
            upgraded = write_values(
                tmp_path / "upgrade.yaml",
                {"rabbitmq": {"consumerTimeoutSeconds": UPGRADED_CONSUMER_TIMEOUT_SECONDS}},
            )
            before = {p["metadata"]["name"]: p["metadata"]["uid"] for p in members()}
            began = time.time()
            upgrade: dict[str, str] = {}

            def run_upgrade() -> None:
                upgrade["output"] = release(
                    "upgrade", RELEASE, str(CHART), "--reuse-values", "-f",
                    str(upgraded), "--wait", "--timeout", "8m", timeout=540,
                )  # fmt: skip

            upgrading = threading.Thread(target=run_upgrade, daemon=True)
            upgrading.start()
            # The second wave, as the restart begins, through a member other than the one that
            # restarts first (the highest ordinal).
            highest = max(before, key=lambda name: int(name.rsplit("-", 1)[1]))
            wave = tasks(WAVE, SECOND_WAVE_SECONDS)
            through = broker(avoid=(highest,)).config()
            published += publish(QUEUE, wave, broker=through, declare=False)

            def all_restarted() -> bool:
                now = {p["metadata"]["name"]: p["metadata"]["uid"] for p in members()}
                return (
                    not upgrading.is_alive()
                    and set(now) == set(before)
                    and all(now[name] != uid for name, uid in before.items())
                    and cluster_whole()
                )

            timed("rolling restart (helm upgrade)", all_restarted, began, timeout=540)
            assert "output" in upgrade, "helm upgrade failed"
            conf = kubectl(kubeconfig, "get", "configmap", "-n", namespace, "-l", BROKER_SELECTOR,
                           "-o", "jsonpath={.items[0].data.rabbitmq\\.conf}").stdout  # fmt: skip
            assert f"consumer_timeout = {UPGRADED_CONSUMER_TIMEOUT_SECONDS * 1000}" in conf

            wait_for(
                lambda: completed_ids(list(watcher.workers.values())) >= set(published),
                timeout=240,
                what="every task logged done by an exited worker",
                interval=1,
            )
            wait_for(
                lambda: (
                    watcher.latest is not None
                    and watcher.latest.active_jobs.get(PIPELINE, 0) == 0
                    and watcher.latest.running_pods + watcher.latest.pending_pods == 0
                ),
                timeout=120,
                what="workers back to zero",
                interval=1,
            )
        except BaseException:
            print("\n\n".join(diagnostics(kubeconfig, namespace)))
            raise
        finally:
            stop_following.set()
            follower.join(timeout=10)

    # Every published task done at least once; nothing queued, unacked or dead-lettered.
    workers = list(watcher.workers.values())
    assert len(published) == 2 * WAVE
    assert completed_ids(workers) >= set(published)
    last = broker()
    queue, dead_letters = last.queue(QUEUE), last.queue(f"{QUEUE}.dlq")
    assert (queue["messages_ready"], queue["messages_unacknowledged"]) == (0, 0)
    assert dead_letters["messages"] == 0
    assert not [e for w in workers for e in w.entries() if e.get("outcome") == "dead-letter"]
    # Workers and the scaler recovered by themselves: every worker left when idle, none gave
    # up on the broker, the scaler never restarted; the cap held.
    assert {w.exit_code for w in workers} == {0}
    assert {w.exit_reason() for w in workers} <= IDLE_EXITS
    (scaler,) = get_pods(kubeconfig, namespace, SCALER_SELECTOR)
    assert [c["restartCount"] for c in scaler["status"]["containerStatuses"]] == [0]
    assert watcher.peak_active_jobs(PIPELINE) <= MAX_WORKERS
    # The queues still on every member after both disruptions.
    for name in (QUEUE, f"{QUEUE}.dlq"):
        assert len(set(last.queue(name)["members"])) == REPLICAS

    # The workers survived the loss of the member they were connected to: the rolling restart
    # took every member away under every worker alive then, and each connected again.
    lost = {name: reconnections(record) for name, record in watcher.workers.items()}
    assert sum(lost.values()) > 0
    assert all(count >= 0 for count in lost.values()), lost

    times = ack_times(workers)
    for name, (start, end) in windows.items():
        stalled[name] = longest_gap(times, start, end)

    began = time.monotonic()
    release("uninstall", RELEASE, "--wait", "--timeout", "5m", timeout=330)
    uninstalled = time.monotonic() - began
    # Owned objects (worker Jobs, the members' claims) go by garbage collection, shortly after.
    wait_for(
        lambda: release_objects(kubeconfig, namespace, RELEASE) == [],
        timeout=90,
        what="nothing of the release left",
        interval=1,
    )

    runs = executions(workers)
    print(
        f"{len(published)} tasks through {len(watcher.jobs_seen)} worker Jobs (cap "
        f"{MAX_WORKERS}, peak {watcher.peak_active_jobs(PIPELINE)}); cluster formed "
        f"{formed:.1f} s after install"
    )
    for name in windows:
        gap = stalled[name]
        print(f"  {name}: over in {over[name]:.1f} s, longest gap between acks {gap:.2f} s")
    print(f"  tasks run more than once: {sum(1 for c in runs.values() if c > 1)}")
    print(f"  connections lost and made again by workers: {sum(lost.values())}")
    print(f"  helm uninstall (pre-delete hook, three members): {uninstalled:.1f} s")
    print(f"  test duration: {time.monotonic() - test_began:.0f} s (install excluded)")
