"""Replaying measured latencies: the n-th worker created starts in the n-th start-up given,
the n-th node launched is ready after the n-th provisioning given, and past the sequence's
end the latency is drawn as without one. Cases small enough to work out by hand."""

from __future__ import annotations

from dataclasses import replace

import pytest
from jobtide_scaler.simulate.engine import Settings, simulate
from jobtide_scaler.simulate.nodes import NodeLife, NodePool
from jobtide_scaler.simulate.scalers import JobtideScaler
from jobtide_scaler.simulate.workloads import Task, Workload
from simlib import FIXED

pytestmark = pytest.mark.unit

# Nodes ready 30 s after launch unless replayed; Karpenter's validation and termination take
# no time, so that a node's figures are its launch, its readiness and its consolidation.
POOL = NodePool(provisioning_seconds=(30, 30), validation_seconds=0, termination_seconds=0)


def tasks(*durations: float) -> Workload:
    """Tasks all queued at 0: the scaler's first decision (at 0) starts one worker per task,
    and worker n (up n-th) takes task n."""
    return Workload("hand", tuple(Task(0.0, duration) for duration in durations), 0.0)


def test_start_ups_replayed_in_creation_order_then_drawn() -> None:
    # Workers 0 and 1 start in 1 s and 3 s (replayed), worker 2 past the end in FIXED's 5 s:
    # up at 1, 3 and 5, each takes the task of its rank then. Each lives its start-up, its
    # 10 s task and its 5 s idle timeout: 16 + 18 + 20 pod-seconds.
    settings = replace(FIXED, startup_sequence=(1.0, 3.0))
    result = simulate(tasks(10, 10, 10), settings, JobtideScaler(settings))
    assert result.waits == (1.0, 3.0, 5.0)
    assert result.metrics.pod_seconds == pytest.approx(54)
    assert result.metrics.startup_pod_seconds == pytest.approx(9)


def test_provisionings_replayed_in_launch_order_then_drawn() -> None:
    # Five workers pending at 0; Karpenter's batch closes at 1 and launches two nodes (four
    # workers fill one). Node 0 is ready after the replayed 10 s (at 11), node 1 after the
    # drawn 30 s (at 31). Workers 0-3 are bound at 11, up at 16 and busy until 116; worker 4
    # is bound at 31 and up at 36.
    pool = replace(POOL, provisioning_sequence=(10.0,))
    workload = tasks(100, 100, 100, 100, 100)
    result = simulate(workload, FIXED, JobtideScaler(FIXED), pool=pool)
    assert result.waits == (16.0, 16.0, 16.0, 16.0, 36.0)
    # Node 0 empties at 121 (idle 5 s after 116), is consolidatable 30 s later (151) and
    # removed at the autoscaler's next check (160); node 1 empties at 141 (idle after 136),
    # is removed at 180.
    assert result.nodes == (
        NodeLife(launched=1, ready=11, emptied=121, last_pod_event=121, decided=160, gone=160),
        NodeLife(launched=1, ready=31, emptied=141, last_pod_event=141, decided=180, gone=180),
    )
    assert result.metrics.node_seconds == pytest.approx((160 - 1) + (180 - 1))


def test_a_sequence_long_enough_leaves_nothing_to_the_seed() -> None:
    # Start-ups drawn from 0-20 s differ from seed to seed; replayed for every worker, the
    # seed no longer matters.
    drawn = Settings(
        poll_interval_seconds=5, messages_per_worker=1, idle_timeout_seconds=5,
        startup_seconds=(0, 20), max_workers=20,
    )  # fmt: skip
    replayed = replace(drawn, startup_sequence=(4.0, 2.0, 7.0))
    workload = tasks(10, 10, 10)
    by_seed = [simulate(workload, drawn, JobtideScaler(drawn), seed).waits for seed in (1, 2)]
    assert by_seed[0] != by_seed[1]
    by_seed = [simulate(workload, replayed, JobtideScaler(replayed), seed).waits for seed in (1, 2)]
    assert by_seed[0] == by_seed[1] == (2.0, 4.0, 7.0)


def test_a_negative_replayed_latency_names_its_field() -> None:
    with pytest.raises(ValueError, match="startup_sequence"):
        replace(FIXED, startup_sequence=(1.0, -0.5))
    with pytest.raises(ValueError, match="provisioning_sequence"):
        NodePool(provisioning_sequence=(-1.0,))
