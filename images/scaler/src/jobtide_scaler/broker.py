"""Queue counts from RabbitMQ.

The management API gives ready, unacked and consumer counts of every queue of the vhost in one
request, but its figures are as old as the broker's `collect_statistics_interval` (5 s by
default). A passive queue declare over AMQP answers with the live ready and consumer counts,
so when AMQP is reachable those replace the management API's; unacked comes only from the
management API. A queue's reading carries the time of its oldest part, so the loop can tell
fresh data from stale. The management API's `publish` counter of each queue also dates its
oldest waiting message (backlog.py).

With TLS both sources verify the broker's certificate alike (`BrokerConfig.ssl_context`: the
CA bundle and the name checked). A TLS failure no retry can mend is logged naming the problem,
counted as the error kind `broker_tls` and kept in `tls_problem` (the scaler is not ready
while there is one) until that source works again."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pika  # type: ignore[import-untyped]
import pika.exceptions  # type: ignore[import-untyped]
import requests
from jobtide_worker.config import BrokerConfig, BrokerTlsError
from jobtide_worker.management import OddAnswer, management_session, published_count

from jobtide_scaler.backlog import PublishHistory
from jobtide_scaler.retry import retry_after

log = logging.getLogger(__name__)

MANAGEMENT_TIMEOUT = (2.0, 5.0)
AMQP_TIMEOUT = 3.0
COUNT_FIELDS = ("messages_ready", "messages_unacknowledged", "consumers")


class InvalidAnswer(ValueError):
    """The management API answered, but not with this vhost's queues and their counts."""


def _is_count(value: Any) -> bool:
    return value is None or (type(value) is int and value >= 0)


def validated_queues(answer: Any, vhost: str) -> list[dict[str, Any]]:
    """The answer of `/api/queues/{vhost}` when it is one, else InvalidAnswer naming what is
    wrong. A single bad entry rejects the whole answer: counts from a broken or foreign
    answer are never scaled on (the last good ones go stale instead)."""
    if not isinstance(answer, list):
        raise InvalidAnswer(f"expected a list of queues, got {type(answer).__name__}")
    for queue in answer:
        if not isinstance(queue, dict) or not isinstance(queue.get("name"), str):
            raise InvalidAnswer(f"a queue without a name: {str(queue)[:80]!r}")
        name = queue["name"]
        if queue.get("vhost") != vhost:
            raise InvalidAnswer(f"queue {name!r} is of vhost {queue.get('vhost')!r}, not {vhost!r}")
        for field in COUNT_FIELDS:
            if not _is_count(queue.get(field)):
                raise InvalidAnswer(f"queue {name!r}: {field} is {queue[field]!r}, not a count")
        try:
            published_count(queue.get("message_stats"))
        except OddAnswer as e:
            raise InvalidAnswer(f"queue {name!r}: {e}") from None
    return answer


@dataclass(frozen=True)
class QueueReading:
    ready: int
    unacked: int
    consumers: int
    read_at: float  # monotonic seconds of the oldest figure in it
    # The broker's count of messages published to the queue since its statistics began (its
    # last start; jobtide_worker.management.published_count); None when it keeps none
    # (management statistics off): then the oldest waiting message's age is unknown.
    published: int | None = None
    # Monotonic seconds by which the oldest waiting message had been published (a lower bound
    # of its age, backlog.py); None when none was waiting at the management API's reading.
    oldest_waiting_since: float | None = None


@dataclass(frozen=True)
class _Live:
    ready: int
    consumers: int
    read_at: float


class Broker:
    def __init__(
        self,
        settings: BrokerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_error: Callable[[str], None] = lambda kind: None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._on_error = on_error
        self._session = management_session(settings)
        # The lasting TLS failure of each source, None while it works (or fails otherwise).
        self._tls_problems: dict[str, str | None] = {"amqp": None, "management": None}
        self._management: dict[str, QueueReading] = {}
        self._published: dict[str, PublishHistory] = {}  # touched by the management thread only
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="broker-management")
        self._management_not_before = 0.0  # a Retry-After's end; touched by its thread only
        self._live: dict[str, _Live] = {}
        self._connection: pika.BlockingConnection | None = None
        self._channel: pika.adapters.blocking_connection.BlockingChannel | None = None

    @property
    def tls_problem(self) -> str | None:
        """Why TLS to the broker fails for good (a certificate that does not verify, a port
        that does not speak TLS), while it does; None otherwise."""
        return self._tls_problems["amqp"] or self._tls_problems["management"]

    def _tls_failed(self, source: str, problem: str) -> None:
        self._on_error("broker_tls")
        if self._tls_problems[source] != problem:
            log.error("broker %s: TLS failed: %s", source, problem)
        self._tls_problems[source] = problem

    def _tls_works(self, source: str) -> None:
        if self._tls_problems[source] is not None:
            log.info("broker %s: TLS works again", source)
        self._tls_problems[source] = None

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._session.close()
        self._close_amqp()

    def read(
        self, queues: Iterable[str], counted_only: Iterable[str] = ()
    ) -> dict[str, QueueReading]:
        """The latest reading of each queue that was ever read; absent queues are missing.
        `counted_only` queues (dead-letter queues: shown, never scaled on) take the management
        API's figures alone, without a passive declare each cycle."""
        wanted = list(dict.fromkeys(queues))
        # Stamped here, before either source is asked: the management API's figures are at
        # least that old (older, by the broker's statistics interval), so a passive declare
        # made after it counts as fresher. Stamped in the pool's thread instead, a thread that
        # started late (a busy machine) made stale management figures win over live ones.
        asked_at = self.clock()
        # The two sources answer in parallel: the management request takes about as long as
        # fifty passive declares.
        management = self._pool.submit(self._read_management, asked_at)
        self._read_amqp(wanted)
        management.result()
        readings = {q: self._management[q] for q in counted_only if q in self._management}
        for queue in wanted:
            managed = self._management.get(queue)
            if managed is None:
                continue
            live = self._live.get(queue)
            if live is not None and live.read_at >= managed.read_at:
                readings[queue] = dataclasses.replace(
                    managed,
                    ready=live.ready,
                    consumers=live.consumers,
                    read_at=min(live.read_at, managed.read_at),
                )
            else:
                readings[queue] = managed
        return readings

    def _read_management(self, asked_at: float) -> None:
        if asked_at < self._management_not_before:
            return  # the server asked us to wait; the last figures age meanwhile
        vhost = quote(self.settings.vhost, safe="")
        url = f"{self.settings.management_url}/api/queues/{vhost}"
        try:
            response = self._session.get(
                url,
                params={
                    "columns": "name,vhost,messages_ready,messages_unacknowledged,consumers,"
                    "message_stats.publish"
                },
                timeout=MANAGEMENT_TIMEOUT,
            )
            wait = retry_after(response.headers.get("Retry-After"))
            if response.status_code in (429, 503) and wait is not None:
                self._tls_works("management")  # it answered, over TLS if TLS is on
                self._management_not_before = self.clock() + wait
                self._on_error("broker_management_throttled")
                log.warning(
                    "broker management API: HTTP %d, asking again in %.0f s (Retry-After)",
                    response.status_code,
                    wait,
                )
                return
            response.raise_for_status()
            try:
                answer = response.json()
            except requests.JSONDecodeError as e:
                raise InvalidAnswer(f"not JSON ({e})") from e
            queues = validated_queues(answer, self.settings.vhost)
        except InvalidAnswer as e:
            self._tls_works("management")
            self._on_error("broker_management_invalid")
            log.warning("broker management API: an answer not used: %s", e)
            return
        except (requests.RequestException, ValueError) as e:
            problem = self.settings.tls_problem(e, port=self.settings.management_port)
            if problem is not None:
                self._tls_failed("management", problem)
                return
            if isinstance(e, (requests.HTTPError, ValueError)):
                self._tls_works("management")  # the broker answered over TLS
            self._on_error("broker_management")
            log.warning("broker management API: %s", e)
            return
        self._tls_works("management")
        # After the answer: a message counted in it was published by now (backlog.py).
        answered_at = self.clock()
        # Queues that disappeared are forgotten, so their pipelines count as missing.
        self._management = {q["name"]: self._reading(q, asked_at, answered_at) for q in queues}
        self._published = {
            name: history for name, history in self._published.items() if name in self._management
        }

    def _reading(self, queue: dict[str, Any], asked_at: float, answered_at: float) -> QueueReading:
        name = queue["name"]
        ready = int(queue.get("messages_ready") or 0)
        published = published_count(queue.get("message_stats"))
        since = None
        if published is None:
            self._published.pop(name, None)
        else:
            history = self._published.setdefault(name, PublishHistory())
            since = history.observe(published, ready, answered_at)
        return QueueReading(
            ready,
            int(queue.get("messages_unacknowledged") or 0),
            int(queue.get("consumers") or 0),
            asked_at,
            published=published,
            oldest_waiting_since=since,
        )

    def _open_amqp(self) -> pika.adapters.blocking_connection.BlockingChannel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        if self._connection is None or not self._connection.is_open:
            self._connection = self.settings.connect(
                "jobtide-scaler",
                # Used only briefly each cycle, possibly minutes apart: a dead connection
                # shows on the next declare and is opened again.
                heartbeat_seconds=0,
                socket_timeout=AMQP_TIMEOUT,
                blocked_connection_timeout=AMQP_TIMEOUT,
            )
            self._tls_works("amqp")
        self._channel = self._connection.channel()
        return self._channel

    def _close_amqp(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
        self._connection = None
        self._channel = None

    def _read_amqp(self, queues: list[str]) -> None:
        for queue in queues:
            try:
                channel = self._open_amqp()
                ok = channel.queue_declare(queue, passive=True)
            except pika.exceptions.ChannelClosedByBroker as e:
                # 404: the queue does not exist (yet). Only this channel closed.
                self._live.pop(queue, None)
                if e.reply_code != 404:
                    self._on_error("broker_amqp")
                    log.warning("broker AMQP: declaring %s: %s", queue, e)
                continue
            except BrokerTlsError as e:
                self._tls_failed("amqp", str(e))
                self._close_amqp()
                return
            except (pika.exceptions.AMQPError, OSError) as e:
                self._on_error("broker_amqp")
                log.warning("broker AMQP: %r; using the management API's counts", e)
                self._close_amqp()
                return
            self._live[queue] = _Live(
                ok.method.message_count, ok.method.consumer_count, self.clock()
            )
