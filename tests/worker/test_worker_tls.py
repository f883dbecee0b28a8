"""TLS to the broker: the worker and the publisher against a real RabbitMQ node's AMQPS
listener (a certificate for TLS_HOST from a test CA), and the configuration they read.

A TLS problem that no retry can mend (a CA that did not sign the certificate, a certificate
for another name, a port that speaks plain AMQP) stops the worker at once with exit code 2
and a message naming it, never "broker unreachable" after the reconnect budget, and never a
connection in plain text instead."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from jobtide_testbed.process import wait_for
from jobtide_testbed.rabbitmq import TLS_HOST, BrokerTls, RabbitMQ, wait_counts
from jobtide_worker import BrokerConfig, ConfigError, WorkerConfig
from workerbed import WorkerBed

BASE = {
    "JOBTIDE_BROKER_HOST": "rabbitmq.example.com",
    "JOBTIDE_BROKER_USERNAME": "user",
    "JOBTIDE_BROKER_PASSWORD": "hunter2-secret",
    "JOBTIDE_QUEUE": "resize",
}
EXIT_CONFIG = 2


# -- configuration ----------------------------------------------------------------------


@pytest.mark.unit
def test_tls_variables_are_read(broker_pki: BrokerTls) -> None:
    broker_pki_ca = broker_pki.ca
    config = WorkerConfig.from_env(
        {
            **BASE,
            "JOBTIDE_BROKER_TLS": "true",
            "JOBTIDE_BROKER_CA_FILE": str(broker_pki_ca),
            "JOBTIDE_BROKER_SERVER_NAME": "broker.internal",
        }
    )
    broker = config.broker
    assert (broker.tls, broker.ca_file, broker.server_name) == (
        True,
        str(broker_pki_ca),
        "broker.internal",
    )
    assert broker.tls_name == "broker.internal"
    assert broker.management_url == "https://rabbitmq.example.com:15672"
    assert config.summary()["tls_ca_file"] == str(broker_pki_ca)
    assert config.summary()["tls_server_name"] == "broker.internal"


@pytest.mark.unit
def test_tls_always_verifies_the_certificate_and_the_name(broker_pki: BrokerTls) -> None:
    broker_pki_ca = broker_pki.ca
    for env, name in (
        ({}, "rabbitmq.example.com"),
        ({"JOBTIDE_BROKER_SERVER_NAME": "broker.internal"}, "broker.internal"),
    ):
        broker = BrokerConfig.from_env(
            {
                **BASE,
                "JOBTIDE_BROKER_TLS": "on",
                "JOBTIDE_BROKER_CA_FILE": str(broker_pki_ca),
                **env,
            }
        )
        options = broker.connection_parameters("test").ssl_options
        assert options.server_hostname == name
        assert options.context.verify_mode == ssl.CERT_REQUIRED
        assert options.context.check_hostname is True
        assert options.context.minimum_version >= ssl.TLSVersion.TLSv1_2
        # The CA bundle given is the only trust: not the system's as well.
        assert [c["subject"] for c in options.context.get_ca_certs()] == [
            ((("commonName", "jobtide-testbed-ca"),),)
        ]
    plain = BrokerConfig.from_env(BASE)
    assert plain.connection_parameters("test").ssl_options is None


@pytest.mark.unit
@pytest.mark.parametrize(
    ("env", "variable", "problem"),
    [
        ({"JOBTIDE_BROKER_CA_FILE": "/no/such/ca.crt"}, "JOBTIDE_BROKER_CA_FILE", "not true"),
        ({"JOBTIDE_BROKER_SERVER_NAME": "broker"}, "JOBTIDE_BROKER_SERVER_NAME", "not true"),
        (
            {"JOBTIDE_BROKER_TLS": "true", "JOBTIDE_BROKER_CA_FILE": "/no/such/ca.crt"},
            "JOBTIDE_BROKER_CA_FILE",
            "/no/such/ca.crt does not exist",
        ),
        (
            {"JOBTIDE_BROKER_TLS": "true", "JOBTIDE_BROKER_SERVER_NAME": "https://broker"},
            "JOBTIDE_BROKER_SERVER_NAME",
            "expected a host name",
        ),
    ],
)
def test_bad_tls_variables_name_the_variable(
    env: dict[str, str], variable: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        WorkerConfig.from_env({**BASE, **env})
    assert caught.value.variable == variable
    assert problem in str(caught.value)


@pytest.mark.unit
def test_a_ca_file_without_a_certificate_is_refused(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.crt"
    not_pem.write_text("this is not a certificate\n")
    with pytest.raises(ConfigError) as caught:
        BrokerConfig.from_env(
            {**BASE, "JOBTIDE_BROKER_TLS": "true", "JOBTIDE_BROKER_CA_FILE": str(not_pem)}
        )
    assert caught.value.variable == "JOBTIDE_BROKER_CA_FILE"
    assert f"{not_pem} holds no PEM CA certificate" in str(caught.value)


@pytest.mark.unit
def test_only_tls_failures_stop_the_retries() -> None:
    """A refused or cut connection is an outage to wait out, not a TLS problem."""
    broker = BrokerConfig(host="broker", tls=True)
    for error in (ConnectionRefusedError(111, "refused"), TimeoutError(), ssl.SSLEOFError()):
        assert broker.tls_problem(error) is None
    assert BrokerConfig(host="broker").tls_problem(ssl.SSLError(1, "any")) is None


# -- a real broker ----------------------------------------------------------------------


def tls_bed(rabbitmq_tls: RabbitMQ, tmp_path: Path) -> WorkerBed:
    return WorkerBed(rabbitmq_tls, tmp_path)


def publish_cli(bed: WorkerBed, env: dict[str, str], *ids: int) -> subprocess.CompletedProcess[str]:
    lines = "".join(json.dumps({"id": i}) + "\n" for i in ids)
    return subprocess.run(
        [sys.executable, "-m", "jobtide_worker", "publish", "--queue", bed.queue],
        input=lines,
        text=True,
        capture_output=True,
        env=bed.env(**env),
        timeout=60,
        check=False,
    )


@pytest.mark.integration
def test_publisher_and_worker_do_tasks_over_amqps(rabbitmq_tls: RabbitMQ, tmp_path: Path) -> None:
    bed = tls_bed(rabbitmq_tls, tmp_path)
    try:
        tls = rabbitmq_tls.tls_client_env()
        published = publish_cli(bed, tls, 0, 1, 2)
        assert published.returncode == 0, published.stderr
        wait_counts(bed.broker, bed.queue, ready=3)

        name = f"tls-{uuid.uuid4().hex[:8]}"
        # Kept connected after the tasks, so the broker can be asked about its connection.
        worker = bed.start_worker(
            **tls, JOBTIDE_WORKER_NAME=name, JOBTIDE_IDLE_TIMEOUT_SECONDS="120"
        )
        bed.wait_record("done", count=3)
        connections: list[dict[str, object]] = []

        def listed() -> bool:
            connections[:] = [
                c
                for c in rabbitmq_tls.connections()
                if c.get("client_properties", {}).get("connection_name") == f"jobtide-worker {name}"
            ]
            return bool(connections)

        wait_for(listed, timeout=30, what="the worker's connection")
        [connection] = connections
        assert connection["ssl"] is True
        assert connection["port"] == rabbitmq_tls.amqps_port
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
        assert sorted(r["id"] for r in bed.records("done")) == [0, 1, 2]
        wait_counts(bed.broker, bed.queue, ready=0, unacked=0)
        assert "tls=True" in worker.log()
    finally:
        bed.close()


@pytest.mark.integration
def test_a_server_name_lets_the_worker_connect_by_address(
    rabbitmq_tls: RabbitMQ, tmp_path: Path
) -> None:
    bed = tls_bed(rabbitmq_tls, tmp_path)
    try:
        bed.publish({"id": 1})
        env = rabbitmq_tls.tls_client_env()
        env.update(JOBTIDE_BROKER_HOST="127.0.0.1", JOBTIDE_BROKER_SERVER_NAME=TLS_HOST)
        worker = bed.start_worker(**env)
        assert worker.wait(60) == 0, worker.log()
        assert [r["id"] for r in bed.records("done")] == [1]
    finally:
        bed.close()


@pytest.mark.integration
@pytest.mark.parametrize("case", ["untrusted-ca", "wrong-name", "plain-port"])
def test_a_tls_problem_exits_2_at_once_naming_it(
    case: str, rabbitmq_tls: RabbitMQ, untrusted_ca: Path, tmp_path: Path
) -> None:
    env = rabbitmq_tls.tls_client_env()
    expected = {
        "untrusted-ca": f"is not signed by a CA in the CA bundle {untrusted_ca}",
        # The certificate is for TLS_HOST only: the address it resolves to is another name.
        "wrong-name": "is not valid for the name '127.0.0.1'",
        "plain-port": f"{TLS_HOST}:{rabbitmq_tls.amqp_port} does not speak TLS",
    }[case]
    env.update(
        {
            "untrusted-ca": {"JOBTIDE_BROKER_CA_FILE": str(untrusted_ca)},
            "wrong-name": {"JOBTIDE_BROKER_HOST": "127.0.0.1"},
            "plain-port": {"JOBTIDE_BROKER_PORT": str(rabbitmq_tls.amqp_port)},
        }[case]
    )
    bed = tls_bed(rabbitmq_tls, tmp_path)
    try:
        bed.publish({"id": 1})
        # A budget far beyond the test's wait: only a failure taken as final ends it in time.
        worker = bed.start_worker(**env, JOBTIDE_RECONNECT_SECONDS="3600")
        assert worker.wait(60) == EXIT_CONFIG, worker.log()
        log = worker.log()
        assert "broker TLS failed" in log
        assert expected in log
        assert "retrying" not in log
        assert rabbitmq_tls.password not in log
        # Nothing was taken in plain text instead.
        wait_counts(bed.broker, bed.queue, ready=1, unacked=0, consumers=0)
        assert bed.records() == []

        published = publish_cli(bed, env, 2)
        assert published.returncode == EXIT_CONFIG
        assert "broker TLS failed" in published.stderr
        assert expected in published.stderr
    finally:
        bed.close()
