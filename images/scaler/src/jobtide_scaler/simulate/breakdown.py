"""Where a run's node-seconds go: every billed second of every node, by what the node held.

A node's time is split by its state between two events of the run:
- provisioning: launched, not ready yet;
- empty: ready and without a pod (waiting for the autoscaler to take it);
- removing: the autoscaler decided to remove it (drained, or its instance terminating);
- otherwise its time is split by slot, a slot being one worker pod's share of the node
  (1 / pods_per_node): slots of busy workers, of idle workers, of workers still starting up,
  and free slots (room no worker uses while the node is up for others).

The parts add up to the run's `node_seconds`. The busy slots are the work itself, the same for
every policy of a workload; the rest is what a policy can save, and tells which lever can
still pay: free slots are nodes kept by too few workers (packing, which workers starve first),
empty and provisioning time come per node launched (churn), idle slots from the idle timeout.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from jobtide_scaler.simulate.engine import Scaler, Settings, SimulationResult, _Run
from jobtide_scaler.simulate.nodes import NodePool
from jobtide_scaler.simulate.workloads import Workload

__all__ = ["NodeBreakdown", "simulate_with_breakdown"]


@dataclass(frozen=True)
class NodeBreakdown:
    """Node-seconds by state (the module docstring defines each)."""

    busy: float
    idle: float
    starting: float
    free: float
    empty: float
    provisioning: float
    removing: float

    @property
    def total(self) -> float:
        parts: list[float] = [getattr(self, part.name) for part in fields(self)]
        return sum(parts)

    def describe(self) -> str:
        parts = ", ".join(f"{part.name} {getattr(self, part.name):.0f}" for part in fields(self))
        return f"{parts} (total {self.total:.0f})"


class _AccountedRun(_Run):
    def __init__(
        self, workload: Workload, settings: Settings, scaler: Scaler, seed: int, pool: NodePool
    ) -> None:
        super().__init__(workload, settings, scaler, seed, pool)
        self.parts = dict.fromkeys((part.name for part in fields(NodeBreakdown)), 0.0)

    def elapse(self, until: float) -> None:
        span = until - self.now
        if span <= 0 or self.pool is None:
            return
        per_node = self.pool.pods_per_node
        for node in self.nodes:
            if node.launched_at > self.now:
                continue
            if node.terminated_at is not None and node.terminated_at <= self.now:
                continue  # gone
            if node.terminated_at is not None or node.decided_at is not None:
                self.parts["removing"] += span
            elif node.ready_at is None:
                self.parts["provisioning"] += span
            elif not node.pods:
                self.parts["empty"] += span
            else:
                pods = [self.pods[number] for number in node.pods]
                busy = sum(1 for pod in pods if pod.task is not None)
                starting = sum(1 for pod in pods if pod.task is None and not pod.ready)
                idle = len(pods) - busy - starting
                share = span / per_node
                self.parts["busy"] += busy * share
                self.parts["starting"] += starting * share
                self.parts["idle"] += idle * share
                self.parts["free"] += (per_node - len(pods)) * share

    def breakdown(self, result: SimulationResult) -> NodeBreakdown:
        # The run ends at the scaler's last decision; a node whose termination began before
        # then is billed until its instance is gone.
        end = self.now
        removing = sum(
            node.terminated_at - end
            for node in self.nodes
            if node.terminated_at is not None and node.terminated_at > end
        )
        parts = dict(self.parts, removing=self.parts["removing"] + removing)
        return NodeBreakdown(**parts)


def simulate_with_breakdown(
    workload: Workload, settings: Settings, scaler: Scaler, seed: int, pool: NodePool
) -> tuple[SimulationResult, NodeBreakdown]:
    """`simulate` on a node pool, with where its node-seconds went."""
    run = _AccountedRun(workload, settings, scaler, seed, pool)
    result = run.run()
    return result, run.breakdown(result)
