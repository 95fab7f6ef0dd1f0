"""Placement groups across several real daemons: spreading, node death, late capacity."""
from __future__ import annotations

import importlib

import sys

import cloudpickle

from tests.helpers import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _pg_api():
    api = importlib.import_module("meshray.util.placement_group")
    from meshray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    return api, PlacementGroupSchedulingStrategy


def test_strict_spread_across_nodes_and_rescheduling_after_node_death(cluster):
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray = cluster.connect()
    api, Strategy = _pg_api()
    pg = api.placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    assert pg.wait(30)
    placed = api.placement_group_table(pg)["bundles_to_node_id"]
    assert len(set(placed.values())) == 2

    @ray.remote(num_cpus=1)
    def where():
        return ray.get_runtime_context().get_node_id()

    assert ray.get(where.options(scheduling_strategy=Strategy(pg, 1)).remote(),
                   timeout=30) == placed[1]
    victim_id = next(n for n in placed.values() if n != cluster.head_node.node_id)
    victim = next(n for n in nodes if n.node_id == victim_id)
    cluster.remove_node(victim, allow_graceful=False)

    def replaced():
        table = api.placement_group_table(pg)
        return (table["state"] == "CREATED" and victim_id not in
                table["bundles_to_node_id"].values())
    wait_for(replaced, timeout=60, message="bundle re-reserved on a live node")
    again = api.placement_group_table(pg)["bundles_to_node_id"]
    assert len(set(again.values())) == 2
    index = next(i for i, n in again.items() if n != placed.get(i))
    assert ray.get(where.options(scheduling_strategy=Strategy(pg, index)).remote(),
                   timeout=60) == again[index]


def test_group_placed_when_capacity_appears(cluster):
    cluster.connect()
    api, _ = _pg_api()
    pg = api.placement_group([{"CPU": 2}])
    assert pg.wait(timeout_seconds=1) is False
    cluster.add_node(num_cpus=2)
    assert pg.wait(timeout_seconds=60)


_EXITING_DRIVER = """
import sys
import meshray
from meshray.util.placement_group import placement_group, remove_placement_group
meshray.init(address=sys.argv[1], _token=sys.argv[2] or None, namespace="exiting")
doomed = placement_group([{"CPU": 0.01}], lifetime="detached")
for i in range(20):
    placement_group([{"CPU": 0.01}], lifetime="detached")
remove_placement_group(doomed)
print(doomed.id.hex())
# No wait(), no shutdown(): the creations and the removal were sent without
# waiting for their replies, and must still take effect.
"""


def test_requests_sent_without_waiting_survive_the_driver_exiting(tmp_path, cluster):
    import subprocess
    script = tmp_path / "driver.py"
    script.write_text(_EXITING_DRIVER)
    done = subprocess.run([sys.executable, str(script), cluster.address, cluster.token or ""],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    doomed = done.stdout.strip().splitlines()[-1]
    cluster.connect()
    api, _ = _pg_api()
    table = api.placement_group_table()
    detached = {pg: t for pg, t in table.items() if t["namespace"] == "exiting"}
    assert len(detached) == 21
    assert detached[doomed]["state"] == "REMOVED"
    assert sum(t["state"] == "CREATED" for t in detached.values()) == 20


def test_with_sliced_groups_work_reaches_every_bundle_from_any_node(monkeypatch):
    """Once a cluster is big, a node follows the group records of its slice
    only, and each other group it needs by key (node/group_follow.py). A
    slice target of 1 makes three members big: each follows the groups whose
    ids share its top bit. A group created on the driver's node (top bit 0)
    spreads a bundle onto `outside` (top bit 1), which does not follow the
    group's slice: it carries out the bundle, routes work submitted there to
    the other bundles, and frees its bundle when the group is removed."""
    from meshray import exceptions
    from meshray.testing import Cluster

    monkeypatch.setenv("MESHRAY_AVAIL_SLICE_TARGET", "1")
    head_id, inside_id, outside_id = ("0" + "1" * 31), ("4" + "1" * 31), ("c" + "1" * 31)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_id": head_id})
    try:
        cluster.add_node(num_cpus=1, node_id=inside_id)
        cluster.add_node(num_cpus=1, node_id=outside_id)
        ray = cluster.connect()
        api, Strategy = _pg_api()
        wait_for(lambda: ray.cluster_resources().get("CPU") == 3.0, message="three nodes")
        pg = api.placement_group([{"CPU": 1}] * 3, strategy="STRICT_SPREAD")
        assert pg.wait(60)
        assert pg.id.hex().startswith(head_id[:12])        # its creating node's prefix
        placed = api.placement_group_table(pg)["bundles_to_node_id"]
        assert sorted(placed.values()) == sorted([head_id, inside_id, outside_id])
        on = {node: index for index, node in placed.items()}

        @ray.remote(num_cpus=1)
        def where():
            return ray.get_runtime_context().get_node_id()

        for index, node in placed.items():
            assert ray.get(where.options(scheduling_strategy=Strategy(pg, index)).remote(),
                           timeout=60) == node

        @ray.remote(num_cpus=0)
        class Relay:
            def node(self):
                return ray.get_runtime_context().get_node_id()

            def run_in(self, index):
                # Submitted on `outside`, for a group outside its slice.
                return ray.get(where.options(scheduling_strategy=Strategy(pg, index)).remote(),
                               timeout=60)

        relay = Relay.options(scheduling_strategy=Strategy(pg, on[outside_id])).remote()
        assert ray.get(relay.node.remote(), timeout=60) == outside_id
        assert ray.get(relay.run_in.remote(on[inside_id]), timeout=90) == inside_id
        assert ray.get(relay.run_in.remote(on[head_id]), timeout=90) == head_id

        api.remove_placement_group(pg)
        wait_for(lambda: ray.available_resources().get("CPU") == 3.0, timeout=60,
                 message="every bundle freed, the one on `outside` too")
        try:
            ray.get(relay.node.remote(), timeout=60)
            raise AssertionError("the actor outlived its removed group")
        except exceptions.RayActorError as exc:
            assert "placement group" in str(exc)
    finally:
        cluster.shutdown()
