"""The state API's query logic: filters, pages, merges and summaries, as pure functions.

A state query (list tasks, workers, objects...) is answered by every node
for what it holds, then merged by the node that was asked. Both halves are
here, free of I/O, so a node's part and the merge are the same code whether
one node answers or a thousand:

- ``check_query`` turns the JSON a client sent into a validated query, or
  raises ValueError naming the bad field (queries are untrusted input);
- ``local_page`` is one node's answer: the matching records in id order,
  after the cursor, at most ``limit`` of them, and how many matched in all;
- ``merge_pages`` takes every node's page and keeps the first ``limit`` in
  id order; the next cursor is the last id returned, so paging never skips or
  repeats a record (ids are unique across nodes: each task is answered for by
  the one node that ran it);
- ``summarize`` / ``merge_summaries`` count records per function (or class)
  and state, so a summary of millions of tasks moves a few counters per node.

Why id order and a cursor rather than "the first N": with no head there is
no global arrival order, and "first N" silently truncates (the complaint
about Ray's state API this design answers); an id cursor pages through
everything with each node sending at most one page per request.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

__all__ = ["CLUSTER_RESOURCES", "RESOURCES", "Query", "check_query", "local_page", "merge_pages", "summarize",
           "merge_summaries", "DEFAULT_LIMIT", "MAX_LIMIT"]

DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000
# The id column and the filterable columns of each resource (Ray's names).
RESOURCES = {
    "tasks": ("task_id", ("task_id", "attempt_number", "name", "state", "job_id", "actor_id",
                          "type", "func_or_class_name", "parent_task_id", "node_id",
                          "worker_id", "worker_pid", "error_type", "language",
                          "placement_group_id")),
    "workers": ("worker_id", ("worker_id", "node_id", "pid", "is_alive", "worker_type",
                              "exit_type", "job_id")),
    "objects": ("object_id", ("object_id", "object_size", "task_status", "reference_type",
                              "type", "pid", "ip", "node_id")),
    "jobs": ("job_id", ("job_id", "status", "type", "driver_pid", "driver_node_id",
                        "submission_id")),
    # Answered from etcd by the node asked (no fan-out needed).
    "actors": ("actor_id", ("actor_id", "class_name", "state", "job_id", "name", "node_id",
                            "pid", "ray_namespace", "is_detached", "placement_group_id")),
    "nodes": ("node_id", ("node_id", "node_ip", "is_head_node", "state", "node_name")),
    "placement_groups": ("placement_group_id", ("placement_group_id", "name", "creator_job_id",
                                                "state", "is_detached")),
}
CLUSTER_RESOURCES = frozenset({"actors", "nodes", "placement_groups"})
PREDICATES = ("=", "!=")
# Fields left out of a listing unless detail=True (as in Ray).
_DETAIL_ONLY = {"tasks": ("events", "required_resources", "error_message", "creation_time_ms",
                          "start_time_ms", "end_time_ms", "parent_task_id", "spilled_to",
                          "spilled_from")}


@dataclass(frozen=True)
class Query:
    resource: str
    filters: tuple = ()          # (column, predicate, value) triples
    limit: int = DEFAULT_LIMIT
    cursor: str = ""             # return ids after this one
    detail: bool = False


def _fail(field: str, value, expected: str):
    raise ValueError(f"{field}={value!r}: expected {expected}")


def check_query(payload: dict) -> Query:
    """A validated Query from untrusted JSON (ValueError names what is wrong)."""
    if not isinstance(payload, dict):
        _fail("query", payload, "a JSON object")
    resource = payload.get("resource")
    if resource not in RESOURCES:
        _fail("resource", resource, f"one of {', '.join(sorted(RESOURCES))}")
    columns = RESOURCES[resource][1]
    filters = []
    raw_filters = payload.get("filters") or []
    if not isinstance(raw_filters, list):
        _fail("filters", raw_filters, "a list of (column, predicate, value)")
    for item in raw_filters:
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            _fail("filters", item, "a (column, predicate, value) triple")
        column, predicate, value = item
        if column not in columns:
            _fail("filter column", column, f"one of {', '.join(columns)} for {resource}")
        if predicate not in PREDICATES:
            _fail("filter predicate", predicate, "'=' or '!='")
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            _fail("filter value", value, "a string, number, boolean or null")
        filters.append((column, predicate, value))
    limit = payload.get("limit", DEFAULT_LIMIT)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_LIMIT:
        _fail("limit", limit, f"a whole number from 1 to {MAX_LIMIT}")
    cursor = payload.get("cursor") or ""
    if not isinstance(cursor, str):
        _fail("cursor", cursor, "a string (the next_cursor of an earlier page)")
    detail = payload.get("detail", False)
    if not isinstance(detail, bool):
        _fail("detail", detail, "true or false")
    return Query(resource, tuple(filters), limit, cursor, detail)


def _same(actual, wanted) -> bool:
    if actual is None or wanted is None:
        return actual is None and (wanted is None or str(wanted).lower() in ("", "none", "null"))
    if isinstance(actual, bool) or isinstance(wanted, bool):
        return str(actual).lower() == str(wanted).lower()
    if isinstance(actual, (int, float)):
        try:
            return float(actual) == float(wanted)
        except (TypeError, ValueError):
            return False
    # Strings compare case-insensitively, as Ray's filters do.
    return str(actual).lower() == str(wanted).lower()


def matches(record: dict, filters) -> bool:
    for column, predicate, value in filters:
        same = _same(record.get(column), value)
        if same != (predicate == "="):
            return False
    return True


def _shown(record: dict, query: Query) -> dict:
    hidden = () if query.detail else _DETAIL_ONLY.get(query.resource, ())
    return {k: v for k, v in record.items() if k not in hidden}


def local_page(records, query: Query) -> dict:
    """One node's answer: its matching records after the cursor, in id order."""
    id_column = RESOURCES[query.resource][0]
    matching = [r for r in records if matches(r, query.filters)]
    after = sorted((r for r in matching if r[id_column] > query.cursor),
                   key=lambda r: r[id_column])
    page = after[:query.limit]
    return {"items": [_shown(r, query) for r in page], "total": len(matching),
            "more": len(after) > len(page)}


def merge_pages(pages: dict, query: Query, missing: dict | None = None) -> dict:
    """Every node's page merged: the first `limit` records in id order.

    `pages` maps node id -> local_page result; `missing` maps node id -> why
    it did not answer. `next_cursor` is set when records remain.
    """
    id_column = RESOURCES[query.resource][0]
    items = sorted((item for page in pages.values() for item in page["items"]),
                   key=lambda r: r[id_column])
    more = any(page["more"] for page in pages.values()) or len(items) > query.limit
    items = items[:query.limit]
    return {"items": items, "total": sum(page["total"] for page in pages.values()),
            "next_cursor": items[-1][id_column] if more and items else "",
            "dropped": sum(page.get("dropped", 0) for page in pages.values()),
            "counted": sum(page.get("counted", 0) for page in pages.values()),
            "nodes": sorted(pages), "missing": dict(missing or {})}


# What a summary groups by, and which column it counts, per resource.
_SUMMARY = {"tasks": ("func_or_class_name", "state"), "actors": ("class_name", "state"),
            "objects": ("call_site", "task_status")}


def summarize(records, query: Query) -> dict:
    """Per function or class name (tasks, actors) or call site (objects): a count per state."""
    if query.resource not in _SUMMARY:
        _fail("resource", query.resource, f"one of {', '.join(_SUMMARY)} for a summary")
    group, state = _SUMMARY[query.resource]
    counts: dict = {}
    for record in records:
        if query.filters and not matches(record, query.filters):
            continue
        key = str(record.get(group) or "?")
        entry = counts.get(key)
        if entry is None:
            entry = counts[key] = {"type": record.get("type", ""), "state_counts": Counter()}
        entry["state_counts"][record.get(state) or "NIL"] += 1
    return {name: {"type": e["type"], "state_counts": dict(e["state_counts"])}
            for name, e in counts.items()}


def merge_summaries(summaries) -> dict:
    merged: dict = {}
    for summary in summaries:
        for name, entry in summary.items():
            target = merged.setdefault(name, {"type": entry["type"], "state_counts": Counter()})
            target["state_counts"].update(entry["state_counts"])
    return {name: {"type": e["type"], "state_counts": dict(e["state_counts"])}
            for name, e in sorted(merged.items())}
