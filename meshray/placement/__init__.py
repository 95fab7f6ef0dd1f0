"""Placement groups without a head node (docs/placement-groups.md).

* `records` — the etcd record schemas and the checks on user input (pure).
* `policy` — which node each bundle goes to (pure, deterministic).
* `reservation` — the transactions that create, reserve, re-place and
  remove groups, safe to run from every node at once; and `handle_request`,
  which answers the public API's ``pg_*`` requests inside the node daemon.

The Ray-compatible user API is `meshray.util.placement_group`.
"""
from meshray.placement.policy import (
    Infeasible,
    NodeCapacity,
    Placed,
    place_bundles,
    responsible_node,
    validate_request_fits_bundle,
)
from meshray.placement.records import (
    CREATED,
    PENDING,
    REMOVED,
    RESCHEDULING,
    STRATEGIES,
    AllocRecord,
    BundleAlloc,
    PlacementGroupID,
    PlacementGroupRecord,
    PlacementGroupSpec,
    groups_needing_placement,
    lost_bundles,
    validate_placement_group_args,
)

__all__ = [
    "CREATED",
    "PENDING",
    "REMOVED",
    "RESCHEDULING",
    "STRATEGIES",
    "AllocRecord",
    "BundleAlloc",
    "Infeasible",
    "NodeCapacity",
    "Placed",
    "PlacementGroupID",
    "PlacementGroupRecord",
    "PlacementGroupSpec",
    "groups_needing_placement",
    "lost_bundles",
    "place_bundles",
    "responsible_node",
    "validate_placement_group_args",
    "validate_request_fits_bundle",
]
