"""list_*, get_* and summarize_* of Ray's state API, answered by the cluster's nodes.

Every call is one question to the node this process is connected to
(`state_query`); that node asks the others in parallel and merges their
pages. Listing never truncates silently: ``limit`` bounds one call, and
when more records match, a warning says how many (and ``_cursor`` continues
where the page ended); nodes that did not answer within ``timeout`` raise
RayStateApiException with ``raise_on_missing_output`` (Ray's default), or a
warning without it.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import warnings
from typing import List, Optional, Tuple

from meshray.core import state as state_mod
from meshray.util.state.common import (
    ActorState,
    JobState,
    NodeState,
    ObjectState,
    PlacementGroupState,
    RayStateApiException,
    StateSchema,
    TaskState,
    WorkerState,
)

__all__ = ["get_actor", "get_job", "get_node", "get_objects", "get_placement_group", "get_task",
           "get_worker", "list_actors", "list_jobs", "list_nodes", "list_objects",
           "list_placement_groups", "list_tasks", "list_workers", "summarize_actors",
           "summarize_objects", "summarize_tasks", "query_state"]

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 100
DEFAULT_TIMEOUT = 30
_SCHEMAS = {"tasks": TaskState, "actors": ActorState, "nodes": NodeState,
            "workers": WorkerState, "objects": ObjectState,
            "placement_groups": PlacementGroupState, "jobs": JobState}
Filters = Optional[List[Tuple[str, str, object]]]


def _core(address: Optional[str]):
    if state_mod.state.core is None and address is not None \
            and state_mod.state.auto_init is not None:
        state_mod.state.auto_init(address=address)      # meshray.init, registered by the API
    return state_mod.ensure_core()


def _ask(address, payload: dict, timeout: float) -> dict:
    future = _core(address).request_async("state_query", {**payload, "timeout": timeout})
    try:
        reply = future.result(timeout + 10)
    except concurrent.futures.TimeoutError:
        raise RayStateApiException(
            f"the node did not answer the state query on {payload.get('resource')} within "
            f"{timeout + 10:.0f}s") from None
    if reply.error:
        kind, _, message = reply.error.partition(": ")
        if kind == "ValueError":
            raise ValueError(message)
        raise RayStateApiException(f"state query on {payload.get('resource')} failed: "
                                   f"{reply.error}")
    return json.loads(reply.payload)


def _filters(filters: Filters) -> list:
    if filters is None:
        return []
    if not isinstance(filters, (list, tuple)):
        raise ValueError(f"filters={filters!r}: expected a list of (column, predicate, value)")
    return [list(item) if isinstance(item, (list, tuple)) else item for item in filters]


def _missing(answer: dict, what: str, raise_on_missing_output: bool) -> None:
    missing = answer.get("missing") or {}
    if not missing:
        return
    detail = "; ".join(f"node {node}: {why}" for node, why in sorted(missing.items()))
    message = (f"{len(missing)} node(s) did not answer the {what} query in time, so the "
               f"result is incomplete: {detail}")
    if raise_on_missing_output:
        raise RayStateApiException(message)
    warnings.warn(message, stacklevel=3)


def query_state(resource: str, *, address: Optional[str] = None, filters: Filters = None,
                limit: int = DEFAULT_LIMIT, timeout: int = DEFAULT_TIMEOUT, detail: bool = False,
                raise_on_missing_output: bool = True, cursor: str = "") -> dict:
    """One page of `resource` with the answer's bookkeeping (total, next_cursor,
    missing, dropped): what the list_* functions and the CLI build on."""
    answer = _ask(address, {"resource": resource, "filters": _filters(filters),
                            "limit": limit, "detail": detail, "cursor": cursor}, timeout)
    _missing(answer, resource, raise_on_missing_output)
    schema = _SCHEMAS[resource]
    answer["items"] = [schema(item) for item in answer["items"]]
    return answer


def _list(resource: str, address, filters, limit, timeout, detail, raise_on_missing_output,
          _explain: bool = False, _cursor: str = "") -> list:
    answer = query_state(resource, address=address, filters=filters, limit=limit,
                         timeout=timeout, detail=detail,
                         raise_on_missing_output=raise_on_missing_output, cursor=_cursor)
    if answer.get("next_cursor"):
        warnings.warn(
            f"{answer['total']} {resource} match; {len(answer['items'])} returned "
            f"(limit={limit}). Raise the limit, or page on with _cursor="
            f"{answer['next_cursor']!r}.", stacklevel=3)
    if answer.get("dropped"):
        warnings.warn(f"{answer['dropped']} older {resource} were removed by the nodes' "
                      "retention policy (docs/observability.md)", stacklevel=3)
    if answer.get("counted"):
        warnings.warn(f"{answer['counted']} actor method calls were counted, not listed one "
                      "by one (their actors ran more than MESHRAY_ACTOR_TASK_EVENTS_PER_S calls "
                      "a second); summarize_tasks includes them", stacklevel=3)
    if _explain:
        print(f"state query on {resource}: {len(answer['items'])} of {answer['total']} from "
              f"{len(answer.get('nodes', []))} node(s) in {answer.get('elapsed_s', 0):.3f}s")
    return answer["items"]


def _make_list(resource: str):
    def list_fn(address: Optional[str] = None, filters: Filters = None,
                limit: int = DEFAULT_LIMIT, timeout: int = DEFAULT_TIMEOUT, detail: bool = False,
                raise_on_missing_output: bool = True, _explain: bool = False,
                _cursor: str = "") -> List[StateSchema]:
        return _list(resource, address, filters, limit, timeout, detail,
                     raise_on_missing_output, _explain, _cursor)
    list_fn.__name__ = list_fn.__qualname__ = f"list_{resource}"
    list_fn.__doc__ = (f"List {resource.replace('_', ' ')} in the cluster (Ray's "
                       f"ray.util.state.list_{resource}).")
    return list_fn


list_tasks = _make_list("tasks")
list_actors = _make_list("actors")
list_nodes = _make_list("nodes")
list_workers = _make_list("workers")
list_objects = _make_list("objects")
list_placement_groups = _make_list("placement_groups")
list_jobs = _make_list("jobs")


def _id_hex(value, what: str) -> str:
    if hasattr(value, "hex") and callable(value.hex) and not isinstance(value, (bytes, str)):
        value = value.hex()
    if isinstance(value, bytes):
        value = value.hex()
    if not isinstance(value, str) or not value:
        raise ValueError(f"id={value!r}: expected the {what} id as a hex string")
    return value


def _get(resource: str, column: str, id, address, timeout, limit: int = 1):
    items = _list(resource, address, [(column, "=", _id_hex(id, column))], limit, timeout,
                  True, True)
    return items


def get_task(id, address: Optional[str] = None, timeout: int = DEFAULT_TIMEOUT,
             _explain: bool = False):
    """The task with this id (a hex string, or the ObjectRef of one of its returns), or None."""
    if hasattr(id, "task_id") and callable(id.task_id):
        id = id.task_id()
    items = _get("tasks", "task_id", id, address, timeout)
    return items[0] if items else None


def _make_get(resource: str, column: str, what: str):
    def get_fn(id: str, address: Optional[str] = None, timeout: int = DEFAULT_TIMEOUT,
               _explain: bool = False):
        items = _get(resource, column, id, address, timeout)
        return items[0] if items else None
    get_fn.__name__ = get_fn.__qualname__ = f"get_{what}"
    get_fn.__doc__ = f"The {what.replace('_', ' ')} with this id (hex), or None."
    return get_fn


get_actor = _make_get("actors", "actor_id", "actor")
get_node = _make_get("nodes", "node_id", "node")
get_worker = _make_get("workers", "worker_id", "worker")
get_placement_group = _make_get("placement_groups", "placement_group_id", "placement_group")
get_job = _make_get("jobs", "job_id", "job")


def get_objects(id: str, address: Optional[str] = None, timeout: int = DEFAULT_TIMEOUT,
                _explain: bool = False) -> list:
    """Every node's record of the object (Ray returns a list: one per reference holder)."""
    return _get("objects", "object_id", id, address, timeout, limit=1000)


def _summary(resource: str, address, timeout, raise_on_missing_output, filters=None) -> dict:
    answer = _ask(address, {"resource": resource, "filters": _filters(filters), "summary": True},
                  timeout)
    _missing(answer, resource, raise_on_missing_output)
    return answer


def summarize_tasks(address: Optional[str] = None, timeout: int = DEFAULT_TIMEOUT,
                    raise_on_missing_output: bool = True, _explain: bool = False) -> dict:
    """Tasks per function name and state, counted on every node and added up."""
    answer = _summary("tasks", address, timeout, raise_on_missing_output)
    groups = answer["summary"]
    return {"cluster": {
        "summary": groups,
        "total_tasks": sum(sum(g["state_counts"].values()) for g in groups.values()),
        "total_actor_tasks": sum(sum(g["state_counts"].values()) for g in groups.values()
                                 if g["type"] == "ACTOR_TASK"),
        "total_actor_scheduled": sum(sum(g["state_counts"].values()) for g in groups.values()
                                     if g["type"] == "ACTOR_CREATION_TASK"),
        "summary_by": "func_name",
    }}


def summarize_actors(address: Optional[str] = None, timeout: int = DEFAULT_TIMEOUT,
                     raise_on_missing_output: bool = True, _explain: bool = False) -> dict:
    """Actors per class name and state."""
    answer = _summary("actors", address, timeout, raise_on_missing_output)
    groups = answer["summary"]
    return {"cluster": {"summary": groups, "total_actors": sum(
        sum(g["state_counts"].values()) for g in groups.values()), "summary_by": "class"}}


def summarize_objects(address: Optional[str] = None, timeout: int = DEFAULT_TIMEOUT,
                      raise_on_missing_output: bool = True, _explain: bool = False) -> dict:
    """Objects by task status, counted on every node and added up."""
    answer = _summary("objects", address, timeout, raise_on_missing_output)
    groups = answer["summary"]
    return {"cluster": {"summary": groups, "total_objects": sum(
        sum(g["state_counts"].values()) for g in groups.values()), "summary_by": "callsite"}}
