"""Ideal references for a workload (what an omniscient scaler reaches: references, which a
reactive scaler can occasionally beat) and a true lower bound on node-seconds (docs/simulator.md).

- Wait: a scaler that knew of every task the instant it arrived and could start any number of
  pods at once still leaves the first tasks of each episode (a stretch of time in which the
  system is never empty) waiting for a pod's mean start-up, plus the mean node provisioning
  when the pool was cold (empty for longer than the pool cooldown). Every other task finds
  a pod. `ideal_wait_p95` is the 95th percentile of those unavoidable waits. With a cap on
  workers (`workers`), the same scaler starts the cap's pods at once at an episode's first
  arrival and keeps them to the episode's end; tasks beyond them queue (first come, first
  served). That is the least wait any scaler honouring the cap can give.
- Cost: an omniscient schedule that knows every arrival and duration in advance, starts pods
  so that they are up exactly when needed and stops each the moment it has nothing to do,
  lets no task wait longer than the wait budget (the p95 wait the compared policy achieved).
  Its cost is the total task time plus one mean start-up per pod it starts plus the idle gaps
  it chooses to bridge (a gap shorter than a start-up is cheaper kept than restarted). Pods
  are assigned greedily in arrival order, each task to the pod that frees up latest within
  its budget (best fit), which minimises start-ups for this kind of interval schedule.
- Nodes: the omniscient schedule's pods packed at every instant onto as few nodes as hold them
  (pods move freely between nodes), each node launched its mean provisioning latency before
  it is needed (billed) and removed as soon as the autoscaler removes an empty node, unless
  it is needed again before a new launch would be cheaper. It is a reference, not a proof:
  the schedule minimises pod-seconds, not node-seconds (it never delays a task to share a
  node launch), and bounds every wait while the policies are compared on the p95. A policy
  can land below it (trickle, where a wait budget of two minutes lets a launch serve several
  tasks).
- Node lower bound: what no policy whose workers drain until idle and are never evicted (the
  goal's "zero busy workers disrupted") can go below, at any wait. Each task's duration is
  spent on a worker pod; each pod also starts up (at least the shortest start-up; it may
  leave the moment it is idle, as a worker reading a silent queue nearly does); a node holds
  at most `pods_per_node` of them; and a node is launched (at least the shortest provisioning
  latency, with no pod) and kept after its last pod left (the autoscaler's least delay for an
  empty node, since its busy pods cannot be moved: `NodePool.empty_node_least_kept_seconds`).
  At least one pod and one node are needed. It is a true bound, and a loose one: it lets
  every node be full all the time.
- Node lower bound at a p95 wait of at most W (`wait_p95`): for the same policies, a task
  that waits at most W starts on a node launched at least the shortest provisioning latency
  before it started, and that node is billed until at least the autoscaler's delay for an
  empty node after the task ended (its pods are never evicted, so the node empties only once
  the task's worker has left). So some node is billed throughout [arrival + W - shortest
  provisioning, arrival + duration + that delay] of each such task. A p95 of W lets at most
  n - ceil(0.95 n) tasks wait longer (the nearest-rank percentile); leaving out a task's
  interval shrinks the union by at most its length. The bound is the union of every task's
  interval less the k longest intervals, or the bound above if that is more. It is what
  makes a goal out of reach where the autoscaler keeps an empty node long (the cluster
  autoscaler's 10 minutes) and tasks are spread out in time (a trickle).
"""

from __future__ import annotations

import bisect
import heapq
import math

from jobtide_scaler.simulate.engine import Settings, percentile
from jobtide_scaler.simulate.nodes import NodePool
from jobtide_scaler.simulate.workloads import Workload

__all__ = [
    "ideal_node_seconds",
    "ideal_pod_seconds",
    "ideal_wait_p95",
    "node_seconds_lower_bound",
    "unavoidable_waits",
]


def unavoidable_waits(
    workload: Workload,
    settings: Settings,
    workers: int | None = None,
    pool: NodePool | None = None,
) -> list[float]:
    """Each task's least wait, with any number of pods or at most `workers`. On a node pool
    the pool is cold once its last node is gone: the idle timeout and the autoscaler's delay
    for an empty node after the last task."""
    startup = settings.mean_startup_seconds
    if pool is not None:
        provisioning = sum(pool.provisioning_seconds) / 2
        cooldown = settings.idle_timeout_seconds + pool.empty_node_kept_seconds
    else:
        provisioning = (
            sum(workload.node_provisioning_seconds) / 2
            if workload.node_provisioning_seconds
            else 0.0
        )
        cooldown = settings.pool_cooldown_seconds
    waits: list[float] = []
    episode_end = -math.inf
    pods_free_at: list[float] = []  # a heap; unused without a cap
    pods_up_at = 0.0
    for task in workload.tasks:
        if task.arrival > episode_end:
            idle_for = task.arrival - episode_end
            cold = provisioning > 0 and idle_for > cooldown
            pods_up_at = task.arrival + startup + (provisioning if cold else 0.0)
            pods_free_at = [pods_up_at] * (workers or 0)
        if workers is None:
            start = max(task.arrival, pods_up_at)
        else:
            start = max(task.arrival, heapq.heappop(pods_free_at))
            heapq.heappush(pods_free_at, start + task.duration)
        waits.append(start - task.arrival)
        episode_end = max(episode_end, start + task.duration)
    return waits


def ideal_wait_p95(
    workload: Workload,
    settings: Settings,
    workers: int | None = None,
    pool: NodePool | None = None,
) -> float:
    return percentile(unavoidable_waits(workload, settings, workers, pool), 0.95)


def ideal_pod_seconds(workload: Workload, settings: Settings, wait_budget: float) -> float:
    return sum(stop - start for start, stop in _ideal_pods(workload, settings, wait_budget))


def _ideal_pods(
    workload: Workload, settings: Settings, wait_budget: float
) -> list[tuple[float, float]]:
    """The omniscient schedule's pods as (start-up begins, last task ends) intervals."""
    startup = settings.mean_startup_seconds
    pods: list[list[float]] = []  # [start-up begins, free at]
    free: list[tuple[float, int]] = []  # sorted (free at, pod) of pods that may be reused
    for task in workload.tasks:
        # A pod idle longer than a start-up before this arrival is cheaper stopped; arrivals
        # are in order, so it is of no use to any later task either.
        del free[: bisect.bisect_left(free, (task.arrival - startup, -1))]
        best = bisect.bisect_right(free, (task.arrival + wait_budget, len(pods))) - 1
        if best >= 0:
            freed, number = free.pop(best)
            start = max(freed, task.arrival)
        else:
            number = len(pods)
            pods.append([task.arrival - startup, task.arrival])
            start = task.arrival
        pods[number][1] = start + task.duration
        bisect.insort(free, (pods[number][1], number))
    # A pod is kept across gaps shorter than a start-up only: one interval per pod.
    return [(begin, end) for begin, end in pods]


def ideal_node_seconds(
    workload: Workload, settings: Settings, pool: NodePool, wait_budget: float
) -> float:
    """An omniscient placement and dispatch on the node pool: the pods of the omniscient
    schedule (`ideal_pod_seconds`), packed at every instant onto as few nodes as hold them
    (pods move freely), each node launched its mean provisioning latency before it is needed
    and removed by the autoscaler as early as it removes an empty node (Karpenter's
    consolidateAfter, the cluster autoscaler's 10 minutes), unless it is needed again before
    a new launch would be cheaper."""
    per_node = pool.pods_per_node
    provisioning = sum(pool.provisioning_seconds) / 2
    kept = pool.empty_node_kept_seconds
    changes: list[tuple[float, int]] = []
    for begin, end in _ideal_pods(workload, settings, wait_budget):
        changes += [(begin, 1), (end, -1)]
    changes.sort()
    # Node k (1-based) is needed while more than (k - 1) * per_node pods are up; its needed
    # stretches are merged across gaps shorter than a launch, and each stretch pays a launch.
    up_since: dict[int, float] = {}
    stretches: dict[int, list[list[float]]] = {}
    pods = 0
    for at, change in changes:
        before = math.ceil(pods / per_node)
        pods += change
        after = math.ceil(pods / per_node)
        for level in range(before + 1, after + 1):
            up_since[level] = at
        for level in range(after + 1, before + 1):
            stretches.setdefault(level, []).append([up_since.pop(level), at])
    cost = 0.0
    for level_stretches in stretches.values():
        merged: list[list[float]] = []
        for begin, end in level_stretches:
            if merged and begin - merged[-1][1] < provisioning + kept:
                merged[-1][1] = end
            else:
                merged.append([begin, end])
        cost += sum(end - begin + provisioning + kept for begin, end in merged)
    return cost


def node_seconds_lower_bound(
    workload: Workload, settings: Settings, pool: NodePool, wait_p95: float | None = None
) -> float:
    """Node-seconds no policy goes below if its workers drain until idle and are never
    evicted, at any wait, or at a p95 wait of at most `wait_p95` (the module docstring gives
    the arguments)."""
    if not workload.tasks:
        return 0.0
    work = sum(task.duration for task in workload.tasks)
    one_pod = settings.startup_seconds[0]
    one_node = pool.provisioning_seconds[0] + pool.empty_node_least_kept_seconds
    bound = (work + one_pod) / pool.pods_per_node + one_node
    if wait_p95 is None:
        return bound
    return max(bound, _some_node_billed(workload, pool, wait_p95))


def _some_node_billed(workload: Workload, pool: NodePool, wait_p95: float) -> float:
    """Seconds during which at least one node is billed, at a p95 wait of at most
    `wait_p95` (the module docstring's second bound)."""
    before = wait_p95 - pool.provisioning_seconds[0]
    after = pool.empty_node_least_kept_seconds
    intervals = sorted(
        (task.arrival + before, task.arrival + task.duration + after)
        for task in workload.tasks
        if task.duration + after > before
    )
    covered = 0.0
    reach = -math.inf
    for begin, end in intervals:
        covered += max(0.0, end - max(begin, reach))
        reach = max(reach, end)
    count = len(workload.tasks)
    may_wait_longer = count - math.ceil(0.95 * count)
    lengths = sorted((end - begin for begin, end in intervals), reverse=True)
    return covered - sum(lengths[:may_wait_longer])
