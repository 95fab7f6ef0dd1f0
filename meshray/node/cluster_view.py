"""This node's picture of its peers: who is a member, how much room each has,
which offers are still out, and who is known dead.

One object holds it so one writer changes it: the daemon feeds it what
arrives (the etcd view, the load a peer attaches to its batches, offers sent
and answered, deaths) and asks it for the views the placement policy
decides on. It does no I/O and reads no clock: times come in with the
events, so it is tested with plain values (tests/unit/test_cluster_view.py).

Where a peer's room comes from (scheduler/peer_load.py): the newer of its
etcd availability and the load on its last batch, less the offers still
unanswered there, so the same room is never offered twice.

Deciding over every member costs O(N) per task (a NodeView per peer, then a
scan), which at a thousand members is tens of milliseconds a task. So a
DEFAULT decision looks first at a few peers picked at random (`sample_peers`,
the "power of k choices" of Sparrow-style schedulers) and only falls back to
the whole view when none of them has room: per-task cost is independent of N
while the cluster has room somewhere, and a task is declared infeasible or
left waiting only on the whole view.

In a big cluster the node follows the availability of a slice of the members
only (node/avail_slice.py); the sample is drawn from the slice. A peer
outside it that has not sent us its load lately is shown with its whole
total free: nothing says it is busy, and the offer is how we find out (it
refuses what it cannot start, and its refusal carries its load). A sampled
decision still prefers the slice, whose figures are known.
"""
from __future__ import annotations

import random

from meshray.common import ids
from meshray.node import avail_slice
from meshray.scheduler import peer_load, policy
from meshray.scheduler.resources import ResourceSet

__all__ = ["ClusterView", "SPILL_SAMPLE", "OUTSIDE_LOAD_S"]

# Peers examined per sampled decision: enough that one with room is almost
# always among them when a fair share of the cluster has room.
SPILL_SAMPLE = 8
# How long the load on a batch from a peer outside the availability slice
# stands for its room. Past that, nothing newer can come (its availability
# is not followed), so it is shown free again and a later offer finds out.
OUTSIDE_LOAD_S = 5.0


class _Sampleable:
    """A set of node ids that can be sampled: O(1) to add and remove (a
    list and each id's place in it), so the view's update stays O(changes)."""

    def __init__(self, items=()):
        self._list: list[str] = []
        self._index: dict[str, int] = {}
        for item in items:
            self.add(item)

    def add(self, item: str) -> None:
        if item not in self._index:
            self._index[item] = len(self._list)
            self._list.append(item)

    def discard(self, item: str) -> None:
        place = self._index.pop(item, None)
        if place is None:
            return
        last = self._list.pop()
        if place < len(self._list):
            self._list[place] = last
            self._index[last] = place

    def __len__(self) -> int:
        return len(self._list)

    def __contains__(self, item) -> bool:
        return item in self._index

    def sample(self, rng: random.Random, k: int) -> list:
        """`k` of them at random (all of them, in any order, when no more)."""
        return rng.sample(self._list, k) if len(self._list) > k else list(self._list)


class ClusterView:
    def __init__(self, node_hex: str, rng: random.Random | None = None):
        self.node_hex = node_hex
        self._rng = rng or random.Random()
        self._peer_ids = _Sampleable()              # members but us, for sampling
        self.avail_bits = 0                         # the availability slice followed
        self._slice_ids = _Sampleable()             # peers in it (all peers at bits 0)
        self.nodes: dict[str, dict] = {}            # node -> its etcd record (members only)
        self.avail: dict[str, dict] = {}            # node -> its etcd availability
        self.avail_changed_at: dict[str, float] = {}  # node -> when that last changed
        self.loads: dict[str, tuple] = {}           # node -> (pb.NodeLoad, when received)
        self.offered: dict[str, dict] = {}          # node -> {task id: request}, unanswered
        self.known_dead: set[str] = set()
        self.spread_counter = 0

    # ------------------------------------------------------------ events
    def update(self, nodes: dict, avail: dict, now: float,
               changed_nodes=None, changed_avail=None, avail_bits: int = 0) -> list:
        """A whole etcd view; returns the peers that left it (to be handled
        as dead). With `changed_nodes` / `changed_avail` only those ids are
        examined (see `apply`)."""
        if changed_nodes is None:
            changed_nodes = dict.fromkeys([*self.nodes, *nodes])     # in order
        if changed_avail is None:
            changed_avail = dict.fromkeys([*self.avail, *avail])
        return self.apply({n: nodes.get(n) for n in changed_nodes},
                          {n: avail.get(n) for n in changed_avail}, now, avail_bits)

    def apply(self, node_changes: dict, avail_changes: dict, now: float,
              avail_bits: int = 0) -> list:
        """What changed in the etcd view since the last call (node id ->
        record / availability now, None when gone); returns the peers that
        left (to be handled as dead). O(changes), not O(members): it runs at
        every node for every change anywhere. `avail_bits` is the slice
        whose availability the changes come from."""
        nodes = self.nodes
        gone = [n for n, record in node_changes.items()
                if record is None and n in nodes and n != self.node_hex]
        for node_hex, record in node_changes.items():
            if record is None:
                nodes.pop(node_hex, None)
                self._peer_ids.discard(node_hex)
                self._slice_ids.discard(node_hex)
                continue
            nodes[node_hex] = record
            # A node that lost its lease and registered again is a member again.
            self.known_dead.discard(node_hex)
            if node_hex != self.node_hex:
                self._peer_ids.add(node_hex)
                if avail_slice.in_slice(node_hex, self.node_hex, avail_bits):
                    self._slice_ids.add(node_hex)
        for node_hex, value in avail_changes.items():
            if value is None:
                self.avail.pop(node_hex, None)
            elif self.avail.get(node_hex) != value:
                self.avail_changed_at[node_hex] = now
                self.avail[node_hex] = value
        if avail_bits != self.avail_bits:
            self.avail_bits = avail_bits
            self._slice_ids = _Sampleable(
                n for n in nodes
                if n != self.node_hex and avail_slice.in_slice(n, self.node_hex, avail_bits))
        return gone

    def note_load(self, node_hex: str, load, now: float) -> None:
        """The load a peer attached to a batch it sent us."""
        self.loads[node_hex] = (load, now)

    def offer(self, node_hex: str, task_id: bytes, request: dict) -> None:
        self.offered.setdefault(node_hex, {})[task_id] = request

    def answered(self, node_hex: str, task_id: bytes) -> None:
        """A verdict came back: the offer no longer holds room there."""
        self.offered.get(node_hex, {}).pop(task_id, None)

    def died(self, node_hex: str) -> bool:
        """`node_hex` is dead; False when that was known already."""
        if node_hex in self.known_dead:
            return False
        self.known_dead.add(node_hex)
        for per_node in (self.offered, self.loads, self.avail_changed_at):
            per_node.pop(node_hex, None)
        return True

    def next_spread(self) -> int:
        self.spread_counter += 1
        return self.spread_counter

    # ------------------------------------------------------------ questions
    def is_alive_member(self, node_hex: str) -> bool:
        return node_hex in self.nodes and node_hex not in self.known_dead

    def live_members(self) -> list:
        return [n for n in self.nodes if n not in self.known_dead]

    def sample_peers(self, k: int, include=()) -> list | None:
        """`k` peers of the availability slice picked at random, plus those
        of `include` that are members (e.g. the nodes holding a task's
        arguments, so locality is still seen); None when there are no more
        than `k` peers in all (look at them all)."""
        if len(self._peer_ids) <= k:
            return None
        picked = self._slice_ids.sample(self._rng, k)
        picked.extend(n for n in include
                      if n in self.nodes and n != self.node_hex and n not in picked)
        return picked

    def node_views(self, local: policy.NodeView, now: float,
                   backlog_for: dict | None = None, only=None,
                   local_waiting_per_cpu: float = float("inf")) -> dict:
        """The cluster as policy.decide sees it: each peer's newest reported
        room, less our unanswered offers. With `backlog_for` (a request), a
        peer that would queue it behind its busy workers shows room for it
        (peer_load.with_backlog) when it would start there sooner than the
        last of `local_waiting_per_cpu` waiting here (peer_load.worth_queueing).
        With `only` (node ids), just those peers."""
        views = {}
        nodes = self.nodes
        for node_hex in (nodes if only is None else only):
            record = nodes.get(node_hex)
            if record is None or node_hex == self.node_hex:
                continue
            load, load_at = self.loads.get(node_hex, (None, None))
            total = record.get("Resources", {})
            if self.avail_bits and node_hex not in self._slice_ids:
                if load is None or now - load_at > OUTSIDE_LOAD_S:
                    load = load_at = None
                available = dict(total) if load is None else dict(load.available)
            else:
                available = peer_load.newest_available(
                    self.avail.get(node_hex, {}), self.avail_changed_at.get(node_hex),
                    None if load is None else load.available, load_at, now)
            offers = self.offered.get(node_hex, {})
            room = peer_load.peer_room(available, peer_load.total_of(offers.values()))
            if backlog_for is not None and load is not None and peer_load.worth_queueing(
                    load.queued, len(offers), total.get("CPU", 1.0), local_waiting_per_cpu):
                room = peer_load.with_backlog(room, total, backlog_for, peer_load.backlog_left(
                    load.backlog_room, len(offers)))
            # A draining peer (node/drain.py) is a member but no candidate.
            views[node_hex] = policy.NodeView(
                node_hex, ResourceSet.from_dict(total), ResourceSet.from_dict(room),
                not record.get("Draining"), record.get("Labels", {}))
        views[self.node_hex] = local
        return views

    def node_for_prefix(self, object_id: bytes) -> str | None:
        """The member whose id prefixes `object_id` (its owner), if in the view."""
        prefix = object_id[:ids.NODE_PREFIX_LEN].hex()
        for node_hex in self.nodes:
            if node_hex.startswith(prefix):
                return node_hex
        return None
