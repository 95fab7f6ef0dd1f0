"""The object part of the node's state machine (meshray/node/state/object_life.py).

Each test feeds events to a real `NodeState` over a real object directory
and compares the instructions it returns -- deliver a value, free one, wake
readers, tell owners, place a task -- and the entries it leaves, with what
the node must do. No daemon, process, store or event loop.
"""
from __future__ import annotations

from meshray.node.event_log import EventLog
from meshray.node.objects import LOST, READY, ObjectDirectory, container_holder
from meshray.node.state import messages as m
from meshray.node.task_lifecycle import TaskState as S
from meshray.rpc.generated import meshray_pb2 as pb
from tests.helpers import MachineNode

OWNER, READER, ACTOR = 1, 2, 3
PEER = "bb" * 28
LOCAL, ARG, INNER, RET = b"L" * 28, b"La" + b"\0" * 26, b"Li" + b"\0" * 26, b"Lr" + b"\0" * 26
FOREIGN = b"F" * 28


def _node(log=None) -> MachineNode:
    # Objects whose id starts with "L" are owned here; the rest are borrowed.
    return MachineNode(log=log, objects=ObjectDirectory(is_local=lambda oid: oid[:1] == b"L"))


def _value(object_id: bytes, *contained: bytes, location: str = "") -> pb.ObjectValue:
    return pb.ObjectValue(object_id=object_id, inline_data=b"x", contained_ids=list(contained),
                          in_store=bool(location), location=location)


def _state(node: MachineNode, object_id: bytes):
    entry = dict(node.objects.entries()).get(object_id)
    return entry.state if entry is not None else None


def test_a_submission_holds_its_returns_for_the_owner_and_keeps_its_arguments_until_it_finishes():
    node = _node()
    node.handle(m.Put(OWNER, _value(ARG)))
    task = node.task(queued=False, args=[ARG], returns=[RET])
    assert node.handle(m.Submitted(task)) == [m.Replace(task)]     # its argument exists
    assert node.objects.holders_of(RET) == {OWNER}
    # The owner drops its ref to the argument: the pending task keeps it.
    assert node.handle(m.RefsChanged(OWNER, remove=(ARG,))) == []
    assert _state(node, ARG) is READY
    ret, arg = _value(RET), node.objects.get(ARG)
    # It finishes: its value goes to the owner, readers wake, the argument is freed.
    assert node.handle(m.Produced((ret,), unpin=(ARG,))) == [
        m.Deliver(OWNER, ret), m.ValuesReady((RET,)), m.FreeValue(arg)]
    assert _state(node, ARG) is None and _state(node, RET) is READY


def test_a_value_made_ready_places_the_tasks_waiting_for_it_in_the_same_call():
    node = _node()
    task = node.task(queued=False, args=[ARG])
    assert node.handle(m.Submitted(task)) == []
    assert task.state is S.WAITING and node.state.waiting_on == {ARG: [task]}
    arg = _value(ARG)
    assert node.handle(m.Put(OWNER, arg)) == [m.ValuesReady((ARG,)), m.Replace(task)]
    assert node.state.waiting_on == {}


def test_subscribing_delivers_a_ready_value_now_and_a_pending_one_when_produced():
    node = _node()
    node.handle(m.Submitted(node.task(queued=False, returns=[RET])))
    assert node.handle(m.Subscribe(READER, (RET,))) == []
    ret = _value(RET)
    out = node.handle(m.Produced((ret,)))
    assert sorted(i.holder for i in out if isinstance(i, m.Deliver)) == [OWNER, READER]
    assert node.handle(m.Subscribe(READER, (RET,))) == [m.Deliver(READER, ret)]


def test_the_last_ref_dropped_frees_the_value_and_what_it_contains():
    node = _node()
    inner, outer = _value(INNER), _value(LOCAL, INNER)
    node.handle(m.Put(OWNER, inner))
    node.handle(m.Put(OWNER, outer))              # pins INNER while it lives
    assert node.handle(m.RefsChanged(OWNER, remove=(INNER,))) == []
    assert _state(node, INNER) is READY
    assert node.handle(m.RefsChanged(READER, add=(LOCAL,))) == []
    assert node.handle(m.RefsChanged(OWNER, remove=(LOCAL,))) == []   # READER still holds it
    assert node.handle(m.RefsChanged(READER, remove=(LOCAL,))) == [
        m.FreeValue(outer), m.FreeValue(inner)]
    assert len(node.objects) == 0


def test_a_process_leaving_releases_what_it_held_and_waited_for():
    node = _node()
    node.handle(m.Put(OWNER, _value(LOCAL)))
    node.handle(m.Submitted(node.task(queued=False, returns=[RET])))
    node.handle(m.RefsChanged(READER, add=(RET,)))
    node.handle(m.Subscribe(READER, (RET,)))
    value = node.objects.get(LOCAL)
    assert node.handle(m.OwnerLeft(node.owner)) == [m.FreeValue(value)]
    # RET is still being produced: its entry stays (its producer delivers to READER).
    assert _state(node, LOCAL) is None and _state(node, RET) is not None
    ret = _value(RET)
    assert node.handle(m.Produced((ret,))) == [m.Deliver(READER, ret), m.ValuesReady((RET,))]


def test_an_actor_return_is_held_for_its_caller_until_the_caller_claims_it():
    node = _node()
    ret = _value(RET)
    assert node.handle(m.Put(ACTOR, ret, handoff=True)) == [m.ValuesReady((RET,))]
    assert node.objects.holders_of(RET) == {ACTOR}
    # The caller registers it: the actor's hold goes, the caller's stays.
    assert node.handle(m.Put(OWNER, ret)) == []
    assert node.objects.holders_of(RET) == {OWNER}

    # A caller on another node claims it with a ref update.
    other = _value(LOCAL)
    node.handle(m.Put(ACTOR, other, handoff=True))
    assert node.handle(m.RefsChanged(f"node:{PEER}", add=(LOCAL,), claim=True)) == []
    assert node.objects.holders_of(LOCAL) == {f"node:{PEER}"}


def test_a_borrowed_object_tells_its_owner_of_the_borrow_the_fetch_and_the_release():
    node = _node()
    assert node.handle(m.RefsChanged(READER, add=(FOREIGN,))) == [
        m.TellOwners([FOREIGN], [], [])]
    assert node.handle(m.Subscribe(READER, (FOREIGN,))) == [m.TellOwners([], [], [FOREIGN])]
    assert node.handle(m.Subscribe(OWNER, (FOREIGN,))) == []        # asked once
    value = _value(FOREIGN, location=PEER)
    out = node.handle(m.ValueArrived(value))
    assert sorted(i.holder for i in out if isinstance(i, m.Deliver)) == [OWNER, READER]
    node.handle(m.RefsChanged(OWNER, remove=(FOREIGN,)))
    assert node.handle(m.RefsChanged(READER, remove=(FOREIGN,))) == [
        m.FreeValue(value), m.TellOwners([], [FOREIGN], [])]
    # A value arriving after everyone here let go is ignored.
    assert node.handle(m.ValueArrived(value)) == [] and len(node.objects) == 0


def test_a_dead_peer_releases_its_borrows_and_the_refs_kept_for_its_containers():
    node = _node()
    node.handle(m.Put(OWNER, _value(LOCAL)))
    node.handle(m.Put(OWNER, _value(INNER)))
    node.handle(m.RefsChanged(f"node:{PEER}", add=(LOCAL,)))
    node.handle(m.RefsChanged(container_holder(PEER, FOREIGN), add=(INNER,)))
    node.handle(m.RefsChanged(OWNER, remove=(LOCAL, INNER)))
    local, inner = node.objects.get(LOCAL), node.objects.get(INNER)
    out = node.handle(m.OwnerNodeDied(PEER))
    assert sorted(out, key=lambda i: i.value.object_id) == sorted(
        [m.FreeValue(local), m.FreeValue(inner)], key=lambda i: i.value.object_id)


def test_results_kept_for_a_peer_owner_stay_until_it_frees_them():
    node = _node()
    value = _value(RET, location="")
    holder = f"node:{PEER}"
    assert node.handle(m.Produced((value,), holder=holder)) == [m.ValuesReady((RET,))]
    assert node.objects.holders_of(RET) == {holder}
    assert node.handle(m.RefsChanged(holder, remove=(RET,))) == [m.FreeValue(value)]


def test_a_lost_copy_waits_for_its_rebuild_which_keeps_the_producers_arguments():
    node = _node()
    node.handle(m.Put(OWNER, _value(ARG)))
    node.handle(m.Put(OWNER, _value(RET, location=PEER)))
    assert node.handle(m.Lost((RET,), pin=(ARG,))) == []
    assert _state(node, RET) is LOST
    node.handle(m.RefsChanged(OWNER, remove=(ARG,)))
    assert _state(node, ARG) is READY                   # kept for the new run
    node.handle(m.Subscribe(READER, (RET,)))
    rebuilt = _value(RET, location="")
    arg = node.objects.get(ARG)
    assert node.handle(m.Produced((rebuilt,), unpin=(ARG,))) == [
        m.Deliver(READER, rebuilt), m.ValuesReady((RET,)), m.FreeValue(arg)]


def test_a_lost_copy_that_cannot_be_rebuilt_becomes_its_error():
    node = _node()
    node.handle(m.Put(OWNER, _value(RET, location=PEER)))
    node.handle(m.Subscribe(READER, (RET,)))            # delivered at once (ready)
    error = RuntimeError("its only copy was lost")
    out = node.handle(m.Lost((RET,), error=error))
    assert out == [m.ValuesReady((RET,))]
    value = node.objects.get(RET)
    assert value.is_error and _state(node, RET) is READY


def test_a_copy_moved_points_a_ready_entry_at_it_and_nothing_else():
    node = _node()
    node.handle(m.Put(OWNER, _value(RET, location=PEER)))
    moved = _value(RET, location="cc" * 28)
    assert node.handle(m.CopyMoved(moved)) == []
    assert node.objects.get(RET).location == "cc" * 28
    assert node.handle(m.CopyMoved(_value(LOCAL, location=PEER))) == []   # not here: ignored
    assert LOCAL not in node.objects


def test_a_streamed_item_is_held_by_and_delivered_to_its_owner():
    node = _node()
    item = _value(RET)
    assert node.handle(m.StreamItem(OWNER, item)) == [m.Deliver(OWNER, item),
                                                      m.ValuesReady((RET,))]
    assert node.objects.holders_of(RET) == {OWNER}


def test_the_event_log_keeps_lost_copies_not_the_frequent_object_events():
    log = EventLog(capacity=50)
    node = _node(log)
    node.handle(m.Put(OWNER, _value(RET, location=PEER)))
    node.handle(m.Subscribe(READER, (RET,)))
    node.handle(m.RefsChanged(READER, add=(RET,)))
    node.handle(m.Lost((RET,), pin=()))
    events = [e for e in log.tail() if e["kind"] == "event"]
    assert [(e["to"], e["id"]) for e in events] == [("Lost", RET.hex())]
