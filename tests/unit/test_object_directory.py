"""The node's object directory (meshray/node/objects.py): an object's life
from PENDING to FREED, and what each change tells the daemon to do.

No process or store: values are plain ObjectValue records, holders and
subscribers plain ids, and each test compares the returned Effects (deliver,
free, became ready) and the entry's state with what the node must do.
"""
from __future__ import annotations

import pytest

from meshray.node.objects import (
    FREED,
    LOST,
    PENDING,
    READY,
    InvalidObjectTransition,
    ObjectDirectory,
)
from meshray.rpc.generated import meshray_pb2 as pb

OWNER, READER = 1, 2
LOCAL, FOREIGN = b"L" * 28, b"F" * 28


def _directory() -> ObjectDirectory:
    # Objects whose id starts with "L" are owned here.
    return ObjectDirectory(is_local=lambda object_id: object_id[:1] == b"L")


def _value(object_id: bytes, *contained: bytes) -> pb.ObjectValue:
    return pb.ObjectValue(object_id=object_id, inline_data=b"x", contained_ids=list(contained))


def _state(directory: ObjectDirectory, object_id: bytes):
    entry = dict(directory.entries()).get(object_id)
    return entry.state if entry is not None else FREED


def test_a_produced_value_is_delivered_to_whoever_waits_and_wakes_tasks_waiting_on_it():
    directory = _directory()
    directory.expect(LOCAL, OWNER)
    assert directory.subscribe(LOCAL, READER).deliver == []
    assert _state(directory, LOCAL) is PENDING and not directory.is_ready(LOCAL)
    value = _value(LOCAL)
    effects = directory.set_value(LOCAL, value)
    assert effects.deliver == [(READER, value)] and effects.became_ready == [LOCAL]
    assert effects.free == [] and _state(directory, LOCAL) is READY
    assert directory.subscribe(LOCAL, 3).deliver == [(3, value)]   # later readers: at once


def test_the_last_holder_leaving_frees_the_value_and_what_it_contained():
    directory = _directory()
    inner = b"L" + b"i" * 27
    directory.put_owned(inner, _value(inner), OWNER)
    outer = _value(LOCAL, inner)
    directory.put_owned(LOCAL, outer, OWNER)
    assert directory.remove_holder(inner, OWNER).free == []      # the container pins it
    effects = directory.remove_holder(LOCAL, OWNER)
    assert [v.object_id for v in effects.free] == [LOCAL, inner]
    assert len(directory) == 0


def test_a_local_object_still_being_produced_is_kept_without_references():
    directory = _directory()
    directory.expect(LOCAL, OWNER)
    assert directory.remove_holder(LOCAL, OWNER).free == []
    assert _state(directory, LOCAL) is PENDING
    # Produced with nobody left to read it: freed at once.
    effects = directory.set_value(LOCAL, _value(LOCAL))
    assert [v.object_id for v in effects.free] == [LOCAL] and LOCAL not in directory


def test_a_borrowed_object_is_fetched_once_and_unborrowed_when_dropped():
    directory = _directory()
    directory.add_holder(FOREIGN, READER)
    directory.subscribe(FOREIGN, READER)
    directory.subscribe(FOREIGN, 3)
    assert directory.drain() == ([FOREIGN], [], [FOREIGN])   # borrowed; asked its owner once
    directory.remove_holder(FOREIGN, READER)
    directory.remove_holder(FOREIGN, 3)
    assert directory.drain() == ([], [FOREIGN], []) and FOREIGN not in directory


def test_a_value_produced_twice_keeps_the_first_copy():
    directory = _directory()
    directory.expect(LOCAL, OWNER)
    first, second = _value(LOCAL), _value(LOCAL)
    directory.set_value(LOCAL, first)
    assert directory.set_value(LOCAL, second).free == [second]
    assert directory.get(LOCAL) is first


def test_a_lost_copy_waits_for_its_rebuilt_value_and_another_copy_replaces_it():
    directory = _directory()
    directory.put_owned(LOCAL, _value(LOCAL), OWNER)
    lost = directory.forget_value(LOCAL)
    assert lost is not None and _state(directory, LOCAL) is LOST
    assert directory.forget_value(LOCAL) is None                 # nothing more to lose
    assert directory.subscribe(LOCAL, READER).deliver == []      # waits for the rebuild
    rebuilt = _value(LOCAL)
    assert directory.set_value(LOCAL, rebuilt).deliver == [(READER, rebuilt)]
    copy = _value(LOCAL)
    directory.replace_value(LOCAL, copy)
    assert directory.get(LOCAL) is copy and _state(directory, LOCAL) is READY
    entry = dict(directory.entries())[LOCAL]
    assert [(str(a), str(b)) for a, b, _ in entry.story] == [
        ("PENDING", "READY"), ("READY", "LOST"), ("LOST", "READY"), ("READY", "READY")]


def test_an_illegal_move_raises_with_the_objects_story():
    directory = _directory()
    directory.put_owned(LOCAL, _value(LOCAL), OWNER)
    entry = dict(directory.entries())[LOCAL]
    directory.remove_holder(LOCAL, OWNER)
    assert entry.state is FREED
    with pytest.raises(InvalidObjectTransition) as caught:
        ObjectDirectory._move(LOCAL, entry, READY, "a value for a freed entry", _value(LOCAL))
    message = str(caught.value)
    assert f"object {LOCAL.hex()} cannot move from FREED to READY" in message
    assert "PENDING -> READY: produced" in message and "READY -> FREED: no reference left" in message


def test_a_process_that_went_away_releases_everything_it_held():
    directory = _directory()
    other = b"L" + b"o" * 27
    directory.put_owned(LOCAL, _value(LOCAL), READER)
    directory.put_owned(other, _value(other), OWNER)
    directory.add_holder(other, READER)
    effects = directory.drop_connection(READER)
    assert [v.object_id for v in effects.free] == [LOCAL]
    assert directory.holders_of(other) == {OWNER}


def test_an_actors_return_is_held_for_it_until_its_caller_registers_it():
    directory = _directory()
    actor, value = 9, _value(LOCAL)
    directory.put_handoff(LOCAL, value, actor)
    assert directory.holders_of(LOCAL) == {actor}
    directory.put_owned(LOCAL, value, OWNER)
    assert directory.holders_of(LOCAL) == {OWNER}                # the actor's hold dropped
    assert directory.put_handoff(LOCAL, value, actor).deliver == []   # too late: ignored
    assert directory.holders_of(LOCAL) == {OWNER}
