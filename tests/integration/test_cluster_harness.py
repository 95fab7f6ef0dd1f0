"""The cluster engine every harness is built on (meshray/testing/engine.py):
its faults do what they say to real etcd members and daemons, and its
namespaces are real and go away with it."""
from __future__ import annotations

import subprocess
import sys

import cloudpickle
import psutil
import pytest

from meshray.testing import Cluster
from meshray.testing.netns import netns_available
from tests.helpers import process_gone, wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.mark.cluster_args(etcd_members=3)
def test_nodes_join_while_the_etcd_leader_is_down_and_the_member_comes_back(cluster):
    engine = cluster.engine
    assert len(engine.etcd.members) == 3
    leader = engine.etcd_leader()
    assert leader is not None
    old_pid = engine.etcd.members[leader].pid
    engine.kill_etcd_member(leader)
    assert process_gone(old_pid)
    # Two members are a quorum: a node still joins and is listed.
    late = cluster.add_node(num_cpus=1)
    assert late.node_id in cluster._registered()
    engine.restart_etcd_member(leader)
    member = engine.etcd.members[leader]
    assert member.is_running() and member.pid != old_pid and member.healthy(2.0)
    assert engine.etcd_leader() is not None
    cluster.wait_for_nodes()


@pytest.mark.cluster_args(lease_ttl=2.0)
def test_a_paused_node_is_frozen_loses_its_lease_and_rejoins_when_resumed(cluster):
    node = cluster.add_node(num_cpus=1)
    node.pause()
    wait_for(lambda: psutil.Process(node.pid).status() == psutil.STATUS_STOPPED, timeout=10,
             message="the daemon stops")   # SIGSTOP lands asynchronously
    wait_for(lambda: node.node_id not in cluster._registered(), timeout=30,
             message="the frozen node's lease expires")
    # Waiting for it now times out, and the error quotes the missing node's log
    # (its session dir goes with the test, so this is all a failure keeps).
    with pytest.raises(TimeoutError) as failure:
        cluster.engine.wait_for_nodes({node.node_id}, exact=False, timeout=0.5)
    text = str(failure.value)
    assert f"--- node {node.node_id[:12]} pid {node.pid}" in text
    assert f"registered node {node.node_id}" in text      # the line its log has from joining
    assert f"--- node {cluster.head_node.node_id[:12]}" not in text   # registered: not quoted
    node.resume()
    wait_for(lambda: node.node_id in cluster._registered(), timeout=30,
             message="the resumed node registers again")


def test_a_restarted_node_is_a_fresh_daemon_in_the_old_ones_place(cluster):
    node = cluster.add_node(num_cpus=1, resources={"spot": 1})
    engine = cluster.engine
    fresh = engine.restart_node(node._process)
    assert not node.alive() and fresh.alive() and fresh.node_id != node.node_id
    engine.wait_for_nodes({cluster.head_node.node_id, fresh.node_id})
    assert engine.registered()[fresh.node_id]["Resources"]["spot"] == 1


def _lab_leftovers(tag: str) -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           timeout=15).stdout.split()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                           timeout=15).stdout
    return [n for n in names if n.startswith(f"mr{tag}")] + \
        [line for line in links.splitlines() if f"mr{tag}" in line]


def test_netns_nodes_live_on_their_own_addresses_and_the_lab_goes_with_the_cluster():
    reason = netns_available()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable here: {reason}")
    import ipaddress
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1}, network="netns")
    tag = cluster.engine.lab.tag
    try:
        subnet = cluster.engine.lab.subnet
        other = cluster.add_node(num_cpus=1, resources={"far": 1})
        hosts = [n.address.rsplit(":", 1)[0] for n in (cluster.head_node, other)]
        assert len(set(hosts)) == 2
        assert all(ipaddress.ip_address(h) in subnet for h in hosts), (hosts, subnet)
        ray = cluster.connect()

        @ray.remote(num_cpus=1, resources={"far": 1})
        def where():
            return ray.get_runtime_context().get_node_id()

        assert ray.get(where.remote(), timeout=60) == other.node_id
    finally:
        cluster.shutdown()
    assert _lab_leftovers(tag) == []


def test_bad_engine_arguments_are_refused_by_name():
    from meshray.testing.engine import ClusterEngine
    for kwargs, words in (({"network": "wifi"}, ("network", "'wifi'", "loopback")),
                          ({"etcd_members": 0}, ("etcd_members", "0", ">= 1")),
                          ({"etcd_in_namespaces": True}, ("etcd_in_namespaces", "netns")),
                          ({"lease_ttl": -1}, ("lease_ttl", "-1", "positive")),
                          ({"etcd_endpoints": "127.0.0.1:1", "etcd_members": 3},
                           ("etcd_endpoints", "etcd_members"))):
        with pytest.raises(ValueError) as failure:
            ClusterEngine(**kwargs)
        for word in words:
            assert word in str(failure.value), (kwargs, str(failure.value))
