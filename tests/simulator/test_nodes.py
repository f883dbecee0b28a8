"""The node pool on cases small enough to work out by hand: one node, two nodes filling,
consolidation timing, do-not-disrupt, the cluster autoscaler's 10 minutes, dispatch with and
with each consumer priority, the HPA billed back to its minimum."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from jobtide_scaler.simulate.breakdown import NodeBreakdown, simulate_with_breakdown
from jobtide_scaler.simulate.cli import levers_from_values, main, pool_from_values
from jobtide_scaler.simulate.engine import Settings, simulate
from jobtide_scaler.simulate.ideal import ideal_node_seconds, node_seconds_lower_bound
from jobtide_scaler.simulate.nodes import (
    Autoscaler,
    Consolidation,
    Levers,
    Node,
    NodeLife,
    NodePool,
    Scheduler,
    choose_node,
    parse_quantity,
    requests_from_resources,
)
from jobtide_scaler.simulate.report import compare
from jobtide_scaler.simulate.scalers import JOBTIDE_LEVERS, HpaScaler, JobtideScaler, KedaScaler
from jobtide_scaler.simulate.workloads import Task, Workload, make_workload
from simlib import FIXED

pytestmark = pytest.mark.unit

# Four workers per node, nodes ready 30 s after their launch. Karpenter's validation of a
# decision and the node's termination take no time here, so that each case's figures are
# those of what it is about; KARPENTER_POOL has them, and its own cases below.
POOL = NodePool(provisioning_seconds=(30, 30), validation_seconds=0, termination_seconds=0)
KARPENTER_POOL = NodePool(provisioning_seconds=(30, 30))
NO_LEVERS = Levers()
GUARDED = Levers(karpenter_do_not_disrupt=True, ca_safe_to_evict=False)


def tasks(*durations: float) -> Workload:
    """Tasks all queued at 0: the scaler's first decision sees them all, and worker n (up
    n-th) takes task n."""
    return Workload("hand", tuple(Task(0.0, duration) for duration in durations), 0.0)


def test_one_node_from_launch_to_consolidation() -> None:
    # Pod pending at 0; Karpenter's batch closes 1 s later (no further pending pod): node
    # launched at 1, ready at 31. Pod up at 36, works 36..46, idle until 51 and exits. The
    # node is empty and unchanged for 30 s at 81; the next 10 s check, at 90, removes it.
    metrics = simulate(tasks(10), FIXED, JobtideScaler(FIXED), pool=POOL).metrics
    assert metrics.wait_p95 == pytest.approx(36)
    assert metrics.pod_seconds == pytest.approx(20)
    assert (metrics.nodes_launched, metrics.peak_nodes) == (1, 1)
    assert metrics.node_seconds == pytest.approx(89)


def test_karpenter_validates_its_decision_then_terminates_the_node() -> None:
    # test_one_node_from_launch_to_consolidation with Karpenter's own delays: the check at 90
    # decides to remove the empty node, validates the decision 15 s later (105: still empty,
    # no pod event since 51) and deletes its claim; the instance is gone 5 s later (110).
    result = simulate(tasks(10), FIXED, JobtideScaler(FIXED), pool=KARPENTER_POOL)
    assert result.metrics.node_seconds == pytest.approx(109)
    assert result.nodes == (
        NodeLife(launched=1, ready=31, emptied=51, last_pod_event=51, decided=105, gone=110),
    )


@pytest.mark.parametrize(("pool", "empty", "removing"), [(POOL, 39, 0), (KARPENTER_POOL, 54, 5)])
def test_node_seconds_split_by_what_the_node_held(
    pool: NodePool, empty: float, removing: float
) -> None:
    # test_one_node_from_launch_to_consolidation: provisioning 1..31; the worker starts up
    # 31..36 (a quarter of the node), works 36..46 and is idle 46..51, the other three slots
    # free 31..51; then the node is empty until the decision (90, or 105 with Karpenter's
    # validation) and, with Karpenter's termination, removed 5 s more. The parts add up to
    # the bill (89, 109).
    result, parts = simulate_with_breakdown(tasks(10), FIXED, JobtideScaler(FIXED), 0, pool)
    expected = NodeBreakdown(
        busy=10 / 4,
        idle=5 / 4,
        starting=5 / 4,
        free=3 * 20 / 4,
        empty=empty,
        provisioning=30,
        removing=removing,
    )
    for name in ("busy", "idle", "starting", "free", "empty", "provisioning", "removing"):
        assert getattr(parts, name) == pytest.approx(getattr(expected, name)), name
    assert parts.total == pytest.approx(result.metrics.node_seconds)
    assert result.metrics == simulate(tasks(10), FIXED, JobtideScaler(FIXED), 0, pool).metrics


def test_the_breakdown_adds_up_to_the_bill_on_a_real_workload() -> None:
    workload = make_workload("declining", 1)
    result, parts = simulate_with_breakdown(
        workload, Settings(), JobtideScaler(Settings()), 1, KARPENTER_POOL
    )
    assert parts.total == pytest.approx(result.metrics.node_seconds)
    # The busy slots are the work, whatever the policy: every task's duration on a quarter node.
    work = sum(task.duration for task in workload.tasks)
    assert parts.busy == pytest.approx(work / KARPENTER_POOL.pods_per_node)


def test_a_pod_bound_during_the_validation_keeps_the_node() -> None:
    # A second task arrives at 92, while the decision of 90 waits for its validation. The
    # scaler's decision at 95 starts a worker, bound to the node (not cordoned yet): a pod
    # event at 95, so at 105 the node is no longer consolidatable and is kept. The worker is
    # up at 100, works until 110 and exits at 115 (a pod event); the checks every 10 s from
    # 105 find it consolidatable at 145, validated at 160, gone at 165.
    workload = Workload("hand", (Task(0.0, 10), Task(92.0, 10)), 92.0)
    result = simulate(workload, FIXED, JobtideScaler(FIXED), pool=KARPENTER_POOL)
    assert result.metrics.wait_p99 == pytest.approx(36)
    assert result.metrics.jobs_created == 2
    assert result.metrics.node_seconds == pytest.approx(164)
    assert (result.nodes[0].decided, result.nodes[0].gone) == (160, 165)


@pytest.mark.parametrize(("ttl", "last_event", "node_seconds"), [(30, 81, 139), (300, 51, 109)])
def test_a_finished_jobs_deletion_is_a_pod_event(
    ttl: int, last_event: float, node_seconds: float
) -> None:
    # The worker exits at 51. Its Job's TTL deletes it, and its pod, at 51 + ttl: the pod
    # turns terminating, an event Karpenter records. With 30 s (the autoscaled-pool
    # benchmark's), at 81, before the node was taken: consolidatable at 111, decided at the
    # check of 120, validated at 135, gone at 140. With 300 s the node is long gone.
    settings = replace(FIXED, ttl_seconds_after_finished=ttl)
    result = simulate(tasks(10), settings, JobtideScaler(settings), pool=KARPENTER_POOL)
    assert result.nodes[0].last_pod_event == last_event
    assert result.metrics.node_seconds == pytest.approx(node_seconds)


def test_karpenter_records_pod_events_at_most_every_ten_seconds() -> None:
    node = Node(0, 0.0)
    node.ready_at = 0.0
    pool = NodePool(consolidate_after_seconds=30)
    assert not node.consolidatable(pool, 29.9)  # since it became ready
    assert node.consolidatable(pool, 30.0)
    node.bind(1, pool, 5.0)
    node.unbind(1, pool, 12.0)  # 7 s after the last event recorded: not recorded
    assert (node.last_pod_event, node.emptied_at) == (5.0, 12.0)
    assert node.consolidatable(pool, 35.0)
    node.pod_event(15.0)  # 10 s after: recorded
    assert node.last_pod_event == 15.0
    assert not node.consolidatable(pool, 44.9)


def test_two_nodes_filling() -> None:
    # Five pods pending at once: one launch decision, ceil(5 / 4) = 2 nodes.
    metrics = simulate(tasks(*[10] * 5), FIXED, JobtideScaler(FIXED), pool=POOL).metrics
    assert (metrics.nodes_launched, metrics.peak_nodes) == (2, 2)
    assert metrics.tasks_unfinished == 0


def test_spread_and_pack_choose_different_nodes() -> None:
    pool = NodePool()
    first, second = Node(0, 0.0), Node(1, 0.0)
    for node in (first, second):
        node.ready_at = 0.0
    first.bind(100, pool, 0.0)
    # The default scheduler picks the least allocated node, the packing affinity the node
    # with workers; with equal nodes the oldest.
    assert choose_node([first, second], pool, Scheduler.SPREAD) is second
    assert choose_node([first, second], pool, Scheduler.PACK) is first
    for pod in (101, 102, 103):
        first.bind(pod, pool, 0.0)
    assert choose_node([first, second], pool, Scheduler.PACK) is second  # first is full
    second.ready_at = None
    assert choose_node([first, second], pool, Scheduler.PACK) is None  # not ready: pending


def underutilized_run(levers: Levers) -> tuple[int, int]:
    """Six pods on two nodes (4 + 2). Two of the first node's tasks take 1 s, the others
    300 s: at 42 two workers of the first node have left, so the second node's two busy
    workers fit on the first. The second node has been unchanged since 31, settled at 61,
    and is consolidated at the check at 70 unless its pods forbid it."""
    workload = tasks(1, 1, 300, 300, 300, 300)
    scaler = JobtideScaler(FIXED, levers=levers)
    metrics = simulate(workload, FIXED, scaler, pool=POOL).metrics
    assert metrics.tasks_unfinished == 0
    return metrics.busy_pods_disrupted, metrics.nodes_launched


def test_consolidation_evicts_busy_workers_unless_they_say_do_not_disrupt() -> None:
    assert underutilized_run(NO_LEVERS) == (2, 2)
    assert underutilized_run(GUARDED) == (0, 2)


@pytest.mark.parametrize(("retried", "jobs", "longest_wait"), [(True, 8, 75), (False, 6, 336)])
def test_a_job_with_retries_left_replaces_its_evicted_pod(
    retried: bool, jobs: int, longest_wait: float
) -> None:
    # underutilized_run's six pods under KEDA's default strategy (target 1). At 70 the second
    # node is consolidated and its two busy workers evicted; their tasks go back to the queue.
    # KEDA then sees 2 ready messages and 4 running Jobs and creates nothing. A Job with
    # retries left (Kubernetes' default backoffLimit 6) starts a new pod at once, bound on the
    # first node and up at 75, which takes a requeued task; without, the tasks wait for the
    # first node's workers, busy until 336.
    workload = tasks(1, 1, 300, 300, 300, 300)
    levers = Levers(evicted_pod_retried=retried)
    scaler = KedaScaler(FIXED, "default", drain=True, levers=levers)
    metrics = simulate(workload, FIXED, scaler, pool=POOL).metrics
    assert (metrics.busy_pods_disrupted, metrics.jobs_created) == (2, jobs)
    assert metrics.wait_p99 == pytest.approx(longest_wait)
    assert metrics.tasks_unfinished == 0


@pytest.mark.parametrize(
    ("grace", "disrupted", "node_seconds", "longest_wait"), [(600, 0, 714, 36), (100, 2, 678, 175)]
)
def test_an_evicted_worker_finishes_its_task_within_its_grace(
    grace: float, disrupted: int, node_seconds: float, longest_wait: float
) -> None:
    # underutilized_run's consolidation at 70, the workers without do-not-disrupt but with a
    # grace on SIGTERM (jobtide's Jobs: no retry). The second node is cordoned; its two
    # workers finish their tasks at 336 and leave, and the node goes then (335 node-s); the
    # first node's workers leave at 341, it is settled at 371 and removed at 380 (379). With
    # a grace of 100 s the tasks are cut off at 170 and run again from 175 on the first
    # node's two new workers (the scaler's decision at 170).
    levers = Levers(eviction_grace_seconds=grace, evicted_pod_retried=False)
    workload = tasks(1, 1, 300, 300, 300, 300)
    metrics = simulate(workload, FIXED, JobtideScaler(FIXED, levers=levers), pool=POOL).metrics
    assert (metrics.busy_pods_disrupted, metrics.nodes_launched) == (disrupted, 2)
    assert metrics.node_seconds == pytest.approx(node_seconds)
    assert metrics.wait_p99 == pytest.approx(longest_wait)
    assert metrics.tasks_unfinished == 0


def busy_only_run(levers: Levers, late_task: bool) -> tuple[float, int, int]:
    """Five pods at 0 on two nodes (4 + 1, packed), ready at 31, up at 36, idle timeout 60 s.
    The first node's tasks take 300, 300, 1, 1 s: its two short workers leave at 97 and make
    room. The second node's worker works 36..86 and is idle from 86. A check at 100 finds the
    second node settled (unchanged since 31) and its worker fitting on the first node. With
    `late_task`, a task arrives at 108 and goes to that worker, the only idle one."""
    settings = replace(FIXED, idle_timeout_seconds=60)
    durations = (300, 300, 1, 1, 50)
    arrivals = [Task(0.0, duration) for duration in durations]
    if late_task:
        arrivals.append(Task(108.0, 10))
    workload = Workload("hand", tuple(arrivals), 0.0)
    scaler = JobtideScaler(settings, levers=levers)
    metrics = simulate(workload, settings, scaler, pool=POOL).metrics
    assert metrics.tasks_unfinished == 0
    return metrics.node_seconds, metrics.busy_pods_disrupted, metrics.jobs_created


BUSY_ONLY = replace(JOBTIDE_LEVERS, protect_busy_only=True)


@pytest.mark.parametrize(
    ("levers", "late_task", "figures"),
    [
        # The annotation for the whole life: the second node goes when its worker does (146),
        # settled at 176, at the check of 180 (179 node-s); the first node's workers are
        # done at 336, leave at 396, and it goes at 430 (429).
        (JOBTIDE_LEVERS, False, (608, 0, 5)),
        # Busy workers only: the idle worker is evicted at 100 and gone (99 node-s).
        (BUSY_ONLY, False, (528, 0, 5)),
        # Its patch to idleness lands 20 s after 86: the check at 110 takes the node.
        (replace(BUSY_ONLY, protection_delay_seconds=20), False, (538, 0, 5)),
        # The late task: with the annotation for life the worker takes it and leaves at 178,
        # the node goes at 210. Busy only, the worker was evicted at 100; the scaler's
        # decision at 110 starts a sixth worker on the first node.
        (JOBTIDE_LEVERS, True, (638, 0, 5)),
        (BUSY_ONLY, True, (528, 0, 6)),
        # The race: the worker takes the task at 108, its patch for it lands only at 128, and
        # the check at 110 evicts it busy: its task is cut off and goes back to the queue,
        # where the sixth worker takes it.
        (replace(BUSY_ONLY, protection_delay_seconds=20), True, (538, 1, 6)),
        # The same with the worker's grace on SIGTERM: it finishes the task at 118, and its
        # cordoned node goes then (117 node-s). Nothing is lost, no new worker.
        (
            replace(BUSY_ONLY, protection_delay_seconds=20, eviction_grace_seconds=25),
            True,
            (546, 0, 5),
        ),
    ],
)
def test_protecting_busy_workers_only_lets_consolidation_take_idle_ones(
    levers: Levers, late_task: bool, figures: tuple[float, int, int]
) -> None:
    node_seconds, disrupted, jobs = busy_only_run(levers, late_task)
    assert (node_seconds, disrupted, jobs) == (pytest.approx(figures[0]), *figures[1:])


def test_a_negative_lever_names_its_field() -> None:
    with pytest.raises(ValueError, match="protection_delay_seconds"):
        Levers(protection_delay_seconds=-1)


def test_when_empty_never_moves_a_busy_worker() -> None:
    pool = replace(POOL, consolidation=Consolidation.WHEN_EMPTY)
    workload = tasks(1, 1, 300, 300, 300, 300)
    metrics = simulate(workload, FIXED, JobtideScaler(FIXED, levers=NO_LEVERS), pool=pool)
    assert metrics.metrics.busy_pods_disrupted == 0


def test_cluster_autoscaler_keeps_an_empty_node_ten_minutes() -> None:
    # The pod is created at 0, after the scan of 0; the scan at 10 launches a node, ready at
    # 40. Pod up at 45, works 45..55, exits at 60. The scan at 60 finds the node unneeded;
    # 600 s later (and 650 s after the scale-up) it is removed: 660 - 10 = 650 node-s.
    pool = replace(POOL, autoscaler=Autoscaler.CLUSTER_AUTOSCALER)
    metrics = simulate(tasks(10), FIXED, JobtideScaler(FIXED), pool=pool).metrics
    assert metrics.wait_p95 == pytest.approx(45)
    assert metrics.node_seconds == pytest.approx(650)


def test_cluster_autoscaler_respects_safe_to_evict_false() -> None:
    # Three 2000 s tasks on one node and one on a second: the second node is under 50 % and
    # its pod fits on the first, so after 10 minutes the autoscaler evicts it, unless the
    # pod says it is not safe to evict.
    pool = replace(POOL, autoscaler=Autoscaler.CLUSTER_AUTOSCALER)
    workload = tasks(2000, 2000, 2000, 1, 1, 2000)
    for levers, disrupted in ((NO_LEVERS, 1), (GUARDED, 0)):
        metrics = simulate(workload, FIXED, JobtideScaler(FIXED, levers=levers), pool=pool)
        assert metrics.metrics.busy_pods_disrupted == disrupted
        assert metrics.metrics.tasks_unfinished == 0


@pytest.mark.parametrize(("mode", "pod_seconds"), [("none", 265), ("age", 246), ("node", 265)])
def test_dispatch_round_robin_or_oldest_worker_first(mode: str, pod_seconds: float) -> None:
    # Two workers up at 5: worker 0 works 5..25, worker 1 5..6. A task arrives at 30 with
    # both idle. Round robin gives it to the idle-longest (worker 1: exits at 140, worker 0
    # at 125); with the age priority the oldest takes it (worker 0 exits at 140, worker 1
    # at 106, 100 s after its last task). Without a node pool both share one node: the node
    # priority is round robin.
    settings = replace(FIXED, idle_timeout_seconds=100)
    workload = Workload("hand", (Task(0, 20), Task(0, 1), Task(30, 10)), 0.0)
    scaler = JobtideScaler(settings, levers=Levers(consumer_priority=mode))
    metrics = simulate(workload, settings, scaler).metrics
    assert metrics.pod_seconds == pytest.approx(pod_seconds)


@pytest.mark.parametrize(
    ("mode", "exits", "node_seconds"),
    [("none", (167, 163, 165), 398), ("age", (167, 156, 156), 388), ("node", (165, 167, 156), 388)],
)
def test_dispatch_by_node_round_robin_among_a_nodes_workers(
    mode: str, exits: tuple[float, float, float], node_seconds: float
) -> None:
    # Nodes of two workers. Three tasks at 0: two nodes launched at 1, ready at 31; workers 0
    # and 1 on the first, worker 2 on the second, all up at 36 and busy until 56. Then a
    # task of 1 s at 60, 62, 64 and 66, each on an idle pool. Round robin: workers 0, 1, 2, 0
    # (last tasks end at 67, 63, 65). Age: worker 0 takes all four. Node: the first node's
    # workers take turns (0, 1, 0, 1: 65, 67) and worker 2 gets nothing: it leaves at 156,
    # its node 34 s later (consolidateAfter 30 s and the 10 s loop), as with age. Idle
    # timeout 100 s.
    pool = replace(POOL, node_cpu=2)
    settings = replace(FIXED, idle_timeout_seconds=100)
    trickle = tuple(Task(60 + 2 * index, 1) for index in range(4))
    workload = Workload("hand", (Task(0, 20), Task(0, 20), Task(0, 20), *trickle), 0.0)
    levers = Levers(consumer_priority=mode, karpenter_do_not_disrupt=True)
    metrics = simulate(workload, settings, JobtideScaler(settings, levers=levers), pool=pool)
    # Each worker is billed from its binding at 31 to its exit.
    assert metrics.metrics.pod_seconds == pytest.approx(sum(exits) - 3 * 31)
    assert metrics.metrics.node_seconds == pytest.approx(node_seconds)


@pytest.mark.parametrize(("quiet_check", "pod_seconds"), [(0, 45), (5, 20.5)])
def test_an_idle_worker_leaves_once_the_queue_is_silent(
    quiet_check: float, pod_seconds: float
) -> None:
    # The worker is up at 5, works 5..15 and is idle from 15 with an idle timeout of 30 s: it
    # exits at 45. Reading the queue 0.5 s into its idle spell and every 5 s after, it finds at
    # 20.5 nothing published since its read at 15.5 and nothing ready: it exits at 20.5.
    settings = replace(FIXED, idle_timeout_seconds=30, quiet_check_seconds=quiet_check)
    levers = Levers(consumer_priority="age")
    metrics = simulate(tasks(10), settings, JobtideScaler(settings, levers=levers)).metrics
    assert metrics.pod_seconds == pytest.approx(pod_seconds)


@pytest.mark.parametrize(("quiet_check", "pod_seconds"), [(0, 92 + 45), (5, 72.5 + 45)])
def test_an_idle_worker_stays_while_the_queue_is_fed(
    quiet_check: float, pod_seconds: float
) -> None:
    # Two workers up at 5 work 5..15; then a task of 1 s every 4 s from 17 to 61, which the
    # older worker 0 takes (consumer priorities). Worker 1, idle from 15, finds something
    # published at each read (every 5 s from 15.5): it stays until its idle timeout, 45,
    # either way. Worker 0 is idle from 62: without reads it exits at 92; its read at 67.5
    # sees the counter as of the broker's statistics at 65, which counts the task of 61 that
    # the read at 62.5 (as of 60) did not: it stays, and leaves at the read of 72.5.
    settings = replace(FIXED, idle_timeout_seconds=30, quiet_check_seconds=quiet_check)
    stream = tuple(Task(17.0 + 4 * index, 1) for index in range(12))
    workload = Workload("hand", (Task(0, 10), Task(0, 10), *stream), 0.0)
    levers = Levers(consumer_priority="age")
    metrics = simulate(workload, settings, JobtideScaler(settings, levers=levers)).metrics
    assert metrics.jobs_created == 2
    assert metrics.pod_seconds == pytest.approx(pod_seconds)


def test_only_jobtides_workers_read_the_queue() -> None:
    # KEDA's workers on the same settings know nothing of the queue's counters: idle from 15,
    # the worker leaves by its idle timeout of 30 s, at 45.
    settings = replace(FIXED, idle_timeout_seconds=30, quiet_check_seconds=5)
    metrics = simulate(tasks(10), settings, KedaScaler(settings, drain=True)).metrics
    assert metrics.pod_seconds == pytest.approx(45)


def test_the_hpa_is_billed_back_to_its_minimum_with_its_node() -> None:
    # One replica from the start, a second at 0 for two tasks. Pods pending at 0: one node
    # launched at 1, ready at 31; tasks 36..46. The metric is 2 at the syncs of 0 to 45, so
    # the 300 s window lets the HPA scale down at 345; back at one replica at the sync of
    # 360, the run ends. The node under the remaining replica is billed to that end.
    settings = replace(FIXED, max_workers=10)
    metrics = simulate(tasks(10, 10), settings, HpaScaler(settings), pool=POOL).metrics
    assert metrics.pod_seconds == pytest.approx((345 - 31) + (360 - 31))
    assert metrics.node_seconds == pytest.approx(360 - 1)


def test_a_zero_duration_task_is_valid() -> None:
    metrics = simulate(tasks(0, 0), FIXED, JobtideScaler(FIXED), pool=POOL).metrics
    assert metrics.tasks_unfinished == 0
    assert metrics.wait_p95 == pytest.approx(36)


def test_same_seed_same_node_figures() -> None:
    workload = make_workload("declining", 2)
    policies = ("jobtide", "keda-default-drain", "hpa")
    first = compare(workload, Settings(), 2, policies, NodePool()).as_json()
    again = compare(workload, Settings(), 2, policies, NodePool()).as_json()
    assert first == again
    assert first["policies"]["jobtide"]["node_seconds"] > 0


def test_ideal_node_seconds_by_hand() -> None:
    settings = replace(FIXED, startup_seconds=(10, 10))
    pool = NodePool(provisioning_seconds=(60, 60))
    # Five simultaneous 100 s tasks, budget 0: five pods, each up 10 s before its task,
    # 2 nodes for 110 s, each paying one 60 s launch and Karpenter's least time for an empty
    # node: its 30 s consolidateAfter, 15 s validation and 5 s termination.
    assert ideal_node_seconds(tasks(*[100] * 5), settings, pool, 0.0) == pytest.approx(
        2 * (110 + 60 + 30 + 15 + 5), abs=0.01
    )


def test_node_lower_bound_by_hand() -> None:
    # One 10 s task: its pod starts up at least 5 s, alone on a node of four slots (15 / 4 =
    # 3.75 node-s), and the node takes at least 30 s to launch and is kept at least 20 s
    # empty (consolidateAfter 30 s, less the 10 s within which Karpenter may not have recorded
    # the pod's exit): 53.75. The simulated run (test_one_node_from_launch_to_consolidation)
    # takes 89.
    workload = tasks(10)
    assert POOL.empty_node_least_kept_seconds == 20
    assert node_seconds_lower_bound(workload, FIXED, POOL) == pytest.approx(53.75)
    metrics = simulate(workload, FIXED, JobtideScaler(FIXED), pool=POOL).metrics
    assert metrics.node_seconds >= node_seconds_lower_bound(workload, FIXED, POOL)


def test_node_lower_bound_at_a_wait_by_hand() -> None:
    # Under the cluster autoscaler an empty node is kept 10 minutes. Two 10 s tasks 2000 s
    # apart, each starting within 20 s of its arrival on a node launched at least 30 s before:
    # some node is billed over [0 + 20 - 30, 0 + 10 + 600] and [1990, 2610], 1240 node-s,
    # where the bound at any wait is (10 + 10 + 5) / 4 + 30 + 600 = 636.25.
    pool = NodePool(
        autoscaler=Autoscaler.CLUSTER_AUTOSCALER,
        provisioning_seconds=(30, 30),
        termination_seconds=0,
    )
    two = Workload("hand", (Task(0.0, 10.0), Task(2000.0, 10.0)), 2000.0)
    assert node_seconds_lower_bound(two, FIXED, pool) == pytest.approx(636.25)
    assert node_seconds_lower_bound(two, FIXED, pool, wait_p95=20) == pytest.approx(1240)
    # A p95 lets n - ceil(0.95 n) tasks wait longer: of 20 such tasks one, whose interval
    # (620 s) no longer counts.
    twenty = Workload("hand", tuple(Task(2000.0 * i, 10.0) for i in range(20)), 38000.0)
    assert node_seconds_lower_bound(twenty, FIXED, pool, wait_p95=20) == pytest.approx(19 * 620)
    # The simulated policy, at its own p95 wait, is not below it.
    metrics = simulate(two, FIXED, JobtideScaler(FIXED), pool=pool).metrics
    assert metrics.node_seconds >= node_seconds_lower_bound(two, FIXED, pool, metrics.wait_p95)


@pytest.mark.parametrize(
    ("text", "value"),
    [("500m", 0.5), ("2", 2.0), (1, 1.0), ("1Gi", 2.0**30), ("512Mi", 2.0**29), ("1G", 1e9)],
)
def test_quantities(text: object, value: float) -> None:
    assert parse_quantity(text, "x") == pytest.approx(value)


def test_requests_from_resources_and_errors() -> None:
    resources = {"requests": {"cpu": "250m"}, "limits": {"cpu": "1", "memory": "2Gi"}}
    assert requests_from_resources(resources, "r.") == (0.25, 2.0)
    assert requests_from_resources({}, "r.") == (None, None)
    with pytest.raises(ValueError, match=r"r\.requests\.cpu"):
        requests_from_resources({"requests": {"cpu": "lots"}}, "r.")
    with pytest.raises(ValueError, match="node_cpu"):
        NodePool(node_cpu=0)


def test_levers_and_requests_from_values() -> None:
    values = {
        "pipelineDefaults": {"resources": {"requests": {"cpu": "500m", "memory": "256Mi"}}},
        "pipelines": {"resize": {"queue": "resize"}},
    }
    # The chart's defaults: packing, both annotations, the worker's node priority.
    assert levers_from_values(values, None) == JOBTIDE_LEVERS
    pool = pool_from_values(values, None, NodePool())
    assert (pool.pod_cpu, pool.pod_memory_gib, pool.pods_per_node) == (0.5, 0.25, 8)
    values["nodePool"] = {
        "affinity": {"nodeAffinity": {}},
        "podAnnotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
    }
    values["pipelines"]["resize"]["env"] = [{"name": "JOBTIDE_CONSUMER_PRIORITY", "value": "none"}]
    assert levers_from_values(values, None) == Levers(
        ca_safe_to_evict=False, evicted_pod_retried=False, finished_pods_deleted=True
    )
    values["pipelines"]["resize"]["env"] = [{"name": "JOBTIDE_CONSUMER_PRIORITY", "value": "Age"}]
    assert levers_from_values(values, None).consumer_priority == "age"
    values["pipelines"]["resize"]["env"][0]["value"] = "oldest"
    with pytest.raises(ValueError, match=r"pipelines\.resize\.env: JOBTIDE_CONSUMER_PRIORITY"):
        levers_from_values(values, None)
    values["pipelines"]["resize"]["resources"] = {"requests": {"memory": "a lot"}}
    with pytest.raises(ValueError, match=r"pipelines\.resize\.resources\.requests\.memory"):
        pool_from_values(values, None, NodePool())


def test_node_options_through_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("0,10\n0,0\n1,5\n")
    values = tmp_path / "values.yaml"
    values.write_text(
        "pipelineDefaults: {resources: {requests: {cpu: 2}}}\n"
        "pipelines: {resize: {queue: resize}}\n"
    )
    arguments = ["--trace", str(trace), "--values", str(values), "--format", "json"]
    billed = []
    for termination in ("0", "30"):
        command = [*arguments, "--autoscaler", "ca", "--node-cpu", "4", "--policy", "jobtide"]
        assert main([*command, "--node-termination", termination]) == 0
        jobtide = json.loads(capsys.readouterr().out)["policies"]["jobtide"]
        # Three tasks, two workers of 2 CPUs per 4-CPU node: one node, kept 10 minutes empty.
        assert (jobtide["nodes_launched"], jobtide["busy_pods_disrupted"]) == (1, 0)
        assert jobtide["node_seconds"] > 600
        billed.append(jobtide["node_seconds"])
    assert billed[1] - billed[0] == pytest.approx(30)  # the one node's termination
    assert main([*arguments, "--autoscaler", "none", "--policy", "jobtide"]) == 0
    assert "node_seconds" not in json.loads(capsys.readouterr().out)["policies"]["jobtide"]
    assert main([*arguments, "--pod-cpu", "8", "--policy", "jobtide"]) == 2
    assert "pod_cpu" in capsys.readouterr().err
