"""The caller's side of generator calls: the items of each stream, and waits.

A task's stream items reach its owner through the node, which holds them
for it until they are taken. An actor call's items come straight back on
the actor's call link (actor_client.py) and the node never hears of them,
so the stream itself holds a reference to each item until `next()` takes it
(or the generator is dropped). A stream that ends in failure (cancelled,
actor or worker died) gets one more item whose value is the error, so the
caller's next `next()` hands out a ref that raises it, as in Ray.

`StreamsMixin` is part of CoreWorker; it relies on its lock, values,
waiters and reference bookkeeping.
"""
from __future__ import annotations

import pickle
import time

from meshray import exceptions
from meshray.common import ids
from meshray.core import serialization
from meshray.core.object_ref import ObjectRef, ObjectRefGenerator
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["StreamsMixin", "stream_ready"]


class _Stream:
    __slots__ = ("items", "total", "held")

    def __init__(self):
        self.items: dict[int, bytes] = {}     # index (1-based) -> object id
        self.total: int | None = None         # how many items, once known
        self.held: dict[int, ObjectRef] = {}  # items held here until taken


def stream_ready(items: dict, total: int | None, index: int) -> str:
    """Item `index` (0-based) of a stream: "ready", "pending" or "finished"."""
    if index + 1 in items:
        return "ready"
    if total is not None and index >= total:
        return "finished"
    return "pending"


class StreamsMixin:
    # ------------------------------------------------------------ streams
    def open_stream(self, task_id: bytes, *, direct: bool = False):
        """Start tracking the stream of `task_id`. `direct`: an actor call's,
        whose items and end come on its call link, never from the node."""
        with self._lock:
            self._streams.setdefault(task_id, _Stream())
        if not direct:
            self._subscribe([ids.object_id_for(task_id, 0)])
        return task_id

    def _stream_arrived(self, stream: _Stream, value: pb.ObjectValue) -> None:
        """Record an item or the end of `stream` (the caller holds the lock)."""
        object_id = value.object_id
        index = ids.index_of(object_id)
        if index != 0:
            stream.items[index] = object_id
            return
        if not value.is_error:
            stream.total = pickle.loads(value.inline_data)
            return
        # The call failed as a whole: its error is the item after the last one.
        index = max(stream.items, default=0) + 1
        item_id = ids.object_id_for(ids.task_id_of(object_id), index)
        self._local_only.add(item_id)      # the node never hears of it
        stream.held[index] = ObjectRef(item_id)
        self._values[item_id] = pb.ObjectValue(object_id=item_id, inline_data=value.inline_data,
                                               is_error=True)
        stream.items[index] = item_id
        stream.total = index

    def deliver_stream_item(self, result: pb.TaskResult) -> None:
        """An item of an actor call's stream: held for the generator until taken."""
        if not result.returns:
            return
        object_id = result.returns[0].object_id
        index = ids.index_of(object_id)
        with self._lock:
            stream = self._streams.get(result.task_id)
            if (stream is not None and index > 0 and index not in stream.items
                    and ids.task_id_of(object_id) == result.task_id):
                self._local_only.add(object_id)
                stream.held[index] = ObjectRef(object_id)
        # Held: recorded as wanted. Not (the generator is gone, or a resent
        # call repeats an item): released, as an unwanted actor result.
        self.deliver_actor_result(result)

    def next_stream_item(self, task_id: bytes, index: int, timeout: float | None):
        wanted = index + 1
        with self._lock:
            stream = self._streams[task_id]
            while wanted not in stream.items:
                if stream.total is not None and index >= stream.total:
                    return None
                if self._lost:
                    raise exceptions.RaySystemError("lost the connection to the node daemon")
                self._changed.wait(1.0)
            object_id = stream.items[wanted]
            held = stream.held.pop(wanted, None)
        return held if held is not None else ObjectRef(object_id)

    def stream_status(self, task_id: bytes, index: int) -> str:
        """Item `index` of a stream: "ready", "pending", "finished" (no such item) or "closed"."""
        with self._lock:
            stream = self._streams.get(task_id)
            if stream is None:
                return "closed"
            return stream_ready(stream.items, stream.total, index)

    def close_stream(self, task_id: bytes) -> None:
        with self._lock:
            stream = self._streams.pop(task_id, None)
        if stream is None or self._closed:
            return
        # Items never handed out are released here; handed-out refs release
        # themselves, and so do the refs held for a direct stream (below).
        unclaimed = [oid for index, oid in stream.items.items()
                     if oid not in self._local_refs and index not in stream.held]
        if unclaimed:
            self._send(pb.ClientEvent(refs=pb.RefUpdate(remove=unclaimed)))
        stream.held.clear()

    # ------------------------------------------------------------ dynamic returns
    def put_error(self, error: BaseException) -> ObjectRef:
        """A new object whose value is `error` (a get raises it)."""
        object_id = ids.object_id_for(self._put_task_id, next(self._put_counter))
        value = pb.ObjectValue(object_id=object_id, is_error=True,
                               inline_data=serialization.serialize_error(error))
        self.mark_node_knows((object_id,))
        ref = ObjectRef(object_id)
        with self._lock:
            self._values[object_id] = value
        self._send(pb.ClientEvent(put=pb.PutObject(value=value)))
        return ref

    # ------------------------------------------------------------ wait
    def wait_generators(self, items: list, num_returns: int, timeout: float | None,
                        fetch_local: bool = True):
        """wait() over refs and ObjectRefGenerators: a generator is ready when
        its next item is, or once it has nothing more to give."""
        deadline = None if timeout is None else time.monotonic() + timeout
        refs = [item for item in items if isinstance(item, ObjectRef)]
        self._subscribe([ref.binary() for ref in refs])
        while True:
            with self._lock:
                ready = [item for item in items if self._item_ready(item)]
                watch = [oid for item in items if item not in ready
                         for oid in self._watch_ids(item)]
            if (len(ready) >= num_returns or not watch or self._lost
                    or (deadline is not None and time.monotonic() >= deadline)):
                break
            self._await_ids(watch, 1, deadline)
        ready = ready[:num_returns]
        if fetch_local:
            refs = [item for item in ready if isinstance(item, ObjectRef)]
            fetched = {id(ref) for ref in self._fetched_locally(refs, deadline)} if refs else set()
            ready = [item for item in ready
                     if not isinstance(item, ObjectRef) or id(item) in fetched]
        chosen = {id(item) for item in ready}
        return ready, [item for item in items if id(item) not in chosen]

    def _item_ready(self, item) -> bool:
        if isinstance(item, ObjectRef):
            return item.binary() in self._values
        return item.next_ready() or item.is_finished()

    @staticmethod
    def _watch_ids(item) -> list:
        """Ids whose arrival may make `item` ready."""
        if isinstance(item, ObjectRef):
            return [item.binary()]
        if not isinstance(item, ObjectRefGenerator) or item._closed:
            return []
        task_id = item._task_id
        return [ids.object_id_for(task_id, item._next_index + 1), ids.object_id_for(task_id, 0)]
