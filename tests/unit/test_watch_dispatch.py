"""How the shared watch stream (coordination/watch.py) reads etcd's answers,
fed the responses etcd would send, without a server: whose a "created"
response is, where events go, and what a refusal does to the others."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from pyetcd import etcdrpc
from pyetcd.etcdrpc import kv_pb2

from meshray.coordination.watch import WatchHandle, _Call, _Restart, _WatchStream


class FakeCoordinator:
    """What a WatchHandle and the stream ask of their Coordinator here."""

    seal = None
    _user = None
    _token = None
    timeout = 1.0

    def __init__(self):
        self._watch_stream = _WatchStream(self)
        self.failovers = 0

    def _failover(self, ep):
        self.failovers += 1


def _setup(*prefixes):
    """A stream with an open call on which a watch per prefix was created."""
    coord = FakeCoordinator()
    stream = coord._watch_stream
    call = _Call(SimpleNamespace(address="etcd:2379"), None)
    stream._call = call
    seen = {p: [] for p in prefixes}
    handles = []
    for p in prefixes:
        handle = WatchHandle(coord, p.encode(), 5, seen[p].extend, None)
        stream._watches.append(handle)
        call.create(handle)
        handles.append(handle)
    return stream, call, handles, seen


def _sent(call) -> list[tuple]:
    out = []
    while not call.requests.empty():
        request = call.requests.get()
        if request is None:           # the end of the stream
            continue
        kind = request.WhichOneof("request_union")
        body = getattr(request, kind)
        out.append((kind, body.key if kind == "create_request" else body.watch_id))
    return out


def _created(watch_id, refused=""):
    return etcdrpc.WatchResponse(watch_id=watch_id, created=True, canceled=bool(refused),
                                 cancel_reason=refused)


def _put(watch_id, key, revision):
    return etcdrpc.WatchResponse(watch_id=watch_id, events=[kv_pb2.Event(
        type=kv_pb2.Event.PUT, kv=kv_pb2.KeyValue(key=key.encode(), value=b"v",
                                                  mod_revision=revision))])


def test_created_answers_are_matched_in_order_and_events_go_by_id():
    stream, call, (a, b), seen = _setup("/a/", "/b/")
    assert _sent(call) == [("create_request", b"/a/"), ("create_request", b"/b/")]
    stream._dispatch(call, _created(7))
    stream._dispatch(call, _created(3))
    assert (a._watch_id, b._watch_id) == (7, 3)
    assert a.wait_established(0) and b.wait_established(0)
    stream._dispatch(call, _put(3, "/b/x", 9))
    stream._dispatch(call, _put(7, "/a/x", 10))
    stream._dispatch(call, _put(42, "/a/stray", 11))      # no such watch: dropped
    assert [(e.key, e.mod_revision) for e in seen["/a/"]] == [("/a/x", 10)]
    assert [(e.key, e.mod_revision) for e in seen["/b/"]] == [("/b/x", 9)]
    assert (a.revision, b.revision) == (10, 9)


def test_a_watch_cancelled_while_being_created_is_cancelled_once_named():
    stream, call, (a, b), seen = _setup("/a/", "/b/")
    _sent(call)
    a.cancel()
    assert _sent(call) == []          # etcd has not named it yet
    stream._dispatch(call, _created(0))
    stream._dispatch(call, _created(1))
    assert _sent(call) == [("cancel_request", 0)]
    stream._dispatch(call, _put(0, "/a/late", 6))
    assert seen["/a/"] == [] and not a.active
    b.cancel()                        # the last one: the stream ends
    assert _sent(call) == [("cancel_request", 1)] and call.ended


def test_a_refusal_ends_only_that_watch():
    stream, call, (a, b, c), seen = _setup("/a/", "/b/", "/c/")
    stream._dispatch(call, _created(5))       # ids as a newer etcd gives them
    stream._dispatch(call, _created(-1, "etcdserver: permission denied"))
    stream._dispatch(call, _created(6))
    assert "permission denied" in str(b.error) and b._stopped.is_set()
    assert b not in stream._watches and a.error is None and c.error is None
    stream._dispatch(call, _put(6, "/c/x", 8))
    assert [e.key for e in seen["/c/"]] == ["/c/x"]


def test_a_refusal_restarts_the_stream_when_a_watch_holds_id_0():
    """etcd 3.5.1 answers a refusal with id 0 and then never sends the
    events of the watch it numbered 0: that watch must move to a new stream."""
    stream, call, (a, b), _ = _setup("/a/", "/b/")
    stream._dispatch(call, _created(0))
    with pytest.raises(_Restart):
        stream._dispatch(call, _created(0, "etcdserver: permission denied"))
    assert b.error is not None and a.error is None and a in stream._watches


def test_a_canceled_watch_etcd_did_not_say_why_resumes_on_a_new_stream():
    stream, call, (a,), _ = _setup("/a/")
    stream._dispatch(call, _created(2))
    with pytest.raises(_Restart):
        stream._dispatch(call, etcdrpc.WatchResponse(watch_id=2, canceled=True,
                                                     cancel_reason="etcdserver: no leader"))
    assert stream._coord.failovers == 1 and a.error is None
