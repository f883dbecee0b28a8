"""The scaler process against the real test bed: RabbitMQ, and a control plane where it acts
as the chart's ServiceAccount bound to the chart's rendered Role. Fake (kwok) worker pods do
not consume, so a queue's ready count stays what the test published: the expected number of
Jobs is known exactly, and the tests let several scaler cycles pass (counted by the scaler's
own metrics) to see that no extra Job appears."""

from __future__ import annotations

import signal

import pytest
from jobtide_scaler.jobs import job_labels
from jobtide_testbed.process import wait_for
from scaler_bed import RELEASE, ScalerBed, job_template, pipeline

pytestmark = pytest.mark.integration


def env_of(job: object) -> dict[str, str]:
    container = job.spec.template.spec.containers[0]  # type: ignore[attr-defined]
    return {e.name: e.value for e in container.env or []}


def test_published_messages_get_that_many_jobs_with_the_right_spec(bed: ScalerBed) -> None:
    queue = f"{bed.namespace}-resize"
    bed.declare(queue)
    scaler = bed.start(
        bed.config(
            {
                "resize": pipeline(
                    queue,
                    idleTimeoutSeconds=45,
                    maxAttempts=4,
                    backoffLimit=1,
                    ttlSecondsAfterFinished=120,
                )
            }
        )
    )
    bed.publish(queue, 3)
    bed.wait_jobs(3, "resize")
    scaler.wait_cycles("resize", 4)
    jobs = bed.jobs("resize")
    assert len(jobs) == 3

    for job in jobs:
        meta = job.metadata
        assert meta.name.startswith(f"{RELEASE}-resize-")
        assert meta.labels == {"team": "test", **job_labels(RELEASE, "resize")}
        assert meta.annotations["jobtide.io/create-id"]
        assert job.spec.backoff_limit == 1
        assert job.spec.ttl_seconds_after_finished == 120
        assert job.spec.template.spec.restart_policy == "Never"
        assert job.spec.template.metadata.labels["jobtide.io/pipeline"] == "resize"
        env = env_of(job)
        assert env["JOBTIDE_PIPELINE"] == "resize"
        assert env["JOBTIDE_QUEUE"] == queue
        assert env["JOBTIDE_IDLE_TIMEOUT_SECONDS"] == "45"
        assert env["JOBTIDE_MAX_ATTEMPTS"] == "4"
    assert len({j.metadata.annotations["jobtide.io/create-id"] for j in jobs}) == 3

    # kwok runs the pods: the scaler sees them active and running, not pending.
    wait_for(
        lambda: (
            scaler.metric("jobtide_jobs_active", pipeline="resize") == 3
            and scaler.metric("jobtide_jobs_pending", pipeline="resize") == 0
        ),
        timeout=60,
        what="3 running Jobs in the scaler's metrics",
    )
    assert scaler.metric("jobtide_jobs_created_total", pipeline="resize") == 3
    assert scaler.metric("jobtide_queue_messages_ready", pipeline="resize") == 3
    # Nothing consumes: the 3 messages wait, their age read from the broker's counters.
    wait_for(
        lambda: scaler.metric("jobtide_queue_oldest_message_age_seconds", pipeline="resize") > 0,
        timeout=60,
        what="the oldest waiting message's age",
    )
    exported = scaler.metrics()
    assert exported[("jobtide_dead_letter_messages", (("pipeline", "resize"),))] == 0
    assert exported[("jobtide_pipeline_max_workers", (("pipeline", "resize"),))] > 0

    bed.publish(queue, 2)
    bed.wait_jobs(5, "resize")
    scaler.wait_cycles("resize", 4)
    assert len(bed.jobs("resize")) == 5
    assert scaler.metric("jobtide_errors_total", kind="kubernetes_create") == 0


def test_jobs_whose_pods_cannot_start_count_as_pending(bed: ScalerBed) -> None:
    queue = f"{bed.namespace}-stuck"
    bed.declare(queue)
    template = job_template(node_selector={"pool": "does-not-exist"})
    scaler = bed.start(bed.config({"stuck": pipeline(queue, jobTemplate=template)}))
    bed.publish(queue, 4)
    bed.wait_jobs(4, "stuck")
    wait_for(
        lambda: scaler.metric("jobtide_jobs_pending", pipeline="stuck") == 4,
        timeout=60,
        what="4 pending Jobs in the scaler's metrics",
    )
    # A cold node pool: the same backlog every cycle, and no storm of Jobs.
    scaler.wait_cycles("stuck", 6)
    assert len(bed.jobs("stuck")) == 4
    assert scaler.metric("jobtide_jobs_active", pipeline="stuck") == 4

    bed.publish(queue, 2)
    bed.wait_jobs(6, "stuck")
    scaler.wait_cycles("stuck", 4)
    assert len(bed.jobs("stuck")) == 6


def test_caps_per_pipeline_and_global_across_two_pipelines(bed: ScalerBed) -> None:
    qa, qb = f"{bed.namespace}-a", f"{bed.namespace}-b"
    for q in (qa, qb):
        bed.declare(q)
    bed.publish(qa, 10)
    bed.publish(qb, 10)
    config = bed.config(
        {"alpha": pipeline(qa, maxWorkers=3), "beta": pipeline(qb, maxWorkers=10)},
        maxTotalWorkers=5,
    )
    scaler = bed.start(config)
    bed.wait_jobs(5)
    scaler.wait_cycles("alpha", 6)
    # Room for 5 in all, handed out one at a time to the pipeline with fewer: alpha reaches
    # its own cap of 3, beta gets the other 2.
    assert (len(bed.jobs("alpha")), len(bed.jobs("beta"))) == (3, 2)


def test_dry_run_decides_and_logs_but_creates_nothing(bed: ScalerBed) -> None:
    queue = f"{bed.namespace}-dry"
    bed.publish(queue, 2)
    result = bed.run(bed.config({"dry": pipeline(queue)}), "--dry-run", "--once")
    assert result.returncode == 0, result.stderr
    assert "dry run: would create 2 Job(s) for pipeline dry" in result.stderr
    assert bed.jobs() == []


def test_once_runs_one_cycle_and_exits(bed: ScalerBed) -> None:
    queue = f"{bed.namespace}-once"
    bed.publish(queue, 2)
    config = bed.config(
        {"once": pipeline(queue)},
        leaderElection={
            "enabled": True,
            "leaseDurationSeconds": 6,
            "renewDeadlineSeconds": 4,
            "retryPeriodSeconds": 1,
        },
    )
    result = bed.run(config, "--once")
    assert result.returncode == 0, result.stderr
    assert "created 2 of 2 Job(s) for pipeline once" in result.stderr
    assert len(bed.jobs("once")) == 2
    # The Lease was handed back on exit.
    again = bed.run(config, "--once")
    assert again.returncode == 0, again.stderr
    assert len(bed.jobs("once")) == 2


def test_configuration_error_names_the_field(bed: ScalerBed) -> None:
    result = bed.run(bed.config({"bad": pipeline("q", maxWorkers=-1)}))
    assert result.returncode == 2
    assert "pipelines.bad.maxWorkers:" in result.stderr
    assert bed.broker.password not in result.stderr


def test_password_is_not_logged(bed: ScalerBed) -> None:
    result = bed.run(bed.config({"p": pipeline(f"{bed.namespace}-p")}), "--once", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "configuration: {" in result.stderr
    assert bed.broker.password not in result.stderr + result.stdout


def test_apiserver_restart_mid_run(bed: ScalerBed) -> None:
    queue = f"{bed.namespace}-restart"
    bed.declare(queue)
    scaler = bed.start(bed.config({"restart": pipeline(queue)}))
    bed.publish(queue, 2)
    bed.wait_jobs(2, "restart")

    bed.kube.restart_apiserver()
    bed.publish(queue, 2)
    bed.wait_jobs(4, "restart", timeout=120)
    scaler.wait_cycles("restart", 6)
    assert len(bed.jobs("restart")) == 4
    assert scaler.metric("jobtide_errors_total", kind="kubernetes_watch") >= 1
    scaler.process.check_alive()


def test_broker_stopped_and_started(private_bed: ScalerBed) -> None:
    bed = private_bed
    queue = f"{bed.namespace}-broker"
    bed.declare(queue)
    scaler = bed.start(bed.config({"broker": pipeline(queue)}, brokerStaleAfterSeconds=2))
    bed.publish(queue, 1)
    bed.wait_jobs(1, "broker")

    bed.broker.stop()
    wait_for(
        lambda: scaler.metric("jobtide_decisions_total", pipeline="broker", result="stale") >= 2,
        timeout=60,
        what="stale decisions while the broker is down",
    )
    assert scaler.metric("jobtide_errors_total", kind="broker_management") >= 1
    assert len(bed.jobs("broker")) == 1

    bed.broker.start()
    bed.publish(queue, 2)
    bed.wait_jobs(3, "broker", timeout=90)
    scaler.wait_cycles("broker", 6)
    assert len(bed.jobs("broker")) == 3


def test_leader_failover_between_two_scalers(bed: ScalerBed) -> None:
    queue = f"{bed.namespace}-ha"
    bed.declare(queue)
    config = bed.config(
        {"ha": pipeline(queue)},
        leaderElection={
            "enabled": True,
            "leaseDurationSeconds": 4,
            "renewDeadlineSeconds": 3,
            "retryPeriodSeconds": 0.5,
        },
    )
    first = bed.start(config, name="scaler-a")
    second = bed.start(config, name="scaler-b")
    wait_for(
        lambda: first.metric("jobtide_leader") + second.metric("jobtide_leader") == 1,
        timeout=60,
        what="one leader",
    )
    leader, follower = (first, second) if first.metric("jobtide_leader") == 1 else (second, first)

    bed.publish(queue, 3)
    bed.wait_jobs(3, "ha")
    follower.wait_cycles("ha", 4)
    assert len(bed.jobs("ha")) == 3
    assert follower.metric("jobtide_jobs_created_total", pipeline="ha") == 0
    assert follower.metric("jobtide_decisions_total", pipeline="ha", result="not_leader") >= 1

    leader.process.stop(timeout=0, sig=signal.SIGKILL)
    wait_for(
        lambda: follower.metric("jobtide_leader") == 1,
        timeout=60,
        what="the follower taking the Lease",
    )
    bed.publish(queue, 2)
    bed.wait_jobs(5, "ha")
    follower.wait_cycles("ha", 4)
    assert len(bed.jobs("ha")) == 5
    assert follower.metric("jobtide_jobs_created_total", pipeline="ha") == 2
