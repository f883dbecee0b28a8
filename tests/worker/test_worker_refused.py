"""Configuration that cannot work, against the real broker: the worker exits 2 (bad
configuration) at once, naming the setting to fix, instead of retrying as if the broker were
away until JOBTIDE_RECONNECT_SECONDS ran out."""

from __future__ import annotations

import secrets
import signal
import uuid
from pathlib import Path

import pytest
from jobtide_testbed.process import wait_for
from jobtide_testbed.rabbitmq import wait_counts
from workerbed import WorkerBed

pytestmark = pytest.mark.integration

# Far longer than each test waits: an exit within the wait cannot be the reconnect budget's.
BUDGET = {"JOBTIDE_RECONNECT_SECONDS": "600"}


def _refused(bed: WorkerBed, variable: str, **env: str) -> str:
    worker = bed.start_worker(**BUDGET, **env)
    assert worker.wait(60) == 2, worker.log()
    log = worker.log()
    assert "the broker refused the configuration" in log
    assert f"variable={variable}" in log
    assert "broker unreachable" not in log
    assert "Traceback" not in log
    assert bed.broker.password not in log
    return log


def test_wrong_password_exits_2_naming_the_credentials(bed: WorkerBed) -> None:
    wrong = bed.broker.password[::-1]
    log = _refused(bed, "JOBTIDE_BROKER_USERNAME", JOBTIDE_BROKER_PASSWORD=wrong)
    assert "ACCESS_REFUSED" in log


def test_unknown_vhost_exits_2_naming_the_vhost(bed: WorkerBed) -> None:
    log = _refused(bed, "JOBTIDE_BROKER_VHOST", JOBTIDE_BROKER_VHOST="no-such-vhost")
    assert "no such virtual host" in log


def test_a_queue_declared_elsewhere_with_other_arguments_exits_2_naming_the_queue(
    bed: WorkerBed,
) -> None:
    with bed.channel() as channel:
        channel.queue_declare(bed.queue, durable=True)  # a classic queue, not the pipeline's
    bed.publish_raw(b"{}", "application/json")
    log = _refused(bed, "JOBTIDE_QUEUE")
    assert "PRECONDITION_FAILED" in log
    # Nothing was taken from it.
    wait_counts(bed.broker, bed.queue, ready=1, unacked=0)


def test_a_missing_queue_without_declaring_exits_2_naming_the_queue(bed: WorkerBed) -> None:
    log = _refused(bed, "JOBTIDE_QUEUE", JOBTIDE_DECLARE_TOPOLOGY="false")
    assert "does not exist" in log


def test_a_password_changed_on_the_broker_is_retried_until_its_file_changes(
    bed: WorkerBed, tmp_path: Path
) -> None:
    """A rotation (charts/jobtide README, "Rotating the broker's credentials"): the broker
    refuses the old password before kubelet rewrites the mounted file. A worker that had
    connected, and whose connection the broker then closes, tries again with the files as
    they are at each attempt instead of exiting 2, and goes on once the file holds the new
    password."""
    user, name = f"rotation-{uuid.uuid4().hex[:8]}", f"rotation-{uuid.uuid4().hex[:8]}"
    old, new = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    username, password = tmp_path / "username", tmp_path / "password"
    username.write_text(user)
    password.write_text(old)
    bed.broker.set_user(user, old)
    try:
        worker = bed.start_worker(
            **BUDGET,
            JOBTIDE_BROKER_USERNAME_FILE=str(username),
            JOBTIDE_BROKER_PASSWORD_FILE=str(password),
            JOBTIDE_WORKER_NAME=name,
            JOBTIDE_IDLE_TIMEOUT_SECONDS="120",
        )

        def connection() -> str | None:
            return next((str(c["name"]) for c in bed.broker.connections()
                         if c.get("client_properties", {}).get("connection_name")
                         == f"jobtide-worker {name}"), None)  # fmt: skip

        wait_for(lambda: connection() is not None, timeout=30, what="the worker's connection")
        bed.broker.set_user(user, new)
        bed.broker.close_connection(str(connection()))
        wait_for(lambda: worker.log().count("the broker refused the password, retrying") >= 2,
                 timeout=30, what="the worker retrying with the old password")  # fmt: skip
        assert worker.popen.poll() is None, worker.log()

        password.write_text(new)  # kubelet's rewrite of the Secret's file
        bed.publish({"id": 1})
        bed.wait_record("done")
        assert worker.log().count(" consuming ") == 2, worker.log()
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker.log()
        for secret in (old, new):
            assert secret not in worker.log()
    finally:
        bed.broker.delete_user(user)
