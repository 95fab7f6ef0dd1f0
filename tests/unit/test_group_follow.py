"""Which placement-group records a node follows (node/group_follow.py)."""
from __future__ import annotations

import random

from meshray.common import ids
from meshray.common.id_types import PlacementGroupID
from meshray.coordination import keyspace
from meshray.node import avail_slice
from meshray.node.group_follow import followers, plan, slice_members
from meshray.placement import policy


def _hex(rng: random.Random) -> str:
    return rng.getrandbits(128).to_bytes(16, "big").hex()


def test_a_group_id_begins_with_its_creating_nodes_prefix():
    node = bytes.fromhex("ab12cd34ef56" + "00" * 10)
    pg = PlacementGroupID.for_node(node)
    assert pg.binary()[:ids.NODE_PREFIX_LEN] == node[:ids.NODE_PREFIX_LEN]
    assert PlacementGroupID.for_node(node) != pg          # the rest is random
    assert len(PlacementGroupID.for_node(b"").binary()) == PlacementGroupID.SIZE
    # so at any slice width the creating node's slice holds its groups
    for bits in range(0, avail_slice.ID_BITS + 1):
        assert avail_slice.in_slice(pg.hex(), node.hex(), bits)


def test_the_groups_range_of_a_slice_holds_exactly_the_groups_of_the_slice():
    keys = keyspace.Keyspace()
    rng = random.Random(5)
    node = _hex(rng)
    for bits in (1, 3, 7):
        start, end = keys.pgs_range(*avail_slice.slice_bounds(node, bits))
        for _ in range(300):
            pg = _hex(rng)
            key = keys.pg(pg)
            assert (start <= key < end) == avail_slice.in_slice(pg, node, bits), (pg, bits)


def test_followers_of_a_group_are_the_live_members_of_its_slice():
    rng = random.Random(7)
    live = [_hex(rng) for _ in range(200)]
    bits = 2
    members = slice_members(live, bits)
    assert sorted(n for group in members.values() for n in group) == sorted(live)
    for _ in range(50):
        pg = _hex(rng)
        got = followers(pg, members, bits, live)
        assert got and all(avail_slice.in_slice(pg, node, bits) for node in got)
        assert set(got) == {n for n in live if avail_slice.in_slice(pg, n, bits)}
        # so every follower computes the same responsible node
        assert policy.responsible_node(pg, got) in got
    # unsliced, or a slice with no live member: everyone
    assert followers(_hex(rng), slice_members(live, 0), 0, live) == live
    lonely = [n for n in live if not n.startswith(("0", "1", "2", "3"))]
    assert followers("00" * 16, slice_members(lonely, bits), bits, lonely) == lonely
    # an id from etcd that is not hex is in no slice
    assert followers("zz" * 16, members, bits, live) == live


def test_plan_watches_by_key_only_what_is_needed_and_not_in_the_slice():
    covered = {"a1", "a2"}.__contains__
    start, stop = plan(wanted={"a1", "b1", "b2"}, following={"b2", "b3", "a2"},
                       covered=covered)
    assert start == ["b1"]             # a1 is in the slice: no watch of its own
    assert stop == ["a2", "b3"]        # no longer needed, or now in the slice
    assert plan(wanted=(), following=(), covered=covered) == ([], [])
