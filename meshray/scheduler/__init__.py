"""Scheduling: fixed-point resource accounting and the pure placement policy.

Nothing in this package does I/O; the node daemon feeds it a cluster view
and acts on the decisions it returns.
"""
from meshray.scheduler.policy import (
    DEFAULT,
    SPREAD,
    Decision,
    Infeasible,
    NodeView,
    RunLocal,
    SchedulingRequest,
    Spill,
    Unschedulable,
    UsePlacementGroup,
    Wait,
    decide,
    pick_spill_candidates,
)
from meshray.scheduler.resources import (
    UNIT_SCALE,
    Allocation,
    GpuAllocator,
    NodeResources,
    ResourceAccountingError,
    ResourceSet,
    UnitInstanceAllocator,
)

__all__ = [
    "DEFAULT",
    "SPREAD",
    "Decision",
    "Infeasible",
    "NodeView",
    "RunLocal",
    "SchedulingRequest",
    "Spill",
    "Unschedulable",
    "UsePlacementGroup",
    "Wait",
    "decide",
    "pick_spill_candidates",
    "UNIT_SCALE",
    "Allocation",
    "GpuAllocator",
    "NodeResources",
    "ResourceAccountingError",
    "ResourceSet",
    "UnitInstanceAllocator",
]
