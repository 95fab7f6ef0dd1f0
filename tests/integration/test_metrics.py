"""Every node's Prometheus endpoint: system metrics move with the work, user
metrics recorded in tasks show up on their node, /sd lists the live nodes."""
from __future__ import annotations

import json
import os
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import meshray
from meshray.util.metrics import Counter, Gauge, Histogram
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(180)


@meshray.remote
def metrics_square(x):
    return x * x


@meshray.remote
def metrics_blocker(path):
    import os
    import time
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return "done"


@meshray.remote
def metrics_work(n):
    Counter("metrics_test_items", "items handled", tag_keys=("kind",)).inc(
        n, tags={"kind": "apple"})
    return n


@meshray.remote
class MetricsActor:
    def __init__(self):
        self.gauge = Gauge("metrics_test_depth", "queue depth",
                           tag_keys=("queue",)).set_default_tags({"queue": "q1"})
        self.latency = Histogram("metrics_test_latency", "latency", boundaries=[0.1, 1.0])

    def record(self):
        self.gauge.set(42)
        for value in (0.05, 0.5, 5.0):
            self.latency.observe(value)
        return True


def _endpoint(record: dict) -> str:
    return f"{record['Address'].rsplit(':', 1)[0]}:{record['MetricsExportPort']}"


def _get(endpoint: str, path: str) -> bytes:
    with urllib.request.urlopen(f"http://{endpoint}{path}", timeout=10) as response:
        return response.read()


def scrape(endpoint: str) -> list:
    """(name, labels, value) of every sample the node exports."""
    text = _get(endpoint, "/metrics").decode()
    return [(s.name, s.labels, s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples: list, name: str, **labels) -> float:
    return sum(value for sample_name, sample_labels, value in samples
               if sample_name == name
               and all(sample_labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def endpoint(ray):
    (record,) = [n for n in ray.nodes() if n["Alive"]]
    return _endpoint(record)


def test_metrics_port_is_in_nodes_and_serves_labelled_metrics(ray, endpoint):
    (record,) = [n for n in ray.nodes() if n["Alive"]]
    assert isinstance(record["MetricsExportPort"], int) and record["MetricsExportPort"] > 0
    samples = scrape(endpoint)
    cpu = [labels for name, labels, _ in samples if name == "ray_resources"
           and labels["Name"] == "CPU"]
    assert {labels["State"] for labels in cpu} == {"USED", "AVAILABLE"}
    for labels in cpu:
        assert labels["NodeId"] == record["NodeID"]
        assert labels["NodeAddress"] == record["Address"].rsplit(":", 1)[0]
        assert labels["SessionName"]
    assert total(samples, "ray_resources", Name="CPU", State="AVAILABLE") + \
        total(samples, "ray_resources", Name="CPU", State="USED") == 2.0
    assert total(samples, "ray_node_mem_total") > 0
    assert total(samples, "meshray_etcd_lease_up") == 1.0
    assert total(samples, "meshray_etcd_request_duration_seconds_count") > 0


def test_finished_counter_counts_the_tasks_run(ray, endpoint):
    before = total(scrape(endpoint), "meshray_tasks_finished_total", Name=f"{__name__}.metrics_square",
                   State="FINISHED")
    assert ray.get([metrics_square.remote(i) for i in range(7)]) == [i * i for i in range(7)]
    wait_for(lambda: total(scrape(endpoint), "meshray_tasks_finished_total",
                           Name=f"{__name__}.metrics_square", State="FINISHED") == before + 7,
             message="the finished-task counter grows by the 7 tasks run")
    samples = scrape(endpoint)
    assert total(samples, "ray_tasks", Name=f"{__name__}.metrics_square", State="FINISHED") == before + 7
    assert total(samples, "meshray_workers") >= 1


def test_a_running_task_shows_in_the_gauge(ray, endpoint, tmp_path):
    release = str(tmp_path / "release")

    ref = metrics_blocker.remote(release)
    wait_for(lambda: total(scrape(endpoint), "ray_tasks", Name=f"{__name__}.metrics_blocker",
                           State="RUNNING") == 1, message="the blocked task counts as RUNNING")
    assert total(scrape(endpoint), "ray_resources", Name="CPU", State="USED") >= 1.0
    open(release, "w").close()
    assert ray.get(ref, timeout=60) == "done"
    wait_for(lambda: total(scrape(endpoint), "ray_tasks", Name=f"{__name__}.metrics_blocker",
                           State="RUNNING") == 0, message="no longer RUNNING once finished")


def test_user_metrics_recorded_in_tasks_and_actors_reach_their_node(ray, endpoint):
    assert sum(ray.get([metrics_work.remote(n) for n in (1, 2, 3)])) == 6
    actor = MetricsActor.remote()
    assert ray.get(actor.record.remote())

    def exported():
        samples = scrape(endpoint)
        return (total(samples, "ray_metrics_test_items_total", kind="apple") == 6
                and total(samples, "ray_metrics_test_depth", queue="q1") == 42
                and total(samples, "ray_metrics_test_latency_count") == 3) and samples

    samples = wait_for(exported, message="user metrics exported by the node")
    assert total(samples, "ray_metrics_test_latency_bucket", le="0.1") == 1
    assert total(samples, "ray_metrics_test_latency_bucket", le="1.0") == 2
    assert total(samples, "ray_metrics_test_latency_bucket", le="+Inf") == 3
    assert total(samples, "ray_metrics_test_latency_sum") == pytest.approx(5.55)
    (labels,) = [labels for name, labels, _ in samples if name == "ray_metrics_test_items_total"]
    assert labels["Component"] == "core_worker" and labels["NodeId"]


def test_sd_file_lists_what_the_sd_endpoint_lists(ray, endpoint, tmp_path):
    from meshray.cli.metrics import write_sd_file
    path = tmp_path / "targets.json"
    assert write_sd_file(str(path), ray.nodes()) == 1
    assert json.loads(path.read_text()) == json.loads(_get(endpoint, "/sd"))
    assert [t for group in json.loads(path.read_text()) for t in group["targets"]] == [endpoint]


def test_unknown_path_is_404(endpoint):
    with pytest.raises(urllib.error.HTTPError) as info:
        _get(endpoint, "/nothing")
    assert info.value.code == 404


@pytest.mark.cluster_args(initialize_head=True, head_node_args={"num_cpus": 1})
def test_service_discovery_lists_every_live_node(cluster):
    from meshray.coordination import keyspace

    worker = cluster.add_node(num_cpus=1)
    items, _ = cluster.coordinator().get_prefix(keyspace.Keyspace().nodes_prefix())
    records = [keyspace.decode_json(item.value) for item in items]
    endpoints = {_endpoint(record) for record in records}
    assert len(endpoints) == 2 and all(record["MetricsExportPort"] for record in records)

    def listed(endpoint):
        return {target for group in json.loads(_get(endpoint, "/sd"))
                for target in group["targets"]}

    for endpoint in endpoints:
        wait_for(lambda: listed(endpoint) == endpoints, message=f"/sd of {endpoint}")
    groups = json.loads(_get(next(iter(endpoints)), "/sd"))
    assert {g["labels"]["__meta_meshray_node_id"] for g in groups} == {
        r["NodeID"] for r in records}
    worker_endpoint = next(_endpoint(r) for r in records if r["NodeID"] == worker.node_id)
    cluster.remove_node(worker)
    (head_endpoint,) = endpoints - {worker_endpoint}
    wait_for(lambda: listed(head_endpoint) == {head_endpoint},
             message="a removed node leaves /sd")


def test_metrics_export_port_is_the_one_asked_for(tmp_path):
    import socket

    from meshray.node import launcher
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    node = launcher.start_node(embedded_etcd=True, num_cpus=0, metrics_export_port=port,
                               env=dict(os.environ, MESHRAY_TOKEN=""))
    try:
        assert node.info["metrics_export_port"] == port
        assert total(scrape(f"127.0.0.1:{port}"), "ray_node_cpu_count") > 0
    finally:
        node.stop()


def test_init_gives_its_node_the_metrics_port_and_leaves_out_the_dashboard():
    # init(_metrics_export_port=..., include_dashboard=False) for the node it
    # starts: both honoured, neither warns.
    import socket

    from tests.helpers import run_driver
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = run_driver(
        "import json, urllib.request, warnings\n"
        "warnings.simplefilter('error', UserWarning)\n"
        "import meshray\n"
        "from meshray.core import state\n"
        f"context = meshray.init(num_cpus=1, include_dashboard=False, _metrics_export_port={port})\n"
        "(record,) = meshray.nodes()\n"
        f"text = urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=10).read()\n"
        "print(json.dumps([record['MetricsExportPort'], record.get('DashboardPort'),\n"
        "                  state.state.local_node.info['dashboard_port'], context.dashboard_url,\n"
        "                  b'ray_node_cpu_count' in text]))\n"
        "meshray.shutdown()\n",
        timeout=120, env={k: v for k, v in os.environ.items()
                          if k not in ("MESHRAY_ADDRESS", "RAY_ADDRESS")})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [port, 0, 0, "", True]
