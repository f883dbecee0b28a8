"""`topology.definitions` loads into a real broker and agrees with what the worker declares."""

from __future__ import annotations

import pika
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


def test_a_clustered_brokers_queues_are_redeclared_with_the_same_group_size(
    bed: WorkerBed,
) -> None:
    # The chart's definitions of a three-member broker (rabbitmq.replicas: 3); the worker gets
    # the same size (JOBTIDE_QUORUM_INITIAL_GROUP_SIZE) and declares the same arguments.
    bed.define_topology(max_attempts=4, max_task_seconds=30, group_size=3)
    with bed.channel() as channel:
        topology.declare(channel, bed.queue, 3)
    queue = bed.broker.api("GET", f"queues/%2F/{bed.queue}").json()
    assert queue["arguments"] == topology.queue_arguments(bed.queue, 3)
    assert queue["arguments"][topology.GROUP_SIZE_ARGUMENT] == 3
    # Without it the broker refuses the redeclare: why the chart tells the worker the size.
    with bed.channel() as channel, pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        topology.declare(channel, bed.queue)
    assert refused.value.reply_code == 406
    assert topology.GROUP_SIZE_ARGUMENT in refused.value.reply_text
