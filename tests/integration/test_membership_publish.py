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
