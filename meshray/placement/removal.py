"""Removing groups: one at a time (:func:`remove_placement_group`) or many in
few transactions (:func:`remove_placement_groups`, planned by the pure
:func:`plan_remove_chunk`, tombstones on shared :class:`TombstoneLeases`),
and the sweeps that call them: a job's groups when it ends
(:func:`remove_job_groups`) and orphans whose creator is gone
(:func:`sweep_orphans`).

``reservation.py``, the module the daemon imports, offers these names and
describes the transaction design.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from meshray.coordination import keyspace as ks
from meshray.coordination.client import (
    MAX_TXN_OPS,
    CoordinationError,
    CoordinationUnavailable,
    Delete,
    LeaseNotFoundError,
    ModRevisionEquals,
    Put,
    ValueEquals,
)
from meshray.placement.records import REMOVED, AllocRecord, PlacementGroupRecord
from meshray.placement.snapshot import (
    _BATCH_ATTEMPTS,
    _alloc_write,
    _backoff,
    _encode,
    get_record,
    list_records,
)

__all__ = [
    "DEFAULT_TOMBSTONE_TTL_S",
    "remove_placement_group",
    "remove_job_groups",
    "sweep_orphans",
    "TombstoneLeases",
    "RemoveChunk",
    "plan_remove_chunk",
    "remove_placement_groups",
]

log = logging.getLogger(__name__)

#: How long a REMOVED group's record stays readable (placement_group_table,
#: fast failure of late tasks). It sits on its own lease so etcd forgets it
#: without anyone having to remember to; a missing record means "removed".
DEFAULT_TOMBSTONE_TTL_S = 600


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


# --------------------------------------------------------------------------
# Batches: many removals, few transactions (what the node daemon's placer runs;
# creation.py explains how a batch keeps the single-group guarantees)


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
