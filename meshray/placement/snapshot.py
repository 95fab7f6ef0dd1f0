"""What every placement-group transaction decides on, and the small pieces
they all share.

Reading: the nodes, reservations and availability hints (:class:`Snapshot`)
and the group records, read from etcd. Shared: the record and alloc
encoders, the retry backoff and the batch retry limit used by
:mod:`.placing`, :mod:`.creation` and :mod:`.removal`, which all build on
this module. ``reservation.py`` offers the public names and describes the
transaction design.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from meshray.coordination import keyspace as ks
from meshray.coordination.client import Delete, Put
from meshray.placement.records import REMOVED, AllocRecord, PlacementGroupRecord
from meshray.scheduler.resources import ResourceSet

__all__ = [
    "NodeEntry",
    "Snapshot",
    "read_snapshot",
    "get_record",
    "get_record_by_name",
    "list_records",
]

log = logging.getLogger(__name__)

_DEFAULT_PLACE_TIMEOUT_S = 3.0


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
# Shared by the transactions


def _encode(record) -> bytes:
    return ks.encode_json(record.to_dict())


def _alloc_write(keys: ks.Keyspace, node_id: str, new: AllocRecord, lease: Optional[int]):
    key = keys.alloc(node_id)
    if not new.bundles:
        return Delete(key)
    return Put(key, ks.encode_json(new.to_dict()), lease=lease or None)


def _backoff(attempt: int) -> float:
    return random.uniform(0, min(0.2, 0.005 * (2 ** min(attempt, 8))))


#: Batch transactions (create_placement_groups, remove_placement_groups) are
#: re-decided this many times before their groups fall back to the
#: single-group path.
_BATCH_ATTEMPTS = 3
