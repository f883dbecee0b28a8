"""Retry-After, as both the apiserver (API Priority and Fairness) and proxies in front of the
management API send it with 429 and 503."""

from __future__ import annotations

import math

# The longest Retry-After honoured: a proxy asking for an hour must not blind the scaler
# for an hour (its readings go stale meanwhile, so it creates nothing anyway).
MAX_RETRY_AFTER = 300.0


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (the delay form; an HTTP date counts as 1 s)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return 1.0
    if math.isnan(seconds):
        return 1.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)
