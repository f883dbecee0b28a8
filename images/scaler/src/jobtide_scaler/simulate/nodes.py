"""The node pool under the worker pods: what the user is billed for.

Stated once here (docs/simulator.md has the long form):

- Nodes of one shape (allocatable CPU, memory, pods). A pod fits a node when its requests fit
  beside the pods bound there. Nodes are billed from their launch to their termination.
- Scheduling (kube-scheduler): among the ready nodes the pod fits, `spread` picks the least
  allocated (the default `LeastAllocated` score), `pack` the one with the most worker pods,
  then the most allocated (what a preferred pod affinity to the other workers gives: the
  InterPodAffinity score outweighs the resource scores). Ties go to the oldest node. A pod
  that fits nowhere is pending until a node is ready for it.
- Provisioning: pending pods not already expected on a launching node are batched into one
  launch decision (Karpenter: the batch closes 1 s after the last new pending pod or 10 s
  after the first; the cluster autoscaler: at its next 10 s scan), which launches as many
  nodes as they fill. A node is ready after a latency drawn from `provisioning_seconds`.
- Scale-down:
  - Karpenter (sigs.k8s.io/karpenter v1.14, pkg/controllers/nodeclaim/podevents and
    pkg/controllers/disruption): each node keeps the time of its last pod event, a pod bound
    to it, finishing (its phase Succeeded or Failed) or being deleted (a finished Job's pod
    when the Job's `ttlSecondsAfterFinished` deletes it, an evicted or scaled-down pod); an
    event within `POD_EVENT_DEDUPE_SECONDS` of the last one recorded is not recorded. A node
    is consolidatable `consolidate_after_seconds` after that time (after it became ready,
    without one). The disruption loop runs every 10 s: WhenEmpty takes every consolidatable
    empty node in one decision; WhenEmptyOrUnderutilized, when no node is empty, a
    consolidatable node whose pods all fit on the other ready nodes (one per decision, only
    while no pod is pending), unless a pod carries `karpenter.sh/do-not-disrupt: "true"`. A
    decision is validated `validation_seconds` later (the loop waits meanwhile): the nodes
    still consolidatable (and empty, or removable) are removed, the others kept, and the loop
    runs again at once. A pod carries its annotations for its whole life, or, when protecting
    busy workers only, from the moment its worker's patch for a message lands until the
    patch for its idleness lands (`protection_delay_seconds` after each).
  - Cluster autoscaler: a node is unneeded while its requests are below
    `ca_utilization_threshold` of its allocatable and its pods fit on other nodes, none
    annotated `cluster-autoscaler.kubernetes.io/safe-to-evict: "false"`; after
    `ca_unneeded_seconds` unneeded it is removed (its pods evicted), but no node is removed
    within `ca_delay_after_add_seconds` of a scale-up.
- An evicted worker exits; a busy one's message goes back to the queue and its work is lost,
  unless the worker finishes its task within its grace on SIGTERM (`eviction_grace_seconds`):
  the node is then cordoned and drained, and removed when its last pod has left. A removed
  node is billed `termination_seconds` more: the autoscaler's termination (taint, drain,
  the instance's deletion, the finalizers) until the instance is gone.
  A Job with retries left (`backoffLimit` above 0, Kubernetes' default) starts a new pod for
  it at once (the Job controller's first back-off of 10 s is not modelled).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from jobtide_worker import priority

__all__ = [
    "AUTOSCALER_CHECK_SECONDS",
    "POD_EVENT_DEDUPE_SECONDS",
    "Autoscaler",
    "Consolidation",
    "Levers",
    "Node",
    "NodeLife",
    "NodePool",
    "Scheduler",
    "choose_node",
    "parse_quantity",
    "reject_invalid",
    "requests_from_resources",
    "with_requests",
]

# Karpenter's disruption controller and the cluster autoscaler's scan both run every 10 s.
AUTOSCALER_CHECK_SECONDS = 10.0
# Karpenter records a node's last pod event at most once per 10 s (podevents' dedupeTimeout:
# fewer writes to the API server); an event within that time of the last one recorded is not.
POD_EVENT_DEDUPE_SECONDS = 10.0


def reject_invalid(kind: str, instance: object, checks: Mapping[str, bool]) -> None:
    """Raises a ValueError naming the first field whose check failed, with its value."""
    for name, valid in checks.items():
        if not valid:
            raise ValueError(f"invalid {kind} {name}: {getattr(instance, name)!r}")


class Autoscaler(enum.Enum):
    KARPENTER = "karpenter"
    CLUSTER_AUTOSCALER = "ca"


class Consolidation(enum.Enum):
    WHEN_EMPTY = "WhenEmpty"
    WHEN_EMPTY_OR_UNDERUTILIZED = "WhenEmptyOrUnderutilized"


class Scheduler(enum.Enum):
    SPREAD = "spread"
    PACK = "pack"


@dataclass(frozen=True)
class NodePool:
    """The node pool and its autoscaler: everything of a run that is not a pipeline setting.
    The default node holds four workers' default requests."""

    node_cpu: float = 4.0
    node_memory_gib: float = 16.0
    node_max_pods: int = 110
    pod_cpu: float = 1.0
    pod_memory_gib: float = 1.0
    provisioning_seconds: tuple[float, float] = (45.0, 120.0)
    # Provisionings to replay (a run's measured ones): the n-th node launched is ready after
    # the n-th, nodes past its end draw from `provisioning_seconds`.
    provisioning_sequence: tuple[float, ...] = ()
    autoscaler: Autoscaler = Autoscaler.KARPENTER
    consolidation: Consolidation = Consolidation.WHEN_EMPTY_OR_UNDERUTILIZED
    consolidate_after_seconds: float = 30.0
    # Karpenter waits this long after a disruption decision before it validates it and acts
    # (commandValidationDelay in pkg/controllers/disruption, 15 s, not configurable).
    validation_seconds: float = 15.0
    # From the autoscaler's decision to remove an empty node to its instance being gone: the
    # taint, the drain, the instance's deletion and the node's and claim's finalizers.
    # Karpenter drains for at least 5 s, empty nodes too (MinDrainTime in
    # pkg/controllers/node/termination: the scheduler may not have seen the taint yet); its
    # kwok provider on the test bed took 5.3-6.6 s (medians of four runs,
    # docs/autoscaled-pool.md). A cloud's instance shutdown after that is not counted.
    termination_seconds: float = 5.0
    batch_idle_seconds: float = 1.0
    batch_max_seconds: float = 10.0
    ca_utilization_threshold: float = 0.5
    ca_unneeded_seconds: float = 600.0
    ca_delay_after_add_seconds: float = 600.0

    def __post_init__(self) -> None:
        checks = {
            "node_cpu": self.node_cpu > 0,
            "node_memory_gib": self.node_memory_gib > 0,
            "node_max_pods": self.node_max_pods >= 1,
            "pod_cpu": 0 <= self.pod_cpu <= self.node_cpu,
            "pod_memory_gib": 0 <= self.pod_memory_gib <= self.node_memory_gib,
            "provisioning_seconds": 0
            <= self.provisioning_seconds[0]
            <= self.provisioning_seconds[1],
            "provisioning_sequence": all(seconds >= 0 for seconds in self.provisioning_sequence),
            "consolidate_after_seconds": self.consolidate_after_seconds >= 0,
            "validation_seconds": self.validation_seconds >= 0,
            "termination_seconds": self.termination_seconds >= 0,
            "batch_idle_seconds": 0 <= self.batch_idle_seconds <= self.batch_max_seconds,
            "ca_utilization_threshold": 0 <= self.ca_utilization_threshold <= 1,
            "ca_unneeded_seconds": self.ca_unneeded_seconds >= 0,
            "ca_delay_after_add_seconds": self.ca_delay_after_add_seconds >= 0,
        }
        reject_invalid("node pool setting", self, checks)

    @property
    def empty_node_kept_seconds(self) -> float:
        """How long the autoscaler keeps an empty node billed after its last pod event."""
        if self.autoscaler is Autoscaler.KARPENTER:
            kept = self.consolidate_after_seconds + self.validation_seconds
        else:
            kept = self.ca_unneeded_seconds
        return kept + self.termination_seconds

    @property
    def empty_node_least_kept_seconds(self) -> float:
        """The least time a node stays billed after its last pod left, for the lower bounds:
        Karpenter may not have recorded that pod's exit (an event within
        POD_EVENT_DEDUPE_SECONDS of the last one recorded), so its consolidateAfter may have
        started that much earlier."""
        if self.autoscaler is Autoscaler.KARPENTER:
            return max(0.0, self.empty_node_kept_seconds - POD_EVENT_DEDUPE_SECONDS)
        return self.empty_node_kept_seconds

    @property
    def pods_per_node(self) -> int:
        """Worker pods one node holds."""
        fits = [self.node_max_pods]
        if self.pod_cpu > 0:
            fits.append(math.floor(self.node_cpu / self.pod_cpu + 1e-9))
        if self.pod_memory_gib > 0:
            fits.append(math.floor(self.node_memory_gib / self.pod_memory_gib + 1e-9))
        return min(fits)


@dataclass(frozen=True)
class Levers:
    """How a policy's worker pods behave on the pool.

    consumer_priority: the workers' `x-priority` (`jobtide_worker.priority`): `node`, the
    workers of the oldest node first (nodes boot in their launch order), round robin among a
    node's workers; `age`, the oldest worker first; `none`, round robin (the broker gives a
    message to the idle-longest worker). pack: a preferred pod affinity to the other
    workers. karpenter_do_not_disrupt: the pods carry `karpenter.sh/do-not-disrupt: "true"`;
    ca_safe_to_evict False: they carry
    `cluster-autoscaler.kubernetes.io/safe-to-evict: "false"`. Either keeps that autoscaler
    from evicting them. evicted_pod_retried: the Job's `backoffLimit` is above 0 (Kubernetes'
    default is 6, as in KEDA's ScaledJob examples), so the Job controller replaces an evicted
    worker pod with a new one, which starts up again; jobtide's Jobs have `backoffLimit: 0`.
    eviction_grace_seconds: how long an evicted busy worker may still work on its task (the
    worker's SIGTERM handling: it takes no new message and finishes its task within this
    grace, below the pod's `terminationGracePeriodSeconds`, then exits); the node is drained
    until then. 0: the worker dies at once and its task's work is lost.
    protect_busy_only: the pods carry their do-not-evict annotations only while their worker
    holds a message (the worker patches its own pod as it goes busy and idle), so an idle
    worker is evictable: evicted, it exits at once and nothing is lost.
    protection_delay_seconds: how long such a patch takes to land (an API call). A worker
    evicted in the window after it took a message, before its annotation landed, is a busy
    worker evicted: its task is cut off unless it finishes within `eviction_grace_seconds`.
    finished_pods_deleted: a finished worker's Job is deleted `ttlSecondsAfterFinished` after
    it finished, and its pod with it: a pod event on its node for Karpenter (jobtide's Jobs).
    KEDA's ScaledJob keeps its last 100 finished Jobs (`successfulJobsHistoryLimit`): their
    deletion is not modelled.
    (Leaving when the queue is silent is a pipeline setting, `quiet_check_seconds`, that
    jobtide's workers follow: `Scaler.quiet_check_seconds`.)"""

    consumer_priority: str = priority.NONE
    pack: bool = False
    karpenter_do_not_disrupt: bool = False
    ca_safe_to_evict: bool = True
    evicted_pod_retried: bool = True
    eviction_grace_seconds: float = 0.0
    protect_busy_only: bool = False
    protection_delay_seconds: float = 0.0
    finished_pods_deleted: bool = False

    def __post_init__(self) -> None:
        checks = {
            "consumer_priority": self.consumer_priority in priority.MODES,
            "eviction_grace_seconds": self.eviction_grace_seconds >= 0,
            "protection_delay_seconds": self.protection_delay_seconds >= 0,
        }
        reject_invalid("lever", self, checks)

    @property
    def scheduler(self) -> Scheduler:
        return Scheduler.PACK if self.pack else Scheduler.SPREAD

    def blocks_eviction(self, autoscaler: Autoscaler) -> bool:
        """Whether the pods carry that autoscaler's do-not-evict annotation (while busy only,
        with `protect_busy_only`)."""
        if autoscaler is Autoscaler.KARPENTER:
            return self.karpenter_do_not_disrupt
        return not self.ca_safe_to_evict


class Node:
    """One node: its bound pods (by number), how full it is, and its timers."""

    __slots__ = (
        "cordoned",
        "cpu_used",
        "decided_at",
        "emptied_at",
        "last_pod_event",
        "launched_at",
        "memory_used",
        "nominated",
        "number",
        "pods",
        "ready_at",
        "terminated_at",
        "unneeded_since",
    )

    def __init__(self, number: int, launched_at: float) -> None:
        self.number = number
        self.launched_at = launched_at
        self.ready_at: float | None = None
        self.decided_at: float | None = None  # the autoscaler decided to remove it
        self.terminated_at: float | None = None  # its instance is gone: billed until then
        self.emptied_at: float | None = None  # its last pod left (None while it has pods)
        self.pods: set[int] = set()
        self.cpu_used = 0.0
        self.memory_used = 0.0
        self.nominated = 0  # pending pods this launching node was started for
        self.last_pod_event: float | None = None  # as Karpenter recorded it
        self.unneeded_since: float | None = None
        self.cordoned = False  # being drained for removal: no pod is bound to it any more

    @property
    def ready(self) -> bool:
        return self.ready_at is not None and self.decided_at is None and not self.cordoned

    def pod_event(self, now: float) -> None:
        """A pod was bound to the node, finished or was deleted: Karpenter records the time,
        unless it recorded one less than POD_EVENT_DEDUPE_SECONDS ago."""
        last = self.last_pod_event
        if last is None or now - last >= POD_EVENT_DEDUPE_SECONDS:
            self.last_pod_event = now

    def consolidatable(self, pool: NodePool, now: float) -> bool:
        """Karpenter's Consolidatable condition: `consolidateAfter` has passed since the last
        pod event recorded (since the node became ready, without one)."""
        if not self.ready:
            return False
        since = self.ready_at if self.last_pod_event is None else self.last_pod_event
        assert since is not None
        return now - since >= pool.consolidate_after_seconds

    def fits(self, pool: NodePool, extra_pods: int = 1) -> bool:
        return (
            len(self.pods) + extra_pods <= pool.node_max_pods
            and self.cpu_used + extra_pods * pool.pod_cpu <= pool.node_cpu + 1e-9
            and self.memory_used + extra_pods * pool.pod_memory_gib <= pool.node_memory_gib + 1e-9
        )

    def allocated(self, pool: NodePool) -> float:
        """The larger of the CPU and memory fractions requested (the autoscalers' measure)."""
        return max(self.cpu_used / pool.node_cpu, self.memory_used / pool.node_memory_gib)

    def bind(self, pod: int, pool: NodePool, now: float) -> None:
        self.pods.add(pod)
        self.cpu_used += pool.pod_cpu
        self.memory_used += pool.pod_memory_gib
        self.emptied_at = None
        self.pod_event(now)

    def unbind(self, pod: int, pool: NodePool, now: float) -> None:
        """The pod finished or was deleted: it no longer counts on the node."""
        self.pods.discard(pod)
        self.cpu_used -= pool.pod_cpu
        self.memory_used -= pool.pod_memory_gib
        if not self.pods:
            self.emptied_at = now
        self.pod_event(now)

    def life(self) -> NodeLife:
        times = (self.ready_at, self.emptied_at, self.last_pod_event, self.decided_at)
        return NodeLife(self.launched_at, *times, gone=self.terminated_at)


@dataclass(frozen=True)
class NodeLife:
    """One node's timeline, in seconds of the run (None: did not happen before the end):
    launched, ready, its last pod left, the last pod event Karpenter recorded, the
    autoscaler's decision to remove it, its instance gone."""

    launched: float
    ready: float | None
    emptied: float | None
    last_pod_event: float | None
    decided: float | None
    gone: float | None


def choose_node(nodes: Iterable[Node], pool: NodePool, scheduler: Scheduler) -> Node | None:
    """The ready node a new pod is bound to, or None (pending)."""
    best: Node | None = None
    best_score: tuple[float, ...] = ()
    for node in nodes:
        if not node.ready or not node.fits(pool):
            continue
        free = (pool.node_cpu - node.cpu_used) / pool.node_cpu + (
            pool.node_memory_gib - node.memory_used
        ) / pool.node_memory_gib
        if scheduler is Scheduler.SPREAD:
            score: tuple[float, ...] = (free, -node.number)
        else:
            score = (len(node.pods), -free, -node.number)
        if best is None or score > best_score:
            best, best_score = node, score
    return best


_QUANTITY_SUFFIXES = {
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
}


def parse_quantity(value: Any, where: str) -> float:
    """A Kubernetes quantity (`500m`, `2`, `512Mi`, `1G`) as a number of base units."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a quantity, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    for suffix in sorted(_QUANTITY_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            number, scale = text[: -len(suffix)], _QUANTITY_SUFFIXES[suffix]
            break
    else:
        number, scale = text, 1.0
    try:
        quantity = float(number) * scale
    except ValueError:
        raise ValueError(
            f"{where}: expected a quantity such as 500m or 1Gi, got {value!r}"
        ) from None
    if quantity < 0:
        raise ValueError(f"{where}: must not be negative, got {value!r}")
    return quantity


def requests_from_resources(
    resources: Mapping[str, Any], where: str
) -> tuple[float | None, float | None]:
    """(CPUs, GiB) a container requests by its `resources` (its requests, or its limits when
    it has no requests, as Kubernetes defaults them); None for what neither sets."""
    found: dict[str, float] = {}
    for source in ("requests", "limits"):
        section = resources.get(source) or {}
        if not isinstance(section, Mapping):
            raise ValueError(f"{where}{source}: expected a mapping")
        for resource in ("cpu", "memory"):
            if resource in section and resource not in found:
                found[resource] = parse_quantity(section[resource], f"{where}{source}.{resource}")
    memory = found.get("memory")
    return found.get("cpu"), None if memory is None else memory / 2.0**30


def with_requests(pool: NodePool, cpu: float | None, memory_gib: float | None) -> NodePool:
    """The pool with a worker pod's requests changed where given."""
    return replace(
        pool,
        pod_cpu=pool.pod_cpu if cpu is None else cpu,
        pod_memory_gib=pool.pod_memory_gib if memory_gib is None else memory_gib,
    )
