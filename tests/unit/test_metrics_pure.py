"""Metrics without a node: the user API's checks, the wire rules a node
applies to a `metrics` report, the node's aggregation and its families."""
from __future__ import annotations

import pickle

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meshray.common.metric_rules import RESERVED_NAMES, USER_METRIC_PREFIX
from meshray.node import request_rules
from meshray.node.metric_families import BASE_LABELS, OTHER, NameCap, UserMetrics, node_families
from meshray.node.metrics import sd_targets
from meshray.rpc import strict
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.util.metrics import Counter, Gauge, Histogram

BASE = {"SessionName": "s", "NodeAddress": "10.0.0.1", "NodeId": "ab" * 16, "Version": "0"}


# ------------------------------------------------------------ the user API
@pytest.mark.parametrize("name", ["", "1starts_with_digit", "has-dash", "has space", "tasks",
                                  "x" * 201])
def test_bad_metric_names_raise_value_error_naming_them(name):
    with pytest.raises(ValueError, match="metric name="):
        Counter(name)


@pytest.mark.parametrize("key", ["le", "NodeId", "bad-key", "__hidden", "9lives"])
def test_bad_tag_keys_raise_value_error_naming_them(key):
    with pytest.raises(ValueError, match=repr(key)):
        Gauge("fine_name", tag_keys=(key,))


def test_tag_keys_must_be_a_tuple_of_str_as_in_ray():
    with pytest.raises(TypeError, match="tuple"):
        Counter("requests", tag_keys=["route"])
    with pytest.raises(TypeError, match="str"):
        Counter("requests", tag_keys=(1,))


def test_unknown_and_missing_tags_raise_value_error_naming_them():
    counter = Counter("requests", tag_keys=("route",))
    with pytest.raises(ValueError, match="'color'"):
        counter.inc(tags={"color": "red"})
    with pytest.raises(ValueError, match="route"):
        counter.inc()
    with pytest.raises(ValueError, match="'color'"):
        counter.set_default_tags({"color": "red"})
    with pytest.raises(TypeError, match="route"):
        counter.inc(tags={"route": 5})


def test_counter_increments_must_be_positive_and_histograms_need_bounds():
    with pytest.raises(ValueError, match="> 0"):
        Counter("requests").inc(0)
    with pytest.raises(ValueError, match="boundaries"):
        Histogram("latency")
    with pytest.raises(ValueError, match="increasing"):
        Histogram("latency", boundaries=[1.0, 0.5])
    with pytest.raises(ValueError, match="positive"):
        Histogram("latency", boundaries=[-1.0])
    with pytest.raises(TypeError, match="int or float"):
        Gauge("depth").set("3")


def test_metrics_pickle_with_their_default_tags():
    histogram = Histogram("latency", "d", boundaries=[1.0, 2.0], tag_keys=("a",))
    histogram.set_default_tags({"a": "b"})
    copy = pickle.loads(pickle.dumps(histogram))
    assert copy.info == histogram.info == {
        "name": "latency", "description": "d", "tag_keys": ("a",), "default_tags": {"a": "b"},
        "boundaries": [1.0, 2.0]}


# ------------------------------------------------------------ the wire rules
def _report(**fields) -> pb.ClientBatch:
    update = dict(name="requests", kind="counter", tag_keys=["route"], tag_values=["/"],
                  value=1.0)
    update.update(fields)
    return pb.ClientBatch(events=[pb.ClientEvent(metrics=pb.MetricsReport(
        updates=[pb.MetricUpdate(**update)]))])


def test_a_well_formed_report_passes():
    request_rules.check_client_batch(_report(), frozenset())
    request_rules.check_client_batch(_report(kind="histogram", boundaries=[0.5, 1.0],
                                             bucket_counts=[1, 0, 2], sum=3.0), frozenset())


@pytest.mark.parametrize("fields, named", [
    ({"name": "bad-name"}, "name"),
    ({"name": "tasks"}, "name"),
    ({"kind": "summary"}, "kind"),
    ({"tag_values": []}, "tag_values"),
    ({"tag_keys": ["le"]}, "tag_keys"),
    ({"value": -1.0}, "value"),
    ({"value": float("nan")}, "value"),
    ({"kind": "histogram", "boundaries": [1.0], "bucket_counts": [1]}, "bucket_counts"),
    ({"kind": "histogram", "boundaries": [2.0, 1.0], "bucket_counts": [0, 0, 0]}, "boundaries"),
])
def test_malformed_reports_are_refused_naming_the_field(fields, named):
    with pytest.raises(strict.Malformed, match=rf"metrics.*{named}"):
        request_rules.check_client_batch(_report(**fields), frozenset())


# ------------------------------------------------------------ the node side
def _update(**fields):
    update = dict(name="requests", kind="counter", tag_keys=["route"], tag_values=["/"],
                  value=1.0)
    update.update(fields)
    return pb.MetricUpdate(**update)


def _exposed(families) -> dict:
    class Collector:
        def collect(self):
            return families
    registry = CollectorRegistry()
    registry.register(Collector())
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_user_metrics_add_counters_keep_the_last_gauge_and_fill_buckets():
    user = UserMetrics()
    user.apply([_update(value=2.0), _update(value=3.0),
                _update(name="depth", kind="gauge", value=5.0),
                _update(name="depth", kind="gauge", value=4.0),
                _update(name="lat", kind="histogram", boundaries=[1.0], bucket_counts=[2, 1],
                        sum=4.0),
                _update(name="lat", kind="histogram", boundaries=[1.0], bucket_counts=[1, 0],
                        sum=0.5)])
    exposed = _exposed(user.families(BASE))
    labels = tuple(sorted({**BASE, "Component": "core_worker", "route": "/"}.items()))
    assert exposed[("ray_requests_total", labels)] == 5.0
    assert exposed[("ray_depth", labels)] == 4.0
    assert exposed[("ray_lat_bucket", tuple(sorted((*labels, ("le", "1.0")))))] == 3.0
    assert exposed[("ray_lat_bucket", tuple(sorted((*labels, ("le", "+Inf")))))] == 4.0
    assert exposed[("ray_lat_sum", labels)] == 4.5


def test_user_metrics_drop_what_disagrees_or_exceeds_the_cap():
    user = UserMetrics(max_series=2)
    user.apply([_update(), _update(kind="gauge"), _update(tag_keys=["other"]),
                _update(tag_values=["/a"]), _update(tag_values=["/b"])])
    assert user.dropped == 3     # the gauge, the other tag keys, the third series
    exposed = _exposed(user.families(BASE))
    assert sum(1 for name, _ in exposed if name == "ray_requests_total") == 2
    assert exposed[("meshray_metrics_user_updates_dropped_total",
                    tuple(sorted(BASE.items())))] == 3


def test_name_cap_folds_names_past_the_limit_into_other():
    cap = NameCap(2)
    assert [cap(n) for n in ("a", "b", "c", "a", "d")] == ["a", "b", OTHER, "a", OTHER]


SNAPSHOT = {
    "loop": {"tasks_live": {("RUNNING", "f", "0"): 2}, "tasks_ended": {("FINISHED", "f", "0"): 3},
             "actors": {("ALIVE", "A"): 1}, "placement_groups": {"CREATED": 1},
             "workers": {"task": 2, "actor": 1},
             "resources_total": {"CPU": 4.0}, "resources_available": {"CPU": 1.5},
             "memory_monitor": {"evictions": {("Task", "hog"): 2}, "usage_fraction": 0.5,
                                "threshold": 0.95, "enabled": True}},
    "store": {"capacity": 100, "used_bytes": 40, "spilled_bytes": 7, "num_objects": 3,
              "spill_count": 1, "spill_bytes_total": 7, "restore_count": 0,
              "restore_bytes_total": 0},
    "transfer": {"received": 10, "sent": 20, "data_link_received": 8, "data_link_sent": 16},
    "lease": {"registered": True, "registrations": 1, "errors": 0},
    "host": {"cpu_percent": 12.5, "cpu_count": 8, "mem_total": 100, "mem_available": 60,
             "mem_used": 40, "daemon_rss": 5},
}


def test_node_families_carry_the_base_labels_and_reserve_their_ray_names():
    families = node_families(SNAPSHOT, BASE)
    for family in families:
        for sample in family.samples:
            assert all(sample.labels[key] == BASE[key] for key in BASE_LABELS), family.name
        if family.name.startswith(USER_METRIC_PREFIX):
            assert family.name[len(USER_METRIC_PREFIX):] in RESERVED_NAMES, family.name
    exposed = _exposed(families)
    base = tuple(sorted(BASE.items()))

    def at(name, **labels):
        return exposed[(name, tuple(sorted((*base, *labels.items()))))]
    assert at("ray_tasks", State="RUNNING", Name="f", IsRetry="0") == 2
    assert at("ray_tasks", State="FINISHED", Name="f", IsRetry="0") == 3
    assert at("meshray_tasks_finished_total", State="FINISHED", Name="f", IsRetry="0") == 3
    assert at("ray_resources", Name="CPU", State="USED") == 2.5
    assert at("ray_object_store_memory", Location="SPILLED") == 7
    assert at("ray_node_cpu_utilization") == 12.5
    assert at("ray_memory_manager_worker_eviction_total", Type="Task", Name="hog") == 2
    assert at("meshray_memory_monitor_usage_fraction") == 0.5
    assert at("meshray_memory_monitor_threshold") == 0.95
    assert at("meshray_object_transfer_bytes_total", Direction="received") == 10
    assert at("meshray_object_transfer_data_link_bytes_total", Direction="received") == 8
    assert at("meshray_object_transfer_data_link_bytes_total", Direction="sent") == 16


def test_a_loop_that_did_not_answer_leaves_its_families_out():
    names = {family.name for family in node_families({**SNAPSHOT, "loop": None}, BASE)}
    assert "ray_tasks" not in names and "ray_object_store_memory" in names


def test_sd_targets_use_the_advertised_host_and_skip_nodes_without_a_port():
    groups = sd_targets({"n1": {"Address": "10.0.0.1:7000", "MetricsExportPort": 9100},
                         "n2": {"Address": "10.0.0.2:7000"},
                         "n3": {"Address": "10.0.0.3:7000", "MetricsExportPort": "9100"}})
    assert groups == [{"targets": ["10.0.0.1:9100"],
                       "labels": {"__meta_meshray_node_id": "n1",
                                  "__meta_meshray_node_address": "10.0.0.1"}}]


def test_the_dashboard_queries_only_metrics_a_node_exports():
    import json
    import re

    from tests.helpers import REPO
    with open(f"{REPO}/deploy/grafana/meshray-dashboard.json") as handle:
        dashboard = json.load(handle)
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\b(?:ray|meshray)_[a-z_]+", expr)}
    exported = {sample.name for family in node_families(SNAPSHOT, BASE)
                for sample in family.samples}
    exported |= {f"meshray_etcd_request_duration_seconds_{s}" for s in ("bucket", "sum", "count")}
    assert used and used <= exported, used - exported
