"""`meshray.timeline()`: the cluster's tasks as a Chrome trace (opens in Perfetto).

Built from the task events every node keeps (the state API pages through
all of them): one process row per node, one thread row per worker, a slice
per task run from start to end, and an instant event where a task arrived
from another node (spilled to it). Times are microseconds since the epoch,
as the Trace Event format expects.
"""
from __future__ import annotations

import json
from typing import Optional

from meshray.util.state.api import query_state

__all__ = ["timeline", "trace_events"]

_PAGE = 10_000


def trace_events(tasks) -> list:
    """Trace Event dicts for task records (with detail) -- a pure function."""
    events = []
    for task in tasks:
        node = f"Node {task.get('node_id', '?')[:12]}"
        worker = f"worker {task.get('worker_pid') or '?'}"
        name = (task.get("func_or_class_name") or task.get("name") or "?").rsplit(".", 1)[-1]
        args = {k: task.get(k) for k in ("task_id", "attempt_number", "state", "job_id",
                                         "error_type", "spilled_from")
                if task.get(k) is not None}
        start, end = task.get("start_time_ms"), task.get("end_time_ms")
        if start is not None:
            events.append({"cat": "task", "name": name, "ph": "X", "pid": node, "tid": worker,
                           "ts": start * 1000, "dur": max(0, ((end or start) - start) * 1000),
                           "args": args,
                           "cname": "bad" if task.get("state") == "FAILED" else "good"})
        if task.get("spilled_from") and task.get("creation_time_ms") is not None:
            events.append({"cat": "spill", "name": f"spilled from {task['spilled_from'][:12]}",
                           "ph": "i", "s": "t", "pid": node, "tid": "scheduler",
                           "ts": task["creation_time_ms"] * 1000, "args": args})
    events.sort(key=lambda e: e["ts"])
    return events


def timeline(filename: Optional[str] = None) -> Optional[list]:
    """Every task the cluster's nodes remember, as Chrome Trace Event JSON.

    With `filename`, writes the JSON there (load it in Perfetto or
    chrome://tracing); without, returns the list of events (as Ray).
    """
    tasks, cursor = [], ""
    while True:
        page = query_state("tasks", limit=_PAGE, detail=True, cursor=cursor,
                           raise_on_missing_output=False)
        tasks += page["items"]
        cursor = page.get("next_cursor") or ""
        if not cursor:
            break
    events = trace_events(tasks)
    if filename is None:
        return events
    with open(filename, "w") as handle:
        json.dump(events, handle)
    return None
