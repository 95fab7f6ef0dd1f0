"""Security of a real cluster: the token gate, TLS for gRPC and etcd, bind rule.

The gate tests send a pickle whose unpickling creates a marker file
(``__reduce__`` -> ``open(marker, "w")``) to a real node daemon and a real
actor over raw gRPC channels. The same payload sent *with* the token, through
the public API, does create its marker -- so the absence of the marker on the
unauthenticated path means the bytes were never unpickled, not that the
payload was inert.
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
import pickle
import socket
import stat
import subprocess
import sys
import threading
import time

import grpc
import pytest

from meshray import security
from tests.helpers import wait_for
from meshray.rpc import call_link
from meshray.rpc.factory import make_aio_channel, make_aio_server, make_channel, make_server
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.rpc.generated import meshray_pb2_grpc as pb_grpc
from meshray.rpc.tls import TlsConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKEN = security.generate_token()
WRONG = security.generate_token()

# The `ray` fixture: a private cluster whose token these tests know.
pytestmark = [pytest.mark.timeout(120),
              pytest.mark.meshray_init(num_cpus=2, _token=TOKEN, log_to_driver=False)]


class MakesFile:
    """Unpickling this runs open(path, "w"): a harmless stand-in for any code."""

    def __init__(self, path: str):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil(path) -> bytes:
    return pickle.dumps(MakesFile(path))


def _load_gen_certs():
    spec = importlib.util.spec_from_file_location("gen_certs",
                                                  os.path.join(REPO, "scripts", "gen_certs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    pytest.importorskip("cryptography")
    out = tmp_path_factory.mktemp("certs")
    paths = _load_gen_certs().generate(str(out))
    return paths


# ------------------------------------------------------------ the token gate
def test_payload_is_live_when_authenticated(ray, tmp_path):
    """Control: the same payload, sent with the token, is unpickled by a worker."""
    control = tmp_path / "control-marker"
    pickle.loads(evil(tmp_path / "local-marker")).close()
    assert (tmp_path / "local-marker").exists()

    @ray.remote
    def take(_value):
        return "ran"

    assert ray.get(take.remote(MakesFile(control)), timeout=30) == "ran"
    assert control.exists()


def _node_batch(marker) -> pb.ClientBatch:
    payload = evil(marker)
    function_id = b"\x01" * 16
    spec = pb.TaskSpec(task_id=os.urandom(24), job_id=b"\x00\x00\x00\x01",
                       function_id=function_id, name="evil", args_blob=payload, num_returns=1)
    return pb.ClientBatch(events=[
        pb.ClientEvent(hello=pb.Hello(role="driver", worker_id=os.urandom(16), pid=1)),
        pb.ClientEvent(register_function=pb.RegisterFunction(function_id=function_id,
                                                             pickled=payload, name="evil")),
        pb.ClientEvent(submit=pb.SubmitTask(spec=spec)),
        pb.ClientEvent(put=pb.PutObject(value=pb.ObjectValue(object_id=os.urandom(28),
                                                             inline_data=payload))),
    ])


def _expect_unauthenticated(call):
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if not isinstance(result, (bytes, pb.NodeInfoReply)):
            list(result)  # drain a response stream
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value
    assert "token" in (info.value.details() or "")


def _read(path) -> str:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


@pytest.mark.parametrize("metadata", [None, [("meshray-token", WRONG)]],
                         ids=["no-token", "wrong-token"])
def test_daemon_rejects_unauthenticated_grpc(local_node, tmp_path, metadata):
    node = local_node
    marker = tmp_path / "marker"
    with grpc.insecure_channel(node.address) as channel:
        _expect_unauthenticated(lambda: pb_grpc.NodeSessionStub(channel).Connect(
            iter([_node_batch(marker)]), metadata=metadata, timeout=10))
        _expect_unauthenticated(lambda: pb_grpc.NodeServiceStub(channel).GetNodeInfo(
            pb.NodeInfoRequest(), metadata=metadata, timeout=10))
    time.sleep(0.3)  # anything that would unpickle has had time to
    assert not marker.exists()
    log = os.path.join(node.session_dir, "node.log")
    reason = "no membership proof"   # a bare token in the metadata proves nothing either
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = _read(log)
        if "/meshray.NodeService/GetNodeInfo" in text and reason in text:
            break
        time.sleep(0.1)
    assert "rejected unauthenticated gRPC call to /meshray.NodeService/GetNodeInfo" in text
    assert reason in text


def test_daemon_session_link_refuses_strangers(local_node, tmp_path):
    """A session is opened only with the membership handshake: a wrong
    secret, none, or a call link's proof is refused, and frames sent
    without a handshake are never read as a session's batches."""
    node = local_node
    marker = tmp_path / "marker"
    address = node.local_address
    for token, magic in ((WRONG, call_link.SESSION_MAGIC), (None, call_link.SESSION_MAGIC),
                         (TOKEN, call_link.MAGIC)):
        with pytest.raises(call_link.LinkClosed):
            call_link.connect(address, token=token, magic=magic, tls=None)
    batch = _node_batch(marker).SerializeToString()
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(address[len("unix:"):])
    with raw:
        raw.settimeout(10)
        try:
            raw.sendall(call_link._HEADER.pack(len(batch), call_link.CALLS) + batch)
            assert raw.recv(4096) == b""        # closed without a word
        except ConnectionResetError:
            pass
    time.sleep(0.3)  # anything that would unpickle has had time to
    assert not marker.exists()
    log = os.path.join(node.session_dir, "node.log")
    wait_for(lambda: "session link: refused a connection without a valid membership proof"
             in _read(log), timeout=10, message="the refusal in the node's log")
    # The front door works.
    link = call_link.connect(address, token=TOKEN, magic=call_link.SESSION_MAGIC, tls=None)
    link.close()


def test_daemon_accepts_the_token(local_node):
    """Control for the raw-channel tests: the same channel kind with the token works."""
    node = local_node
    with make_channel(node.address, token=TOKEN, tls=None) as channel:
        reply = pb_grpc.NodeServiceStub(channel).GetNodeInfo(pb.NodeInfoRequest(), timeout=10)
    assert reply.node_id.hex() == node.node_id


def test_actor_rejects_unauthenticated_call(ray, tmp_path):
    from meshray.core import state as state_mod

    @ray.remote
    class Holder:
        def ping(self):
            return "pong"

        def take(self, _value):
            return "took"

    actor = Holder.remote()
    assert ray.get(actor.ping.remote(), timeout=30) == "pong"
    info = state_mod.state.core.request("actor_info", {"actor_id": actor._actor_id.hex()})
    addresses = [a for a in info["address"].split(",") if a]
    assert any(a.startswith("unix:") for a in addresses)
    assert any(not a.startswith("unix:") for a in addresses)

    marker = tmp_path / "actor-marker"
    spec = pb.TaskSpec(task_id=os.urandom(24), actor_id=actor._actor_id, method_name="take",
                       args_blob=evil(marker), num_returns=1, sequence=1)
    batch = pb.ActorCallBatch(calls=[spec]).SerializeToString()
    frame = call_link._HEADER.pack(len(batch), call_link.CALLS) + batch
    for address in addresses:
        # A wrong secret, or none: refused at the handshake.
        for token in (WRONG, None):
            with pytest.raises(call_link.LinkClosed, match="without proving membership"):
                call_link.connect(address, token=token, tls=None)
        # Frames without any handshake: never read as calls.
        if address.startswith("unix:"):
            raw = socket.socket(socket.AF_UNIX)
            raw.connect(address[len("unix:"):])
        else:
            host, port = address.rsplit(":", 1)
            raw = socket.create_connection((host, int(port)))
        with raw:
            raw.settimeout(10)
            try:
                raw.sendall(frame * 3)
                assert raw.recv(4096) == b""        # closed without a word
            except ConnectionResetError:
                pass
    time.sleep(0.3)
    assert not marker.exists()
    # The actor is unharmed, and the payload is live through the front door.
    control = tmp_path / "actor-control"
    assert ray.get(actor.take.remote(MakesFile(control)), timeout=30) == "took"
    assert control.exists()
    ray.kill(actor)


def test_daemon_refuses_non_loopback_bind_without_token(tmp_path):
    from meshray.node import launcher

    env = {k: v for k, v in os.environ.items()
           if k not in (security.TOKEN_ENV, security.TOKEN_FILE_ENV)}
    env["MESHRAY_RUN_DIR"] = str(tmp_path / "run")
    session = tmp_path / "session"
    session.mkdir()
    with pytest.raises(RuntimeError, match="during startup"):
        launcher.start_node(embedded_etcd=True, host="0.0.0.0", token=None, env=env,
                            num_cpus=0, prestart_workers=0, session_dir=str(session))
    # The daemon's own report of why (its traceback goes to node.stderr).
    errors = _read(session / "node.stderr") + _read(session / "node.log")
    assert "refusing to bind '0.0.0.0:0' without a cluster token" in errors


def test_meshray_start_writes_private_token_file(tmp_path):
    """`meshray start` without --address creates a token and keeps it 0600."""
    env = {k: v for k, v in os.environ.items()
           if k not in (security.TOKEN_ENV, security.TOKEN_FILE_ENV)}
    env["MESHRAY_RUN_DIR"] = str(tmp_path / "run")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cli = [sys.executable, "-m", "meshray.cli.main"]
    out = subprocess.run(cli + ["start", "--num-cpus", "0"], capture_output=True, text=True,
                         env=env, timeout=60, cwd=REPO)
    try:
        assert out.returncode == 0, out.stderr
        line = next(text for text in out.stdout.splitlines() if "cluster token: written" in text)
        path = line.split("written to ", 1)[1].split(" (", 1)[0]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert security.read_token_file(path)
    finally:
        subprocess.run(cli + ["stop"], capture_output=True, env=env, timeout=60, cwd=REPO)


# ----------------------------------------------------------------------- TLS
def _probe_handlers(seen: list):
    def unary(request, context):
        seen.append(request)
        return b"ok"

    return grpc.method_handlers_generic_handler(
        "meshray.test.Tls", {"Echo": grpc.unary_unary_rpc_method_handler(unary)})


def test_grpc_tls_round_trip(certs):
    server_tls = TlsConfig(certs["node"], certs["node-key"], certs["ca"], client_auth=True)
    client_tls = TlsConfig(certs["node"], certs["node-key"], certs["ca"])
    seen: list = []
    server, bound = make_server(["127.0.0.1:0"], token=TOKEN, tls=server_tls)
    server.add_generic_rpc_handlers((_probe_handlers(seen),))
    server.start()
    try:
        with make_channel(bound[0], token=TOKEN, tls=client_tls) as channel:
            assert channel.unary_unary("/meshray.test.Tls/Echo")(b"hi", timeout=10) == b"ok"
        # Nodes dial each other by IP; the shared certificate names 'meshray'.
        renamed = TlsConfig(certs["node"], certs["node-key"], certs["ca"], server_name="meshray")
        with make_channel(bound[0], token=TOKEN, tls=renamed) as channel:
            assert channel.unary_unary("/meshray.test.Tls/Echo")(b"hi", timeout=10) == b"ok"
        failing = {
            "plaintext": None,
            "no client certificate (mTLS)": TlsConfig(ca=certs["ca"]),
            "unexpected server name": TlsConfig(certs["node"], certs["node-key"],
                                                certs["ca"], server_name="elsewhere"),
        }
        for what, tls in failing.items():
            with make_channel(bound[0], token=TOKEN, tls=tls) as channel:
                with pytest.raises(grpc.RpcError) as info:
                    channel.unary_unary("/meshray.test.Tls/Echo")(b"x", timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE, what
        # TLS does not replace the token: an encrypted call without it is refused.
        with make_channel(bound[0], token=None, tls=client_tls) as channel:
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary("/meshray.test.Tls/Echo")(b"x", timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert seen == [b"hi", b"hi"]
    finally:
        server.stop(0)


def test_data_link_tls_round_trip(certs, tmp_path):
    """The data link speaks TLS with the same certificates and client rule as gRPC."""
    from meshray.object_store import layout
    from meshray.rpc import data_link

    path = str(tmp_path / "object")
    layout.write_object(path, b"inband", [os.urandom(2_000_000)])
    data = open(path, "rb").read()
    served: list = []
    server = data_link.DataServer(
        "127.0.0.1", token=TOKEN, sent=lambda *args: None,
        tls=TlsConfig(certs["node"], certs["node-key"], certs["ca"], client_auth=True),
        open_object=lambda object_id, puller: served.append(object_id) or path)

    def read(tls):
        sock, total, count = data_link.open_range(
            server.address, token=TOKEN, object_id=b"o" * 28, offset=0,
            length=data_link.WHOLE, puller="p", timeout=10, tls=tls)
        with sock:
            buf = bytearray(count)
            data_link.receive_into(sock, memoryview(buf))
        return bytes(buf)

    try:
        assert read(TlsConfig(certs["node"], certs["node-key"], certs["ca"],
                              server_name="meshray")) == data
        for what, tls in {"plaintext": None,
                          "no client certificate (mTLS)": TlsConfig(ca=certs["ca"])}.items():
            with pytest.raises(data_link.DataLinkError):
                read(tls)
        assert len(served) == 1          # nothing was looked up for the refused readers
    finally:
        server.close()


def test_call_link_tls_round_trip(certs, tmp_path):
    """A TCP call link speaks TLS with the same certificates and client rule
    as gRPC, both ways at once (a reader and a writer on one TLS socket); a
    unix-socket link on the same server is not TLS."""
    answered: list = []

    def echo(link):
        answered.append(link.peer)
        while True:
            try:
                kind, payload = link.recv()
            except call_link.LinkClosed:
                return
            link.send(call_link.REPLIES, payload, now=False)

    server = call_link.LinkServer(
        ["127.0.0.1:0", f"unix:{tmp_path / 'tls.sock'}"], token=TOKEN, on_link=echo,
        tls=TlsConfig(certs["node"], certs["node-key"], certs["ca"], client_auth=True))
    tcp, unix = server.addresses
    good = TlsConfig(certs["node"], certs["node-key"], certs["ca"], server_name="meshray")
    try:
        link = call_link.connect(tcp, token=TOKEN, tls=good)
        try:
            payloads = [os.urandom(n) for n in (10, 100_000, 2_500_000)] * 3
            sender = threading.Thread(target=lambda: [
                link.send(call_link.CALLS, p) for p in payloads], daemon=True)
            sender.start()
            got = b""
            while len(got) < sum(map(len, payloads)):
                got += link.recv()[1]
            sender.join(10)
            assert got == b"".join(payloads)
        finally:
            link.close()
        link = call_link.connect(unix, token=TOKEN, tls=good)   # TLS settings ignored there
        link.close()
        for what, tls in {"plaintext": None,
                          "no client certificate (mTLS)": TlsConfig(ca=certs["ca"])}.items():
            with pytest.raises(call_link.LinkClosed):
                call_link.connect(tcp, token=TOKEN, tls=tls)
        assert len(answered) == 2          # nothing served the refused callers
    finally:
        server.close()


def test_grpc_tls_from_environment_aio(certs, monkeypatch):
    """Worker processes get TLS by inheriting MESHRAY_TLS_*; the defaults read it."""
    config = TlsConfig(certs["node"], certs["node-key"], certs["ca"], client_auth=True,
                       server_name="meshray")
    for name, value in config.to_env().items():
        monkeypatch.setenv(name, value)

    async def run():
        seen: list = []
        server, bound = make_aio_server(["127.0.0.1:0"], token=TOKEN)

        async def echo(request, context):
            seen.append(request)
            return b"ok"

        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "meshray.test.Tls", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
        await server.start()
        try:
            async with make_aio_channel(bound[0], token=TOKEN) as channel:
                assert await channel.unary_unary("/meshray.test.Tls/Echo")(b"e", timeout=10) \
                    == b"ok"
            async with make_aio_channel(bound[0], token=TOKEN, tls=None) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await channel.unary_unary("/meshray.test.Tls/Echo")(b"x", timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(0)
        return seen

    assert asyncio.run(run()) == [b"e"]


def _check_https_api(node, certs):
    """The node's HTTP API (jobs, dashboard) speaks HTTPS with the node's
    certificate, wants a client certificate, and still wants the token."""
    import ssl
    import urllib.error
    import urllib.request
    assert node.info["dashboard_scheme"] == "https"
    url = f"https://127.0.0.1:{node.info['dashboard_port']}/api/version"
    context = ssl.create_default_context(cafile=certs["ca"])
    context.check_hostname = False          # the test certificate names "meshray"
    context.load_cert_chain(certs["node"], certs["node-key"])

    def get(token, ctx):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10, context=ctx) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert get(TOKEN, context) == 200
    assert get(None, context) == 401 and get(WRONG, context) == 401
    without_client_cert = ssl.create_default_context(cafile=certs["ca"])
    without_client_cert.check_hostname = False
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        get(TOKEN, without_client_cert)
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(url.replace("https://", "http://"), timeout=10)


def test_daemon_serves_tls_from_inherited_environment(certs, tmp_path):
    """A daemon started with MESHRAY_TLS_* serves TLS on TCP; the token still counts."""
    from meshray.node import launcher

    config = TlsConfig(certs["node"], certs["node-key"], certs["ca"], client_auth=True,
                       server_name="meshray")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHRAY_TLS_")}
    env.update(config.to_env())
    env["MESHRAY_RUN_DIR"] = str(tmp_path / "run")
    node = launcher.start_node(embedded_etcd=True, token=TOKEN, env=env, num_cpus=0,
                               prestart_workers=0)
    try:
        with make_channel(node.address, token=TOKEN, tls=config) as channel:
            reply = pb_grpc.NodeServiceStub(channel).GetNodeInfo(pb.NodeInfoRequest(),
                                                                 timeout=10)
        assert reply.node_id.hex() == node.node_id
        with make_channel(node.address, token=TOKEN, tls=None) as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.NodeServiceStub(channel).GetNodeInfo(pb.NodeInfoRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with make_channel(node.address, token=WRONG, tls=config) as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.NodeServiceStub(channel).GetNodeInfo(pb.NodeInfoRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        _check_https_api(node, certs)
    finally:
        node.stop()


def test_etcd_tls_client_certs_and_password(certs, tmp_path):
    """etcd with TLS + client-cert auth, then user/password auth on top."""
    from pyetcd import etcdrpc

    from meshray.coordination.client import AuthError, Coordinator, CoordinationUnavailable
    from meshray.coordination.embedded import EmbeddedEtcd, free_port

    client_port, health_port, peer_port = free_port(), free_port(), free_port()
    url = f"https://127.0.0.1:{client_port}"
    # EmbeddedEtcd probes /health over plain HTTP on its client_port; point
    # that at a metrics listener and put the real (TLS-only) client listener
    # on another port.
    etcd = EmbeddedEtcd(tmp_path / "etcd", client_port=health_port, peer_port=peer_port,
                        unsafe_no_fsync=True, extra_args=[
                            "--listen-client-urls", url, "--advertise-client-urls", url,
                            "--listen-metrics-urls", f"http://127.0.0.1:{health_port}",
                            "--cert-file", certs["etcd-server"],
                            "--key-file", certs["etcd-server-key"],
                            "--trusted-ca-file", certs["ca"], "--client-cert-auth"])
    etcd.start(timeout=20)
    try:
        endpoint = f"127.0.0.1:{client_port}"
        options = security.etcd_client_options(environ={
            "MESHRAY_ETCD_CA": certs["ca"], "MESHRAY_ETCD_CERT": certs["node"],
            "MESHRAY_ETCD_KEY": certs["node-key"]})
        with pytest.raises(CoordinationUnavailable):
            Coordinator([endpoint], timeout=1.0)  # plaintext client
        with pytest.raises(CoordinationUnavailable):
            Coordinator([endpoint], timeout=1.0, ca_cert=certs["ca"])  # no client cert
        coordinator = Coordinator([endpoint], timeout=5, **options)
        coordinator.put("/meshray-test/tls", b"1")
        assert coordinator.get("/meshray-test/tls")[0] == b"1"
        coordinator.close()

        with open(certs["ca"], "rb") as ca, open(certs["node-key"], "rb") as key, \
                open(certs["node"], "rb") as cert:
            creds = grpc.ssl_channel_credentials(ca.read(), key.read(), cert.read())
        with grpc.secure_channel(endpoint, creds) as channel:
            auth = etcdrpc.AuthStub(channel)
            auth.UserAdd(etcdrpc.AuthUserAddRequest(name="root", password="root-secret"),
                         timeout=5)
            auth.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user="root", role="root"),
                               timeout=5)
            auth.AuthEnable(etcdrpc.AuthEnableRequest(), timeout=5)

        password_file = tmp_path / "etcd-password"
        security.write_private_file(password_file, "root-secret\n")
        with_password = security.etcd_client_options(
            user="root", password_file=str(password_file), ca_cert=certs["ca"],
            cert_cert=certs["node"], cert_key=certs["node-key"], environ={})
        coordinator = Coordinator([endpoint], timeout=5, **with_password)
        assert coordinator.get("/meshray-test/tls")[0] == b"1"
        coordinator.close()
        with pytest.raises(AuthError):
            Coordinator([endpoint], timeout=3, **{**with_password, "password": "wrong"})
        # The certificate alone (CN meshray-node, not an etcd user) is not enough.
        anonymous = Coordinator([endpoint], timeout=3, **options)
        with pytest.raises(AuthError):
            anonymous.get("/meshray-test/tls")
        anonymous.close()
    finally:
        etcd.stop()


# --------------------------------------------------------- secret handling
def test_token_resolution_precedence(tmp_path):
    path = tmp_path / "token"
    security.write_token_file(path, TOKEN)
    env = {"MESHRAY_TOKEN": WRONG, "MESHRAY_TOKEN_FILE": "/nonexistent"}
    assert security.resolve_token(TOKEN, environ=env) == TOKEN
    assert security.resolve_token(None, str(path), environ=env) == TOKEN
    assert security.resolve_token(environ=env) == WRONG
    assert security.resolve_token(environ={"MESHRAY_TOKEN_FILE": str(path)}) == TOKEN
    assert security.resolve_token(environ={}) is None
    with pytest.raises(ValueError, match="both given"):
        security.resolve_token(TOKEN, str(path), environ={})
    with pytest.raises(ValueError, match="--token is 5 characters long"):
        security.resolve_token("short", environ={})
    with pytest.raises(ValueError, match="MESHRAY_TOKEN contains spaces"):
        security.resolve_token(environ={"MESHRAY_TOKEN": "x" * 20 + " y"})
    with pytest.raises(ValueError, match="does not exist"):
        security.resolve_token(None, str(tmp_path / "missing"), environ={})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        security.read_token_file(tmp_path / "empty")


def test_token_file_is_private_and_atomic(tmp_path):
    old = os.umask(0)
    try:
        path = tmp_path / "token"
        security.write_token_file(path, TOKEN)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert path.read_text() == TOKEN + "\n"
        # A planted symlink is replaced, never written through.
        victim = tmp_path / "victim"
        victim.write_text("keep")
        link = tmp_path / "link"
        link.symlink_to(victim)
        security.write_token_file(link, TOKEN)
        assert victim.read_text() == "keep"
        assert not link.is_symlink() and link.read_text() == TOKEN + "\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "token", "victim"]
    finally:
        os.umask(old)


def test_etcd_options_validation(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert security.etcd_client_options(environ={}) == {}
    with pytest.raises(ValueError, match="certificate and key go together"):
        security.etcd_client_options(cert_cert=str(ca), environ={})
    with pytest.raises(ValueError, match="user and password go together"):
        security.etcd_client_options(environ={"MESHRAY_ETCD_USER": "root"})
    with pytest.raises(ValueError, match="does not exist"):
        security.etcd_client_options(ca_cert=str(tmp_path / "nope"), environ={})
    options = security.etcd_client_options(
        ca_cert=str(ca), environ={"MESHRAY_ETCD_USER": "u", "MESHRAY_ETCD_PASSWORD": "p"})
    assert options == {"ca_cert": str(ca), "user": "u", "password": "p"}
    assert security.etcd_client_options(environ=security.etcd_options_to_env(options)) == options


def test_session_tls_round_trip(certs, tmp_path):
    config = TlsConfig(certs["node"], certs["node-key"], certs["ca"], server_name="meshray")
    assert security.load_session_tls(tmp_path) is None
    path = security.save_session_tls(tmp_path, config)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert security.load_session_tls(tmp_path) == config
    security.save_session_tls(tmp_path, None)
    assert security.load_session_tls(tmp_path) is None
