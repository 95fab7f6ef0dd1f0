"""Pipelining rules: which queued tasks may follow a running one on its worker."""
from __future__ import annotations

from types import SimpleNamespace

from meshray.node import pipelining
from meshray.node.pipelining import RuntimeStats, can_follow, can_lead
from meshray.scheduler.resources import ResourceSet

FN = b"f" * 16


def short_stats(function_id=FN) -> RuntimeStats:
    stats = RuntimeStats()
    for _ in range(pipelining.MIN_SAMPLES):
        stats.observe(function_id, 0.0001)
    return stats


def task(**overrides):
    spec = SimpleNamespace(function_id=FN, num_returns=1, max_retries=3, job_id=b"j")
    fields = dict(spec=spec, actor=None, bundle=None, allocation=None, gpu_ids=[],
                  cancelled=False, cpu_lent=False, worker_key="default",
                  hold=ResourceSet.from_dict({"CPU": 1}), owner="driver-1", remote_args=None)
    for key, value in overrides.items():
        if key in ("function_id", "num_returns", "max_retries", "job_id"):
            setattr(spec, key, value)
        else:
            fields[key] = value
    return SimpleNamespace(**fields)


def test_a_function_is_short_only_after_enough_short_runs():
    stats = RuntimeStats()
    for _ in range(pipelining.MIN_SAMPLES - 1):
        stats.observe(FN, 0.0001)
    assert not stats.is_short(FN)
    stats.observe(FN, 0.0001)
    assert stats.is_short(FN)


def test_a_slow_function_stops_being_short():
    stats = short_stats()
    for _ in range(20):
        stats.observe(FN, 0.5)
    assert not stats.is_short(FN)


def test_unknown_functions_are_never_pipelined():
    assert not can_lead(task(), RuntimeStats())


def test_short_tasks_lead_and_follow_their_own_kind():
    stats = short_stats()
    assert can_lead(task(), stats)
    assert can_follow(task(), task(), stats)


def test_what_may_not_lead():
    stats = short_stats()
    for overrides in ({"actor": object()}, {"bundle": ("pg", 0)}, {"gpu_ids": ["0"]},
                      {"max_retries": 0}, {"num_returns": -1}, {"cancelled": True},
                      {"cpu_lent": True}, {"allocation": object()}):
        assert not can_lead(task(**overrides), stats), overrides


def test_a_follower_must_take_the_leaders_place_exactly():
    stats = short_stats()
    leader = task()
    for overrides in ({"worker_key": "env-b"}, {"hold": ResourceSet.from_dict({"CPU": 2})},
                      {"owner": "driver-2"}, {"job_id": b"other"}, {"remote_args": []}):
        assert not can_follow(leader, task(**overrides), stats), overrides
