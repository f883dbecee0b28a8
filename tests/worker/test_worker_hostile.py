"""Messages nobody here wrote: published by Node's amqplib (not pika) to the real broker and
consumed by the real worker process. Each one ends done or dead-lettered with its reason and
its headers and properties as they came; the worker never dies nor reconnects because of one;
forged counts neither skip the handler nor spend a neighbour's attempts."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import pika
import pika.data
import pytest
from jobtide_testbed import amqpclient
from jobtide_testbed.rabbitmq import wait_counts
from jobtide_worker import fields, topology
from jobtide_worker.outcome import HEADER_PREFIX
from workerbed import WorkerBed

pytestmark = pytest.mark.integration

DONE = "done"
LARGE_BODY = 16 * 1024 * 1024  # RabbitMQ 4's default max_message_size: the largest it takes
DEEP = 900  # header tables nested this deep: past what pika can decode by recursion
# A header of every type amqplib can write, values pika 1.4 reads wrongly or not at all included.
# Not NaN nor the infinities: RabbitMQ 4.3.6 cannot parse them and closes the publisher's
# connection (541 INTERNAL_ERROR), so they never reach a queue.
EVERY_TYPE = {
    "x-test-probe": {"!": "double", "value": 3.75},  # pika alone reads 3
    "float": {"!": "float", "value": 1.5},
    "decimal": {"!": "decimal", "value": {"places": 2, "digits": 150}},
    "decimal-unsigned": {"!": "decimal", "value": {"places": 0, "digits": 4_000_000_000}},
    "timestamp": {"!": "timestamp", "value": 1_700_000_000},
    "timestamp-year-beyond-9999": {"!": "timestamp", "value": 2**62},
    "int8": {"!": "int8", "value": -3},
    "uint8": {"!": "uint8", "value": 200},
    "int16": {"!": "int16", "value": -30_000},
    "uint16": {"!": "uint16", "value": 60_000},
    "int32": {"!": "int32", "value": -2_000_000_000},
    "uint32": {"!": "uint32", "value": 4_000_000_000},
    "int64": {"!bigint": str(-(2**63))},
    "bool": True,
    "void": None,
    "bytes": {"!bytes": base64.b64encode(b"\x00\xff\xfe").decode()},
    "text": "ünïcødé \u2603",
    "nested-arrays": [[1, [2, [3, ["deep"]]]], [], [{"in": "table"}]],
    "table": {"a": {"b": [None, False, {"!": "float", "value": 0.25}]}},
}


def _b64(data: bytes) -> dict[str, str]:
    return {"base64": base64.b64encode(data).decode()}


def _nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = {"n": value}
    return value


def corpus(user: str) -> list[tuple[str, dict[str, Any], str]]:
    """(name, amqplib message, expected end: DONE or the dead-letter reason). Every message
    names itself in an `x-test-name` header."""
    forged = {
        "x-delivery-count": 100,
        "x-acquired-count": 100,
        "x-death": [
            {"count": 50, "reason": "rejected", "queue": "elsewhere", "exchange": "",
             "routing-keys": ["elsewhere"], "time": {"!": "timestamp", "value": 1}},
        ],
    }  # fmt: skip
    every_property = {
        "contentType": "application/json",
        "contentEncoding": "identity",
        "priority": 3,
        "correlationId": "corr-1",
        "replyTo": "replies.node-producer",
        "expiration": "3600000",
        "messageId": "every-property",
        "timestamp": 1_700_000_123,
        "type": "resize",
        "userId": user,
        "appId": "node-producer",
        "deliveryMode": 1,
    }
    huge_headers = {f"k{i:05}": "v" * 8 for i in range(3000)}  # 60 KB: about amqplib's most
    items: list[tuple[str, bytes | dict[str, Any], dict[str, Any], str]] = [
        ("no-content-type", b'{"a": 1}', {}, DONE),
        ("json-lying-about-png", b"\x89PNG\r\n\x1a\n\x00", {"contentType": "application/json"},
         "undecodable"),
        ("json-as-text", b'{"a": 1}', {"contentType": "text/plain"}, DONE),
        ("json-invalid-utf8", b'{"a": "\xff"}', {"contentType": "application/json"},
         "undecodable"),
        ("octets-invalid-utf8", b"\xff\xfe\x00", {"contentType": "application/octet-stream"},
         DONE),
        ("empty", b"", {}, DONE),
        ("empty-json", b"", {"contentType": "application/json"}, "undecodable"),
        ("large", {"repeat": "x", "times": LARGE_BODY},
         {"contentType": "application/octet-stream"}, DONE),
        ("json-huge-float", b"[1e999999, -1e999999]", {"contentType": "application/json"}, DONE),
        ("json-huge-integer", b"9" * 5000, {"contentType": "application/json"}, "undecodable"),
        ("json-deep", b"[" * 100_000 + b"]" * 100_000, {"contentType": "application/json"},
         "undecodable"),
        ("json-duplicate-keys", b'{"a": 1, "a": 2}', {"contentType": "application/json"}, DONE),
        ("json-lone-surrogate-escaped", b'["\\ud800"]', {"contentType": "application/json"},
         DONE),
        ("json-lone-surrogate-raw", b'["\xed\xa0\x80"]', {"contentType": "application/json"},
         "undecodable"),
        ("every-type", b"{}", {"contentType": "application/json", "headers": EVERY_TYPE}, DONE),
        ("every-type-dead", b"not json",
         {"contentType": "application/json", "headers": EVERY_TYPE}, "undecodable"),
        ("deep-headers", b"{}", {"contentType": "application/json",
                                 "headers": {"deep": _nested(DEEP)}}, DONE),
        ("deep-headers-dead", b"{", {"contentType": "application/json",
                                     "headers": {"deep": _nested(DEEP)}}, "undecodable"),
        ("huge-headers-dead", b"{", {"contentType": "application/json",
                                     "headers": huge_headers}, "undecodable"),
        ("forged-counts", b"{}", {"contentType": "application/json", "headers": forged}, DONE),
        ("forged-counts-retried", b"{}",
         {"contentType": "application/json", "headers": {**forged, "x-test-fail-until": 3}},
         DONE),
        ("no-message-id-transient", b"{}", {"contentType": "application/json",
                                            "deliveryMode": 1}, DONE),
        ("every-property", b"{}", every_property, DONE),
        ("every-property-dead", b"nope", {**every_property, "messageId": "every-property-dead"},
         "undecodable"),
    ]  # fmt: skip
    messages = []
    for name, body, properties, expected in items:
        headers = {**properties.get("headers", {}), "x-test-name": name}
        message = {
            "body": body if isinstance(body, dict) else _b64(body),
            "properties": {"messageId": uuid.uuid4().hex, **properties, "headers": headers},
        }
        if name.startswith("no-message-id"):
            del message["properties"]["messageId"]
        messages.append((name, message, expected))
    return messages


def _drain(bed: WorkerBed, queue: str) -> dict[str, tuple[Any, bytes]]:
    """Every message of `queue` by its x-test-name, taken off it (read losslessly)."""
    fields.install()
    found: dict[str, tuple[Any, bytes]] = {}
    with bed.channel() as channel:
        while True:
            method, props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found[props.headers["x-test-name"]] = (props, body)


def _encoded(headers: dict[str, Any]) -> bytes:
    pieces: list[bytes] = []
    pika.data.encode_table(pieces, headers)
    return b"".join(pieces)


# Also on the oldest supported RabbitMQ: it keeps its count in another header.
@pytest.mark.broker_compat
@pytest.mark.parametrize(
    ("policy", "prefetch"),
    [pytest.param(True, 1, id="chart-policy"), pytest.param(False, 8, id="no-policy-prefetch-8")],
)
def test_hostile_messages_end_done_or_dead_lettered_as_they_came(
    bed: WorkerBed, policy: bool, prefetch: int
) -> None:
    if policy:
        bed.define_topology(max_attempts=3, max_task_seconds=60)
    else:
        with bed.channel() as channel:
            topology.declare(channel, bed.queue)
    reference = f"{bed.queue}.reference"  # the same messages, never consumed
    with bed.channel() as channel:
        channel.queue_declare(reference, durable=True, arguments={"x-queue-type": "quorum"})
    try:
        messages = corpus(bed.broker.username)
        published = amqpclient.publish(
            bed.broker.amqp_url, [bed.queue, reference], [m for _, m, _ in messages]
        )
        assert published == 2 * len(messages)
        expected = {name: end for name, _, end in messages}

        worker = bed.start_worker(
            JOBTIDE_HANDLER="handlers:hostile",
            JOBTIDE_PREFETCH=str(prefetch),
            JOBTIDE_IDLE_TIMEOUT_SECONDS="3",
        )
        assert worker.wait(180) == 0, worker.log()
        log = worker.log()
        assert log.count(" consuming ") == 1, log  # never reconnected
        for trouble in ("connection lost", "channel closed", "unreachable", "Traceback"):
            assert trouble not in log, log

        runs: dict[str, list[dict[str, Any]]] = {}
        for run in bed.records("run"):
            runs.setdefault(run["name"], []).append(run)
        dead = _drain(bed, topology.dead_letter_queue(bed.queue))
        ends = {name: dead[name][0].headers[f"{HEADER_PREFIX}reason"] for name in dead}
        ends.update({name: DONE for name in runs if name not in dead})
        assert ends == expected
        # Counted: every published message is either done or in the dead-letter queue, once.
        assert len(runs.keys() - dead.keys()) + len(dead) == len(messages)
        wait_counts(bed.broker, bed.queue, ready=0, unacked=0)

        # The handler ran once per message on its first attempt, forged counts or not, and
        # the neighbours of a poison message in the prefetch window were not run again.
        attempts = {name: [r["attempt"] for r in found] for name, found in runs.items()}
        retried = attempts.pop("forged-counts-retried")
        assert retried == [1, 2, 3]
        assert all(found == [1] for found in attempts.values()), attempts
        assert {name for name in runs if expected[name] != DONE} == set()  # never ran

        # What the handler gets: properties and typed headers.
        [seen] = runs["every-property"]
        assert (seen["correlation_id"], seen["reply_to"], seen["type"], seen["app_id"]) == (
            "corr-1", "replies.node-producer", "resize", "node-producer",
        )  # fmt: skip
        assert (seen["timestamp"], seen["content_encoding"]) == (1_700_000_123, "identity")
        assert seen["message_id"] == "every-property"
        assert runs["every-type"][0]["probe"] == "FieldFloat(3.75, 'd')"
        assert runs["no-message-id-transient"][0]["message_id"] is None
        assert runs["large"][0]["size"] == LARGE_BODY

        # Each dead letter is the message as the broker held it, plus the worker's headers.
        originals = _drain(bed, reference)
        for name, (props, body) in dead.items():
            original, original_body = originals[name]
            assert body == original_body, name
            added = {k: v for k, v in props.headers.items() if k.startswith(HEADER_PREFIX)}
            kept = {k: v for k, v in props.headers.items() if k not in added}
            assert _encoded(kept) == _encoded(original.headers), name
            assert props.delivery_mode == 2  # kept: a dead letter waits for a person
            for prop in ("content_type", "content_encoding", "priority", "correlation_id",
                         "reply_to", "message_id", "timestamp", "type", "app_id"):  # fmt: skip
                assert getattr(props, prop) == getattr(original, prop), (name, prop)
            assert props.expiration is None
            assert added.get(f"{HEADER_PREFIX}original-expiration") == original.expiration
            assert added.get(f"{HEADER_PREFIX}original-user-id") == original.user_id
        assert dead["every-property-dead"][0].user_id is None
        assert dead["every-property-dead"][0].headers[f"{HEADER_PREFIX}original-user-id"] == (
            bed.broker.username
        )
    finally:
        bed.broker.delete_queue(reference)


# frame_max as RabbitMQ negotiates it by default; a content header frame must fit in it.
FRAME_MAX = 131_072


def _headers_leaving(room: int) -> dict[str, Any]:
    """Headers for an application/json message whose content header frame leaves `room`
    bytes of FRAME_MAX. pika publishes it (amqplib cannot write tables past 64 KiB)."""
    entry = 7 + 1 + 1 + 4 + 40  # key and its length, tag, value length and value
    fixed = 8 + 12 + len(b"".join(pika.BasicProperties(
        content_type="application/json", message_id="m" * 32, delivery_mode=2,
        headers={"x-test-name": "huge"},
    ).encode()))  # fmt: skip
    count, rest = divmod(FRAME_MAX - room - fixed, entry)
    headers: dict[str, Any] = {f"k{i:06}": "v" * 40 for i in range(count)}
    headers["pad"] = "p" * max(rest - (1 + 3 + 1 + 4), 0)
    headers["x-test-name"] = "huge"
    return headers


@pytest.mark.parametrize(
    ("room", "reason"),
    [
        # Room for the reason headers (about 235 bytes here) once the error text (about 95)
        # is left out.
        pytest.param(280, "undecodable", id="without-the-error-text"),
        # No room for any: the queue's own dead-lettering moves it as it came.
        pytest.param(20, None, id="by-the-broker"),
    ],
)
def test_headers_that_fill_a_frame_are_dead_lettered_without_a_reconnect(
    bed: WorkerBed, room: int, reason: str | None
) -> None:
    headers = _headers_leaving(room)
    with bed.channel() as channel:
        topology.declare(channel, bed.queue)
        channel.basic_publish(
            "",
            bed.queue,
            b"not json",
            pika.BasicProperties(
                content_type="application/json",
                message_id=uuid.uuid4().hex,
                delivery_mode=2,
                headers=headers,
            ),
        )
    worker = bed.start_worker(JOBTIDE_HANDLER="handlers:hostile", JOBTIDE_WORKER_NAME="w")
    assert worker.wait(60) == 0
    log = worker.log()
    assert log.count(" consuming ") == 1, log
    assert "connection lost" not in log
    [(props, body)] = _drain(bed, topology.dead_letter_queue(bed.queue)).values()
    assert body == b"not json"
    kept = {k: v for k, v in props.headers.items() if k in headers}
    assert _encoded(kept) == _encoded(headers)
    if reason is None:
        assert props.headers["x-death"][0]["reason"] == "rejected"
        assert f"{HEADER_PREFIX}reason" not in props.headers
        assert "no room for the reason headers" in log
    else:
        assert props.headers[f"{HEADER_PREFIX}reason"] == reason
        assert props.headers[f"{HEADER_PREFIX}error"] == ""
    assert bed.records("run") == []
    wait_counts(bed.broker, bed.queue, ready=0, unacked=0)
