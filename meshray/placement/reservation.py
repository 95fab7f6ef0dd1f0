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
    """
    hint = set(live_nodes) if live_nodes is not None else None
    deadline = time.monotonic() + timeout_s
    snap = read_snapshot(coordinator, keys)
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
    removed = []
    for record in list_records(coordinator, keys):
        if record.job_id == job_hex and not record.detached and record.state != REMOVED:
            if remove_placement_group(coordinator, record.pg_id, keys=keys,
                                      tombstone_ttl_s=tombstone_ttl_s,
                                      reason=f"job {job_hex} ended"):
                removed.append(record.pg_id)
    return removed


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
            spec = validate_placement_group_args(
                payload.get("bundles"), payload.get("strategy"), payload.get("name", ""),
                payload.get("lifetime"))
            ns = namespace if namespace is not None else payload.get("namespace", "")
            job = job_id if job_id is not None else payload.get("job_id", "")
            if not isinstance(ns, str) or not isinstance(job, str):
                raise ValueError("pg_create: namespace and job_id must be strings")
            result = create_placement_group(
                coordinator, spec, pg_id=str(payload.get("pg_id", "")), namespace=ns,
                job_id=job.lower(), keys=keys,
                creator_node=ks.id_hex(creator_node or node_id, "creator_node"))
            record, _ = get_record(coordinator, result.pg_id, keys)
            return {"record": record.to_dict() if record else None}
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
