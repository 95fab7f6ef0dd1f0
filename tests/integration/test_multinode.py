"""Several real node daemons and one etcd: spillover, transfer, node failure.

Every node is a real daemon process started by meshray.testing.Cluster; nodes
are killed with SIGKILL. Lease TTL is 2 s here, so a dead node vanishes from
the view within a few seconds.
"""
from __future__ import annotations

import os
import time

import sys

import cloudpickle
import numpy as np
import pytest

from tests.helpers import wait_for


# Workers do not have this test module on their path: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def node_of():
    import meshray
    return meshray.get_runtime_context().get_node_id()


def test_nodes_join_and_resources_are_cluster_wide(cluster):
    cluster.add_node(num_cpus=2, resources={"gadget": 1}, labels={"zone": "b"})
    ray = cluster.connect()
    nodes = ray.nodes()
    assert len(nodes) == 2 and all(n["Alive"] for n in nodes)
    assert ray.cluster_resources()["CPU"] == 3.0
    assert ray.cluster_resources()["gadget"] == 1.0
    assert {"zone": "b"}.items() <= next(n for n in nodes if "gadget" in n["Resources"])["Labels"].items()
    wait_for(lambda: ray.available_resources().get("CPU") == 3.0, message="availability published")


def test_tasks_spill_to_peers_when_local_is_full(cluster):
    second = cluster.add_node(num_cpus=1)
    third = cluster.add_node(num_cpus=1)
    ray = cluster.connect()

    @ray.remote
    def where(delay):
        time.sleep(delay)
        return node_of()

    seen = set(ray.get([where.remote(0.5) for _ in range(6)], timeout=60))
    assert seen == {cluster.head_node.node_id, second.node_id, third.node_id}


def test_custom_resource_routes_work_and_infeasible_waits_for_a_node(cluster):
    ray = cluster.connect()

    @ray.remote(resources={"special": 1})
    def special():
        return node_of()

    ref = special.remote()
    ready, _ = ray.wait([ref], timeout=1.0)
    assert ready == []          # infeasible: no node has "special" yet
    node = cluster.add_node(num_cpus=1, resources={"special": 1})
    assert ray.get(ref, timeout=60) == node.node_id


def test_large_objects_move_between_nodes_in_chunks(cluster):
    cluster.add_node(num_cpus=1, resources={"far": 1})
    ray = cluster.connect()

    @ray.remote(resources={"far": 1})
    def produce():
        return np.arange(3_000_000, dtype=np.int64)   # 24 MB, several chunks

    @ray.remote(resources={"far": 1})
    def consume(array):
        return int(array[-1])

    ref = produce.remote()
    array = ray.get(ref, timeout=60)
    assert array[-1] == 2_999_999 and not array.flags.writeable
    local = ray.put(np.ones(2_000_000))
    assert ray.get(consume.remote(local), timeout=60) == 1
    # Several readers of one remote object share one transfer and all succeed.
    again = produce.remote()
    results = ray.get([consume.remote(again) for _ in range(3)], timeout=60)
    assert results == [2_999_999] * 3


def test_spread_and_node_affinity(cluster):
    second = cluster.add_node(num_cpus=1)
    ray = cluster.connect()
    from meshray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote
    def where():
        return node_of()

    pinned = where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        second.node_id, soft=False)).remote()
    assert ray.get(pinned, timeout=60) == second.node_id
    spread = {ray.get(where.options(scheduling_strategy="SPREAD").remote(), timeout=60)
              for _ in range(4)}
    assert spread == {cluster.head_node.node_id, second.node_id}
    ghost = where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        "ab" * 16, soft=False)).remote()
    with pytest.raises(ray.exceptions.TaskUnschedulableError):
        ray.get(ghost, timeout=30)
    soft = where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        "ab" * 16, soft=True)).remote()
    assert ray.get(soft, timeout=30) in {cluster.head_node.node_id, second.node_id}


def test_actor_on_another_node_is_called_directly(cluster):
    remote_node = cluster.add_node(num_cpus=2, resources={"far": 2})
    ray = cluster.connect()

    @ray.remote(resources={"far": 1})
    class Counter:
        def __init__(self):
            self.n = 0

        def incr(self):
            self.n += 1
            return self.n, node_of()

    counter = Counter.remote()
    results = ray.get([counter.incr.remote() for _ in range(20)], timeout=60)
    assert [r[0] for r in results] == list(range(1, 21))
    assert {r[1] for r in results} == {remote_node.node_id}
    named = Counter.options(name="far-counter").remote()
    assert ray.get(ray.get_actor("far-counter").incr.remote(), timeout=60)[0] == 1
    ray.kill(named)
    with pytest.raises(ray.exceptions.ActorDiedError):
        ray.get(named.incr.remote(), timeout=30)


def test_node_death_retries_running_tasks_elsewhere(cluster, tmp_path):
    victim = cluster.add_node(num_cpus=1, resources={"victim": 1})
    survivor = cluster.add_node(num_cpus=1, resources={"victim": 1})
    ray = cluster.connect()

    @ray.remote(resources={"victim": 1}, max_retries=2)
    def slow(path):
        open(os.path.join(path, node_of()), "w").write("started")
        time.sleep(3)
        return node_of()

    refs = [slow.remote(str(tmp_path)) for _ in range(2)]
    wait_for(lambda: victim.node_id in os.listdir(tmp_path), message="a task runs on the victim")
    cluster.remove_node(victim, allow_graceful=False)
    assert set(ray.get(refs, timeout=90)) == {survivor.node_id}
    wait_for(lambda: victim.node_id not in {n["NodeID"] for n in ray.nodes() if n["Alive"]},
             message="dead node leaves the view")
    assert ray.cluster_resources()["victim"] == 1.0
    assert any(not n["Alive"] for n in ray.nodes())  # still listed, as dead


def test_node_death_without_retries_is_an_error(cluster, tmp_path):
    victim = cluster.add_node(num_cpus=1, resources={"victim": 1})
    ray = cluster.connect()

    @ray.remote(resources={"victim": 1}, max_retries=0)
    def slow(path):
        open(path, "w").write("started")
        time.sleep(30)

    marker = tmp_path / "started"
    ref = slow.remote(str(marker))
    wait_for(marker.exists, message="task started")
    cluster.remove_node(victim, allow_graceful=False)
    with pytest.raises(ray.exceptions.WorkerCrashedError):
        ray.get(ref, timeout=60)


def test_actor_restarts_on_another_node_when_its_node_dies(cluster):
    first = cluster.add_node(num_cpus=1, resources={"host": 1})
    second = cluster.add_node(num_cpus=1, resources={"host": 1})
    ray = cluster.connect()

    @ray.remote(resources={"host": 1}, max_restarts=1, max_task_retries=-1)
    class Service:
        def where(self):
            return node_of()

    service = Service.remote()
    home = ray.get(service.where.remote(), timeout=60)
    victim = first if home == first.node_id else second
    other = second if victim is first else first
    cluster.remove_node(victim, allow_graceful=False)
    assert ray.get(service.where.remote(), timeout=90) == other.node_id


@pytest.mark.parametrize("when", ["after its death is seen", "as its node dies"])
def test_lost_object_is_rebuilt_from_lineage(cluster, tmp_path, when):
    # Submitted as its node dies, the reader is first sent there, then run
    # again: it must not take the only "maker" before the rebuild of its
    # argument does (which needs it), or it waits for that argument for ever.
    victim = cluster.add_node(num_cpus=1, resources={"maker": 1})
    backup = cluster.add_node(num_cpus=1, resources={"maker": 1})
    ray = cluster.connect()
    runs = tmp_path / "runs"

    @ray.remote(resources={"maker": 1}, max_retries=2, num_returns=2)
    def make(seed, log):
        with open(log, "a") as handle:
            handle.write(node_of() + "\n")
        return np.full(500_000, seed), node_of()

    @ray.remote(resources={"maker": 1})
    def first_item(x):
        return int(x[0])

    array_ref, where_ref = make.remote(7, str(runs))
    holder = ray.get(where_ref, timeout=60)     # the array itself stays on its node
    node = victim if holder == victim.node_id else backup
    survivor = backup if node is victim else victim
    cluster.remove_node(node, allow_graceful=False)
    if when == "after its death is seen":
        wait_for(lambda: node.node_id not in {n["NodeID"] for n in ray.nodes() if n["Alive"]},
                 timeout=30, message="node gone from the cluster")
    assert ray.get(first_item.remote(array_ref), timeout=90) == 7
    assert runs.read_text().split() == [node.node_id, survivor.node_id]  # re-ran once


def test_put_object_on_dead_node_cannot_be_rebuilt(cluster):
    victim = cluster.add_node(num_cpus=1, resources={"maker": 1})
    ray = cluster.connect()

    @ray.remote(resources={"maker": 1})
    def make_put():
        return [ray.put(np.ones(300_000))]

    inner = ray.get(make_put.remote(), timeout=60)[0]
    cluster.remove_node(victim, allow_graceful=False)
    with pytest.raises(ray.exceptions.ObjectLostError):
        ray.get(inner, timeout=60)


def test_first_node_is_not_special(cluster):
    second = cluster.add_node(num_cpus=1)
    third = cluster.add_node(num_cpus=1)
    # The driver attaches to the *second* node, then the first one dies.
    import meshray
    os.environ["MESHRAY_PREFERRED_NODE"] = second.node_id
    try:
        ray = cluster.connect()
    finally:
        del os.environ["MESHRAY_PREFERRED_NODE"]
    assert ray.get_runtime_context().get_node_id() == second.node_id
    cluster.remove_node(cluster.head_node, allow_graceful=False)

    @ray.remote
    def where(delay):
        time.sleep(delay)
        return node_of()

    assert set(ray.get([where.remote(0.5) for _ in range(4)], timeout=90)) == {
        second.node_id, third.node_id}
    assert meshray.cluster_resources()["CPU"] == 2.0 or wait_for(
        lambda: meshray.cluster_resources()["CPU"] == 2.0, timeout=30)
