"""Creating groups: one at a time (:func:`create_placement_group`) or many in
few transactions (:func:`create_placement_groups`, planned by the pure
:func:`plan_create_chunk`), with the request checks that feed them.

``reservation.py``, the module the daemon imports, offers these names and
describes the transaction design.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from meshray.coordination import keyspace as ks
from meshray.coordination.client import (
    MAX_TXN_OPS,
    CoordinationError,
    CoordinationUnavailable,
    Get,
    KeyMissing,
    LeaseNotFoundError,
    ModRevisionEquals,
    Put,
)
from meshray.placement import policy
from meshray.placement.placing import PlaceResult, try_place
from meshray.placement.records import (
    CREATED,
    MAX_NODES_PER_TXN,
    PENDING,
    AllocRecord,
    BundleAlloc,
    PlacementGroupRecord,
    PlacementGroupSpec,
    validate_placement_group_args,
)
from meshray.placement.snapshot import (
    _BATCH_ATTEMPTS,
    _DEFAULT_PLACE_TIMEOUT_S,
    Snapshot,
    _alloc_write,
    _backoff,
    _encode,
    get_record,
    read_snapshot,
)
from meshray.scheduler.resources import ResourceSet

__all__ = [
    "PlacementGroupNameTaken",
    "create_placement_group",
    "CreateRequest",
    "parse_create_request",
    "CreateChunk",
    "plan_create_chunk",
    "create_placement_groups",
]

log = logging.getLogger(__name__)


class PlacementGroupNameTaken(ValueError):
    """The name is already held by a live group in that namespace."""


# --------------------------------------------------------------------------
# Creating


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
    and succeeds instead of creating a twin (state-changing calls are
    idempotent, so any caller may retry them). Raises PlacementGroupNameTaken (a ValueError) if
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
