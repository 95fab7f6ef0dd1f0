"""The node's object directory: which values exist, who holds them, who waits.

Pure state, no I/O. Every change returns what must now happen (send a value
to subscribers, delete a value from the store, wake what waits for it), so
reference counting and readiness can be tested without processes
(tests/unit/test_object_directory.py). The node state machine's object part
(node/state/object_life.py) is the only caller of the changing methods and
turns what they return into instructions; everything else only reads.

An object stays alive while anything holds it:
- a process that has an ObjectRef to it (a *holder*, tracked per connection,
  so a process that dies releases everything it held);
- a pending task that takes it as an argument (a *pin*);
- another live object that contains a ref to it (also a pin).

An entry's life, in `ObjectState` (checked against OBJECT_TRANSITIONS by
`_move`, the only writer of an entry's state and value; an illegal move
raises with the entry's story)::

    PENDING --value--> READY --only copy lost--> LOST --value (rebuilt, or the error)--> READY
    READY --pointed at another copy--> READY
    PENDING, READY, LOST --no reference left--> FREED (out of the directory)

PENDING: its task runs, or (a borrowed object) its owner has the value.
A local object is never FREED while PENDING or LOST: its producer still
delivers (a lost value is being rebuilt), and the owner must see it.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field

from meshray.common.state_names import StateName
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["ObjectDirectory", "ObjectEntry", "ObjectState", "OBJECT_TRANSITIONS",
           "InvalidObjectTransition", "Effects", "error_value", "error_of", "holder_node",
           "container_holder"]


class ObjectState(StateName):
    PENDING = "PENDING"
    READY = "READY"
    LOST = "LOST"
    FREED = "FREED"


PENDING, READY, LOST, FREED = (ObjectState.PENDING, ObjectState.READY, ObjectState.LOST,
                               ObjectState.FREED)
OBJECT_TRANSITIONS = {
    PENDING: frozenset({READY, FREED}),
    READY: frozenset({READY, LOST, FREED}),      # READY again: pointed at another copy
    LOST: frozenset({READY, FREED}),
    FREED: frozenset(),                          # gone from the directory
}


class InvalidObjectTransition(RuntimeError):
    def __init__(self, object_id: bytes, entry: "ObjectEntry", new, cause: str):
        story = "\n".join(f"  {old} -> {to}: {why}" for old, to, why in entry.story) or "  (none)"
        super().__init__(f"object {object_id.hex()} cannot move from {entry.state} to {new} "
                         f"({cause}). Its moves:\n{story}")
        self.object_id = object_id


def error_value(object_id: bytes, error: BaseException) -> pb.ObjectValue:
    """The value of an object whose task failed: reading it raises `error`."""
    return pb.ObjectValue(object_id=object_id, inline_data=pickle.dumps(error), is_error=True)


def error_of(value: pb.ObjectValue) -> BaseException:
    """The exception an error value (``is_error``) holds."""
    return pickle.loads(value.inline_data)


def holder_node(holder) -> str | None:
    """The node a holder id stands for ("node:<hex>" or "node:<hex>:<container>")."""
    if isinstance(holder, str) and holder.startswith("node:"):
        return holder[5:].split(":", 1)[0]
    return None


def container_holder(node_hex: str, container_id: bytes) -> str:
    """Holder id for refs kept alive for `node_hex` because container_id holds them."""
    return f"node:{node_hex}:{container_id.hex()}"


@dataclass
class ObjectEntry:
    state: ObjectState = PENDING        # written only by _move
    value: object = None                # rpc ObjectValue while READY (written only by _move)
    story: list = field(default_factory=list)   # (old, new, cause) of each move
    holders: set = field(default_factory=set)
    pins: int = 0
    subscribers: set = field(default_factory=set)
    ever_referenced: bool = False
    handoff_holder: object = None       # an actor holding a return until its caller registers
    fetching: bool = False              # foreign object: value requested from its owner
    registered_by_owner: bool = False

    @property
    def referenced(self) -> bool:
        return bool(self.holders) or self.pins > 0


@dataclass
class Effects:
    """What the daemon must carry out after a directory change."""
    deliver: list = field(default_factory=list)   # (conn_id, value)
    free: list = field(default_factory=list)      # values no longer referenced
    became_ready: list = field(default_factory=list)  # object ids now available

    def extend(self, other: "Effects") -> None:
        self.deliver.extend(other.deliver)
        self.free.extend(other.free)
        self.became_ready.extend(other.became_ready)


class ObjectDirectory:
    """Entries for objects this node owns, and borrow entries for foreign ones.

    `is_local(object_id)` says whether this node owns an object. A foreign
    entry exists while something here references the object; its creation
    and removal are queued in `borrows` / `unborrows`, and the first request
    for its value in `fetches`, for the daemon to tell the owner node.
    """

    def __init__(self, is_local=None):
        self._entries: dict[bytes, ObjectEntry] = {}
        self._is_local = is_local or (lambda _object_id: True)
        self.borrows: list[bytes] = []
        self.unborrows: list[bytes] = []
        self.fetches: list[bytes] = []

    def drain(self) -> tuple[list, list, list]:
        """Take the queued borrow / unborrow / fetch notices."""
        out = (self.borrows, self.unborrows, self.fetches)
        self.borrows, self.unborrows, self.fetches = [], [], []
        return out

    def entries(self):
        return self._entries.items()

    # -- queries ---------------------------------------------------------
    def get(self, object_id: bytes):
        entry = self._entries.get(object_id)
        return entry.value if entry else None

    def is_ready(self, object_id: bytes) -> bool:
        entry = self._entries.get(object_id)
        return entry is not None and entry.state is READY

    def __contains__(self, object_id: bytes) -> bool:
        return object_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def holders_of(self, object_id: bytes) -> set:
        entry = self._entries.get(object_id)
        return set(entry.holders) if entry else set()

    # -- changes ---------------------------------------------------------
    @staticmethod
    def _move(object_id: bytes, entry: ObjectEntry, new: ObjectState, cause: str,
              value=None) -> None:
        """Move `entry` to `new` (holding `value` when READY) -- the only writer of
        its state and value -- or raise with its story."""
        if new not in OBJECT_TRANSITIONS[entry.state]:
            raise InvalidObjectTransition(object_id, entry, new, cause)
        entry.story.append((entry.state, new, cause))
        entry.state = new
        entry.value = value

    def _entry(self, object_id: bytes) -> ObjectEntry:
        entry = self._entries.get(object_id)
        if entry is None:
            entry = self._entries[object_id] = ObjectEntry()
            if not self._is_local(object_id):
                self.borrows.append(object_id)
        return entry

    def expect(self, object_id: bytes, holder) -> None:
        """A task will produce this object; its submitter holds the ref."""
        entry = self._entry(object_id)
        entry.holders.add(holder)
        entry.ever_referenced = True

    def add_holder(self, object_id: bytes, holder) -> None:
        entry = self._entry(object_id)
        entry.holders.add(holder)
        entry.ever_referenced = True

    def remove_holder(self, object_id: bytes, holder) -> Effects:
        entry = self._entries.get(object_id)
        if entry is None:
            return Effects()
        entry.holders.discard(holder)
        entry.subscribers.discard(holder)
        return self._maybe_free(object_id, entry)

    def pin(self, object_ids) -> None:
        for object_id in object_ids:
            entry = self._entry(object_id)
            entry.pins += 1
            entry.ever_referenced = True

    def unpin(self, object_ids) -> Effects:
        effects = Effects()
        for object_id in object_ids:
            entry = self._entries.get(object_id)
            if entry is None:
                continue
            entry.pins = max(0, entry.pins - 1)
            effects.extend(self._maybe_free(object_id, entry))
        return effects

    def subscribe(self, object_id: bytes, conn) -> Effects:
        """Ask for the value; delivered now if present, else when produced."""
        entry = self._entry(object_id)
        if entry.state is READY:
            return Effects(deliver=[(conn, entry.value)])
        entry.subscribers.add(conn)
        if not entry.fetching and not self._is_local(object_id):
            entry.fetching = True
            self.fetches.append(object_id)
        return Effects()

    def set_value(self, object_id: bytes, value) -> Effects:
        """Record a produced value; deliver it to whoever is waiting.

        A value nobody references any more (all refs were dropped while its
        task ran) is freed at once; containers pin what they contain.
        """
        entry = self._entry(object_id)
        effects = Effects()
        if entry.state is READY:
            # A retried task produced it again: keep the first copy.
            effects.free.append(value)
            return effects
        self._move(object_id, entry, READY, "produced", value)
        self.pin(value.contained_ids)
        effects.became_ready.append(object_id)
        for conn in entry.subscribers:
            effects.deliver.append((conn, value))
        entry.subscribers.clear()
        effects.extend(self._maybe_free(object_id, entry))
        return effects

    def drop_connection(self, conn, object_ids=None) -> Effects:
        """A process went away: release everything it held."""
        effects = Effects()
        for object_id, entry in list(self._entries.items()):
            if conn in entry.holders or conn in entry.subscribers:
                entry.holders.discard(conn)
                entry.subscribers.discard(conn)
                effects.extend(self._maybe_free(object_id, entry))
        return effects

    def put_handoff(self, object_id: bytes, value, holder) -> Effects:
        """An actor's return value, held for the actor until its caller registers it."""
        entry = self._entry(object_id)
        if entry.registered_by_owner:
            return Effects()
        entry.holders.add(holder)
        entry.handoff_holder = holder
        return self.set_value(object_id, value)

    def put_owned(self, object_id: bytes, value, holder) -> Effects:
        """The owner registers a value (a put, or an actor return it received)."""
        entry = self._entry(object_id)
        entry.holders.add(holder)
        entry.ever_referenced = True
        entry.registered_by_owner = True
        if entry.state is READY:
            effects = Effects(deliver=[(conn, entry.value) for conn in entry.subscribers])
            entry.subscribers.clear()
        else:
            effects = self.set_value(object_id, value)
        if entry.handoff_holder is not None:
            handed, entry.handoff_holder = entry.handoff_holder, None
            effects.extend(self.remove_holder(object_id, handed))
        return effects

    def complete_handoff(self, object_id: bytes) -> Effects:
        """The owner (on another node) claimed an actor's return: drop the actor's hold."""
        entry = self._entries.get(object_id)
        if entry is None or entry.handoff_holder is None:
            if entry is not None:
                entry.registered_by_owner = True
            return Effects()
        entry.registered_by_owner = True
        handed, entry.handoff_holder = entry.handoff_holder, None
        return self.remove_holder(object_id, handed)

    def _maybe_free(self, object_id: bytes, entry: ObjectEntry) -> Effects:
        if entry.referenced or entry.subscribers or entry.state is FREED:
            return Effects()
        local = self._is_local(object_id)
        if entry.state is not READY and local:
            return Effects()            # still being produced (or rebuilt) here
        value = entry.value
        del self._entries[object_id]
        self._move(object_id, entry, FREED, "no reference left")
        if not local:
            self.unborrows.append(object_id)
        if value is None:
            return Effects()
        effects = Effects(free=[value])
        effects.extend(self.unpin(value.contained_ids))
        return effects

    def replace_value(self, object_id: bytes, value) -> None:
        """Point a READY entry at another copy (a pull, or a rebuilt value)."""
        entry = self._entries.get(object_id)
        if entry is not None and entry.state is READY:
            self._move(object_id, entry, READY, "another copy", value)

    def forget_value(self, object_id: bytes):
        """The only copy was lost: the entry waits for the value again (LOST)."""
        entry = self._entries.get(object_id)
        if entry is None or entry.state is not READY:
            return None
        lost = entry.value
        self._move(object_id, entry, LOST, "its only copy was lost")
        return lost
