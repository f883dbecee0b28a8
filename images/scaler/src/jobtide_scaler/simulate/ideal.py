"""Ideal references for a workload: what no reactive scaler can beat (docs/simulator.md).

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
"""

from __future__ import annotations

import bisect
import heapq
import math

from jobtide_scaler.simulate.engine import Settings, percentile
from jobtide_scaler.simulate.workloads import Workload

__all__ = ["ideal_pod_seconds", "ideal_wait_p95", "unavoidable_waits"]


def unavoidable_waits(
    workload: Workload, settings: Settings, workers: int | None = None
) -> list[float]:
    """Each task's least wait, with any number of pods or at most `workers`."""
    startup = settings.mean_startup_seconds
    provisioning = (
        sum(workload.node_provisioning_seconds) / 2 if workload.node_provisioning_seconds else 0.0
    )
    waits: list[float] = []
    episode_end = -math.inf
    pods_free_at: list[float] = []  # a heap; unused without a cap
    pods_up_at = 0.0
    for task in workload.tasks:
        if task.arrival > episode_end:
            idle_for = task.arrival - episode_end
            cold = provisioning > 0 and idle_for > settings.pool_cooldown_seconds
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


def ideal_wait_p95(workload: Workload, settings: Settings, workers: int | None = None) -> float:
    return percentile(unavoidable_waits(workload, settings, workers), 0.95)


def ideal_pod_seconds(workload: Workload, settings: Settings, wait_budget: float) -> float:
    startup = settings.mean_startup_seconds
    cost = 0.0
    free_at: list[float] = []  # sorted times at which the ideal's pods fall idle
    for task in workload.tasks:
        cost += task.duration
        # A pod idle longer than a start-up before this arrival is cheaper stopped; arrivals
        # are in order, so it is of no use to any later task either.
        del free_at[: bisect.bisect_left(free_at, task.arrival - startup)]
        best = bisect.bisect_right(free_at, task.arrival + wait_budget) - 1
        if best >= 0:
            freed = free_at.pop(best)
            cost += max(0.0, task.arrival - freed)
            start = max(freed, task.arrival)
        else:
            cost += startup
            start = task.arrival
        bisect.insort(free_at, start + task.duration)
    return cost
