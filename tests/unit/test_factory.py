"""The rpc factory's membership gate, bind rule and TLS configuration, in-process.

The gate is checked against a throw-away service with all four call shapes
on both server flavours, because meshray's own services will grow methods
of every shape: the deny path must fit each of them and must never run the
request deserializer (where a pickle would be opened) for a stranger.
"""
from __future__ import annotations

import asyncio
import logging
import threading

import grpc
import pytest

from meshray.rpc import gate
from meshray.rpc.auth import AUTH_METADATA_KEY
from meshray.rpc.factory import (
    is_loopback_host,
    make_aio_channel,
    make_aio_server,
    make_channel,
    make_server,
    split_host_port,
)
from meshray.rpc.tls import TLS_FROM_ENV, TlsConfig, resolve_tls

TOKEN = "unit-test-token-0123456789abcdef"
SERVICE = "meshray.test.Probe"
SHAPES = ("UnaryUnary", "UnaryStream", "StreamUnary", "StreamStream")


class Recorder:
    """Counts what reached the application side of the server."""

    def __init__(self):
        self.deserialized = 0
        self.handled = 0
        self.lock = threading.Lock()

    def deserialize(self, data: bytes) -> bytes:
        with self.lock:
            self.deserialized += 1
        return data

    def hit(self):
        with self.lock:
            self.handled += 1


def _sync_handlers(rec: Recorder):
    def uu(request, context):
        rec.hit()
        return b"ok:" + request

    def us(request, context):
        rec.hit()
        yield b"ok:" + request

    def su(requests, context):
        rec.hit()
        return b"ok:" + b"".join(requests)

    def ss(requests, context):
        rec.hit()
        for request in requests:
            yield b"ok:" + request

    kw = {"request_deserializer": rec.deserialize}
    return grpc.method_handlers_generic_handler(SERVICE, {
        "UnaryUnary": grpc.unary_unary_rpc_method_handler(uu, **kw),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(us, **kw),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(su, **kw),
        "StreamStream": grpc.stream_stream_rpc_method_handler(ss, **kw),
    })


def _aio_handlers(rec: Recorder):
    async def uu(request, context):
        rec.hit()
        return b"ok:" + request

    async def us(request, context):
        rec.hit()
        yield b"ok:" + request

    async def su(requests, context):
        rec.hit()
        return b"ok:" + b"".join([r async for r in requests])

    async def ss(requests, context):
        rec.hit()
        async for request in requests:
            yield b"ok:" + request

    kw = {"request_deserializer": rec.deserialize}
    return grpc.method_handlers_generic_handler(SERVICE, {
        "UnaryUnary": grpc.unary_unary_rpc_method_handler(uu, **kw),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(us, **kw),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(su, **kw),
        "StreamStream": grpc.stream_stream_rpc_method_handler(ss, **kw),
    })


class AioServerThread:
    """An asyncio server on its own loop thread, so tests can stay blocking."""

    def __init__(self, bind, **kwargs):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.recorder = Recorder()

        async def build():
            server, bound = make_aio_server(bind, **kwargs)
            server.add_generic_rpc_handlers((_aio_handlers(self.recorder),))
            await server.start()
            return server, bound

        self.server, self.bound = self.run(build())

    def run(self, coro, timeout=10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(params=["sync", "aio"])
def served(request):
    """(address, recorder) of a token-protected server of either flavour."""
    if request.param == "sync":
        rec = Recorder()
        server, bound = make_server(["127.0.0.1:0"], token=TOKEN, max_workers=8, tls=None)
        server.add_generic_rpc_handlers((_sync_handlers(rec),))
        server.start()
        yield bound[0], rec
        server.stop(0)
    else:
        holder = AioServerThread(["127.0.0.1:0"], token=TOKEN, tls=None)
        yield holder.bound[0], holder.recorder
        holder.close()


def _call(channel, shape: str, *, metadata=None, timeout=5.0):
    method = f"/{SERVICE}/{shape}"
    if shape == "UnaryUnary":
        return channel.unary_unary(method)(b"x", metadata=metadata, timeout=timeout)
    if shape == "UnaryStream":
        return list(channel.unary_stream(method)(b"x", metadata=metadata, timeout=timeout))
    if shape == "StreamUnary":
        return channel.stream_unary(method)(iter([b"x", b"y"]), metadata=metadata,
                                            timeout=timeout)
    return list(channel.stream_stream(method)(iter([b"x"]), metadata=metadata, timeout=timeout))


@pytest.mark.parametrize("shape", SHAPES)
def test_no_token_rejected_before_deserializing(served, shape, caplog):
    address, rec = served
    with caplog.at_level(logging.WARNING, logger="meshray.rpc.factory"):
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as info:
                _call(channel, shape)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (rec.deserialized, rec.handled) == (0, 0)
    assert any(f"/{SERVICE}/{shape}" in r.getMessage() and "no membership proof" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bad", ["wrong-token-0123456789abcdef0123", TOKEN[:-1], TOKEN + "x", "x"])
def test_wrong_token_rejected(served, shape, bad):
    address, rec = served
    with make_channel(address, token=bad, tls=None) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _call(channel, shape)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (rec.deserialized, rec.handled) == (0, 0)


@pytest.mark.parametrize("shape", SHAPES)
def test_right_token_passes(served, shape):
    address, rec = served
    with make_channel(address, token=TOKEN, tls=None) as channel:
        result = _call(channel, shape)
    assert result in (b"ok:x", [b"ok:x"], b"ok:xy")
    assert rec.handled == 1 and rec.deserialized >= 1


def test_proof_metadata_cannot_be_doubled(served):
    """A caller-supplied proof entry is replaced, not followed, by the channel's;
    and the secret itself sent as metadata (the old bearer token) proves nothing."""
    address, rec = served
    with make_channel(address, token=TOKEN, tls=None) as channel:
        assert _call(channel, "UnaryUnary", metadata=[(AUTH_METADATA_KEY, "forged")]) == b"ok:x"
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _call(channel, "UnaryUnary", metadata=[(AUTH_METADATA_KEY, "forged"),
                                                   ("meshray-token", TOKEN)])
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_unknown_method_does_not_leak_existence(served):
    address, _rec = served
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/meshray.Nope/Missing")(b"", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with make_channel(address, token=TOKEN, tls=None) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/meshray.Nope/Missing")(b"", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_aio_channel_proves_membership_for_every_shape(served):
    address, _rec = served

    async def run():
        async with make_aio_channel(address, token=TOKEN, tls=None) as channel:
            base = f"/{SERVICE}/"
            assert await channel.unary_unary(base + "UnaryUnary")(b"x", timeout=5) == b"ok:x"
            assert [m async for m in channel.unary_stream(base + "UnaryStream")(
                b"x", timeout=5)] == [b"ok:x"]
            assert await channel.stream_unary(base + "StreamUnary")(
                iter([b"x", b"y"]), timeout=5) == b"ok:xy"
            assert [m async for m in channel.stream_stream(base + "StreamStream")(
                iter([b"x"]), timeout=5)] == [b"ok:x"]
        async with make_aio_channel(address, token=None, tls=None) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(f"/{SERVICE}/UnaryUnary")(b"x", timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(run())


def test_unix_socket_listener_is_gated_too(tmp_path):
    rec = Recorder()
    path = f"unix:{tmp_path}/s.sock"
    server, bound = make_server([path], token=TOKEN, tls=None)
    server.add_generic_rpc_handlers((_sync_handlers(rec),))
    server.start()
    try:
        assert bound == [path]
        with grpc.insecure_channel(path) as channel:
            with pytest.raises(grpc.RpcError) as info:
                _call(channel, "StreamStream")
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with make_channel(path, token=TOKEN, tls=None) as channel:
            assert _call(channel, "UnaryUnary") == b"ok:x"
    finally:
        server.stop(0)


def test_rejection_log_is_rate_limited(caplog):
    rejections = gate.RejectionLog(burst=3, window_s=3600)
    with caplog.at_level(logging.WARNING, logger="meshray.rpc.factory"):
        for i in range(10):
            rejections.record(f"/svc/M{i}", "ipv4:1.2.3.4:5", "wrong token")
    assert len([r for r in caplog.records if "rejected unauthenticated" in r.getMessage()]) == 3
    assert rejections._suppressed == 7


# ---------------------------------------------------------------- binding
@pytest.mark.parametrize("maker", [make_server, make_aio_server])
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
def test_non_loopback_bind_without_token_refused(maker, host):
    """Refused before a server object exists (no event loop needed for aio)."""
    target = f"[{host}]:0" if ":" in host else f"{host}:0"
    with pytest.raises(ValueError, match="without a cluster token"):
        maker(["127.0.0.1:0", target], token=None, tls=None)
    with pytest.raises(ValueError, match="without a cluster token"):
        maker([target], token="", tls=None)  # empty means none


def test_loopback_bind_without_token_allowed_and_remote_with_token_allowed():
    server, bound = make_server(["127.0.0.1:0", "localhost:0"], token=None, tls=None)
    assert all(b.split(":")[-1] != "0" for b in bound)
    server.stop(0)
    server, bound = make_server(["0.0.0.0:0"], token=TOKEN, tls=None)
    assert bound[0].startswith("0.0.0.0:")
    server.stop(0)
    server, _ = make_server(["0.0.0.0:0"], token=None, allow_insecure_remote=True, tls=None)
    server.stop(0)


@pytest.mark.parametrize("host,expected", [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("10.0.0.1", False),
    ("no-such-host.invalid", False),
])
def test_is_loopback_host(host, expected):
    assert is_loopback_host(host) is expected


def test_split_host_port():
    assert split_host_port("[::1]:80") == ("::1", 80)
    assert split_host_port("node:7") == ("node", 7)
    with pytest.raises(ValueError, match="HOST:PORT"):
        split_host_port("nohost")


@pytest.mark.parametrize("bad", ["has space-0123456789", "tab\t0123456789abcdef", "nl\n",
                                 "caf\u00e9-0123456789abcdef"])
def test_unusable_tokens_refused(bad):
    with pytest.raises(ValueError, match="printable ASCII"):
        make_server(["127.0.0.1:0"], token=bad, tls=None)
    with pytest.raises(ValueError, match="printable ASCII"):
        make_channel("127.0.0.1:1", token=bad, tls=None)


def test_bind_string_instead_of_list_is_an_error():
    with pytest.raises(TypeError, match="list of addresses"):
        make_server("127.0.0.1:0", token=TOKEN, tls=None)


# ---------------------------------------------------------------- TlsConfig
_FAKE_CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
_FAKE_KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"


@pytest.fixture
def pem_files(tmp_path):
    cert, key, ca = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    cert.write_text(_FAKE_CERT)
    key.write_text(_FAKE_KEY)
    key.chmod(0o600)
    ca.write_text(_FAKE_CERT)
    return str(cert), str(key), str(ca)


def test_tls_config_validates_its_inputs(pem_files, tmp_path):
    cert, key, ca = pem_files
    TlsConfig(cert, key, ca)
    TlsConfig(ca=ca)  # a client that only verifies servers
    with pytest.raises(ValueError, match="cert and key together"):
        TlsConfig(cert=cert, ca=ca)
    with pytest.raises(ValueError, match="client_auth=True needs ca"):
        TlsConfig(cert, key, client_auth=True)
    with pytest.raises(ValueError, match=r"ca='.*missing.pem' cannot be read"):
        TlsConfig(cert, key, str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="is not a PEM file containing 'PRIVATE KEY'"):
        TlsConfig(cert, cert, ca)
    with pytest.raises(ValueError, match="neither"):
        TlsConfig()
    with pytest.raises(ValueError, match="server_name"):
        TlsConfig(cert, key, ca, server_name=" ")
    with pytest.raises(ValueError, match="cannot serve TLS"):
        TlsConfig(ca=ca).server_credentials()


def test_tls_env_round_trip(pem_files):
    cert, key, ca = pem_files
    config = TlsConfig(cert, key, ca, client_auth=True, server_name="meshray")
    env = config.to_env()
    assert TlsConfig.from_env(env) == config
    assert TlsConfig.from_env({}) is None
    with pytest.raises(ValueError, match="MESHRAY_TLS_CERT.*invalid.*cert and key together"):
        TlsConfig.from_env({"MESHRAY_TLS_CERT": cert, "MESHRAY_TLS_CA": ca})
    with pytest.raises(ValueError, match="MESHRAY_TLS_CLIENT_AUTH='maybe'"):
        TlsConfig.from_env({**env, "MESHRAY_TLS_CLIENT_AUTH": "maybe"})


def test_resolve_tls(monkeypatch, pem_files):
    cert, key, ca = pem_files
    for name in ("MESHRAY_TLS_CERT", "MESHRAY_TLS_KEY", "MESHRAY_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_tls(TLS_FROM_ENV) is None
    assert resolve_tls(None) is None
    monkeypatch.setenv("MESHRAY_TLS_CA", ca)
    assert resolve_tls(TLS_FROM_ENV) == TlsConfig(ca=ca)
    assert resolve_tls(None) is None  # explicit plaintext wins over the environment
    with pytest.raises(TypeError, match="must be a TlsConfig"):
        resolve_tls("yes")


def test_warns_about_readable_private_key(tmp_path, caplog):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text(_FAKE_CERT)
    key.write_text(_FAKE_KEY)
    key.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="meshray.rpc.tls"):
        TlsConfig(str(cert), str(key))
    assert any("readable by group/others" in r.getMessage() for r in caplog.records)


def test_a_flood_of_strangers_does_not_grow_the_server():
    """10,000 calls without a membership proof leave the server's memory
    where it was: a refusal keeps nothing per call (measured here: ~0.2 MB
    for 10,000 with the status set, ~0.5 MB with context.abort)."""
    import psutil

    holder = AioServerThread(["127.0.0.1:0"], token=TOKEN, tls=None)
    try:
        with grpc.insecure_channel(holder.bound[0]) as channel:
            call = channel.stream_stream(f"/{SERVICE}/StreamStream")

            def refuse(count: int) -> None:
                for _ in range(count):
                    with pytest.raises(grpc.RpcError) as info:
                        list(call(iter([b"x"]), timeout=5))
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

            logger = logging.getLogger("meshray.rpc.factory")
            level, logger.level = logger.level, logging.ERROR   # 6,000 warnings are not the point
            try:
                refuse(1000)      # warm up gRPC's own pools first
                before = psutil.Process().memory_info().rss
                refuse(10000)
                grown = psutil.Process().memory_info().rss - before
            finally:
                logger.setLevel(level)
    finally:
        holder.close()
    assert grown < 2 * 1024 * 1024, f"10,000 refused calls grew the process by {grown} bytes"
    assert holder.recorder.deserialized == 0 and holder.recorder.handled == 0
