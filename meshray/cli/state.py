"""`meshray list`, `meshray get` and `meshray summary`: Ray's state CLI on the state API.

Subcommand names, filters (``--filter "state=RUNNING"``, ``!=`` too) and
output formats (``--format default|table|json|yaml``) follow ``ray list`` /
``ray get`` / ``ray summary``; plural resource names with dashes
(``placement-groups``) as Ray spells them. `meshray timeline` writes the
tasks as a Chrome trace, as `ray timeline`; `meshray memory` lists the objects
every node tracks, as `ray memory`.
"""
from __future__ import annotations

import json
import os
import re
import sys

__all__ = ["add_parsers"]

RESOURCES = ("actors", "tasks", "objects", "nodes", "placement-groups", "jobs", "workers")
SUMMARIES = ("tasks", "actors", "objects")
# Columns of the default table (Ray's, plus the death cause for actors).
COLUMNS = {
    "actors": ("actor_id", "class_name", "state", "name", "node_id", "pid", "death_cause"),
    "tasks": ("task_id", "attempt_number", "name", "state", "job_id", "type", "node_id",
              "worker_pid", "error_type"),
    "objects": ("object_id", "object_size", "task_status", "reference_type", "type", "pid",
                "node_id"),
    "nodes": ("node_id", "node_ip", "is_head_node", "state", "node_name"),
    "placement_groups": ("placement_group_id", "name", "creator_job_id", "state"),
    "jobs": ("job_id", "status", "type", "driver_pid", "driver_node_id"),
    "workers": ("worker_id", "worker_type", "state", "is_alive", "pid", "node_id", "job_id"),
}
_FILTER = re.compile(r"^\s*([A-Za-z_]+)\s*(!=|=)\s*(.*?)\s*$")


def parse_filter(text: str) -> tuple:
    """"key=value" or "key!=value" -> (key, predicate, value), as `ray list --filter`."""
    match = _FILTER.match(text)
    if match is None:
        raise ValueError(f"--filter {text!r}: expected KEY=VALUE or KEY!=VALUE")
    key, predicate, value = match.groups()
    return key, predicate, value


def _connect(address):
    import meshray
    meshray.init(address=address or "auto", log_to_driver=False)
    return meshray


def _cell(record: dict, column: str) -> str:
    value = record.get(column)
    if column == "name" and record.get("ray_namespace") and value:
        value = f"{record['ray_namespace']}/{value}"
    return "" if value is None else str(value)


def _print_table(items: list, columns: tuple, out) -> None:
    rows = [[_cell(item, c) for c in columns] for item in items]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip(), file=out)
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip(), file=out)


def _emit(data, fmt: str, out, columns: tuple | None = None) -> None:
    if fmt == "json":
        print(json.dumps(data, indent=2, default=str), file=out)
    elif fmt == "yaml":
        import yaml
        print(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False),
              file=out, end="")
    elif columns is not None and isinstance(data, list):
        _print_table(data, columns, out)
    else:
        print(json.dumps(data, indent=2, default=str), file=out)


def _cmd_list(args) -> int:
    from meshray.util.state.api import query_state
    resource = args.resource.replace("-", "_")
    filters = [parse_filter(text) for text in args.filter or ()]
    meshray = _connect(args.address)
    try:
        answer = query_state(resource, filters=filters, limit=args.limit, timeout=args.timeout,
                             detail=args.detail or args.format in ("json", "yaml"),
                             raise_on_missing_output=False)
    finally:
        meshray.shutdown()
    items = [dict(item) for item in answer["items"]]
    _emit(items, args.format, sys.stdout, COLUMNS[resource])
    notes = []
    if answer.get("next_cursor"):
        notes.append(f"{answer['total']} match, {len(items)} shown: raise --limit to see more")
    for node, why in sorted((answer.get("missing") or {}).items()):
        notes.append(f"node {node} did not answer: {why}")
    if answer.get("dropped"):
        notes.append(f"{answer['dropped']} older records were removed by retention")
    if answer.get("counted"):
        notes.append(f"{answer['counted']} actor calls were counted, not listed (rate above "
                     "MESHRAY_ACTOR_TASK_EVENTS_PER_S); `meshray summary tasks` includes them")
    for note in notes:
        print(f"(meshray) {note}", file=sys.stderr)
    return 0


def _cmd_get(args) -> int:
    from meshray.util.state import api
    resource = args.resource.replace("-", "_")
    getter = {"actors": api.get_actor, "tasks": api.get_task, "objects": api.get_objects,
              "nodes": api.get_node, "placement_groups": api.get_placement_group,
              "jobs": api.get_job, "workers": api.get_worker}[resource]
    meshray = _connect(args.address)
    try:
        found = getter(args.id, timeout=args.timeout)
    finally:
        meshray.shutdown()
    if not found:
        print(f"no {resource[:-1].replace('_', ' ')} with id {args.id}", file=sys.stderr)
        return 1
    _emit(found if isinstance(found, list) else dict(found),
          "yaml" if args.format == "default" else args.format, sys.stdout)
    return 0


def _cmd_summary(args) -> int:
    from meshray.util.state import api
    summarize = {"tasks": api.summarize_tasks, "actors": api.summarize_actors,
                 "objects": api.summarize_objects}[args.resource]
    meshray = _connect(args.address)
    try:
        summary = summarize(timeout=args.timeout, raise_on_missing_output=False)
    finally:
        meshray.shutdown()
    if args.format in ("json", "yaml"):
        _emit(summary, args.format, sys.stdout)
        return 0
    groups = summary["cluster"]["summary"]
    rows = [{"name": name, "type": g["type"],
             "state_counts": ", ".join(f"{k}: {v}" for k, v in sorted(g["state_counts"].items()))}
            for name, g in groups.items()]
    _print_table(rows, ("name", "type", "state_counts"), sys.stdout)
    return 0


def _cmd_timeline(args) -> int:
    import tempfile
    import time

    from meshray.util.state.timeline import timeline
    path = args.output or os.path.join(
        tempfile.gettempdir(), f"meshray-timeline-{time.strftime('%Y-%m-%d_%H-%M-%S')}.json")
    meshray = _connect(args.address)
    try:
        timeline(path)
    finally:
        meshray.shutdown()
    print(f"Trace file written to {path}; open it in https://ui.perfetto.dev or "
          "chrome://tracing")
    return 0


_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}


def _all_objects(timeout: int) -> tuple:
    from meshray.util.state.api import query_state
    items, cursor, missing = [], "", {}
    while True:
        page = query_state("objects", limit=10_000, timeout=timeout, cursor=cursor,
                           raise_on_missing_output=False)
        items += [dict(item) for item in page["items"]]
        missing.update(page.get("missing") or {})
        cursor = page.get("next_cursor") or ""
        if not cursor:
            return items, missing


def _cmd_memory(args) -> int:
    """Objects the nodes track, grouped by node or by reference type, as `ray memory`."""
    meshray = _connect(args.address)
    try:
        objects, missing = _all_objects(args.timeout)
    finally:
        meshray.shutdown()
    unit = _UNITS[args.units]
    key = {"OBJECT_SIZE": lambda o: -(o.get("object_size") or 0),
           "REFERENCE_TYPE": lambda o: o.get("reference_type") or "",
           "PID": lambda o: o.get("pid") or 0}[args.sort_by]
    groups: dict = {}
    for obj in objects:
        group = obj.get("node_id") if args.group_by == "NODE_ADDRESS" else obj.get("reference_type")
        groups.setdefault(group or "?", []).append(obj)
    total = sum(o.get("object_size") or 0 for o in objects)
    if not args.stats_only:
        for group, members in sorted(groups.items()):
            size = sum(o.get("object_size") or 0 for o in members)
            print(f"--- {args.group_by.lower()} {group}: {len(members)} objects, "
                  f"{size / unit:.2f} {args.units} ---")
            rows = [{"object_id": o["object_id"],
                     "size": f"{(o.get('object_size') or 0) / unit:.2f} {args.units}",
                     "reference_type": o.get("reference_type"), "type": o.get("type"),
                     "pid": o.get("pid"), "in_store": o.get("in_store")}
                    for o in sorted(members, key=key)[:args.num_entries]]
            _print_table(rows, ("object_id", "size", "reference_type", "type", "pid",
                                "in_store"), sys.stdout)
            print()
    print(f"Aggregate: {len(objects)} objects, {total / unit:.2f} {args.units} "
          f"({sum(1 for o in objects if o.get('in_store'))} in shared memory) on "
          f"{len({o.get('node_id') for o in objects})} node(s)")
    for node, why in sorted(missing.items()):
        print(f"(meshray) node {node} did not answer: {why}", file=sys.stderr)
    return 0


def _common(parser, *, formats=("default", "table", "json", "yaml")) -> None:
    parser.add_argument("--address", help="cluster to attach to (default: auto)")
    parser.add_argument("--format", choices=formats, default="default")
    parser.add_argument("--json", dest="format", action="store_const", const="json",
                        help="same as --format json")
    parser.add_argument("--timeout", type=int, default=30,
                        help="seconds to wait for every node's answer (default 30)")


def add_parsers(commands) -> None:
    listing = commands.add_parser("list", help="list cluster state, answered by every node")
    listing.add_argument("resource", choices=RESOURCES)
    listing.add_argument("--filter", "-f", action="append",
                         help='KEY=VALUE or KEY!=VALUE (repeatable; values are case-insensitive)')
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--detail", action="store_true", help="every field of every record")
    _common(listing)
    listing.set_defaults(func=_cmd_list)

    get = commands.add_parser("get", help="one record of cluster state by id")
    get.add_argument("resource", choices=RESOURCES)
    get.add_argument("id")
    _common(get)
    get.set_defaults(func=_cmd_get)

    summary = commands.add_parser("summary", help="counts per function/class and state")
    summary.add_argument("resource", choices=SUMMARIES)
    _common(summary)
    summary.set_defaults(func=_cmd_summary)

    memory = commands.add_parser("memory", help="objects every node tracks, as `ray memory`")
    memory.add_argument("--address", help="cluster to attach to (default: auto)")
    memory.add_argument("--group-by", choices=("NODE_ADDRESS", "REFERENCE_TYPE"),
                        default="NODE_ADDRESS")
    memory.add_argument("--sort-by", choices=("OBJECT_SIZE", "REFERENCE_TYPE", "PID"),
                        default="OBJECT_SIZE")
    memory.add_argument("--units", choices=tuple(_UNITS), default="B")
    memory.add_argument("--num-entries", type=int, default=1000,
                        help="at most this many objects per group")
    memory.add_argument("--stats-only", action="store_true", help="only the totals")
    memory.add_argument("--timeout", type=int, default=30)
    memory.set_defaults(func=_cmd_memory)

    trace = commands.add_parser("timeline", help="write the cluster's tasks as a Chrome trace")
    trace.add_argument("--address", help="cluster to attach to (default: auto)")
    trace.add_argument("--output", "-o", help="file to write (default: a temp file)")
    trace.set_defaults(func=_cmd_timeline)
