"""Configuration that cannot work, against the real broker: the worker exits 2 (bad
configuration) at once, naming the setting to fix, instead of retrying as if the broker were
away until JOBTIDE_RECONNECT_SECONDS ran out."""

from __future__ import annotations

import pytest
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
