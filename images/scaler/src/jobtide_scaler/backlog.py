"""How long the oldest message of a queue has been waiting, from counters the broker keeps for
every queue type: pure, no broker.

Quorum queues report no head-message timestamp (rabbitmq-server#6813), and taking a message
to look at it would count as a delivery against its `delivery-limit`. So the scaler keeps,
per queue, when it first saw the management API's cumulative `publish` counter reach each
value. Messages leave the waiting (ready) set in publish order, so with `published` messages
so far and `ready` waiting, the oldest waiting one is at most the (published - ready + 1)-th
published, and it had been published by the time the scaler first saw the counter reach that
number. The age is therefore a lower bound, never an overstatement:

- Resolution: one management read (the scaler's poll interval), and the broker's statistics
  interval (5 s by default) by which its counters lag.
- Requeues: a message returned to the queue (a retry) waits again; the estimate then points at
  a message published after it, so that one's age is understated. Any r waiting messages
  include one published no later than the (published - r + 1)-th: the bound holds.
- Messages already waiting when the scaler starts, or when the counter goes back (a broker
  node restarted, the queue was deleted and declared again, statistics were reset), count
  from then: the age restarts from 0 and grows, as a lower bound again.
- Publishers need not set the `timestamp` property: nothing of the message is read.
- A broker whose management statistics are turned off (no `message_stats`) gives no estimate.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Samples kept per queue. When the history grows past this (a backlog that lasts days, polled
# every few seconds), every second sample is dropped: each message then counts from a later
# sample, so the estimate stays a lower bound, only coarser.
MAX_SAMPLES = 4096


@dataclass
class PublishHistory:
    """When the `publish` counter of one queue was first seen at each value."""

    max_samples: int = MAX_SAMPLES
    _counts: list[int] = field(default_factory=list)  # increasing
    _seen_at: list[float] = field(default_factory=list)  # monotonic seconds, increasing

    def observe(self, published: int, ready: int, at: float) -> float | None:
        """Record the counter read at `at`; return the time by which the oldest of `ready`
        waiting messages had been published (None when none waits)."""
        if self._counts and published < self._counts[-1]:
            self._counts.clear()  # the counter went back: start again
            self._seen_at.clear()
        if not self._counts or published > self._counts[-1]:
            self._counts.append(published)
            self._seen_at.append(at)
        if ready <= 0:
            return None
        head = published - ready + 1  # at most the oldest waiting message's place
        # The first sample that had counted it; every count is below `published` + 1.
        index = bisect.bisect_left(self._counts, head)
        since = self._seen_at[index]
        # Samples before the one before it cannot be needed again unless requeues move the
        # head back by more than one sample's worth: then a later one counts (a lower bound).
        if index > 1:
            del self._counts[: index - 1]
            del self._seen_at[: index - 1]
        if len(self._counts) > self.max_samples:
            # Keep the newest; drop every second of the others.
            self._counts[:-1] = self._counts[:-1][1::2]
            self._seen_at[:-1] = self._seen_at[:-1][1::2]
        return since

    def __len__(self) -> int:
        return len(self._counts)
