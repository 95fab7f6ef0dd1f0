"""Which queued tasks may be sent to a worker before its current one finishes.

A worker that finishes a task otherwise waits a round trip to its daemon for
the next, and every task costs the daemon and the worker one message each
way. For short tasks of one scheduling class, sending a few at once lets the
worker start the next immediately and lets both sides batch their messages.

Only tasks known to be short are pipelined (a long task would hold the ones
queued behind it on a worker while another sits idle), and only when the
follower could take the running task's place exactly: same function
environment, same resources, same owner, nothing bound to devices or
bundles, and a retry budget -- because a follower that a worker death strands
may already have started, re-running it must be something its owner allowed.

Pure: no I/O, unit-tested in tests/unit/test_pipelining.py.
"""
from __future__ import annotations

__all__ = ["RuntimeStats", "can_lead", "can_follow", "PIPELINE_DEPTH"]

PIPELINE_DEPTH = 4            # tasks on one worker at once: 1 running + 3 queued
SHORT_TASK_S = 0.002          # a function whose typical run is below this is "short"
MIN_SAMPLES = 3               # runs seen before trusting the average
_EWMA_WEIGHT = 0.2


class RuntimeStats:
    """A moving average of each function's run time on this node."""

    def __init__(self, short_s: float = SHORT_TASK_S, min_samples: int = MIN_SAMPLES):
        self._short_s = short_s
        self._min_samples = min_samples
        self._stats: dict[bytes, list] = {}     # function id -> [samples, average]

    def observe(self, function_id: bytes, seconds: float) -> None:
        entry = self._stats.get(function_id)
        if entry is None:
            self._stats[function_id] = [1, seconds]
            return
        entry[0] += 1
        entry[1] += _EWMA_WEIGHT * (seconds - entry[1])

    def is_short(self, function_id: bytes) -> bool:
        entry = self._stats.get(function_id)
        return entry is not None and entry[0] >= self._min_samples and entry[1] < self._short_s


def can_lead(task, stats: RuntimeStats) -> bool:
    """May tasks be queued on the worker behind this one?"""
    spec = task.spec
    return (task.actor is None and task.bundle is None and task.allocation is None
            and not task.gpu_ids and not task.cancelled and not task.cpu_lent
            and spec.num_returns >= 0 and spec.max_retries != 0
            and stats.is_short(spec.function_id))


def can_follow(leader, candidate, stats: RuntimeStats) -> bool:
    """May `candidate` run next on the worker running `leader`, in its place?"""
    return (can_lead(candidate, stats)
            and candidate.worker_key == leader.worker_key
            and candidate.hold == leader.hold
            and candidate.owner is leader.owner
            and candidate.spec.job_id == leader.spec.job_id
            and candidate.remote_args is None and leader.remote_args is None)
