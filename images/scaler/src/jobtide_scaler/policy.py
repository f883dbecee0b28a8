"""The scaling decision: how many worker Jobs to create now, from counts and settings.

Pure: no Kubernetes, no RabbitMQ, no network, no clock. The scaler loop, the tests and the
simulator (`jobtide_scaler.simulate`) all call `jobs_to_create`, so what the simulator
measures is what the scaler does. The interface is a contract (docs/architecture.md); a
pipeline's settings are `jobtide_worker.pipeline_settings.PipelineSettings`, their one
definition, validated when made.

For each pipeline with fresh broker data:

    backlog  = ready + unacked
    demand   = ceil(backlog / messages_per_worker)   if backlog > activation_messages, else 0
    desired  = clamp(demand, min_workers, max_workers)
    new      = clamp(desired - active_jobs, 0, max_new_per_cycle)

`unacked` (messages a worker holds) and `active_jobs` (which includes pending Jobs, whose pod
is not running yet) are counted on both sides, so a message in flight is neither counted as
waiting nor left without a worker. That is what keeps a cold node pool from causing a storm
of Jobs (every poll sees the same ready messages while pods wait for a node, but the pending
Jobs already cover them: KEDA issues #525, #7329) and what stops messages waiting while a
slot is free (KEDA #5114: a running Job subtracted although its message is no longer
counted). A backlog above the activation threshold always yields a demand of at least one
worker, so a queue with no worker always gets one (if the caps leave room).

Workers drain the queue until they have been idle for their idle timeout; a worker takes many
messages one after another. So `messages_per_worker` is not "one Job per message" (KEDA's
model) but the backlog one worker is expected to work through: larger values cost fewer
start-ups and less idle time, smaller ones shorten waits. The defaults were chosen with the
simulator (docs/simulator.md).

Stale broker data (`broker_fresh` False) creates nothing for that pipeline, not even to
restore `min_workers`: without the broker the scaler cannot tell whether a new worker could
even connect, and workers already running keep their Jobs. Its active Jobs still count
against the global cap.

The global cap `max_total_workers` bounds the active Jobs of all pipelines together. When the
pipelines want more new Jobs than the room left, the room is handed out one Job at a time to
the pipeline that would then have the fewest active Jobs (ties broken by pipeline name): a
max-min fair split of workers, in which a pipeline with no worker is served first.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass

from jobtide_worker.pipeline_settings import PipelineSettings

__all__ = ["Observation", "PipelineSettings", "desired_workers", "jobs_to_create", "limiting_cap"]


@dataclass(frozen=True)
class Observation:
    """What the adapters saw for one pipeline in this cycle.

    Pending Jobs (no pod running yet) are part of `active_jobs` and need no count of their
    own. KEDA's `accurate` strategy keeps them apart because its queue length is ready
    messages only: a running Job's message has left that count, so only pending Jobs may be
    subtracted from it. Here the backlog includes the in-flight messages (`unacked`), so every
    active Job, pending or running, is subtracted alike."""

    ready: int
    unacked: int
    active_jobs: int
    broker_fresh: bool

    def __post_init__(self) -> None:
        for name in ("ready", "unacked", "active_jobs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


def _demand(policy: PipelineSettings, observation: Observation) -> int:
    backlog = observation.ready + observation.unacked
    if backlog > policy.activation_messages:
        return -(-backlog // policy.messages_per_worker)
    return 0


def desired_workers(policy: PipelineSettings, observation: Observation) -> int:
    """Active Jobs the pipeline should have for this backlog, within its own caps."""
    return min(max(_demand(policy, observation), policy.min_workers), policy.max_workers)


def _wanted(policy: PipelineSettings, observation: Observation) -> int:
    if not observation.broker_fresh:
        return 0
    missing = desired_workers(policy, observation) - observation.active_jobs
    return max(0, min(missing, policy.max_new_per_cycle))


def jobs_to_create(
    pipelines: Mapping[str, tuple[PipelineSettings, Observation]],
    max_total_workers: int,
) -> dict[str, int]:
    """New Jobs to create now for each pipeline (every name of `pipelines` is a key)."""
    wanted = {name: _wanted(policy, obs) for name, (policy, obs) in pipelines.items()}
    active_total = sum(obs.active_jobs for _, obs in pipelines.values())
    room = max(0, max_total_workers - active_total)
    if sum(wanted.values()) <= room:
        return wanted

    granted = dict.fromkeys(wanted, 0)
    # (workers the pipeline would have, name): the smallest is served next.
    heap = [(pipelines[name][1].active_jobs, name) for name, count in wanted.items() if count]
    heapq.heapify(heap)
    while room and heap:
        workers, name = heapq.heappop(heap)
        granted[name] += 1
        room -= 1
        if granted[name] < wanted[name]:
            heapq.heappush(heap, (workers + 1, name))
    return granted


def limiting_cap(policy: PipelineSettings, observation: Observation, granted: int) -> str | None:
    """The cap that keeps the pipeline below its backlog's demand this cycle, once `granted`
    new Jobs are created: "maxTotalWorkers" (the room left was shared out), "maxWorkers", or
    None. Waiting for `maxNewPerCycle` is a pace, not a cap."""
    if granted < _wanted(policy, observation):
        return "maxTotalWorkers"
    if (
        observation.broker_fresh
        and _demand(policy, observation) > policy.max_workers
        and observation.active_jobs + granted >= policy.max_workers
    ):
        return "maxWorkers"
    return None
