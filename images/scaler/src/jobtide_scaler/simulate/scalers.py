"""The scaling policies compared by the simulator, all driven by the same `Settings`.

- jobtide: `jobtide_scaler.policy.jobs_to_create`, the scaler's own code.
- keda-<strategy>[-drain][-http][-30s]: KEDA ScaledJob, replayed from its formulas
  (pkg/scaling/executor/scale_jobs.go in the KEDA repository). The queue length is
  what KEDA's RabbitMQ trigger reads over AMQP, ready messages only, or with "-http" (or
  `keda_counts_unacked`) over the management API, ready + unacked. Without "-drain" each Job
  takes one message (KEDA's model, target value 1); with "-drain" the workers are jobtide's
  (drain until idle) and the target value is `messages_per_worker`. KEDA polls at jobtide's
  interval, or with "-30s" at its own default `pollingInterval`. Its pods carry no lever:
  the default scheduler spreads them, the broker round-robins, and nothing blocks their
  eviction.
- hpa: a Deployment under the HPA on queue length (ready + unacked), minimum one replica.
- demo: the pattern's original scaler (saascipes/k8s-auto-scaler).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from jobtide_worker import priority

from jobtide_scaler.policy import Observation, jobs_to_create
from jobtide_scaler.simulate.engine import ClusterView, Scaler, Settings, WorkerModel
from jobtide_scaler.simulate.nodes import Levers

__all__ = [
    "JOBTIDE_LEVERS",
    "KEDA_DEFAULT_POLLING_SECONDS",
    "KEDA_STRATEGIES",
    "NO_LEVERS",
    "DemoScaler",
    "HpaScaler",
    "JobtideScaler",
    "KedaScaler",
    "keda_new_jobs",
    "policy_factories",
]

_PIPELINE = "simulated"

# What the product ships: the worker consumes with a consumer priority, the workers of older
# nodes first;
# the chart gives the worker pods a preferred pod affinity to the release's other workers and
# both node autoscalers' do-not-evict annotations; its Jobs are deleted
# `ttlSecondsAfterFinished` after they finish.
JOBTIDE_LEVERS = Levers(
    consumer_priority=priority.DEFAULT,
    pack=True,
    karpenter_do_not_disrupt=True,
    ca_safe_to_evict=False,
    evicted_pod_retried=False,
    finished_pods_deleted=True,
)
KEDA_DEFAULT_POLLING_SECONDS = 30.0
# Everyone else's pods: spread by the default scheduler, round robin, evictable, and their
# Jobs keep Kubernetes' default backoffLimit (6), so an evicted pod is started again.
NO_LEVERS = Levers()


@dataclass
class _PollingScaler:
    """A scaler that polls at the configured interval, its workers using the configured
    idle timeout."""

    settings: Settings

    @property
    def interval_seconds(self) -> float:
        return self.settings.poll_interval_seconds

    @property
    def idle_timeout_seconds(self) -> float:
        return self.settings.idle_timeout_seconds

    @property
    def quiet_check_seconds(self) -> float:
        return 0.0  # KEDA's workers know nothing of the queue's counters


@dataclass
class JobtideScaler(_PollingScaler):
    levers: Levers = JOBTIDE_LEVERS
    worker: WorkerModel = WorkerModel.DRAIN
    initial_pods: int = 0

    @property
    def quiet_check_seconds(self) -> float:
        """jobtide's worker leaves once the queue is silent, as the pipeline sets it."""
        return self.settings.quiet_check_seconds

    def decide(self, now: float, view: ClusterView) -> int:
        observation = Observation(
            ready=view.ready, unacked=view.unacked, active_jobs=view.active, broker_fresh=True
        )
        # The simulator's settings are a pipeline's settings (a subclass): the policy takes them.
        decision = jobs_to_create(
            {_PIPELINE: (self.settings, observation)}, self.settings.max_total_workers
        )
        return decision[_PIPELINE]


KEDA_STRATEGIES = ("default", "accurate", "eager")


def keda_new_jobs(
    strategy: str,
    queue_length: int,
    target: int,
    running: int,
    pending: int,
    max_replicas: int,
    activation: int = 0,
) -> int:
    """Jobs KEDA's ScaledJob creates in one poll (minReplicaCount 0)."""
    if queue_length <= activation:
        return 0  # the trigger is not active: KEDA creates nothing
    max_scale = min(math.ceil(queue_length / target), max_replicas)
    if strategy == "default":
        effective = max_scale - running
    elif strategy == "accurate":
        if max_scale + running - pending > max_replicas:
            effective = max_replicas - running
        else:
            effective = max_scale - pending
    elif strategy == "eager":
        effective = min(max_replicas - running - pending, max_scale)
    else:
        raise ValueError(f"unknown KEDA scaling strategy {strategy!r}")
    return max(0, min(max_scale, effective))


@dataclass
class KedaScaler(_PollingScaler):
    strategy: str = "default"
    drain: bool = False
    initial_pods: int = 0
    levers: Levers = NO_LEVERS

    @property
    def worker(self) -> WorkerModel:
        return WorkerModel.DRAIN if self.drain else WorkerModel.ONE_MESSAGE

    def decide(self, now: float, view: ClusterView) -> int:
        queue_length = view.ready + (view.unacked if self.settings.keda_counts_unacked else 0)
        return keda_new_jobs(
            self.strategy,
            queue_length,
            self.settings.messages_per_worker if self.drain else 1,
            view.active,
            view.pending,
            self.settings.max_workers,
            self.settings.activation_messages,
        )


HPA_SYNC_SECONDS = 15.0
HPA_TOLERANCE = 0.1
HPA_DOWNSCALE_WINDOW_SECONDS = 300.0


@dataclass
class HpaScaler:
    """The HPA's algorithm on an AverageValue external metric (the queue length, ready +
    unacked) with its default behaviour: no scale-up stabilisation, at most
    max(100 %, 4 pods) more per 15 s, a 300 s scale-down stabilisation window."""

    settings: Settings
    worker: WorkerModel = WorkerModel.DEPLOYMENT
    initial_pods: int = 1  # also its minimum: the run bills it until it is back there
    levers: Levers = NO_LEVERS
    replicas: int = 1
    recommendations: deque[tuple[float, int]] = field(default_factory=deque)

    @property
    def interval_seconds(self) -> float:
        return HPA_SYNC_SECONDS

    @property
    def idle_timeout_seconds(self) -> float:
        return math.inf

    @property
    def quiet_check_seconds(self) -> float:
        return 0.0

    def decide(self, now: float, view: ClusterView) -> int:
        target = self.replicas_for(now, view.ready + view.unacked)
        previous = self.replicas
        self.replicas = target
        return target - previous

    def replicas_for(self, now: float, metric: int) -> int:
        """The replicas the HPA sets for this metric, updating its stabilisation window."""
        target_value = self.settings.messages_per_worker
        ratio = metric / (target_value * self.replicas)
        desired = self.replicas
        if abs(ratio - 1.0) > HPA_TOLERANCE:
            desired = math.ceil(metric / target_value)
        desired = max(1, min(desired, self.settings.max_workers))
        # Scale-down stabilisation: the highest recommendation of the window wins.
        self.recommendations.append((now, desired))
        while self.recommendations[0][0] <= now - HPA_DOWNSCALE_WINDOW_SECONDS:
            self.recommendations.popleft()
        if desired < self.replicas:
            desired = min(self.replicas, max(rec for _, rec in self.recommendations))
        up_limit = max(2 * self.replicas, self.replicas + 4)
        return min(desired, up_limit)


@dataclass
class DemoScaler:
    """Every 10 s: one more Job if no worker pod is pending and ready messages exceed the
    target (its AMQP count is ready messages only); workers exit after 20 s idle; no cap."""

    settings: Settings
    worker: WorkerModel = WorkerModel.DRAIN
    initial_pods: int = 0
    levers: Levers = NO_LEVERS

    @property
    def interval_seconds(self) -> float:
        return 10.0

    @property
    def idle_timeout_seconds(self) -> float:
        return 20.0

    @property
    def quiet_check_seconds(self) -> float:
        return 0.0

    def decide(self, now: float, view: ClusterView) -> int:
        if view.pending == 0 and view.ready > self.settings.messages_per_worker:
            return 1
        return 0


def policy_factories(
    settings: Settings, jobtide_levers: Levers = JOBTIDE_LEVERS
) -> dict[str, Callable[[], Scaler]]:
    """A fresh scaler per run (the HPA keeps state) for every compared policy, by name."""
    factories: dict[str, Callable[[], Scaler]] = {
        "jobtide": lambda: JobtideScaler(settings, jobtide_levers)
    }
    for strategy in KEDA_STRATEGIES:
        for drain in (False, True):
            for http in (False, True):
                for polling in (None, KEDA_DEFAULT_POLLING_SECONDS):
                    name = (
                        f"keda-{strategy}"
                        + ("-drain" if drain else "")
                        + ("-http" if http else "")
                        + ("-30s" if polling else "")
                    )
                    keda_settings = replace(
                        settings,
                        keda_counts_unacked=http,
                        poll_interval_seconds=polling or settings.poll_interval_seconds,
                    )
                    factories[name] = lambda s=keda_settings, st=strategy, d=drain: KedaScaler(  # type: ignore[misc]
                        s, st, d
                    )
    factories["hpa"] = lambda: HpaScaler(settings)
    factories["demo"] = lambda: DemoScaler(settings)
    return factories
