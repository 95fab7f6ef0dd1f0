"""Which worker a node kills when it runs low on memory: pure decisions.

The node's memory monitor (node/memory_monitor.py) samples usage and lists
what runs; everything it decides comes from here, so the policy is tested
without processes.

Usage: a node can sit under several ceilings at once -- the host's RAM, the
cgroup v2 or v1 limit of its container -- and the one with the smallest limit
is the one it hits first, so that reading is the node's usage.

Whom to kill (Ray's group-by-owner policy, in our words): work that a kill
costs least goes first.

1. Tasks before actors: a task's retry loses one task's progress, an actor's
   death loses its state and fails every caller.
2. Retriable work before work whose kill fails it for good.
3. Among those, tasks are grouped by owner (the process that submitted
   them) and the largest group pays: the owner that fanned out most is the
   one filling the node, and its other tasks keep it making progress.
   Equal groups: the one whose newest task started last.
4. Within the group, the newest task: it has the least progress to lose.

Retries (Ray's rules): a task killed for memory is retried apart from its
`max_retries` budget (a task with `max_retries=0` is not retried), up to
`task_oom_retries` times (-1: without limit), each retry after a doubling
delay capped at a minute, so a node that stays full is not thrashed. What
keeps that from looping forever: the last running task of an owner on the
node is never killed as retriable -- its kill fails it with the figures --
so every owner keeps one task making progress.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

__all__ = ["MemoryReading", "effective_usage", "over_threshold", "Candidate",
           "choose_victim", "kill_order", "oom_retry_allowed", "oom_retry_delay"]

OOM_RETRY_DELAY_CAP_S = 60.0


@dataclass(frozen=True)
class MemoryReading:
    """One ceiling the node lives under and how much of it is used (bytes)."""

    source: str          # "host", "cgroup v2", "cgroup v1", "test limit"
    used: int
    limit: int           # 0: no limit from this source

    @property
    def fraction(self) -> float:
        return self.used / self.limit if self.limit > 0 else 0.0


def effective_usage(readings) -> MemoryReading | None:
    """The reading with the smallest limit (None when no source has one)."""
    limited = [reading for reading in readings if reading is not None and reading.limit > 0]
    if not limited:
        return None
    return min(limited, key=lambda reading: (reading.limit, -reading.used))


def over_threshold(usage: MemoryReading | None, threshold: float) -> bool:
    """Whether `usage` is past `threshold` (a fraction of its limit)."""
    return usage is not None and usage.limit > 0 and usage.used > threshold * usage.limit


@dataclass(frozen=True)
class Candidate:
    """A worker the monitor may kill, as the policy sees it."""

    worker_id: bytes
    owner: bytes          # who submitted its task (the owner's worker id)
    started_at: float     # when its task (or actor) began: newer is killed first
    retriable: bool       # a kill is retried (task) or restarted (actor)
    is_actor: bool = False


def oom_retry_allowed(max_retries: int, oom_kills: int, oom_retries: int) -> bool:
    """Whether a task killed for memory `oom_kills` times before may be retried
    once more: not with `max_retries=0`; else up to `oom_retries` (-1: always)."""
    return max_retries != 0 and (oom_retries < 0 or oom_kills < oom_retries)


def oom_retry_delay(oom_kills: int, base_s: float) -> float:
    """How long the retry after the `oom_kills`-th kill (1, 2, ...) waits: doubling from `base_s`."""
    return min(OOM_RETRY_DELAY_CAP_S, base_s * (2 ** max(0, min(oom_kills - 1, 16))))


def choose_victim(usage: MemoryReading | None, threshold: float,
                  candidates) -> Candidate | None:
    """The worker to kill now, or None (under the threshold, or nothing runs).

    The victim's `retriable` says whether its kill is retried: an owner's last
    running task is not (see the module docstring).
    """
    if not over_threshold(usage, threshold):
        return None
    return _next_victim(_keep_one_per_owner(candidates))


def _keep_one_per_owner(candidates) -> list[Candidate]:
    """Candidates with an owner's only running task marked not retriable."""
    candidates = list(candidates)
    tasks_of: dict[bytes, int] = defaultdict(int)
    for candidate in candidates:
        if not candidate.is_actor:
            tasks_of[candidate.owner] += 1
    return [replace(candidate, retriable=False)
            if not candidate.is_actor and candidate.retriable and tasks_of[candidate.owner] == 1
            else candidate for candidate in candidates]


def kill_order(candidates) -> list[Candidate]:
    """Every candidate in the order successive kills would take them (each
    kill judged among those still running)."""
    left, order = list(candidates), []
    while left:
        victim = _next_victim(_keep_one_per_owner(left))
        order.append(victim)
        left = [c for c in left if c.worker_id != victim.worker_id]
    return order


def _next_victim(candidates: list) -> Candidate | None:
    if not candidates:
        return None
    groups: dict[tuple, list] = defaultdict(list)
    for candidate in candidates:
        groups[(candidate.is_actor, candidate.retriable, candidate.owner)].append(candidate)

    def rank(key):
        is_actor, retriable, _owner = key
        members = groups[key]
        return (is_actor, not retriable, -len(members),
                -max(member.started_at for member in members))

    chosen = min(groups, key=rank)
    return max(groups[chosen], key=lambda member: member.started_at)
