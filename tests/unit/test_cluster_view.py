"""This node's picture of its peers (node/cluster_view.py), fed plain values."""
from __future__ import annotations

import random
from types import SimpleNamespace

from meshray.node.cluster_view import ClusterView
from meshray.scheduler import policy
from meshray.scheduler.resources import ResourceSet

ME, A, B = "aa" * 14, "bb" * 14, "cc" * 14


def _record(cpus=2.0, labels=None):
    return {"Resources": {"CPU": cpus}, "Labels": labels or {}, "Address": "x"}


def _local(free=0.0):
    return policy.NodeView(ME, ResourceSet.from_dict({"CPU": 2.0}),
                           ResourceSet.from_dict({"CPU": free}), True, {})


def _view():
    view = ClusterView(ME)
    view.update({ME: _record(), A: _record(), B: _record(labels={"zone": "b"})},
                {ME: {"CPU": 0.0}, A: {"CPU": 2.0}, B: {"CPU": 0.0}}, now=10.0)
    return view


def _room(view, node, now=20.0, backlog_for=None, waiting_here=float("inf")):
    views = view.node_views(_local(), now, backlog_for, local_waiting_per_cpu=waiting_here)
    return views[node].available.to_dict().get("CPU", 0.0)


def test_room_is_the_etcd_value_less_the_offers_out():
    view = _view()
    assert _room(view, A) == 2.0
    view.offer(A, b"t1", {"CPU": 1.0})
    assert _room(view, A) == 1.0
    view.offer(A, b"t2", {"CPU": 1.0})
    view.offer(A, b"t3", {"CPU": 1.0})
    assert _room(view, A) == 0.0                     # never negative
    view.answered(A, b"t1")
    view.answered(A, b"t2")
    view.answered(A, b"unknown")                     # an answer for a forgotten offer
    assert _room(view, A) == 1.0


def test_a_batch_load_newer_than_the_etcd_value_wins_and_an_older_one_does_not():
    view = _view()
    view.note_load(B, SimpleNamespace(available={"CPU": 2.0}, backlog_room=0, queued=0), now=15.0)
    assert _room(view, B) == 2.0                     # received after etcd last changed
    view.update(view.nodes, {**view.avail, B: {"CPU": 1.0}}, now=16.0)
    assert _room(view, B, now=30.0) == 1.0           # etcd changed since: it is newer


def test_backlog_shows_room_only_when_asked_for_a_request():
    view = _view()
    view.note_load(B, SimpleNamespace(available={"CPU": 0.0}, backlog_room=1, queued=0), now=15.0)
    assert _room(view, B) == 0.0
    assert _room(view, B, backlog_for={"CPU": 1.0}) >= 1.0
    view.offer(B, b"t1", {"CPU": 1.0})               # the one backlog place is taken
    assert _room(view, B, backlog_for={"CPU": 1.0}) == 0.0


def test_backlog_is_shown_only_where_the_task_would_start_sooner_than_here():
    """B (2 CPUs) has one task queued: one more would wait (1 + 1) / 2 = 1
    queue place per CPU there, so it goes only while more than that waits
    here per CPU."""
    view = _view()
    view.note_load(B, SimpleNamespace(available={"CPU": 0.0}, backlog_room=3, queued=1),
                   now=15.0)
    assert _room(view, B, backlog_for={"CPU": 1.0}, waiting_here=1.5) >= 1.0
    assert _room(view, B, backlog_for={"CPU": 1.0}, waiting_here=1.0) == 0.0   # a tie stays
    view.offer(B, b"t1", {"CPU": 1.0})               # an unanswered offer queues there too
    assert _room(view, B, backlog_for={"CPU": 1.0}, waiting_here=1.5) == 0.0
    assert _room(view, B, backlog_for={"CPU": 1.0}, waiting_here=2.0) >= 1.0


def test_the_local_view_is_ours_and_labels_come_from_the_records():
    views = _view().node_views(_local(free=1.5), 20.0)
    assert views[ME].available.to_dict() == {"CPU": 1.5}
    assert views[B].labels == {"zone": "b"}


def test_a_death_is_news_once_and_forgets_the_peers_offers_and_load():
    view = _view()
    view.offer(A, b"t1", {"CPU": 1.0})
    view.note_load(A, SimpleNamespace(available={"CPU": 2.0}, backlog_room=0, queued=0), now=15.0)
    assert view.died(A) is True and view.died(A) is False
    assert A not in view.offered and A not in view.loads and not view.is_alive_member(A)
    assert view.live_members() == [ME, B]


def test_nodes_that_leave_the_view_are_reported_and_a_returning_one_is_alive_again():
    view = _view()
    gone = view.update({ME: _record(), B: _record()}, {}, now=11.0)
    assert gone == [A]
    view.died(A)
    view.update({ME: _record(), A: _record(), B: _record()}, {}, now=12.0)
    assert view.is_alive_member(A)


def test_the_owner_of_an_object_is_the_member_its_id_starts_with():
    view = _view()
    assert view.node_for_prefix(bytes.fromhex(A)[:6] + b"rest") == A
    assert view.node_for_prefix(b"\x99" * 10) is None


def test_spread_counts_up():
    view = _view()
    assert [view.next_spread() for _ in range(3)] == [1, 2, 3]


def test_an_incremental_update_examines_only_the_changed_ids():
    view = _view()
    nodes = {ME: _record(), B: view.nodes[B]}     # A left; B's record unchanged
    avail = {ME: {"CPU": 0.0}, B: {"CPU": 2.0}}
    # Told only about A: A is reported gone, B's new availability is not noticed.
    assert view.update(nodes, avail, now=11.0, changed_nodes={A}, changed_avail={A}) == [A]
    assert view.avail_changed_at[B] == 10.0
    # Told about B's availability: its change time moves on.
    view.update(nodes, {**avail, B: {"CPU": 1.0}}, now=12.0, changed_nodes=set(),
                changed_avail={B})
    assert view.avail_changed_at[B] == 12.0


def test_an_incremental_update_brings_back_only_a_reregistered_dead_node():
    view = _view()
    view.died(A)
    view.died(B)
    # Both still have records; only A's changed (it registered again).
    view.update(dict(view.nodes), dict(view.avail), now=11.0, changed_nodes={A}, changed_avail=set())
    assert view.is_alive_member(A)
    assert not view.is_alive_member(B)


def test_sampled_peers_are_k_members_plus_the_included_ones_or_none_when_few():
    view = _view()
    assert view.sample_peers(2) is None                 # two peers: look at all
    many = {ME: _record(), **{f"{i:02x}" * 16: _record() for i in range(20)}}
    view = ClusterView(ME, rng=random.Random(7))
    view.update(many, {}, now=1.0)
    picked = view.sample_peers(4, include=["05" * 16, "zz", ME])
    assert len(picked) in (4, 5) and len(set(picked)) == len(picked)
    assert "05" * 16 in picked and ME not in picked and "zz" not in picked
    assert set(picked) <= set(many)
    # node_views limited to the sample holds just those peers and us.
    views = view.node_views(_local(), 2.0, only=picked)
    assert set(views) == set(picked) | {ME}


def _sliced_view(bits=1):
    """A view following the availability of the peers that share our top bit."""
    inside = [f"{i:02x}" + "00" * 15 for i in range(0x10, 0x20)]     # top bit 0, as ours
    outside = [f"{i:02x}" + "00" * 15 for i in range(0x90, 0xa0)]    # top bit 1
    me = "01" + "00" * 15
    nodes = {n: _record(4.0) for n in (me, *inside, *outside)}
    view = ClusterView(me, rng=random.Random(1))
    view.update(nodes, {n: {"CPU": 0.0} for n in inside}, now=1.0, avail_bits=bits)
    local = policy.NodeView(me, ResourceSet.from_dict({"CPU": 4.0}),
                            ResourceSet.from_dict({"CPU": 0.0}), True, {})
    return view, local, inside, outside


def test_a_sliced_view_samples_only_the_peers_whose_availability_it_follows():
    view, _local_view, inside, outside = _sliced_view()
    for _ in range(20):
        picked = view.sample_peers(4, include=[outside[0]])
        assert set(picked) - {outside[0]} <= set(inside) and outside[0] in picked


def test_a_peer_outside_the_slice_shows_free_until_its_load_says_otherwise():
    view, local, inside, outside = _sliced_view()
    rooms = {n: v.available.to_dict().get("CPU", 0.0)
             for n, v in view.node_views(local, 2.0).items()}
    assert all(rooms[n] == 0.0 for n in inside)          # etcd says full
    assert all(rooms[n] == 4.0 for n in outside)         # unknown: its whole total
    view.offer(outside[0], b"t", {"CPU": 1.0})
    view.note_load(outside[1], SimpleNamespace(available={"CPU": 0.0}, backlog_room=0, queued=0), now=2.0)
    views = view.node_views(local, 3.0)
    assert views[outside[0]].available.to_dict()["CPU"] == 3.0   # less the offer out
    assert views[outside[1]].available.to_dict().get("CPU", 0.0) == 0.0   # its load, fresh
    later = view.node_views(local, 3.0 + 5.1)
    assert later[outside[1]].available.to_dict()["CPU"] == 4.0   # stale: free again
    # a full cluster we know of and one we do not: the policy offers to the latter
    decision = policy.decide(policy.SchedulingRequest(ResourceSet.from_dict({"CPU": 1.0}),
                                                      "DEFAULT", {}), views, view.node_hex, 0)
    assert decision.kind == "spill" and set(decision.candidates) <= set(outside)


def test_following_everyone_again_shows_every_peer_by_its_etcd_value():
    view, local, inside, outside = _sliced_view()
    view.update(view.nodes, {n: {"CPU": 1.0} for n in view.nodes}, now=4.0, avail_bits=0)
    rooms = {n: v.available.to_dict().get("CPU", 0.0)
             for n, v in view.node_views(local, 5.0).items() if n != view.node_hex}
    assert set(rooms.values()) == {1.0}
    picked = view.sample_peers(30)                       # 32 peers: a sample of everyone
    assert len(picked) == 30 and set(picked) & set(outside) and set(picked) & set(inside)
