"""The etcd side of placement groups: create, reserve, re-place, remove.

There is no head node, so every operation here is written to be run by any
node, at any time, concurrently with the same operation elsewhere. Each one
reads a view, decides with the pure policy, and commits in ONE transaction
whose compares pin everything the decision read:

* the group record's mod revision (nobody placed, moved or removed it since);
* for every node that receives a bundle, its node record's mod revision (it
  is still alive, under the same lease, with the same totals) and its
  ``alloc/<node>`` mod revision (nobody reserved or freed anything there).

If any compare fails, nothing is written and the caller retries against a
fresh view. Capacity is checked against the alloc record that the compare
pins, so two creators racing for the same node serialize in etcd and the
second one sees the first one's bundles: a node's reservations can never sum
above its total, at any revision (docs/placement-groups.md has the argument;
tests/integration/test_placement_reservation.py replays etcd's history to
check it).

Functions block on etcd: the node daemon calls them off its event loop.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from meshray.coordination import keyspace as ks
from meshray.coordination.client import (
    MAX_TXN_OPS,
    CoordinationError,
    CoordinationUnavailable,
    Delete,
    LeaseNotFoundError,
    Get,
    KeyMissing,
    ModRevisionEquals,
    Put,
    ValueEquals,
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
    PlacementGroupSpec,
    groups_needing_placement,
    lost_bundles,
    validate_placement_group_args,
)
from meshray.scheduler.resources import ResourceSet

__all__ = [
    "DEFAULT_TOMBSTONE_TTL_S",
    "PlacementGroupNameTaken",
    "NodeEntry",
    "Snapshot",
    "PlaceResult",
    "read_snapshot",
    "get_record",
    "get_record_by_name",
    "list_records",
    "create_placement_group",
    "try_place",
    "reschedule",
    "try_place_pending",
    "remove_placement_group",
    "remove_job_groups",
    "sweep_orphans",
    "collect_garbage",
    "CreateRequest",
    "parse_create_request",
    "plan_create_chunk",
    "create_placement_groups",
    "TombstoneLeases",
    "plan_remove_chunk",
    "remove_placement_groups",
    "handle_request",
    "REQUEST_METHODS",
]

log = logging.getLogger(__name__)

#: How long a REMOVED group's record stays readable (placement_group_table,
#: fast failure of late tasks). It sits on its own lease so etcd forgets it
#: without anyone having to remember to; a missing record means "removed".
DEFAULT_TOMBSTONE_TTL_S = 600

_DEFAULT_PLACE_TIMEOUT_S = 3.0


class PlacementGroupNameTaken(ValueError):
    """The name is already held by a live group in that namespace."""


# --------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class NodeEntry:
    """A live node as etcd lists it. ``lease`` is the node's lease id from
    its record (None if the record does not say), which alloc keys join."""

    node_id: str
    mod_revision: int
    total: ResourceSet
    lease: Optional[int] = None
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Snapshot:
    """Nodes, reservations and availability hints, read from etcd.

    The three prefixes are read one after another, not at one revision; that
    is fine because the transaction re-checks every revision it relies on.
    ``bad_allocs`` holds nodes whose alloc value could not be parsed: they
    are never written to (we could not preserve what they hold).
    ``revision`` is the store revision of the first read (``nodes/``): every
    change up to it is visible in all three parts.
    """

    revision: int = 0
    nodes: Dict[str, NodeEntry] = field(default_factory=dict)
    allocs: Dict[str, Tuple[AllocRecord, int]] = field(default_factory=dict)
    avail: Dict[str, ResourceSet] = field(default_factory=dict)
    bad_allocs: set = field(default_factory=set)

    def alloc(self, node_id: str) -> Tuple[Optional[AllocRecord], int]:
        entry = self.allocs.get(node_id)
        return (entry[0], entry[1]) if entry else (None, 0)

    def alloc_records(self) -> Dict[str, AllocRecord]:
        return {n: a for n, (a, _rev) in self.allocs.items()}


def _lease_of(record: Mapping[str, Any]) -> Optional[int]:
    lease = record.get("LeaseID", record.get("Lease"))
    if isinstance(lease, bool) or not isinstance(lease, int) or lease <= 0:
        return None
    return lease


def read_snapshot(coordinator, keys: ks.Keyspace = ks.DEFAULT) -> Snapshot:
    items, revision = coordinator.get_prefix(keys.nodes_prefix())
    snap = Snapshot(revision=revision)
    for kv in items:
        try:
            node_id = keys.parse_node(kv.key)
            record = ks.decode_json(kv.value)
            total = ResourceSet(record.get("Resources") or {})
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("placement: ignoring unreadable node record %s: %s", kv.key, exc)
            continue
        snap.nodes[node_id] = NodeEntry(node_id, kv.mod_revision, total, _lease_of(record),
                                        dict(record.get("Labels") or {}))
    items, _rev = coordinator.get_prefix(keys.alloc_prefix())
    for kv in items:
        try:
            node_id = keys.parse_alloc(kv.key)
        except ValueError:
            continue
        try:
            snap.allocs[node_id] = (AllocRecord.from_dict(ks.decode_json(kv.value)),
                                    kv.mod_revision)
        except (ValueError, TypeError, KeyError) as exc:
            log.error("placement: alloc record of node %s is unreadable (%s); the node gets "
                      "no new bundles until it is fixed", node_id, exc)
            snap.bad_allocs.add(node_id)
    items, _rev = coordinator.get_prefix(keys.avail_prefix())
    for kv in items:
        try:
            snap.avail[keys.parse_avail(kv.key)] = ResourceSet(ks.decode_json(kv.value) or {})
        except (ValueError, TypeError, AttributeError):
            continue
    return snap


def get_record(coordinator, pg_id: Any, keys: ks.Keyspace = ks.DEFAULT
               ) -> Tuple[Optional[PlacementGroupRecord], int]:
    raw, rev = coordinator.get(keys.pg(pg_id))
    if raw is None:
        return None, 0
    return PlacementGroupRecord.from_dict(ks.decode_json(raw)), rev


def get_record_by_name(coordinator, namespace: str, name: str,
                       keys: ks.Keyspace = ks.DEFAULT) -> Optional[PlacementGroupRecord]:
    raw, _rev = coordinator.get(keys.pg_name(namespace, name))
    if raw is None:
        return None
    record, _ = get_record(coordinator, raw.decode(), keys)
    if record is None or record.state == REMOVED:
        return None
    return record


def list_records(coordinator, keys: ks.Keyspace = ks.DEFAULT) -> List[PlacementGroupRecord]:
    """Every group etcd still has, oldest first."""
    items, _rev = coordinator.get_prefix(keys.pgs_prefix())
    out = []
    for kv in items:
        try:
            out.append(PlacementGroupRecord.from_dict(ks.decode_json(kv.value)))
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("placement: ignoring unreadable group record %s: %s", kv.key, exc)
    out.sort(key=lambda r: (r.created_at, r.pg_id))
    return out


# --------------------------------------------------------------------------
# Creating


def _encode(record) -> bytes:
    return ks.encode_json(record.to_dict())


def _same_request(a: PlacementGroupRecord, b: PlacementGroupRecord) -> bool:
    return (a.bundles, a.strategy, a.name, a.namespace, a.lifetime, a.job_id) == \
        (b.bundles, b.strategy, b.name, b.namespace, b.lifetime, b.job_id)


def create_placement_group(coordinator, spec: PlacementGroupSpec, *, pg_id: str,
                           namespace: str = "", job_id: str = "", creator_node: str = "",
                           keys: ks.Keyspace = ks.DEFAULT, place: bool = True,
                           place_timeout_s: float = _DEFAULT_PLACE_TIMEOUT_S) -> "PlaceResult":
    """Write the group as PENDING (claiming its name in the same transaction),
    then try once to reserve it.

    The id comes from the caller, so a retried request finds its own record
    and succeeds instead of creating a twin (DESIGN.md §7: state-changing
    calls are idempotent). Raises PlacementGroupNameTaken (a ValueError) if
    another live group holds the name.
    """
    pg_hex = ks.id_hex(pg_id, "pg_id")
    record = PlacementGroupRecord(
        pg_id=pg_hex, bundles=tuple(dict(b) for b in spec.bundles), strategy=spec.strategy,
        name=spec.name, namespace=namespace, lifetime=spec.lifetime, job_id=job_id,
        creator_node=creator_node, state=PENDING, created_at=time.time())
    pg_key = keys.pg(pg_hex)
    compares = [KeyMissing(pg_key)]
    ops = [Put(pg_key, _encode(record))]
    failure = [Get(pg_key)]
    if spec.name:
        name_key = keys.pg_name(namespace, spec.name)
        compares.append(KeyMissing(name_key))
        ops.append(Put(name_key, pg_hex))
        failure.append(Get(name_key))
    try:
        result = coordinator.txn(compares, ops, failure)
        succeeded, responses = result.succeeded, result.responses
    except CoordinationUnavailable as exc:
        if not exc.outcome_unknown:
            raise
        succeeded, responses = False, [coordinator.get(op.key) for op in failure]
    if not succeeded:
        existing_raw = responses[0][0]
        if existing_raw is not None:
            existing = PlacementGroupRecord.from_dict(ks.decode_json(existing_raw))
            if not _same_request(existing, record):
                raise ValueError(f"placement group id {pg_hex} already exists with a different "
                                 f"definition")
            record = existing  # our own earlier attempt landed
        else:
            holder = responses[1][0].decode() if responses[1][0] else "?"
            raise PlacementGroupNameTaken(
                f"Failed to create placement group: the name {spec.name!r} is already used by "
                f"placement group {holder} in namespace {namespace!r}. Names are unique per "
                f"namespace until the group is removed.")
    if not place:
        return PlaceResult(pg_hex, record.state, record.placement)
    return try_place(coordinator, pg_hex, keys=keys, timeout_s=place_timeout_s)


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


def _alloc_write(keys: ks.Keyspace, node_id: str, new: AllocRecord, lease: Optional[int]):
    key = keys.alloc(node_id)
    if not new.bundles:
        return Delete(key)
    return Put(key, ks.encode_json(new.to_dict()), lease=lease or None)


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


def _backoff(attempt: int) -> float:
    return random.uniform(0, min(0.2, 0.005 * (2 ** min(attempt, 8))))


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
# Removing


def _strip_alloc(coordinator, keys: ks.Keyspace, node_id: str, pg_hex: str,
                 timeout_s: float = 5.0) -> None:
    """Remove every entry of one group from one node's alloc, retrying races."""
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while True:
        attempt += 1
        raw, rev = coordinator.get(keys.alloc(node_id))
        if raw is None:
            return
        alloc = AllocRecord.from_dict(ks.decode_json(raw))
        new = alloc.without_pg(pg_hex)
        if new.bundles == alloc.bundles:
            return
        try:
            if coordinator.txn([ModRevisionEquals(keys.alloc(node_id), rev)],
                               [_alloc_write(keys, node_id, new, alloc.lease)]).succeeded:
                return
        except CoordinationUnavailable as exc:
            if not exc.outcome_unknown:
                raise
        if time.monotonic() >= deadline:
            log.warning("placement: could not free group %s on node %s in %.1fs; "
                        "try_place_pending will collect it", pg_hex, node_id, timeout_s)
            return
        time.sleep(_backoff(attempt))


def remove_placement_group(coordinator, pg_id: Any, *, keys: ks.Keyspace = ks.DEFAULT,
                           tombstone_ttl_s: Optional[int] = DEFAULT_TOMBSTONE_TTL_S,
                           reason: str = "removed", timeout_s: float = 10.0) -> bool:
    """Mark the group REMOVED, release its name and free its reservations,
    all in one transaction. Returns False if it was already removed or never
    existed (removal is idempotent).

    A group spread over more nodes than one transaction can write is removed
    in two steps: the record and name first (the commit point: from then on
    no task may use it), then each node's entries; leftovers of an
    interrupted second step belong to a REMOVED group and are collected by
    try_place_pending, so they can waste capacity for a while but never
    over-commit it.
    """
    pg_hex = ks.id_hex(pg_id, "pg_id")
    pg_key = keys.pg(pg_hex)
    lease = None
    deadline = time.monotonic() + timeout_s
    attempt = 0
    maybe_ours = False
    while True:
        attempt += 1
        record, rev = get_record(coordinator, pg_hex, keys)
        if record is None or record.state == REMOVED:
            return maybe_ours
        if tombstone_ttl_s and lease is None:
            lease = coordinator.grant_lease(int(tombstone_ttl_s))
        tomb = record.with_(state=REMOVED, placement=(None,) * len(record.bundles),
                            reason=reason, infeasible_ever=False)
        compares: list = [ModRevisionEquals(pg_key, rev)]
        ops: list = [Put(pg_key, _encode(tomb), lease=lease) if tombstone_ttl_s
                     else Delete(pg_key)]
        if record.name:
            name_key = keys.pg_name(record.namespace, record.name)
            holder, _ = coordinator.get(name_key)
            if holder is not None and holder.decode() == pg_hex:
                compares.append(ValueEquals(name_key, pg_hex))
                ops.append(Delete(name_key))
        nodes = sorted({n for n in record.placement if n is not None})
        alloc_ops, alloc_compares = [], []
        for node_id in nodes:
            raw, alloc_rev = coordinator.get(keys.alloc(node_id))
            if raw is None:
                continue
            alloc = AllocRecord.from_dict(ks.decode_json(raw))
            new = alloc.without_pg(pg_hex)
            if new.bundles != alloc.bundles:
                alloc_compares.append(ModRevisionEquals(keys.alloc(node_id), alloc_rev))
                alloc_ops.append(_alloc_write(keys, node_id, new, alloc.lease))
        two_step = len(compares) + len(ops) + 2 * len(alloc_ops) > MAX_TXN_OPS
        if not two_step:
            compares += alloc_compares
            ops += alloc_ops
        try:
            committed = coordinator.txn(compares, ops).succeeded
        except CoordinationUnavailable as exc:
            if not exc.outcome_unknown:
                raise
            committed, maybe_ours = False, True
        if committed:
            if two_step:
                for node_id in nodes:
                    _strip_alloc(coordinator, keys, node_id, pg_hex)
            log.info("placement group %s removed (%s)", pg_hex, reason)
            return True
        if time.monotonic() >= deadline:
            raise CoordinationUnavailable(
                f"could not remove placement group {pg_hex} within {timeout_s:.0f}s: every "
                f"attempt lost a race with another writer")
        time.sleep(_backoff(attempt))


def remove_job_groups(coordinator, job_id: Any, *, keys: ks.Keyspace = ks.DEFAULT,
                      tombstone_ttl_s: Optional[int] = DEFAULT_TOMBSTONE_TTL_S) -> List[str]:
    """Remove the job's non-detached groups (the job ended). Returns their ids."""
    job_hex = ks.id_hex(job_id, "job_id")
    ids = [record.pg_id for record in list_records(coordinator, keys)
           if record.job_id == job_hex and not record.detached and record.state != REMOVED]
    outcomes = remove_placement_groups(coordinator, ids, keys=keys,
                                       tombstone_ttl_s=tombstone_ttl_s,
                                       reason=f"job {job_hex} ended")
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome
    return [pg for pg, outcome in zip(ids, outcomes) if outcome is True]


def sweep_orphans(coordinator, *, keys: ks.Keyspace = ks.DEFAULT,
                  job_alive: Optional[Callable[[str], Optional[bool]]] = None,
                  tombstone_ttl_s: Optional[int] = DEFAULT_TOMBSTONE_TTL_S) -> List[str]:
    """Remove non-detached groups whose job can no longer end cleanly.

    A job's groups are normally removed by the daemon its driver is
    connected to (remove_job_groups). If that daemon died, the driver went
    with it, and nobody else would ever remove them: a group whose
    ``creator_node`` is no longer in ``nodes/`` is therefore an orphan.
    ``job_alive(job_hex)`` may override that with better knowledge (True:
    keep, False: remove, None: fall back to the creator-node rule).
    Call it a grace period after a node disappears, so a node that lost its
    lease briefly and re-registered under the same id keeps its jobs' groups.
    """
    items, _rev = coordinator.get_prefix(keys.nodes_prefix())
    live = set()
    for kv in items:
        try:
            live.add(keys.parse_node(kv.key))
        except ValueError:
            continue
    removed = []
    for record in list_records(coordinator, keys):
        if record.detached or record.state == REMOVED:
            continue
        verdict = job_alive(record.job_id) if (job_alive and record.job_id) else None
        orphan = (verdict is False) or (verdict is None and record.creator_node
                                        and record.creator_node not in live)
        if orphan and remove_placement_group(
                coordinator, record.pg_id, keys=keys, tombstone_ttl_s=tombstone_ttl_s,
                reason=f"creator of job {record.job_id or '?'} is gone"):
            removed.append(record.pg_id)
    return removed


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


# --------------------------------------------------------------------------
# Batches: many requests, few transactions (what the node daemon's placer runs)
#
# A burst of creations or removals from one daemon is committed in as few
# transactions as etcd's op limit allows, instead of two or three per group.
# Each batch transaction keeps every guarantee of the single-group ones,
# because it is the single-group transaction repeated over several groups
# with the per-node parts merged: it compares every node record and alloc
# record it writes at the revision its decisions were made on, and writes
# every group record together with all of that group's alloc entries. A
# failed compare writes nothing; the batch is re-decided on a fresh view, and
# after a few failures (or when a compare failed that is not about capacity:
# a taken name, an id already used) the groups fall back to the single-group
# path, which attributes the failure to the right group.

_BATCH_ATTEMPTS = 3


@dataclass(frozen=True)
class CreateRequest:
    """One validated ``pg_create``: what `create_placement_groups` takes."""

    pg_id: str
    spec: PlacementGroupSpec
    namespace: str = ""
    job_id: str = ""
    creator_node: str = ""

    def record(self, now: float) -> PlacementGroupRecord:
        """The group as it is first written (PENDING, nothing placed)."""
        return PlacementGroupRecord(
            pg_id=self.pg_id, bundles=tuple(dict(b) for b in self.spec.bundles),
            strategy=self.spec.strategy, name=self.spec.name, namespace=self.namespace,
            lifetime=self.spec.lifetime, job_id=self.job_id, creator_node=self.creator_node,
            state=PENDING, created_at=now)


def parse_create_request(payload: Mapping[str, Any], *, node_id: str,
                         job_id: Optional[str] = None, namespace: Optional[str] = None,
                         creator_node: Optional[str] = None) -> CreateRequest:
    """Check a ``pg_create`` payload (ValueError on a caller mistake).

    ``job_id``/``namespace``, when given, override the payload's: the daemon
    knows which job a connection belongs to. ``creator_node`` defaults to
    ``node_id``, the daemon that accepted the request.
    """
    spec = validate_placement_group_args(
        payload.get("bundles"), payload.get("strategy"), payload.get("name", ""),
        payload.get("lifetime"))
    ns = namespace if namespace is not None else payload.get("namespace", "")
    job = job_id if job_id is not None else payload.get("job_id", "")
    if not isinstance(ns, str) or not isinstance(job, str):
        raise ValueError("pg_create: namespace and job_id must be strings")
    pg_hex = ks.id_hex(str(payload.get("pg_id", "")), "pg_id")
    return CreateRequest(pg_hex, spec, ns, job.lower(),
                         ks.id_hex(creator_node or node_id, "creator_node"))


@dataclass
class CreateChunk:
    """One creation transaction, decided on a snapshot (`plan_create_chunk`).

    ``records`` are the groups as written (CREATED with their placement, or
    PENDING with the reason they wait), in the order they were taken;
    ``allocs`` the new value of every alloc record written; ``pinned`` the
    (node record, alloc record) mod revisions the decisions relied on.
    """

    records: List[PlacementGroupRecord] = field(default_factory=list)
    compares: list = field(default_factory=list)
    ops: list = field(default_factory=list)
    allocs: Dict[str, AllocRecord] = field(default_factory=dict)
    pinned: Dict[str, Tuple[int, int]] = field(default_factory=dict)


def plan_create_chunk(snap: Snapshot, records: Sequence[PlacementGroupRecord],
                      keys: ks.Keyspace = ks.DEFAULT, *, use_availability: bool = True,
                      budget: int = MAX_TXN_OPS) -> CreateChunk:
    """Decide where the first groups of ``records`` go and build the one
    transaction that creates them. Pure: no I/O.

    Takes groups from the front while the transaction stays within
    ``budget`` compares + ops (always at least one group). Per group: the
    record must be missing and is put (2), its name likewise (2 more); per
    node receiving bundles: its node record and alloc record are compared
    and the alloc is put (3). Groups are decided in order on shared
    capacities (policy.BatchPlacer), so later ones see earlier ones'
    bundles; a group that does not fit is written PENDING with its reason.
    """
    candidates = [n for n in sorted(snap.nodes) if n not in snap.bad_allocs]
    allocs = snap.alloc_records()
    placer = policy.BatchPlacer(
        [policy.NodeCapacity(n, snap.nodes[n].total,
                             allocs[n].reserved() if n in allocs else ResourceSet(),
                             snap.avail.get(n), snap.nodes[n].labels) for n in candidates],
        use_availability=use_availability)
    chunk = CreateChunk()
    additions: Dict[str, List[BundleAlloc]] = {}
    used = 0
    for record in records:
        base = 4 if record.name else 2
        worst = base + 3 * min(len(record.bundles), MAX_NODES_PER_TXN)
        if chunk.records and used + worst > budget:
            break
        decision = placer.place(record.bundles, record.strategy)
        if decision.ok:
            placement = list(record.placement)
            for index, node_id in sorted(decision.assignment.items()):
                placement[index] = node_id
                if node_id not in additions:
                    additions[node_id] = []
                    used += 3
                additions[node_id].append(
                    BundleAlloc(record.pg_id, index, dict(record.bundles[index])))
            final = record.with_(state=CREATED, placement=tuple(placement), reason="",
                                 infeasible_ever=False)
        else:
            final = record.with_(state=PENDING, reason=decision.reason,
                                 infeasible_ever=decision.ever)
        used += base
        chunk.records.append(final)
        pg_key = keys.pg(final.pg_id)
        chunk.compares.append(KeyMissing(pg_key))
        chunk.ops.append(Put(pg_key, _encode(final)))
        if final.name:
            name_key = keys.pg_name(final.namespace, final.name)
            chunk.compares.append(KeyMissing(name_key))
            chunk.ops.append(Put(name_key, final.pg_id))
    for node_id in sorted(additions):
        node = snap.nodes[node_id]
        alloc, alloc_rev = snap.alloc(node_id)
        base_alloc = AllocRecord(node_id, node.lease or 0, alloc.bundles if alloc else ())
        new_alloc = base_alloc.with_bundles(additions[node_id])
        chunk.allocs[node_id] = new_alloc
        chunk.pinned[node_id] = (node.mod_revision, alloc_rev)
        chunk.compares.append(ModRevisionEquals(keys.node(node_id), node.mod_revision))
        chunk.compares.append(ModRevisionEquals(keys.alloc(node_id), alloc_rev))
        chunk.ops.append(_alloc_write(keys, node_id, new_alloc, node.lease))
    return chunk


def _pins_moved(pinned: Mapping[str, Tuple[int, int]], snap: Snapshot) -> bool:
    for node_id, (node_rev, alloc_rev) in pinned.items():
        node = snap.nodes.get(node_id)
        if node is None or node.mod_revision != node_rev or snap.alloc(node_id)[1] != alloc_rev:
            return True
    return False


def create_placement_groups(coordinator, requests: Sequence[CreateRequest], *,
                            keys: ks.Keyspace = ks.DEFAULT, use_availability: bool = True,
                            timeout_s: float = _DEFAULT_PLACE_TIMEOUT_S) -> List[Any]:
    """Create and place many groups in as few transactions as fit.

    Returns, per request in order, the group's record as committed
    (CREATED, or PENDING with the reason it waits) or the exception for it:
    PlacementGroupNameTaken / ValueError for a caller mistake,
    CoordinationError when etcd failed. Same guarantees as
    create_placement_group followed by try_place, for every group: names
    unique per namespace, an id retried with the same definition is
    idempotent, reservation all-or-nothing and never over-committing.
    Within one call an id given twice counts as a retry, and a name given
    twice goes to the first request that asks for it.
    """
    out: List[Any] = [None] * len(requests)
    now = time.time()
    todo: List[Tuple[int, CreateRequest, PlacementGroupRecord]] = []
    first_of_id: Dict[str, int] = {}
    claimed: Dict[Tuple[str, str], str] = {}
    repeats: List[Tuple[int, int, PlacementGroupRecord]] = []
    for pos, request in enumerate(requests):
        record = request.record(now)
        if record.pg_id in first_of_id:
            repeats.append((pos, first_of_id[record.pg_id], record))
            continue
        if record.name:
            holder = claimed.get((record.namespace, record.name))
            if holder is not None:
                out[pos] = _name_taken(record.name, record.namespace, holder)
                continue
            claimed[(record.namespace, record.name)] = record.pg_id
        first_of_id[record.pg_id] = pos
        todo.append((pos, request, record))

    deadline = time.monotonic() + timeout_s
    slow: List[Tuple[int, CreateRequest, PlacementGroupRecord]] = []
    snap: Optional[Snapshot] = None
    failures = 0
    while todo:
        try:
            if snap is None:
                snap = read_snapshot(coordinator, keys)
            chunk = plan_create_chunk(snap, [r for _p, _q, r in todo], keys,
                                      use_availability=use_availability)
            taken = len(chunk.records)
            unknown = False
            try:
                result = coordinator.txn(chunk.compares, chunk.ops)
                committed = result.succeeded
            except CoordinationUnavailable as exc:
                if not exc.outcome_unknown:
                    raise
                committed, unknown = False, True
            except LeaseNotFoundError:
                # A node record names a lease it is not attached to; nothing
                # was written. Like a lost race: the next view decides.
                committed = False
            if committed:
                for (pos, _q, _r), final in zip(todo[:taken], chunk.records):
                    out[pos] = final
                for node_id, alloc in chunk.allocs.items():
                    snap.allocs[node_id] = (alloc, result.revision)
                if chunk.allocs:
                    log.debug("placement: created %d groups in one transaction", taken)
                todo = todo[taken:]
                failures = 0
                continue
            failures += 1
            fresh = read_snapshot(coordinator, keys)
            if (unknown or not _pins_moved(chunk.pinned, fresh) or failures >= _BATCH_ATTEMPTS
                    or time.monotonic() >= deadline):
                # Not (only) a capacity race: a name or id compare failed, or
                # the outcome is unknown. The single-group path sorts it out.
                slow.extend(todo[:taken])
                todo = todo[taken:]
                failures = 0
            else:
                time.sleep(_backoff(failures))
            snap = fresh
        except CoordinationError as exc:
            for pos, _q, _r in todo:
                out[pos] = exc
            todo = []
    for pos, request, _record in slow:
        try:
            create_placement_group(coordinator, request.spec, pg_id=request.pg_id,
                                   namespace=request.namespace, job_id=request.job_id,
                                   creator_node=request.creator_node, keys=keys,
                                   place_timeout_s=max(0.5, deadline - time.monotonic()))
            record, _rev = get_record(coordinator, request.pg_id, keys)
            out[pos] = record
        except (ValueError, CoordinationError) as exc:
            out[pos] = exc
    for pos, first, record in repeats:
        earlier = out[first]
        if isinstance(earlier, PlacementGroupRecord) and not _same_request(earlier, record):
            out[pos] = ValueError(f"placement group id {record.pg_id} already exists with a "
                                  f"different definition")
        else:
            out[pos] = earlier
    return out


def _name_taken(name: str, namespace: str, holder: str) -> PlacementGroupNameTaken:
    return PlacementGroupNameTaken(
        f"Failed to create placement group: the name {name!r} is already used by placement "
        f"group {holder} in namespace {namespace!r}. Names are unique per namespace until the "
        f"group is removed.")


class TombstoneLeases:
    """The lease REMOVED tombstones are put on, shared by a burst of removals.

    Granting a lease is a raft write of its own; one lease per ``renew_s``
    instead of one per removal keeps batch removal at one write. The lease
    is granted for ``ttl_s + renew_s`` seconds, so every tombstone on it
    lives at least ``ttl_s`` (``renew_s=0``: one lease for the object's
    whole life). Not thread-safe: one per placer thread.
    """

    def __init__(self, ttl_s: int = DEFAULT_TOMBSTONE_TTL_S, renew_s: float = 60.0):
        self.ttl_s = int(ttl_s)
        self.renew_s = renew_s
        self._lease: Optional[int] = None
        self._granted_at = 0.0

    def get(self, coordinator) -> int:
        now = time.monotonic()
        if self._lease is None or (self.renew_s and now - self._granted_at > self.renew_s):
            self._lease = coordinator.grant_lease(self.ttl_s + int(self.renew_s))
            self._granted_at = now
        return self._lease

    def forget(self) -> None:
        """The lease is gone (LeaseNotFound): grant a new one next time."""
        self._lease = None


@dataclass
class RemoveChunk:
    """One removal transaction (`plan_remove_chunk`)."""

    pg_ids: List[str] = field(default_factory=list)
    compares: list = field(default_factory=list)
    ops: list = field(default_factory=list)
    allocs: Dict[str, Optional[AllocRecord]] = field(default_factory=dict)


def plan_remove_chunk(groups: Sequence[Tuple[PlacementGroupRecord, int, bool]],
                      allocs: Mapping[str, Tuple[Optional[AllocRecord], int]],
                      keys: ks.Keyspace = ks.DEFAULT, *, tombstone_lease: Optional[int] = None,
                      delete_records: bool = False, reason: str = "removed",
                      budget: int = MAX_TXN_OPS) -> RemoveChunk:
    """Build the transaction that removes the first of ``groups``. Pure.

    ``groups``: (record, its mod revision, whether it holds its name claim).
    ``allocs``: node -> (alloc record or None, mod revision) for every node
    the groups are placed on. Per group: compare the record, put the
    tombstone (or delete it with ``delete_records``), and when it holds its
    name compare and delete the claim; per node touched: compare the alloc
    and rewrite it without every entry of the chunk's groups (delete it
    when empty). Takes groups while the transaction stays within
    ``budget`` (at least one: a caller with a group too wide for one
    transaction uses remove_placement_group, which removes in two steps).
    """
    chunk = RemoveChunk()
    current: Dict[str, Optional[AllocRecord]] = {}
    used = 0
    for record, rev, holds_name in groups:
        nodes = sorted({n for n in record.placement if n is not None})
        touched = [n for n in nodes if n not in current
                   and allocs.get(n, (None, 0))[0] is not None
                   and any(b.pg_id == record.pg_id for b in allocs[n][0].bundles)]
        cost = (4 if holds_name else 2) + 2 * len(touched)
        if chunk.pg_ids and used + cost > budget:
            break
        used += cost
        chunk.pg_ids.append(record.pg_id)
        pg_key = keys.pg(record.pg_id)
        chunk.compares.append(ModRevisionEquals(pg_key, rev))
        if delete_records:
            chunk.ops.append(Delete(pg_key))
        else:
            tomb = record.with_(state=REMOVED, placement=(None,) * len(record.bundles),
                                reason=reason, infeasible_ever=False)
            chunk.ops.append(Put(pg_key, _encode(tomb), lease=tombstone_lease))
        if holds_name:
            name_key = keys.pg_name(record.namespace, record.name)
            chunk.compares.append(ValueEquals(name_key, record.pg_id))
            chunk.ops.append(Delete(name_key))
        for node_id in touched:
            current[node_id] = allocs[node_id][0]
        for node_id in nodes:
            if node_id in current and current[node_id] is not None:
                current[node_id] = current[node_id].without_pg(record.pg_id)
    for node_id in sorted(current):
        new = current[node_id]
        old, alloc_rev = allocs[node_id]
        chunk.allocs[node_id] = new if new.bundles else None
        chunk.compares.append(ModRevisionEquals(keys.alloc(node_id), alloc_rev))
        chunk.ops.append(_alloc_write(keys, node_id, new, old.lease))
    return chunk


def remove_placement_groups(coordinator, pg_ids: Sequence[Any], *,
                            keys: ks.Keyspace = ks.DEFAULT,
                            tombstone_ttl_s: Optional[int] = DEFAULT_TOMBSTONE_TTL_S,
                            leases: Optional[TombstoneLeases] = None,
                            known: Optional[Callable[[str], Any]] = None,
                            reason: str = "removed", timeout_s: float = 10.0) -> List[Any]:
    """Remove many groups in as few transactions as fit.

    Returns, per id in order, True (this call removed it), False (already
    removed or unknown), or the exception for it. Same guarantees as
    remove_placement_group for each group. ``known(pg_hex)`` may return a
    (record, mod revision) the caller already has (the daemon's mirror):
    it saves a read per group, and a stale one only fails a compare, after
    which the group is read from etcd. ``leases`` shares tombstone leases
    across calls (TombstoneLeases); without it one lease is granted per call.
    """
    out: List[Any] = [None] * len(pg_ids)
    order: List[str] = []
    positions: Dict[str, int] = {}
    for pos, pg_id in enumerate(pg_ids):
        try:
            pg_hex = ks.id_hex(pg_id, "pg_id")
        except (ValueError, TypeError) as exc:
            out[pos] = exc if isinstance(exc, ValueError) else ValueError(str(exc))
            continue
        if pg_hex in positions:
            out[pos] = False  # the first mention removes it
            continue
        positions[pg_hex] = pos
        order.append(pg_hex)
    if leases is None and tombstone_ttl_s:
        leases = TombstoneLeases(int(tombstone_ttl_s), renew_s=0)
    deadline = time.monotonic() + timeout_s
    hinted = set()
    slow: List[str] = []
    failures = 0
    todo = list(order)

    def finish(pg_hex: str, value: Any) -> None:
        out[positions[pg_hex]] = value

    while todo:
        try:
            groups = []
            for pg_hex in todo:
                entry = known(pg_hex) if (known is not None and pg_hex not in hinted) else None
                if entry is not None and entry[0] is not None and entry[0].state != REMOVED:
                    record, rev = entry
                    hinted.add(pg_hex)
                else:
                    record, rev = get_record(coordinator, pg_hex, keys)
                if record is None or record.state == REMOVED:
                    finish(pg_hex, False)
                    continue
                holds_name = False
                if record.name:
                    holder, _ = coordinator.get(keys.pg_name(record.namespace, record.name))
                    holds_name = holder is not None and holder.decode() == pg_hex
                groups.append((record, rev, holds_name))
            if not groups:
                break
            wide = [g for g in groups if 4 + 2 * len({n for n in g[0].placement if n}) >
                    MAX_TXN_OPS]
            for record, _rev, _h in wide:
                slow.append(record.pg_id)
            groups = [g for g in groups if g not in wide]
            nodes = sorted({n for g in groups for n in g[0].placement if n is not None})
            allocs: Dict[str, Tuple[Optional[AllocRecord], int]] = {}
            for node_id in nodes:
                raw, alloc_rev = coordinator.get(keys.alloc(node_id))
                allocs[node_id] = ((AllocRecord.from_dict(ks.decode_json(raw)), alloc_rev)
                                   if raw is not None else (None, 0))
            todo = [g[0].pg_id for g in groups]
            while groups:
                lease = leases.get(coordinator) if leases is not None else None
                chunk = plan_remove_chunk(groups, allocs, keys, tombstone_lease=lease,
                                          delete_records=not tombstone_ttl_s, reason=reason)
                taken = len(chunk.pg_ids)
                unknown = False
                try:
                    result = coordinator.txn(chunk.compares, chunk.ops)
                    committed = result.succeeded
                except CoordinationUnavailable as exc:
                    if not exc.outcome_unknown:
                        raise
                    committed, unknown = False, True
                except LeaseNotFoundError:
                    if leases is not None:
                        leases.forget()
                    committed = False
                if not committed:
                    break
                for pg_hex in chunk.pg_ids:
                    finish(pg_hex, True)
                    log.debug("placement group %s removed (%s)", pg_hex, reason)
                for node_id, new in chunk.allocs.items():
                    allocs[node_id] = (new, result.revision) if new is not None else (None, 0)
                groups = groups[taken:]
                todo = todo[taken:]
                failures = 0
            if not groups:
                break
            failures += 1
            if unknown or failures >= _BATCH_ATTEMPTS or time.monotonic() >= deadline:
                slow.extend(todo)
                break
            hinted.update(todo)  # re-read them from etcd: the hint was stale
            time.sleep(_backoff(failures))
        except CoordinationError as exc:
            for pg_hex in todo:
                finish(pg_hex, exc)
            todo = []
    for pg_hex in slow:
        try:
            removed = remove_placement_group(coordinator, pg_hex, keys=keys,
                                             tombstone_ttl_s=tombstone_ttl_s, reason=reason,
                                             timeout_s=max(1.0, deadline - time.monotonic()))
            finish(pg_hex, removed)
        except CoordinationError as exc:
            finish(pg_hex, exc)
    return out


# --------------------------------------------------------------------------
# Requests from drivers and workers (answered by the node daemon)

REQUEST_METHODS = ("pg_create", "pg_remove", "pg_get", "pg_get_by_name", "pg_table")


def _error(kind: str, message: str) -> Dict[str, Any]:
    return {"error": {"type": kind, "message": message}}


def handle_request(coordinator, method: str, payload: Mapping[str, Any], *, node_id: str,
                   keys: ks.Keyspace = ks.DEFAULT, job_id: Optional[str] = None,
                   namespace: Optional[str] = None,
                   creator_node: Optional[str] = None) -> Dict[str, Any]:
    """Answer one ``pg_*`` request; the reply is JSON-ready.

    Errors the caller made (bad arguments, a taken name) come back as
    ``{"error": {"type": "ValueError", "message": ...}}`` so the public API
    can raise the right exception type; etcd trouble raises and reaches the
    caller as RaySystemError through the daemon's generic error path.
    ``job_id``/``namespace``, when the daemon passes them, override the
    payload: the daemon knows which job a connection belongs to.
    ``creator_node`` (default ``node_id``) is the node whose daemon will
    remove the group when its job ends: pass the job's driver node when the
    request comes from a worker and the driver lives elsewhere.
    """
    if method not in REQUEST_METHODS:
        raise ValueError(f"unknown placement group request {method!r}")
    try:
        if method == "pg_create":
            request = parse_create_request(payload, node_id=node_id, job_id=job_id,
                                           namespace=namespace, creator_node=creator_node)
            (outcome,) = create_placement_groups(coordinator, [request], keys=keys)
            if isinstance(outcome, Exception):
                raise outcome
            return {"record": outcome.to_dict() if outcome else None}
        if method == "pg_remove":
            removed = remove_placement_group(coordinator, str(payload.get("pg_id", "")),
                                             keys=keys)
            return {"removed": removed}
        if method == "pg_get":
            record, _ = get_record(coordinator, str(payload.get("pg_id", "")), keys)
            return {"record": record.to_dict() if record else None}
        if method == "pg_get_by_name":
            name = payload.get("name")
            ns = namespace if namespace is not None else payload.get("namespace", "")
            if not isinstance(name, str) or not name or not isinstance(ns, str):
                raise ValueError("pg_get_by_name needs a non-empty str name and a str "
                                 "namespace")
            record = get_record_by_name(coordinator, ns, name, keys)
            return {"record": record.to_dict() if record else None}
        return {"records": [r.to_dict() for r in list_records(coordinator, keys)]}
    except CoordinationError:
        raise  # some are ValueErrors too, but they are not the caller's mistake
    except ValueError as exc:
        return _error("ValueError", str(exc))
