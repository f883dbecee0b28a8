"""The event-driven core: one queue, one scaler, worker pods and, optionally, a node pool.

Time advances from event to event (a heap), never in fixed ticks, so a day of traffic takes
milliseconds. The model, stated once (docs/simulator.md has the long form):

- Tasks arrive on one FIFO queue. A worker takes one message at a time (prefetch 1), so
  `unacked` is the number of busy workers. An idle worker takes a message the moment it is
  there: the highest consumer priority first (`Levers.consumer_priority`: a worker of the
  oldest node, or the oldest worker), among equals the idle-longest, as RabbitMQ's round
  robin does.
- Without a node pool (`pool=None`) a pod created by the scaler is bound at once when the pool
  is warm. When it is cold (no node), the first pod starts node provisioning and every pod
  created until the node is ready waits for it; after `pool_cooldown` seconds without any pod
  the pool is cold again. Workloads without node provisioning are always warm.
- With a node pool (`jobtide_scaler.simulate.nodes`), pods are scheduled onto nodes, pending
  pods make the autoscaler launch nodes, and the autoscaler removes nodes; nodes are billed.
- A bound pod spends its start-up latency (image, interpreter, broker connection) and then
  works. Its container runs `CONNECT_SECONDS` before the end of its start-up (the interpreter
  and the broker connection): until then the pod is pending, for jobtide (its Job has no
  Ready pod) as for KEDA (no Running pod). Start-ups and node provisionings are drawn, or
  replayed in creation order from the sequences given (a measured run's).
- Worker models: `drain` works until it has been idle for the idle timeout (jobtide, the
  demo, KEDA's "-drain" variants); `one-message` takes one message and exits (KEDA's model;
  with no message it waits the idle timeout); `deployment` runs until the scaler deletes it,
  busy or not (the HPA); a deleted or evicted busy pod's message goes back to the head of the
  queue and its work so far is lost. An evicted deployment pod is replaced by its ReplicaSet,
  an evicted Job pod by its Job when the Job has retries left (`backoffLimit` above 0).
  A worker that reads the queue's counters while idle (`Scaler.quiet_check_seconds`:
  jobtide's, from the pipeline's `quiet_check_seconds`) also leaves at its first read that
  finds nothing published since its previous read and nothing ready (the worker's own
  decision, `jobtide_worker.quiet.queue_silent`; the publish counter as of the broker's last
  statistics refresh).
- The run lasts until every task is done, the workload's horizon has passed, the scaler is
  back at its minimum (no pod, or the HPA's one replica) and no node is left without a pod.

Cost: a pod's seconds run from its binding to a node until it exits (or the end of the
simulation), start-up included; time waiting for a node is not billed, as no node exists.
A node's seconds run from its launch to its termination (or the end of the simulation).
"""

from __future__ import annotations

import bisect
import enum
import heapq
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from jobtide_worker import priority
from jobtide_worker.pipeline_settings import STATISTICS_INTERVAL_SECONDS, PipelineSettings
from jobtide_worker.quiet import FIRST_READ_SECONDS, QueueCounters, queue_silent

from jobtide_scaler.settings import ScalerSettings
from jobtide_scaler.simulate.nodes import (
    AUTOSCALER_CHECK_SECONDS,
    Autoscaler,
    Consolidation,
    Levers,
    Node,
    NodeLife,
    NodePool,
    choose_node,
    reject_invalid,
)
from jobtide_scaler.simulate.workloads import Workload

__all__ = [
    "CONNECT_SECONDS",
    "STATISTICS_SECONDS",
    "ClusterView",
    "Metrics",
    "Scaler",
    "Settings",
    "SimulationResult",
    "WorkerModel",
    "percentile",
    "simulate",
]

# A run whose tasks are not all done this long after the workload's horizon is stopped: a
# scaler that never starts a worker must not hang the simulator.
_GIVE_UP_AFTER_SECONDS = 7 * 24 * 3600.0
# The end of a worker's start-up after its container runs: the interpreter and the broker
# connection. Kubernetes (and so KEDA and jobtide) see the pod as pending until then.
CONNECT_SECONDS = 2.0
# How often RabbitMQ refreshes the management API's statistics (`collect_statistics_interval`,
# 5,000 ms by default): a counter read there is as old as the last refresh.
STATISTICS_SECONDS = float(STATISTICS_INTERVAL_SECONDS)


@dataclass(frozen=True)
class Settings(ScalerSettings, PipelineSettings):
    """Everything a run depends on besides the workload: one pipeline's settings and the
    scaler's (their single definitions, so the same names, defaults and bounds as the chart's
    values) and the cluster's latencies."""

    startup_seconds: tuple[float, float] = (5.0, 15.0)
    # Start-ups to replay (a run's measured ones): the n-th worker created starts in the n-th,
    # workers past its end draw from `startup_seconds`. A replay keeps each worker's own
    # start-up, where a draw from the whole run's would give the first workers (the cold start)
    # those of the busiest moment.
    startup_sequence: tuple[float, ...] = ()
    pool_cooldown_seconds: float = 600.0
    keda_counts_unacked: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {
            "startup_seconds": 0 <= self.startup_seconds[0] <= self.startup_seconds[1],
            "startup_sequence": all(seconds >= 0 for seconds in self.startup_sequence),
            "pool_cooldown_seconds": self.pool_cooldown_seconds >= 0,
        }
        reject_invalid("simulator setting", self, checks)

    @property
    def mean_startup_seconds(self) -> float:
        return sum(self.startup_seconds) / 2


class WorkerModel(enum.Enum):
    DRAIN = "drain"
    ONE_MESSAGE = "one-message"
    DEPLOYMENT = "deployment"


@dataclass(frozen=True)
class ClusterView:
    """What a scaler sees at a decision: the queue's counts and the pods it owns."""

    ready: int
    unacked: int
    active: int
    pending: int


class Scaler(Protocol):
    """A scaling policy under simulation. `decide` returns pods to create (positive) or, for
    the `deployment` model only, pods to delete (negative)."""

    @property
    def interval_seconds(self) -> float: ...

    @property
    def worker(self) -> WorkerModel: ...

    @property
    def idle_timeout_seconds(self) -> float: ...

    @property
    def initial_pods(self) -> int: ...

    @property
    def levers(self) -> Levers: ...

    @property
    def quiet_check_seconds(self) -> float:
        """How often an idle worker reads the queue's counters to leave once it is silent;
        0: it does not."""
        ...

    def decide(self, now: float, view: ClusterView) -> int: ...


@dataclass(frozen=True)
class Metrics:
    pod_seconds: float
    idle_pod_seconds: float
    startup_pod_seconds: float
    wait_p50: float
    wait_p95: float
    wait_p99: float
    max_backlog: int
    busy_pods_killed: int
    jobs_created: int
    tasks_unfinished: int
    node_seconds: float = 0.0
    peak_nodes: int = 0
    nodes_launched: int = 0
    busy_pods_disrupted: int = 0

    def summary(self) -> dict[str, float | int]:
        """The figures of the JSON report, rounded for people."""
        return {
            "node_seconds": round(self.node_seconds, 1),
            "peak_nodes": self.peak_nodes,
            "nodes_launched": self.nodes_launched,
            "busy_pods_disrupted": self.busy_pods_disrupted,
            "pod_seconds": round(self.pod_seconds, 1),
            "idle_pod_seconds": round(self.idle_pod_seconds, 1),
            "wait_p50": round(self.wait_p50, 2),
            "wait_p95": round(self.wait_p95, 2),
            "wait_p99": round(self.wait_p99, 2),
            "max_backlog": self.max_backlog,
            "busy_pods_killed": self.busy_pods_killed,
            "jobs_created": self.jobs_created,
        }


@dataclass(frozen=True)
class SimulationResult:
    metrics: Metrics
    # (time, ready messages, active pods, nodes) at every decision of the scaler, for plots.
    timeline: tuple[tuple[float, int, int, int], ...]
    waits: tuple[float, ...] = field(repr=False)
    nodes: tuple[NodeLife, ...] = field(default=(), repr=False)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (the smallest value with at least `fraction` of the values
    at or below it); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


class _Event(enum.IntEnum):
    # The value orders events at the same instant: work finishes before new work arrives,
    # nodes change before the scaler looks, and the scaler decides last, on the state of
    # that instant.
    TASK_DONE = 0
    NODE_READY = 1
    POD_READY = 2
    ARRIVAL = 3
    IDLE_TIMEOUT = 4
    POOL_COLD = 5
    LAUNCH_BATCH = 6
    AUTOSCALER_CHECK = 7
    DECISION_VALIDATED = 8
    GRACE_OVER = 9
    PROTECTION_PATCHED = 10
    FINISHED_POD_DELETED = 11
    QUIET_CHECK = 12
    DECIDE = 13


class _Pod:
    __slots__ = (
        "annotated",
        "annotation_wanted",
        "bound_at",
        "busy_seconds",
        "exited_at",
        "idle_token",
        "node",
        "number",
        "ready",
        "running_at",
        "startup_seconds",
        "stopping",
        "task",
        "task_started_at",
    )

    def __init__(self, number: int) -> None:
        self.number = number
        self.bound_at: float | None = None
        self.running_at = math.inf
        self.ready = False
        self.exited_at: float | None = None
        self.task: int | None = None
        self.task_started_at = 0.0
        self.busy_seconds = 0.0
        self.startup_seconds = 0.0
        self.idle_token = 0
        self.node: Node | None = None
        self.stopping = False  # evicted, finishing its task within its grace
        # Protecting busy workers only: whether the pod carries its do-not-evict annotations
        # now, and what the worker's last patch asked for (it lands later).
        self.annotated = False
        self.annotation_wanted = False


def _boot_order(pod: _Pod) -> int:
    """A pod's node in boot order (nodes boot in their launch order); without a node pool
    every pod shares one node."""
    return pod.node.number if pod.node is not None else 0


class _Run:
    def __init__(
        self,
        workload: Workload,
        settings: Settings,
        scaler: Scaler,
        seed: int,
        pool: NodePool | None,
    ) -> None:
        self.tasks = workload.tasks
        self.workload = workload
        self.settings = settings
        self.scaler = scaler
        self.levers = scaler.levers
        self.pool = pool
        self.rng = random.Random(seed)
        self.now = 0.0
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.sequence = 0
        self.pods: list[_Pod] = []
        self.live: dict[int, _Pod] = {}
        self.idle: dict[int, _Pod] = {}  # insertion order: idle longest first
        self.queue: deque[int] = deque()
        self.waits: list[float | None] = [None] * len(self.tasks)
        self.done = 0
        self.arrival_times = [task.arrival for task in self.tasks]  # in order (workloads sort)
        # Per idle pod: the queue's counters at its previous read of this idle spell.
        self.counters_seen: dict[int, QueueCounters] = {}
        self.max_backlog = 0
        self.busy_killed = 0
        self.busy_disrupted = 0
        self.pool_warm = workload.node_provisioning_seconds is None
        self.provisioning = False
        self.waiting_for_node: list[_Pod] = []
        self.pool_token = 0
        self.timeline: list[tuple[float, int, int, int]] = []
        # The node pool (unused without one).
        self.nodes: list[Node] = []
        self.alive: dict[int, Node] = {}  # launched and not terminated, oldest first
        self.pending: list[_Pod] = []  # created, fitting no ready node, oldest first
        self.batch_opened_at: float | None = None
        self.last_pending_at = 0.0
        self.last_scale_up = -math.inf
        self.peak_nodes = 0
        # Karpenter's disruption decision waiting for its validation: its nodes, and whether
        # they were taken as empty (else as underutilized).
        self.deciding: tuple[list[Node], bool] | None = None

    # -- event plumbing -------------------------------------------------------------------
    def schedule(self, at: float, event: _Event, subject: int, token: int = 0) -> None:
        self.sequence += 1
        heapq.heappush(self.heap, (at, int(event), self.sequence, subject, token))

    def latency(self, replayed: Sequence[float], number: int, bounds: tuple[float, float]) -> float:
        """The `number`-th (pod or node, in creation order) replayed latency; past the
        sequence's end, one drawn uniformly between `bounds`."""
        return replayed[number] if number < len(replayed) else self.rng.uniform(*bounds)

    # -- pods -------------------------------------------------------------------------------
    def create_pod(self) -> None:
        pod = _Pod(len(self.pods))
        self.pods.append(pod)
        self.live[pod.number] = pod
        if self.pool is not None:
            self.place(pod)
            return
        if self.pool_warm:
            self.bind(pod)
            return
        self.waiting_for_node.append(pod)
        if not self.provisioning:
            self.provisioning = True
            low, high = self.workload.node_provisioning_seconds or (0.0, 0.0)
            self.schedule(self.now + self.rng.uniform(low, high), _Event.NODE_READY, -1)

    def bind(self, pod: _Pod) -> None:
        pod.bound_at = self.now
        pod.startup_seconds = self.latency(
            self.settings.startup_sequence, pod.number, self.settings.startup_seconds
        )
        pod.running_at = self.now + max(0.0, pod.startup_seconds - CONNECT_SECONDS)
        self.schedule(self.now + pod.startup_seconds, _Event.POD_READY, pod.number)

    def exit(self, pod: _Pod, deleted: bool = False) -> None:
        """The pod's container has exited (`deleted`: the pod was deleted, so no Job's TTL
        deletes it later)."""
        pod.exited_at = self.now
        del self.live[pod.number]
        self.idle.pop(pod.number, None)
        if pod in self.waiting_for_node:
            self.waiting_for_node.remove(pod)
        if self.pool is not None:
            if (
                pod.node is not None
                and not deleted
                and self.levers.finished_pods_deleted
                and self.scaler.worker is not WorkerModel.DEPLOYMENT
            ):
                self.schedule(
                    self.now + self.settings.ttl_seconds_after_finished,
                    _Event.FINISHED_POD_DELETED,
                    pod.node.number,
                )
            self.leave_node(pod)
        elif not self.live and self.workload.node_provisioning_seconds is not None:
            self.pool_token += 1
            self.schedule(
                self.now + self.settings.pool_cooldown_seconds, _Event.POOL_COLD, self.pool_token
            )

    def stop(self, pod: _Pod) -> bool:
        """Stops a pod from outside (deleted or evicted); a busy pod's message goes back to
        the head of the queue and its work is lost. Returns whether it was busy."""
        busy = pod.task is not None
        if pod.task is not None:
            pod.busy_seconds += self.now - pod.task_started_at
            self.queue.appendleft(pod.task)
            pod.task = None
        self.exit(pod, deleted=True)
        return busy

    def delete(self, count: int) -> None:
        """A ReplicaSet scaling down: pods not yet working go first, then the newest; whether
        a pod is busy is invisible to it."""
        victims = sorted(self.live.values(), key=lambda pod: (pod.ready, -pod.number))
        for pod in victims[:count]:
            self.busy_killed += self.stop(pod)
        self.dispatch()

    def start_task(self, pod: _Pod, task: int) -> None:
        pod.task = task
        pod.task_started_at = self.now
        self.schedule(self.now + self.tasks[task].duration, _Event.TASK_DONE, pod.number)
        self.ask_protection(pod, True)

    def ask_protection(self, pod: _Pod, wanted: bool) -> None:
        """Protecting busy workers only: the worker patches its pod's annotations as it goes
        busy or idle (not between two messages taken back to back); each patch lands
        `protection_delay_seconds` later, in order."""
        if not self.levers.protect_busy_only or pod.annotation_wanted is wanted:
            return
        pod.annotation_wanted = wanted
        delay = self.levers.protection_delay_seconds
        if delay == 0:
            pod.annotated = wanted
        else:
            self.schedule(self.now + delay, _Event.PROTECTION_PATCHED, pod.number, int(wanted))

    def look_for_work(self, pod: _Pod) -> None:
        self.idle[pod.number] = pod
        self.dispatch()
        if pod.task is not None:
            return
        pod.idle_token += 1
        if self.scaler.worker is not WorkerModel.DEPLOYMENT:
            self.schedule(
                self.now + self.scaler.idle_timeout_seconds,
                _Event.IDLE_TIMEOUT,
                pod.number,
                pod.idle_token,
            )
            if self.scaler.quiet_check_seconds > 0:
                self.counters_seen.pop(pod.number, None)
                self.schedule(
                    self.now + FIRST_READ_SECONDS, _Event.QUIET_CHECK, pod.number, pod.idle_token
                )

    def published(self) -> int:
        """The queue's `publish` counter as the management API shows it now: as of the
        broker's last statistics refresh."""
        refreshed = math.floor(self.now / STATISTICS_SECONDS) * STATISTICS_SECONDS
        return bisect.bisect_right(self.arrival_times, refreshed)

    def on_quiet_check(self, pod: _Pod, token: int) -> None:
        """An idle worker reads the queue's counters: nothing published since its previous
        read and nothing ready, it leaves; else it reads again later (its idle timeout still
        ends its wait)."""
        if pod.exited_at is not None or pod.number not in self.idle or pod.idle_token != token:
            return
        current = QueueCounters(published=self.published(), ready=len(self.queue))
        if queue_silent(self.counters_seen.get(pod.number), current):
            self.exit(pod)
            return
        self.counters_seen[pod.number] = current
        self.schedule(
            self.now + self.scaler.quiet_check_seconds, _Event.QUIET_CHECK, pod.number, token
        )

    def dispatch(self) -> None:
        """The broker delivers waiting messages to idle consumers, the highest `x-priority`
        first, the idle-longest among equals (round robin)."""
        while self.queue and self.idle:
            pod = self.idle.pop(self.next_consumer())
            self.start_task(pod, self.queue.popleft())

    def next_consumer(self) -> int:
        """The idle worker the broker gives the next message (`Levers.consumer_priority`)."""
        mode = self.levers.consumer_priority
        if mode == priority.AGE:
            return min(self.idle)  # pods are numbered as they are created
        if mode == priority.NODE:
            # min() keeps the first of equals: the idle-longest of the oldest node's workers.
            return min(self.idle, key=lambda number: _boot_order(self.idle[number]))
        return next(iter(self.idle))

    # -- the node pool ----------------------------------------------------------------------
    def place(self, pod: _Pod) -> None:
        assert self.pool is not None
        node = choose_node(self.alive.values(), self.pool, self.levers.scheduler)
        if node is None:
            self.pending.append(pod)
            self.on_pending()
            return
        node.bind(pod.number, self.pool, self.now)
        pod.node = node
        self.bind(pod)

    def on_pending(self) -> None:
        """A pod became pending: Karpenter opens (or extends) a launch batch; the cluster
        autoscaler sees it at its next scan."""
        assert self.pool is not None
        if self.pool.autoscaler is not Autoscaler.KARPENTER:
            return
        self.last_pending_at = self.now
        if self.batch_opened_at is None:
            self.batch_opened_at = self.now
            self.schedule(self.now + self.pool.batch_max_seconds, _Event.LAUNCH_BATCH, 0)
        self.schedule(self.now + self.pool.batch_idle_seconds, _Event.LAUNCH_BATCH, 0)

    def on_launch_batch(self) -> None:
        assert self.pool is not None
        if self.batch_opened_at is None:
            return
        closes = min(
            self.last_pending_at + self.pool.batch_idle_seconds,
            self.batch_opened_at + self.pool.batch_max_seconds,
        )
        if self.now >= closes:
            self.batch_opened_at = None
            self.launch_for_pending()

    def launch_for_pending(self) -> None:
        """Launches the nodes the pending pods fill, beyond the room of nodes on their way."""
        assert self.pool is not None
        per_node = self.pool.pods_per_node
        on_the_way = sum(1 for node in self.alive.values() if node.ready_at is None)
        missing = len(self.pending) - on_the_way * per_node
        if missing <= 0:
            return
        for _ in range(math.ceil(missing / per_node)):
            node = Node(len(self.nodes), self.now)
            self.nodes.append(node)
            self.alive[node.number] = node
            provisioning = self.latency(
                self.pool.provisioning_sequence, node.number, self.pool.provisioning_seconds
            )
            self.schedule(self.now + provisioning, _Event.NODE_READY, node.number)
        self.last_scale_up = self.now
        self.peak_nodes = max(self.peak_nodes, len(self.alive))

    def bind_pending(self) -> None:
        """kube-scheduler retries pending pods, oldest first, when room appears."""
        assert self.pool is not None
        while self.pending:
            node = choose_node(self.alive.values(), self.pool, self.levers.scheduler)
            if node is None:
                return  # all worker pods request the same: if the first fits nowhere, none does
            pod = self.pending.pop(0)
            node.bind(pod.number, self.pool, self.now)
            pod.node = node
            self.bind(pod)

    def leave_node(self, pod: _Pod) -> None:
        assert self.pool is not None
        if pod.node is None:
            self.pending.remove(pod)
            return
        node = pod.node
        node.unbind(pod.number, self.pool, self.now)
        if node.cordoned and not node.pods:
            self.remove(node)
        self.bind_pending()

    def on_node_ready(self, number: int) -> None:
        if self.pool is None:
            self.pool_warm = True
            self.provisioning = False
            waiting, self.waiting_for_node = self.waiting_for_node, []
            for pod in waiting:
                self.bind(pod)
            return
        node = self.nodes[number]
        node.ready_at = self.now
        self.bind_pending()

    def on_finished_pod_deleted(self, number: int) -> None:
        """A finished worker's Job was deleted by its TTL, and its pod with it: a pod event on
        the node it ran on, if that node is still there and not being removed."""
        node = self.nodes[number]
        if node.decided_at is None:
            node.pod_event(self.now)

    def room_elsewhere(self, node: Node) -> int:
        assert self.pool is not None
        per_node = self.pool.pods_per_node
        return sum(
            per_node - len(other.pods)
            for other in self.alive.values()
            if other is not node and other.ready
        )

    def protected(self, pod: _Pod) -> bool:
        """The pod carries the autoscaler's do-not-evict annotation now."""
        assert self.pool is not None
        if not self.levers.blocks_eviction(self.pool.autoscaler):
            return False
        return pod.annotated or not self.levers.protect_busy_only

    def removable(self, node: Node) -> bool:
        """No pod of the node is protected, and they fit on the other ready nodes."""
        blocked = any(self.protected(self.pods[number]) for number in node.pods)
        return not blocked and self.room_elsewhere(node) >= len(node.pods)

    def remove(self, node: Node) -> None:
        """The node has no pod left: its termination begins, billed until it is over."""
        assert self.pool is not None
        node.terminated_at = self.now + self.pool.termination_seconds
        del self.alive[node.number]

    def terminate(self, node: Node) -> None:
        """The autoscaler removes the node, evicting its pods. Cordoned first: no evicted
        pod's replacement may land on it. A busy worker with a grace finishes its task first,
        and the node stays until its last pod has left."""
        node.cordoned = True
        node.decided_at = self.now
        grace = self.levers.eviction_grace_seconds
        for number in sorted(node.pods):
            pod = self.pods[number]
            if pod.task is not None and grace > 0:
                pod.stopping = True
                self.schedule(self.now + grace, _Event.GRACE_OVER, pod.number)
                continue
            self.busy_disrupted += self.stop(pod)
            # The ReplicaSet replaces an evicted pod; so does a Job with retries left.
            if self.scaler.worker is WorkerModel.DEPLOYMENT or self.levers.evicted_pod_retried:
                self.create_pod()
        if not node.pods and node.terminated_at is None:
            self.remove(node)  # (a node emptied by the evictions is already removed)
        self.dispatch()

    def on_grace_over(self, pod: _Pod) -> None:
        """The pod's grace after its eviction is over: a task still running is cut off."""
        if pod.exited_at is None:
            self.busy_disrupted += self.stop(pod)
            self.dispatch()

    def on_autoscaler_check(self) -> None:
        assert self.pool is not None
        if self.pool.autoscaler is Autoscaler.KARPENTER:
            if self.karpenter_disruption():
                return  # the loop waits for the decision's validation
        else:
            self.cluster_autoscaler_scan()
        self.schedule(self.now + AUTOSCALER_CHECK_SECONDS, _Event.AUTOSCALER_CHECK, 0)

    def karpenter_disruption(self, skip_empty: bool = False) -> bool:
        """One pass of Karpenter's disruption loop: a decision on every consolidatable empty
        node (unless `skip_empty`), else (WhenEmptyOrUnderutilized) on one consolidatable node
        whose pods fit elsewhere. Returns whether it took one; its validation follows."""
        assert self.pool is not None
        settled = [node for node in self.alive.values() if node.consolidatable(self.pool, self.now)]
        empty = [node for node in settled if not node.pods]
        if empty and not skip_empty:
            return self.decide_disruption(empty, True)
        if self.pool.consolidation is not Consolidation.WHEN_EMPTY_OR_UNDERUTILIZED:
            return False
        if self.pending:
            return False  # pods still wait for room: no node is underutilized
        candidates = sorted(
            (node for node in settled if node.pods),
            key=lambda node: (len(node.pods), node.number),
        )
        for node in candidates:
            if self.removable(node):
                return self.decide_disruption([node], False)  # one node per decision
        return False

    def decide_disruption(self, nodes: list[Node], empty: bool) -> bool:
        assert self.pool is not None
        self.deciding = (nodes, empty)
        self.schedule(self.now + self.pool.validation_seconds, _Event.DECISION_VALIDATED, 0)
        return True

    def on_decision_validated(self) -> None:
        """Karpenter validates its decision: the nodes still consolidatable and still empty (or
        still removable) are removed, and the loop runs again at once. When none is, an
        emptiness decision is dropped and the loop goes on to the underutilized nodes; an
        underutilized decision is dropped until the next run of the loop."""
        assert self.deciding is not None
        assert self.pool is not None
        nodes, empty = self.deciding
        self.deciding = None
        valid = [
            node
            for node in nodes
            if node.number in self.alive
            and node.consolidatable(self.pool, self.now)
            and (not node.pods if empty else self.removable(node))
        ]
        for node in valid:
            self.terminate(node)
        if valid:
            started = self.karpenter_disruption()
        elif empty:
            started = self.karpenter_disruption(skip_empty=True)
        else:
            started = False
        if not started:
            self.schedule(self.now + AUTOSCALER_CHECK_SECONDS, _Event.AUTOSCALER_CHECK, 0)

    def cluster_autoscaler_scan(self) -> None:
        assert self.pool is not None
        if self.pending:
            self.launch_for_pending()
        for node in list(self.alive.values()):
            if not node.ready:
                continue
            unneeded = node.allocated(
                self.pool
            ) < self.pool.ca_utilization_threshold and self.removable(node)
            if not unneeded:
                node.unneeded_since = None
            elif node.unneeded_since is None:
                node.unneeded_since = self.now
        if self.now - self.last_scale_up < self.pool.ca_delay_after_add_seconds:
            return
        removed_busy_node = False
        for node in list(self.alive.values()):
            since = node.unneeded_since
            if node.cordoned or since is None or self.now - since < self.pool.ca_unneeded_seconds:
                continue
            if node.pods:
                # Non-empty nodes go one at a time; re-check, an earlier removal took room.
                if removed_busy_node or not self.removable(node):
                    continue
                removed_busy_node = True
            self.terminate(node)

    # -- events -----------------------------------------------------------------------------
    def on_arrival(self, task: int) -> None:
        self.queue.append(task)
        self.dispatch()
        self.max_backlog = max(self.max_backlog, len(self.queue))

    def on_task_done(self, pod: _Pod) -> None:
        if pod.exited_at is not None or pod.task is None:
            return  # deleted while busy; its message went back to the queue
        task = pod.task
        pod.busy_seconds += self.now - pod.task_started_at
        self.waits[task] = pod.task_started_at - self.tasks[task].arrival
        self.done += 1
        pod.task = None
        if pod.stopping:
            self.exit(pod)
            if self.levers.evicted_pod_retried:
                self.create_pod()  # its Job, with retries left, starts a new pod
        elif self.scaler.worker is WorkerModel.ONE_MESSAGE:
            self.exit(pod)
        else:
            self.look_for_work(pod)
        if pod.exited_at is None and pod.task is None:
            self.ask_protection(pod, False)

    def on_protection_patched(self, pod: _Pod, wanted: int) -> None:
        if pod.exited_at is None:
            pod.annotated = bool(wanted)

    def on_pod_ready(self, pod: _Pod) -> None:
        if pod.exited_at is None:
            pod.ready = True
            self.look_for_work(pod)

    def on_idle_timeout(self, pod: _Pod, token: int) -> None:
        if pod.exited_at is None and pod.number in self.idle and pod.idle_token == token:
            self.exit(pod)

    def on_pool_cold(self, token: int) -> None:
        if not self.live and token == self.pool_token:
            self.pool_warm = False

    def view(self) -> ClusterView:
        busy = sum(1 for pod in self.live.values() if pod.task is not None)
        pending = sum(1 for pod in self.live.values() if self.now < pod.running_at)
        return ClusterView(
            ready=len(self.queue), unacked=busy, active=len(self.live), pending=pending
        )

    def at_rest(self) -> bool:
        """The scaler is back at its minimum and no node is left without a pod."""
        if self.scaler.worker is WorkerModel.DEPLOYMENT:
            if len(self.live) > self.scaler.initial_pods:
                return False
        elif self.live:
            return False
        return not self.pending and all(node.pods for node in self.alive.values())

    def finished(self) -> bool:
        if self.done < len(self.tasks) or self.now < self.workload.horizon_seconds:
            return False
        return self.at_rest()

    def on_decide(self) -> bool:
        """Returns False when the run is over."""
        view = self.view()
        self.timeline.append((self.now, view.ready, view.active, len(self.alive)))
        if self.finished() or self.now > self.workload.horizon_seconds + _GIVE_UP_AFTER_SECONDS:
            return False
        change = self.scaler.decide(self.now, view)
        if change > 0:
            for _ in range(change):
                self.create_pod()
        elif change < 0:
            if self.scaler.worker is not WorkerModel.DEPLOYMENT:
                raise RuntimeError("only a deployment scaler may delete pods")
            self.delete(-change)
        self.schedule(self.now + self.scaler.interval_seconds, _Event.DECIDE, 0)
        return True

    # -- the run ------------------------------------------------------------------------------
    def elapse(self, until: float) -> None:
        """Time passes from `now` to `until` without any change of state: nothing to do here;
        a subclass that accounts for the run's state over time (`simulate.breakdown`) does."""

    def run(self) -> SimulationResult:
        for number, task in enumerate(self.tasks):
            self.schedule(task.arrival, _Event.ARRIVAL, number)
        for _ in range(self.scaler.initial_pods):
            self.create_pod()
        self.schedule(0.0, _Event.DECIDE, 0)
        if self.pool is not None:
            self.schedule(0.0, _Event.AUTOSCALER_CHECK, 0)
        end = 0.0
        while self.heap:
            at, kind, _, subject, token = heapq.heappop(self.heap)
            self.elapse(at)
            self.now = at
            event = _Event(kind)
            if event is _Event.DECIDE:
                if not self.on_decide():
                    end = at
                    break
            elif event is _Event.ARRIVAL:
                self.on_arrival(subject)
            elif event is _Event.TASK_DONE:
                self.on_task_done(self.pods[subject])
            elif event is _Event.POD_READY:
                self.on_pod_ready(self.pods[subject])
            elif event is _Event.IDLE_TIMEOUT:
                self.on_idle_timeout(self.pods[subject], token)
            elif event is _Event.NODE_READY:
                self.on_node_ready(subject)
            elif event is _Event.LAUNCH_BATCH:
                self.on_launch_batch()
            elif event is _Event.AUTOSCALER_CHECK:
                self.on_autoscaler_check()
            elif event is _Event.DECISION_VALIDATED:
                self.on_decision_validated()
            elif event is _Event.FINISHED_POD_DELETED:
                self.on_finished_pod_deleted(subject)
            elif event is _Event.GRACE_OVER:
                self.on_grace_over(self.pods[subject])
            elif event is _Event.QUIET_CHECK:
                self.on_quiet_check(self.pods[subject], token)
            elif event is _Event.PROTECTION_PATCHED:
                self.on_protection_patched(self.pods[subject], token)
            else:
                self.on_pool_cold(subject)
        return self.result(end)

    def result(self, end: float) -> SimulationResult:
        pod_seconds = idle = startup = 0.0
        for pod in self.pods:
            if pod.bound_at is None:
                continue
            stop = pod.exited_at if pod.exited_at is not None else end
            if pod.task is not None and pod.exited_at is None:
                pod.busy_seconds += stop - pod.task_started_at
            lifetime = stop - pod.bound_at
            started = min(pod.startup_seconds, lifetime)
            pod_seconds += lifetime
            startup += started
            idle += max(0.0, lifetime - started - pod.busy_seconds)
        node_seconds = sum(
            (end if node.terminated_at is None else node.terminated_at) - node.launched_at
            for node in self.nodes
        )
        waits = tuple(wait for wait in self.waits if wait is not None)
        metrics = Metrics(
            pod_seconds=pod_seconds,
            idle_pod_seconds=idle,
            startup_pod_seconds=startup,
            wait_p50=percentile(waits, 0.50),
            wait_p95=percentile(waits, 0.95),
            wait_p99=percentile(waits, 0.99),
            max_backlog=self.max_backlog,
            busy_pods_killed=self.busy_killed,
            jobs_created=len(self.pods),
            tasks_unfinished=len(self.tasks) - self.done,
            node_seconds=node_seconds,
            peak_nodes=self.peak_nodes,
            nodes_launched=len(self.nodes),
            busy_pods_disrupted=self.busy_disrupted,
        )
        return SimulationResult(
            metrics=metrics,
            timeline=tuple(self.timeline),
            waits=waits,
            nodes=tuple(node.life() for node in self.nodes),
        )


def simulate(
    workload: Workload,
    settings: Settings,
    scaler: Scaler,
    seed: int = 0,
    pool: NodePool | None = None,
) -> SimulationResult:
    """Run one scaler on one workload, on a node pool if one is given. The same arguments
    give the same result."""
    return _Run(workload, settings, scaler, seed, pool).run()
