"""An in-memory stand-in for one RabbitMQ quorum queue and pika's BlockingConnection, for the
runner's unit tests: only what the runner calls, and the faults a test cannot make a real
broker produce at a chosen instant (a channel closed mid-task, a connection dropped mid-task,
a broker that refuses every connection).

Like RabbitMQ it delivers up to the prefetch count per channel, numbers deliveries per channel
from 1, requeues a lost channel's unacked deliveries at the head of the queue with
`redelivered` set and `x-acquired-count` raised, and treats an ack of a tag it never gave on
that channel as a protocol error (here: an AssertionError that fails the test). Like pika, a
channel closed or a connection lost by the broker is seen by the client only when it next
reads from the socket (`process_data_events`)."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions


@dataclasses.dataclass
class Message:
    body: bytes
    message_id: str
    delivery_count: int = 0  # returns so far: the quorum queue's x-acquired-count


@dataclasses.dataclass
class Method:
    delivery_tag: int
    redelivered: bool


class FakeBroker:
    def __init__(self) -> None:
        # Guards everything below; notified when a message is published or requeued.
        self.changed = threading.Condition()
        self.ready: collections.deque[Message] = collections.deque()
        self.connections: list[FakeConnection] = []
        self.refuse_connections = False
        # What the clients did, in order: ("consume", arguments), ("cancel", tag),
        # ("ack", tag, multiple), ("nack", tag), ("dead-letter", message_id, headers).
        self.calls: list[tuple[Any, ...]] = []
        self.acked: list[str] = []  # message ids, in the order their acks arrived

    def publish(self, body: bytes, message_id: str | None = None) -> str:
        message_id = message_id or uuid.uuid4().hex
        with self.changed:
            self.ready.append(Message(body, message_id))
            self.changed.notify_all()
        return message_id

    def open_connection(self) -> FakeConnection:
        with self.changed:
            if self.refuse_connections:
                raise pika.exceptions.AMQPConnectionError("connection refused (fake broker)")
            connection = FakeConnection(self)
            self.connections.append(connection)
            return connection

    def consuming_channel(self) -> FakeChannel:
        [channel] = [c for c in self.connections[-1].channels if c.consumer is not None]
        return channel

    # -- faults, made by the test at the instant it chooses ------------------------------
    def close_consuming_channel(self, reason: str) -> None:
        """As the broker's consumer timeout does: Channel.Close, its deliveries requeued."""
        channel = self.consuming_channel()
        with self.changed:
            channel.broker_closed(reason)

    def drop_connection(self) -> None:
        """As a broker restart does: the socket goes, every delivery is requeued."""
        connection = self.connections[-1]
        with self.changed:
            connection.broker_dropped()

    # -- called with `changed` held ------------------------------------------------------
    def requeue(self, messages: list[Message]) -> None:
        for message in reversed(messages):
            message.delivery_count += 1
            self.ready.appendleft(message)
        self.changed.notify_all()


class FakeConnection:
    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.channels: list[FakeChannel] = []
        self.is_open = True
        self._lost: Exception | None = None  # seen by the client at its next read
        self._timers: list[tuple[float, Callable[[], None]]] = []

    @property
    def is_closed(self) -> bool:
        return not self.is_open

    def channel(self) -> FakeChannel:
        assert self.is_open, "channel() on a closed connection"
        channel = FakeChannel(self)
        self.channels.append(channel)
        return channel

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self._timers.append((time.monotonic() + delay, callback))

    def process_data_events(self, time_limit: float | None = 0) -> None:
        """Deliver what the prefetch windows allow and run due timers; with time_limit None,
        first wait for a delivery or the next timer."""
        callbacks: list[Callable[[], None]] = []
        with self.broker.changed:
            self._raise_if_lost()
            deadline = min((at for at, _ in self._timers), default=None)
            if time_limit is not None:
                deadline = time.monotonic() + time_limit
            while True:
                for channel in self.channels:
                    callbacks.extend(channel.read_frames())
                due = [t for t in self._timers if t[0] <= time.monotonic()]
                for timer in due:
                    self._timers.remove(timer)
                    callbacks.append(timer[1])
                now = time.monotonic()
                if callbacks or deadline is None or now >= deadline:
                    break
                self.broker.changed.wait(deadline - now)
                self._raise_if_lost()
        for callback in callbacks:
            callback()

    def close(self) -> None:
        assert self.is_open, "close() on a closed connection"
        with self.broker.changed:
            self.is_open = False
            for channel in self.channels:
                channel.gone()

    def broker_dropped(self) -> None:
        self._lost = pika.exceptions.StreamLostError("Transport indicated EOF (fake broker)")
        for channel in self.channels:
            channel.consumer = None
            channel.return_unacked()
        self.broker.changed.notify_all()

    def _raise_if_lost(self) -> None:
        if self._lost is not None:
            self.is_open = False
            for channel in self.channels:
                channel.is_open = False
            raise self._lost


class FakeChannel:
    _numbers = itertools.count(1)

    def __init__(self, connection: FakeConnection) -> None:
        self.connection = connection
        self.broker = connection.broker
        self.number = next(self._numbers)
        self.is_open = True
        self.prefetch = 0  # 0: no limit
        self.consumer: Callable[..., None] | None = None
        self.consumer_tag = ""
        self.unacked: dict[int, Message] = {}
        self._tags = itertools.count(1)
        self._closing: str | None = None  # a Channel.Close the client has not read yet
        self._closing_reason: Exception | None = None  # where pika keeps the broker's reason

    @property
    def is_closed(self) -> bool:
        return not self.is_open

    def confirm_delivery(self) -> None:
        pass

    def basic_qos(self, prefetch_count: int) -> None:
        self.prefetch = prefetch_count

    def basic_consume(
        self, queue: str, on_message: Callable[..., None], arguments: dict[str, Any]
    ) -> str:
        self._require_open()
        self.consumer = on_message
        self.consumer_tag = f"ctag-{self.number}"
        self.broker.calls.append(("consume", dict(arguments)))
        return self.consumer_tag

    def basic_cancel(self, consumer_tag: str) -> None:
        self._require_open()
        assert consumer_tag == self.consumer_tag
        self.consumer = None
        self.broker.calls.append(("cancel", consumer_tag))

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self._require_open()
        with self.broker.changed:
            if self._closing is not None:
                return  # the broker discards what arrives on a channel it is closing
            tags = [t for t in self.unacked if t <= delivery_tag] if multiple else [delivery_tag]
            assert delivery_tag in self.unacked, f"ack of unknown delivery tag {delivery_tag}"
            for tag in sorted(tags):
                self.broker.acked.append(self.unacked.pop(tag).message_id)
            self.broker.calls.append(("ack", delivery_tag, multiple))
            self.broker.changed.notify_all()

    def basic_nack(self, delivery_tag: int, requeue: bool = True) -> None:
        self._require_open()
        with self.broker.changed:
            assert delivery_tag in self.unacked, f"nack of unknown delivery tag {delivery_tag}"
            message = self.unacked.pop(delivery_tag)
            self.broker.calls.append(("nack", delivery_tag))
            if requeue:
                self.broker.requeue([message])

    def basic_publish(
        self, exchange: str, routing_key: str, body: bytes, properties: Any, mandatory: bool
    ) -> None:
        self._require_open()
        self.broker.calls.append(("dead-letter", properties.message_id, properties.headers))

    def close(self) -> None:
        with self.broker.changed:
            self.gone()

    # -- the broker's side, called with `changed` held -----------------------------------
    def read_frames(self) -> list[Callable[[], None]]:
        """What the client's next read brings: a pending Channel.Close, or deliveries."""
        if self._closing is not None:
            self.is_open = False
            self._closing_reason = pika.exceptions.ChannelClosedByBroker(406, self._closing)
            self._closing = None
            return []
        deliveries: list[Callable[[], None]] = []
        while (
            self.is_open
            and self.consumer is not None
            and self.broker.ready
            and (not self.prefetch or len(self.unacked) < self.prefetch)
        ):
            message = self.broker.ready.popleft()
            tag = next(self._tags)
            self.unacked[tag] = message
            properties = pika.BasicProperties(
                content_type="application/json",
                message_id=message.message_id,
                headers={"x-acquired-count": message.delivery_count}
                if message.delivery_count
                else {},
            )
            method = Method(tag, redelivered=message.delivery_count > 0)
            consumer = self.consumer
            deliveries.append(
                lambda m=method, p=properties, b=message.body, c=consumer: c(self, m, p, b)
            )
        return deliveries

    def broker_closed(self, reason: str) -> None:
        self._closing = reason
        self.consumer = None
        self.return_unacked()
        self.broker.changed.notify_all()

    def gone(self) -> None:
        self.is_open = False
        self.consumer = None
        self.return_unacked()

    def return_unacked(self) -> None:
        returned = [self.unacked.pop(tag) for tag in sorted(self.unacked)]
        if returned:
            self.broker.requeue(returned)

    def _require_open(self) -> None:
        lost = self.connection._lost
        if lost is not None:
            raise lost
        if not self.is_open:
            raise pika.exceptions.ChannelWrongStateError("Channel is closed.")
