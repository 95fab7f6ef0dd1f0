"""The cluster's etcd refuses everyone without the credentials the token gives.

Against a real embedded etcd (the one `meshray.init()` starts), a real
standalone member and a real operator-managed one: anonymous gRPC, the JSON
gateway and `etcdctl` are refused reads and writes; members holding the token
log in with the derived password, also after etcd restarted and forgot their
session, and also when auth was turned on after they connected.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time

import grpc
import psutil
import pytest
from pyetcd import etcdrpc

from meshray import security
from meshray.coordination.client import AuthError, Coordinator, LeaseKeeper, Put
from meshray.coordination.embedded import EmbeddedEtcd, _http_json, find_etcd_binary, free_port
from meshray.coordination.keyspace import Keyspace
from tests.conftest import REPO, wait_for

pytestmark = pytest.mark.timeout(120)

TOKEN = security.generate_token()
WRONG = security.generate_token()
KEYS = Keyspace()


def _etcdctl(endpoint: str, *args: str, user: str | None = None) -> subprocess.CompletedProcess:
    binary = os.path.join(os.path.dirname(find_etcd_binary()), "etcdctl")
    if not os.access(binary, os.X_OK):
        pytest.skip("no etcdctl next to the etcd binary")
    argv = [binary, f"--endpoints={endpoint}", "--dial-timeout=3s", "--command-timeout=5s"]
    if user is not None:
        argv.append(f"--user={user}")
    return subprocess.run(argv + list(args), capture_output=True, text=True, timeout=30,
                          env={"ETCDCTL_API": "3", "PATH": os.environ.get("PATH", "")})


def _gateway(endpoint: str, path: str, body: dict) -> tuple[int, dict]:
    host, port = endpoint.rsplit(":", 1)
    return _http_json(host, int(port), "POST", path, 5, json.dumps(body).encode())


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _client(endpoint: str, token: str = TOKEN) -> Coordinator:
    return Coordinator([endpoint], timeout=5, **security.etcd_client_options(token=token,
                                                                             environ={}))


@pytest.fixture(scope="module")
def cluster():
    import meshray
    from meshray.core import state as state_mod

    meshray.init(num_cpus=1, _token=TOKEN, log_to_driver=False)
    node = state_mod.state.local_node
    yield meshray, node
    meshray.shutdown()


# ------------------------------------------------- the embedded etcd of init()
def test_embedded_etcd_refuses_reads_and_writes_without_credentials(cluster):
    _ray, node = cluster
    endpoint = node.info["etcd"]
    own_record = KEYS.node(bytes.fromhex(node.node_id))
    planted = "/meshray/v1/actors/planted"

    with grpc.insecure_channel(endpoint) as channel:
        kv = etcdrpc.KVStub(channel)
        with pytest.raises(grpc.RpcError, match="user name is empty"):
            kv.Range(etcdrpc.RangeRequest(key=own_record.encode()), timeout=5)
        with pytest.raises(grpc.RpcError, match="user name is empty"):
            kv.Put(etcdrpc.PutRequest(key=planted.encode(), value=b"x"), timeout=5)
        with pytest.raises(grpc.RpcError, match="authentication failed"):
            etcdrpc.AuthStub(channel).Authenticate(
                etcdrpc.AuthenticateRequest(name="root",
                                            password=security.etcd_password(WRONG)), timeout=5)

    for path, body in (("/v3/kv/range", {"key": _b64(own_record)}),
                       ("/v3/kv/put", {"key": _b64(planted), "value": _b64("x")})):
        status, answer = _gateway(endpoint, path, body)
        assert status != 200 and "user name is empty" in answer.get("error", ""), answer

    refused = _etcdctl(endpoint, "put", planted, "x")
    assert refused.returncode != 0 and "user name is empty" in refused.stderr
    refused = _etcdctl(endpoint, "get", own_record)
    assert refused.returncode != 0 and own_record not in refused.stdout
    refused = _etcdctl(endpoint, "get", own_record, user="root:not-the-password")
    assert refused.returncode != 0 and "authentication failed" in refused.stderr

    anonymous = Coordinator([endpoint], timeout=5)
    try:
        with pytest.raises(AuthError):
            anonymous.get(own_record)
        with pytest.raises(AuthError):
            anonymous.put(planted, b"x")
        watch = anonymous.watch_prefix("/meshray/", 1, lambda events: None)
        wait_for(lambda: watch.error is not None, 10, message="anonymous watch refused")
        assert "permission denied" in str(watch.error)
    finally:
        anonymous.close()

    # The holder of the token reads the cluster's records; nothing was planted.
    member = _client(endpoint)
    try:
        assert member.get(own_record)[0] is not None
        assert member.get(planted) == (None, 0)
    finally:
        member.close()
    allowed = _etcdctl(endpoint, "get", own_record, "--keys-only",
                       user=f"root:{security.etcd_password(TOKEN)}")
    assert allowed.returncode == 0 and own_record in allowed.stdout


def test_embedded_etcd_has_no_tcp_peer_port(cluster):
    """Raft on a TCP port would let any local user talk past auth."""
    _ray, node = cluster
    port = int(node.info["etcd"].rsplit(":", 1)[1])
    etcd = psutil.Process(node.info["etcd_pid"])
    listening = {c.laddr.port for c in etcd.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN}
    assert listening == {port}


def test_init_with_the_wrong_token_is_refused_by_etcd(cluster):
    import meshray
    _ray, node = cluster
    from meshray import _api
    with pytest.raises(ConnectionError, match="authentication failed"):
        _api._check_etcd_reachable(node.info["etcd"], WRONG)
    _api._check_etcd_reachable(node.info["etcd"], TOKEN)
    assert meshray.is_initialized()


# ------------------------------------------------------- a standalone member
def test_no_anonymous_write_lands_while_a_fresh_member_starts(tmp_path):
    """A local user hammering the port from before the member exists never
    gets a write in: auth is on before the port opens."""
    port = free_port()
    etcd = EmbeddedEtcd(tmp_path / "e", client_port=port, private_peer=True,
                        auth_password=security.etcd_password(TOKEN), unsafe_no_fsync=True)
    answers: list[int] = []
    done = threading.Event()

    def attacker():
        body = json.dumps({"key": _b64("/meshray/v1/nodes/evil"), "value": _b64("x")}).encode()
        while not done.is_set():
            try:
                answers.append(_http_json("127.0.0.1", port, "POST", "/v3/kv/put", 1, body)[0])
            except OSError:
                answers.append(0)       # not listening yet

    thread = threading.Thread(target=attacker)
    thread.start()
    try:
        etcd.start()
        wait_for(lambda: answers.count(400) >= 5, 10, message="attacker reached the port")
    finally:
        done.set()
        thread.join()
    try:
        assert 200 not in answers
        member = _client(etcd.endpoint)
        assert member.get("/meshray/v1/nodes/evil") == (None, 0)
        member.close()
    finally:
        etcd.stop()


def test_restart_keeps_auth_and_other_credentials_are_a_clear_error(tmp_path):
    etcd = EmbeddedEtcd(tmp_path / "e", private_peer=True, unsafe_no_fsync=True,
                        auth_password=security.etcd_password(TOKEN)).start()
    try:
        member = _client(etcd.endpoint)
        member.put("/kept", b"1")
        member.close()
        etcd.stop(remove_data=False)
        etcd.start()                                     # same data dir, same token
        member = _client(etcd.endpoint)
        assert member.get("/kept")[0] == b"1"
        member.close()
        with pytest.raises(AuthError):
            Coordinator([etcd.endpoint], timeout=5).get("/kept")
        etcd.stop(remove_data=False)

        other = EmbeddedEtcd(tmp_path / "e", private_peer=True, unsafe_no_fsync=True,
                             client_port=etcd.client_port,
                             auth_password=security.etcd_password(WRONG))
        with pytest.raises(RuntimeError, match="another token"):
            other.start(timeout=10)
        assert not other.is_running()
    finally:
        etcd.stop()


def test_members_log_in_again_after_etcd_forgot_their_session(tmp_path):
    """Simple tokens live in etcd's memory: a restarted member knows only
    those it replays from its log after the last snapshot. Once a snapshot
    covers the login, every request, watch and lease refresh is refused
    until the client logs in again."""
    etcd = EmbeddedEtcd(tmp_path / "e", private_peer=True, unsafe_no_fsync=True,
                        snapshot_count=1, auth_password=security.etcd_password(TOKEN)).start()
    member = _client(etcd.endpoint)
    try:
        seen: list[str] = []
        arrived = threading.Condition()

        def on_events(events):
            with arrived:
                seen.extend(e.key for e in events)
                arrived.notify_all()

        watch = member.watch_prefix("/w/", 1, on_events)
        assert watch.wait_established(10)
        keeper = LeaseKeeper(member, 2, lapse_is_loss=False)
        member.put("/w/before", b"1", lease=keeper.lease_id)
        stale = member._token
        for i in range(3):          # entries past the login: a snapshot covers it
            member.put(f"/w/filler{i}", b"x")

        etcd.kill()
        etcd.start()

        assert member.get("/w/before")[0] == b"1"               # read: logs in again
        assert member._token not in (None, stale)
        assert member.txn([], [Put("/w/after", b"2")]).succeeded
        with arrived:
            assert arrived.wait_for(lambda: "/w/after" in seen, 15), seen
        # The lease outlives its TTL: refreshes log in too.
        deadline = time.monotonic() + 3 * keeper.ttl
        while time.monotonic() < deadline:
            assert not keeper.lost
            time.sleep(0.2)
        assert member.lease_ttl(keeper.lease_id) > 0
        assert watch.error is None and watch.active
        keeper.stop()
    finally:
        member.close()
        etcd.stop()


# ---------------------------------------------- an etcd the operator manages
def test_operator_etcd_without_auth_then_with_the_derived_credentials(tmp_path):
    """Nodes holding the token join an etcd without auth (as in the compose
    file), keep working when the operator turns auth on with the password
    `meshray etcd-credentials` prints, and newcomers log in."""
    from meshray.testing.cluster import Cluster

    etcd = EmbeddedEtcd(tmp_path / "ops", unsafe_no_fsync=True).start()
    cluster = Cluster(etcd_endpoints=etcd.endpoint, shutdown_at_exit=False, lease_ttl=2.0)
    try:
        first = cluster.add_node(num_cpus=0)

        token_file = tmp_path / "token"
        security.write_token_file(token_file, cluster.token)
        env = dict(os.environ, PYTHONPATH=REPO)
        printed = subprocess.run([sys.executable, "-m", "meshray.cli.main", "etcd-credentials",
                                  "--token-file", str(token_file)], capture_output=True,
                                 text=True, env=env, timeout=60, cwd=REPO)
        assert printed.returncode == 0, printed.stderr
        fields = dict(line.split(": ", 1) for line in printed.stdout.splitlines())
        assert fields["user"] == "root"
        password = fields["password"]
        assert password == security.etcd_password(cluster.token)

        for step in (["user", "add", f"root:{password}"], ["user", "grant-role", "root", "root"],
                     ["auth", "enable"]):
            done = _etcdctl(etcd.endpoint, *step)
            assert done.returncode == 0, done.stderr
        refused = _etcdctl(etcd.endpoint, "get", "--prefix", "/meshray/")
        assert refused.returncode != 0

        second = cluster.add_node(num_cpus=0)         # logs in from the start
        time.sleep(3 * 2.0)                           # past a lease TTL: renewals logged in
        cluster.wait_for_nodes(timeout=10)
        assert cluster._registered() == {first.node_id, second.node_id}
    finally:
        cluster.shutdown()
        etcd.stop()


def test_cli_status_and_list_read_an_authenticated_cluster(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in (security.TOKEN_ENV, security.TOKEN_FILE_ENV)}
    env["MESHRAY_RUN_DIR"] = str(tmp_path / "run")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cli = [sys.executable, "-m", "meshray.cli.main"]
    started = subprocess.run(cli + ["start", "--num-cpus", "1"], capture_output=True, text=True,
                             env=env, timeout=60, cwd=REPO)
    try:
        assert started.returncode == 0, started.stderr
        etcd = next(line.split(":", 1)[1].strip() for line in started.stdout.splitlines()
                    if line.strip().startswith("etcd"))
        status = subprocess.run(cli + ["status", "--address", etcd], capture_output=True,
                                text=True, env=env, timeout=60, cwd=REPO)
        assert status.returncode == 0, status.stderr
        assert "alive" in status.stdout
        listing = subprocess.run(cli + ["list", "actors", "--address", etcd, "--json"],
                                 capture_output=True, text=True, env=env, timeout=60, cwd=REPO)
        assert listing.returncode == 0, listing.stderr
        assert json.loads(listing.stdout) == []
        refused = _etcdctl(etcd, "get", "--prefix", "/meshray/")
        assert refused.returncode != 0 and "user name is empty" in refused.stderr
    finally:
        subprocess.run(cli + ["stop"], capture_output=True, env=env, timeout=60, cwd=REPO)
