"""Whose availability a node follows (node/avail_slice.py): pure values."""
from __future__ import annotations

import random

import pytest

from meshray.coordination import keyspace
from meshray.node import avail_slice
from meshray.node.avail_slice import in_slice, slice_bits, slice_bounds


def test_small_clusters_follow_every_member():
    for members in (0, 1, 10, 64, 127):
        assert slice_bits(members) == 0
    assert slice_bounds("ab" * 16, 0) is None
    assert in_slice("00" * 16, "ff" * 16, 0)


def test_the_slice_halves_each_time_the_cluster_doubles_past_a_step():
    assert [slice_bits(m) for m in (128, 255, 256, 511, 512, 1000, 1024)] == [1, 1, 2, 2, 3, 3, 4]
    # between SLICE_TARGET and twice it followed, whatever the size
    for members in (128, 300, 1000, 5000, 100_000):
        followed = members / 2 ** slice_bits(members)
        assert avail_slice.SLICE_TARGET <= followed < 2 * avail_slice.SLICE_TARGET


def test_the_slice_widens_only_once_the_cluster_shrank_a_quarter_below_its_step():
    assert slice_bits(127, current=1) == 1        # hovering at the step: no re-watch
    assert slice_bits(96, current=1) == 1
    assert slice_bits(95, current=1) == 0
    assert slice_bits(380, current=3) == 2        # 512 * 0.75 = 384
    assert slice_bits(400, current=3) == 3
    assert slice_bits(2000, current=1) == 4       # narrowing is at once


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="members=-1"):
        slice_bits(-1)
    with pytest.raises(ValueError, match="bits=33"):
        slice_bounds("ab" * 16, 33)
    with pytest.raises(ValueError, match="node_hex='ab'"):
        slice_bounds("ab", 3)


def test_bounds_are_the_aligned_block_of_the_nodes_top_bits():
    assert slice_bounds("ab12cd34" + "00" * 12, 3) == ("a0000000", "c0000000")
    assert slice_bounds("ffffffff" + "00" * 12, 3) == ("e0000000", None)   # the last block
    assert slice_bounds("0000000a" + "00" * 12, 32) == ("0000000a", "0000000b")


def test_a_node_is_in_its_own_slice_and_the_slice_is_its_key_range():
    rng = random.Random(3)
    keys = keyspace.Keyspace()
    ids = [rng.randbytes(16).hex() for _ in range(400)]
    for bits in (1, 2, 3, 5):
        for own in ids[:20]:
            assert in_slice(own, own, bits)
            start, end = keys.avail_range(*slice_bounds(own, bits))
            members = {peer for peer in ids if in_slice(peer, own, bits)}
            # exactly the availability keys in [start, end) are the slice
            assert members == {peer for peer in ids if start <= keys.avail(peer) < end}
    # everyone follows a slice, and every node is followed by its slice
    counts = [sum(in_slice(peer, own, 2) for own in ids) for peer in ids]
    assert min(counts) > 50 and max(counts) < 160      # ~100 each: ids are random


def test_an_id_from_etcd_that_is_not_hex_is_in_no_slice():
    assert not in_slice("zz" * 16, "ab" * 16, 2)
    assert not in_slice("ab", "ab" * 16, 2)


def test_avail_range_refuses_what_is_not_lowercase_hex():
    keys = keyspace.Keyspace()
    with pytest.raises(ValueError, match="low='A0'"):
        keys.avail_range("A0", None)
    start, end = keys.avail_range("a0", None)
    assert start == keys.avail_prefix() + "a0" and end > keys.avail("ff" * 16)
