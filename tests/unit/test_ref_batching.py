"""Reference changes are coalesced without ever moving a remove before an earlier event."""
from __future__ import annotations

import queue
import threading

from meshray.core.core_worker import CoreWorker
from meshray.rpc import call_link
from meshray.rpc.generated import meshray_pb2 as pb


class _Recorder:
    """Stands in for the session link: keeps what is written on it."""

    def __init__(self):
        self.frames: list = []

    def send(self, kind, payload=b"", now=True):
        self.frames.append((kind, payload))


def bare_worker() -> CoreWorker:
    """Only the outbox half of a CoreWorker: no node, a link that records."""
    worker = CoreWorker.__new__(CoreWorker)
    worker._outbox = queue.SimpleQueue()
    worker._ref_lock = threading.Lock()
    worker._ref_batch = None
    worker._link = _Recorder()
    worker._turn = threading.Lock()
    worker._wake = threading.Event()
    worker._last_write = 0.0
    return worker


def drained(worker: CoreWorker) -> list:
    """Every event written, in order, once the outbox is written to its end."""
    worker._outbox.put(None)
    worker._write_outbox()
    assert worker._link.frames[-1] == (call_link.END, b"")
    return [event for kind, payload in worker._link.frames if kind == call_link.CALLS
            for event in pb.ClientBatch.FromString(payload).events]


def test_an_event_on_a_quiet_session_is_written_at_once_and_ref_changes_only_wake_the_writer():
    worker = bare_worker()
    worker._queue_ref_change(b"a", True)
    assert worker._link.frames == [] and worker._wake.is_set()     # a finalizer never writes
    worker._send(pb.ClientEvent(submit=pb.SubmitTask(spec=pb.TaskSpec(name="t"))))
    (kind, payload), = worker._link.frames
    assert [e.WhichOneof("kind") for e in pb.ClientBatch.FromString(payload).events] == [
        "refs", "submit"]


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
