"""Pure placement-group batching: the sequential batch placer, the planning of
batched create/remove transactions, and the daemon's incremental group view.
No etcd, no processes: the transactions are checked as the lists of compares
and ops they would send."""
from __future__ import annotations

from meshray.coordination.client import (
    MAX_TXN_OPS,
    Delete,
    KeyMissing,
    ModRevisionEquals,
    Put,
    ValueEquals,
)
from meshray.coordination.keyspace import Keyspace, decode_json, encode_json
from meshray.coordination.mirror import Change, Entry
from meshray.node.pg_placer import GroupView
from meshray.placement import policy
from meshray.placement import reservation as rsv
from meshray.placement.records import (
    CREATED,
    PENDING,
    REMOVED,
    AllocRecord,
    BundleAlloc,
    PlacementGroupID,
    PlacementGroupRecord,
    validate_placement_group_args,
)
from meshray.scheduler.resources import ResourceSet

KEYS = Keyspace("unit")


def nid(i: int) -> str:
    return f"{i:032x}"


def cap(i, cpu=4, reserved=None, avail=None):
    return policy.NodeCapacity(nid(i), ResourceSet({"CPU": cpu}), ResourceSet(reserved or {}),
                               None if avail is None else ResourceSet(avail))


def record(bundles, strategy="PACK", name="", state=PENDING, placement=(), created_at=0.0):
    return PlacementGroupRecord(PlacementGroupID.from_random().hex(),
                                tuple(dict(b) for b in bundles), strategy, name=name,
                                state=state, placement=tuple(placement), created_at=created_at)


def snapshot(nodes, allocs=None, avail=None):
    snap = rsv.Snapshot(revision=10)
    for i, cpu in nodes.items():
        snap.nodes[nid(i)] = rsv.NodeEntry(nid(i), 3 + i, ResourceSet({"CPU": cpu}), lease=70 + i)
    for i, (alloc, rev) in (allocs or {}).items():
        snap.allocs[nid(i)] = (alloc, rev)
    for i, amount in (avail or {}).items():
        snap.avail[nid(i)] = ResourceSet(amount)
    return snap


# --------------------------------------------------------------------------
# BatchPlacer


def test_batch_placer_charges_each_placed_group_before_the_next():
    placer = policy.BatchPlacer([cap(0, 4), cap(1, 2)])
    first = placer.place([{"CPU": 3}], "PACK")
    second = placer.place([{"CPU": 2}], "PACK")
    third = placer.place([{"CPU": 2}], "PACK")
    assert first.assignment == {0: nid(0)}
    assert second.assignment == {0: nid(1)}      # node 0 has 1 CPU left
    assert not third.ok and not third.ever       # fits an empty cluster, not this one
    reserved = {n.node_id: n.reserved for n in placer.nodes}
    assert reserved == {nid(0): ResourceSet({"CPU": 3}), nid(1): ResourceSet({"CPU": 2})}


def test_batch_placer_charges_availability_and_skips_infeasible_groups():
    placer = policy.BatchPlacer([cap(0, 4, avail={"CPU": 2})])
    assert placer.place([{"CPU": 8}], "PACK").ever          # never fits: charges nothing
    assert placer.place([{"CPU": 1.5}], "PACK").ok
    waiting = placer.place([{"CPU": 1}], "PACK")           # 0.5 available, 2.5 unreserved
    assert not waiting.ok and "running tasks" in waiting.reason
    assert placer.nodes[0].available == ResourceSet({"CPU": 0.5})
    off = policy.BatchPlacer([cap(0, 4, avail={"CPU": 0})], use_availability=False)
    assert off.place([{"CPU": 4}], "STRICT_PACK").ok


# --------------------------------------------------------------------------
# plan_create_chunk


def test_create_chunk_places_writes_and_pins_every_touched_node():
    held = AllocRecord(nid(0), 70, (BundleAlloc("ab" * 16, 0, {"CPU": 1.0}),))
    snap = snapshot({0: 4, 1: 4}, allocs={0: (held, 55)})
    groups = [record([{"CPU": 2}]), record([{"CPU": 1}, {"CPU": 1}], "STRICT_SPREAD", name="s"),
              record([{"CPU": 4}])]
    chunk = rsv.plan_create_chunk(snap, groups, KEYS)
    states = [r.state for r in chunk.records]
    assert states == [CREATED, CREATED, PENDING]
    assert chunk.records[2].reason and not chunk.records[2].infeasible_ever
    assert chunk.records[0].placement == (nid(0),)           # tightest fit: 1 CPU left
    assert set(chunk.records[1].placement) == {nid(0), nid(1)}  # sees the first group's bundle
    assert chunk.pinned == {nid(0): (3, 55), nid(1): (4, 0)}
    for i, group in enumerate(groups):
        assert KeyMissing(KEYS.pg(group.pg_id)) in chunk.compares
    assert KeyMissing(KEYS.pg_name("", "s")) in chunk.compares
    assert ModRevisionEquals(KEYS.alloc(nid(0)), 55) in chunk.compares
    assert ModRevisionEquals(KEYS.node(nid(1)), 4) in chunk.compares
    puts = {op.key: op for op in chunk.ops}
    new0 = AllocRecord.from_dict(decode_json(puts[KEYS.alloc(nid(0))].value))
    assert new0.reserved() == ResourceSet({"CPU": 4}) and new0.holds("ab" * 16, 0)
    assert puts[KEYS.alloc(nid(1))].lease == 71
    assert chunk.allocs[nid(1)].reserved() == ResourceSet({"CPU": 1})
    assert decode_json(puts[KEYS.pg(groups[2].pg_id)].value)["state"] == PENDING


def test_create_chunk_stays_within_the_op_budget():
    snap = snapshot({i: 1000 for i in range(50)})
    ones = [record([{"CPU": 1}]) for _ in range(200)]
    chunk = rsv.plan_create_chunk(snap, ones, KEYS)
    assert len(chunk.compares) + len(chunk.ops) <= MAX_TXN_OPS
    assert 40 <= len(chunk.records) < 200
    wide = [record([{"CPU": 1}] * 40, "STRICT_SPREAD", name=f"w{i}") for i in range(3)]
    chunk = rsv.plan_create_chunk(snap, wide, KEYS)
    assert len(chunk.records) == 1                         # 4 + 40 * 3 = 124 ops
    assert len(chunk.compares) + len(chunk.ops) <= MAX_TXN_OPS
    nothing = rsv.plan_create_chunk(snapshot({}), [record([{"CPU": 1}])], KEYS)
    assert nothing.records[0].state == PENDING and nothing.records[0].infeasible_ever
    assert not nothing.allocs and len(nothing.ops) == 1


def test_create_chunk_never_offers_an_unreadable_alloc():
    snap = snapshot({0: 4, 1: 4})
    snap.bad_allocs.add(nid(0))
    chunk = rsv.plan_create_chunk(snap, [record([{"CPU": 1}])], KEYS)
    assert chunk.records[0].placement == (nid(1),)


# --------------------------------------------------------------------------
# plan_remove_chunk


def test_remove_chunk_frees_every_entry_and_keeps_other_groups():
    a = record([{"CPU": 1}, {"CPU": 1}], state=CREATED, placement=(nid(0), nid(1)), name="a")
    b = record([{"CPU": 1}], state=CREATED, placement=(nid(0),))
    other = BundleAlloc("cd" * 16, 0, {"CPU": 1.0})
    alloc0 = AllocRecord(nid(0), 70, (BundleAlloc(a.pg_id, 0, {"CPU": 1.0}),
                                      BundleAlloc(b.pg_id, 0, {"CPU": 1.0}), other))
    alloc1 = AllocRecord(nid(1), 71, (BundleAlloc(a.pg_id, 1, {"CPU": 1.0}),))
    chunk = rsv.plan_remove_chunk([(a, 12, True), (b, 13, False)],
                                  {nid(0): (alloc0, 20), nid(1): (alloc1, 21)}, KEYS,
                                  tombstone_lease=99, reason="bye")
    assert chunk.pg_ids == [a.pg_id, b.pg_id]
    assert ModRevisionEquals(KEYS.pg(a.pg_id), 12) in chunk.compares
    assert ValueEquals(KEYS.pg_name("", "a"), a.pg_id) in chunk.compares
    assert Delete(KEYS.pg_name("", "a")) in chunk.ops
    assert ModRevisionEquals(KEYS.alloc(nid(0)), 20) in chunk.compares
    assert chunk.allocs[nid(0)].bundles == (other,)
    assert chunk.allocs[nid(1)] is None and Delete(KEYS.alloc(nid(1))) in chunk.ops
    tomb = next(op for op in chunk.ops if isinstance(op, Put) and op.key == KEYS.pg(b.pg_id))
    assert tomb.lease == 99
    written = decode_json(tomb.value)
    assert written["state"] == REMOVED and written["reason"] == "bye"
    gone = rsv.plan_remove_chunk([(b, 13, False)], {nid(0): (alloc0, 20)}, KEYS,
                                 delete_records=True)
    assert Delete(KEYS.pg(b.pg_id)) in gone.ops


def test_remove_chunk_stays_within_the_op_budget():
    groups, entries = [], []
    for _ in range(100):
        g = record([{"CPU": 1}], state=CREATED, placement=(nid(0),), name="")
        groups.append((g, 5, False))
        entries.append(BundleAlloc(g.pg_id, 0, {"CPU": 1.0}))
    alloc = AllocRecord(nid(0), 70, tuple(sorted(entries, key=lambda b: b.key)))
    chunk = rsv.plan_remove_chunk(groups, {nid(0): (alloc, 9)}, KEYS)
    assert len(chunk.compares) + len(chunk.ops) <= MAX_TXN_OPS
    assert len(chunk.pg_ids) == (MAX_TXN_OPS - 2) // 2
    assert len(chunk.allocs[nid(0)].bundles) == 100 - len(chunk.pg_ids)


# --------------------------------------------------------------------------
# GroupView (the daemon's parsed pgs/ mirror)


def put(rec, rev):
    return Change(KEYS.pg(rec.pg_id), None, Entry(encode_json(rec.to_dict()), rev))


def test_group_view_knows_which_groups_need_placing():
    me, peer = nid(1), nid(2)
    view = GroupView(KEYS, me)
    waiting = record([{"CPU": 1}], created_at=2.0)
    on_peer = record([{"CPU": 1}], state=CREATED, placement=(peer,), created_at=1.0)
    here = record([{"CPU": 1}], state=CREATED, placement=(me,), created_at=3.0)
    view.apply_pg_changes([put(waiting, 5), put(on_peer, 6), put(here, 7)])
    assert view.records[here.pg_id] == here and view.get(here.pg_id) == (here, 7)
    # Our alloc has not caught up with `here` yet: not judged.
    assert view.needing_placement({me, peer}) == [waiting.pg_id]
    alloc = AllocRecord(me, 1, (BundleAlloc(here.pg_id, 0, {"CPU": 1.0}),))
    view.apply_alloc_changes([Change(KEYS.alloc(me), None, Entry(encode_json(alloc.to_dict()), 7))])
    assert view.own_alloc == alloc
    assert view.needing_placement({me, peer}) == [waiting.pg_id]
    # The peer died: its group needs re-placing (oldest first).
    assert view.needing_placement({me}) == [on_peer.pg_id, waiting.pg_id]
    # Our lease expired and took our alloc with it.
    view.apply_alloc_changes([Change(KEYS.alloc(me), Entry(b"", 7), None)])
    view.note_alloc_revision(9)
    assert view.needing_placement({me, peer}) == [waiting.pg_id, here.pg_id]
    # Removal and deletion leave the indexes clean.
    view.apply_pg_changes([put(here.with_(state=REMOVED, placement=(None,)), 10),
                           Change(KEYS.pg(waiting.pg_id), Entry(b"", 5), None)])
    assert view.needing_placement({me, peer}) == []
    assert waiting.pg_id not in view.records and view.records[here.pg_id].state == REMOVED
    view.apply_pg_changes([Change(KEYS.pg(on_peer.pg_id), None, Entry(b"not json", 11))])
    assert on_peer.pg_id not in view.records          # unreadable: ignored, old one dropped


def test_create_request_parsing():
    pg = PlacementGroupID.from_random().hex()
    request = rsv.parse_create_request(
        {"pg_id": pg.upper(), "bundles": [{"CPU": 1}], "strategy": "SPREAD", "name": "n",
         "namespace": "ignored", "job_id": "AB"}, node_id=nid(3), namespace="ns")
    assert request.pg_id == pg and request.namespace == "ns" and request.job_id == "ab"
    assert request.creator_node == nid(3)
    assert request.spec == validate_placement_group_args([{"CPU": 1}], "SPREAD", "n")
    first = request.record(5.0)
    assert first.state == PENDING and first.created_at == 5.0 and first.name == "n"
    for bad in ({"pg_id": pg, "bundles": []}, {"pg_id": "xyz", "bundles": [{"CPU": 1}]},
                {"pg_id": pg, "bundles": [{"CPU": 1}], "namespace": 3}):
        try:
            rsv.parse_create_request(bad, node_id=nid(3))
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")
