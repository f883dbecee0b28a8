"""Pure parts of the worker: configuration, tasks, topology data."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import pika
import pytest
from jobtide_worker import ConfigError, Task, WorkerConfig, topology
from jobtide_worker.config import BrokerConfig
from jobtide_worker.logs import INFO, WARNING, EventLog
from jobtide_worker.priority import (
    EPOCH_UNIX_SECONDS,
    MAX_PRIORITY,
    consumer_priority,
    node_booted_unix_seconds,
)
from jobtide_worker.task import (
    ACQUIRED_COUNT_HEADER,
    DELIVERY_COUNT_HEADER,
    UndecodableBody,
    attempt_of,
    count_header_of,
)

pytestmark = pytest.mark.unit

BASE = {
    "JOBTIDE_BROKER_HOST": "rabbitmq",
    "JOBTIDE_BROKER_USERNAME": "user",
    "JOBTIDE_BROKER_PASSWORD": "hunter2-secret",
    "JOBTIDE_QUEUE": "resize",
}


def test_defaults() -> None:
    config = WorkerConfig.from_env(BASE)
    assert config.queue == config.pipeline == "resize"
    assert config.handler == "handler:handle"
    assert (config.prefetch, config.max_attempts, config.max_tasks) == (1, 3, 0)
    assert config.broker.port == 5672
    assert config.broker.vhost == "/"
    assert config.log_format == "text"
    assert config.consumer_priority == "node"


def test_every_variable_is_read() -> None:
    config = WorkerConfig.from_env(
        {
            **BASE,
            "JOBTIDE_PIPELINE": "images",
            "JOBTIDE_HANDLER": "mod.sub:run",
            "JOBTIDE_IDLE_TIMEOUT_SECONDS": "7.5",
            "JOBTIDE_MAX_ATTEMPTS": "5",
            "JOBTIDE_MAX_TASK_SECONDS": "90",
            "JOBTIDE_PREFETCH": "4",
            "JOBTIDE_MAX_TASKS": "10",
            "JOBTIDE_MAX_LIFETIME_SECONDS": "600",
            "JOBTIDE_SHUTDOWN_GRACE_SECONDS": "3",
            "JOBTIDE_RECONNECT_SECONDS": "9",
            "JOBTIDE_LOG_FORMAT": "JSON",
            "JOBTIDE_DECLARE_TOPOLOGY": "false",
            "JOBTIDE_WORKER_NAME": "pod-1",
            "JOBTIDE_BROKER_PORT": "5671",
            "JOBTIDE_BROKER_VHOST": "jobs",
            "JOBTIDE_BROKER_TLS": "yes",
            "JOBTIDE_HEARTBEAT_SECONDS": "5",
            "JOBTIDE_CONSUMER_PRIORITY": "None",
        }
    )
    assert config.pipeline == "images"
    assert config.handler == "mod.sub:run"
    assert config.idle_timeout_seconds == 7.5
    assert (config.max_attempts, config.prefetch, config.max_tasks) == (5, 4, 10)
    assert (config.max_task_seconds, config.max_lifetime_seconds) == (90, 600)
    assert (config.shutdown_grace_seconds, config.reconnect_seconds) == (3, 9)
    assert config.log_format == "json"
    assert config.declare_topology is False
    assert config.worker_name == "pod-1"
    assert config.consumer_priority == "none"
    b = config.broker
    assert (b.port, b.vhost, b.tls, b.heartbeat_seconds) == (5671, "jobs", True, 5)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("JOBTIDE_PREFETCH", "0"),
        ("JOBTIDE_PREFETCH", "two"),
        ("JOBTIDE_MAX_ATTEMPTS", "0"),
        ("JOBTIDE_IDLE_TIMEOUT_SECONDS", "-1"),
        ("JOBTIDE_IDLE_TIMEOUT_SECONDS", "nan"),
        ("JOBTIDE_MAX_TASKS", "1.5"),
        ("JOBTIDE_BROKER_PORT", "70000"),
        ("JOBTIDE_BROKER_TLS", "maybe"),
        ("JOBTIDE_LOG_FORMAT", "xml"),
        ("JOBTIDE_CONSUMER_PRIORITY", "oldest"),
        ("JOBTIDE_HANDLER", "handler"),
        ("JOBTIDE_HANDLER", "handler:not-a-name"),
        ("JOBTIDE_QUEUE", ""),
        ("JOBTIDE_BROKER_HOST", " "),
    ],
)
def test_bad_values_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        WorkerConfig.from_env({**BASE, variable: value})
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"{variable}:")
    assert "hunter2-secret" not in str(caught.value)


def test_credentials_from_files_and_never_shown(tmp_path: Path) -> None:
    (tmp_path / "password").write_text("from-file-secret\n")
    env = {**BASE, "JOBTIDE_BROKER_PASSWORD_FILE": str(tmp_path / "password")}
    del env["JOBTIDE_BROKER_PASSWORD"]
    config = WorkerConfig.from_env(env)
    assert config.broker.password == (tmp_path / "password").read_text().strip()
    assert "from-file-secret" not in repr(config)
    assert "from-file-secret" not in str(config.summary())

    with pytest.raises(ConfigError) as caught:
        WorkerConfig.from_env({**env, "JOBTIDE_BROKER_PASSWORD_FILE": str(tmp_path / "none")})
    assert caught.value.variable == "JOBTIDE_BROKER_PASSWORD_FILE"

    del env["JOBTIDE_BROKER_PASSWORD_FILE"]
    with pytest.raises(ConfigError) as caught:
        WorkerConfig.from_env(env)
    assert caught.value.variable == "JOBTIDE_BROKER_PASSWORD"


def test_credentials_files_are_read_again_at_every_connection(tmp_path: Path) -> None:
    """A mounted Secret changes in place after a rotation: the next connection uses it."""
    for name, value in (("username", "first-user"), ("password", "first-secret")):
        (tmp_path / name).write_text(f"{value}\n")
    env = {
        "JOBTIDE_BROKER_HOST": "rabbitmq",
        "JOBTIDE_BROKER_USERNAME_FILE": str(tmp_path / "username"),
        "JOBTIDE_BROKER_PASSWORD_FILE": str(tmp_path / "password"),
        "JOBTIDE_QUEUE": "resize",
    }
    broker = WorkerConfig.from_env(env).broker

    def connecting_with() -> tuple[str, str]:
        credentials = broker.connection_parameters("test").credentials
        return credentials.username, credentials.password

    assert connecting_with() == ("first-user", "first-secret")
    (tmp_path / "password").write_text("rotated-secret\n")
    assert connecting_with() == ("first-user", "rotated-secret")
    # Unreadable at a connection: the value read at start stands (kubelet swaps a Secret's
    # files by renaming a symlink, so its readers never see them missing).
    (tmp_path / "password").unlink()
    assert connecting_with() == ("first-user", "first-secret")
    assert "first-secret" not in repr(broker)


def test_config_is_frozen() -> None:
    config = WorkerConfig.from_env(BASE)
    with pytest.raises(AttributeError):
        config.prefetch = 2  # type: ignore[misc]


def decode(
    body: bytes,
    content_type: str | None,
    headers: dict[str, object] | None = None,
    *,
    redelivered: bool = False,
) -> Task:
    properties = pika.BasicProperties(content_type=content_type, headers=headers, message_id="m")
    return Task.decode(body, properties, redelivered=redelivered, queue="q")


def test_task_parses_json_only_for_json_content_types() -> None:
    assert decode(b'{"a": 1}', "application/json").json == {"a": 1}
    assert decode(b'{"a": 1}', "application/json; charset=utf-8").json == {"a": 1}
    assert decode(b"[1]", "application/vnd.api+json").json == [1]
    plain = decode(b'{"a": 1}', "application/octet-stream")
    assert plain.json is None
    assert plain.body == b'{"a": 1}'
    with pytest.raises(UndecodableBody):
        decode(b'{"a": ', "application/json")
    with pytest.raises(UndecodableBody):
        decode(b"\xff\xfe", "application/json")
    # Valid JSON nested deeper than Python's stack: undecodable here, never a crash.
    with pytest.raises(UndecodableBody, match="nested too deeply"):
        decode(b"[" * 100_000 + b"]" * 100_000, "application/json")


def test_task_carries_the_properties_a_handler_needs() -> None:
    properties = pika.BasicProperties(
        content_type="application/json",
        content_encoding="gzip",
        correlation_id="c",
        reply_to="r",
        message_id="m",
        timestamp=1_700_000_000,
        type="t",
        app_id="a",
        headers={"h": 1},
    )
    task = Task.decode(b"{}", properties, redelivered=False, queue="q")
    assert (task.content_type, task.content_encoding) == ("application/json", "gzip")
    assert (task.correlation_id, task.reply_to, task.message_id) == ("c", "r", "m")
    assert (task.timestamp, task.type, task.app_id) == (1_700_000_000, "t", "a")
    assert task.headers == {"h": 1}


@pytest.mark.parametrize(
    ("headers", "redelivered", "attempt"),
    [
        ({}, False, 1),
        # A first delivery: any count in it came from the publisher.
        ({"x-delivery-count": 100, "x-acquired-count": 100}, False, 1),
        # RabbitMQ 4.3: two nacks and one lost channel, and a nack after a lost channel.
        ({"x-acquired-count": 3, "x-delivery-count": 1}, True, 4),
        ({"x-acquired-count": 2}, True, 3),
        # The broker wrote x-acquired-count; an x-delivery-count it left is the publisher's.
        ({"x-acquired-count": 1, "x-delivery-count": 100}, True, 2),
        # A redelivery the broker did not count: at least the second.
        ({}, True, 2),
        ({"x-acquired-count": "junk"}, True, 2),
        ({"x-acquired-count": -4}, True, 2),
    ],
)
def test_attempt_counts_earlier_deliveries_from_the_brokers_counts_only(
    headers: dict[str, object], redelivered: bool, attempt: int
) -> None:
    assert attempt_of(headers, redelivered=redelivered) == attempt
    assert decode(b"", None, headers, redelivered=redelivered).attempt == attempt


def test_before_rabbitmq_4_3_the_count_is_x_delivery_count_and_x_acquired_count_is_forged() -> None:
    assert count_header_of(b"4.0.5") == count_header_of("4.2.1") == DELIVERY_COUNT_HEADER
    assert count_header_of(b"4.3.6") == count_header_of("5.0.0") == ACQUIRED_COUNT_HEADER
    assert count_header_of(None) == count_header_of(b"unknown") == ACQUIRED_COUNT_HEADER
    forged = {"x-acquired-count": 100, "x-delivery-count": 2}
    assert attempt_of(forged, redelivered=True, count_header=DELIVERY_COUNT_HEADER) == 3


def test_topology_definitions_follow_the_contract() -> None:
    defs = topology.definitions([("resize", 3, 600), ("a.b", 5, 1.5)], vhost="jobs")
    queues = {q["name"]: q for q in defs["queues"]}
    assert set(queues) == {"resize", "resize.dlq", "a.b", "a.b.dlq"}
    assert queues["resize"]["arguments"] == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "jobtide.dlx",
        "x-dead-letter-routing-key": "resize",
    }
    assert queues["resize.dlq"]["arguments"] == {"x-queue-type": "quorum"}
    assert all(q["durable"] and q["vhost"] == "jobs" for q in defs["queues"])
    [exchange] = defs["exchanges"]
    assert (exchange["name"], exchange["type"], exchange["durable"]) == (
        "jobtide.dlx",
        "direct",
        True,
    )
    assert {(b["destination"], b["routing_key"]) for b in defs["bindings"]} == {
        ("resize.dlq", "resize"),
        ("a.b.dlq", "a.b"),
    }
    policies = {p["name"]: p for p in defs["policies"]}
    assert policies["jobtide-resize"]["definition"] == {
        "delivery-limit": 3,
        "consumer-timeout": (600 + 60) * 1000,
    }
    assert policies["jobtide-a.b"]["definition"]["consumer-timeout"] == 61_500
    assert policies["jobtide-resize"]["pattern"] == "^resize$"
    assert policies["jobtide-a.b"]["pattern"] == r"^a\.b$"
    assert policies["jobtide-a.b"]["apply-to"] == "queues"


def test_consumer_timeouts_cover_the_longest_task() -> None:
    assert topology.consumer_timeout_ms(3600) == (3600 + 60) * 1000
    assert topology.broker_consumer_timeout_ms([60, 7200, 10]) == (7200 + 60) * 1000
    # Never below RabbitMQ's own default of 30 minutes.
    assert topology.broker_consumer_timeout_ms([10]) == 1_800_000
    assert topology.broker_consumer_timeout_ms([]) == 1_800_000


def test_text_log_lines_quote_only_values_that_would_break_key_value_parsing() -> None:
    stream = io.StringIO()
    fields = {
        "plain": "bench-1234",
        "number": 3,
        "empty": "",
        "space": "a b",
        "tab": "a\tb",
        "nbsp": "a\u00a0b",
        "quote": 'say "hi"',
        "equals": "k=v",
    }
    EventLog("text", stream).event(INFO, "task", **fields)
    expected = (
        'plain=bench-1234 number=3 empty="" space="a b" tab="a\\tb" nbsp="a\\u00a0b" '
        'quote="say \\"hi\\"" equals="k=v"'
    )
    line = stream.getvalue()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO task (.*)\n", line)
    assert line.endswith(" INFO task " + expected + "\n")


def test_json_log_lines_are_one_object_each_with_time_level_message_and_fields() -> None:
    stream = io.StringIO()
    log = EventLog("json", stream)
    log.event(WARNING, "task", outcome="retry", attempt=2, error=ValueError("bad\nvalue"))
    log.event(INFO, "worker exiting", reason="idle")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first.pop("time"))
    assert first == {
        "level": "warning",
        "message": "task",
        "outcome": "retry",
        "attempt": 2,
        "error": "bad\nvalue",
    }
    assert json.loads(lines[1])["message"] == "worker exiting"


def test_deferred_lines_wait_for_a_flush_and_come_before_later_lines() -> None:
    stream = io.StringIO()
    log = EventLog("text", stream)
    log.defer(INFO, "task", n=1)
    log.defer(INFO, "task", n=2)
    assert stream.getvalue() == ""
    log.event(WARNING, "connection lost")
    log.defer(INFO, "task", n=3)
    log.flush()
    log.flush()  # nothing deferred: writes nothing
    lines = [line.split(" ", 2)[2] for line in stream.getvalue().splitlines()]
    assert lines == ["INFO task n=1", "INFO task n=2", "WARNING connection lost", "INFO task n=3"]


def test_unknown_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="xml"):
        EventLog("xml")


def test_an_older_worker_has_a_higher_consumer_priority() -> None:
    now = 1_796_000_000.0  # in 2026
    assert consumer_priority("age", now - 1) > consumer_priority("age", now)  # type: ignore[operator]
    # One step per second: workers started within the same second round-robin.
    assert consumer_priority("age", now + 0.1) == consumer_priority("age", now + 0.9)
    assert consumer_priority("age", now + 1) == consumer_priority("age", now) - 1  # type: ignore[operator]
    assert consumer_priority("none", now) is None


def test_the_workers_of_an_older_node_have_a_higher_consumer_priority() -> None:
    booted = 1_796_000_000.0
    # The node decides, whatever the workers' own ages; one node's workers share a priority.
    assert consumer_priority("node", booted + 500, booted) == consumer_priority(
        "node", booted + 9, booted + 0.5
    )
    assert consumer_priority("node", booted + 9, booted) > consumer_priority(  # type: ignore[operator]
        "node", booted + 8, booted + 1
    )
    assert consumer_priority("node", booted, booted) == consumer_priority("age", booted)
    # The node's boot time unknown: the worker's own start decides, as with `age`.
    assert consumer_priority("node", booted + 9, None) == consumer_priority("age", booted + 9)


@pytest.mark.parametrize(
    ("text", "booted"),
    [
        ("cpu  1 2 3\nctxt 99\nbtime 1796206964\nprocesses 7\n", 1_796_206_964.0),
        ("cpu  1 2 3\nprocesses 7\n", None),
        ("btime soon\n", None),
    ],
)
def test_the_nodes_boot_time_comes_from_the_kernels_statistics(
    tmp_path: Path, text: str, booted: float | None
) -> None:
    statistics = tmp_path / "stat"
    statistics.write_text(text)
    assert node_booted_unix_seconds(statistics) == booted
    assert node_booted_unix_seconds(tmp_path / "missing") is None


def test_this_kernel_has_a_boot_time_before_now() -> None:
    booted = node_booted_unix_seconds()
    assert booted is not None
    assert EPOCH_UNIX_SECONDS < booted <= time.time()


@pytest.mark.parametrize(
    ("started", "priority"),
    [
        (EPOCH_UNIX_SECONDS, MAX_PRIORITY),
        (EPOCH_UNIX_SECONDS - 10, MAX_PRIORITY),  # a clock set before the epoch
        (EPOCH_UNIX_SECONDS + MAX_PRIORITY, 0),  # in 2088
        (EPOCH_UNIX_SECONDS + MAX_PRIORITY + 10, 0),
    ],
)
def test_consumer_priorities_stay_within_a_signed_32_bit_non_negative_range(
    started: float, priority: int
) -> None:
    assert consumer_priority("age", started) == priority


def test_unknown_consumer_priority_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="oldest"):
        consumer_priority("oldest", 0)


def test_quorum_group_size_comes_from_the_environment_and_reaches_every_queue() -> None:
    base = {
        "JOBTIDE_BROKER_HOST": "rabbitmq",
        "JOBTIDE_BROKER_USERNAME": "u",
        "JOBTIDE_BROKER_PASSWORD": "p",
    }
    assert BrokerConfig.from_env(base).quorum_group_size == 0
    clustered = BrokerConfig.from_env({**base, "JOBTIDE_QUORUM_INITIAL_GROUP_SIZE": "3"})
    assert clustered.quorum_group_size == 3
    with pytest.raises(ConfigError) as bad:
        BrokerConfig.from_env({**base, "JOBTIDE_QUORUM_INITIAL_GROUP_SIZE": "three"})
    assert bad.value.variable == "JOBTIDE_QUORUM_INITIAL_GROUP_SIZE"
    assert topology.queue_arguments("q", 3)[topology.GROUP_SIZE_ARGUMENT] == 3
    assert topology.dead_letter_queue_arguments(3)[topology.GROUP_SIZE_ARGUMENT] == 3
    assert topology.GROUP_SIZE_ARGUMENT not in topology.queue_arguments("q")
    queues = topology.definitions([("q", 3, 60.0)], group_size=5)["queues"]
    assert [q["arguments"][topology.GROUP_SIZE_ARGUMENT] for q in queues] == [5, 5]
