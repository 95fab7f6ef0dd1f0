"""What a well-formed request to a node daemon is (Connect, Deliver, PullObject).

Pure checks, run by rpc/strict.py on each decoded message before the daemon
handles any of it, so a batch is refused whole or handled whole. Beyond the
shared rules (rpc/rules.py): every oneof is set, string "enums" (a Hello's
role, a task's scheduling strategy, a Request's method) have known values,
resource quantities are ones ResourceSet takes, actor options have the types
the node reads, and a spilled task carries one value per ref argument.

`strategy_blob` is the one pickle a node loads itself (whenever it places
the task), so it is loaded here, once: it must be the strategy its
`scheduling_strategy` names, or the request is refused rather than every
later placement failing.
"""
from __future__ import annotations

from meshray.core import ids
from meshray.rpc.rules import (
    FUNCTION_ID_LEN,
    JOB_ID_LEN,
    MAX_NUM_RETURNS,
    NODE_ID_LEN,
    WORKER_ID_LEN,
    check_common_spec,
    check_id,
    check_int_at_least,
    check_json,
    check_object_ids,
    check_object_value,
    check_pickle,
    check_runtime_env,
    check_task_result,
    fail,
)
from meshray.rpc.strict import Malformed

__all__ = ["BUILTIN_STRATEGIES", "CLUSTER_QUESTIONS", "MAX_PULL_CHUNK", "MIN_PULL_CHUNK",
           "STRATEGY_CLASSES", "check_client_batch", "check_peer_batch", "check_pull_request",
           "check_task_spec"]

MIN_PULL_CHUNK = 4 * 1024
MAX_PULL_CHUNK = 64 * 1024 * 1024
ROLES = ("driver", "worker")
BUILTIN_STRATEGIES = ("", "DEFAULT", "SPREAD")
STRATEGY_CLASSES = ("PlacementGroupSchedulingStrategy", "NodeAffinitySchedulingStrategy",
                    "NodeLabelSchedulingStrategy")
_STRATEGY_MODULE = "meshray.util.scheduling_strategies"
# Request methods the node answers from the etcd view rather than an _ask_ handler.
CLUSTER_QUESTIONS = frozenset({"available_resources", "cluster_resources", "nodes",
                               "node_usage"})
_ACTOR_OPTION_TYPES = {
    "class_name": (str,), "name": (str,), "namespace": (str, type(None)),
    "lifetime": (str, type(None)), "is_async": (bool,), "methods": (dict,),
    "max_restarts": (int,), "max_task_retries": (int,), "max_pending_calls": (int,),
    "max_concurrency": (int, type(None)), "concurrency_groups": (dict,),
}


def _quantities(mapping, path: str) -> None:
    from meshray.scheduler.resources import to_units
    for name, quantity in mapping.items():
        if not name:
            fail(path, name, "non-empty resource names")
        try:
            to_units(name, quantity)
        except (TypeError, ValueError) as exc:
            fail(f"{path}[{name!r}]", quantity, f"a finite quantity >= 0 ({exc})")


def _strategy(spec, path: str) -> None:
    name = spec.scheduling_strategy
    if name in BUILTIN_STRATEGIES:
        if spec.strategy_blob:
            fail(f"{path}.strategy_blob", spec.strategy_blob,
                 f"no strategy_blob with scheduling_strategy={name!r}")
        return
    if name not in STRATEGY_CLASSES:
        fail(f"{path}.scheduling_strategy", name,
             f"one of {', '.join(repr(s) for s in BUILTIN_STRATEGIES + STRATEGY_CLASSES)}")
    check_pickle(spec.strategy_blob, f"{path}.strategy_blob", optional=False)
    import cloudpickle
    try:
        strategy = cloudpickle.loads(spec.strategy_blob)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the sender's
        fail(f"{path}.strategy_blob", spec.strategy_blob,
             f"a pickled {name} (loading it failed: {type(exc).__name__}: {exc})")
    # By name, not isinstance: this module sits below the layer that defines them.
    if not any(cls.__name__ == name and cls.__module__ == _STRATEGY_MODULE
               for cls in type(strategy).__mro__):
        fail(f"{path}.strategy_blob", spec.strategy_blob,
             f"a pickled {name}, got a {type(strategy).__name__}")


def _actor_options(text, path: str) -> None:
    options = check_json(text, path)
    for key, types in _ACTOR_OPTION_TYPES.items():
        if key not in options:
            continue
        value = options[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            fail(f"{path}.{key}", value, " or ".join(t.__name__ for t in types))
    if options.get("lifetime") not in (None, "detached", "non_detached"):
        fail(f"{path}.lifetime", options["lifetime"], "None, 'detached' or 'non_detached'")
    for key in ("max_restarts", "max_task_retries", "max_pending_calls"):
        if key in options:
            check_int_at_least(options[key], -1, f"{path}.{key}")
    if options.get("max_concurrency") is not None:
        check_int_at_least(options["max_concurrency"], 1, f"{path}.max_concurrency")
    for group, limit in (options.get("concurrency_groups") or {}).items():
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            fail(f"{path}.concurrency_groups[{group!r}]", limit, "an integer >= 1")


def check_task_spec(spec, path: str) -> None:
    """A task or actor creation submitted to a node (or spilled to a peer)."""
    check_common_spec(spec, path)
    check_id(spec.function_id, FUNCTION_ID_LEN, f"{path}.function_id", "function id")
    if not -1 <= spec.num_returns <= MAX_NUM_RETURNS:
        fail(f"{path}.num_returns", spec.num_returns,
             f"-1 (streaming) or 0..{MAX_NUM_RETURNS}")
    if spec.resources:
        _quantities(spec.resources, f"{path}.resources")
    if spec.held_resources:
        _quantities(spec.held_resources, f"{path}.held_resources")
    _strategy(spec, path)
    if spec.args_image or spec.args_file:
        fail(f"{path}.args_image", spec.args_file or spec.args_image,
             "no argument image: images are for actor calls only")
    check_pickle(spec.args_blob, f"{path}.args_blob")
    if spec.actor_creation:
        check_id(spec.actor_id, ids.TASK_ID_LEN, f"{path}.actor_id", "actor id")
        if spec.num_returns != 1:
            fail(f"{path}.num_returns", spec.num_returns, "1 for an actor creation")
        _actor_options(spec.actor_options or b"{}", f"{path}.actor_options")
    elif spec.actor_id or spec.actor_options or spec.held_resources:
        fail(f"{path}.actor_id", spec.actor_id,
             "no actor_id, actor_options or held_resources unless actor_creation=true")


def _request(msg, path: str, questions) -> None:
    if msg.method not in questions:
        fail(f"{path}.method", msg.method, f"one of {', '.join(sorted(questions))}")
    if msg.payload:
        check_json(msg.payload, f"{path}.payload")


def _client_event(event, path: str, questions) -> None:
    kind = event.WhichOneof("kind")
    if kind is None:
        raise Malformed(f"{path}: no event set (the ClientEvent oneof 'kind' is empty)")
    msg = getattr(event, kind)
    path = f"{path}.{kind}"
    if kind == "submit":
        check_task_spec(msg.spec, f"{path}.spec")
    elif kind == "refs":
        check_object_ids(msg.add, f"{path}.add")
        check_object_ids(msg.remove, f"{path}.remove")
    elif kind == "subscribe":
        check_object_ids(msg.object_ids, f"{path}.object_ids")
    elif kind == "put":
        check_object_value(msg.value, f"{path}.value")
    elif kind == "task_result":
        check_task_result(msg, path)
    elif kind == "hello":
        if msg.role not in ROLES:
            fail(f"{path}.role", msg.role, " or ".join(repr(r) for r in ROLES))
        check_id(msg.worker_id, WORKER_ID_LEN, f"{path}.worker_id", "worker id")
        check_int_at_least(msg.pid, 1, f"{path}.pid")
        check_id(msg.job_id, JOB_ID_LEN, f"{path}.job_id", "job id", optional=True)
        if msg.runtime_env_json:
            check_runtime_env(msg.runtime_env_json, f"{path}.runtime_env_json")
    elif kind == "register_function":
        check_id(msg.function_id, FUNCTION_ID_LEN, f"{path}.function_id", "function id")
        check_pickle(msg.pickled, f"{path}.pickled", optional=False)
    elif kind in ("reserve", "cancel"):
        check_id(msg.object_id, ids.OBJECT_ID_LEN, f"{path}.object_id", "object id")
    elif kind == "request":
        _request(msg, path, questions)
    elif kind == "actor_exiting":
        check_id(msg.actor_id, ids.TASK_ID_LEN, f"{path}.actor_id", "actor id")
    # blocked: one bool, always well-formed


def check_client_batch(batch, questions) -> None:
    """A ClientBatch on NodeService.Connect; `questions` are the Request methods known."""
    for index, event in enumerate(batch.events):
        _client_event(event, f"events[{index}]", questions)


def _peer_event(event, path: str, questions) -> None:
    kind = event.WhichOneof("kind")
    if kind is None:
        raise Malformed(f"{path}: no event set (the PeerEvent oneof 'kind' is empty)")
    msg = getattr(event, kind)
    path = f"{path}.{kind}"
    if kind == "refs":
        check_object_ids(msg.add, f"{path}.add")
        check_object_ids(msg.remove, f"{path}.remove")
    elif kind in ("subscribe", "free"):
        check_object_ids(msg.object_ids, f"{path}.object_ids")
    elif kind == "ready":
        check_object_value(msg.value, f"{path}.value")
    elif kind == "result":
        check_task_result(msg, path)
    elif kind == "spill":
        check_task_spec(msg.spec, f"{path}.spec")
        check_pickle(msg.function_pickled, f"{path}.function_pickled")
        if len(msg.args) != len(msg.spec.arg_ref_ids):
            fail(f"{path}.args", f"{len(msg.args)} values",
                 f"one per spec.arg_ref_ids ({len(msg.spec.arg_ref_ids)})")
        for index, value in enumerate(msg.args):
            check_object_value(value, f"{path}.args[{index}]")
    elif kind == "verdict":
        check_id(msg.task_id, ids.TASK_ID_LEN, f"{path}.task_id", "task id")
    elif kind == "request":
        _request(msg, path, questions)
    elif kind == "reply":
        if msg.payload:
            check_json(msg.payload, f"{path}.payload", want_object=False)
    elif kind == "cancel_remote":
        check_id(msg.object_id, ids.OBJECT_ID_LEN, f"{path}.object_id", "object id")
    elif kind == "container_freed":
        check_id(msg.container_id, ids.OBJECT_ID_LEN, f"{path}.container_id", "object id")
        check_object_ids(msg.contained_ids, f"{path}.contained_ids")


def check_peer_batch(batch, questions) -> None:
    """A PeerBatch on NodePeer.Deliver; `questions` are the Request methods peers may ask."""
    check_id(batch.from_node, NODE_ID_LEN, "from_node", "node id")
    if batch.HasField("load"):
        _quantities(batch.load.available, "load.available")
    for index, event in enumerate(batch.events):
        _peer_event(event, f"events[{index}]", questions)


def check_pull_request(request) -> None:
    check_id(request.object_id, ids.OBJECT_ID_LEN, "object_id", "object id")
    if request.chunk_size and not MIN_PULL_CHUNK <= request.chunk_size <= MAX_PULL_CHUNK:
        fail("chunk_size", request.chunk_size,
             f"0 (the default) or {MIN_PULL_CHUNK}..{MAX_PULL_CHUNK} bytes")
