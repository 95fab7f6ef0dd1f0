"""Membership proofs: a caller never presents the cluster secret, a proof is
good for one server address, one call and a short time, and a caller reads
nothing from a server that has not proved membership.

Servers and channels here are real gRPC over loopback; the impostors are
plain gRPC servers that accept everything (as an attacker's would).
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures

import grpc
import pytest

from meshray.rpc import accept_targets, make_aio_channel, make_channel, make_server
from meshray.rpc.auth import (
    AUTH_METADATA_KEY,
    HELLO_METHOD,
    CallSigner,
    ProofChecker,
)

SECRET = "membership-test-secret-0123456789abcdef"
METHOD = "/meshray.test.Probe/Echo"
BOMB = b"cos\nsystem\n(S'echo pwned'\ntR."   # what an impostor answers with


class _Echo(grpc.GenericRpcHandler):
    def __init__(self):
        self.calls = []

    def service(self, details):
        if details.method != METHOD:
            return None

        def echo(request, context):
            self.calls.append(details.method)
            return b"echo:" + request

        return grpc.unary_unary_rpc_method_handler(echo)


@pytest.fixture
def member():
    echo = _Echo()
    server, bound = make_server(["127.0.0.1:0"], token=SECRET, max_workers=4, tls=None)
    server.add_generic_rpc_handlers((echo,))
    server.start()
    yield server, bound[0], echo
    server.stop(0)


class Impostor(grpc.GenericRpcHandler):
    """Answers every method (Hello included) with BOMB and records what it saw."""

    def __init__(self, send_proof: str | None = None):
        self.seen: list[tuple[str, list]] = []
        self.payloads: list[bytes] = []
        self.send_proof = send_proof
        self.lock = threading.Lock()

    def service(self, details):
        with self.lock:
            self.seen.append((details.method, list(details.invocation_metadata)))

        def answer(request, context):
            with self.lock:
                self.payloads.append(request)
            if self.send_proof is not None:
                context.send_initial_metadata((("meshray-proof", self.send_proof),))
            return BOMB

        return grpc.unary_unary_rpc_method_handler(answer)


@pytest.fixture(params=[None, "forged-proof"])
def impostor(request):
    handler = Impostor(send_proof=request.param)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", handler
    server.stop(0)


def test_member_answers_a_member(member):
    _server, address, echo = member
    with make_channel(address, token=SECRET, tls=None) as channel:
        assert channel.unary_unary(METHOD)(b"x", timeout=5) == b"echo:x"
    assert echo.calls == [METHOD]


def test_impostor_never_sees_the_secret_nor_a_payload_and_its_answer_is_not_read(impostor):
    """The old hole: a caller sent the token to whatever address etcd named and
    unpickled the reply. Now the impostor gets a Hello with a MAC, no payload,
    and its answer is refused before the application sees it."""
    address, handler = impostor
    with make_channel(address, token=SECRET, tls=None) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(METHOD)(b"secret-payload", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "did not prove cluster membership" in info.value.details()
    assert [method for method, _ in handler.seen] == [HELLO_METHOD]
    assert handler.payloads == [b""]
    for _method, metadata in handler.seen:
        for _key, value in metadata:
            assert SECRET not in str(value)


def test_impostor_is_refused_on_asyncio_channels_too(impostor):
    address, handler = impostor

    async def run():
        async with make_aio_channel(address, token=SECRET, tls=None) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(METHOD)(b"secret-payload", timeout=5)
            return info.value

    error = asyncio.run(run())
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert b"secret-payload" not in handler.payloads
    assert [method for method, _ in handler.seen] == [HELLO_METHOD]


def _raw_call(address, metadata):
    with grpc.insecure_channel(address) as channel:
        return channel.unary_unary(METHOD)(b"x", metadata=metadata, timeout=5)


def test_a_proof_for_another_address_is_refused(member):
    """An impostor at address A that collected a proof cannot relay it to a member at B."""
    _server, address, echo = member
    auth, target, _ = CallSigner(SECRET, "127.0.0.1:1").sign(METHOD)
    with pytest.raises(grpc.RpcError) as info:
        _raw_call(address, [auth, target])
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert echo.calls == []


def test_a_proof_is_good_once(member):
    _server, address, echo = member
    auth, target, _ = CallSigner(SECRET, address).sign(METHOD)
    assert _raw_call(address, [auth, target]) == b"echo:x"
    with pytest.raises(grpc.RpcError) as info:
        _raw_call(address, [auth, target])
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert echo.calls == [METHOD]


def test_a_proof_is_bound_to_its_method(member):
    _server, address, echo = member
    auth, target, _ = CallSigner(SECRET, address).sign("/meshray.test.Probe/Other")
    with pytest.raises(grpc.RpcError):
        _raw_call(address, [auth, target])
    assert echo.calls == []


def test_checker_rules_stale_and_malformed_proofs():
    checker = ProofChecker(SECRET, window_s=60)
    checker.accept_targets(["10.0.0.5:7700"])
    signer = CallSigner(SECRET, "10.0.0.5:7700")
    auth, target, expected = signer.sign(METHOD)
    reason, proof = checker.check(METHOD, [auth, target])
    assert reason is None and proof == expected
    version, stamp, nonce, mac = auth[1].split(".")
    old = str(int(stamp) - 120_000)
    # A MAC over the old time is what a replayer would need: it cannot make one.
    assert "wrong membership proof" in checker.check(
        METHOD, [(AUTH_METADATA_KEY, f"{version}.{old}.{nonce}.{mac}"), target])[0]
    stale_signer = CallSigner(SECRET, "10.0.0.5:7700")
    real_time = time.time
    try:
        time.time = lambda: real_time() - 120
        stale_auth, stale_target, _ = stale_signer.sign(METHOD)
    finally:
        time.time = real_time
    assert "off this server's clock" in checker.check(METHOD, [stale_auth, stale_target])[0]
    for bad in ("", "v1", "v2.1.2.3", "v1.x.y.z", "v1.1.2"):
        assert "malformed" in checker.check(METHOD, [(AUTH_METADATA_KEY, bad), target])[0]
    other = CallSigner("another-cluster-secret-0123456789", "10.0.0.5:7700")
    assert "not signed with this cluster's secret" in checker.check(METHOD, list(other.sign(METHOD)[:2]))[0]


def test_advertised_address_is_accepted_once_registered(member):
    server, address, echo = member
    port = address.rsplit(":", 1)[1]
    advertised = f"127.0.0.7:{port}"    # what a node behind a proxy advertises
    auth, target, _ = CallSigner(SECRET, advertised).sign(METHOD)
    with pytest.raises(grpc.RpcError):
        _raw_call(address, [auth, target])
    accept_targets(server, [advertised])
    auth, target, _ = CallSigner(SECRET, advertised).sign(METHOD)
    assert _raw_call(address, [auth, target]) == b"echo:x"


@pytest.mark.parametrize("raw", ["0", "-5", "soon", "nan", "1e9"])
def test_a_bad_clock_skew_setting_is_a_clear_error(monkeypatch, raw):
    from meshray.rpc import auth
    monkeypatch.setenv("MESHRAY_AUTH_MAX_SKEW_S", raw)
    with pytest.raises(ValueError, match="MESHRAY_AUTH_MAX_SKEW_S"):
        auth._max_skew_from_env()
    monkeypatch.setenv("MESHRAY_AUTH_MAX_SKEW_S", "60")
    assert auth._max_skew_from_env() == 60.0
