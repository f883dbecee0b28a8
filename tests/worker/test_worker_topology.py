"""`topology.definitions` loads into a real broker and agrees with what the worker declares."""

from __future__ import annotations

import pytest
from jobtide_testbed.process import wait_for
from jobtide_worker import topology
from workerbed import WorkerBed

pytestmark = pytest.mark.integration


def test_definitions_load_into_rabbitmq_and_match_the_workers_declare(bed: WorkerBed) -> None:
    response = bed.broker.api("POST", "definitions", json=topology.definitions([(bed.queue, 4)]))
    assert response.status_code in (200, 204), response.text
    try:
        # The worker declares the same objects: a mismatch would close its channel.
        with bed.channel() as channel:
            topology.declare(channel, bed.queue)

        def policy_applied() -> bool:
            queue = bed.broker.api("GET", f"queues/%2F/{bed.queue}").json()
            return queue.get("effective_policy_definition") == {"delivery-limit": 4}

        wait_for(policy_applied, timeout=30, what="delivery-limit policy on the queue")
        queue = bed.broker.api("GET", f"queues/%2F/{bed.queue}").json()
        assert queue["arguments"] == topology.queue_arguments(bed.queue)
        bindings = bed.broker.api(
            "GET", f"exchanges/%2F/{topology.DEAD_LETTER_EXCHANGE}/bindings/source"
        ).json()
        assert {(b["destination"], b["routing_key"]) for b in bindings} >= {
            (f"{bed.queue}.dlq", bed.queue)
        }
    finally:
        bed.broker.api("DELETE", f"policies/%2F/{topology.policy_name(bed.queue)}")
