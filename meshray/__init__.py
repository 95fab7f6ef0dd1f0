"""meshray: Ray Core's programming model on a runtime with no head node.

`import meshray as ray` and a Ray Core program runs: remote functions,
objects, and (as they land) actors and placement groups, on peer node
daemons coordinated only through etcd.
"""
from meshray import actor, exceptions
from meshray._api import (
    available_resources,
    cancel,
    cluster_resources,
    get,
    get_actor,
    get_gpu_ids,
    init,
    is_initialized,
    kill,
    method,
    nodes,
    put,
    remote,
    shutdown,
    wait,
)
from meshray.common.id_types import (
    ActorClassID,
    ActorID,
    FunctionID,
    JobID,
    NodeID,
    PlacementGroupID,
    TaskID,
    UniqueID,
    WorkerID,
)
from meshray.core.object_ref import DynamicObjectRefGenerator, ObjectRef, ObjectRefGenerator
from meshray.runtime_context import get_runtime_context
from meshray.util.state.timeline import timeline

# Ray's names for the same classes.
ObjectID = ObjectRef

__version__ = "0.1.0"

__all__ = [
    "ActorClassID",
    "ActorID",
    "DynamicObjectRefGenerator",
    "FunctionID",
    "JobID",
    "NodeID",
    "ObjectID",
    "ObjectRef",
    "ObjectRefGenerator",
    "PlacementGroupID",
    "TaskID",
    "UniqueID",
    "WorkerID",
    "actor",
    "available_resources",
    "cancel",
    "cluster_resources",
    "exceptions",
    "get",
    "get_actor",
    "get_gpu_ids",
    "get_runtime_context",
    "init",
    "is_initialized",
    "kill",
    "method",
    "nodes",
    "put",
    "remote",
    "shutdown",
    "timeline",
    "wait",
]


def __getattr__(name: str):
    # Ray imports its libraries on first attribute access (`ray.data.range`);
    # meshray has none of them, and says so by name rather than with a bare
    # AttributeError.
    from meshray.core.ray_alias import missing_library
    error = missing_library(name)
    if error is not None:
        raise error
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}", name=name)
