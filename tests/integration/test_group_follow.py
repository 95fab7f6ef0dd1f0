"""A node follows a placement group outside its slice by the group's key
(node/group_follow.py), against a real etcd."""
from __future__ import annotations

import threading

from meshray.coordination.client import Coordinator
from meshray.coordination.keyspace import Keyspace
from meshray.coordination.mirror import PrefixMirror
from meshray.node.group_follow import InterestViews
from tests.helpers import wait_for


def test_a_needed_group_outside_the_slice_is_followed_by_its_key_while_needed(etcd):
    keys = Keyspace()
    me = "80" + "00" * 15
    inside, outside = "c0" + "11" * 15, "40" + "22" * 15
    neighbour = "40" + "22" * 14 + "23"          # a key beside it, never delivered
    seen: list = []
    lock = threading.Lock()

    def on_change(changes):
        with lock:
            seen.extend((c.key, c.new.value if c.new else None) for c in changes)

    forgotten: list = []
    with Coordinator([etcd.endpoint], timeout=5.0) as coord:
        coord.put(keys.pg(outside), b"v1")
        coord.put(keys.pg(neighbour), b"other")
        views = InterestViews(keys, me, on_change=on_change, forget=forgotten.append)
        views.bits, views.slice_listed = 1, True
        assert views.follows(inside) and not views.follows(outside)
        assert not views.want_one(inside)         # the slice holds it: no watch
        assert views.want_one(outside) and not views.want_one(outside)
        views.reconcile(coord, start_timeout=5.0)
        assert views.following() == [outside] and views.follows(outside)
        assert seen == [(keys.pg(outside), b"v1")]          # listed
        coord.put(keys.pg(neighbour), b"other again")
        coord.put(keys.pg(outside), b"v2")
        wait_for(lambda: (keys.pg(outside), b"v2") in seen, timeout=10,
                 message="a change of the followed group arrives")
        coord.delete(keys.pg(outside))
        wait_for(lambda: (keys.pg(outside), None) in seen, timeout=10,
                 message="its deletion arrives")
        assert all(key == keys.pg(outside) for key, _ in seen)

        assert views.want({inside})                # no longer needed
        views.reconcile(coord, start_timeout=5.0)
        assert views.following() == [] and forgotten == [outside]
        assert not views.follows(outside)
        with lock:
            count = len(seen)
        # A control watch on the same stream: events come in revision order,
        # so once it has v3, a watch still open would have had it too.
        control = PrefixMirror(coord, keys.pg(outside), end=keys.pg(outside) + "\0").start(5.0)
        coord.put(keys.pg(outside), b"v3")
        wait_for(lambda: (control.get(keys.pg(outside)) or (None,))[0] == b"v3", timeout=10,
                 message="the control watch has the write")
        control.stop()
        assert len(seen) == count
        views.stop()
        coord.delete(keys.pg(outside))
        coord.delete(keys.pg(neighbour))
