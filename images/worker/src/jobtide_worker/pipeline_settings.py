"""A pipeline's settings, defined once: name, type, bounds, default and documentation of each.

`PipelineSettings` is the definition. Everything else follows from it: the scaler reads its
configuration file into it, the simulator's `Settings` extends it, the worker takes its
defaults and bounds from it, and the chart's values (defaults with their `# --` comments),
the chart's schema and the scaler's configuration schema are generated from it by
`python -m jobtide_scaler.contracts --write` (a unit test fails when they are stale).

Settings are dataclass fields made with `setting(...)`; the values files and the scaler's
configuration use the camelCase form of each field name (`max_workers` -> `maxWorkers`).
This module is pure: no broker, no cluster.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "STATISTICS_INTERVAL_SECONDS",
    "PipelineSettings",
    "SettingSpec",
    "SettingsBlock",
    "SettingsError",
    "read_settings",
    "setting",
    "setting_specs",
    "value_key",
]

T = TypeVar("T")
B = TypeVar("B", bound="SettingsBlock")
_SPEC = "jobtide.setting"
# The kinds a setting may have, by annotation (a string under postponed evaluation).
_KINDS: dict[str, type] = {"int": int, "float": float}
# The bound of a setting that names none: the largest value of Kubernetes' int32 fields (two
# settings become backoffLimit and ttlSecondsAfterFinished). Without one, a value beyond 64 bits
# passes the schema and wraps around or loses digits on its way (Helm reads numbers as float64).
DEFAULT_MAXIMUM = 2**31 - 1
# RabbitMQ's `collect_statistics_interval` (5,000 ms by default): the management API's counters
# are refreshed this often, so two reads closer together may find the same counter.
STATISTICS_INTERVAL_SECONDS = 5
# Made on first use: every settings object is checked against its class's specs when made.
_SPECS_BY_CLASS: dict[type[SettingsBlock], dict[str, SettingSpec]] = {}


class SettingsError(ValueError):
    """Invalid settings; each of `problems` starts with the key it is about."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class SettingSpec:
    """What the documentation and the schemas say about one setting."""

    key: str  # the camelCase name in values files and the scaler's configuration
    kind: type  # int or float
    default: Any
    doc: str  # the helm-docs comment of the chart's values, without `# -- `
    minimum: float | None = None
    exclusive_minimum: float | None = None
    maximum: float | None = None
    # A value that turns the setting off, allowed although below its minimum (0: no reads).
    off: float | None = None

    def problem(self, value: object) -> str | None:
        """Why `value` is not valid for this setting, or None."""
        number_kinds = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, number_kinds):
            expected = "an integer" if self.kind is int else "a number"
            return f"{self.key}: expected {expected}, got {value!r}"
        if not math.isfinite(value):
            return f"{self.key}: expected a finite number, got {value!r}"
        if self.off is not None and value == self.off:
            return None
        if self.minimum is not None and value < self.minimum:
            if self.off is not None:
                return (
                    f"{self.key}: must be {self.off:g} (off) or at least {self.minimum:g},"
                    f" got {value!r}"
                )
            return f"{self.key}: must be at least {self.minimum:g}, got {value!r}"
        if self.exclusive_minimum is not None and value <= self.exclusive_minimum:
            return f"{self.key}: must be greater than {self.exclusive_minimum:g}, got {value!r}"
        if self.maximum is not None and value > self.maximum:
            return f"{self.key}: must be at most {self.maximum:.15g}, got {value!r}"
        return None

    def json_schema(self) -> dict[str, Any]:
        """This setting as a JSON schema (valid in drafts 7 and 2020-12)."""
        schema: dict[str, Any] = {
            "type": "integer" if self.kind is int else "number",
            "description": self.doc,
            "default": self.default,
        }
        if self.off is not None and self.minimum is not None:
            schema["anyOf"] = [{"const": self.off}, {"minimum": self.minimum}]
        elif self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.exclusive_minimum is not None:
            schema["exclusiveMinimum"] = self.exclusive_minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        return schema


def value_key(field_name: str) -> str:
    head, *rest = field_name.split("_")
    return head + "".join(word.capitalize() for word in rest)


def setting(
    default: T,
    *,
    doc: str,
    minimum: float | None = None,
    exclusive_minimum: float | None = None,
    maximum: float = DEFAULT_MAXIMUM,
    off: float | None = None,
) -> T:
    """A settings field; its key and kind are filled in from the field by `setting_specs`.
    A float field may have an integral default (`5`): the chart's values show it as written.
    `off`: a value below `minimum` that is still valid, as the setting's "off"."""
    spec = SettingSpec("", object, default, doc, minimum, exclusive_minimum, maximum, off)
    result: T = dataclasses.field(default=default, metadata={_SPEC: spec})
    return result


def setting_specs(block: type[SettingsBlock] | SettingsBlock) -> dict[str, SettingSpec]:
    """Field name -> spec of every setting of `block`, in definition order."""
    cls = block if isinstance(block, type) else type(block)
    specs = _SPECS_BY_CLASS.get(cls)
    if specs is None:
        specs = _SPECS_BY_CLASS[cls] = {
            f.name: dataclasses.replace(
                f.metadata[_SPEC],
                key=value_key(f.name),
                kind=_KINDS[f.type if isinstance(f.type, str) else f.type.__name__],
            )
            for f in dataclasses.fields(cls)
            if _SPEC in f.metadata
        }
    return specs


@dataclass(frozen=True)
class SettingsBlock:
    """Base of the settings dataclasses: every instance is checked against its specs."""

    def __post_init__(self) -> None:
        problems = [
            problem
            for name, spec in setting_specs(self).items()
            if (problem := spec.problem(getattr(self, name))) is not None
        ]
        if not problems:
            problems = self.cross_field_problems()
        if problems:
            raise SettingsError(problems)

    def cross_field_problems(self) -> list[str]:
        """Rules between fields (a schema cannot express them); each names its key."""
        return []


def read_settings(block: type[B], document: Mapping[str, Any], *, base: B | None = None) -> B:
    """`block` from the camelCase keys of `document` it defines (other keys are left to the
    caller), over `base` or the defaults. Raises SettingsError naming every bad key."""
    specs = setting_specs(block)
    changes = {name: document[spec.key] for name, spec in specs.items() if spec.key in document}
    return dataclasses.replace(base, **changes) if base is not None else block(**changes)


@dataclass(frozen=True)
class PipelineSettings(SettingsBlock):
    """One pipeline's settings (a pipeline's keys in the chart and the scaler's configuration,
    besides its queue and worker pod)."""

    messages_per_worker: int = setting(
        2,
        minimum=1,
        doc="Backlog (ready + in-flight messages) one worker is expected to take. Larger values"
        " start fewer workers and make tasks wait longer; 2 was chosen with the simulator"
        " (docs/simulator.md).",
    )
    min_workers: int = setting(0, minimum=0, doc="Workers kept running even with an empty queue.")
    max_workers: int = setting(
        20, minimum=1, doc="Most worker Jobs of the pipeline running at once."
    )
    max_new_per_cycle: int = setting(
        10, minimum=1, doc="Most worker Jobs created in one scaling cycle."
    )
    activation_messages: int = setting(
        0, minimum=0, doc="A backlog at or below this starts no worker."
    )
    idle_timeout_seconds: float = setting(
        15,
        exclusive_minimum=0,
        doc="A worker exits after this many seconds without a message, or earlier once the"
        " queue is silent (`quietCheckSeconds`). 15 was chosen with the simulator"
        " (docs/simulator.md); check with `python -m jobtide_scaler simulate --values`.",
    )
    quiet_check_seconds: float = setting(
        5,
        minimum=STATISTICS_INTERVAL_SECONDS,
        off=0,
        doc="An idle worker reads its queue's counters from the management API this often and"
        " exits as soon as nothing was published since its previous read and nothing is"
        " ready. 0 turns it off (the idle timeout alone); otherwise at least 5, the broker's"
        " statistics interval (a shorter read finds the same counter).",
    )
    max_attempts: int = setting(
        3,
        minimum=1,
        doc="Deliveries of one message before the broker dead-letters it to `<queue>.dlq`.",
    )
    max_task_seconds: float = setting(
        3600,
        minimum=1,
        doc="Longest time one message may take; the broker's consumer timeout is set above the"
        " largest value of all pipelines.",
    )
    backoff_limit: int = setting(
        0,
        minimum=0,
        doc="`backoffLimit` of the worker Jobs (0: a crashed worker is not restarted; its"
        " message is redelivered to another worker instead).",
    )
    ttl_seconds_after_finished: int = setting(
        300, minimum=0, doc="Finished worker Jobs are deleted after this many seconds."
    )
    failed_jobs_history_limit: int = setting(
        5,
        minimum=0,
        doc="Failed worker Jobs kept for inspection; older ones are deleted by the scaler.",
    )

    def cross_field_problems(self) -> list[str]:
        problems = super().cross_field_problems()
        if self.min_workers > self.max_workers:
            problems.append(
                f"minWorkers: must not exceed maxWorkers ({self.min_workers} > {self.max_workers})"
            )
        return problems
