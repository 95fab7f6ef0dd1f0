"""Placement-group reservation against a real etcd (EmbeddedEtcd).

Nodes are simulated by their etcd records (node record on a lease, as the
daemon's membership writes it), so these tests exercise exactly the
transactions the daemons run. The race test replays etcd's whole history to
show that no node's reservations ever exceeded its total and that no group
was ever half-reserved, at any revision.
"""
from __future__ import annotations

import importlib

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter

import pytest

from meshray.coordination.client import Coordinator
from meshray.coordination.keyspace import Keyspace, decode_json, encode_json
from meshray.placement import reservation as rsv
from meshray.placement.records import (
    CREATED,
    PENDING,
    REMOVED,
    RESCHEDULING,
    AllocRecord,
    BundleAlloc,
    PlacementGroupID,
    PlacementGroupRecord,
    validate_placement_group_args,
)
from meshray.scheduler.resources import ResourceSet
pg_api = importlib.import_module("meshray.util.placement_group")

# No auto-compaction in the `etcd` fixture: the race test replays history from revision 1.
pytestmark = [pytest.mark.timeout(60), pytest.mark.etcd_args(auto_compaction_retention=0)]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def coord(etcd):
    with Coordinator([etcd.endpoint], timeout=5.0) as client:
        yield client


@pytest.fixture
def keys():
    return Keyspace(f"pgtest-{uuid.uuid4().hex[:10]}")


def node_id(i: int) -> str:
    return f"{i:032x}"


class FakeNode:
    """A node as etcd sees it: its record on its own lease."""

    def __init__(self, coord, keys, index, resources, *, with_lease_id=True, ttl=60):
        self.coord, self.keys, self.id = coord, keys, node_id(index)
        self.resources = resources
        self.with_lease_id = with_lease_id
        self.ttl = ttl
        self.register()

    def register(self):
        self.lease = self.coord.grant_lease(self.ttl)
        record = {"NodeID": self.id, "Resources": self.resources, "Labels": {}}
        if self.with_lease_id:
            record["LeaseID"] = self.lease
        self.coord.put(self.keys.node(self.id), encode_json(record), lease=self.lease)

    def kill(self):
        self.coord.revoke_lease(self.lease)


def spec(bundles, strategy="PACK", name="", lifetime=None):
    return validate_placement_group_args(bundles, strategy, name, lifetime)


def new_id() -> str:
    return PlacementGroupID.from_random().hex()


def alloc_of(coord, keys, node):
    raw, _ = coord.get(keys.alloc(node))
    return AllocRecord.from_dict(decode_json(raw)) if raw is not None else None


def record_of(coord, keys, pg_hex):
    return rsv.get_record(coord, pg_hex, keys)[0]


def assert_consistent(coord, keys, allow_dead=()):
    """Every held bundle is in its node's alloc and every alloc entry is a
    held bundle of a live group: nothing is half-reserved."""
    snap = rsv.read_snapshot(coord, keys)
    groups = {r.pg_id: r for r in rsv.list_records(coord, keys)}
    for node, (alloc, _rev) in snap.allocs.items():
        assert alloc.reserved().fits_in(snap.nodes[node].total) if node in snap.nodes else True
        for b in alloc.bundles:
            g = groups.get(b.pg_id)
            assert g is not None and g.state != REMOVED, (node, b)
            assert g.placement[b.index] == node, (node, b, g.placement)
    for g in groups.values():
        if g.state == REMOVED:
            continue
        for i, node in enumerate(g.placement):
            if node is None or node in allow_dead:
                continue
            alloc = snap.allocs.get(node, (None, 0))[0]
            assert alloc is not None and alloc.holds(g.pg_id, i), (g.pg_id, i, node)
        if g.state == CREATED:
            assert None not in g.placement


# --------------------------------------------------------------------------
# Create, reserve, names


def test_create_reserves_atomically_on_a_lease(coord, keys):
    nodes = [FakeNode(coord, keys, i, {"CPU": 4}) for i in range(2)]
    pg = new_id()
    result = rsv.create_placement_group(coord, spec([{"CPU": 1}] * 3), pg_id=pg,
                                        namespace="ns", job_id="01" * 4,
                                        creator_node=nodes[0].id, keys=keys)
    assert result.created and result.changed
    record = record_of(coord, keys, pg)
    assert record.state == CREATED and len(set(record.placement)) == 1
    host = record.placement[0]
    alloc = alloc_of(coord, keys, host)
    assert alloc.keys() == {(pg, 0), (pg, 1), (pg, 2)}
    assert alloc.reserved() == ResourceSet({"CPU": 3})
    owner = next(n for n in nodes if n.id == host)
    assert alloc.lease == owner.lease
    assert_consistent(coord, keys)
    # The alloc key lives on the node's lease: it dies with the node.
    owner.kill()
    assert alloc_of(coord, keys, host) is None


def test_same_id_retry_is_idempotent_and_names_are_unique(coord, keys):
    FakeNode(coord, keys, 0, {"CPU": 8})
    first = new_id()
    rsv.create_placement_group(coord, spec([{"CPU": 1}], name="train"), pg_id=first,
                               namespace="a", keys=keys)
    again = rsv.create_placement_group(coord, spec([{"CPU": 1}], name="train"), pg_id=first,
                                       namespace="a", keys=keys)
    assert again.pg_id == first and again.state == CREATED
    with pytest.raises(rsv.PlacementGroupNameTaken, match="train"):
        rsv.create_placement_group(coord, spec([{"CPU": 1}], name="train"), pg_id=new_id(),
                                   namespace="a", keys=keys)
    with pytest.raises(ValueError, match="different definition"):
        rsv.create_placement_group(coord, spec([{"CPU": 2}], name="other"), pg_id=first,
                                   namespace="a", keys=keys)
    other_ns = new_id()
    rsv.create_placement_group(coord, spec([{"CPU": 1}], name="train"), pg_id=other_ns,
                               namespace="b", keys=keys)
    assert rsv.get_record_by_name(coord, "a", "train", keys).pg_id == first
    assert rsv.get_record_by_name(coord, "b", "train", keys).pg_id == other_ns
    # Removal releases the name in the same transaction.
    assert rsv.remove_placement_group(coord, first, keys=keys)
    assert rsv.get_record_by_name(coord, "a", "train", keys) is None
    reused = new_id()
    rsv.create_placement_group(coord, spec([{"CPU": 1}], name="train"), pg_id=reused,
                               namespace="a", keys=keys)
    assert rsv.get_record_by_name(coord, "a", "train", keys).pg_id == reused
    assert_consistent(coord, keys)


def test_infeasible_group_waits_then_places_when_a_node_joins(coord, keys):
    FakeNode(coord, keys, 0, {"CPU": 2})
    FakeNode(coord, keys, 1, {"CPU": 2})
    pg = new_id()
    result = rsv.create_placement_group(coord, spec([{"CPU": 1}] * 3, "STRICT_SPREAD"),
                                        pg_id=pg, keys=keys)
    assert result.state == PENDING and result.infeasible_ever
    record = record_of(coord, keys, pg)
    assert record.state == PENDING and "STRICT_SPREAD" in record.reason
    assert record.placement == (None, None, None)
    assert alloc_of(coord, keys, node_id(0)) is None  # nothing half-reserved
    FakeNode(coord, keys, 2, {"CPU": 2})
    results = rsv.try_place_pending(coord, keys=keys)
    assert [r.state for r in results] == [CREATED]
    assert sorted(record_of(coord, keys, pg).placement) == [node_id(i) for i in range(3)]
    assert_consistent(coord, keys)


def test_stale_views_cannot_both_win(coord, keys):
    # Two placers decide on the same view; only one commit can pass its
    # compares, the other must re-read and then sees no room.
    FakeNode(coord, keys, 0, {"CPU": 4})
    a, b = new_id(), new_id()
    for pg in (a, b):
        rsv.create_placement_group(coord, spec([{"CPU": 3}]), pg_id=pg, keys=keys, place=False)
    snap = rsv.read_snapshot(coord, keys)
    status_a, _, _ = rsv._place_once(coord, keys, a, snap, None, True)
    status_b, _, _ = rsv._place_once(coord, keys, b, snap, None, True)
    assert (status_a, status_b) == ("written", "conflict")
    retry = rsv.try_place(coord, b, keys=keys)
    assert retry.state == PENDING and not retry.infeasible_ever
    assert alloc_of(coord, keys, node_id(0)).reserved() == ResourceSet({"CPU": 3})
    assert_consistent(coord, keys)


def test_old_snapshot_does_not_mistake_a_fresh_placement_for_a_loss(coord, keys):
    # Regression: a placer whose snapshot predates another node's successful
    # placement must not see the group's bundles as lost and clear them.
    FakeNode(coord, keys, 0, {"CPU": 2})
    holder, pg = new_id(), new_id()
    rsv.create_placement_group(coord, spec([{"CPU": 2}]), pg_id=holder, keys=keys)
    rsv.create_placement_group(coord, spec([{"CPU": 2}]), pg_id=pg, keys=keys, place=False)
    old = rsv.read_snapshot(coord, keys)  # the node looks full in this view
    rsv.remove_placement_group(coord, holder, keys=keys)
    assert rsv.try_place(coord, pg, keys=keys).state == CREATED
    status, result, _ = rsv._place_once(coord, keys, pg, old, None, True)
    assert status == "noop" and result.state == CREATED
    assert_consistent(coord, keys)


def test_availability_hints_delay_but_do_not_block_forever(coord, keys):
    FakeNode(coord, keys, 0, {"CPU": 4})
    coord.put(keys.avail(node_id(0)), encode_json({"CPU": 1.0}))  # busy with tasks
    pg = new_id()
    result = rsv.create_placement_group(coord, spec([{"CPU": 2}]), pg_id=pg, keys=keys)
    assert result.state == PENDING and "running tasks" in result.reason
    coord.put(keys.avail(node_id(0)), encode_json({"CPU": 4.0}))
    assert [r.state for r in rsv.try_place_pending(coord, keys=keys)] == [CREATED]


def test_only_the_responsible_node_acts_first(coord, keys):
    from meshray.placement.policy import responsible_node
    nodes = [FakeNode(coord, keys, i, {"CPU": 2}) for i in range(3)]
    pg = new_id()
    rsv.create_placement_group(coord, spec([{"CPU": 1}]), pg_id=pg, keys=keys, place=False)
    chosen = responsible_node(pg, [n.id for n in nodes])
    bystander = next(n.id for n in nodes if n.id != chosen)
    assert rsv.try_place_pending(coord, keys=keys, responsible_for=bystander) == []
    assert record_of(coord, keys, pg).state == PENDING
    assert [r.state for r in rsv.try_place_pending(coord, keys=keys,
                                                   responsible_for=chosen)] == [CREATED]


# --------------------------------------------------------------------------
# Removal


def test_remove_frees_reservations_for_waiting_groups(coord, keys):
    FakeNode(coord, keys, 0, {"CPU": 4})
    big, waiting = new_id(), new_id()
    rsv.create_placement_group(coord, spec([{"CPU": 4}], name="big"), pg_id=big, keys=keys)
    assert rsv.create_placement_group(coord, spec([{"CPU": 2}]), pg_id=waiting,
                                      keys=keys).state == PENDING
    assert rsv.remove_placement_group(coord, big, keys=keys)
    tomb = record_of(coord, keys, big)
    assert tomb.state == REMOVED and tomb.placement == (None,)
    assert alloc_of(coord, keys, node_id(0)) is None
    assert not rsv.remove_placement_group(coord, big, keys=keys)
    assert not rsv.remove_placement_group(coord, new_id(), keys=keys)
    assert [r.pg_id for r in rsv.try_place_pending(coord, keys=keys)] == [waiting]
    assert record_of(coord, keys, waiting).state == CREATED
    assert_consistent(coord, keys)


def test_remove_without_tombstone_and_pending_group(coord, keys):
    FakeNode(coord, keys, 0, {"CPU": 1})
    pg = new_id()
    rsv.create_placement_group(coord, spec([{"CPU": 2}]), pg_id=pg, keys=keys)
    assert rsv.remove_placement_group(coord, pg, keys=keys, tombstone_ttl_s=None)
    assert record_of(coord, keys, pg) is None


def test_job_end_and_orphan_sweep(coord, keys):
    n0 = FakeNode(coord, keys, 0, {"CPU": 8})
    n1 = FakeNode(coord, keys, 1, {"CPU": 8})
    job = "0a" * 4
    mine = new_id()
    detached = new_id()
    other_job = new_id()
    rsv.create_placement_group(coord, spec([{"CPU": 1}]), pg_id=mine, job_id=job,
                               creator_node=n0.id, keys=keys)
    rsv.create_placement_group(coord, spec([{"CPU": 1}], lifetime="detached"), pg_id=detached,
                               job_id=job, creator_node=n0.id, keys=keys)
    rsv.create_placement_group(coord, spec([{"CPU": 1}]), pg_id=other_job, job_id="0b" * 4,
                               creator_node=n1.id, keys=keys)
    assert rsv.remove_job_groups(coord, job, keys=keys) == [mine]
    assert record_of(coord, keys, detached).state == CREATED
    # The creator of other_job's driver dies: nobody will end that job
    # cleanly, so the sweep removes its non-detached groups.
    n1.kill()
    assert rsv.sweep_orphans(coord, keys=keys) == [other_job]
    assert record_of(coord, keys, detached).state == CREATED
    assert rsv.sweep_orphans(coord, keys=keys, job_alive=lambda j: False) == []  # detached
    assert_consistent(coord, keys)


# --------------------------------------------------------------------------
# Batches (what a daemon's placer runs)


def req(bundles, strategy="PACK", name="", pg_id=None, namespace=""):
    return rsv.CreateRequest(pg_id or new_id(), spec(bundles, strategy, name), namespace)


def test_batch_create_names_repeats_and_capacity(coord, keys):
    FakeNode(coord, keys, 0, {"CPU": 4})
    held = rsv.create_placement_groups(coord, [req([{"CPU": 0.5}], name="y")], keys=keys)[0]
    assert held.state == CREATED
    a = req([{"CPU": 1}], name="x")
    batch = [a, req([{"CPU": 2}]), req([{"CPU": 2}]), a, req([{"CPU": 0.1}], name="x"),
             req([{"CPU": 0.1}], name="x", namespace="other")]
    out = rsv.create_placement_groups(coord, batch, keys=keys)
    assert [o.state for o in out[:4]] == [CREATED, CREATED, PENDING, CREATED]
    assert out[3] == out[0]                       # the same id twice: one group
    assert "not enough unreserved" in out[2].reason and not out[2].infeasible_ever
    assert isinstance(out[4], rsv.PlacementGroupNameTaken)
    assert out[5].state == CREATED                # names are per namespace
    # A name held from an earlier call fails the fast path's compare: the
    # single-group fallback blames the right request, the rest still land.
    clash = req([{"CPU": 0.1}], name="y")
    bystander = req([{"CPU": 0.1}])
    out2 = rsv.create_placement_groups(coord, [clash, bystander], keys=keys)
    assert isinstance(out2[0], rsv.PlacementGroupNameTaken) and "already used" in str(out2[0])
    assert out2[1].state == CREATED
    # Retrying a landed request is idempotent; a different definition is not.
    again = rsv.create_placement_groups(coord, [a, req([{"CPU": 3}], pg_id=a.pg_id)],
                                        keys=keys)
    assert again[0].pg_id == a.pg_id and again[0].state == CREATED
    assert isinstance(again[1], ValueError) and "different definition" in str(again[1])
    assert_consistent(coord, keys)
    assert alloc_of(coord, keys, node_id(0)).reserved() == ResourceSet({"CPU": 3.7})


def test_batch_chunks_many_groups_and_removes_them(coord, keys):
    FakeNode(coord, keys, 0, {"CPU": 2, "custom": 100})
    FakeNode(coord, keys, 1, {"CPU": 2})
    requests = [req([{"custom": 0.001}]) for _ in range(150)] + \
        [req([{"CPU": 1}, {"CPU": 1}], "STRICT_SPREAD", name=f"s{i}") for i in range(2)]
    started = time.monotonic()
    out = rsv.create_placement_groups(coord, requests, keys=keys)
    print("150 + 2 groups created in", round(time.monotonic() - started, 3), "s")
    assert all(o.state == CREATED for o in out)
    assert len(alloc_of(coord, keys, node_id(0)).bundles) == 152
    assert len(alloc_of(coord, keys, node_id(1)).bundles) == 2
    assert_consistent(coord, keys)
    # Stale hints (an old revision) only cost a re-read.
    hints = {o.pg_id: (o, 1) for o in out[:10]}
    ids = [o.pg_id for o in out] + [out[0].pg_id, new_id()]
    removed = rsv.remove_placement_groups(coord, ids, keys=keys, known=hints.get)
    assert removed == [True] * len(out) + [False, False]
    assert alloc_of(coord, keys, node_id(0)) is None and alloc_of(coord, keys, node_id(1)) is None
    assert {r.state for r in rsv.list_records(coord, keys)} == {REMOVED}
    assert coord.get(keys.pg_name("", "s0"))[0] is None
    assert rsv.create_placement_groups(coord, [req([{"CPU": 1}], name="s0")],
                                       keys=keys)[0].state == CREATED
    assert_consistent(coord, keys)


def test_batch_removal_shares_one_tombstone_lease(coord, keys):
    FakeNode(coord, keys, 0, {"CPU": 4})
    out = rsv.create_placement_groups(coord, [req([{"CPU": 1}]) for _ in range(3)], keys=keys)
    leases = rsv.TombstoneLeases(ttl_s=600, renew_s=60)
    assert rsv.remove_placement_groups(coord, [out[0].pg_id], keys=keys, leases=leases) == [True]
    first = leases.get(coord)
    assert rsv.remove_placement_groups(coord, [o.pg_id for o in out[1:]], keys=keys,
                                       leases=leases) == [True, True]
    assert leases.get(coord) == first and coord.lease_ttl(first) > 600
    coord.revoke_lease(first)   # the tombstones vanish with it: a missing record means removed
    assert rsv.list_records(coord, keys) == []
    # A lease that is gone is replaced on the next removal.
    more = rsv.create_placement_groups(coord, [req([{"CPU": 1}])], keys=keys)
    assert rsv.remove_placement_groups(coord, [more[0].pg_id], keys=keys,
                                       leases=leases) == [True]
    assert leases.get(coord) != first
    assert record_of(coord, keys, more[0].pg_id).state == REMOVED


def test_try_place_pending_on_candidates_only(coord, keys):
    FakeNode(coord, keys, 0, {"CPU": 1})
    big, other = rsv.create_placement_groups(coord, [req([{"CPU": 2}]), req([{"CPU": 2}])],
                                             keys=keys)
    assert big.state == other.state == PENDING and big.infeasible_ever
    FakeNode(coord, keys, 1, {"CPU": 4})
    assert rsv.try_place_pending(coord, keys=keys, candidates=[]) == []
    placed = rsv.try_place_pending(coord, keys=keys, candidates=[big.pg_id, big.pg_id.upper()])
    assert [(r.pg_id, r.state) for r in placed] == [(big.pg_id, CREATED)]
    assert record_of(coord, keys, other.pg_id).state == PENDING   # not a candidate
    again = rsv.try_place_pending(coord, keys=keys, candidates=[big.pg_id])
    assert again[0].state == CREATED and not again[0].changed     # nothing left to do
    assert_consistent(coord, keys)


def test_garbage_of_interrupted_removal_is_collected(coord, keys):
    n0 = FakeNode(coord, keys, 0, {"CPU": 4})
    ghost = AllocRecord(n0.id, n0.lease, (BundleAlloc(new_id(), 0, {"CPU": 3}),))
    coord.put(keys.alloc(n0.id), encode_json(ghost.to_dict()), lease=n0.lease)
    pg = new_id()
    assert rsv.create_placement_group(coord, spec([{"CPU": 2}]), pg_id=pg,
                                      keys=keys).state == PENDING
    results = rsv.try_place_pending(coord, keys=keys)
    assert [r.state for r in results] == [CREATED]
    assert alloc_of(coord, keys, n0.id).keys() == {(pg, 0)}


# --------------------------------------------------------------------------
# Node death and re-placement


def _reschedule_from_threads(etcd, keys, pg, count=4):
    results, errors = [], []
    barrier = threading.Barrier(count)

    def run():
        try:
            with Coordinator([etcd.endpoint], timeout=5.0) as mine:
                barrier.wait(5)
                results.append(rsv.reschedule(mine, pg, keys=keys))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    return results


def test_reschedule_moves_only_lost_bundles_and_one_node_wins(etcd, coord, keys):
    nodes = [FakeNode(coord, keys, i, {"CPU": 2}) for i in range(3)]
    pg = new_id()
    rsv.create_placement_group(coord, spec([{"CPU": 1}] * 3, "SPREAD"), pg_id=pg, keys=keys)
    before = record_of(coord, keys, pg).placement
    assert sorted(before) == [n.id for n in nodes]
    victim = nodes[2]
    lost_index = before.index(victim.id)
    victim.kill()
    results = _reschedule_from_threads(etcd, keys, pg)
    assert sum(r.changed for r in results) == 1
    assert all(r.state == CREATED for r in results)
    after = record_of(coord, keys, pg).placement
    for i, n in enumerate(before):
        if i != lost_index:
            assert after[i] == n  # kept bundles never move
    assert after[lost_index] in (nodes[0].id, nodes[1].id)
    assert_consistent(coord, keys)


def test_live_hint_never_moves_kept_bundles(coord, keys):
    nodes = [FakeNode(coord, keys, i, {"CPU": 2}) for i in range(3)]
    pg = new_id()
    rsv.create_placement_group(coord, spec([{"CPU": 1}] * 2, "STRICT_SPREAD"), pg_id=pg,
                               keys=keys)
    before = record_of(coord, keys, pg).placement
    victim = next(n for n in nodes if n.id in before)
    survivor = next(n for n in before if n != victim.id)
    victim.kill()
    # The caller's (stale) view does not list the survivor; it must stay put.
    spare = next(n.id for n in nodes if n.id not in before)
    result = rsv.reschedule(coord, pg, live_nodes=[spare], keys=keys)
    assert result.state == CREATED
    after = record_of(coord, keys, pg).placement
    assert after[before.index(survivor)] == survivor
    assert after[before.index(victim.id)] == spare
    assert_consistent(coord, keys)


def test_reschedule_without_room_then_recovers(coord, keys):
    a = FakeNode(coord, keys, 0, {"CPU": 1})
    b = FakeNode(coord, keys, 1, {"CPU": 1})
    pg = new_id()
    rsv.create_placement_group(coord, spec([{"CPU": 1}] * 2, "STRICT_SPREAD"), pg_id=pg,
                               keys=keys)
    before = record_of(coord, keys, pg).placement
    b.kill()
    result = rsv.reschedule(coord, pg, keys=keys)
    assert result.state == RESCHEDULING and result.changed
    record = record_of(coord, keys, pg)
    assert record.placement[before.index(a.id)] == a.id
    assert record.placement[before.index(b.id)] is None
    assert rsv.reschedule(coord, pg, keys=keys).changed is False  # no churn while waiting
    FakeNode(coord, keys, 2, {"CPU": 1})
    assert [r.state for r in rsv.try_place_pending(coord, keys=keys)] == [CREATED]
    after = record_of(coord, keys, pg).placement
    assert after[before.index(a.id)] == a.id and after[before.index(b.id)] == node_id(2)
    assert_consistent(coord, keys)


def test_lease_lost_and_same_node_id_back_counts_as_lost(coord, keys):
    n0 = FakeNode(coord, keys, 0, {"CPU": 2})
    pg = new_id()
    rsv.create_placement_group(coord, spec([{"CPU": 2}]), pg_id=pg, keys=keys)
    n0.kill()
    n0.register()  # same id, new lease: the old reservations are gone
    assert alloc_of(coord, keys, n0.id) is None
    assert rsv.try_place_pending(coord, keys=keys)[0].state == CREATED
    alloc = alloc_of(coord, keys, n0.id)
    assert alloc.holds(pg, 0) and alloc.lease == n0.lease
    assert_consistent(coord, keys)


def test_node_records_without_lease_id(coord, keys):
    # Older daemons do not publish LeaseID: allocs are then not on a lease,
    # and re-placement strips the dead node's leftover entries.
    n0 = FakeNode(coord, keys, 0, {"CPU": 2}, with_lease_id=False)
    FakeNode(coord, keys, 1, {"CPU": 2}, with_lease_id=False)
    pg = new_id()
    rsv.create_placement_group(coord, spec([{"CPU": 2}], "STRICT_PACK"), pg_id=pg, keys=keys)
    host = record_of(coord, keys, pg).placement[0]
    assert alloc_of(coord, keys, host).lease == 0
    dead = n0 if host == n0.id else None
    if dead is None:
        coord.delete(keys.node(host))
    else:
        dead.kill()
    assert alloc_of(coord, keys, host) is not None  # leftover, not on a lease
    assert rsv.try_place_pending(coord, keys=keys)[0].state == CREATED
    moved = record_of(coord, keys, pg).placement[0]
    assert moved != host
    assert alloc_of(coord, keys, host) is None
    assert_consistent(coord, keys)


# --------------------------------------------------------------------------
# The public API, answered by handle_request (as the daemon will)


class _DaemonStandIn:
    """A CoreWorker stand-in whose requests reach handle_request directly."""

    def __init__(self, coord, keys, node):
        self.coord, self.keys, self.node = coord, keys, node
        self.job_id = b"\x07" * 8
        self.namespace = "apins"
        self.calls = []

    def request(self, method, payload=None, timeout=30.0):
        self.calls.append(method)
        reply = rsv.handle_request(self.coord, method, json.loads(json.dumps(payload or {})),
                                   node_id=self.node, keys=self.keys)
        return json.loads(json.dumps(reply))


@pytest.fixture
def api(coord, keys, monkeypatch):
    n0 = FakeNode(coord, keys, 0, {"CPU": 2})
    stand_in = _DaemonStandIn(coord, keys, n0.id)
    monkeypatch.setattr(pg_api, "_core", lambda: stand_in)
    return stand_in


def test_public_api_end_to_end(api, coord, keys):
    pg = pg_api.placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_PACK", name="g")
    assert pg.wait(5)
    assert pg.bundle_specs == [{"CPU": 1.0}, {"CPU": 1.0}] and pg.bundle_count == 2
    table = pg_api.placement_group_table(pg)
    assert table["state"] == CREATED and table["strategy"] == "STRICT_PACK"
    assert table["bundles_to_node_id"] == {0: node_id(0), 1: node_id(0)}
    assert table["creator_job_id"] == "07" * 8 and table["namespace"] == "apins"
    assert pg_api.get_placement_group("g") == pg
    with pytest.raises(ValueError, match="already used"):
        pg_api.placement_group([{"CPU": 1}], name="g")
    with pytest.raises(ValueError, match="Failed to look up"):
        pg_api.get_placement_group("nope")
    # Infeasible: wait() honours its timeout.
    stuck = pg_api.placement_group([{"CPU": 64}])
    started = time.monotonic()
    assert stuck.wait(0.5) is False
    assert 0.4 <= time.monotonic() - started < 2.0
    everything = pg_api.placement_group_table()
    assert set(everything) == {pg.id.hex(), stuck.id.hex()}
    assert everything[stuck.id.hex()]["state"] == PENDING
    assert everything[stuck.id.hex()]["stats"]["infeasible"] is True
    pg_api.remove_placement_group(pg)
    pg_api.remove_placement_group(pg)  # idempotent
    assert pg_api.placement_group_table(pg)["state"] == REMOVED
    assert pg.wait(0) is False
    assert [r.state for r in rsv.try_place_pending(coord, keys=keys)] == [PENDING]
    unknown = pg_api.PlacementGroup(PlacementGroupID.from_random())
    assert pg_api.placement_group_table(unknown) == {}
    with pytest.raises(ValueError, match="does not exist"):
        unknown.bundle_count


def test_handle_request_rejects_bad_payloads(coord, keys):
    node = node_id(9)
    reply = rsv.handle_request(coord, "pg_create", {"pg_id": new_id(), "bundles": []},
                               node_id=node, keys=keys)
    assert reply["error"]["type"] == "ValueError"
    reply = rsv.handle_request(coord, "pg_create", {"pg_id": "xyz", "bundles": [{"CPU": 1}]},
                               node_id=node, keys=keys)
    assert reply["error"]["type"] == "ValueError"
    reply = rsv.handle_request(coord, "pg_get_by_name", {"name": ""}, node_id=node, keys=keys)
    assert reply["error"]["type"] == "ValueError"
    assert rsv.handle_request(coord, "pg_get", {"pg_id": new_id()}, node_id=node,
                              keys=keys) == {"record": None}
    with pytest.raises(ValueError):
        rsv.handle_request(coord, "pg_bogus", {}, node_id=node, keys=keys)


# --------------------------------------------------------------------------
# The race: many creators, removers and placers; then replay etcd's history


_CREATOR = textwrap.dedent("""
    import json, random, sys, threading, time
    from meshray.coordination.client import Coordinator
    from meshray.coordination.keyspace import Keyspace
    from meshray.placement import reservation as rsv
    from meshray.placement.records import PlacementGroupID, validate_placement_group_args

    endpoint, cluster, seed, threads, groups, start_at, mode = sys.argv[1:8]
    keys = Keyspace(cluster)
    out, lock = [], threading.Lock()

    def request(rng):
        strategy = rng.choice(["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
        bundles = [{"CPU": rng.choice([0.5, 1, 2, 3])} for _ in range(rng.randint(1, 3))]
        pg = PlacementGroupID.from_random().hex()
        return rsv.CreateRequest(pg, validate_placement_group_args(bundles, strategy))

    def creator(n):
        rng = random.Random(f"{seed}-{n}")
        # "mixed": odd threads create and remove in batches, as a daemon's
        # placer does; even threads one group at a time.
        batched = mode == "mixed" and n % 2 == 1
        with Coordinator([endpoint], timeout=10.0) as coord:
            # Every process and thread starts at the same instant: maximum
            # contention on the same alloc records.
            time.sleep(max(0.0, float(start_at) - time.time()))
            if batched:
                requests = [request(rng) for _ in range(int(groups))]
                outcomes = rsv.create_placement_groups(coord, requests, keys=keys,
                                                       timeout_s=10.0)
                victims = [r.pg_id for r, o in zip(requests, outcomes)
                           if o.state == "CREATED" and rng.random() < 0.35]
                assert all(rsv.remove_placement_groups(coord, victims, keys=keys))
                with lock:
                    out.extend([r.pg_id, o.state, r.pg_id in victims, 0]
                               for r, o in zip(requests, outcomes))
                return
            for _ in range(int(groups)):
                req = request(rng)
                result = rsv.create_placement_group(coord, req.spec, pg_id=req.pg_id,
                                                    keys=keys, place_timeout_s=10.0)
                removed = result.created and rng.random() < 0.35
                if removed:
                    rsv.remove_placement_group(coord, req.pg_id, keys=keys)
                with lock:
                    out.append([req.pg_id, result.state, removed, result.attempts])

    workers = [threading.Thread(target=creator, args=(i,)) for i in range(int(threads))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(json.dumps(out))
""")


def _collect_history(etcd, prefix, until_revision):
    events, done = [], threading.Event()

    def on_events(batch):
        events.extend(batch)
        if batch and batch[-1].mod_revision >= until_revision:
            done.set()

    with Coordinator([etcd.endpoint], timeout=5.0) as watcher:
        handle = watcher.watch_prefix(prefix, 1, on_events)
        assert done.wait(20), "history replay did not reach the final revision"
        handle.cancel()
    return events


@pytest.mark.parametrize("mode", ["single", "mixed"])
def test_race_never_overcommits_at_any_revision(etcd, coord, keys, tmp_path, mode):
    totals = {node_id(i): ResourceSet({"CPU": 4}) for i in range(4)}
    for i in range(4):
        FakeNode(coord, keys, i, {"CPU": 4})
    script = tmp_path / "creator.py"
    script.write_text(_CREATOR)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start_at = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, str(script), etcd.endpoint, keys.cluster,
                               str(seed), "3", "5", str(start_at), mode],
                              stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
             for seed in range(3)]
    # Placers in this process race the creators and removers.
    stop = threading.Event()
    placer_errors = []

    def placer():
        try:
            with Coordinator([etcd.endpoint], timeout=10.0) as mine:
                while not stop.is_set():
                    rsv.try_place_pending(mine, keys=keys)
                    stop.wait(0.02)
        except Exception as exc:  # noqa: BLE001 - reported below
            placer_errors.append(exc)

    placers = [threading.Thread(target=placer) for _ in range(2)]
    for t in placers:
        t.start()
    outcomes = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=45)
            assert proc.returncode == 0, err[-3000:]
            outcomes.extend(json.loads(out.strip().splitlines()[-1]))
    finally:
        stop.set()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        for t in placers:
            t.join(20)
    assert not placer_errors, placer_errors
    assert len(outcomes) == 45
    states = [o[1] for o in outcomes]
    print("race: states", Counter(states), "attempts per create", Counter(o[3] for o in outcomes))
    assert CREATED in states and PENDING in states  # the race was real: demand > supply
    final_rev = coord.put(keys.root + "zz-end-marker", b"1")
    events = _collect_history(etcd, keys.root, final_rev)

    # Replay revision by revision.
    by_rev = {}
    for ev in events:
        by_rev.setdefault(ev.mod_revision, []).append(ev)
    allocs, groups = {}, {}
    saw_full_node = False
    for rev in sorted(by_rev):
        for ev in by_rev[rev]:
            if ev.key.startswith(keys.alloc_prefix()):
                node = keys.parse_alloc(ev.key)
                if ev.kind == "delete":
                    allocs.pop(node, None)
                else:
                    allocs[node] = AllocRecord.from_dict(decode_json(ev.value))
            elif ev.key.startswith(keys.pgs_prefix()):
                pg = keys.parse_pg(ev.key)
                if ev.kind == "delete":
                    groups.pop(pg, None)
                else:
                    groups[pg] = PlacementGroupRecord.from_dict(decode_json(ev.value))
        for node, alloc in allocs.items():
            reserved = alloc.reserved()
            assert reserved.fits_in(totals[node]), \
                f"revision {rev}: node {node} over-committed: {reserved} > {totals[node]}"
            saw_full_node |= reserved == totals[node]
            for b in alloc.bundles:
                g = groups.get(b.pg_id)
                assert g is not None and g.state != REMOVED and g.placement[b.index] == node, \
                    f"revision {rev}: alloc entry {b} of {node} does not match its group"
        for g in groups.values():
            if g.state == REMOVED:
                continue
            for i, node in enumerate(g.placement):
                if node is not None:
                    assert node in allocs and allocs[node].holds(g.pg_id, i), \
                        f"revision {rev}: group {g.pg_id} bundle {i} half-reserved"
            if g.state == CREATED:
                assert None not in g.placement
    assert saw_full_node
    assert len(groups) == 45
    assert_consistent(coord, keys)
