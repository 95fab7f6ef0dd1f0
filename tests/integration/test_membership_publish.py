"""A node publishes its availability when its ledger changes (no polling),
and every peer's view follows: real daemons, real etcd."""
from __future__ import annotations

import sys

import cloudpickle

from tests.helpers import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_a_peers_availability_change_reaches_the_other_nodes_view(cluster):
    cluster.add_node(num_cpus=1, resources={"gadget": 2})
    ray = cluster.connect()

    @ray.remote(num_cpus=0, resources={"gadget": 1})
    class Holder:
        def ping(self):
            return "held"

    # The driver's node has no gadget: what it reports for "gadget" is the
    # peer's availability as published in etcd and seen through its watch.
    wait_for(lambda: ray.available_resources().get("gadget") == 2.0, message="initial availability")
    holders = [Holder.remote() for _ in range(2)]
    assert ray.get([h.ping.remote() for h in holders], timeout=60) == ["held", "held"]
    wait_for(lambda: ray.available_resources().get("gadget", 0.0) == 0.0,
             message="the peer published that both gadgets are taken")
    ray.kill(holders[0])
    wait_for(lambda: ray.available_resources().get("gadget") == 1.0,
             message="the peer published that one gadget is free again")


def test_with_sliced_availability_totals_stay_exact_and_peers_outside_get_work(monkeypatch):
    """A node of a big cluster follows the availability of a slice of the
    members only (node/avail_slice.py). A slice target of 1 makes three
    members big: each follows the half whose ids share its top bit. The
    driver's node (top bit 0) follows `inside` but not `outside` (top bit 1);
    the cluster's available resources are still exact (read from etcd), and
    work that only `outside` can take still goes there."""
    from meshray.testing import Cluster

    monkeypatch.setenv("MESHRAY_AVAIL_SLICE_TARGET", "1")
    head_id, inside_id, outside_id = ("0" + "1" * 31), ("4" + "1" * 31), ("c" + "1" * 31)
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "node_id": head_id})
    try:
        cluster.add_node(num_cpus=1, resources={"gadget": 1}, node_id=inside_id)
        cluster.add_node(num_cpus=1, resources={"gadget": 2, "widget": 1}, node_id=outside_id)
        ray = cluster.connect()
        wait_for(lambda: ray.available_resources().get("gadget") == 3.0,
                 message="every member's gadgets counted, followed or not")

        @ray.remote(num_cpus=0, resources={"widget": 1})
        def where():
            return ray.get_runtime_context().get_node_id()

        # Only `outside` has a widget, and the driver's node has no figure for it.
        assert ray.get(where.remote(), timeout=60) == outside_id

        @ray.remote(num_cpus=0, resources={"gadget": 1})
        class Holder:
            def node(self):
                return ray.get_runtime_context().get_node_id()

        holders = [Holder.remote() for _ in range(3)]
        assert sorted(ray.get([h.node.remote() for h in holders], timeout=60)) == \
            sorted([inside_id, outside_id, outside_id])
        wait_for(lambda: ray.available_resources().get("gadget", 0.0) == 0.0,
                 message="all three gadgets taken")
        ray.kill(holders[0])
        wait_for(lambda: ray.available_resources().get("gadget") == 1.0,
                 message="one gadget free again")
    finally:
        cluster.shutdown()
