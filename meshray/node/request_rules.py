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

import math

import cloudpickle

from meshray.common import ids, metric_rules
from meshray.rpc.rules import (
    FUNCTION_ID_LEN,
    JOB_ID_LEN,
    MAX_NUM_RETURNS,
    NODE_ID_LEN,
    WORKER_ID_LEN,
    check_common_spec,
    check_env_vars,
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
from meshray.scheduler import strategies
from meshray.scheduler.resources import RESOURCE_PRECISION, to_units

__all__ = ["BUILTIN_STRATEGIES", "CLUSTER_QUESTIONS", "MAX_PULL_CHUNK", "MIN_PULL_CHUNK",
           "STRATEGY_CLASSES", "check_client_batch", "check_peer_batch", "check_pull_request",
           "check_task_spec"]

MIN_PULL_CHUNK = 4 * 1024
MAX_PULL_CHUNK = 64 * 1024 * 1024
ROLES = ("driver", "worker")
BUILTIN_STRATEGIES = ("", "DEFAULT", "SPREAD")
STRATEGY_CLASSES = ("PlacementGroupSchedulingStrategy", "NodeAffinitySchedulingStrategy",
                    "NodeLabelSchedulingStrategy")
# Request methods the node answers from the etcd view rather than an _ask_ handler.
CLUSTER_QUESTIONS = frozenset({"available_resources", "cluster_resources", "nodes",
                               "node_usage"})
_ACTOR_OPTION_TYPES = {
    "class_name": (str,), "name": (str,), "namespace": (str, type(None)),
    "lifetime": (str, type(None)), "is_async": (bool,), "methods": (dict,),
    "max_restarts": (int,), "max_task_retries": (int,), "max_pending_calls": (int,),
    "max_concurrency": (int, type(None)), "concurrency_groups": (dict,),
}


def _quantities(mapping, where: tuple, name: str) -> None:
    """Quantities ResourceSet takes (to_units decides; the common case skips it)."""
    for resource, quantity in mapping.items():
        if resource and (quantity == 0.0 or RESOURCE_PRECISION <= quantity < math.inf):
            continue
        if not resource:
            fail(where, name, resource, "non-empty resource names")
        try:
            to_units(resource, quantity)
        except (TypeError, ValueError) as exc:
            fail((*where, name), repr(resource), quantity, f"a finite quantity >= 0 ({exc})")


def _strategy(spec, where: tuple) -> None:
    name = spec.scheduling_strategy
    if name in BUILTIN_STRATEGIES:
        if spec.strategy_blob:
            fail(where, "strategy_blob", spec.strategy_blob,
                 f"no strategy_blob with scheduling_strategy={name!r}")
        return
    if name not in STRATEGY_CLASSES:
        fail(where, "scheduling_strategy", name,
             f"one of {', '.join(repr(s) for s in BUILTIN_STRATEGIES + STRATEGY_CLASSES)}")
    blob = spec.strategy_blob
    check_pickle(blob, where, "strategy_blob", optional=False)
    try:
        strategy = cloudpickle.loads(blob)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the sender's
        fail(where, "strategy_blob", blob,
             f"a pickled {name} (loading it failed: {type(exc).__name__}: {exc})")
    if not isinstance(strategy, getattr(strategies, name)):
        fail(where, "strategy_blob", blob, f"a pickled {name}, got a {type(strategy).__name__}")


def _actor_options(text, where: tuple) -> None:
    options = check_json(text, where, "actor_options")
    inside = (*where, "actor_options")
    for key, types in _ACTOR_OPTION_TYPES.items():
        if key not in options:
            continue
        value = options[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            fail(inside, key, value, " or ".join(t.__name__ for t in types))
    if options.get("lifetime") not in (None, "detached", "non_detached"):
        fail(inside, "lifetime", options["lifetime"], "None, 'detached' or 'non_detached'")
    for key in ("max_restarts", "max_task_retries", "max_pending_calls"):
        if key in options:
            check_int_at_least(options[key], -1, inside, key)
    if options.get("max_concurrency") is not None:
        check_int_at_least(options["max_concurrency"], 1, inside, "max_concurrency")
    for group, limit in (options.get("concurrency_groups") or {}).items():
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            fail((*inside, "concurrency_groups"), repr(group), limit, "an integer >= 1")


def check_task_spec(spec, where: tuple) -> None:
    """A task or actor creation submitted to a node (or spilled to a peer)."""
    check_common_spec(spec, where)
    function_id = spec.function_id
    if len(function_id) != FUNCTION_ID_LEN:
        fail(where, "function_id", function_id, f"a {FUNCTION_ID_LEN}-byte function id")
    num_returns = spec.num_returns
    if not -1 <= num_returns <= MAX_NUM_RETURNS:
        fail(where, "num_returns", num_returns, f"-1 (streaming) or 0..{MAX_NUM_RETURNS}")
    owner = spec.owner_id
    if owner and len(owner) != WORKER_ID_LEN:
        fail(where, "owner_id", owner, f"empty or a {WORKER_ID_LEN}-byte worker id")
    if spec.attempt < 0:
        fail(where, "attempt", spec.attempt, "an integer >= 0")
    if spec.max_retries < -1:
        fail(where, "max_retries", spec.max_retries, "an integer >= -1 (-1: for ever)")
    if spec.resources:
        _quantities(spec.resources, where, "resources")
    if spec.env_vars:
        check_env_vars(spec.env_vars, where)
    if spec.runtime_env_json:
        check_runtime_env(spec.runtime_env_json, where, "runtime_env_json")
    if spec.scheduling_strategy or spec.strategy_blob:
        _strategy(spec, where)
    if spec.args_image or spec.args_file:
        fail(where, "args_image", spec.args_file or spec.args_image,
             "no argument image: images are for actor calls only")
    check_pickle(spec.args_blob, where, "args_blob")
    if spec.actor_creation:
        check_id(spec.actor_id, ids.TASK_ID_LEN, where, "actor_id", "actor id")
        if num_returns != 1:
            fail(where, "num_returns", num_returns, "1 for an actor creation")
        if spec.held_resources:
            _quantities(spec.held_resources, where, "held_resources")
        _actor_options(spec.actor_options or b"{}", where)
    elif spec.actor_id or spec.actor_options or spec.held_resources:
        fail(where, "actor_id", spec.actor_id,
             "no actor_id, actor_options or held_resources unless actor_creation=true")


MAX_METRIC_UPDATES = 10_000


def _metrics_report(msg, where: tuple) -> None:
    """User metric updates: the rules meshray.util.metrics enforces (common/metric_rules.py)."""
    if len(msg.updates) > MAX_METRIC_UPDATES:
        fail(where, "updates", f"{len(msg.updates)} updates", f"at most {MAX_METRIC_UPDATES}")
    for index, update in enumerate(msg.updates):
        at = (*where, "updates", index)
        problem = metric_rules.metric_name_problem(update.name)
        if problem is not None:
            fail(at, "name", update.name, problem)
        if update.kind not in metric_rules.KINDS:
            fail(at, "kind", update.kind, " or ".join(repr(k) for k in metric_rules.KINDS))
        if len(update.description) > metric_rules.MAX_DESCRIPTION_LEN:
            fail(at, "description", update.description,
                 f"at most {metric_rules.MAX_DESCRIPTION_LEN} characters")
        keys = list(update.tag_keys)
        if len(keys) > metric_rules.MAX_TAG_KEYS or len(set(keys)) != len(keys):
            fail(at, "tag_keys", keys, f"at most {metric_rules.MAX_TAG_KEYS} distinct keys")
        for key in keys:
            problem = metric_rules.tag_key_problem(key)
            if problem is not None:
                fail((*at, "tag_keys"), repr(key), key, problem)
        if len(update.tag_values) != len(keys):
            fail(at, "tag_values", f"{len(update.tag_values)} values",
                 f"one per tag key ({len(keys)})")
        for value in update.tag_values:
            if len(value) > metric_rules.MAX_TAG_VALUE_LEN:
                fail(at, "tag_values", value,
                     f"values of at most {metric_rules.MAX_TAG_VALUE_LEN} characters")
        if update.kind == "histogram":
            problem = metric_rules.boundaries_problem(list(update.boundaries))
            if problem is not None:
                fail(at, "boundaries", list(update.boundaries), problem)
            if len(update.bucket_counts) != len(update.boundaries) + 1:
                fail(at, "bucket_counts", f"{len(update.bucket_counts)} counts",
                     f"one per bucket, +Inf included ({len(update.boundaries) + 1})")
            if not math.isfinite(update.sum):
                fail(at, "sum", update.sum, "a finite number")
        elif not math.isfinite(update.value) or (update.kind == "counter"
                                                   and update.value < 0):
            fail(at, "value", update.value,
                 "a finite number" + (" >= 0" if update.kind == "counter" else ""))


def _request(msg, where: tuple, questions) -> None:
    if msg.method not in questions:
        fail(where, "method", msg.method, f"one of {', '.join(sorted(questions))}")
    if msg.payload:
        check_json(msg.payload, where, "payload")


def _client_event(event, index: int, questions) -> None:
    kind = event.WhichOneof("kind")
    if kind is None:
        raise Malformed(f"events[{index}]: no event set (the ClientEvent oneof 'kind' is empty)")
    msg = getattr(event, kind)
    where = ("events", index, kind)
    if kind == "submit":
        check_task_spec(msg.spec, (*where, "spec"))
    elif kind == "refs":
        check_object_ids(msg.add, where, "add")
        check_object_ids(msg.remove, where, "remove")
    elif kind == "subscribe":
        check_object_ids(msg.object_ids, where, "object_ids")
    elif kind == "put":
        check_object_value(msg.value, (*where, "value"))
    elif kind == "task_result":
        check_task_result(msg, where)
    elif kind == "hello":
        if msg.role not in ROLES:
            fail(where, "role", msg.role, " or ".join(repr(r) for r in ROLES))
        check_id(msg.worker_id, WORKER_ID_LEN, where, "worker_id", "worker id")
        check_int_at_least(msg.pid, 1, where, "pid")
        check_id(msg.job_id, JOB_ID_LEN, where, "job_id", "job id", optional=True)
        if msg.runtime_env_json:
            check_runtime_env(msg.runtime_env_json, where, "runtime_env_json")
        if msg.call_address and (msg.role != "worker" or not msg.call_address.startswith("unix:")
                                 or len(msg.call_address) > MAX_CALL_ADDRESS):
            fail(where, "call_address", msg.call_address[:80],
                 f"empty, or a worker's 'unix:' address of at most {MAX_CALL_ADDRESS} characters")
    elif kind == "register_function":
        check_id(msg.function_id, FUNCTION_ID_LEN, where, "function_id", "function id")
        check_pickle(msg.pickled, where, "pickled", optional=False)
    elif kind in ("reserve", "cancel"):
        check_id(msg.object_id, ids.OBJECT_ID_LEN, where, "object_id", "object id")
    elif kind == "request":
        _request(msg, where, questions)
    elif kind == "actor_exiting":
        check_id(msg.actor_id, ids.TASK_ID_LEN, where, "actor_id", "actor id")
    elif kind == "task_events":
        _actor_task_events(msg, where)
    elif kind == "metrics":
        _metrics_report(msg, where)
    elif kind == "leased_task":
        check_id(msg.task_id, ids.TASK_ID_LEN, where, "task_id", "task id")
        if len(msg.name) > MAX_TASK_NAME:
            fail(where, "name", msg.name[:40] + "...", f"at most {MAX_TASK_NAME} characters")
        check_int_at_least(msg.max_retries, -1, where, "max_retries")
        check_int_at_least(msg.attempt, 0, where, "attempt")
    # blocked: one bool, always well-formed


MAX_ACTOR_TASK_EVENTS = 20_000
MAX_CALL_ADDRESS = 4096
MAX_TASK_NAME = 1024
MAX_COUNTED_NAMES = 10_000     # methods of one actor counted in one report


def _actor_task_events(msg, where: tuple) -> None:
    count, extra = divmod(len(msg.task_ids), ids.TASK_ID_LEN)
    if extra or count > MAX_ACTOR_TASK_EVENTS:
        fail(where, "task_ids", f"{len(msg.task_ids)} bytes",
             f"a multiple of {ids.TASK_ID_LEN}, at most {MAX_ACTOR_TASK_EVENTS} ids")
    sizes = {"job_ids": (len(msg.job_ids), count * JOB_ID_LEN),
             "parent_task_ids": (len(msg.parent_task_ids), count * ids.TASK_ID_LEN),
             "name_index": (len(msg.name_index), count), "attempts": (len(msg.attempts), count),
             "received": (len(msg.received), count), "finished": (len(msg.finished), count),
             "failed": (len(msg.failed), count)}
    for name, (size, expected) in sizes.items():
        if size != expected:
            fail(where, name, f"{size} items", f"{expected}: one per call in task_ids")
    if len(msg.names) > max(count, MAX_COUNTED_NAMES):
        fail(where, "names", f"{len(msg.names)} names",
             f"at most {max(count, MAX_COUNTED_NAMES)}")
    for name in ("counted_finished", "counted_failed"):
        if len(getattr(msg, name)) not in (0, len(msg.names)):
            fail(where, name, f"{len(getattr(msg, name))} counts",
                 f"none, or one per name ({len(msg.names)})")
    for index, name in enumerate(msg.names):
        if len(name) > MAX_TASK_NAME:
            fail((*where, "names", index), "name", name[:40] + "...",
                 f"at most {MAX_TASK_NAME} characters")
    if any(i >= len(msg.names) for i in msg.name_index):
        fail(where, "name_index", max(msg.name_index), f"an index into names (< {len(msg.names)})")
    if any(a < 0 for a in msg.attempts):
        fail(where, "attempts", min(msg.attempts), "integers >= 0")
    for name in ("received", "finished"):
        for value in getattr(msg, name):
            if not (math.isfinite(value) and value >= 0):
                fail(where, name, value, "seconds since the epoch (finite, >= 0)")


def check_client_batch(batch, questions) -> None:
    """A ClientBatch on NodeService.Connect; `questions` are the Request methods known."""
    for index, event in enumerate(batch.events):
        _client_event(event, index, questions)


def _peer_event(event, index: int, questions) -> None:
    kind = event.WhichOneof("kind")
    if kind is None:
        raise Malformed(f"events[{index}]: no event set (the PeerEvent oneof 'kind' is empty)")
    msg = getattr(event, kind)
    where = ("events", index, kind)
    if kind == "refs":
        check_object_ids(msg.add, where, "add")
        check_object_ids(msg.remove, where, "remove")
    elif kind in ("subscribe", "free"):
        check_object_ids(msg.object_ids, where, "object_ids")
    elif kind == "ready":
        check_object_value(msg.value, (*where, "value"))
    elif kind == "result":
        check_task_result(msg, where)
    elif kind == "spill":
        check_task_spec(msg.spec, (*where, "spec"))
        check_pickle(msg.function_pickled, where, "function_pickled")
        if len(msg.args) != len(msg.spec.arg_ref_ids):
            fail(where, "args", f"{len(msg.args)} values",
                 f"one per spec.arg_ref_ids ({len(msg.spec.arg_ref_ids)})")
        for position, value in enumerate(msg.args):
            check_object_value(value, (*where, "args", position))
    elif kind == "verdict":
        check_id(msg.task_id, ids.TASK_ID_LEN, where, "task_id", "task id")
    elif kind == "request":
        _request(msg, where, questions)
    elif kind == "reply":
        if msg.payload:
            check_json(msg.payload, where, "payload", want_object=False)
    elif kind == "cancel_remote":
        check_id(msg.object_id, ids.OBJECT_ID_LEN, where, "object_id", "object id")
    elif kind == "container_freed":
        check_id(msg.container_id, ids.OBJECT_ID_LEN, where, "container_id", "object id")
        check_object_ids(msg.contained_ids, where, "contained_ids")
    elif kind == "logs":
        check_id(msg.job_id, JOB_ID_LEN, where, "job_id", "job id")


def check_peer_batch(batch, questions) -> None:
    """A PeerBatch on NodePeer.Deliver; `questions` are the Request methods peers may ask."""
    check_id(batch.from_node, NODE_ID_LEN, (), "from_node", "node id")
    if batch.HasField("load"):
        _quantities(batch.load.available, ("load",), "available")
    for index, event in enumerate(batch.events):
        _peer_event(event, index, questions)


def check_pull_request(request) -> None:
    check_id(request.object_id, ids.OBJECT_ID_LEN, (), "object_id", "object id")
    if request.chunk_size and not MIN_PULL_CHUNK <= request.chunk_size <= MAX_PULL_CHUNK:
        fail((), "chunk_size", request.chunk_size,
             f"0 (the default) or {MIN_PULL_CHUNK}..{MAX_PULL_CHUNK} bytes")
