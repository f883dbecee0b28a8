"""The simulator on cases small enough to work out by hand, and the KEDA and HPA replays
against their published formulas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jobtide_scaler.simulate.cli import main, settings_from_values
from jobtide_scaler.simulate.engine import ClusterView, Settings, simulate
from jobtide_scaler.simulate.ideal import ideal_pod_seconds, unavoidable_waits
from jobtide_scaler.simulate.report import compare
from jobtide_scaler.simulate.scalers import (
    HpaScaler,
    JobtideScaler,
    KedaScaler,
    keda_new_jobs,
)
from jobtide_scaler.simulate.workloads import Task, Workload, make_workload, read_trace
from simlib import FIXED

pytestmark = pytest.mark.unit


def one_task(provisioning: tuple[float, float] | None = None) -> Workload:
    return Workload("one", (Task(0.0, 10.0),), 0.0, provisioning)


def test_one_task_with_a_draining_worker() -> None:
    # Pod created at the poll at 0, up at 5, works 5..15, idle 15..20, exits at 20.
    metrics = simulate(one_task(), FIXED, JobtideScaler(FIXED)).metrics
    assert metrics.jobs_created == 1
    assert metrics.wait_p50 == metrics.wait_p95 == 5
    assert metrics.pod_seconds == 20
    assert metrics.idle_pod_seconds == 5
    assert metrics.startup_pod_seconds == 5
    assert metrics.tasks_unfinished == 0


def test_one_task_with_a_one_message_job() -> None:
    metrics = simulate(one_task(), FIXED, KedaScaler(FIXED, "default", drain=False)).metrics
    assert (metrics.jobs_created, metrics.pod_seconds, metrics.idle_pod_seconds) == (1, 15, 0)


def test_cold_pool_waits_for_the_node_and_does_not_bill_it() -> None:
    # Node ready at 30, pod up at 35: the task waits 35 s; the pod costs 5 + 10 + 5.
    metrics = simulate(one_task((30, 30)), FIXED, JobtideScaler(FIXED)).metrics
    assert metrics.wait_p95 == 35
    assert metrics.pod_seconds == 20
    assert metrics.jobs_created == 1


def test_cold_pool_storm_of_keda_eager() -> None:
    # eager creates min(max - running - pending, ready) = 1 Job at each poll from 0 to 30
    # while the pods wait for the node: 7 Jobs for one message. Six of them find nothing and
    # leave after start-up and the idle timeout (10 s each); the seventh works 15 s.
    metrics = simulate(one_task((30, 30)), FIXED, KedaScaler(FIXED, "eager", drain=False)).metrics
    assert metrics.jobs_created == 7
    assert metrics.pod_seconds == 15 + 6 * 10


def test_hpa_scale_down_kills_busy_pods_and_loses_their_work() -> None:
    settings = Settings(messages_per_worker=10, max_workers=20, startup_seconds=(5, 5))
    workload = Workload("long", tuple(Task(0.0, 1000.0) for _ in range(30)), 0.0)
    result = simulate(workload, settings, HpaScaler(settings))
    assert result.metrics.busy_pods_killed >= 1
    assert result.metrics.tasks_unfinished == 0
    # Lost work is paid for: busy pod time exceeds the 30,000 s the tasks need.
    metrics = result.metrics
    assert metrics.pod_seconds - metrics.startup_pod_seconds - metrics.idle_pod_seconds > 30_000


@pytest.mark.parametrize(
    ("strategy", "queue", "target", "running", "pending", "max_replicas", "expected"),
    [
        ("default", 10, 1, 3, 0, 100, 7),  # maxScale - running
        ("default", 3, 1, 3, 0, 100, 0),  # the #5114 case: busy Jobs hide waiting messages
        ("default", 25, 10, 1, 0, 100, 2),  # ceil(25 / 10) - 1
        ("default", 500, 1, 0, 0, 20, 20),  # maxScale capped by maxReplicaCount
        ("accurate", 10, 1, 3, 1, 100, 9),  # maxScale - pending
        ("accurate", 10, 1, 95, 0, 100, 5),  # over the cap: maxReplicaCount - running
        ("eager", 5, 1, 3, 0, 10, 5),  # min(10 - 3 - 0, 5)
        ("eager", 5, 1, 5, 5, 20, 5),  # pending Jobs ignored: the cold-pool storm
        ("eager", 5, 1, 8, 2, 10, 0),  # no slot left
    ],
)
def test_keda_formulas(
    strategy: str,
    queue: int,
    target: int,
    running: int,
    pending: int,
    max_replicas: int,
    expected: int,
) -> None:
    assert keda_new_jobs(strategy, queue, target, running, pending, max_replicas) == expected


def test_keda_creates_nothing_while_the_trigger_is_inactive() -> None:
    assert keda_new_jobs("default", 2, 1, 0, 0, 10, activation=2) == 0
    assert keda_new_jobs("default", 3, 1, 0, 0, 10, activation=2) == 3


@pytest.mark.parametrize(
    ("replicas", "metric", "target", "expected"),
    [
        (1, 4, 1, 4),  # ceil(4 / 1)
        (1, 100, 1, 5),  # scale-up limited to max(100 %, 4 pods): 1 + 4
        (8, 100, 1, 16),  # ... or 100 %: 8 + 8
        (10, 105, 10, 10),  # ratio 1.05: within the 10 % tolerance
        (10, 115, 10, 12),  # ratio 1.15: ceil(115 / 10)
        (3, 500, 1, 7),  # 100 % of 3 is fewer than 4 pods: 3 + 4
    ],
)
def test_hpa_scale_up(replicas: int, metric: int, target: int, expected: int) -> None:
    hpa = HpaScaler(Settings(messages_per_worker=target, max_workers=1000), replicas=replicas)
    assert hpa.replicas_for(0.0, metric) == expected


def test_hpa_scale_down_waits_for_the_stabilisation_window() -> None:
    hpa = HpaScaler(Settings(messages_per_worker=1, max_workers=100), replicas=1)
    assert hpa.decide(0.0, view(ready=10)) == 4  # 1 -> 5 (limit + 4)
    assert hpa.decide(15.0, view(ready=10)) == 5  # 5 -> 10
    for at in range(30, 315, 15):
        assert hpa.decide(float(at), view(ready=0)) == 0  # 10 was recommended within 300 s
    assert hpa.decide(315.0, view(ready=0)) == -9  # the window only holds 1s now


def view(ready: int) -> ClusterView:
    return ClusterView(ready=ready, unacked=0, active=0, pending=0)


def test_same_seed_same_result_other_seed_other_workload() -> None:
    first = compare(make_workload("bursty", 3), Settings(), 3).as_json()
    again = compare(make_workload("bursty", 3), Settings(), 3).as_json()
    assert first == again
    assert make_workload("bursty", 4).tasks != make_workload("bursty", 3).tasks


def test_unavoidable_wait_and_ideal_cost_by_hand() -> None:
    settings = Settings(startup_seconds=(10, 10), pool_cooldown_seconds=600)
    tasks = (Task(0, 20), Task(5, 20), Task(100, 20))
    workload = Workload("hand", tasks, 0.0, (60, 60))
    # Episode 1 starts cold at 0: pods up at 70. Task 2 waits 65. Episode 2 at 100 (the
    # system emptied at 90, only 10 s before): warm, up at 110.
    assert unavoidable_waits(workload, settings) == [70, 65, 10]
    # One worker at most: task 2 waits for it (free at 90), and the episode then lasts until
    # 110, so task 3 finds it busy and waits 10 s too.
    assert unavoidable_waits(workload, settings, workers=1) == [70, 85, 10]
    assert unavoidable_waits(workload, settings, workers=2) == [70, 65, 10]
    # Budget 0: three pods (the third starts 80 s after the others are free: restart).
    assert ideal_pod_seconds(workload, settings, 0) == 60 + 3 * 10
    # Budget 15: the second task waits for the first pod (free at 20): two pods.
    assert ideal_pod_seconds(workload, settings, 15) == 60 + 2 * 10


def test_trace_and_values_through_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival,duration\n0,10\n1\n2,30\n")
    values = tmp_path / "values.yaml"
    values.write_text(
        "scaler: {pollIntervalSeconds: 2, maxTotalWorkers: 3}\n"
        "pipelineDefaults: {messagesPerWorker: 1, idleTimeoutSeconds: 60, maxWorkers: 10}\n"
        "pipelines: {resize: {queue: resize, maxWorkers: 2}}\n"
    )
    code = main(["--trace", str(trace), "--values", str(values), "--format", "json"])
    assert code == 0
    document = json.loads(capsys.readouterr().out)
    assert document["workload"] == "trace:trace.csv"
    assert set(document["ideal"]) == {"node_seconds", "pod_seconds", "wait_p95"}
    jobtide = document["policies"]["jobtide"]
    assert jobtide["jobs_created"] <= 2  # maxWorkers of the pipeline wins over the default
    assert set(jobtide) == {
        "node_seconds",
        "peak_nodes",
        "nodes_launched",
        "busy_pods_disrupted",
        "pod_seconds",
        "idle_pod_seconds",
        "wait_p50",
        "wait_p95",
        "wait_p99",
        "max_backlog",
        "busy_pods_killed",
        "jobs_created",
    }
    assert len(read_trace(trace, 1).tasks) == 3


def test_values_mapping_and_errors() -> None:
    values = {
        "scaler": {"pollIntervalSeconds": 2},
        "pipelineDefaults": {"idleTimeoutSeconds": 30},
        "pipelines": {"a": {"messagesPerWorker": 4}, "b": {}},
    }
    settings = settings_from_values(values, "a", Settings())
    assert (settings.poll_interval_seconds, settings.idle_timeout_seconds) == (2, 30)
    assert settings.messages_per_worker == 4
    with pytest.raises(ValueError, match="several pipelines"):
        settings_from_values(values, None, Settings())
    with pytest.raises(ValueError, match=r"pipelines\.a\.maxWorkers"):
        settings_from_values({"pipelines": {"a": {"maxWorkers": "x"}}}, None, Settings())
    # The worker's reads of the queue's counters, as the values set them.
    quiet = settings_from_values({"pipelines": {"a": {"quietCheckSeconds": 0}}}, None, Settings())
    assert (Settings().quiet_check_seconds, quiet.quiet_check_seconds) == (5, 0)
    with pytest.raises(ValueError, match=r"pipelines\.a\.quietCheckSeconds: must be 0 \(off\)"):
        settings_from_values({"pipelines": {"a": {"quietCheckSeconds": 3}}}, None, Settings())


def test_bad_trace_row_names_the_line(tmp_path: Path) -> None:
    trace = tmp_path / "bad.csv"
    trace.write_text("0,1\nsoon,2\n")
    with pytest.raises(ValueError, match=r"bad\.csv:2"):
        read_trace(trace, 1)
