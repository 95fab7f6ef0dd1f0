"""The objects this node owns or borrows, as part of the node's state machine.

Why: an object's references come and go with messages from everywhere --
local processes take and drop refs, subscribe, put values and hand off an
actor's returns; tasks finish (here or on a peer that sends the values
home); peers borrow, claim and free; a node dies with copies or holders; a
copy turns out lost and is rebuilt from lineage. What each changes in the
directory (``node/objects.py``: who holds what, which values exist) and
what must then happen -- deliver a value, free one, wake a reader, tell an
owner what we borrow, place a task whose arguments are all ready -- is
decided here, inside :meth:`NodeState.handle`, so a value that becomes ready
places the tasks waiting for it in the same call, and every case is a unit
test that feeds events and compares instructions
(``tests/unit/test_object_life.py``).

The directory stays the pure table it was (its ``Effects`` say what a change
calls for, `_move` is the one writer of an entry's state and value); this
part is the only caller of its changing methods, turns its ``Effects`` into
instructions, and collects the borrow, unborrow and fetch notices it queues
into one `TellOwners` per event. The daemon and the peer duties only read it
(is a value ready, where does it live) and feed events.

Alternatives considered: letting each part of the daemon call the directory
and carry out its ``Effects`` itself (what this replaced: some 45 call sites
in four files, each choosing which effects to apply, and a separate
``ObjectsReady`` round trip into the task machine); a machine of its own for
objects (a task's arguments, returns and pins are one story with the task's
life: a submission expects its returns and pins its arguments, a finish
produces values and unpins, and a ready value releases waiting tasks).

Safety rests on: a handler finishes every directory change before any
instruction is carried out; a `Deliver` and the `ValuesReady` for a value
come after the change that made it ready, and a `FreeValue` only for a value
the directory has dropped.
"""
from __future__ import annotations

from meshray.node.objects import error_value, holder_node
from meshray.node.state import messages as m

__all__ = ["ObjectLife"]


class ObjectLife:
    """The object part of a `NodeState` (`state`): its directory
    (`state.objects`, an ``ObjectDirectory``) and the tasks waiting for
    arguments (`state.objects_ready`)."""

    def __init__(self, state):
        self._state = state
        self._objects = state.objects

    def handlers(self) -> dict:
        return {
            m.RefsChanged: self._refs_changed,
            m.Subscribe: self._subscribe,
            m.Put: self._put,
            m.StreamItem: self._stream_item,
            m.Produced: self._produced,
            m.ValueArrived: self._value_arrived,
            m.CopyMoved: lambda event, out: self._objects.replace_value(
                event.value.object_id, event.value),
            m.Lost: self._lost,
        }

    # ------------------------------------------------------------ effects
    def carry(self, effects, out: list) -> None:
        """Turn the directory's `effects` into instructions, in the order
        they must happen: values to whoever waits, freed values, then
        readers woken and tasks placed."""
        for holder, value in effects.deliver:
            out.append(m.Deliver(holder, value))
        for value in effects.free:
            out.append(m.FreeValue(value))
        if effects.became_ready:
            ready = tuple(effects.became_ready)
            out.append(m.ValuesReady(ready))
            self._state.objects_ready(ready, out)

    def notices(self, out: list) -> None:
        """What the directory queued for owners (borrows, unborrows, fetches)."""
        objects = self._objects
        if objects.borrows or objects.unborrows or objects.fetches:
            out.append(m.TellOwners(*objects.drain()))

    # ------------------------------------------------------------ a task's objects
    def submitted(self, task) -> None:
        """`task` was submitted here: its owner holds and waits for its returns,
        and its arguments (and refs inside them) stay alive until it finishes."""
        objects = self._objects
        holder = task.owner.conn_id
        for object_id in task.return_ids:
            objects.expect(object_id, holder)
            objects.subscribe(object_id, holder)       # new: nothing to deliver yet
        spec = task.spec
        if spec.arg_ref_ids:
            objects.pin(spec.arg_ref_ids)
        if spec.contained_ids:
            objects.pin(spec.contained_ids)

    # ------------------------------------------------------------ events
    def _refs_changed(self, event: m.RefsChanged, out: list) -> None:
        objects, holder = self._objects, event.holder
        for object_id in event.add:
            objects.add_holder(object_id, holder)
            if event.claim:
                self.carry(objects.complete_handoff(object_id), out)
        for object_id in event.remove:
            self.carry(objects.remove_holder(object_id, holder), out)

    def _subscribe(self, event: m.Subscribe, out: list) -> None:
        for object_id in event.object_ids:
            self.carry(self._objects.subscribe(object_id, event.holder), out)

    def _put(self, event: m.Put, out: list) -> None:
        value = event.value
        if event.handoff:
            self.carry(self._objects.put_handoff(value.object_id, value, event.holder), out)
        else:
            self.carry(self._objects.put_owned(value.object_id, value, event.holder), out)

    def _stream_item(self, event: m.StreamItem, out: list) -> None:
        objects, value = self._objects, event.value
        objects.expect(value.object_id, event.holder)
        objects.subscribe(value.object_id, event.holder)
        self.carry(objects.set_value(value.object_id, value), out)

    def _produced(self, event: m.Produced, out: list) -> None:
        objects, holder = self._objects, event.holder
        for value in event.values:
            if holder is not None:
                objects.add_holder(value.object_id, holder)
            self.carry(objects.set_value(value.object_id, value), out)
        if event.unpin:
            self.carry(objects.unpin(event.unpin), out)

    def _value_arrived(self, event: m.ValueArrived, out: list) -> None:
        value = event.value
        if value.object_id in self._objects:           # else nobody here wants it now
            self.carry(self._objects.set_value(value.object_id, value), out)

    def _lost(self, event: m.Lost, out: list) -> None:
        objects = self._objects
        for object_id in event.object_ids:
            objects.forget_value(object_id)
        if event.error is not None:
            for object_id in event.object_ids:
                self.carry(objects.set_value(object_id, error_value(object_id, event.error)), out)
        if event.pin:
            objects.pin(event.pin)

    # ------------------------------------------------------------ holders leaving
    def holder_gone(self, holder, out: list) -> None:
        """A local process left: everything it held or waited for is released."""
        self.carry(self._objects.drop_connection(holder), out)

    def node_gone(self, node_hex: str, out: list) -> None:
        """Peer `node_hex` died: its borrows, and the refs kept for its containers, go."""
        objects = self._objects
        for object_id, entry in list(objects.entries()):
            for holder in [h for h in entry.holders | entry.subscribers
                           if holder_node(h) == node_hex]:
                self.carry(objects.remove_holder(object_id, holder), out)
