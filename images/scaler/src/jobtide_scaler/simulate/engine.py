"""The event-driven core: one queue, one scaler, worker pods and a node pool.

Time advances from event to event (a heap), never in fixed ticks, so a day of traffic takes
milliseconds. The model, stated once (docs/simulator.md has the long form):

- Tasks arrive on one FIFO queue. A worker takes one message at a time (prefetch 1), so
  `unacked` is the number of busy workers. An idle worker takes a message the moment it is
  there; the worker idle longest is served first, as RabbitMQ's round robin does.
- A pod created by the scaler is bound to a node at once when the pool is warm. When the pool
  is cold (no node), the first pod starts node provisioning and every pod created until the
  node is ready waits for it. After `pool_cooldown` seconds without any pod, the pool is cold
  again. Workloads without node provisioning have a pool that is always warm.
- A bound pod spends its start-up latency (image, interpreter, broker connection) and then
  works. Pending = created and not yet working (waiting for a node or starting up).
- Worker models: `drain` works until it has been idle for the idle timeout (jobtide, the
  demo, KEDA's "-drain" variants); `one-message` takes one message and exits (KEDA's model;
  with no message it waits the idle timeout); `deployment` runs until the scaler deletes it,
  busy or not (the HPA); a deleted busy pod's message goes back to the head of the queue and
  its work so far is lost.

Cost: a pod's seconds run from its binding to a node until it exits (or the end of the
simulation), start-up included; time waiting for a node is not billed, as no node exists.
"""

from __future__ import annotations

import enum
import heapq
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from jobtide_worker.pipeline_settings import PipelineSettings

from jobtide_scaler.settings import ScalerSettings
from jobtide_scaler.simulate.workloads import Workload

__all__ = [
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


@dataclass(frozen=True)
class Settings(ScalerSettings, PipelineSettings):
    """Everything a run depends on besides the workload: one pipeline's settings and the
    scaler's (their single definitions, so the same names, defaults and bounds as the chart's
    values) and the cluster's latencies."""

    startup_seconds: tuple[float, float] = (5.0, 15.0)
    pool_cooldown_seconds: float = 600.0
    keda_counts_unacked: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {
            "startup_seconds": 0 <= self.startup_seconds[0] <= self.startup_seconds[1],
            "pool_cooldown_seconds": self.pool_cooldown_seconds >= 0,
        }
        for name, valid in checks.items():
            if not valid:
                raise ValueError(f"invalid simulator setting {name}: {getattr(self, name)!r}")

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

    def summary(self) -> dict[str, float | int]:
        """The figures of the JSON report, rounded for people."""
        return {
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
    # (time, ready messages, active pods) at every decision of the scaler, for plots.
    timeline: tuple[tuple[float, int, int], ...]
    waits: tuple[float, ...] = field(repr=False)


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
    # and the scaler decides last, on the state of that instant.
    TASK_DONE = 0
    NODE_READY = 1
    POD_READY = 2
    ARRIVAL = 3
    IDLE_TIMEOUT = 4
    POOL_COLD = 5
    DECIDE = 6


class _Pod:
    __slots__ = (
        "bound_at",
        "busy_seconds",
        "exited_at",
        "idle_token",
        "number",
        "ready",
        "startup_seconds",
        "task",
        "task_started_at",
    )

    def __init__(self, number: int) -> None:
        self.number = number
        self.bound_at: float | None = None
        self.ready = False
        self.exited_at: float | None = None
        self.task: int | None = None
        self.task_started_at = 0.0
        self.busy_seconds = 0.0
        self.startup_seconds = 0.0
        self.idle_token = 0


class _Run:
    def __init__(self, workload: Workload, settings: Settings, scaler: Scaler, seed: int) -> None:
        self.tasks = workload.tasks
        self.workload = workload
        self.settings = settings
        self.scaler = scaler
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
        self.max_backlog = 0
        self.busy_killed = 0
        self.pool_warm = workload.node_provisioning_seconds is None
        self.provisioning = False
        self.waiting_for_node: list[_Pod] = []
        self.pool_token = 0
        self.timeline: list[tuple[float, int, int]] = []

    # -- event plumbing -------------------------------------------------------------------
    def schedule(self, at: float, event: _Event, subject: int, token: int = 0) -> None:
        self.sequence += 1
        heapq.heappush(self.heap, (at, int(event), self.sequence, subject, token))

    # -- pods -------------------------------------------------------------------------------
    def create_pod(self) -> None:
        pod = _Pod(len(self.pods))
        self.pods.append(pod)
        self.live[pod.number] = pod
        if self.pool_warm:
            self.bind(pod)
            return
        self.waiting_for_node.append(pod)
        if not self.provisioning:
            self.provisioning = True
            low, high = self.workload.node_provisioning_seconds or (0.0, 0.0)
            self.schedule(self.now + self.rng.uniform(low, high), _Event.NODE_READY, 0)

    def bind(self, pod: _Pod) -> None:
        pod.bound_at = self.now
        pod.startup_seconds = self.rng.uniform(*self.settings.startup_seconds)
        self.schedule(self.now + pod.startup_seconds, _Event.POD_READY, pod.number)

    def exit(self, pod: _Pod) -> None:
        pod.exited_at = self.now
        del self.live[pod.number]
        self.idle.pop(pod.number, None)
        if pod in self.waiting_for_node:
            self.waiting_for_node.remove(pod)
        if not self.live and self.workload.node_provisioning_seconds is not None:
            self.pool_token += 1
            self.schedule(
                self.now + self.settings.pool_cooldown_seconds, _Event.POOL_COLD, self.pool_token
            )

    def delete(self, count: int) -> None:
        """A ReplicaSet scaling down: pods not yet working go first, then the newest; whether
        a pod is busy is invisible to it."""
        victims = sorted(self.live.values(), key=lambda pod: (pod.ready, -pod.number))
        for pod in victims[:count]:
            if pod.task is not None:
                self.busy_killed += 1
                pod.busy_seconds += self.now - pod.task_started_at
                self.queue.appendleft(pod.task)
                pod.task = None
            self.exit(pod)
        self.dispatch()

    def start_task(self, pod: _Pod, task: int) -> None:
        pod.task = task
        pod.task_started_at = self.now
        self.schedule(self.now + self.tasks[task].duration, _Event.TASK_DONE, pod.number)

    def look_for_work(self, pod: _Pod) -> None:
        if self.queue:
            self.start_task(pod, self.queue.popleft())
            return
        self.idle[pod.number] = pod
        pod.idle_token += 1
        if self.scaler.worker is not WorkerModel.DEPLOYMENT:
            self.schedule(
                self.now + self.scaler.idle_timeout_seconds,
                _Event.IDLE_TIMEOUT,
                pod.number,
                pod.idle_token,
            )

    def dispatch(self) -> None:
        while self.queue and self.idle:
            pod = self.idle.pop(next(iter(self.idle)))
            self.start_task(pod, self.queue.popleft())

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
        if self.scaler.worker is WorkerModel.ONE_MESSAGE:
            self.exit(pod)
        else:
            self.look_for_work(pod)

    def on_pod_ready(self, pod: _Pod) -> None:
        if pod.exited_at is None:
            pod.ready = True
            self.look_for_work(pod)

    def on_idle_timeout(self, pod: _Pod, token: int) -> None:
        if pod.exited_at is None and pod.number in self.idle and pod.idle_token == token:
            self.exit(pod)

    def on_node_ready(self) -> None:
        self.pool_warm = True
        self.provisioning = False
        waiting, self.waiting_for_node = self.waiting_for_node, []
        for pod in waiting:
            self.bind(pod)

    def on_pool_cold(self, token: int) -> None:
        if not self.live and token == self.pool_token:
            self.pool_warm = False

    def view(self) -> ClusterView:
        busy = sum(1 for pod in self.live.values() if pod.task is not None)
        pending = sum(1 for pod in self.live.values() if not pod.ready)
        return ClusterView(
            ready=len(self.queue), unacked=busy, active=len(self.live), pending=pending
        )

    def finished(self) -> bool:
        if self.done < len(self.tasks) or self.now < self.workload.horizon_seconds:
            return False
        return self.scaler.worker is WorkerModel.DEPLOYMENT or not self.live

    def on_decide(self) -> bool:
        """Returns False when the run is over."""
        view = self.view()
        self.timeline.append((self.now, view.ready, view.active))
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
    def run(self) -> SimulationResult:
        for number, task in enumerate(self.tasks):
            self.schedule(task.arrival, _Event.ARRIVAL, number)
        for _ in range(self.scaler.initial_pods):
            self.create_pod()
        self.schedule(0.0, _Event.DECIDE, 0)
        end = 0.0
        while self.heap:
            at, kind, _, subject, token = heapq.heappop(self.heap)
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
                self.on_node_ready()
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
        )
        return SimulationResult(metrics=metrics, timeline=tuple(self.timeline), waits=waits)


def simulate(
    workload: Workload, settings: Settings, scaler: Scaler, seed: int = 0
) -> SimulationResult:
    """Run one scaler on one workload. The same arguments give the same result."""
    return _Run(workload, settings, scaler, seed).run()
