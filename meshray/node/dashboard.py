"""The dashboard every node serves: its page's files and the JSON the page reads.

Any node serves the whole cluster's dashboard (there is no head): the JSON
routes answer through the node's state API (``StateService.ask_cluster``,
which asks every live member or reads etcd) and its etcd view, exactly as
``meshray list`` would through this node. Nothing here runs until a page
asks, so a node nobody looks at pays nothing; every answer is computed on
the HTTP server's threads, and what needs the daemon's loop is asked of it
with a deadline (``HttpApi.on_loop``).

Machine figures (CPU, memory, object store bytes, tasks by state) come from
each node's own Prometheus endpoint, read with a short deadline: a node that
does not answer in time is listed under ``missing``, never waited on.
What a peer's endpoint sends is untrusted text: only a few known gauges are
read from it, as numbers.

The page's files (``dashboard_ui/``) are listed once at start and served by
name from that list, so a request path never reaches the file system.
"""
from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import time
import urllib.request

from meshray.node.http_api import Asset, HttpError, Route

__all__ = ["Dashboard", "UI_DIR", "node_rows", "parse_node_metrics", "timeline_slices"]

log = logging.getLogger(__name__)

UI_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard_ui")
STATE_TIMEOUT_S = 10.0
METRICS_TIMEOUT_S = 2.0
MAX_METRICS_BYTES = 4 << 20
TIMELINE_LIMIT = 10_000
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
_LIST_LIMITS = {"tasks": 1000, "actors": 1000, "placement_groups": 1000, "objects": 1000,
                "workers": 1000}
# The gauges a sample reads from a node's /metrics, and what they become.
_GAUGES = {"ray_node_cpu_utilization": "cpu_percent", "ray_node_mem_used": "mem_used",
           "ray_node_mem_total": "mem_total", "ray_object_store_memory": "store_bytes",
           "meshray_object_store_capacity_bytes": "store_capacity",
           "meshray_etcd_lease_up": "lease_up",
           "meshray_etcd_registrations_total": "registrations"}


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else None


def parse_node_metrics(text: str) -> dict:
    """The dashboard's figures from one node's Prometheus text (untrusted input).

    ``store_bytes`` adds up every location (shared memory and spilled);
    ``tasks`` counts tasks per State label. Unknown families are ignored.
    """
    from prometheus_client.parser import text_string_to_metric_families
    out: dict = {"tasks": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            value = _number(sample.value)
            if value is None:
                continue
            if sample.name == "ray_tasks":
                state = str(sample.labels.get("State", "?"))[:64]
                out["tasks"][state] = out["tasks"].get(state, 0) + value
            elif sample.name in _GAUGES:
                key = _GAUGES[sample.name]
                out[key] = out.get(key, 0.0) + value
    return out


def node_rows(records: list, usage: dict, scheme: str) -> list:
    """One row per node the etcd view has seen, for the nodes table.

    `records` are ``meshray.nodes()`` entries, `usage` maps node id ->
    available resources; only what the page shows is kept, and the links to
    each node's own dashboard are built from its advertised address.
    """
    rows = []
    for record in records:
        node_id = record.get("NodeID")
        if not isinstance(node_id, str):
            continue
        address = str(record.get("Address") or record.get("NodeManagerAddress") or "")
        host = address.rsplit(":", 1)[0] if ":" in address else address
        port = record.get("DashboardPort")
        alive = bool(record.get("Alive"))
        valid_port = isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536
        rows.append({
            "node_id": node_id, "address": address, "alive": alive,
            "state": "ALIVE" if alive else "DEAD",
            "resources_total": record.get("Resources") or {},
            "resources_available": (usage.get(node_id) or {}) if alive else {},
            "labels": record.get("Labels") or {},
            "metrics_port": record.get("MetricsExportPort"),
            "dashboard_port": port if valid_port else None,
            "dashboard_url": f"{scheme}://{host}:{port}/" if valid_port and host else None,
        })
    rows.sort(key=lambda row: (not row["alive"], row["node_id"]))
    return rows


def timeline_slices(tasks: list, since_ms: float) -> list:
    """Task runs that ended after `since_ms` (or still run), one slice each.

    A slice is what the page's task stream draws: a bar per run on its
    worker's row; running tasks have ``end_ms`` None.
    """
    slices = []
    for task in tasks:
        start, end = task.get("start_time_ms"), task.get("end_time_ms")
        if not isinstance(start, (int, float)) or (end is not None and end < since_ms):
            continue
        slices.append({
            "task_id": task.get("task_id"), "node_id": task.get("node_id") or "",
            "worker": f"{(task.get('node_id') or '?')[:8]}/{task.get('worker_pid') or '?'}",
            "name": (task.get("func_or_class_name") or task.get("name") or "?").rsplit(".", 1)[-1],
            "state": task.get("state"), "start_ms": start, "end_ms": end,
        })
    slices.sort(key=lambda s: s["start_ms"])
    return slices


def _fetch_metrics(url: str) -> str:
    with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT_S) as response:
        return response.read(MAX_METRICS_BYTES).decode("utf-8", "replace")


class Dashboard:
    """The daemon's dashboard collaborator: static files and JSON routes."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.assets = self._load_assets()

    @staticmethod
    def _load_assets() -> dict:
        assets = {}
        try:
            names = os.listdir(UI_DIR)
        except OSError:
            return assets           # installed without the page: the JSON still works
        for name in names:
            kind = _TYPES.get(os.path.splitext(name)[1])
            if kind is not None:
                assets[name] = kind
        return assets

    def routes(self) -> list:
        return [
            Route("GET", r"/", self.page, public=True),
            Route("GET", r"/static/(?P<name>[A-Za-z0-9_.-]+)", self.static, public=True),
            Route("GET", r"/api/v0/nodes", self.nodes),
            Route("GET", r"/api/v0/cluster_status", self.cluster_status),
            Route("GET", r"/api/v0/tasks/summary", self.task_summary),
            Route("GET", r"/api/v0/timeline", self.timeline),
            Route("GET", r"/api/v0/(?P<resource>tasks|actors|placement_groups|objects|workers)",
                  self.listing),
        ]

    # ------------------------------------------------------------ files
    def _file(self, name: str) -> tuple:
        kind = self.assets.get(name)
        if kind is None:
            raise HttpError(404, f"no such dashboard file: {name!r}")
        with open(os.path.join(UI_DIR, name), "rb") as handle:
            return 200, Asset(kind, handle.read())

    def page(self, request) -> tuple:
        return self._file("index.html")

    def static(self, request) -> tuple:
        return self._file(request.params["name"])

    # ------------------------------------------------------------ state
    def _http(self):
        http = self.daemon.http
        if http is None or http.port == 0:
            raise HttpError(503, "the node's HTTP server is not running")
        return http

    def _state(self, payload: dict) -> dict:
        payload = {**payload, "timeout": STATE_TIMEOUT_S}
        return self._http().on_loop(self.daemon.state.ask_cluster(None, payload),
                                    timeout=STATE_TIMEOUT_S + 5)

    def _cluster(self, method: str):
        return self._http().on_loop(self.daemon._cluster_asker(method)(None, {}),
                                    timeout=STATE_TIMEOUT_S)

    def nodes(self, request) -> tuple:
        rows = node_rows(self._cluster("nodes"), self._cluster("node_usage"),
                         self._http().scheme)
        return 200, {"items": rows, "this_node": self.daemon.node_hex}

    def listing(self, request) -> tuple:
        resource = request.params["resource"]
        try:
            limit = int(request.arg("limit", str(_LIST_LIMITS[resource])))
        except ValueError:
            raise HttpError(400, f"limit={request.arg('limit')!r}: expected a whole number") \
                from None
        payload = {"resource": resource, "limit": limit, "detail": True}
        state = request.arg("state")
        if state:
            payload["filters"] = [["state", "=", state]]
        return 200, self._state(payload)

    def task_summary(self, request) -> tuple:
        return 200, self._state({"resource": "tasks", "summary": True})

    def timeline(self, request) -> tuple:
        try:
            window_s = float(request.arg("window_s", "60"))
        except ValueError:
            raise HttpError(400, f"window_s={request.arg('window_s')!r}: expected seconds") \
                from None
        if not 0 < window_s <= 3600:
            raise HttpError(400, f"window_s={window_s}: expected more than 0, at most 3600")
        page = self._state({"resource": "tasks", "limit": TIMELINE_LIMIT, "detail": True})
        now_ms = time.time() * 1000
        return 200, {"now_ms": now_ms, "window_s": window_s,
                     "slices": timeline_slices(page["items"], now_ms - window_s * 1000),
                     "missing": page.get("missing", {})}

    # ------------------------------------------------------------ metrics
    def cluster_status(self, request) -> tuple:
        """Resources, and every live node's machine figures from its /metrics."""
        records = [r for r in self._cluster("nodes") if r.get("Alive")]
        targets = {}
        for record in records:
            port, address = record.get("MetricsExportPort"), str(record.get("Address") or "")
            if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536 \
                    and ":" in address and isinstance(record.get("NodeID"), str):
                targets[record["NodeID"]] = f"http://{address.rsplit(':', 1)[0]}:{port}/metrics"
        nodes, missing = {}, {}
        with concurrent.futures.ThreadPoolExecutor(
                max(1, min(16, len(targets))), thread_name_prefix="meshray-dashboard") as pool:
            futures = {node: pool.submit(_fetch_metrics, url) for node, url in targets.items()}
            for node, future in futures.items():
                try:
                    nodes[node] = parse_node_metrics(future.result(METRICS_TIMEOUT_S + 1))
                except Exception as exc:  # noqa: BLE001 - named in the answer, not raised
                    missing[node] = f"{type(exc).__name__}: {exc}"
        return 200, {"time_ms": time.time() * 1000, "nodes": nodes, "missing": missing,
                     "resources_total": self._cluster("cluster_resources"),
                     "resources_available": self._cluster("available_resources")}
