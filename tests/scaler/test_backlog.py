"""The oldest waiting message's age from the broker's publish counter (backlog.py): pure.
Against the real broker: test_broker.py."""

from __future__ import annotations

import pytest
from jobtide_scaler.backlog import PublishHistory

pytestmark = pytest.mark.unit


def test_the_oldest_waiting_message_dates_from_when_its_place_was_first_counted() -> None:
    h = PublishHistory()
    assert h.observe(published=0, ready=0, at=0.0) is None
    assert h.observe(published=10, ready=10, at=5.0) == 5.0  # 1..10 counted at 5
    assert h.observe(published=15, ready=15, at=10.0) == 5.0  # 11..15 at 10
    # 1..10 delivered: the 11th is now the oldest waiting.
    assert h.observe(published=15, ready=5, at=20.0) == 10.0
    assert h.observe(published=15, ready=0, at=25.0) is None


def test_messages_waiting_before_the_first_reading_count_from_it() -> None:
    h = PublishHistory()
    assert h.observe(published=100, ready=40, at=7.0) == 7.0
    assert h.observe(published=100, ready=40, at=9.0) == 7.0


def test_a_requeue_moves_the_estimate_to_an_older_place_never_past_the_truth() -> None:
    h = PublishHistory()
    h.observe(published=5, ready=5, at=1.0)
    h.observe(published=10, ready=10, at=2.0)
    assert h.observe(published=10, ready=4, at=3.0) == 2.0  # the 7th: counted at 2
    # Two of the six delivered come back (retries): 6 wait, one of them published no later
    # than the 5th, which was counted at 1.
    assert h.observe(published=10, ready=6, at=4.0) == 1.0


def test_a_counter_that_goes_back_starts_the_history_again() -> None:
    h = PublishHistory()
    h.observe(published=50, ready=50, at=1.0)
    # The broker restarted: its counter starts from 0, the messages are still there.
    assert h.observe(published=3, ready=53, at=30.0) == 30.0
    assert len(h) == 1


def test_history_no_longer_needed_is_dropped_and_a_long_one_thinned_to_a_lower_bound() -> None:
    h = PublishHistory(max_samples=8)
    for i in range(1, 6):
        h.observe(published=i * 10, ready=i * 10, at=float(i))
    assert len(h) == 5
    # Everything up to 30 left the queue: only the sample before the head and later stay.
    assert h.observe(published=50, ready=15, at=6.0) == 4.0
    assert len(h) == 3
    for i in range(6, 20):
        h.observe(published=i * 10, ready=i * 10 - 35, at=float(i))
    assert len(h) <= 8
    truth = 4.0  # the 36th message was counted at 4
    estimate = h.observe(published=190, ready=190 - 35, at=20.0)
    assert estimate is not None
    assert truth <= estimate < 20.0  # later than the truth: the age is a lower bound
