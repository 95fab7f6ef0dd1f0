"""All watches of a Coordinator on one etcd Watch stream, against a real etcd.

Each watch must keep, on the shared stream, what a watch on a stream of its
own guaranteed: exactly its events in revision order, resumption from its own
revision when the stream breaks, a re-list of its own prefix (and no other)
after compaction, and a cancel that stops it alone. etcd's own gauges
(`etcd_debugging_mvcc_watch_stream_total`, `..._watcher_total`) say how many
streams and watches the server holds.
"""
from __future__ import annotations

import threading
import uuid

import pyetcd
import pytest
from pyetcd import etcdrpc

from meshray.coordination.client import Coordinator, Delete, Put
from meshray.coordination.embedded import EmbeddedEtcd
from meshray.scale.scale_test import etcd_counter
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(90)

STREAMS = "etcd_debugging_mvcc_watch_stream_total"
WATCHERS = "etcd_debugging_mvcc_watcher_total"


class Recorder:
    """What one watch delivered: (kind, key, value, revision) tuples and resets."""

    def __init__(self):
        self.lock = threading.Lock()
        self.events: list[tuple] = []
        self.resets: list[tuple[dict, int]] = []

    def on_events(self, batch):
        with self.lock:
            self.events.extend((e.kind, e.key, e.value, e.mod_revision) for e in batch)

    def on_reset(self, items, revision):
        with self.lock:
            self.resets.append(({kv.key: kv.value for kv in items}, revision))

    def seen(self) -> list[tuple]:
        with self.lock:
            return list(self.events)


def _prefixes(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"/ws-{tag}/{i}/" for i in range(n)]


def _gauge(server: EmbeddedEtcd, name: str) -> float:
    return etcd_counter(server.endpoint, name)


def _compact(etcd, revision: int) -> None:
    raw = pyetcd.client(etcd.host, etcd.client_port, timeout=5)
    try:
        raw.compact(revision, physical=True)
    finally:
        raw.close()


@pytest.fixture
def coord(etcd):
    """A Coordinator of the test's own, so its watch stream is the test's."""
    with Coordinator([etcd.endpoint], timeout=5.0) as own:
        yield own


def test_four_watches_use_one_stream_and_one_watch_thread(coord, etcd):
    before_threads = set(threading.enumerate())
    streams, watchers = _gauge(etcd, STREAMS), _gauge(etcd, WATCHERS)
    rev = coord.put("/ws-seed", b"x")
    handles = [coord.watch_prefix(p, rev + 1, lambda batch: None) for p in _prefixes(4)]
    try:
        assert all(h.wait_established(10) for h in handles)
        assert _gauge(etcd, STREAMS) == streams + 1
        assert _gauge(etcd, WATCHERS) == watchers + 4
        added = set(threading.enumerate()) - before_threads
        watch_threads = [t for t in added if t.name.startswith("meshray-watch")]
        assert len(watch_threads) == 1, sorted(t.name for t in added)
        # ours, gRPC's request sender for the one stream, its channel poller
        assert len(added) <= 3, sorted(t.name for t in added)
        assert all(h._thread is watch_threads[0] for h in handles)
    finally:
        for h in handles:
            h.cancel()
    # The last cancel ends the stream and the thread; nothing waits on etcd.
    wait_for(lambda: _gauge(etcd, STREAMS) == streams, 10, message="the stream closed")
    assert _gauge(etcd, WATCHERS) == watchers
    wait_for(lambda: not any(t.is_alive() for t in watch_threads), 10,
             message="the watch thread ended")


def test_each_prefix_gets_exactly_its_events_in_order(coord):
    outer, other, quiet = _prefixes(3)
    inner = outer + "sub/"          # nested in outer: its keys belong to both
    start = coord.put(outer + "seed", b"0") + 1
    names = (outer, inner, other, quiet)
    recorders = {p: Recorder() for p in names}
    handles = [coord.watch_prefix(p, start, recorders[p].on_events) for p in names]
    expected: dict[str, list[tuple]] = {p: [] for p in names}

    def note(kind, key, value, revision):
        for p in names:
            if key.startswith(p):
                expected[p].append((kind, key, value, revision))

    try:
        for i in range(30):
            key = (outer, inner, other)[i % 3] + f"k{i % 4}"
            note("put", key, str(i).encode(), coord.put(key, str(i)))
            if i % 7 == 6:
                note("delete", key, None, coord.txn([], [Delete(key)]).revision)
        result = coord.txn([], [Put(other + "t", b"a"), Put(inner + "t", b"b"),
                                Delete(outer + "seed")])
        note("put", other + "t", b"a", result.revision)
        note("put", inner + "t", b"b", result.revision)
        note("delete", outer + "seed", None, result.revision)
        coord.put("/ws-elsewhere/" + outer, b"not watched")
        for p in names:
            wait_for(lambda p=p: len(recorders[p].seen()) >= len(expected[p]), 10,
                     message=f"events under {p}")
        for p in names:
            assert recorders[p].seen() == expected[p], p
        assert expected[quiet] == [] and expected[inner] and expected[other]
        assert handles[0].revision == result.revision
    finally:
        for h in handles:
            h.cancel()


def test_cancelling_one_watch_leaves_the_others_delivering(coord, etcd):
    first, second, third = _prefixes(3)
    start = coord.put("/ws-seed", b"x") + 1
    recorders = [Recorder() for _ in range(3)]
    handles = [coord.watch_prefix(p, start, r.on_events)
               for p, r in zip((first, second, third), recorders)]
    try:
        assert all(h.wait_established(10) for h in handles)
        watchers = _gauge(etcd, WATCHERS)
        opened = coord._watch_stream.streams_opened
        coord.put(second + "a", b"1")
        wait_for(lambda: len(recorders[1].seen()) == 1, 10, message="second's first event")

        handles[1].cancel()
        assert not handles[1].active
        # A WatchCancelRequest on the same stream: etcd drops one watcher,
        # and no stream was opened again.
        wait_for(lambda: _gauge(etcd, WATCHERS) == watchers - 1, 10,
                 message="etcd dropped the cancelled watcher")
        revs = [coord.put(p + "b", b"2") for p in (first, second, third)]
        wait_for(lambda: recorders[0].seen() and recorders[2].seen(), 10,
                 message="the others still deliver")
        assert recorders[0].seen() == [("put", first + "b", b"2", revs[0])]
        assert recorders[2].seen() == [("put", third + "b", b"2", revs[2])]
        assert [e[1] for e in recorders[1].seen()] == [second + "a"]
        assert handles[0].active and handles[2].active
        assert coord._watch_stream.streams_opened == opened
    finally:
        for h in handles:
            h.cancel()


def test_cancelled_call_resumes_each_watch_from_its_own_revision(coord):
    """The stream breaks mid-burst: every watch resumes where it was, with
    nothing lost or repeated, though each had seen a different amount."""
    prefixes = _prefixes(3)
    # Each watch starts at its own point of a shared history.
    revs = [coord.put(p + "old", b"0") for p in prefixes]
    recorders = [Recorder() for _ in prefixes]
    handles = [coord.watch_prefix(p, rev, r.on_events)
               for p, rev, r in zip(prefixes, revs, recorders)]
    expected = [[("put", p + "old", b"0", rev)] for p, rev in zip(prefixes, revs)]
    writer = Coordinator(coord.endpoints, timeout=5.0)
    try:
        assert all(h.wait_established(10) for h in handles)
        stream = coord._watch_stream
        done = threading.Event()

        def write():
            for i in range(150):
                j = i % 3 if i < 60 else (0 if i % 2 else 2)   # a quiet spell for 1
                key = f"{prefixes[j]}k{i % 5}"
                expected[j].append(("put", key, str(i).encode(), writer.put(key, str(i))))
            done.set()

        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        wait_for(lambda: len(recorders[0].seen()) > 10, 10, message="the burst arrives")
        stream._call.grpc_call.cancel()        # break the stream under the watches
        for j, p in enumerate(prefixes):       # written while it is broken
            expected[j].append(("put", p + "gap", b"g", writer.put(p + "gap", b"g")))
        assert done.wait(30)
        wait_for(lambda: stream.streams_opened >= 2, 10, message="a new stream")
        for exp in expected:                   # two writers: order by revision
            exp.sort(key=lambda event: event[3])
        for r, exp in zip(recorders, expected):
            wait_for(lambda r=r, exp=exp: len(r.seen()) >= len(exp), 15,
                     message="every watch caught up")
        for r, exp in zip(recorders, expected):
            assert r.seen() == exp
        assert [h.revision for h in handles] == [exp[-1][3] for exp in expected]
    finally:
        writer.close()
        for h in handles:
            h.cancel()


def test_restarted_member_resumes_every_watch_without_loss(tmp_path):
    server = EmbeddedEtcd(tmp_path / "r", unsafe_no_fsync=True).start()
    c = Coordinator([server.endpoint], timeout=5.0)
    try:
        prefixes = _prefixes(4)
        recorders = [Recorder() for _ in prefixes]
        first = [c.put(p + "a", b"1") for p in prefixes]
        handles = [c.watch_prefix(p, rev, r.on_events)
                   for p, rev, r in zip(prefixes, first, recorders)]
        # Some watches saw more than others before the member died.
        extra = c.put(prefixes[0] + "b", b"2")
        wait_for(lambda: len(recorders[0].seen()) == 2, 10, message="first events")
        server.kill()
        server.start()                     # same data dir and ports
        second = [c.put(p + "c", b"3") for p in prefixes]
        for r in recorders:
            wait_for(lambda r=r: r.seen() and r.seen()[-1][1].endswith("c"), 20,
                     message="events after the restart")
        for i, (p, r) in enumerate(zip(prefixes, recorders)):
            want = [("put", p + "a", b"1", first[i])]
            if i == 0:
                want.append(("put", p + "b", b"2", extra))
            want.append(("put", p + "c", b"3", second[i]))
            assert r.seen() == want
        assert all(h.active and h.error is None for h in handles)
    finally:
        c.close()
        server.stop()


def test_compaction_relists_only_the_prefix_that_fell_behind(coord, etcd):
    behind, current, strict = _prefixes(3)
    old = coord.put(behind + "a", b"1")
    coord.put(behind + "gone", b"1")
    coord.put(strict + "a", b"1")
    coord.delete(behind + "gone")
    now = coord.put(behind + "a", b"2")
    _compact(etcd, now)
    live = Recorder()
    live_handle = coord.watch_prefix(current, now + 1, live.on_events, live.on_reset)
    assert live_handle.wait_established(10)
    opened = coord._watch_stream.streams_opened

    stale = Recorder()
    stale_handle = coord.watch_prefix(behind, old, stale.on_events, stale.on_reset)
    # No on_reset: this one must stop with an error, and only it.
    strict_handle = coord.watch_prefix(strict, old, lambda batch: None)
    try:
        wait_for(lambda: stale.resets, 10, message="the compacted watch re-listed")
        items, revision = stale.resets[0]
        assert items == {behind + "a": b"2"} and revision >= now
        wait_for(lambda: strict_handle.error is not None, 10, message="strict watch stopped")
        assert "compaction" in str(strict_handle.error) and not strict_handle.active

        later = [coord.put(p + "z", b"after") for p in (behind, current)]
        wait_for(lambda: stale.seen() and live.seen(), 10, message="both deliver on")
        assert stale.seen() == [("put", behind + "z", b"after", later[0])]
        assert live.seen() == [("put", current + "z", b"after", later[1])]
        assert live.resets == [] and stale_handle.active and live_handle.active
        assert coord._watch_stream.streams_opened == opened     # no stream was reopened
    finally:
        for h in (live_handle, stale_handle, strict_handle):
            h.cancel()


def _grant_read(root: Coordinator, user: str, password: str, prefix: str) -> None:
    """A user who may read (and so watch) ``prefix`` only."""
    ep, md = root._endpoint(), root._metadata()
    ep.auth.UserAdd(etcdrpc.AuthUserAddRequest(name=user, password=password),
                    timeout=5, metadata=md)
    ep.auth.RoleAdd(etcdrpc.AuthRoleAddRequest(name=user), timeout=5, metadata=md)
    start = prefix.encode()
    ep.auth.RoleGrantPermission(etcdrpc.AuthRoleGrantPermissionRequest(
        name=user, perm=etcdrpc.Permission(permType=etcdrpc.Permission.READ, key=start,
                                           range_end=start[:-1] + bytes([start[-1] + 1]))),
        timeout=5, metadata=md)
    ep.auth.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user=user, role=user),
                          timeout=5, metadata=md)


def test_a_refused_watch_ends_alone(tmp_path):
    """etcd refuses a watch its user may not read: that watch stops with the
    reason (after one login to rule out a stale token); its neighbours on the
    stream deliver on."""
    server = EmbeddedEtcd(tmp_path / "a", unsafe_no_fsync=True, auth_password="root-pw").start()
    root = Coordinator([server.endpoint], timeout=5.0, user=server.auth_user,
                       password="root-pw")
    try:
        _grant_read(root, "reader", "reader-pw", "/ok/")
        reader = Coordinator([server.endpoint], timeout=5.0, user="reader",
                             password="reader-pw")
        try:
            seen = Recorder()
            start = root.put("/ok/seed", b"0") + 1
            allowed = reader.watch_prefix("/ok/", start, seen.on_events)
            refused = reader.watch_prefix("/secret/", start, lambda batch: None)
            wait_for(lambda: refused.error is not None, 15, message="the refusal")
            assert "permission denied" in str(refused.error) and not refused.active
            rev = root.put("/ok/k", b"1")
            wait_for(lambda: seen.seen(), 10, message="the allowed watch delivers")
            assert seen.seen() == [("put", "/ok/k", b"1", rev)]
            assert allowed.active and allowed.error is None
        finally:
            reader.close()
    finally:
        root.close()
        server.stop()


def test_watch_thread_survives_a_cancel_from_inside_a_callback(coord):
    """A callback may cancel its own watch (or another): no deadlock, and the
    stream goes on for the rest."""
    first, second = _prefixes(2)
    start = coord.put("/ws-seed", b"x") + 1
    later = Recorder()
    handles = {}

    def cancel_self(batch):
        handles["first"].cancel()

    handles["first"] = coord.watch_prefix(first, start, cancel_self)
    handles["second"] = coord.watch_prefix(second, start, later.on_events)
    try:
        coord.put(first + "a", b"1")
        wait_for(lambda: not handles["first"].active, 10, message="first cancelled itself")
        rev = coord.put(second + "a", b"1")
        wait_for(lambda: later.seen(), 10, message="second still delivers")
        assert later.seen() == [("put", second + "a", b"1", rev)]
    finally:
        for h in handles.values():
            h.cancel()


def test_a_range_watch_and_listing_hold_exactly_the_keys_before_its_end(coord, etcd):
    (base,) = _prefixes(1)
    for key in ("a0", "a9", "b0", "bz", "c0", "d"):
        coord.put(base + key, b"old")
    items, revision = coord.get_prefix(base + "a9", end=base + "c0")
    assert [kv.key for kv in items] == [base + "a9", base + "b0", base + "bz"]
    with pytest.raises(ValueError, match="end="):
        coord.get_prefix(base + "b", end=base + "a")
    seen = Recorder()
    handle = coord.watch_prefix(base + "a9", revision + 1, seen.on_events, seen.on_reset,
                                end=base + "c0")
    try:
        assert handle.wait_established(10)
        for key in ("a0", "a9", "b5", "c0", "c00", "d"):
            coord.put(base + key, b"new")
        last = coord.put(base + "bz", b"last")
        wait_for(lambda: seen.seen() and seen.seen()[-1][3] == last, 10,
                 message="the range watch delivered its last key")
        assert [e[1] for e in seen.seen()] == [base + "a9", base + "b5", base + "bz"]
        _compact(etcd, last)     # a watch behind it re-lists the range, not the prefix
        stale = Recorder()
        behind = coord.watch_prefix(base + "a9", revision + 1, stale.on_events, stale.on_reset,
                                    end=base + "c0")
        try:
            wait_for(lambda: stale.resets, 10, message="the range watch re-listed")
            assert sorted(stale.resets[0][0]) == [base + k for k in ("a9", "b0", "b5", "bz")]
        finally:
            behind.cancel()
    finally:
        handle.cancel()
