"""Spill-victim selection for the node's shared-memory object store.

Kept free of I/O and locking so the policy can be unit-tested in microseconds
and swapped without touching the store's file handling: the store hands in a
snapshot of its sealed objects and gets back the ids it should move to disk.
"""

from __future__ import annotations

from typing import Hashable, Iterable, NamedTuple, Optional, Protocol

__all__ = ["SpillCandidate", "choose_spill_victims"]


class _CandidateLike(Protocol):
    object_id: Hashable
    size: int
    last_access: int
    pinned: bool


class SpillCandidate(NamedTuple):
    """One object the store could move to disk.

    ``last_access`` is a monotonic counter rather than a wall-clock time so
    ordering never depends on clock resolution or clock jumps.
    """

    object_id: Hashable
    size: int
    last_access: int
    pinned: bool = False


def choose_spill_victims(
    entries: Iterable[_CandidateLike], need_bytes: int
) -> Optional[list]:
    """Pick the least-recently-used unpinned objects whose sizes cover ``need_bytes``.

    Returns ``[]`` when nothing has to move (``need_bytes <= 0``) and ``None``
    when even spilling every unpinned object would not free enough; the two
    are distinct so the caller can report "store full" without spilling
    anything in vain.  Pinned objects are never chosen because a pin means a
    reader or an in-flight transfer relies on the shared-memory copy, and
    zero-sized objects are skipped because moving them frees nothing.  Ties
    in ``last_access`` keep the input order, so results are deterministic.
    """
    if need_bytes <= 0:
        return []
    movable = [e for e in entries if not e.pinned and e.size > 0]
    if sum(e.size for e in movable) < need_bytes:
        return None
    movable.sort(key=lambda e: e.last_access)
    victims = []
    freed = 0
    for entry in movable:
        victims.append(entry.object_id)
        freed += entry.size
        if freed >= need_bytes:
            break
    return victims
