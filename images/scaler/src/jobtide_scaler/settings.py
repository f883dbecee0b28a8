"""The scaler's release-wide scaling settings, defined once like a pipeline's
(`jobtide_worker.pipeline_settings`): the chart's `scaler.*` keys of the same names, the
scaler's configuration file and the simulator's `Settings` follow from this class."""

from __future__ import annotations

from dataclasses import dataclass

from jobtide_worker.pipeline_settings import SettingsBlock, setting

__all__ = ["ScalerSettings"]


@dataclass(frozen=True)
class ScalerSettings(SettingsBlock):
    poll_interval_seconds: float = setting(
        5, exclusive_minimum=0, maximum=3600, doc="Seconds between two scaling decisions."
    )
    broker_stale_after_seconds: float = setting(
        30,
        exclusive_minimum=0,
        doc="Broker counts older than this stop Job creation for that pipeline (never act on"
        " stale data).",
    )
    max_total_workers: int = setting(
        100,
        minimum=1,
        doc="Cap on worker Jobs running at once over all pipelines of the release.",
    )
