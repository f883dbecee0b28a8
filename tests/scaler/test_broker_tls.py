"""The scaler over TLS against a real RabbitMQ node: queue counts read over AMQPS and the
management API over HTTPS, both verified with the same CA bundle and name; a TLS problem
(an untrusted CA, a certificate for another name, a plain port) is logged naming it, counted
as the error kind `broker_tls`, and keeps the scaler not ready."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from jobtide_scaler.broker import Broker
from jobtide_testbed.kube import KubeCluster
from jobtide_testbed.process import port_open, wait_for
from jobtide_testbed.rabbitmq import TLS_HOST, RabbitMQ, broker_tls
from jobtide_worker import topology
from jobtide_worker.config import BrokerConfig
from scaler_bed import ScalerBed, make_bed, pipeline

pytestmark = pytest.mark.integration


def publish(config: BrokerConfig, queue: str, count: int) -> None:
    connection = config.connect("test-publisher")
    try:
        channel = connection.channel()
        topology.declare(channel, queue)
        channel.confirm_delivery()
        for i in range(count):
            channel.basic_publish("", queue, f"task {i}".encode())
    finally:
        connection.close()


@pytest.mark.broker_compat
def test_counts_come_over_amqps_and_https_from_a_node_without_plain_listeners(
    rabbitmq_factory: Callable[..., RabbitMQ], tmp_path: Path
) -> None:
    node = rabbitmq_factory(name="tls-only", tls=broker_tls(tmp_path / "pki", plain=False))
    assert not port_open(node.amqp_port)
    assert not port_open(node.management_port)
    assert "HTTP (non-TLS) listener" not in node.log_path.read_text()
    config = BrokerConfig.from_env(node.tls_client_env())
    queue = f"tls-{uuid.uuid4().hex[:8]}"
    publish(config, queue, 3)
    errors: list[str] = []
    broker = Broker(config, on_error=errors.append)
    try:
        # `published` is the management API's alone: it answered over HTTPS.
        wait_for(
            lambda: (
                (r := broker.read([queue]).get(queue)) is not None
                and (r.ready, r.published) == (3, 3)
            ),
            timeout=30,
            what="3 ready and 3 published",
        )
        assert broker.tls_problem is None
        assert errors == []
        [connection] = [
            c
            for c in node.connections()
            if c.get("client_properties", {}).get("connection_name") == "jobtide-scaler"
        ]
        assert connection["ssl"] is True
    finally:
        broker.close()


TLS_CASES = ["untrusted-ca", "wrong-name", "plain-port"]


def tls_case(case: str, node: RabbitMQ, untrusted_ca: Path) -> tuple[dict[str, str], list[str]]:
    """The scaler's environment for `case`, and what its problems must say (AMQP's, then
    the management API's)."""
    env = node.tls_client_env()
    if case == "untrusted-ca":
        env["JOBTIDE_BROKER_CA_FILE"] = str(untrusted_ca)
        return env, [f"is not signed by a CA in the CA bundle {untrusted_ca}"] * 2
    if case == "wrong-name":
        # The certificate is for TLS_HOST only: the address it resolves to is another name.
        env["JOBTIDE_BROKER_HOST"] = "127.0.0.1"
        return env, ["is not valid for the name '127.0.0.1'"] * 2
    env["JOBTIDE_BROKER_PORT"] = str(node.amqp_port)
    env["JOBTIDE_BROKER_MANAGEMENT_PORT"] = str(node.management_port)
    return env, [
        f"{TLS_HOST}:{node.amqp_port} does not speak TLS",
        f"{TLS_HOST}:{node.management_port} does not speak TLS",
    ]


@pytest.mark.parametrize("case", TLS_CASES)
def test_a_tls_problem_is_named_and_counted_and_no_count_is_read(
    case: str, rabbitmq_tls: RabbitMQ, untrusted_ca: Path
) -> None:
    env, expected = tls_case(case, rabbitmq_tls, untrusted_ca)
    queue = f"tls-{uuid.uuid4().hex[:8]}"
    publish(BrokerConfig.from_env(rabbitmq_tls.tls_client_env()), queue, 1)
    errors: list[str] = []
    broker = Broker(BrokerConfig.from_env(env), on_error=errors.append)
    try:
        assert broker.read([queue]) == {}
        assert errors.count("broker_tls") == 2  # AMQP and the management API each
        assert broker.tls_problem is not None
        assert expected[0] in broker.tls_problem
        assert expected[1] in (broker._tls_problems["management"] or "")
    finally:
        broker.close()


@pytest.fixture
def tls_bed(
    kube: KubeCluster, namespace: str, rabbitmq_tls: RabbitMQ, tmp_path: Path
) -> Iterator[ScalerBed]:
    """The scaler as a process, reaching the broker over TLS only."""
    bed = make_bed(kube, namespace, rabbitmq_tls, tmp_path)
    bed.broker_env = rabbitmq_tls.tls_client_env()
    try:
        yield bed
    finally:
        bed.stop_all()


def readyz(port: int) -> int:
    return requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code


def test_the_scaler_creates_jobs_from_counts_read_over_tls(tls_bed: ScalerBed) -> None:
    queue = f"{tls_bed.namespace}-tls"
    tls_bed.publish(queue, 2)  # over plain AMQP: the scaler alone is under test
    scaler = tls_bed.start(tls_bed.config({"tls": pipeline(queue)}))
    tls_bed.wait_jobs(2, "tls")
    wait_for(lambda: readyz(scaler.metrics_port) == 200, timeout=30, what="ready")
    assert scaler.metric("jobtide_errors_total", kind="broker_tls") == 0
    assert scaler.metric("jobtide_queue_messages_ready", pipeline="tls") == 2


@pytest.mark.parametrize("case", TLS_CASES)
def test_a_tls_problem_keeps_the_scaler_not_ready_and_names_it(
    case: str, tls_bed: ScalerBed, untrusted_ca: Path
) -> None:
    env, expected = tls_case(case, tls_bed.broker, untrusted_ca)
    tls_bed.broker_env = env
    queue = f"{tls_bed.namespace}-tls"
    tls_bed.publish(queue, 2)
    scaler = tls_bed.start(tls_bed.config({"tls": pipeline(queue)}))
    scaler.wait_cycles("tls", 4)
    assert readyz(scaler.metrics_port) == 503
    assert scaler.metric("jobtide_errors_total", kind="broker_tls") >= 4
    assert scaler.metric("jobtide_decisions_total", pipeline="tls", result="stale") >= 4
    assert tls_bed.jobs("tls") == []
    log = scaler.log()
    amqp, management = expected
    assert "broker amqp: TLS failed: " in log
    assert amqp in log.split("broker amqp: TLS failed: ", 1)[1].splitlines()[0]
    assert management in log.split("broker management: TLS failed: ", 1)[1].splitlines()[0]
    # Logged once per problem, not once per cycle.
    assert log.count("broker amqp: TLS failed") == 1
    assert tls_bed.broker.password not in log
