"""Placing a group: reserve the bundles it does not hold, keep the rest.

First placement and re-placement after a node loss share one path
(:func:`try_place`, :func:`reschedule`); :func:`try_place_pending` places
every group that waits and also frees reservations an interrupted removal
left behind (:func:`collect_garbage`). ``reservation.py``, the module the
daemon imports, offers these names and describes the transaction design.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from meshray.coordination import keyspace as ks
from meshray.coordination.client import (
    MAX_TXN_OPS,
    CoordinationUnavailable,
    LeaseNotFoundError,
    ModRevisionEquals,
    Put,
)
from meshray.placement import policy
from meshray.placement.records import (
    CREATED,
    MAX_NODES_PER_TXN,
    PENDING,
    REMOVED,
    RESCHEDULING,
    AllocRecord,
    BundleAlloc,
    PlacementGroupRecord,
    groups_needing_placement,
    lost_bundles,
)
from meshray.placement.snapshot import (
    _DEFAULT_PLACE_TIMEOUT_S,
    Snapshot,
    _alloc_write,
    _backoff,
    _encode,
    get_record,
    list_records,
    read_snapshot,
)
from meshray.scheduler.resources import ResourceSet

__all__ = [
    "PlaceResult",
    "try_place",
    "reschedule",
    "try_place_pending",
    "collect_garbage",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------
# Placing (first placement and re-placement share one path)


@dataclass(frozen=True)
class PlaceResult:
    """What a placement attempt left behind.

    ``state`` is None when the group no longer exists. ``changed`` is True
    when this call committed a write to the group. ``reason`` explains a
    group that is not CREATED; ``infeasible_ever`` marks groups that the
    current nodes could not hold even if empty (tell the user once).
    """

    pg_id: str
    state: Optional[str]
    placement: Tuple[Optional[str], ...] = ()
    changed: bool = False
    reason: str = ""
    infeasible_ever: bool = False
    attempts: int = 0

    @property
    def created(self) -> bool:
        return self.state == CREATED


def _result(record: Optional[PlacementGroupRecord], pg_hex: str, **extra) -> PlaceResult:
    if record is None:
        return PlaceResult(pg_hex, None, **extra)
    return PlaceResult(pg_hex, record.state, record.placement, reason=record.reason,
                       infeasible_ever=record.infeasible_ever, **extra)


def _place_once(coordinator, keys: ks.Keyspace, pg_hex: str, snap: Snapshot,
                live_hint: Optional[set], use_availability: bool
                ) -> Tuple[str, PlaceResult, Snapshot]:
    """One read-decide-commit round for one group.

    Returns ("noop" | "written" | "waiting" | "conflict", result, snapshot
    used). "waiting" means the group could not be placed and its record
    already says so.

    Which bundles are lost is judged from the snapshot, and only the nodes
    that receive bundles are pinned by compares. That judgement is sound
    only if the snapshot was read after the group record last changed: a
    bundle the record holds was written to its alloc in the same
    transaction, and afterwards only a lease expiry (a real loss) can take
    it out without changing the record. So a snapshot older than the
    record is re-read first; otherwise a placer holding an old snapshot
    would mistake a group placed meanwhile by someone else for one that
    lost its bundles.
    """
    record, rev = get_record(coordinator, pg_hex, keys)
    if record is None or record.state == REMOVED:
        return "noop", _result(record, pg_hex), snap
    if rev > snap.revision:
        snap = read_snapshot(coordinator, keys)
    allocs = snap.alloc_records()
    lost = lost_bundles(record, snap.nodes.keys(), allocs)
    if not lost and record.state == CREATED:
        return "noop", _result(record, pg_hex), snap
    lost_set = set(lost)
    kept = {i: node for i, node in enumerate(record.placement) if i not in lost_set}

    # Entries of this group that no longer match its placement (a dead node's
    # alloc that was not on a lease, or a stale leftover): strip them in the
    # same transaction, so the record and the allocs agree afterwards.
    stale: Dict[str, set] = {}
    for node_id, alloc in allocs.items():
        drop = {b.index for b in alloc.bundles if b.pg_id == pg_hex
                and 0 <= b.index < len(record.bundles)
                and (b.index in lost_set or record.placement[b.index] != node_id)}
        if drop and node_id not in snap.bad_allocs:
            stale[node_id] = drop

    candidates = set(snap.nodes) - snap.bad_allocs
    if live_hint is not None:
        # The hint narrows where new bundles may go, never what is held: a
        # kept bundle's node must stay visible or the policy would move it.
        candidates = (candidates & live_hint) | set(kept.values())
    capacities = []
    for node_id in sorted(candidates):
        node = snap.nodes[node_id]
        alloc = allocs.get(node_id)
        if alloc is not None and node_id in stale:
            alloc = alloc.without_pg(pg_hex, stale[node_id])
        capacities.append(policy.NodeCapacity(
            node_id, node.total, alloc.reserved() if alloc else ResourceSet(),
            snap.avail.get(node_id), node.labels))
    # Transaction budget: 2 slots for the group record, 2 per node cleaned,
    # 3 per node receiving bundles.
    max_nodes = max(0, min(MAX_NODES_PER_TXN, (MAX_TXN_OPS - 2 - 2 * len(stale)) // 3))
    decision = policy.place_bundles(record.bundles, record.strategy, capacities, kept=kept,
                                    max_nodes=max_nodes, use_availability=use_availability)

    placement = list(record.placement)
    additions: Dict[str, List[BundleAlloc]] = {}
    if decision.ok:
        for index, node_id in decision.assignment.items():
            placement[index] = node_id
            additions.setdefault(node_id, []).append(
                BundleAlloc(pg_hex, index, dict(record.bundles[index])))
        new_record = record.with_(state=CREATED, placement=tuple(placement), reason="",
                                  infeasible_ever=False)
    else:
        for index in lost:
            placement[index] = None
        # A group that never held all its bundles is PENDING; one that did
        # and lost some is RESCHEDULING until they are back.
        state = PENDING if record.state == PENDING else RESCHEDULING
        new_record = record.with_(state=state, placement=tuple(placement),
                                  reason=decision.reason, infeasible_ever=decision.ever)
        unchanged = (new_record.state, new_record.placement, new_record.reason,
                     new_record.infeasible_ever) == (record.state, record.placement,
                                                     record.reason, record.infeasible_ever)
        if unchanged and not stale:
            # Do not rewrite the record just to refresh the reason: every
            # write wakes every watcher and invalidates racing placers.
            return "waiting", PlaceResult(pg_hex, record.state, record.placement,
                                          reason=decision.reason,
                                          infeasible_ever=decision.ever), snap

    pg_key = keys.pg(pg_hex)
    compares: list = [ModRevisionEquals(pg_key, rev)]
    ops: list = [Put(pg_key, _encode(new_record))]
    for node_id in sorted(set(additions) | set(stale)):
        alloc, alloc_rev = snap.alloc(node_id)
        node = snap.nodes.get(node_id)
        if node_id in additions:
            base = alloc or AllocRecord(node_id, node.lease or 0)
            base = base.without_pg(pg_hex, stale.get(node_id, ()))
            new_alloc = AllocRecord(node_id, node.lease or 0, base.bundles).with_bundles(
                additions[node_id])
            compares.append(ModRevisionEquals(keys.node(node_id), node.mod_revision))
            compares.append(ModRevisionEquals(keys.alloc(node_id), alloc_rev))
            ops.append(_alloc_write(keys, node_id, new_alloc, node.lease))
        else:
            new_alloc = alloc.without_pg(pg_hex, stale[node_id])
            compares.append(ModRevisionEquals(keys.alloc(node_id), alloc_rev))
            ops.append(_alloc_write(keys, node_id, new_alloc, alloc.lease))
    try:
        committed = coordinator.txn(compares, ops).succeeded
    except CoordinationUnavailable as exc:
        if not exc.outcome_unknown:
            raise
        committed = False  # re-read decides; the compares make a replay harmless
    except LeaseNotFoundError:
        # Only possible if a node record names a lease it is not attached
        # to; nothing was written. Treat it like a lost race.
        log.warning("placement group %s: a target node's LeaseID is stale; retrying", pg_hex)
        committed = False
    if not committed:
        return "conflict", _result(record, pg_hex), snap
    if decision.ok:
        log.info("placement group %s %s: bundles %s", pg_hex,
                 "re-placed" if record.state != PENDING else "created",
                 {i: n for i, n in decision.assignment.items()})
    return "written", _result(new_record, pg_hex, changed=True), snap


def try_place(coordinator, pg_id: Any, *, keys: ks.Keyspace = ks.DEFAULT,
              live_nodes: Optional[Iterable[str]] = None, use_availability: bool = True,
              timeout_s: float = _DEFAULT_PLACE_TIMEOUT_S) -> PlaceResult:
    """Reserve whatever bundles of the group are not held, keeping the rest.

    Handles PENDING groups, RESCHEDULING ones, and CREATED groups that just
    lost a node (they become CREATED again, or RESCHEDULING if there is no
    room). Safe to call from any number of nodes at once: all but one
    transaction fail their compares and the losers, re-reading, find nothing
    left to do. Gives up quietly after ``timeout_s`` of lost races (the
    group stays as it is; the next view change tries again).
    """
    pg_hex = ks.id_hex(pg_id, "pg_id")
    hint = set(live_nodes) if live_nodes is not None else None
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while True:
        attempt += 1
        snap = read_snapshot(coordinator, keys)
        status, result, _snap = _place_once(coordinator, keys, pg_hex, snap, hint,
                                            use_availability)
        if status != "conflict" or time.monotonic() >= deadline:
            return replace(result, attempts=attempt)
        time.sleep(_backoff(attempt))


def reschedule(coordinator, pg_id: Any, live_nodes: Optional[Iterable[str]] = None, *,
               keys: ks.Keyspace = ks.DEFAULT, use_availability: bool = True,
               timeout_s: float = _DEFAULT_PLACE_TIMEOUT_S) -> PlaceResult:
    """Re-reserve the bundles a dead node took with it; the rest stay put.

    The election among nodes is the transaction itself: whoever commits
    first on the group's record wins, everyone else's compare fails and
    their retry sees a group with nothing lost. Which nodes are dead is read
    from etcd (``nodes/``), not from ``live_nodes``, which only narrows the
    nodes new bundles may go to.
    """
    return try_place(coordinator, pg_id, keys=keys, live_nodes=live_nodes,
                     use_availability=use_availability, timeout_s=timeout_s)


def try_place_pending(coordinator, *, keys: ks.Keyspace = ks.DEFAULT,
                      live_nodes: Optional[Iterable[str]] = None, use_availability: bool = True,
                      responsible_for: Optional[str] = None,
                      candidates: Optional[Iterable[str]] = None,
                      timeout_s: float = 5.0) -> List[PlaceResult]:
    """Place every group that waits: PENDING, RESCHEDULING, or CREATED with a
    bundle on a dead node. Oldest first, but a big group that does not fit
    does not hold up a small one behind it.

    Call it whenever capacity may have appeared or disappeared (node joined
    or left, a group was removed, availability rose). Safe concurrently from
    every node. Also frees reservations of removed groups left behind by an
    interrupted removal (collect_garbage).

    ``responsible_for=<this node's id>`` limits the call to the groups that
    policy.responsible_node assigns to this node among the live ones, so a
    view change costs one transaction per group instead of one per node and
    group. Daemons that use it must also call without it now and then (a few
    seconds), which covers a responsible node that is slow or just died.

    ``candidates`` (group ids, oldest first, e.g. what the daemon's view of
    ``pgs/`` says needs placing) skips listing every group record, and with
    it the garbage collection; each candidate's record is still read from
    etcd and left alone when it needs nothing.
    """
    hint = set(live_nodes) if live_nodes is not None else None
    deadline = time.monotonic() + timeout_s
    snap = read_snapshot(coordinator, keys)
    if candidates is not None:
        todo = list(dict.fromkeys(ks.id_hex(c, "pg_id") for c in candidates))
    else:
        records = list_records(coordinator, keys)  # after the allocs: see collect_garbage
        if _collect_garbage(coordinator, keys, snap, records):
            snap = read_snapshot(coordinator, keys)
        todo = groups_needing_placement(records, snap.nodes.keys(), snap.alloc_records())
    if responsible_for is not None:
        me = ks.id_hex(responsible_for, "responsible_for")
        todo = [g for g in todo if policy.responsible_node(g, snap.nodes) == me]
    results = []
    for pg_hex in todo:
        attempt = 0
        while True:
            attempt += 1
            status, result, snap = _place_once(coordinator, keys, pg_hex, snap, hint,
                                               use_availability)
            if status in ("written", "conflict"):
                snap = read_snapshot(coordinator, keys)
            if status != "conflict" or time.monotonic() >= deadline:
                results.append(replace(result, attempts=attempt))
                break
            time.sleep(_backoff(attempt))
    return results


# --------------------------------------------------------------------------
# Collecting garbage (reservations of removed or vanished groups)


def _collect_garbage(coordinator, keys: ks.Keyspace, snap: Snapshot,
                     records: Sequence[PlacementGroupRecord]) -> int:
    # `records` must have been read after `snap.allocs`: a group's record is
    # written before any alloc entry of it, so an entry whose group was
    # missing at the later read belongs to a group that is gone for good.
    alive = {r.pg_id for r in records if r.state != REMOVED}
    freed = 0
    for node_id, (alloc, rev) in snap.allocs.items():
        dead = {b.pg_id for b in alloc.bundles if b.pg_id not in alive}
        if not dead:
            continue
        new = alloc
        for pg_hex in dead:
            new = new.without_pg(pg_hex)
        try:
            if coordinator.txn([ModRevisionEquals(keys.alloc(node_id), rev)],
                               [_alloc_write(keys, node_id, new, alloc.lease)]).succeeded:
                freed += 1
        except CoordinationUnavailable as exc:
            if not exc.outcome_unknown:
                raise
    return freed


def collect_garbage(coordinator, *, keys: ks.Keyspace = ks.DEFAULT) -> int:
    """Free alloc entries of removed or vanished groups; returns how many
    alloc records were rewritten."""
    snap = read_snapshot(coordinator, keys)
    return _collect_garbage(coordinator, keys, snap, list_records(coordinator, keys))
