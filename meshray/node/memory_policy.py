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
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

__all__ = ["MemoryReading", "effective_usage", "over_threshold", "Candidate",
           "choose_victim", "kill_order"]


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


def choose_victim(usage: MemoryReading | None, threshold: float,
                  candidates) -> Candidate | None:
    """The worker to kill now, or None (under the threshold, or nothing runs)."""
    if not over_threshold(usage, threshold):
        return None
    return _next_victim(list(candidates))


def kill_order(candidates) -> list[Candidate]:
    """Every candidate in the order successive kills would take them."""
    left, order = list(candidates), []
    while left:
        victim = _next_victim(left)
        order.append(victim)
        left.remove(victim)
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
