"""A lease that lapses locally while etcd is unreachable is not a lost lease.

Membership keeps its lease with lapse_is_loss=False: a node cut off from etcd
for longer than its TTL fences itself (expires_at in the past) but only gives
up the lease when etcd says it is gone. Here etcd itself is down for longer
than the TTL and comes back on its data dir, reviving the lease.
"""
from __future__ import annotations

import threading
import time
import uuid

from meshray.coordination.client import Coordinator, LeaseKeeper
from meshray.coordination.embedded import EtcdCluster
from tests.helpers import wait_for


def test_a_lapsed_lease_that_etcd_kept_is_kept(tmp_path):
    cluster = EtcdCluster(tmp_path / "etcd", size=1)
    coord = Coordinator(cluster.endpoints, timeout=2.0)
    lost = threading.Event()
    keeper = None
    key = f"/test/{uuid.uuid4().hex[:8]}/member"
    try:
        keeper = LeaseKeeper(coord, ttl=2, on_lost=lambda _id: lost.set(), lapse_is_loss=False)
        coord.put(key, b"x", lease=keeper.lease_id)
        cluster.stop_member(0)
        wait_for(lambda: keeper.expires_at < time.monotonic(), timeout=15,
                 message="the lease lapses locally while etcd is down")
        assert not lost.is_set()
        cluster.restart_member(0)
        wait_for(lambda: keeper.expires_at > time.monotonic(), timeout=30,
                 message="a refresh succeeds once etcd is back")
        assert not lost.is_set() and not keeper.lost
        assert coord.get(key)[0] == b"x"           # the same lease still holds the key
        coord.revoke_lease(keeper.lease_id)
        assert lost.wait(10)                      # and a real loss is still reported
    finally:
        if keeper is not None:
            keeper.stop(revoke=False)
        coord.close()
        cluster.stop()
