"""The scaling policy: worked cases and properties over random counts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jobtide_scaler.policy import Observation, PipelineSettings, jobs_to_create, limiting_cap

pytestmark = pytest.mark.unit


def policy(
    per_worker: int = 1,
    min_workers: int = 0,
    max_workers: int = 20,
    max_new: int = 10,
    activation: int = 0,
) -> PipelineSettings:
    return PipelineSettings(per_worker, min_workers, max_workers, max_new, activation)


def seen(ready: int = 0, unacked: int = 0, active: int = 0, fresh: bool = True) -> Observation:
    return Observation(ready, unacked, active, fresh)


def one(p: PipelineSettings, o: Observation, total: int = 1000) -> int:
    return jobs_to_create({"p": (p, o)}, total)["p"]


@pytest.mark.parametrize(
    ("settings", "observation", "expected"),
    [
        pytest.param(policy(), seen(), 0, id="empty queue"),
        pytest.param(policy(), seen(ready=3), 3, id="one worker per message"),
        pytest.param(policy(per_worker=2), seen(ready=5), 3, id="ceil(5/2)"),
        pytest.param(policy(per_worker=10), seen(ready=1), 1, id="backlog and no worker: one"),
        # Active Jobs include the pending ones (no pod running yet, e.g. waiting for a node).
        pytest.param(policy(), seen(ready=5, active=5), 0, id="cold pool: no storm"),
        pytest.param(policy(), seen(ready=5, active=2), 3, id="pending count"),
        pytest.param(policy(), seen(ready=0, unacked=4, active=4), 0, id="in flight covered"),
        pytest.param(policy(), seen(ready=2, unacked=4, active=4), 2, id="5114: no waiting"),
        pytest.param(policy(max_workers=4), seen(ready=9), 4, id="max_workers"),
        pytest.param(policy(max_new=3), seen(ready=9), 3, id="max_new_per_cycle"),
        pytest.param(policy(activation=5), seen(ready=5), 0, id="at activation: nothing"),
        pytest.param(policy(activation=5), seen(ready=6), 6, id="above activation"),
        pytest.param(policy(min_workers=2), seen(), 2, id="min_workers"),
        pytest.param(policy(min_workers=2), seen(fresh=False), 0, id="stale: not even min"),
        pytest.param(policy(), seen(ready=50, fresh=False), 0, id="stale: nothing"),
        pytest.param(policy(), seen(ready=1, active=7), 0, id="more active than wanted"),
    ],
)
def test_worked_cases(settings: PipelineSettings, observation: Observation, expected: int) -> None:
    assert one(settings, observation) == expected


def test_global_cap_is_split_max_min_fair() -> None:
    pipelines = {
        "a": (policy(), seen(ready=10, active=4)),
        "b": (policy(), seen(ready=10, active=0)),
        "c": (policy(), seen(ready=1, active=0)),
    }
    # 10 active allowed, 4 in use: room 6. c wants 1; a and b level out at 5 workers each.
    assert jobs_to_create(pipelines, 10) == {"a": 1, "b": 4, "c": 1}


def test_global_cap_counts_stale_pipelines_active_jobs() -> None:
    pipelines = {
        "stale": (policy(), seen(ready=9, active=8, fresh=False)),
        "fresh": (policy(), seen(ready=9)),
    }
    assert jobs_to_create(pipelines, 10) == {"stale": 0, "fresh": 2}


@pytest.mark.parametrize(
    ("settings", "observation", "granted", "cap"),
    [
        pytest.param(policy(max_workers=4), seen(ready=9), 4, "maxWorkers", id="reaches its cap"),
        pytest.param(policy(max_workers=4), seen(ready=9, active=4), 0, "maxWorkers", id="at it"),
        pytest.param(policy(max_workers=4), seen(ready=4), 4, None, id="demand fits exactly"),
        pytest.param(policy(max_new=3), seen(ready=9), 3, None, id="paced, not capped"),
        pytest.param(policy(), seen(ready=9), 2, "maxTotalWorkers", id="room shared out"),
        pytest.param(policy(max_workers=4), seen(ready=9, fresh=False), 0, None, id="stale"),
    ],
)
def test_limiting_cap_names_the_cap_that_holds_a_pipeline_back(
    settings: PipelineSettings, observation: Observation, granted: int, cap: str | None
) -> None:
    assert limiting_cap(settings, observation, granted) == cap


def test_invalid_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match="messagesPerWorker"):
        policy(per_worker=0)
    with pytest.raises(ValueError, match="minWorkers"):
        policy(min_workers=3, max_workers=2)
    with pytest.raises(ValueError, match="ready"):
        seen(ready=-1)


policies = st.builds(
    lambda per, low, extra, new, act: PipelineSettings(per, low, max(1, low + extra), new, act),
    st.integers(1, 20),
    st.integers(0, 10),
    st.integers(0, 30),
    st.integers(1, 15),
    st.integers(0, 20),
)


@st.composite
def observations(draw: st.DrawFn) -> Observation:
    active = draw(st.integers(0, 60))
    return Observation(
        ready=draw(st.integers(0, 500)),
        unacked=draw(st.integers(0, active)),
        active_jobs=active,
        broker_fresh=draw(st.booleans()),
    )


pipeline_maps = st.dictionaries(
    st.text("abcdef", min_size=1, max_size=3), st.tuples(policies, observations()), max_size=5
)


@given(pipeline_maps, st.integers(0, 200))
def test_never_negative_never_above_caps(
    pipelines: dict[str, tuple[PipelineSettings, Observation]], total: int
) -> None:
    decision = jobs_to_create(pipelines, total)
    assert decision.keys() == pipelines.keys()
    active = sum(o.active_jobs for _, o in pipelines.values())
    assert sum(decision.values()) <= max(0, total - active)
    for name, (p, o) in pipelines.items():
        assert 0 <= decision[name] <= p.max_new_per_cycle
        assert decision[name] == 0 or o.active_jobs + decision[name] <= p.max_workers
        if not o.broker_fresh:
            assert decision[name] == 0


@given(policies, observations(), st.integers(0, 500), st.integers(0, 200))
def test_a_smaller_backlog_never_gets_more(
    p: PipelineSettings, o: Observation, less: int, total: int
) -> None:
    smaller = Observation(max(0, o.ready - less), o.unacked, o.active_jobs, o.broker_fresh)
    others = {"other": (policy(), seen(ready=30, active=3))}
    bigger_decision = jobs_to_create({"p": (p, o), **others}, total)["p"]
    smaller_decision = jobs_to_create({"p": (p, smaller), **others}, total)["p"]
    assert smaller_decision <= bigger_decision


@given(policies, observations())
def test_backlog_without_workers_starts_one(p: PipelineSettings, o: Observation) -> None:
    idle_queue = Observation(o.ready, 0, 0, True)
    if idle_queue.ready > p.activation_messages and p.max_workers and p.max_new_per_cycle:
        assert one(p, idle_queue, total=1) == 1
