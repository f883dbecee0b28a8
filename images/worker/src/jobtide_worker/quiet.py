"""Leave when the queue is silent (docs/simulator.md, "Leave when the queue is silent").

An idle worker cannot tell from its own messages whether its queue is still fed (with
consumer priorities a young worker gets nothing either way) or has fallen silent. The queue's
counters in the management API can: an idle worker reads them every `quietCheckSeconds` and
leaves as soon as a read finds the cumulative `publish` counter unchanged since its previous
read and nothing ready. A queue that is still fed keeps it up to its idle timeout.

The decision, `queue_silent`, is pure and is the one the simulator runs. `QueueWatch` does the
reads. The counter is as old as the broker's last statistics refresh
(`collect_statistics_interval`, 5 s by default): two reads closer together than that can find
the same counter although something was published, which is why the read interval may not be
shorter (`pipeline_settings.STATISTICS_INTERVAL_SECONDS`).

A read that fails, answers oddly or finds no publish counter (a broker that keeps no
statistics) changes nothing: the idle timeout still ends the wait. Such a problem is logged
once per kind, never with the credentials. A restarted broker answers `message_stats: []`
until something is published again: 0 published since the restart
(`jobtide_worker.management.published_count`, which the scaler reads the counter with too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests

from jobtide_worker.config import BrokerConfig
from jobtide_worker.management import OddAnswer, count, management_session, published_count

__all__ = [
    "COLUMNS",
    "FIRST_READ_SECONDS",
    "OddAnswer",
    "QueueCounters",
    "QueueWatch",
    "counters_from_answer",
    "queue_silent",
]

# The first read of an idle spell, this long after the worker's last message: not between two
# messages taken back to back (a busy worker reads nothing), and one consumer tick.
FIRST_READ_SECONDS = 0.5
# The fields read: `GET /api/queues/{vhost}/{queue}?columns=...`.
COLUMNS = "message_stats.publish,messages_ready,reductions"
# Connect and read timeouts of one read: a hanging management API must not keep an idle
# worker's connection unserviced for long (its heartbeats wait meanwhile).
READ_TIMEOUT = (2.0, 3.0)


@dataclass(frozen=True)
class QueueCounters:
    """One read of a queue's counters."""

    published: int  # message_stats.publish: messages published to the queue so far
    ready: int  # messages_ready
    # The queue process's `reductions` (its work so far, Erlang's measure) as of the broker's
    # last statistics refresh, or None where not reported. Emitting its statistics is work,
    # so they grow at every refresh, even on a queue with nothing to do: two reads with the
    # same value fell between the same two refreshes.
    reductions: int | None = None


def queue_silent(previous: QueueCounters | None, current: QueueCounters) -> bool:
    """Whether an idle worker may leave: nothing published between its previous read (of the
    same idle spell) and this one, and nothing ready. Only when the broker refreshed its
    statistics in between: it does so about every 5 s (`collect_statistics_interval`), the
    reads' own period, but its period wanders (4.6-5.1 s measured, more on a loaded broker),
    and two reads between the same two refreshes see the same publish counter however busy
    the queue is (a fed queue looked silent). Such a read decides nothing; the next one will."""
    if previous is None or current.published != previous.published or current.ready != 0:
        return False
    return current.reductions is None or current.reductions != previous.reductions


def counters_from_answer(answer: Any) -> QueueCounters:
    """The counters of `GET /api/queues/{vhost}/{queue}?columns=message_stats.publish,
    messages_ready`; OddAnswer naming what is missing or wrong."""
    if not isinstance(answer, dict):
        raise OddAnswer(f"expected a queue object, got {type(answer).__name__}")
    published = published_count(answer.get("message_stats"))
    if published is None:
        raise OddAnswer("no message_stats.publish (the broker keeps no message statistics?)")
    reductions = answer.get("reductions")
    return QueueCounters(
        published=published,
        ready=count("messages_ready", answer.get("messages_ready")),
        reductions=None if reductions is None else count("reductions", reductions),
    )


class QueueWatch:
    """Reads one queue's counters with the broker's credentials and TLS; the session is
    opened on the first read, so a worker with the reads off opens none."""

    def __init__(self, broker: BrokerConfig, queue: str) -> None:
        self._broker = broker
        vhost = quote(broker.vhost, safe="")
        self.url = f"{broker.management_url}/api/queues/{vhost}/{quote(queue, safe='')}"
        self._session: requests.Session | None = None

    def read(self) -> QueueCounters:
        """The queue's counters now; raises OddAnswer, or requests' errors for a failed read
        (an HTTP error status included)."""
        if self._session is None:
            self._session = management_session(self._broker)
        response = self._session.get(
            self.url,
            params={"columns": COLUMNS},
            timeout=READ_TIMEOUT,
        )
        response.raise_for_status()
        try:
            answer = response.json()
        except requests.JSONDecodeError as e:
            raise OddAnswer(f"not JSON ({e})") from e
        return counters_from_answer(answer)

    def problem(self, error: BaseException) -> str:
        """`error` in words, without the credentials: a TLS problem named, else its class and
        text (requests never puts the session's credentials into either)."""
        tls = self._broker.tls_problem(error, port=self._broker.management_port)
        if tls is not None:
            return tls
        if isinstance(error, requests.HTTPError) and error.response is not None:
            return f"HTTP {error.response.status_code} from {self.url}"
        return f"{type(error).__name__}: {error}"

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
