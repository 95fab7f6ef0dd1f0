"""The replay that proves no node's bundles ever exceeded its resources
(meshray/placement/audit.py): each revision is judged, only touched nodes
are re-checked, and a re-listing replaces what it covers."""
from __future__ import annotations

from meshray.coordination import keyspace
from meshray.placement.audit import replay_allocations
from meshray.placement.records import AllocRecord, BundleAlloc

KEYS = keyspace.Keyspace()
N1, N2 = "ab" * 16, "cd" * 16


def _node(cpus: float) -> bytes:
    return keyspace.encode_json({"Resources": {"CPU": cpus}})


def _alloc(node: str, *bundles) -> bytes:
    record = AllocRecord(node, 0, tuple(BundleAlloc(pg, i, {"CPU": cpu})
                                        for pg, i, cpu in bundles))
    return keyspace.encode_json(record.to_dict())


def _put(rev, key, value):
    return {"rev": rev, "kind": "put", "key": key, "value": value}


def test_an_overcommitted_revision_is_named_and_the_peak_counted():
    initial = {KEYS.node(N1): _node(2.0), KEYS.node(N2): _node(4.0)}
    events = [
        _put(5, KEYS.alloc(N1), _alloc(N1, ("p1", 0, 1.0))),
        _put(6, KEYS.alloc(N1), _alloc(N1, ("p1", 0, 1.0), ("p2", 0, 1.0), ("p2", 1, 1.0))),
        _put(6, KEYS.alloc(N2), _alloc(N2, ("p3", 0, 4.0))),
        {"rev": 7, "kind": "delete", "key": KEYS.alloc(N1), "value": None},
    ]
    replay = replay_allocations(initial, events)
    assert replay.violations == [f"revision 6: node {N1[:12]} has 3.0 CPU reserved but only 2.0"]
    assert replay.peak_bundles == 4          # 3 on N1 and 1 on N2 at revision 6
    assert replay.revisions == 3 and not replay.unparsed


def test_a_node_record_shrinking_under_its_reservations_is_caught_at_that_revision():
    initial = {KEYS.node(N1): _node(4.0), KEYS.alloc(N1): _alloc(N1, ("p1", 0, 3.0))}
    replay = replay_allocations(initial, [_put(9, KEYS.node(N1), _node(2.0))])
    assert replay.violations == [f"revision 9: node {N1[:12]} has 3.0 CPU reserved but only 2.0"]


def test_a_gone_node_is_not_judged_and_a_relisting_replaces_its_prefix():
    initial = {KEYS.node(N1): _node(1.0), KEYS.alloc(N1): _alloc(N1, ("p1", 0, 1.0))}
    events = [
        {"rev": 3, "kind": "delete", "key": KEYS.node(N1), "value": None},     # lease gone
        _put(3, KEYS.alloc(N1), _alloc(N1, ("p1", 0, 1.0), ("p2", 0, 1.0))),   # not judged
        # Compaction: alloc/ re-listed at revision 8 with only N2's record in it.
        {"rev": 8, "kind": "reset", "prefix": KEYS.alloc_prefix(), "key": "",
         "items": {KEYS.alloc(N2): _alloc(N2, ("p4", 0, 1.0))}},
        _put(9, KEYS.node(N2), _node(1.0)),
    ]
    replay = replay_allocations(initial, events)
    assert replay.violations == []
    assert replay.revisions == 2                # the alloc put and the re-listing
    assert replay.peak_bundles == 2


def test_an_unreadable_record_is_counted_not_fatal():
    initial = {KEYS.node(N1): _node(1.0)}
    replay = replay_allocations(initial, [_put(4, KEYS.alloc(N1), b"not json")])
    assert replay.unparsed == {KEYS.alloc(N1)} and replay.violations == []
