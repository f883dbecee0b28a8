"""Leaving when the queue is silent, its pure parts: the decision from two reads (the one the
simulator runs too), the management API's answer read into counters, and the setting's
bounds (0 turns the reads off, else at least the broker's statistics interval)."""

from __future__ import annotations

from typing import Any

import pytest
from jobtide_worker import ConfigError, WorkerConfig
from jobtide_worker.management import published_count
from jobtide_worker.pipeline_settings import (
    STATISTICS_INTERVAL_SECONDS,
    PipelineSettings,
    SettingsError,
    setting_specs,
)
from jobtide_worker.quiet import OddAnswer, QueueCounters, counters_from_answer, queue_silent
from test_worker_units import BASE

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("previous", "current", "silent"),
    [
        (QueueCounters(published=7, ready=0), QueueCounters(published=7, ready=0), True),
        # Something was published between the two reads: the queue is still fed.
        (QueueCounters(published=7, ready=0), QueueCounters(published=8, ready=0), False),
        # Nothing published, but messages wait (requeued, or no worker free for them).
        (QueueCounters(published=7, ready=0), QueueCounters(published=7, ready=2), False),
        # The first read of an idle spell has nothing to compare with.
        (None, QueueCounters(published=7, ready=0), False),
        # The counter went back (the broker restarted, the queue was declared again): not
        # "unchanged", so no decision on it.
        (QueueCounters(published=7, ready=0), QueueCounters(published=0, ready=0), False),
        # The statistics were refreshed between the two reads (the queue's reductions grew).
        (QueueCounters(7, 0, reductions=100), QueueCounters(7, 0, reductions=130), True),
        # They were not (the same reductions): the same publish counter says nothing yet.
        (QueueCounters(7, 0, reductions=100), QueueCounters(7, 0, reductions=100), False),
        (QueueCounters(7, 0, reductions=100), QueueCounters(8, 0, reductions=100), False),
    ],
)
def test_the_queue_is_silent_when_nothing_was_published_and_nothing_is_ready(
    previous: QueueCounters | None, current: QueueCounters, silent: bool
) -> None:
    assert queue_silent(previous, current) is silent


def test_the_management_apis_answer_read_into_counters() -> None:
    answer = {"message_stats": {"publish": 12}, "messages_ready": 3}
    assert counters_from_answer(answer) == QueueCounters(published=12, ready=3)
    answer["reductions"] = 18364
    assert counters_from_answer(answer) == QueueCounters(12, 3, reductions=18364)
    with pytest.raises(OddAnswer, match="reductions"):
        counters_from_answer({**answer, "reductions": "many"})


def test_a_restarted_broker_with_nothing_published_since_has_a_silent_queue() -> None:
    # RabbitMQ's answer once it restarted and nothing was published since (the empty set of
    # statistics, encoded as a list): 0 published, so two such reads with nothing ready are a
    # silent queue (it once was an odd answer, and idle workers waited for their timeout).
    answer = {"message_stats": [], "messages_ready": 0}
    read = counters_from_answer(answer)
    assert read == QueueCounters(published=0, ready=0)
    assert queue_silent(read, counters_from_answer(answer))


@pytest.mark.parametrize(
    ("message_stats", "published"),
    [
        ({"publish": 12}, 12),
        ({"publish": 0}, 0),
        ([], 0),  # statistics kept, nothing published since they began (a restart)
        (None, None),  # no statistics kept
        ({}, None),
        ({"deliver_get": 3}, None),
    ],
)
def test_the_publish_counter_as_the_scaler_and_the_worker_read_it(
    message_stats: Any, published: int | None
) -> None:
    assert published_count(message_stats) == published


@pytest.mark.parametrize(
    "message_stats", [[1], {"publish": -1}, {"publish": "12"}, {"publish": True}, "[]", 0]
)
def test_a_publish_counter_that_is_not_a_count_is_an_odd_answer(message_stats: Any) -> None:
    with pytest.raises(OddAnswer, match=r"^message_stats\.publish is "):
        published_count(message_stats)


@pytest.mark.parametrize(
    ("answer", "named"),
    [
        ([], "expected a queue object"),
        ({"messages_ready": 0}, "message_stats"),
        ({"messages_ready": 0, "message_stats": {}}, "message_stats"),
        ({"messages_ready": 0, "message_stats": None}, "message_stats"),
        ({"messages_ready": 0, "message_stats": {"publish": -1}}, "publish"),
        ({"messages_ready": 0, "message_stats": {"publish": True}}, "publish"),
        ({"messages_ready": 0, "message_stats": {"publish": 1.5}}, "publish"),
        ({"message_stats": {"publish": 1}}, "messages_ready"),
        ({"messages_ready": "0", "message_stats": {"publish": 1}}, "messages_ready"),
    ],
)
def test_an_odd_answer_is_refused_naming_what_is_wrong(answer: Any, named: str) -> None:
    with pytest.raises(OddAnswer, match=named):
        counters_from_answer(answer)


def test_the_defaults_read_every_statistics_interval_with_a_longer_idle_timeout() -> None:
    settings = PipelineSettings()
    assert settings.quiet_check_seconds == STATISTICS_INTERVAL_SECONDS == 5
    assert settings.idle_timeout_seconds == 15
    config = WorkerConfig.from_env(BASE)
    assert config.quiet_check_seconds == 5
    assert config.idle_timeout_seconds == 15


@pytest.mark.parametrize(("value", "read"), [("0", 0.0), ("5", 5.0), ("7.5", 7.5)])
def test_quiet_check_is_off_at_0_or_at_least_the_statistics_interval(
    value: str, read: float
) -> None:
    config = WorkerConfig.from_env({**BASE, "JOBTIDE_QUIET_CHECK_SECONDS": value})
    assert config.quiet_check_seconds == read
    assert PipelineSettings(quiet_check_seconds=read).quiet_check_seconds == read


@pytest.mark.parametrize("value", ["4.9", "1", "-5", "nan", "soon"])
def test_a_quiet_check_below_the_statistics_interval_names_the_variable(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        WorkerConfig.from_env({**BASE, "JOBTIDE_QUIET_CHECK_SECONDS": value})
    assert caught.value.variable == "JOBTIDE_QUIET_CHECK_SECONDS"
    assert str(caught.value).startswith("JOBTIDE_QUIET_CHECK_SECONDS:")


def test_the_settings_and_their_schema_refuse_a_read_faster_than_the_statistics() -> None:
    with pytest.raises(SettingsError, match=r"^quietCheckSeconds: must be 0 \(off\) or at least 5"):
        PipelineSettings(quiet_check_seconds=2.5)
    schema = setting_specs(PipelineSettings)["quiet_check_seconds"].json_schema()
    assert schema["anyOf"] == [{"const": 0}, {"minimum": 5}]
    assert "minimum" not in schema
