"""The scaler as a real process behind a fault-injecting proxy (jobtide_testbed.faultproxy):
between it and the real kube-apiserver, and between it and the real management API. The
faults are those the real servers cannot produce on demand: lost answers after a create,
cut and malformed bodies, 429/503 with Retry-After, connections that hang, answers of the
wrong shape. The scaler must never crash, never create a second Job for one message, never
act on figures it cannot trust, honour Retry-After, and resume once the fault ends.

Every pipeline here uses one worker per message and fake pods that run for an hour, so the
right number of Jobs is exactly the number of messages published: one more is a duplicate."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from jobtide_testbed.faultproxy import Fault, FaultProxy
from jobtide_testbed.kube import KubeCluster
from jobtide_testbed.process import wait_for
from jobtide_testbed.rabbitmq import RabbitMQ
from scaler_bed import ScalerBed, ScalerProcess, make_bed, pipeline

pytestmark = pytest.mark.integration

JOBS_PATH = "/jobs"


@pytest.fixture
def api_proxy(kube: KubeCluster) -> Iterator[FaultProxy]:
    """In front of the apiserver; its own serving certificate names 127.0.0.1."""
    with FaultProxy(
        "127.0.0.1", kube.apiserver_port, server_tls=kube.serving, upstream_ca=kube.pki.ca.cert
    ) as proxy:
        yield proxy


@pytest.fixture
def api_bed(
    kube: KubeCluster, namespace: str, rabbitmq: RabbitMQ, tmp_path: Path, api_proxy: FaultProxy
) -> Iterator[ScalerBed]:
    bed = make_bed(kube, namespace, rabbitmq, tmp_path, server=api_proxy.url)
    try:
        yield bed
    finally:
        bed.stop_all()


@pytest.fixture
def management_proxy(rabbitmq: RabbitMQ) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", rabbitmq.management_port) as proxy:
        yield proxy


@pytest.fixture
def management_bed(bed: ScalerBed, management_proxy: FaultProxy) -> ScalerBed:
    bed.management_port = management_proxy.port
    return bed


def errors(scaler: ScalerProcess, kind: str) -> float:
    return scaler.metric("jobtide_errors_total", kind=kind)


def decisions(scaler: ScalerProcess, pipeline_name: str, result: str) -> float:
    return scaler.metric("jobtide_decisions_total", pipeline=pipeline_name, result=result)


def wait_metric(read: Callable[[], float], above: float, what: str, timeout: float = 60) -> None:
    wait_for(lambda: read() > above, timeout=timeout, what=what)


def exactly(bed: ScalerBed, name: str, scaler: ScalerProcess, count: int) -> None:
    """`count` Jobs, and still `count` after some more cycles: none duplicated."""
    bed.wait_jobs(count, name, timeout=90)
    scaler.wait_cycles(name, 6)
    assert len(bed.jobs(name)) == count
    scaler.process.check_alive()


def started(bed: ScalerBed, name: str, published: int, **top: object) -> tuple[ScalerProcess, str]:
    """A scaler with one pipeline `name`, after it made a Job for each of `published` tasks."""
    queue = f"{bed.namespace}-{name}"
    bed.declare(queue)
    scaler = bed.start(bed.config({name: pipeline(queue)}, **top))
    if published:
        bed.publish(queue, published)
        exactly(bed, name, scaler, published)
    return scaler, queue


# -- between the scaler and the kube-apiserver ------------------------------------------------


def test_creates_whose_answer_is_lost_or_cut_make_no_duplicate(
    api_bed: ScalerBed, api_proxy: FaultProxy
) -> None:
    bed = api_bed
    scaler, queue = started(bed, "lost", 1)

    # Each create reaches the apiserver, then the connection is reset: the Job exists, the
    # scaler cannot know. It creates nothing more for the pipeline until its Job cache shows
    # the create id (usually before the next cycle).
    api_proxy.inject(Fault("reset_after_forward", method="POST", path_contains=JOBS_PATH))
    bed.publish(queue, 3)
    exactly(bed, "lost", scaler, 4)
    assert api_proxy.applied["reset_after_forward"] >= 3
    assert errors(scaler, "kubernetes_create_unknown") >= 3

    # The 201 arrives with its body cut in half: created all the same.
    api_proxy.inject(Fault("truncate", method="POST", path_contains=JOBS_PATH))
    bed.publish(queue, 3)
    exactly(bed, "lost", scaler, 7)
    assert api_proxy.applied["truncate"] >= 1
    assert (
        errors(scaler, "kubernetes_answer_invalid") + errors(scaler, "kubernetes_create_unknown")
        >= 4
    )

    api_proxy.clear()
    bed.publish(queue, 2)
    exactly(bed, "lost", scaler, 9)


def test_a_429_on_create_is_honoured_and_creating_resumes_after_it(
    api_bed: ScalerBed, api_proxy: FaultProxy
) -> None:
    bed = api_bed
    scaler, queue = started(bed, "busy", 0)
    api_proxy.inject(
        Fault("status", method="POST", path_contains=JOBS_PATH, status=429, retry_after=30)
    )
    bed.publish(queue, 3)
    wait_metric(lambda: decisions(scaler, "busy", "throttled"), 5, "throttled cycles")
    # Six cycles or more passed, yet the apiserver was asked once: Retry-After is honoured
    # (without it, every cycle would have asked again).
    assert api_proxy.applied["status"] == 1
    assert bed.jobs("busy") == []
    assert errors(scaler, "kubernetes_create") >= 1

    api_proxy.clear()
    exactly(bed, "busy", scaler, 3)


def test_job_cache_through_throttling_resets_and_garbage(
    api_bed: ScalerBed, api_proxy: FaultProxy
) -> None:
    bed = api_bed
    expected = 2
    scaler, queue = started(bed, "cache", expected)

    for fault, error_kind in [
        # Lists and watches answered 503 with Retry-After (the apiserver shedding load).
        (Fault("status", method="GET", path_contains=JOBS_PATH, retry_after=2),
         "kubernetes_throttled"),
        # A list whose JSON is cut, or is not JSON at all.
        (Fault("truncate", method="GET", path_contains=JOBS_PATH), "kubernetes_watch"),
        (Fault("malform", method="GET", path_contains=JOBS_PATH), "kubernetes_watch"),
        # Connections reset before any answer.
        (Fault("reset", method="GET", path_contains=JOBS_PATH), "kubernetes_watch"),
    ]:  # fmt: skip
        before = errors(scaler, error_kind)
        api_proxy.inject(fault)
        # The running watch is cut at its next event, as a dropped connection would be.
        bed.kube.kubectl(
            "annotate", "-n", bed.namespace, "--overwrite",
            f"job/{bed.jobs('cache')[0].metadata.name}", f"nudge={fault.kind}",
        )  # fmt: skip
        wait_metric(
            lambda kind=error_kind: errors(scaler, kind), before, f"{fault.kind}: {error_kind}"
        )
        # Blind, the scaler creates nothing for a new message: it waits for its cache.
        bed.publish(queue, 1)
        unsynced = decisions(scaler, "cache", "cache_unsynced")
        wait_metric(lambda: decisions(scaler, "cache", "cache_unsynced"), unsynced + 2, "waits")
        assert len(bed.jobs("cache")) == expected, fault.kind
        api_proxy.clear()
        expected += 1
        exactly(bed, "cache", scaler, expected)
    assert api_proxy.applied["status"] >= 1
    assert api_proxy.applied["malform"] >= 1


# -- between the scaler and the management API --------------------------------------------


def test_management_api_lies_garbage_throttling_and_hangs_are_never_scaled_on(
    management_bed: ScalerBed, management_proxy: FaultProxy
) -> None:
    bed, proxy = management_bed, management_proxy
    expected = 2
    scaler, queue = started(bed, "counts", expected, brokerStaleAfterSeconds=3)

    def lie(**fields: object) -> bytes:
        """An answer claiming 50 tasks in flight on the pipeline's queue, each lie differently."""
        entry = {"name": queue, "vhost": "/", "messages_ready": 0, "consumers": 0}
        return json.dumps([{**entry, "messages_unacknowledged": 50, **fields}]).encode()

    faults = [
        # Figures of another vhost's queue of the same name.
        (Fault("replace", path_contains="/api/queues", body=lie(vhost="elsewhere")),
         "broker_management_invalid"),
        # Counts that are not counts: text, a fraction, a negative number.
        (Fault("replace", path_contains="/api/queues", body=lie(messages_unacknowledged="50")),
         "broker_management_invalid"),
        (Fault("replace", path_contains="/api/queues", body=lie(messages_unacknowledged=50.5)),
         "broker_management_invalid"),
        (Fault("replace", path_contains="/api/queues", body=lie(messages_ready=-7)),
         "broker_management_invalid"),
        # Another endpoint's shape (an object, not a list of queues).
        (Fault("replace", path_contains="/api/queues", body=b'{"management_version": "4.3.6"}'),
         "broker_management_invalid"),
        (Fault("malform", path_contains="/api/queues"), "broker_management_invalid"),
        (Fault("truncate", path_contains="/api/queues"), "broker_management"),
        (Fault("status", path_contains="/api/queues", status=500), "broker_management"),
        (Fault("reset", path_contains="/api/queues"), "broker_management"),
        # A request that is never answered: the read timeout (5 s) ends it, each cycle.
        (Fault("half_open", path_contains="/api/queues"), "broker_management"),
    ]  # fmt: skip
    for fault, error_kind in faults:
        before = errors(scaler, error_kind)
        stale = decisions(scaler, "counts", "stale")
        proxy.inject(fault)
        wait_metric(
            lambda kind=error_kind: errors(scaler, kind), before, f"{fault.kind}: {error_kind}"
        )
        # The last good figures age: once stale, nothing is created, whatever waits.
        wait_metric(lambda: decisions(scaler, "counts", "stale"), stale + 1, "stale cycles")
        bed.publish(queue, 1)
        stale = decisions(scaler, "counts", "stale")
        wait_metric(lambda: decisions(scaler, "counts", "stale"), stale + 2, "more stale cycles")
        assert len(bed.jobs("counts")) == expected, fault
        proxy.clear()
        expected += 1
        exactly(bed, "counts", scaler, expected)


def test_management_api_retry_after_is_honoured(
    management_bed: ScalerBed, management_proxy: FaultProxy
) -> None:
    bed, proxy = management_bed, management_proxy
    scaler, queue = started(bed, "throttled", 1, brokerStaleAfterSeconds=3)

    proxy.inject(Fault("status", path_contains="/api/queues", status=429, retry_after=20))
    wait_metric(
        lambda: errors(scaler, "broker_management_throttled"), 0, "a throttled management read"
    )
    scaler.wait_cycles("throttled", 8)
    # Eight cycles (4 s at 0.5 s a cycle), one request: the scaler waits as asked.
    assert proxy.applied["status"] == 1
    proxy.clear()
    bed.publish(queue, 1)
    exactly(bed, "throttled", scaler, 2)
