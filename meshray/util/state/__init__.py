"""Ray's state API (``ray.util.state``): what the cluster is doing, from any node.

The node this process is connected to asks every live node in parallel and
merges their answers (there is no head node); see docs/observability.md.
"""
from meshray.util.state.api import (
    get_actor,
    get_job,
    get_node,
    get_objects,
    get_placement_group,
    get_task,
    get_worker,
    list_actors,
    list_jobs,
    list_nodes,
    list_objects,
    list_placement_groups,
    list_tasks,
    list_workers,
    summarize_actors,
    summarize_objects,
    summarize_tasks,
)
from meshray.util.state.logs import get_log, list_logs
from meshray.util.state.common import (
    ActorState,
    JobState,
    NodeState,
    ObjectState,
    PlacementGroupState,
    RayStateApiException,
    TaskState,
    WorkerState,
)

__all__ = [
    "ActorState", "JobState", "NodeState", "ObjectState", "PlacementGroupState",
    "RayStateApiException", "TaskState", "WorkerState",
    "get_actor", "get_job", "get_node", "get_objects", "get_placement_group", "get_task",
    "get_log", "get_worker", "list_actors", "list_logs", "list_jobs", "list_nodes", "list_objects",
    "list_placement_groups", "list_tasks", "list_workers", "summarize_actors",
    "summarize_objects", "summarize_tasks",
]
