"""ObjectRef: a name for a value that exists, or will exist, in the cluster.

Every live ObjectRef in a process counts as one local reference; the process's
core worker turns the first and last local reference into "hold"/"release"
messages to its node, which frees the value once nobody holds it. Pickling a
ref (into task arguments or another object) records it in the containing
value, so the container keeps it alive in between. A call's top-level ref
arguments travel as placeholders (`substitute_refs`) that the receiver swaps
for the values.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools

from meshray.common import id_types, ids
from meshray.core import serialization

__all__ = ["ObjectRef", "ObjectRefGenerator", "DynamicObjectRefGenerator", "ArgPlaceholder",
           "substitute_refs"]

_NIL = b"\xff" * ids.OBJECT_ID_LEN

# Set by the core worker when a process connects; None in a process that has
# not called init() (refs are then inert names).
_tracker = None


def set_tracker(tracker) -> None:
    global _tracker
    _tracker = tracker


@functools.total_ordering
class ObjectRef:
    __slots__ = ("_id", "_tracker", "__weakref__")

    def __init__(self, object_id: bytes, *, _borrowed: bool = True):
        if not isinstance(object_id, bytes) or len(object_id) != ids.OBJECT_ID_LEN:
            raise ValueError(f"object_id must be {ids.OBJECT_ID_LEN} bytes, got {object_id!r}")
        self._id = object_id
        tracker = _tracker
        self._tracker = tracker
        if tracker is not None:
            tracker.add_local_ref(object_id)

    def __del__(self):
        tracker = getattr(self, "_tracker", None)    # unset if __init__ refused the id
        if tracker is not None:
            try:
                tracker.remove_local_ref(self._id)
            except Exception:  # noqa: BLE001 - interpreter teardown
                pass

    def __reduce__(self):
        serialization.record_contained_ref(self._id)
        return (ObjectRef, (self._id,))

    @classmethod
    def from_binary(cls, object_id: bytes) -> "ObjectRef":
        return cls(bytes(object_id))

    @classmethod
    def from_hex(cls, hex_id: str) -> "ObjectRef":
        """The ref named by `hex()` output (a borrowed reference, as in Ray)."""
        try:
            raw = bytes.fromhex(hex_id)
        except (TypeError, ValueError):
            raw = b""
        if len(raw) != ids.OBJECT_ID_LEN:
            raise ValueError(f"ObjectRef.from_hex() expected {2 * ids.OBJECT_ID_LEN} hex "
                             f"digits, got {hex_id!r}")
        return cls(raw)

    @classmethod
    def nil(cls) -> "ObjectRef":
        return cls(_NIL)

    @classmethod
    def size(cls) -> int:
        return ids.OBJECT_ID_LEN

    def binary(self) -> bytes:
        return self._id

    def hex(self) -> str:
        return self._id.hex()

    def task_id(self) -> id_types.TaskID:
        """The id of the task that produces this object (for a put: the process's put task)."""
        return id_types.TaskID(ids.task_id_of(self._id))

    def is_nil(self) -> bool:
        return self._id == _NIL

    def __eq__(self, other):
        return isinstance(other, ObjectRef) and other._id == self._id

    def __hash__(self):
        return hash(self._id)

    # Ordered by id (the rest of the comparisons from functools.total_ordering),
    # so `sorted(refs)` and refs in sorted containers work; the order is that
    # of `hex()` (ids are all the same width). It says nothing about when the
    # objects were made.
    def __lt__(self, other):
        return self._id < other._id if isinstance(other, ObjectRef) else NotImplemented

    def __repr__(self):
        return f"ObjectRef({self._id.hex()})"

    def future(self) -> concurrent.futures.Future:
        """A concurrent.futures.Future resolved with the value (or its error)."""
        tracker = self._tracker or _tracker
        if tracker is None:
            raise RuntimeError("meshray is not initialized; call meshray.init() first")
        return tracker.future_for(self)

    def as_future(self) -> asyncio.Future:
        """An asyncio future of the value, on the running (or current) event loop."""
        return asyncio.wrap_future(self.future())

    def __await__(self):
        return self.as_future().__await__()


class ObjectRefGenerator:
    """The ObjectRefs a streaming generator task or actor call yields, as they are produced.

    Iterating blocks until the next item exists; when the task raised midway
    (or failed as a whole: cancelled, its actor or worker died), the item
    after the last good one is a ref whose `get` raises the error.
    """

    def __init__(self, task_id: bytes, tracker, *, direct: bool = False):
        self._task_id = task_id
        self._tracker = tracker
        self._next_index = 0
        self._closed = False
        # Keeps the stream's bookkeeping alive while this generator exists.
        # `direct`: an actor call's stream, which never passes the node.
        self._handle = tracker.open_stream(task_id, direct=direct)
        # The stream's end (its return, index 0) is held while the generator
        # lives: its arrival ends the stream, so a ref to it taken and dropped
        # meanwhile (completed(), cancel) must not release it. A task's
        # submission already made this process its holder.
        end_id = ids.object_id_for(task_id, 0)
        if not direct:
            tracker.mark_node_knows((end_id,))
        self._end = ObjectRef(end_id)

    def __iter__(self):
        return self

    def next_ready(self) -> bool:
        """True if `next()` would return at once with a ref whose value is ready."""
        return not self._closed and self._status() == "ready"

    def is_finished(self) -> bool:
        """True once the task has finished and every item it yielded has been taken."""
        return self._closed or self._status() in ("finished", "closed")

    def _status(self) -> str:
        return self._tracker.stream_status(self._task_id, self._next_index)

    def close(self) -> None:
        """Stop iterating: items not taken yet are released; the task runs on."""
        if not self._closed:
            self._closed = True
            self._tracker.close_stream(self._task_id)

    def __next__(self) -> ObjectRef:
        if self._closed:
            raise StopIteration
        ref = self._tracker.next_stream_item(self._task_id, self._next_index, timeout=None)
        if ref is None:
            raise StopIteration
        self._next_index += 1
        return ref

    def __aiter__(self):
        return self

    async def __anext__(self) -> ObjectRef:
        if self._closed:
            raise StopAsyncIteration
        loop = asyncio.get_running_loop()
        ref = await loop.run_in_executor(
            None, self._tracker.next_stream_item, self._task_id, self._next_index, None)
        if ref is None:
            raise StopAsyncIteration
        self._next_index += 1
        return ref

    def completed(self) -> ObjectRef:
        """A ref that resolves once the generator task has finished."""
        return self._end

    def __del__(self):
        try:
            self._tracker.close_stream(self._task_id)
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass

    def __repr__(self):
        return f"ObjectRefGenerator(task={self._task_id.hex()})"


class DynamicObjectRefGenerator:
    """The one return of a `num_returns="dynamic"` call: a ref to each value it yielded.

    Every value exists by the time this object does; if the function raised
    midway, the last ref holds that error. Picklable, like any refs.
    """

    def __init__(self, refs):
        self._refs = list(refs)

    def __iter__(self):
        return iter(self._refs)

    def __len__(self):
        return len(self._refs)

    def __repr__(self):
        return f"DynamicObjectRefGenerator({len(self._refs)} refs)"


class ArgPlaceholder:
    """Stands for the i-th top-level ObjectRef argument inside args_blob."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __reduce__(self):
        return (ArgPlaceholder, (self.index,))


def substitute_refs(args: tuple, kwargs: dict):
    """Top-level ObjectRefs become placeholders the receiver resolves.

    Returns (args, kwargs, ref ids in placeholder order, the refs themselves
    to keep alive until the call is queued).
    """
    arg_refs: list[bytes] = []
    keepalive: list = []

    def substitute(value):
        if isinstance(value, ObjectRef):
            arg_refs.append(value.binary())
            keepalive.append(value)
            return ArgPlaceholder(len(arg_refs) - 1)
        return value

    return ([substitute(a) for a in args], {k: substitute(v) for k, v in kwargs.items()},
            arg_refs, keepalive)
