"""Tuning a pipeline's settings with the simulator (`simulate --tune`): the answer is within
the wait limit, no dearer than the current settings or any point of the coarse grid within
the limit, and the values it prints give the figures it reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from jobtide_scaler.simulate.cli import main, settings_from_values
from jobtide_scaler.simulate.engine import Settings, simulate
from jobtide_scaler.simulate.nodes import Autoscaler, NodePool
from jobtide_scaler.simulate.scalers import JOBTIDE_LEVERS, JobtideScaler
from jobtide_scaler.simulate.tune import TuningConfig, tune
from jobtide_scaler.simulate.workloads import make_workload

pytestmark = pytest.mark.unit

POOL = NodePool(autoscaler=Autoscaler.KARPENTER)
# Idle 60 s is dear on a declining load: the tuner has room to save.
START = Settings(idle_timeout_seconds=60, messages_per_worker=1)


def bill(settings: Settings, workload_name: str = "declining") -> tuple[float, float]:
    workload = make_workload(workload_name, 1)
    scaler = JobtideScaler(settings, levers=JOBTIDE_LEVERS)
    metrics = simulate(workload, settings, scaler, 1, POOL).metrics
    return metrics.node_seconds, metrics.wait_p95


def test_the_tuning_is_within_the_limit_and_no_dearer_than_the_grid() -> None:
    tuning = tune(make_workload("declining", 1), START, POOL, JOBTIDE_LEVERS, 1)
    current_cost, current_p95 = bill(START)
    assert tuning.current[1].node_seconds == current_cost
    assert tuning.wait_limit == current_p95
    assert tuning.best is not None
    config, metrics = tuning.best
    assert metrics.wait_p95 <= current_p95
    assert metrics.node_seconds < current_cost  # idle 60 s is not the cheapest here
    # The figures are those of a run of the settings found.
    assert bill(config.settings(START)) == (metrics.node_seconds, metrics.wait_p95)
    # No point of the coarse grid within the limit is cheaper.
    for target in (1, 2, 4):
        for idle in (5.0, 15.0, 30.0):
            cost, p95 = bill(TuningConfig(target, idle).settings(START))
            if p95 <= current_p95:
                assert metrics.node_seconds <= cost, (target, idle)


def test_a_limit_no_tuning_meets() -> None:
    tuning = tune(make_workload("declining", 1), START, POOL, JOBTIDE_LEVERS, 1, wait_limit=1.0)
    assert tuning.best is None
    assert tuning.runs >= 10


def test_the_printed_values_give_the_printed_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(
        "pipelineDefaults: {messagesPerWorker: 1, idleTimeoutSeconds: 60}\n"
        "pipelines: {resize: {queue: resize}}\n"
    )
    arguments = ["--workload", "declining", "--values", str(values), "--tune"]
    assert main(arguments) == 0
    table = capsys.readouterr().out
    snippet = yaml.safe_load(table.split("values:\n", 1)[1])
    assert snippet == {"pipelines": {"resize": snippet["pipelines"]["resize"]}}
    assert main([*arguments, "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["values_path"] == "pipelines.resize"
    assert document["best"]["values"] == snippet["pipelines"]["resize"]
    # The snippet merged into the values file, simulated: the figures the tuner printed.
    merged = yaml.safe_load(values.read_text())
    merged["pipelines"]["resize"].update(snippet["pipelines"]["resize"])
    tuned = settings_from_values(merged, None, Settings())
    cost, p95 = bill(tuned)
    assert (round(cost, 1), round(p95, 2)) == (
        document["best"]["figures"]["node_seconds"],
        document["best"]["figures"]["wait_p95"],
    )
    assert p95 <= document["wait_limit"]
    assert f"{cost:.0f} node-s" in table


def test_tune_needs_one_workload_and_the_limit_needs_tune(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--compare", "--tune"])
    assert exited.value.code == 2
    assert "--tune takes one --workload or --trace" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["--workload", "steady", "--max-wait-p95", "10"])
    assert exited.value.code == 2
    assert "--max-wait-p95 applies to --tune only" in capsys.readouterr().err
