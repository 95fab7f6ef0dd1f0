"""Reference changes are coalesced without ever moving a remove before an earlier event."""
from __future__ import annotations

import queue
import threading

from meshray.core.core_worker import CoreWorker
from meshray.rpc.generated import meshray_pb2 as pb


def bare_worker() -> CoreWorker:
    """Only the outbox half of a CoreWorker: no node, no stream."""
    worker = CoreWorker.__new__(CoreWorker)
    worker._outbox = queue.SimpleQueue()
    worker._ref_lock = threading.Lock()
    worker._ref_batch = None
    return worker


def drained(worker: CoreWorker) -> list:
    worker._outbox.put(None)
    return [event for batch in worker._outgoing() for event in batch.events]


def test_consecutive_changes_share_one_update():
    worker = bare_worker()
    worker._queue_ref_change(b"a", True)
    worker._queue_ref_change(b"b", True)
    worker._queue_ref_change(b"c", False)
    (event,) = drained(worker)
    assert list(event.refs.add) == [b"a", b"b"] and list(event.refs.remove) == [b"c"]


def test_a_remove_never_moves_before_an_earlier_event():
    worker = bare_worker()
    worker._queue_ref_change(b"a", True)
    worker._send(pb.ClientEvent(submit=pb.SubmitTask(spec=pb.TaskSpec(name="uses a"))))
    worker._queue_ref_change(b"a", False)
    kinds = [(e.WhichOneof("kind"), list(e.refs.add), list(e.refs.remove)) for e in drained(worker)]
    assert kinds == [("refs", [b"a"], []), ("submit", [], []), ("refs", [], [b"a"])]


def test_a_re_add_after_a_remove_starts_a_new_update():
    worker = bare_worker()
    worker._queue_ref_change(b"a", False)
    worker._queue_ref_change(b"a", True)
    events = drained(worker)
    assert [(list(e.refs.add), list(e.refs.remove)) for e in events] == [([], [b"a"]), ([b"a"], [])]


def test_a_batch_taken_by_the_sender_is_closed():
    worker = bare_worker()
    worker._queue_ref_change(b"a", True)
    batch = worker._outbox.get()
    worker._as_event(batch)
    worker._queue_ref_change(b"b", True)    # must not join the batch already sent
    (event,) = drained(worker)
    assert list(event.refs.add) == [b"b"]
