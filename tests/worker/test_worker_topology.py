"""`topology.definitions` loads into a real broker and agrees with what the worker declares."""

from __future__ import annotations

import pytest
from jobtide_worker import topology
from workerbed import WorkerBed

pytestmark = [pytest.mark.integration, pytest.mark.broker_compat]


def test_definitions_load_into_rabbitmq_and_match_the_workers_declare(bed: WorkerBed) -> None:
    # The broker applies the queue's policy: the pipeline's delivery limit and consumer timeout.
    assert bed.define_topology(max_attempts=4, max_task_seconds=30) == {
        "delivery-limit": 4,
        "consumer-timeout": 90_000,
    }
    # The worker declares the same objects: a mismatch would close its channel.
    with bed.channel() as channel:
        topology.declare(channel, bed.queue)
    queue = bed.broker.api("GET", f"queues/%2F/{bed.queue}").json()
    assert queue["arguments"] == topology.queue_arguments(bed.queue)
    bindings = bed.broker.api(
        "GET", f"exchanges/%2F/{topology.DEAD_LETTER_EXCHANGE}/bindings/source"
    ).json()
    assert {(b["destination"], b["routing_key"]) for b in bindings} >= {
        (f"{bed.queue}.dlq", bed.queue)
    }
