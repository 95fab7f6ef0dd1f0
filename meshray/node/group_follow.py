"""Which placement-group records a node follows: a slice of them, and those it needs.

A group's record changes a few times in its life (created, placed, ready,
moved, removed). Followed by every member, each change is a delivery -- and a
JSON parse -- at all N nodes: a thousand groups on a thousand nodes are some
three million, which is what collapsed the groups scenario at 1,000 nodes
(docs/scale.md). A node needs a group's record for three things only:

- placing it: the node responsible for a waiting group (rendezvous hashing,
  placement/policy.py) acts at once, any node that knows of it acts on a
  full pass;
- routing work for it: a task or an actor with the group's strategy,
  submitted here, goes to the node holding its bundle;
- carrying out its bundles here: telling a bundle that left this node's
  allocation record because its group was removed from one that moved.

So once the cluster is big enough to slice the members' availability
(avail_slice.py: the same bits, the same hysteresis), a node follows

- the *slice* of the groups whose ids share its top bits: one key range, one
  watch. It places those. A group's id begins with the prefix of the node it
  was created on (common/id_types.py), so the creating node follows its
  groups with no extra watch, and so do the slice's ~64-128 members, which
  share the placing;
- each *other* group it needs: one with a bundle in its allocation record,
  or with work waiting here. One watch on that key, while needed.

Alternatives weighed: one watch per group a node needs, and no slice (then
who places a waiting group nobody here needs? every node would still have to
learn of each new group); asking etcd at each decision (a read per routed
task); a slice of groups with no extra watches (work submitted for a group
from another slice would wait blind).

What safety rests on: placement is decided by etcd transactions that compare
every record involved (placement/placing.py), so not following a group never
makes a node act on stale data of it: it only does not act. A waiting group
is followed by every live member of its slice; where the slice has none, the
responsible node is picked among all members (`followers`), and every node
lists the groups in etcd on its slow garbage pass anyway. A bundle that
leaves this node for a group not followed yet is taken as moved, not
removed: its work is retried and learns the truth from the record.

`followers` and `plan` are pure; `InterestViews` carries out the plan with
one etcd mirror per group.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from meshray.node import avail_slice

__all__ = ["followers", "slice_members", "plan", "InterestViews"]

log = logging.getLogger(__name__)


def slice_members(live: Iterable[str], bits: int) -> Dict[Optional[int], List[str]]:
    """Live node ids grouped by the slice they follow at `bits` (one key,
    None, at bits 0; ids that are not hex, from etcd, in no group)."""
    if bits == 0:
        return {None: list(live)}
    shift = avail_slice.ID_BITS - bits
    groups: Dict[Optional[int], List[str]] = {}
    for node in live:
        head = avail_slice.id_prefix(node)
        if head is not None:
            groups.setdefault(head >> shift, []).append(node)
    return groups


def followers(pg_hex: str, members: Dict[Optional[int], List[str]], bits: int,
              live: List[str]) -> List[str]:
    """The live nodes following group `pg_hex`'s slice (`members` from
    slice_members at the same `bits`), or every live node where none does."""
    if bits == 0:
        return live
    head = avail_slice.id_prefix(pg_hex)
    if head is None:
        return live
    return members.get(head >> (avail_slice.ID_BITS - bits)) or live


def plan(wanted: Iterable[str], following: Iterable[str],
         covered: Callable[[str], bool]) -> Tuple[List[str], List[str]]:
    """(groups to start following by key, groups to stop following).

    `wanted`: the groups this node needs; `following`: those it follows by
    key now; `covered`: whether its slice holds a group already."""
    wanted_set = {pg for pg in wanted if not covered(pg)}
    following_set = set(following)
    return sorted(wanted_set - following_set), sorted(following_set - wanted_set)


class InterestViews:
    """One mirror of ``pgs/<id>`` per group followed outside the slice.

    `want` is called from the daemon's event loop (it only records the wish);
    `reconcile`, on the membership thread, starts and stops the mirrors,
    whose changes go to `on_change` as the slice's do.
    """

    def __init__(self, keys, node_hex: str, on_change: Callable[[list], None],
                 forget: Callable[[str], None]):
        self._keys = keys
        self._me = node_hex
        self._on_change = on_change
        self._forget = forget
        self._lock = threading.Lock()
        self._wanted: frozenset = frozenset()
        self._views: Dict[str, object] = {}
        # The slice of pgs/ the node follows (set by the membership as its
        # slice view restarts), and whether that view has listed it.
        self.bits = 0
        self.slice_listed = False

    def covered(self, pg_hex: str) -> bool:
        """Whether this node's slice holds group `pg_hex`."""
        return avail_slice.in_slice(pg_hex, self._me, self.bits)

    def follows(self, pg_hex: str) -> bool:
        """Whether this node has the group's record if it exists: its slice
        holds it, or a mirror of it has listed it."""
        if self.covered(pg_hex):
            return self.slice_listed
        with self._lock:
            view = self._views.get(pg_hex)
        return view is not None and view.watch is not None

    def want(self, groups: Iterable[str]) -> bool:
        """Record the groups the node needs now; True if some are followed
        by neither the slice nor a mirror (a reconcile is due)."""
        wanted = frozenset(groups)
        with self._lock:
            changed = wanted != self._wanted
            self._wanted = wanted
            views = set(self._views)
        if not changed:
            return False
        start, stop = plan(wanted, views, self.covered)
        return bool(start or stop)

    def want_one(self, pg_hex: str) -> bool:
        """Add one group to those needed; True if a reconcile is due."""
        if self.covered(pg_hex):
            return False
        with self._lock:
            if pg_hex in self._wanted:
                return False
            self._wanted = self._wanted | {pg_hex}
            return pg_hex not in self._views

    def reconcile(self, coordinator, start_timeout: float) -> None:
        """Start a mirror for each group wanted and not covered; stop those
        no longer wanted (and forget their records, unless covered)."""
        from meshray.coordination.mirror import PrefixMirror
        with self._lock:
            wanted, following = self._wanted, list(self._views)
        start, stop = plan(wanted, following, self.covered)
        for pg_hex in stop:
            with self._lock:
                view = self._views.pop(pg_hex, None)
            if view is not None:
                view.stop()
            if not self.covered(pg_hex):
                self._forget(pg_hex)
        for pg_hex in start:
            key = self._keys.pg(pg_hex)
            # The exact key: "\0" is the first byte any longer key could add.
            view = PrefixMirror(coordinator, key, on_change=self._on_change, end=key + "\0")
            with self._lock:
                self._views[pg_hex] = view
            try:
                view.start(timeout=start_timeout)
            except Exception:  # noqa: BLE001 - retried on the next reconcile
                with self._lock:
                    self._views.pop(pg_hex, None)
                view.stop()
                raise

    def following(self) -> List[str]:
        with self._lock:
            return list(self._views)

    def stop(self) -> None:
        with self._lock:
            views, self._views = list(self._views.values()), {}
        for view in views:
            view.stop()
