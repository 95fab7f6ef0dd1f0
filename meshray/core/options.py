"""Options of remote functions, actors and actor methods.

The tables mirror Ray 2.x (`ray_option_utils`): same keywords, defaults and
rules, so `@ray.remote(...)` / `.options(...)` calls port unchanged and bad
ones fail the same way - at decoration or `.options()` time, before anything
is submitted. Every error names the option, the value and what was expected.

A value of the wrong type raises `InvalidOptionTypeError`, which is both a
ValueError and a TypeError: Ray raises TypeError there, and callers written
for either keep working.

Resource quantities follow the scheduler's fixed-point rules: any
non-negative number, rounded to 0.0001; non-zero amounts below 0.0001 are
rejected (they would round to nothing); GPU amounts above 1 must be whole,
since a fractional share cannot span devices.
"""
from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from meshray.scheduler.policy import validate_label_selector
from meshray.scheduler.resources import RESOURCE_PRECISION, UNIT_SCALE
from meshray.scheduler.strategies import (
    NodeAffinitySchedulingStrategy,
    NodeLabelSchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

__all__ = [
    "DEFAULT_TASK_MAX_RETRIES",
    "DEFAULT_ACTOR_PLACEMENT_CPU",
    "DEFAULT_ACTOR_HELD_CPU",
    "DEFAULT_ACTOR_SPECIFIED_CPU",
    "DEFAULT_MAX_CONCURRENCY_SYNC",
    "DEFAULT_MAX_CONCURRENCY_ASYNC",
    "ACCELERATOR_TYPE_PREFIX",
    "ACCELERATOR_TYPE_QUANTITY",
    "InvalidOptionTypeError",
    "Option",
    "TASK_OPTIONS",
    "ACTOR_OPTIONS",
    "METHOD_OPTIONS",
    "validate_task_options",
    "validate_actor_options",
    "validate_method_options",
    "merge_options",
    "task_defaults",
    "actor_defaults",
    "method_defaults",
    "resolve_num_returns",
    "resolve_max_concurrency",
    "resource_request",
    "scheduling_strategy_from_options",
]

DEFAULT_TASK_MAX_RETRIES = 3
#: An actor that names no resources needs 1 CPU free to be placed...
DEFAULT_ACTOR_PLACEMENT_CPU = 1
#: ...but holds none while it lives (its methods are the work, not its idling).
DEFAULT_ACTOR_HELD_CPU = 0
#: An actor that names any resource holds this many CPUs unless num_cpus says otherwise.
DEFAULT_ACTOR_SPECIFIED_CPU = 1
DEFAULT_MAX_CONCURRENCY_SYNC = 1
DEFAULT_MAX_CONCURRENCY_ASYNC = 1000
ACCELERATOR_TYPE_PREFIX = "accelerator_type:"
#: The tiny request `accelerator_type=T` adds: only nodes with that resource fit.
ACCELERATOR_TYPE_QUANTITY = 0.001
_RESERVED_RESOURCE_NAMES = ("bundle",)


class InvalidOptionTypeError(ValueError, TypeError):
    """An option got a value of the wrong type."""


# ------------------------------------------------------------ type checks
def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_pg(v: Any) -> bool:
    return not isinstance(v, (str, bytes, numbers.Number)) and hasattr(v, "id")


_STRATEGY_TYPES = (
    PlacementGroupSchedulingStrategy,
    NodeAffinitySchedulingStrategy,
    NodeLabelSchedulingStrategy,
)

_KINDS: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "none": (lambda v: v is None, "None"),
    "int": (_is_int, "int"),
    "number": (_is_number, "a number"),
    "bool": (lambda v: isinstance(v, bool), "bool"),
    "str": (lambda v: isinstance(v, str), "str"),
    "dict": (lambda v: isinstance(v, dict), "dict"),
    "list": (lambda v: isinstance(v, (list, tuple)), "list/tuple"),
    "strategy": (lambda v: isinstance(v, _STRATEGY_TYPES), "a scheduling strategy object"),
    "pg": (_is_pg, "PlacementGroup"),
}


@dataclass(frozen=True)
class Option:
    """One option: accepted kinds, default, and an extra value check.

    `check(keyword, value)` returns an error message or None.
    """

    kinds: Tuple[str, ...]
    default: Any = None
    check: Optional[Callable[[str, Any], Optional[str]]] = None

    def expectation(self) -> str:
        names = [_KINDS[k][1] for k in self.kinds]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]

    def validate(self, keyword: str, value: Any) -> None:
        if not any(_KINDS[k][0](value) for k in self.kinds):
            raise InvalidOptionTypeError(
                f"The type of keyword '{keyword}' must be {self.expectation()}, but received "
                f"{value!r} of type {type(value).__name__}."
            )
        if self.check is not None and value is not None:
            message = self.check(keyword, value)
            if message:
                raise ValueError(message)


# ------------------------------------------------------------ value checks
def _quantity_problem(name: str, q: Any, *, unit_instance: bool = False) -> Optional[str]:
    if not _is_number(q):
        return f"The quantity of resource {name} must be a number, got {q!r} of type {type(q).__name__}."
    f = float(q)
    if f != f or f in (float("inf"), float("-inf")):
        return f"The quantity of resource {name} must be finite, got {q!r}."
    if f < 0:
        return f"The quantity of resource {name} cannot be negative, got {q!r}."
    if 0 < f and round(f * UNIT_SCALE) == 0:
        return (
            f"The precision of the fractional quantity of resource {name} cannot go beyond "
            f"{RESOURCE_PRECISION}, got {q!r}."
        )
    if unit_instance and f > 1 and f != int(f):
        return (
            f"The quantity of resource {name} must be a whole number when above 1 "
            f"(fractions only below 1, shared on one device), got {q!r}."
        )
    return None


def _resource_check(keyword: str, value: Any) -> Optional[str]:
    return _quantity_problem(keyword, value, unit_instance=(keyword == "num_gpus"))


def _resources_check(keyword: str, value: Mapping) -> Optional[str]:
    for name, quantity in value.items():
        if not isinstance(name, str) or not name:
            return f"The keys of '{keyword}' must be non-empty resource names (str), got {name!r}."
        if name in ("CPU", "GPU"):
            return (
                f"Use the 'num_cpus' and 'num_gpus' keywords instead of 'CPU' and 'GPU' in "
                f"'{keyword}' (got {keyword}={value!r})."
            )
        if name in ("memory", "object_store_memory"):
            return (
                f"Use the '{name}' keyword instead of putting '{name}' in '{keyword}' "
                f"(got {keyword}={value!r})."
            )
        if name in _RESERVED_RESOURCE_NAMES:
            return f"The resource name '{name}' in '{keyword}' is reserved for placement groups."
        problem = _quantity_problem(f"{keyword}[{name!r}]", quantity)
        if problem:
            return problem
    return None


def _count_check(minimum: int, meaning: str) -> Callable[[str, Any], Optional[str]]:
    def check(keyword: str, value: Any) -> Optional[str]:
        if value < minimum:
            return f"The keyword '{keyword}' only accepts {meaning}, got {value!r}."
        return None

    return check


_COUNT = _count_check(0, "None, 0 or a positive integer")
_COUNT_INF = _count_check(-1, "None, -1 (infinite), 0 or a positive integer")
_POSITIVE = _count_check(1, "None or an integer >= 1")


def _num_returns_check(keyword: str, value: Any) -> Optional[str]:
    from meshray.rpc.rules import MAX_NUM_RETURNS   # the bound nodes and actors enforce
    if isinstance(value, str):
        if value in ("streaming", "dynamic"):
            return None
    elif 0 <= value <= MAX_NUM_RETURNS:
        return None
    return (
        f"The keyword '{keyword}' only accepts None, an integer from 0 to {MAX_NUM_RETURNS}, "
        f"'streaming' (for generators) or 'dynamic', got {value!r}."
    )


def _retry_exceptions_check(keyword: str, value: Any) -> Optional[str]:
    if isinstance(value, bool):
        return None
    for item in value:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            return (
                f"The keyword '{keyword}' must be a bool or a list/tuple of exception classes, "
                f"got {value!r} (item {item!r} is not an exception class)."
            )
    return None


def _strategy_check(keyword: str, value: Any) -> Optional[str]:
    if isinstance(value, str) and value not in ("DEFAULT", "SPREAD"):
        return (
            f"The keyword '{keyword}' accepts 'DEFAULT', 'SPREAD' or a strategy object from "
            f"meshray.util.scheduling_strategies, got {value!r}."
        )
    return None


def _pg_check(keyword: str, value: Any) -> Optional[str]:
    if isinstance(value, str) and value != "default":
        return f"The keyword '{keyword}' accepts None, 'default' or a PlacementGroup, got {value!r}."
    return None


def _bundle_index_check(keyword: str, value: Any) -> Optional[str]:
    if value < -1:
        return f"The keyword '{keyword}' must be -1 (any bundle) or a bundle index >= 0, got {value!r}."
    return None


def _label_selector_check(keyword: str, value: Any) -> Optional[str]:
    try:
        validate_label_selector(value)
    except ValueError as e:
        return f"Invalid '{keyword}': {e}"
    return None


def _task_object_store_memory_check(keyword: str, value: Any) -> Optional[str]:
    return f"Setting '{keyword}' is not implemented for tasks (got {value!r}); use None."


def _backpressure_check(keyword: str, value: Any) -> Optional[str]:
    if value == 0:
        return (
            f"{keyword}=0 is not allowed: use a value > 0 (1 behaves like a plain Python "
            f"generator) or -1 to disable backpressure."
        )
    return None


def _lifetime_check(keyword: str, value: Any) -> Optional[str]:
    if value not in ("detached", "non_detached"):
        return (
            f"The actor '{keyword}' argument must be one of 'detached', 'non_detached' and "
            f"None, got {value!r}."
        )
    return None


def _non_empty_check(keyword: str, value: Any) -> Optional[str]:
    if value == "":
        return f"The keyword '{keyword}' cannot be an empty string; use None for no {keyword}."
    return None


def _concurrency_groups_check(keyword: str, value: Any) -> Optional[str]:
    items = value.items() if isinstance(value, dict) else ((g, None) for g in value)
    for group, limit in items:
        if not isinstance(group, str) or not group:
            return f"'{keyword}' names must be non-empty str, got {group!r} in {value!r}."
        if limit is not None and (not _is_int(limit) or limit < 1):
            return f"'{keyword}' limit for group {group!r} must be an int >= 1, got {limit!r}."
    return None


# ------------------------------------------------------------ tables
def _resource(default: Any = None) -> Option:
    return Option(("number", "none"), default, _resource_check)


_COMMON: Dict[str, Option] = {
    "label_selector": Option(("dict", "none"), None, _label_selector_check),
    "accelerator_type": Option(("str", "none")),
    "memory": _resource(),
    "name": Option(("str", "none")),
    "num_cpus": _resource(),
    "num_gpus": _resource(),
    "object_store_memory": Option(("int", "none"), None, _COUNT),
    # Legacy placement-group options; scheduling_strategy supersedes them.
    "placement_group": Option(("none", "str", "pg"), "default", _pg_check),
    "placement_group_bundle_index": Option(("int",), -1, _bundle_index_check),
    "placement_group_capture_child_tasks": Option(("bool", "none")),
    "resources": Option(("dict", "none"), None, _resources_check),
    "runtime_env": Option(("dict", "none")),
    "scheduling_strategy": Option(("none", "str", "strategy"), None, _strategy_check),
    "_metadata": Option(("dict", "none")),
    "enable_task_events": Option(("bool",), True),
    "_labels": Option(("dict", "none")),
}

_TASK_ONLY: Dict[str, Option] = {
    "max_calls": Option(("int", "none"), 0, _COUNT),
    "max_retries": Option(("int", "none"), DEFAULT_TASK_MAX_RETRIES, _COUNT_INF),
    "num_cpus": _resource(1),
    "num_returns": Option(("int", "str", "none"), None, _num_returns_check),
    "object_store_memory": Option(("int", "none"), None, _task_object_store_memory_check),
    "retry_exceptions": Option(("bool", "list"), False, _retry_exceptions_check),
    "_generator_backpressure_num_objects": Option(("int", "none"), None, _backpressure_check),
}

_ACTOR_ONLY: Dict[str, Option] = {
    "concurrency_groups": Option(("list", "dict", "none"), None, _concurrency_groups_check),
    "enable_tensor_transport": Option(("bool",), False),
    "lifetime": Option(("str", "none"), None, _lifetime_check),
    "max_concurrency": Option(("int", "none"), None, _POSITIVE),
    "max_restarts": Option(("int", "none"), 0, _COUNT_INF),
    "max_task_retries": Option(("int", "none"), 0, _COUNT_INF),
    "max_pending_calls": Option(("int", "none"), -1, _COUNT_INF),
    "name": Option(("str", "none"), None, _non_empty_check),
    "namespace": Option(("str", "none"), None, _non_empty_check),
    "get_if_exists": Option(("bool",), False),
    "allow_out_of_order_execution": Option(("bool", "none")),
}

#: Options accepted by @remote on a function and by RemoteFunction.options().
TASK_OPTIONS: Dict[str, Option] = {**_COMMON, **_TASK_ONLY}
#: Options accepted by @remote on a class and by ActorClass.options().
ACTOR_OPTIONS: Dict[str, Option] = {**_COMMON, **_ACTOR_ONLY}
#: Options accepted by @method(...) and by an actor method's .options().
METHOD_OPTIONS: Dict[str, Option] = {
    "num_returns": _TASK_ONLY["num_returns"],
    "concurrency_group": Option(("str", "none"), None, _non_empty_check),
    "max_task_retries": Option(("int", "none"), None, _COUNT_INF),
    "retry_exceptions": Option(("bool", "list", "none"), None, _retry_exceptions_check),
    "name": Option(("str", "none")),
    "enable_task_events": Option(("bool",), True),
    "_generator_backpressure_num_objects": _TASK_ONLY["_generator_backpressure_num_objects"],
}


def _validate(table: Dict[str, Option], options: Mapping[str, Any], what: str) -> None:
    if not isinstance(options, Mapping):
        raise InvalidOptionTypeError(f"Options for {what} must be a dict, got {options!r}.")
    for keyword, value in options.items():
        option = table.get(keyword)
        if option is None:
            raise ValueError(
                f"Invalid option keyword {keyword} for {what}. Valid ones are {list(table)}."
            )
        option.validate(keyword, value)


def _check_legacy_placement_group(options: Mapping[str, Any]) -> None:
    pg = options.get("placement_group", "default")
    if pg not in ("default", None) and options.get("scheduling_strategy") is not None:
        raise ValueError(
            "Placement groups should be specified via the 'scheduling_strategy' option "
            f"(got both placement_group={pg!r} and scheduling_strategy="
            f"{options.get('scheduling_strategy')!r}); the 'placement_group' option is deprecated."
        )


def validate_task_options(options: Mapping[str, Any], in_options: bool) -> None:
    """Validate options for a remote function; `in_options` is True under `.options()`."""
    _validate(TASK_OPTIONS, options, "remote functions")
    if in_options and "max_calls" in options:
        raise ValueError(
            f"Setting 'max_calls' is not supported in '.options()' (got max_calls="
            f"{options['max_calls']!r}); set it in @remote instead."
        )
    _check_legacy_placement_group(options)


def validate_actor_options(options: Mapping[str, Any], in_options: bool) -> None:
    """Validate options for an actor class; `in_options` is True under `.options()`."""
    _validate(ACTOR_OPTIONS, options, "actors")
    if in_options and "concurrency_groups" in options:
        raise ValueError(
            "Setting 'concurrency_groups' is not supported in '.options()'; declare them in "
            "@remote(concurrency_groups=...)."
        )
    if options.get("get_if_exists") and not options.get("name"):
        raise ValueError(
            "The actor name must be specified to use get_if_exists=True (got name="
            f"{options.get('name')!r})."
        )
    if options.get("object_store_memory") is not None:
        warnings.warn(
            "Setting 'object_store_memory' for actors is deprecated: it doesn't reserve store "
            "memory. Objects spill to disk when the store is full.",
            DeprecationWarning,
            stacklevel=3,
        )
    _check_legacy_placement_group(options)


def validate_method_options(options: Mapping[str, Any], in_options: bool = False) -> None:
    """Validate options for an actor method (@method or method.options())."""
    _validate(METHOD_OPTIONS, options, "actor methods")


def merge_options(base: Mapping[str, Any], override: Mapping[str, Any]) -> Dict[str, Any]:
    """`override` wins, except `_metadata`, merged per namespace. Returns a new dict."""
    merged = {**base, **override}
    if base.get("_metadata") is not None and override.get("_metadata") is not None:
        metadata = dict(base["_metadata"])
        for namespace, config in override["_metadata"].items():
            metadata[namespace] = {**metadata.get(namespace, {}), **config}
        merged["_metadata"] = metadata
    return merged


def resolve_num_returns(value: Any, is_generator: bool) -> Any:
    """None means the default: 'streaming' for generator functions, else 1."""
    if value is None:
        return "streaming" if is_generator else 1
    return value


def resolve_max_concurrency(value: Optional[int], is_async: bool) -> int:
    """None means the default: 1 for a threaded actor, 1000 for an asyncio one."""
    if value is None:
        return DEFAULT_MAX_CONCURRENCY_ASYNC if is_async else DEFAULT_MAX_CONCURRENCY_SYNC
    return value


def _defaults(table: Dict[str, Option]) -> Dict[str, Any]:
    return {k: o.default for k, o in table.items()}


def task_defaults(is_generator: bool) -> Dict[str, Any]:
    """Every task option with its default, num_returns already resolved."""
    out = _defaults(TASK_OPTIONS)
    out["num_returns"] = resolve_num_returns(None, is_generator)
    return out


def actor_defaults() -> Dict[str, Any]:
    """Every actor option with its default (num_cpus None: see resource_request)."""
    return _defaults(ACTOR_OPTIONS)


def method_defaults(is_generator: bool = False) -> Dict[str, Any]:
    """Every method option with its default; max_task_retries None = the actor's."""
    out = _defaults(METHOD_OPTIONS)
    out["num_returns"] = resolve_num_returns(None, is_generator)
    return out


def _named_resources(options: Mapping[str, Any]) -> Dict[str, float]:
    out: Dict[str, float] = {k: float(v) for k, v in (options.get("resources") or {}).items()}
    for keyword, resource in (
        ("num_cpus", "CPU"),
        ("num_gpus", "GPU"),
        ("memory", "memory"),
        ("object_store_memory", "object_store_memory"),
    ):
        value = options.get(keyword)
        if value is not None:
            out[resource] = float(value)
    accelerator = options.get("accelerator_type")
    if accelerator is not None:
        out[f"{ACCELERATOR_TYPE_PREFIX}{accelerator}"] = ACCELERATOR_TYPE_QUANTITY
    return out


def _nonzero(resources: Dict[str, float]) -> Dict[str, float]:
    return {k: v for k, v in resources.items() if v}


def resource_request(options: Mapping[str, Any], *, for_actor: bool) -> Tuple[Dict[str, float], Dict[str, float]]:
    """(placement, held) resources for a task or actor creation.

    `placement` must be free on a node to start there; `held` is kept while
    it runs. They differ only for an actor that names no resources (or only
    memory): placed as if it needed 1 CPU, holding 0, so a cluster of idle
    default actors doesn't exhaust CPUs (Ray's rule). An actor naming any
    resource holds num_cpus (default 1) plus what it named, and places with
    the same. Zero quantities are omitted.
    """
    named = _named_resources(options)
    if not for_actor:
        if options.get("num_cpus") is None:
            named["CPU"] = float(TASK_OPTIONS["num_cpus"].default)
        held = _nonzero(named)
        return held, dict(held)
    if not set(named) - {"memory", "object_store_memory"}:
        named.setdefault("CPU", float(DEFAULT_ACTOR_HELD_CPU))
        held = _nonzero(named)
        placement = dict(named)
        placement["CPU"] = placement["CPU"] + DEFAULT_ACTOR_PLACEMENT_CPU
        return _nonzero(placement), held
    named.setdefault("CPU", float(DEFAULT_ACTOR_SPECIFIED_CPU))
    held = _nonzero(named)
    return dict(held), held


def scheduling_strategy_from_options(options: Mapping[str, Any]) -> Any:
    """The strategy to schedule with, folding in the legacy placement_group options.

    Returns `scheduling_strategy` if set; else a PlacementGroupSchedulingStrategy
    built from `placement_group` / `placement_group_bundle_index` /
    `placement_group_capture_child_tasks` when a group is given; else
    "DEFAULT". Inheriting the parent's captured group is the caller's job:
    only it knows the parent.
    """
    strategy = options.get("scheduling_strategy")
    if strategy is not None:
        return strategy
    pg = options.get("placement_group", "default")
    if pg not in ("default", None):
        return PlacementGroupSchedulingStrategy(
            pg,
            options.get("placement_group_bundle_index", -1),
            options.get("placement_group_capture_child_tasks"),
        )
    return "DEFAULT"
