"""Copies a node pulled go away when their object is freed, and spilled work
keeps every node busy (real daemons via meshray.testing.Cluster)."""
from __future__ import annotations

import collections
import os
import sys
import time
import urllib.request

import cloudpickle
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SIZE = 24 * 1024 * 1024


# The `cluster` fixture's head node holds the objects the others pull.
pytestmark = pytest.mark.cluster_args(head_node_args={"num_cpus": 1, "resources": {"src": 1}})


def _store_has(node, object_hex: str) -> bool:
    return os.path.exists(f"/dev/shm/meshray-{node.node_id[:12]}/{object_hex}")


def test_a_pulled_copy_is_dropped_when_its_object_is_freed(cluster):
    reader = cluster.add_node(num_cpus=1, resources={"dst": 1})
    ray = cluster.connect()

    @ray.remote(num_cpus=0, resources={"src": 0.01})
    def produce():
        import numpy as np
        return np.ones(SIZE, dtype=np.uint8)

    @ray.remote(num_cpus=0, resources={"dst": 0.01})
    def consume(array):
        return int(array[:10].sum())

    ref = produce.remote()
    assert ray.get(consume.remote(ref), timeout=60) == 10
    object_hex = ref.hex()
    assert _store_has(reader, object_hex)           # the copy the task read
    assert _store_has(cluster.head_node, object_hex)
    del ref
    wait_for(lambda: not _store_has(reader, object_hex), timeout=10,
             message="the reader's copy dropped after the free")
    assert not _store_has(cluster.head_node, object_hex)


def _data_link_bytes(ray, node_id: str) -> dict:
    """What the node's metrics say moved on its data link, and on any path."""
    (record,) = [n for n in ray.nodes() if n["NodeID"] == node_id]
    host = record["Address"].rsplit(":", 1)[0]
    url = f"http://{host}:{record['MetricsExportPort']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    out = collections.Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("meshray_object_transfer_data_link_bytes_total",
                               "meshray_object_transfer_bytes_total"):
                key = "link" if "data_link" in sample.name else "any"
                out[f"{key}:{sample.labels['Direction']}"] += sample.value
    return out


def test_large_objects_travel_on_the_data_link_and_small_ones_on_the_rpc(cluster):
    reader = cluster.add_node(num_cpus=1, resources={"dst": 1})
    ray = cluster.connect()
    ports = [n.get("DataPort") for n in ray.nodes() if n["Alive"]]
    assert len(ports) == 2 and all(isinstance(p, int) and p > 0 for p in ports)

    @ray.remote(num_cpus=0, resources={"src": 0.01})
    def produce(size):
        import numpy as np
        return np.full(size, 3, dtype=np.uint8)

    @ray.remote(num_cpus=0, resources={"dst": 0.01})
    def consume(array):
        return int(array.sum())

    head = cluster.head_node.node_id
    before = _data_link_bytes(ray, reader.node_id)
    assert ray.get(consume.remote(produce.remote(SIZE)), timeout=60) == 3 * SIZE
    after = _data_link_bytes(ray, reader.node_id)
    assert after["link:received"] - before["link:received"] >= SIZE
    assert _data_link_bytes(ray, head)["link:sent"] >= SIZE
    # A small store object (over the inline limit, under the data link's) takes the RPC.
    small = 300 * 1024
    assert ray.get(consume.remote(produce.remote(small)), timeout=60) == 3 * small
    last = _data_link_bytes(ray, reader.node_id)
    assert last["link:received"] == after["link:received"]
    assert last["any:received"] - after["any:received"] >= small


def test_spilled_work_keeps_every_node_busy(cluster):
    cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    ray = cluster.connect()

    @ray.remote(num_cpus=1)
    def nap():
        import meshray
        time.sleep(0.05)
        return meshray.get_runtime_context().get_node_id()

    ray.get([nap.remote() for _ in range(6)], timeout=60)    # workers started everywhere
    placed = collections.Counter(ray.get([nap.remote() for _ in range(30)], timeout=60))
    # Every node takes a fair share (speed is the benchmark's business; the
    # offers themselves are pinned by tests/unit/test_spill_offers.py).
    assert len(placed) == 3 and min(placed.values()) >= 6, placed
