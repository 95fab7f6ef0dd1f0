"""What a placement group looks like in etcd, and the checks on user input.

Two record families carry all placement-group state (docs/placement-groups.md):

* ``pgs/<pg_id>`` — the group: its bundles, strategy, owner, state and which
  node each bundle is reserved on (``placement``). Not on any lease, so it
  outlives the node that wrote it and peers can re-place it.
* ``alloc/<node_id>`` — the bundles reserved on one node. Written only in the
  same transaction as the group records it mentions, and attached to the
  target node's lease, so a dead node's reservations vanish with it.

A bundle ``(pg, i)`` is *held* exactly when ``placement[i] == n`` and
``alloc/n`` lists ``(pg, i)``; both change in one transaction, which is what
makes "half-reserved" impossible. This module is pure (no I/O): it defines
the JSON schemas, their validation, and the user-input checks the public API
runs before it talks to anyone.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from meshray.common.id_types import PlacementGroupID
from meshray.coordination.client import MAX_TXN_OPS
from meshray.scheduler.resources import ResourceSet, to_units

__all__ = [
    "STRATEGIES",
    "PACK",
    "SPREAD",
    "STRICT_PACK",
    "STRICT_SPREAD",
    "PENDING",
    "CREATED",
    "RESCHEDULING",
    "REMOVED",
    "STATES",
    "DETACHED",
    "SCHEMA_VERSION",
    "MAX_BUNDLES",
    "MAX_NODES_PER_TXN",
    "RESERVED_RESOURCE_NAMES",
    "PlacementGroupID",
    "PlacementGroupSpec",
    "PlacementGroupRecord",
    "BundleAlloc",
    "AllocRecord",
    "validate_strategy",
    "validate_lifetime",
    "validate_name",
    "validate_bundles",
    "validate_placement_group_args",
    "lost_bundles",
    "groups_needing_placement",
    "table_entry",
]

PACK = "PACK"
SPREAD = "SPREAD"
STRICT_PACK = "STRICT_PACK"
STRICT_SPREAD = "STRICT_SPREAD"
STRATEGIES = (PACK, SPREAD, STRICT_PACK, STRICT_SPREAD)

PENDING = "PENDING"
CREATED = "CREATED"
RESCHEDULING = "RESCHEDULING"
REMOVED = "REMOVED"
STATES = (PENDING, CREATED, RESCHEDULING, REMOVED)

DETACHED = "detached"
SCHEMA_VERSION = 1

#: Bundles per group. Keeps a group record and its alloc entries far below
#: etcd's request limit (docs/keyspace.md: values stay well under 64 KiB).
MAX_BUNDLES = 500

#: How many distinct nodes one reservation transaction may write. Each target
#: node costs three of etcd's 128 transaction slots (compare the node record,
#: compare the alloc record, put the alloc record) and the group record two
#: (compare, put); the rest is slack for cleaning a dead node's leftovers.
MAX_NODES_PER_TXN = (MAX_TXN_OPS - 2 - 6) // 3

#: Resource names users may not put in bundles: meshray reserves them for
#: placement-group accounting (same list as meshray.core.options).
RESERVED_RESOURCE_NAMES = ("bundle",)


# --------------------------------------------------------------------------
# Ids


# PlacementGroupID lives with meshray's other id classes (common/id_types.py);
# imported here for the records and the API that use it.


# --------------------------------------------------------------------------
# Input validation (pure, runs before any I/O)


def validate_strategy(strategy: Any) -> str:
    """None means PACK, like Ray; anything else must be one of STRATEGIES."""
    if strategy is None:
        return PACK
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(
            f"Invalid placement group strategy {strategy!r}: expected one of "
            f"{', '.join(STRATEGIES)}.")
    return strategy


def validate_lifetime(lifetime: Any) -> Optional[str]:
    if lifetime is None or lifetime == DETACHED:
        return lifetime
    raise ValueError(
        f"Placement group `lifetime` argument must be either None or 'detached', "
        f"got {lifetime!r}.")


def validate_name(name: Any) -> str:
    if name is None:
        return ""
    if not isinstance(name, str):
        raise ValueError(f"Placement group `name` must be a str, got {name!r} of type "
                         f"{type(name).__name__}.")
    return name


def _bundle_amount(index: int, resource: str, amount: Any) -> float:
    # to_units gives the same rules as every other resource request
    # (non-negative, finite, not below the fixed-point precision); the
    # messages here add which bundle was wrong, which users need most.
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise ValueError(
            f"Bundle {index}: resource {resource!r} must be a number, got {amount!r} of type "
            f"{type(amount).__name__}.")
    value = float(amount)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"Bundle {index}: resource {resource!r} must be finite, got {amount!r}.")
    if value < 0:
        raise ValueError(
            f"Bundle {index}: resource {resource!r} cannot be negative, got {amount!r}.")
    try:
        to_units(resource, amount)
    except ValueError as exc:
        raise ValueError(f"Bundle {index}: {exc}") from None
    return value


def validate_bundles(bundles: Any) -> List[Dict[str, float]]:
    """Check a bundle list and return it normalised (floats, zeros dropped).

    Zero entries are dropped because they reserve nothing; a bundle made only
    of zeros is refused (as Ray does) because it could never hold a task that
    asks for anything, and is almost always a typo.
    """
    if isinstance(bundles, Mapping) or not isinstance(bundles, (list, tuple)):
        raise ValueError(
            f"Placement group `bundles` must be a list of dicts like [{{'CPU': 1}}], got "
            f"{bundles!r} of type {type(bundles).__name__}.")
    if not bundles:
        raise ValueError("Placement group `bundles` cannot be an empty list.")
    if len(bundles) > MAX_BUNDLES:
        raise ValueError(
            f"A placement group can have at most {MAX_BUNDLES} bundles, got {len(bundles)}.")
    out: List[Dict[str, float]] = []
    for index, bundle in enumerate(bundles):
        if not isinstance(bundle, Mapping):
            raise ValueError(
                f"Bundle {index} must be a dict of resource amounts, got {bundle!r} of type "
                f"{type(bundle).__name__}.")
        clean: Dict[str, float] = {}
        for resource, amount in bundle.items():
            if not isinstance(resource, str) or not resource:
                raise ValueError(
                    f"Bundle {index}: resource names must be non-empty str, got {resource!r}.")
            if resource in RESERVED_RESOURCE_NAMES:
                raise ValueError(
                    f"Bundle {index}: resource name {resource!r} is reserved for placement "
                    f"groups.")
            value = _bundle_amount(index, resource, amount)
            if value:
                clean[resource] = value
        if not clean:
            raise ValueError(
                f"Bundle {index} is empty: bundles cannot be an empty dict or have only zero "
                f"amounts (got {bundle!r}).")
        out.append(clean)
    return out


@dataclass(frozen=True)
class PlacementGroupSpec:
    """Validated creation arguments, as they travel to the daemon."""

    bundles: Tuple[Dict[str, float], ...]
    strategy: str
    name: str
    lifetime: Optional[str]

    def to_payload(self) -> Dict[str, Any]:
        return {"bundles": [dict(b) for b in self.bundles], "strategy": self.strategy,
                "name": self.name, "lifetime": self.lifetime}


def validate_placement_group_args(bundles: Any, strategy: Any = PACK, name: Any = "",
                                  lifetime: Any = None) -> PlacementGroupSpec:
    """Every check `placement_group()` makes before any I/O.

    STRICT_SPREAD is capped at MAX_NODES_PER_TXN bundles because all of its
    nodes must be written in one etcd transaction; reporting that here beats
    a group that can never leave PENDING.
    """
    strategy = validate_strategy(strategy)
    lifetime = validate_lifetime(lifetime)
    name = validate_name(name)
    clean = validate_bundles(bundles)
    if strategy == STRICT_SPREAD and len(clean) > MAX_NODES_PER_TXN:
        raise ValueError(
            f"STRICT_SPREAD places every bundle on its own node and meshray reserves a group "
            f"in one etcd transaction, which can cover at most {MAX_NODES_PER_TXN} nodes; got "
            f"{len(clean)} bundles. Use SPREAD, or split the group.")
    return PlacementGroupSpec(tuple(clean), strategy, name, lifetime)


# --------------------------------------------------------------------------
# Records


def _req(data: Mapping[str, Any], key: str, kind, what: str):
    if key not in data:
        raise ValueError(f"{what} record lacks {key!r}: {dict(data)!r}")
    value = data[key]
    if kind is not None and not isinstance(value, kind):
        raise ValueError(f"{what} record field {key!r} has type {type(value).__name__}")
    return value


@dataclass(frozen=True)
class PlacementGroupRecord:
    """The value of ``pgs/<pg_id>``.

    ``placement[i]`` is the node (hex) holding bundle ``i``, or None while it
    is not reserved. ``reason`` says why a group is not CREATED, for
    ``placement_group_table`` and for the infeasible notice to the driver.
    ``creator_node`` is the daemon that accepted the creation: when it is gone
    a non-detached group's job is gone too (see reservation.sweep_orphans).
    """

    pg_id: str
    bundles: Tuple[Dict[str, float], ...]
    strategy: str
    name: str = ""
    namespace: str = ""
    lifetime: Optional[str] = None
    job_id: str = ""
    creator_node: str = ""
    state: str = PENDING
    placement: Tuple[Optional[str], ...] = ()
    reason: str = ""
    infeasible_ever: bool = False
    created_at: float = 0.0

    def __post_init__(self):
        if not self.placement:
            object.__setattr__(self, "placement", (None,) * len(self.bundles))
        if len(self.placement) != len(self.bundles):
            raise ValueError(f"placement group {self.pg_id}: {len(self.placement)} placements "
                             f"for {len(self.bundles)} bundles")
        if self.state not in STATES:
            raise ValueError(f"placement group {self.pg_id}: unknown state {self.state!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"placement group {self.pg_id}: unknown strategy "
                             f"{self.strategy!r}")

    @property
    def detached(self) -> bool:
        return self.lifetime == DETACHED

    def bundle_set(self, index: int) -> ResourceSet:
        return ResourceSet(self.bundles[index])

    def with_(self, **changes) -> "PlacementGroupRecord":
        return replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "v": SCHEMA_VERSION,
            "pg_id": self.pg_id,
            "bundles": [dict(b) for b in self.bundles],
            "strategy": self.strategy,
            "name": self.name,
            "namespace": self.namespace,
            "lifetime": self.lifetime,
            "job_id": self.job_id,
            "creator_node": self.creator_node,
            "state": self.state,
            "placement": list(self.placement),
            "reason": self.reason,
            "infeasible_ever": self.infeasible_ever,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PlacementGroupRecord":
        if not isinstance(data, Mapping):
            raise ValueError(f"placement group record must be a JSON object, got {data!r}")
        version = data.get("v", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ValueError(f"placement group record has schema version {version!r}; this "
                             f"meshray reads version {SCHEMA_VERSION}")
        bundles = _req(data, "bundles", list, "placement group")
        placement = data.get("placement") or [None] * len(bundles)
        return cls(
            pg_id=_req(data, "pg_id", str, "placement group"),
            bundles=tuple(dict(b) for b in bundles),
            strategy=_req(data, "strategy", str, "placement group"),
            name=data.get("name", "") or "",
            namespace=data.get("namespace", "") or "",
            lifetime=data.get("lifetime"),
            job_id=data.get("job_id", "") or "",
            creator_node=data.get("creator_node", "") or "",
            state=data.get("state", PENDING),
            placement=tuple(placement),
            reason=data.get("reason", "") or "",
            infeasible_ever=bool(data.get("infeasible_ever", False)),
            created_at=float(data.get("created_at", 0.0) or 0.0),
        )


@dataclass(frozen=True)
class BundleAlloc:
    """One bundle reserved on a node."""

    pg_id: str
    index: int
    resources: Dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> Tuple[str, int]:
        return (self.pg_id, self.index)

    def to_dict(self) -> Dict[str, Any]:
        return {"pg": self.pg_id, "index": self.index, "resources": dict(self.resources)}


@dataclass(frozen=True)
class AllocRecord:
    """The value of ``alloc/<node_id>``: every bundle reserved on the node.

    ``lease`` is the node lease the key is attached to (0 when the node record
    named none), kept in the value so whoever rewrites the key re-attaches it
    to the same lease without reading the node record.
    """

    node_id: str
    lease: int = 0
    bundles: Tuple[BundleAlloc, ...] = ()

    def reserved(self) -> ResourceSet:
        """Sum in fixed point, so adding and removing bundles never drifts."""
        total = ResourceSet()
        for bundle in self.bundles:
            total = total + ResourceSet(bundle.resources)
        return total

    def keys(self) -> set:
        return {b.key for b in self.bundles}

    def holds(self, pg_id: str, index: int) -> bool:
        return any(b.pg_id == pg_id and b.index == index for b in self.bundles)

    def with_bundles(self, added: Iterable[BundleAlloc]) -> "AllocRecord":
        merged = {b.key: b for b in self.bundles}
        for bundle in added:
            merged[bundle.key] = bundle
        return replace(self, bundles=tuple(merged[k] for k in sorted(merged)))

    def without_pg(self, pg_id: str, indices: Optional[Iterable[int]] = None) -> "AllocRecord":
        drop = None if indices is None else set(indices)
        kept = tuple(b for b in self.bundles
                     if b.pg_id != pg_id or (drop is not None and b.index not in drop))
        return replace(self, bundles=kept)

    def to_dict(self) -> Dict[str, Any]:
        return {"v": SCHEMA_VERSION, "node_id": self.node_id, "lease": self.lease,
                "bundles": [b.to_dict() for b in self.bundles]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AllocRecord":
        if not isinstance(data, Mapping):
            raise ValueError(f"alloc record must be a JSON object, got {data!r}")
        entries = []
        for item in data.get("bundles", []):
            entries.append(BundleAlloc(str(item["pg"]), int(item["index"]),
                                       dict(item.get("resources", {}))))
        return cls(node_id=str(data.get("node_id", "")), lease=int(data.get("lease", 0) or 0),
                   bundles=tuple(sorted(entries, key=lambda b: b.key)))


# --------------------------------------------------------------------------
# Pure questions the daemon asks of its mirrors


def lost_bundles(record: PlacementGroupRecord, live_nodes: Iterable[str],
                 allocs: Optional[Mapping[str, AllocRecord]] = None) -> List[int]:
    """Bundles that are not held: unplaced, on a dead node, or missing from
    their node's alloc record (the node lost its lease and came back under
    the same id, which dropped its reservations). ``allocs=None`` skips the
    last check, for callers that do not mirror ``alloc/``."""
    if record.state == REMOVED:
        return []
    live = set(live_nodes)
    lost = []
    for index, node in enumerate(record.placement):
        if node is None or node not in live:
            lost.append(index)
        elif allocs is not None:
            alloc = allocs.get(node)
            if alloc is None or not alloc.holds(record.pg_id, index):
                lost.append(index)
    return lost


def groups_needing_placement(records: Iterable[PlacementGroupRecord], live_nodes: Iterable[str],
                             allocs: Optional[Mapping[str, AllocRecord]] = None) -> List[str]:
    """Ids of groups that `reservation.try_place_pending` would act on.

    Lets a daemon that mirrors ``pgs/`` skip the etcd round trips when a view
    change cannot matter (no group is waiting and none lost a bundle).
    """
    live = set(live_nodes)
    out = []
    for record in records:
        if record.state == REMOVED:
            continue
        if record.state != CREATED or lost_bundles(record, live, allocs):
            out.append(record.pg_id)
    return out


def table_entry(record: PlacementGroupRecord) -> Dict[str, Any]:
    """One entry of ``placement_group_table()`` with Ray's keys (plus a few).

    ``bundles_to_node_id`` lists only bundles that are reserved, so a caller
    never mistakes a dead or unplaced bundle's old node for a live one.
    """
    placed = {}
    if record.state != REMOVED:
        placed = {i: node for i, node in enumerate(record.placement) if node is not None}
    return {
        "placement_group_id": record.pg_id,
        "name": record.name,
        "namespace": record.namespace,
        "bundles": {i: dict(b) for i, b in enumerate(record.bundles)},
        "bundles_to_node_id": placed,
        "strategy": record.strategy,
        "state": record.state,
        "is_detached": record.detached,
        "creator_job_id": record.job_id,
        "stats": {"scheduling_state": record.reason or record.state,
                  "infeasible": record.infeasible_ever},
    }
