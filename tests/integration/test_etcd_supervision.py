"""A node's embedded etcd is restarted when it dies, and the node's membership
survives etcd outages: at startup, just after init(), and errors of its own;
it reads from etcd, not its lagging view, whether a node is a member and
who the members are.

Real etcd members, real daemons and workers; the only fixed waits are the
ones a lease TTL requires (to prove leases are renewed across a restart).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from types import SimpleNamespace

import psutil
import pytest

from meshray import security
from meshray.coordination import supervisor as supervisor_mod
from meshray.coordination.client import AuthError, Coordinator
from meshray.common.death_signal import death_signal_prefix
from meshray.coordination.embedded import EmbeddedEtcd, free_port
from meshray.coordination.supervisor import EtcdSupervisor
from meshray.node import registry
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(120)

TOKEN = security.generate_token()
LEASE_TTL_S = 2.0


def _record(node_id: str) -> dict:
    return next(r for r in registry.read_records() if r["node_id"] == node_id)


def _node_log(node) -> str:
    with open(os.path.join(node.session_dir, "node.log"), errors="replace") as handle:
        return handle.read()


def _kill_etcd_and_wait_for_restart(node) -> int:
    old = _record(node.node_id)["etcd_pid"]
    os.kill(old, signal.SIGKILL)
    return wait_for(lambda: (_record(node.node_id)["etcd_pid"] != old
                             and _record(node.node_id)["etcd_pid"]), 30,
                    message="the supervisor restarted etcd")


@pytest.fixture
def ray():
    import meshray
    from meshray.core import state as state_mod

    meshray.init(num_cpus=2, _token=TOKEN, _lease_ttl=LEASE_TTL_S, log_to_driver=False)
    yield meshray, state_mod.state.local_node
    meshray.shutdown()


def test_sigkilled_embedded_etcd_comes_back_and_the_cluster_carries_on(ray):
    meshray, node = ray

    @meshray.remote
    class Counter:
        def __init__(self):
            self.n = 0

        def add(self):
            self.n += 1
            return self.n

    @meshray.remote
    def square(x):
        return x * x

    counter = Counter.remote()
    assert meshray.get(counter.add.remote()) == 1
    endpoint = node.info["etcd"]

    new_pid = _kill_etcd_and_wait_for_restart(node)
    assert psutil.Process(new_pid).ppid() == node.pid      # still the daemon's child
    assert _record(node.node_id)["etcd"] == endpoint        # same address
    log = _node_log(node)
    assert "exited with code -9; restarting it on the same data dir and ports" in log
    assert "embedded etcd %s restarted" % endpoint in log

    # Past two lease TTLs: the lease was renewed through the new process
    # (a lapsed lease would fence the workers and the actor would not answer).
    time.sleep(2 * LEASE_TTL_S)
    assert meshray.get(counter.add.remote(), timeout=30) == 2
    assert meshray.get(square.remote(7), timeout=30) == 49
    fresh = Counter.remote()
    assert meshray.get(fresh.add.remote(), timeout=30) == 1
    assert [n["Alive"] for n in meshray.nodes()] == [True]

    # The restarted member still refuses strangers.
    with pytest.raises(AuthError):
        Coordinator([endpoint], timeout=5).get("/meshray/v1/nodes/")


def test_etcd_killed_right_after_init_membership_recovers(ray):
    meshray, node = ray
    _kill_etcd_and_wait_for_restart(node)

    @meshray.remote
    def where():
        return meshray.get_runtime_context().get_node_id()

    assert meshray.get(where.remote(), timeout=30) == node.node_id
    wait_for(lambda: [n["Alive"] for n in meshray.nodes()] == [True], 30,
             message="the node is a live member again")
    time.sleep(2 * LEASE_TTL_S)                  # its lease keeps being renewed
    assert [n["Alive"] for n in meshray.nodes()] == [True]
    assert meshray.get(where.remote(), timeout=30) == node.node_id


# ------------------------------------------------------------ the supervisor
def test_a_restart_that_keeps_failing_is_an_error_in_the_log_until_it_works(tmp_path, caplog):
    etcd = EmbeddedEtcd(tmp_path / "e", private_peer=True, unsafe_no_fsync=True,
                        auth_password=security.etcd_password(TOKEN))
    supervisor = EtcdSupervisor(etcd, restart_timeout=5.0).start()
    binary = etcd._etcd_bin
    squatter = None
    try:
        with caplog.at_level(logging.WARNING, logger="meshray.coordination.supervisor"):
            # Someone takes the port of the dead member (restarts fail until
            # it is taken, so the supervisor cannot win the race for it).
            etcd._etcd_bin = str(tmp_path / "no-such-etcd")
            os.kill(etcd.pid, signal.SIGKILL)
            squatter = socket.socket()
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            wait_for(lambda: _bind(squatter, etcd.client_port), 10, message="port taken")
            squatter.listen()
            etcd._etcd_bin = binary
            wait_for(lambda: any(r.levelno == logging.ERROR
                                 and "address already in use" in r.getMessage()
                                 for r in caplog.records), 60,
                     message="an error naming the cause after repeated failures")
            error = next(r for r in caplog.records if r.levelno == logging.ERROR)
            assert ("failed to restart %d times in a row" % supervisor_mod.ALERT_AFTER
                    in error.getMessage())
            assert "still retrying" in error.getMessage().lower()
            assert supervisor.restarts == 0
            squatter.close()
            squatter = None
            wait_for(lambda: supervisor.restarts == 1 and etcd.healthy(), 60,
                     message="restarted once the port was free")
        member = Coordinator([etcd.endpoint], timeout=5,
                             **security.etcd_client_options(token=TOKEN, environ={}))
        member.put("/back", b"1")
        member.close()
    finally:
        if squatter is not None:
            squatter.close()
        supervisor.stop()
    assert not etcd.is_running() and not (tmp_path / "e").exists()


def _bind(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def test_a_member_dies_with_the_thread_that_started_it(tmp_path):
    if not death_signal_prefix():
        pytest.skip("no death signal off Linux")
    etcd = EmbeddedEtcd(tmp_path / "e", private_peer=True, unsafe_no_fsync=True)
    starter = threading.Thread(target=etcd.start)
    starter.start()
    starter.join()
    try:
        pid = etcd.pid
        wait_for(lambda: not psutil.pid_exists(pid)
                 or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10,
                 message="etcd killed when its starting thread ended")
    finally:
        etcd.stop()


# ----------------------------------------------------------- the membership
class FakeDaemon:
    """What Membership needs of a node daemon, with no daemon around it."""

    def __init__(self, token: str):
        self.node_id = os.urandom(16)
        self.config = SimpleNamespace(token=token)
        self.address = "127.0.0.1:1"
        self.resources = SimpleNamespace(available=SimpleNamespace(to_dict=lambda: {"CPU": 1.0}))
        self.peers = SimpleNamespace(on_view_change=lambda: None, on_lease_lost=lambda: None)
        self.placement = SimpleNamespace(on_change=lambda: None)

    def local_node_record(self) -> dict:
        return {"NodeID": self.node_id.hex(), "Resources": {"CPU": 1.0}}


def _registered(endpoint: str, daemon: FakeDaemon) -> bool:
    from meshray.coordination.keyspace import Keyspace
    client = Coordinator([endpoint], timeout=5,
                         **security.etcd_client_options(token=TOKEN, environ={}))
    try:
        return client.get(Keyspace().node(daemon.node_id))[0] is not None
    finally:
        client.close()


def test_membership_waits_out_an_etcd_that_is_down_at_startup(tmp_path):
    from meshray.node.membership import Membership
    etcd = EmbeddedEtcd(tmp_path / "e", client_port=free_port(), private_peer=True,
                        unsafe_no_fsync=True, auth_password=security.etcd_password(TOKEN))
    daemon = FakeDaemon(TOKEN)
    membership = Membership(daemon, [etcd.endpoint], ttl=LEASE_TTL_S)
    membership.start()
    try:
        assert not membership._registered.wait(1.0)      # nothing to register with yet
        etcd.start()
        assert membership._registered.wait(30)
        assert _registered(etcd.endpoint, daemon)
        assert membership._thread.is_alive()
    finally:
        membership.stop()
        etcd.stop()


def test_membership_reads_from_etcd_whether_a_node_is_a_member(tmp_path):
    # What decides whether a task pinned to a node the view does not show
    # yet fails: only a live, decodable record counts.
    from meshray.coordination.keyspace import Keyspace
    from meshray.node.membership import Membership
    etcd = EmbeddedEtcd(tmp_path / "e", private_peer=True, unsafe_no_fsync=True,
                        auth_password=security.etcd_password(TOKEN)).start()
    daemon = FakeDaemon(TOKEN)
    membership = Membership(daemon, [etcd.endpoint], ttl=LEASE_TTL_S)
    client = Coordinator([etcd.endpoint], timeout=5,
                         **security.etcd_client_options(token=TOKEN, environ={}))
    try:
        with pytest.raises(ConnectionError, match="not reached etcd"):
            membership.is_member(daemon.node_id.hex())
        membership.start()
        assert membership._registered.wait(30)
        assert membership.is_member(daemon.node_id.hex())
        assert not membership.is_member("ab" * 16)                 # never registered
        assert not membership.is_member("not a node id")
        client.put(Keyspace().node("cd" * 16), b"{not json")      # sealed, but no record
        assert not membership.is_member("cd" * 16)
    finally:
        client.close()
        membership.stop()
        etcd.stop()


def test_what_membership_tells_of_the_cluster_is_etcds_present_not_its_view(tmp_path):
    # A node that just registered is in etcd before the others' watches
    # show it: nodes() and cluster_resources() must list it all the same.
    from meshray.node.membership import Membership
    etcd = EmbeddedEtcd(tmp_path / "e", private_peer=True, unsafe_no_fsync=True,
                        auth_password=security.etcd_password(TOKEN)).start()
    first, second = FakeDaemon(TOKEN), FakeDaemon(TOKEN)
    asking = Membership(first, [etcd.endpoint], ttl=LEASE_TTL_S)
    joining = Membership(second, [etcd.endpoint], ttl=LEASE_TTL_S)
    try:
        asking.start()
        assert asking._registered.wait(30)
        assert [n["NodeID"] for n in asking.nodes()] == [first.node_id.hex()]
        asking._nodes_view.stop()                 # its view follows etcd no more
        joining.start()
        assert joining._registered.wait(30)
        assert second.node_id.hex() not in asking._records.snapshot()   # never seen here
        listed = {n["NodeID"]: n["Alive"] for n in asking.nodes()}
        assert listed == {first.node_id.hex(): True, second.node_id.hex(): True}
        assert asking.cluster_resources() == {"CPU": 2.0}
    finally:
        joining.stop()
        asking.stop()
        etcd.stop()


def test_an_error_in_the_membership_loop_is_logged_and_survived(tmp_path, monkeypatch, caplog):
    from meshray.coordination import mirror
    from meshray.node.membership import Membership
    etcd = EmbeddedEtcd(tmp_path / "e", private_peer=True, unsafe_no_fsync=True,
                        auth_password=security.etcd_password(TOKEN)).start()
    real_start = mirror.PrefixMirror.start
    faults = []

    def failing_once(self, timeout=None):
        if not faults:
            faults.append(self.prefix)
            raise RuntimeError("injected fault in a view")
        return real_start(self, timeout)

    monkeypatch.setattr(mirror.PrefixMirror, "start", failing_once)
    daemon = FakeDaemon(TOKEN)
    membership = Membership(daemon, [etcd.endpoint], ttl=LEASE_TTL_S)
    try:
        with caplog.at_level(logging.ERROR, logger="meshray.node.membership"):
            membership.start()
            assert membership._registered.wait(30)
        assert membership.loop_failures == 1 and membership._thread.is_alive()
        failure = next(r for r in caplog.records if "failed (failure 1 in a row)" in r.getMessage())
        assert failure.exc_info and "injected fault in a view" in str(failure.exc_info[1])
        assert _registered(etcd.endpoint, daemon)
        assert membership._nodes_view.watch is not None      # the failed view was replaced
    finally:
        membership.stop()
        etcd.stop()
