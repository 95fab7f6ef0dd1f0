"""What a well-formed user metric is: its name, tag keys, values and buckets.

One set of rules for both ends: `meshray.util.metrics` raises ValueError on
them where the user made the metric, and a node refuses a `metrics` report
that breaks them (node/request_rules.py), since a report may come from any
process holding the session token. The limits keep what one process can make
a node hold and export bounded.
"""
from __future__ import annotations

import math
import re

__all__ = ["KINDS", "MAX_BOUNDARIES", "MAX_DESCRIPTION_LEN", "MAX_NAME_LEN", "MAX_TAG_KEYS",
           "MAX_TAG_VALUE_LEN", "RESERVED_NAMES", "RESERVED_TAG_KEYS", "USER_METRIC_PREFIX",
           "boundaries_problem", "metric_name_problem", "tag_key_problem"]

KINDS = ("counter", "gauge", "histogram")
# Exported as "ray_<name>", as Ray exports application metrics.
USER_METRIC_PREFIX = "ray_"
MAX_NAME_LEN = 200
MAX_DESCRIPTION_LEN = 2000
MAX_TAG_KEYS = 16
MAX_TAG_VALUE_LEN = 256
MAX_BOUNDARIES = 64
# Labels every exported series carries (node/metric_families.py) or that
# Prometheus itself gives a meaning: a user tag must not shadow them.
# The node's own "ray_" families (node/metric_families.py): a user metric
# exported as "ray_<name>" must not collide with one of them.
RESERVED_NAMES = frozenset({
    "tasks", "actors", "placement_groups", "resources", "object_store_memory",
    "object_store_available_memory", "object_store_num_local_objects", "node_cpu_utilization",
    "node_cpu_count", "node_mem_used", "node_mem_available", "node_mem_total",
    "memory_manager_worker_eviction"})
RESERVED_TAG_KEYS = frozenset({"SessionName", "NodeAddress", "NodeId", "Version", "Component",
                               "le", "quantile", "instance", "job"})

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def metric_name_problem(name) -> str | None:
    """Why `name` cannot name a metric (None: it can)."""
    if not isinstance(name, str):
        return f"a str, got {type(name).__name__}"
    if not name:
        return "a non-empty name"
    if len(name) > MAX_NAME_LEN:
        return f"at most {MAX_NAME_LEN} characters"
    if not _NAME.fullmatch(name):
        return "letters, digits, '_' and ':' only, not starting with a digit"
    if name in RESERVED_NAMES:
        return f"not a name the node's own metrics use ({USER_METRIC_PREFIX}{name})"
    return None


def tag_key_problem(key) -> str | None:
    """Why `key` cannot be a tag key (None: it can)."""
    if not isinstance(key, str):
        return f"a str, got {type(key).__name__}"
    if not _LABEL.fullmatch(key) or key.startswith("__"):
        return ("letters, digits and '_' only, not starting with a digit or '__'")
    if key in RESERVED_TAG_KEYS:
        return f"not one of the reserved labels {sorted(RESERVED_TAG_KEYS)}"
    return None


def boundaries_problem(boundaries) -> str | None:
    """Why `boundaries` cannot be a histogram's bucket bounds (None: they can)."""
    if not boundaries:
        return "a non-empty list of bucket upper bounds, e.g. [0.1, 1.0]"
    if len(boundaries) > MAX_BOUNDARIES:
        return f"at most {MAX_BOUNDARIES} bounds"
    previous = 0.0
    for index, bound in enumerate(boundaries):
        if isinstance(bound, bool) or not isinstance(bound, (int, float)):
            return f"numbers (index {index} is a {type(bound).__name__})"
        if not (math.isfinite(bound) and bound > 0):
            return f"finite positive numbers (index {index} is {bound!r})"
        if bound <= previous and index:
            return f"strictly increasing (index {index}: {bound!r} after {previous!r})"
        previous = bound
    return None
