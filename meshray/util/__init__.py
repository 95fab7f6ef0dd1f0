"""Ray-compatible utilities (`ray.util`): placement groups, scheduling
strategies, ActorPool, results as they complete, named-actor listing,
serializability checks and custom serializers.

``meshray.util.queue`` and ``meshray.util.multiprocessing`` are imported
on their own, as in Ray.
"""
from meshray.util.actor_pool import ActorPool
from meshray.util.check_serialize import inspect_serializability
from meshray.util.helpers import as_completed, map_unordered
from meshray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from meshray.util.runtime_info import get_node_ip_address, list_named_actors
from meshray.util.serialization import deregister_serializer, register_serializer

__all__ = [
    "ActorPool",
    "PlacementGroup",
    "as_completed",
    "deregister_serializer",
    "get_current_placement_group",
    "get_node_ip_address",
    "get_placement_group",
    "inspect_serializability",
    "list_named_actors",
    "map_unordered",
    "placement_group",
    "placement_group_table",
    "register_serializer",
    "remove_placement_group",
]
