"""The records the state API returns, with Ray's class and field names.

Each record is a dict whose keys are also attributes (``task.state`` and
``task["state"]`` both work), so code written against Ray's dataclasses and
code that treats them as mappings both run.
"""
from __future__ import annotations

__all__ = ["ActorState", "JobState", "NodeState", "ObjectState", "PlacementGroupState",
           "RayStateApiException", "StateSchema", "TaskState", "WorkerState"]


class RayStateApiException(Exception):
    """A state query could not be answered (or, with raise_on_missing_output, only in part)."""


class StateSchema(dict):
    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}") from None

    def asdict(self) -> dict:
        return dict(self)


class TaskState(StateSchema):
    """A task, as the node that ran it (or holds it) recorded it."""


class ActorState(StateSchema):
    """An actor, from its record in etcd."""


class NodeState(StateSchema):
    """A node of the cluster (alive, or seen alive and now dead)."""


class WorkerState(StateSchema):
    """A worker process or a driver connected to a node."""


class ObjectState(StateSchema):
    """An object a node's directory tracks."""


class PlacementGroupState(StateSchema):
    """A placement group, from its record in etcd."""


class JobState(StateSchema):
    """A job whose driver is connected to some node."""
