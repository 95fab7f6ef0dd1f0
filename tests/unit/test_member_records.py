"""The decoded membership view (node/member_records.py), fed mirror changes,
and the membership publisher woken by the ledger."""
from __future__ import annotations

import threading

from meshray.coordination import keyspace
from meshray.coordination.mirror import Change, Entry
from meshray.node.member_records import DecodedRecords

KEYS = keyspace.Keyspace()
A, B = "aa" * 16, "bb" * 16


def _put(node_hex, value, rev=1, old=None):
    raw = value if isinstance(value, bytes) else keyspace.encode_json(value)
    return Change(KEYS.node(bytes.fromhex(node_hex)), old, Entry(raw, rev))


def _delete(node_hex):
    return Change(KEYS.node(bytes.fromhex(node_hex)), Entry(b"{}", 1), None)


def test_each_change_is_decoded_once_and_unchanged_records_keep_their_identity():
    records = DecodedRecords(KEYS.parse_node)
    records.apply([_put(A, {"Address": "a"}), _put(B, {"Address": "b"})])
    first = records.snapshot()
    assert first == {A: {"Address": "a"}, B: {"Address": "b"}}
    records.apply([_put(B, {"Address": "b2"}, rev=2)])
    second = records.snapshot()
    assert second[A] is first[A]                  # not decoded again
    assert second[B] == {"Address": "b2"}
    records.apply([_delete(A)])
    assert set(records.snapshot()) == {B}


def test_changes_are_handed_out_once_with_the_value_now():
    records = DecodedRecords(KEYS.parse_node)
    records.apply([_put(A, {"n": 1}), _put(B, {}), _put(A, {"n": 2})])
    assert records.take_changes() == {A: {"n": 2}, B: {}}
    assert records.take_changes() == {}
    records.apply([_delete(A)])
    assert records.take_changes() == {A: None}
    records.reset()
    assert records.snapshot() == {} and records.take_changes() == {B: None}


def test_the_same_bytes_are_decoded_once_in_the_process():
    mine, theirs = DecodedRecords(KEYS.parse_node), DecodedRecords(KEYS.parse_node)
    mine.apply([_put(A, {"Address": "shared"})])
    theirs.apply([_put(A, {"Address": "shared"})])
    assert theirs.get(A) is mine.get(A)           # decoded by the first view only


def test_values_that_are_not_json_objects_and_foreign_keys_are_left_out():
    records = DecodedRecords(KEYS.parse_node)
    records.apply([_put(A, b"\xff not json"), _put(B, [1, 2]),
                   Change("/somewhere/else", None, Entry(b"{}", 1))])
    assert records.snapshot() == {}
    # A bad value replacing a good one removes the node from the view.
    records.apply([_put(A, {"ok": 1}, rev=2)])
    records.apply([_put(A, b"garbage", rev=3)])
    assert records.get(A) is None


def test_wait_for_returns_when_the_node_appears_or_times_out():
    records = DecodedRecords(KEYS.parse_node)
    assert records.wait_for(A, 0.01) is False
    timer = threading.Timer(0.05, records.apply, args=([_put(A, {})],))
    timer.start()
    try:
        assert records.wait_for(A, 10.0) is True
    finally:
        timer.join()


def test_a_ledger_change_wakes_the_membership_publisher():
    from types import SimpleNamespace

    from meshray.node.membership import Membership
    from meshray.scheduler.resources import NodeResources

    daemon = SimpleNamespace(node_id=b"\x01" * 16, resources=NodeResources({"CPU": 2.0}),
                             config=SimpleNamespace(token=None))
    membership = Membership(daemon, ["127.0.0.1:1"])
    membership._thread = threading.Thread(target=lambda: None)   # no etcd here
    membership.start()
    membership._thread.join()
    assert not membership._wake.is_set()
    assert daemon.resources.try_acquire({"CPU": 1.0})
    assert membership._wake.is_set()
    membership._wake.clear()
    daemon.resources.release({"CPU": 1.0})
    assert membership._wake.is_set()


def test_view_changes_wake_the_group_placer_only_when_there_are_groups(monkeypatch):
    from types import SimpleNamespace

    from meshray.node.membership import Membership

    daemon = SimpleNamespace(node_id=b"\x01" * 16, resources=None,
                             config=SimpleNamespace(token=None))
    membership = Membership(daemon, ["127.0.0.1:1"])
    pokes = []
    monkeypatch.setattr(membership.placer, "poke", lambda: pokes.append(1))
    membership._nodes_changed([_put(A, {"Address": "a"})])
    membership._avails_changed([])
    assert pokes == []
    monkeypatch.setattr(membership.pg_view, "has_groups", lambda: True)
    membership._nodes_changed([_delete(A)])
    membership._avails_changed([])
    assert pokes == [1, 1]


def test_availability_is_worth_publishing_at_once_only_when_room_appears_vanishes_or_moves_a_lot():
    from meshray.node.membership import availability_worth_publishing as worth

    total = {"CPU": 64.0, "GPU": 1.0}
    assert not worth({"CPU": 64.0}, {"CPU": 63.0}, total)          # one task of 64 CPUs
    assert not worth({"CPU": 60.0}, {"CPU": 63.0}, total)
    assert worth({"CPU": 64.0}, {"CPU": 57.0}, total)              # >= 10% of the total
    assert worth({"CPU": 1.0}, {}, total)                          # room vanished (0 is left out)
    assert worth({}, {"CPU": 1.0}, total)                          # room appeared
    assert worth({"CPU": 64.0, "GPU": 1.0}, {"CPU": 64.0}, total)  # the GPU was taken
    assert not worth({"CPU": 8.0}, {"CPU": 8.0}, total)
