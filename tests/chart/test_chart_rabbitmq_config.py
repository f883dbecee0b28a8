"""The chart's broker configuration works on a real RabbitMQ: the init script builds valid
definitions from any password, and a node started on the rendered files has the user, the
queues, the dead-letter route, the policies and the consumer timeout, in agreement with what
the worker declares (jobtide_worker.topology)."""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from brokerlib import ChartBroker, run_render_config, secret_values
from chartlib import EXAMPLE_VALUES, render, scaler_config
from jobtide_testbed.process import wait_for
from jobtide_testbed.rabbitmq import BrokerRelease
from jobtide_worker import topology


@pytest.mark.unit
def test_render_config_adds_any_password_as_valid_json(tmp_path: Path) -> None:
    docs = render(set_values=["pipelines.resize.queue=resize"])
    password = 'pa"ss\\wo%srd $HOME `id`'  # noqa: S105 - quoting torture, not a secret
    credentials = {"username": "jobtide", "password": password + "\n", "erlang-cookie": "C" * 20}
    out = run_render_config(docs, credentials, tmp_path)
    definitions = json.loads((out / "definitions.json").read_text())
    assert definitions["users"] == [{"name": "jobtide", "password": password, "tags": "management"}]
    assert definitions["permissions"] == [
        {"user": "jobtide", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
    ]
    assert [q["name"] for q in definitions["queues"]] == ["resize", "resize.dlq"]
    assert stat.S_IMODE((out / "definitions.json").stat().st_mode) == 0o600
    cookie = tmp_path / "home" / ".erlang.cookie"
    assert cookie.read_text() == "C" * 20
    assert stat.S_IMODE(cookie.stat().st_mode) == 0o400
    assert (out / "rabbitmq.conf").exists()
    assert (out / "enabled_plugins").read_text() == "[rabbitmq_management,rabbitmq_prometheus].\n"


@pytest.fixture(scope="module")
def chart_broker(
    tmp_path_factory: pytest.TempPathFactory, broker_release: BrokerRelease
) -> Iterator[tuple[ChartBroker, dict[str, Any]]]:
    docs = render([EXAMPLE_VALUES])
    credentials = secret_values(docs)
    root = tmp_path_factory.mktemp("chart-broker")
    rendered = run_render_config(docs, credentials, root / "pod")
    broker = ChartBroker(root / "node", rendered, credentials, broker_release)
    try:
        broker.start()
        yield broker, scaler_config(docs)
    finally:
        broker.close()


@pytest.mark.integration
@pytest.mark.broker_compat
def test_rendered_definitions_load_into_rabbitmq(
    chart_broker: tuple[ChartBroker, dict[str, Any]],
) -> None:
    broker, config = chart_broker
    # The chart's user (from the generated Secret) logs in to the management API...
    whoami = broker.api("GET", "whoami")
    assert whoami.status_code == 200, whoami.text
    assert whoami.json()["name"] == "jobtide"
    queues = {q["name"]: q for q in broker.api("GET", "queues/%2F").json()}
    assert set(queues) == {"resize-images", "resize-images.dlq", "train-models", "train-models.dlq"}
    for name in ("resize-images", "train-models"):
        assert queues[name]["type"] == "quorum"
        assert queues[name]["arguments"] == topology.queue_arguments(name)
        assert queues[f"{name}.dlq"]["type"] == "quorum"
    listed = broker.ctl("list_queues", "-q", "--formatter", "json", "name", "policy")
    applied = {q["name"]: q["policy"] for q in json.loads(listed.stdout)}
    assert applied["resize-images"] == topology.policy_name("resize-images")
    assert applied["train-models"] == topology.policy_name("train-models")
    policies = {p["name"]: p for p in broker.api("GET", "policies/%2F").json()}
    assert set(policies) == {"jobtide-resize-images", "jobtide-train-models"}
    for name in ("resize-images", "train-models"):
        pipeline = config["pipelines"][name]
        expected = {
            "delivery-limit": pipeline["maxAttempts"],
            "consumer-timeout": topology.consumer_timeout_ms(pipeline["maxTaskSeconds"]),
        }
        assert policies[topology.policy_name(name)]["definition"] == expected
        # What the broker applies to the queue, not only what it stored (its statistics, which
        # report it, lag by the stats interval).

        def applied_to_queue(queue: str = name, policy: dict[str, Any] = expected) -> bool:
            found = broker.api("GET", f"queues/%2F/{queue}").json()
            return bool(found.get("effective_policy_definition") == policy)

        wait_for(applied_to_queue, timeout=30, what=f"policy {expected} applied to {name}")
    bindings = broker.api("GET", "exchanges/%2F/jobtide.dlx/bindings/source").json()
    assert sorted((b["routing_key"], b["destination"]) for b in bindings) == [
        ("resize-images", "resize-images.dlq"),
        ("train-models", "train-models.dlq"),
    ]
    timeout = broker.ctl("eval", "application:get_env(rabbit, consumer_timeout).")
    assert timeout.stdout.strip() == f"{{ok,{topology.broker_consumer_timeout_ms([120, 14400])}}}"


@pytest.mark.integration
@pytest.mark.broker_compat
def test_worker_declarations_agree_with_the_chart(
    chart_broker: tuple[ChartBroker, dict[str, Any]],
) -> None:
    broker, _ = chart_broker
    parameters = pika.URLParameters(broker.amqp_url)
    with pika.BlockingConnection(parameters) as connection:
        channel = connection.channel()
        # A mismatch in any argument closes the channel with PRECONDITION_FAILED.
        for queue in ("resize-images", "train-models"):
            topology.declare(channel, queue)
        assert channel.is_open
    # Nothing the chart configures or the worker declares is deprecated in this release
    # (RabbitMQ 4 records each use of a deprecated feature, e.g. transient queues, and logs a
    # warning naming it). One is known and kept: the management plugin's metrics collection,
    # which the scaler's queue counts still come from (RabbitMQ 4 still permits it by default).
    used = broker.ctl("eval", "maps:keys(rabbit_deprecated_features:list(used)).")
    assert set(re.findall(r"\w+", used.stdout)) <= {"management_metrics_collection"}
    warned = re.findall(r"deprecated features: `(\w+)`", broker.log_path.read_text())
    assert set(warned) <= {"management_metrics_collection"}
