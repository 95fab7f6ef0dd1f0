"""The dashboard's pure parts: node rows, task stream slices, the metrics parse,
and which routes the HTTP server answers without the token."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from meshray.node.dashboard import Dashboard, node_rows, parse_node_metrics, timeline_slices
from meshray.node.http_api import Asset, HttpApi, HttpError, Request


def test_node_rows_link_each_node_and_hide_a_dead_nodes_availability():
    records = [
        {"NodeID": "b" * 32, "Alive": False, "Address": "10.0.0.2:4000",
         "Resources": {"CPU": 2.0}, "DashboardPort": 8265, "MetricsExportPort": 9000},
        {"NodeID": "a" * 32, "Alive": True, "Address": "10.0.0.1:4000", "Labels": {"z": "1"},
         "Resources": {"CPU": 4.0}, "DashboardPort": 8266, "MetricsExportPort": 9001},
        {"NodeID": 7},                                    # malformed: left out
        {"NodeID": "c" * 32, "Alive": True, "Address": "10.0.0.3:4000", "DashboardPort": True},
    ]
    usage = {"a" * 32: {"CPU": 1.0}, "b" * 32: {"CPU": 2.0}}
    rows = node_rows(records, usage, "http")
    assert [r["node_id"][0] for r in rows] == ["a", "c", "b"]        # alive first
    assert rows[0]["dashboard_url"] == "http://10.0.0.1:8266/"
    assert rows[0]["resources_available"] == {"CPU": 1.0} and rows[0]["labels"] == {"z": "1"}
    assert rows[1]["dashboard_url"] is None                          # a bool is not a port
    assert rows[2]["state"] == "DEAD" and rows[2]["resources_available"] == {}


def test_timeline_slices_keep_runs_in_the_window_and_running_ones():
    tasks = [
        {"task_id": "old", "start_time_ms": 100, "end_time_ms": 200, "node_id": "n" * 32,
         "worker_pid": 1, "func_or_class_name": "m.f", "state": "FINISHED"},
        {"task_id": "new", "start_time_ms": 900, "end_time_ms": 950, "node_id": "n" * 32,
         "worker_pid": 1, "func_or_class_name": "m.f", "state": "FINISHED"},
        {"task_id": "running", "start_time_ms": 800, "end_time_ms": None, "node_id": "n" * 32,
         "worker_pid": 2, "name": "g", "state": "RUNNING"},
        {"task_id": "queued", "start_time_ms": None},
    ]
    slices = timeline_slices(tasks, since_ms=500)
    assert [s["task_id"] for s in slices] == ["running", "new"]
    assert slices[0]["end_ms"] is None and slices[0]["worker"] == "nnnnnnnn/2"
    assert slices[1]["name"] == "f"


def test_parse_node_metrics_reads_known_gauges_only():
    text = "\n".join([
        "# TYPE ray_node_cpu_utilization gauge", 'ray_node_cpu_utilization{NodeId="x"} 12.5',
        "# TYPE ray_node_mem_used gauge", "ray_node_mem_used 1024",
        "# TYPE ray_object_store_memory gauge",
        'ray_object_store_memory{Location="MMAP_SHM"} 100',
        'ray_object_store_memory{Location="SPILLED"} 50',
        "# TYPE ray_tasks gauge", 'ray_tasks{State="FINISHED",Name="f"} 3',
        'ray_tasks{State="FINISHED",Name="g"} 2', 'ray_tasks{State="RUNNING",Name="f"} 1',
        "# TYPE meshray_etcd_lease_up gauge", "meshray_etcd_lease_up 1",
        "# TYPE meshray_etcd_registrations counter", "meshray_etcd_registrations_total 2",
        "# TYPE something_else gauge", "something_else 9", "ray_node_mem_total NaN", ""])
    figures = parse_node_metrics(text)
    assert figures == {"cpu_percent": 12.5, "mem_used": 1024.0, "store_bytes": 150.0,
                       "lease_up": 1.0, "registrations": 2.0,
                       "tasks": {"FINISHED": 5.0, "RUNNING": 1.0}}


def _api(token="t" * 40):
    daemon = SimpleNamespace(config=SimpleNamespace(token=token))
    api = HttpApi(daemon)
    api.add_routes(Dashboard(daemon).routes())
    return api


def _request(path, headers=None):
    return Request(method="GET", path=path, query={}, headers=headers or {}, body=b"")


def test_only_the_page_files_are_served_without_the_token():
    api = _api()
    status, body, _ = api.dispatch(_request("/"))
    assert status == 200 and isinstance(body, Asset) and b"login-form" in body.data
    assert body.content_type.startswith("text/html")
    status, body, _ = api.dispatch(_request("/static/app.js"))
    assert status == 200 and body.content_type.startswith("text/javascript")
    with pytest.raises(HttpError) as refused:
        api.dispatch(_request("/static/missing.js"))
    assert refused.value.status == 404
    for path in ("/api/v0/nodes", "/api/v0/tasks", "/api/v0/cluster_status", "/static/../x"):
        status, body, _ = api.dispatch(_request(path))
        assert status == 401, path
