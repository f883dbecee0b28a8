"""The consumer priority a worker consumes with (RabbitMQ's `x-priority` consume argument).

RabbitMQ hands each message to the highest-priority consumer with a free prefetch slot, and
round-robins only among equal priorities. With `age` (the default) an older worker has a higher
priority, so when the load falls the oldest workers keep the queue's trickle and the younger
surplus gets nothing and leaves by its idle timeout, instead of every worker getting a share
and staying up. With `none` the worker sends no priority: plain round-robin.
"""

from __future__ import annotations

import math

AGE = "age"
NONE = "none"
MODES = (AGE, NONE)

# AMQP's signed 32-bit integer, which every RabbitMQ version accepts for `x-priority`; only
# non-negative values are used, so the default priority 0 of other consumers is never above.
MAX_PRIORITY = 2**31 - 1
# Priorities count seconds down from MAX_PRIORITY from here: distinct for 68 years after it.
EPOCH_UNIX_SECONDS = 1_577_836_800  # 2020-01-01T00:00:00Z


def consumer_priority(mode: str, started_unix_seconds: float) -> int | None:
    """The `x-priority` of a worker started at `started_unix_seconds` (wall clock, so that
    workers on different nodes compare), or None for no priority. Computed once per worker,
    so it is the same on every reconnect. Workers started within the same second share a
    priority and round-robin among themselves."""
    if mode == NONE:
        return None
    if mode != AGE:
        raise ValueError(f"consumer priority mode must be one of {', '.join(MODES)}: {mode!r}")
    seconds = math.floor(started_unix_seconds) - EPOCH_UNIX_SECONDS
    return max(0, min(MAX_PRIORITY, MAX_PRIORITY - seconds))
