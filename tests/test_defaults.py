"""One set of defaults: what `helm install` gives a pipeline, what the scaler assumes for a key
its configuration file leaves out, what a worker started without the chart does, and what the
simulator (docs/simulator.md) measured and tuned must be the same numbers, or the simulator's
figures would describe another product."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from jobtide_scaler.config import load_schema
from jobtide_scaler.simulate.cli import (
    PIPELINE_VALUE_KEYS,
    SCALER_VALUE_KEYS,
    settings_from_values,
)
from jobtide_scaler.simulate.engine import Settings
from jobtide_worker import WorkerConfig

pytestmark = pytest.mark.unit

CHART_VALUES = Path(__file__).resolve().parent.parent / "charts" / "jobtide" / "values.yaml"


def test_the_charts_defaults_are_the_simulators() -> None:
    values = yaml.safe_load(CHART_VALUES.read_text())
    # Every field starts far from its default, so a key missing from the chart shows too.
    unlike = Settings(
        **{
            field: getattr(Settings(), field) * 7 + 3
            for field in (*PIPELINE_VALUE_KEYS.values(), *SCALER_VALUE_KEYS.values())
        }
    )
    from_chart = settings_from_values(values, None, unlike)
    assert dataclasses.asdict(from_chart) == dataclasses.asdict(Settings())


def test_the_scaler_configurations_defaults_are_the_simulators() -> None:
    schema = load_schema()
    defaults = Settings()
    pipeline = schema["$defs"]["pipeline"]["properties"]
    for key, field in PIPELINE_VALUE_KEYS.items():
        assert pipeline[key]["default"] == getattr(defaults, field), key
    for key, field in SCALER_VALUE_KEYS.items():
        assert schema["properties"][key]["default"] == getattr(defaults, field), key


def test_a_worker_started_without_the_chart_idles_as_long_as_the_simulators() -> None:
    environment = {
        "JOBTIDE_QUEUE": "q",
        "JOBTIDE_BROKER_HOST": "broker",
        "JOBTIDE_BROKER_USERNAME": "worker",
        "JOBTIDE_BROKER_PASSWORD": "secret",
    }
    config = WorkerConfig.from_env(environment)
    assert config.idle_timeout_seconds == Settings().idle_timeout_seconds
