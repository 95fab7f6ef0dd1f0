"""rpc/strict.py on real in-process gRPC servers of both flavours.

A throw-away NodeService and NodeSession servicer (the session's messages are
a streaming method's, whatever carries them in production) counts what reaches it, so each test shows
both the answer a malformed request gets (INVALID_ARGUMENT naming what was
wrong, never a hang) and that the servicer never saw it.
"""
from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from meshray.rpc import strict
from meshray.rpc.factory import make_aio_server, make_channel, make_server
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.rpc.generated import meshray_pb2_grpc as pb_grpc

TOKEN = "unit-test-token-0123456789abcdef"
CONNECT = "/meshray.NodeSession/Connect"
INFO = "/meshray.NodeService/GetNodeInfo"


def _refuse_bad_roles(batch) -> None:
    for index, event in enumerate(batch.events):
        if event.WhichOneof("kind") == "hello" and event.hello.role != "driver":
            raise strict.Malformed(f"events[{index}].hello.role={event.hello.role!r}: expected "
                                  "'driver'")


class SyncServicer:
    def __init__(self):
        self.seen = []

    def GetNodeInfo(self, request, context):
        self.seen.append(request)
        return pb.NodeInfoReply(address="here")

    def Connect(self, requests, context):
        for batch in requests:
            self.seen.append(batch)
            if any(e.WhichOneof("kind") == "blocked" for e in batch.events):
                raise strict.Malformed("blocked: this servicer refuses it itself")
            yield pb.ServerBatch(events=[pb.ServerEvent(notice=pb.Notice(text="got it"))])


class AioServicer(SyncServicer):
    async def GetNodeInfo(self, request, context):
        return SyncServicer.GetNodeInfo(self, request, context)

    async def Connect(self, requests, context):
        async for batch in requests:
            self.seen.append(batch)
            if any(e.WhichOneof("kind") == "blocked" for e in batch.events):
                raise strict.Malformed("blocked: this servicer refuses it itself")
            yield pb.ServerBatch(events=[pb.ServerEvent(notice=pb.Notice(text="got it"))])


@pytest.fixture(params=["sync", "aio"])
def served(request):
    """(address, servicer) of a token-checked server with strict NodeService."""
    checks = {"Connect": _refuse_bad_roles}
    if request.param == "sync":
        servicer = SyncServicer()
        server, bound = make_server(["127.0.0.1:0"], token=TOKEN, max_workers=8, tls=None)
        strict.add_service(server, servicer, "meshray.NodeService")
        strict.add_service(server, servicer, "meshray.NodeSession", checks=checks)
        server.start()
        yield bound[0], servicer
        server.stop(0)
        return
    servicer = AioServicer()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def build():
        server, bound = make_aio_server(["127.0.0.1:0"], token=TOKEN, tls=None)
        strict.add_service(server, servicer, "meshray.NodeService")
        strict.add_service(server, servicer, "meshray.NodeSession", checks=checks)
        await server.start()
        return server, bound

    server, bound = asyncio.run_coroutine_threadsafe(build(), loop).result(10)
    yield bound[0], servicer
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def _raw(address, method, messages, *, token=TOKEN, timeout=5.0):
    with make_channel(address, token=token, tls=None) as channel:
        call = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
        try:
            return "OK", list(call(iter(messages), timeout=timeout))
        except grpc.RpcError as exc:
            return exc.code().name, exc.details()


def _hello(role="driver") -> bytes:
    return pb.ClientBatch(events=[pb.ClientEvent(hello=pb.Hello(role=role))]).SerializeToString()


def test_valid_calls_work_through_generated_stubs(served):
    address, servicer = served
    with make_channel(address, token=TOKEN, tls=None) as channel:
        assert pb_grpc.NodeServiceStub(channel).GetNodeInfo(
            pb.NodeInfoRequest(), timeout=5).address == "here"
        replies = list(pb_grpc.NodeSessionStub(channel).Connect(iter([pb.ClientBatch(), pb.ClientBatch()]), timeout=5))
    assert len(replies) == 2 and len(servicer.seen) == 3


@pytest.mark.parametrize("count", [0, 2])
def test_unary_method_needs_exactly_one_message(served, count, caplog):
    address, servicer = served
    code, details = _raw(address, INFO, [b""] * count)
    assert code == "INVALID_ARGUMENT", details
    assert "exactly one meshray.NodeInfoRequest" in details
    assert servicer.seen == []
    # The refusal is the only thing logged (no serializer error on the side).
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_undecodable_message_is_refused_before_the_servicer(served):
    address, servicer = served
    code, details = _raw(address, INFO, [b"\xff\xff"])
    assert code == "INVALID_ARGUMENT" and "meshray.NodeInfoRequest" in details
    code, details = _raw(address, CONNECT, [b"\x0a\x05abc"])
    assert code == "INVALID_ARGUMENT" and "meshray.ClientBatch" in details
    assert servicer.seen == []


def test_stream_ends_invalid_at_the_first_bad_message(served):
    address, servicer = served
    code, details = _raw(address, CONNECT, [_hello(), _hello("overlord"), _hello()])
    assert code == "INVALID_ARGUMENT"
    assert "meshray.ClientBatch.events[0].hello.role='overlord'" in details
    assert len(servicer.seen) == 1     # the good batch before it, not the one after


def test_servicer_may_refuse_with_malformed(served):
    address, _servicer = served
    blocked = pb.ClientBatch(events=[pb.ClientEvent(blocked=pb.WorkerBlocked())])
    code, details = _raw(address, CONNECT, [blocked.SerializeToString()])
    assert code == "INVALID_ARGUMENT" and "refuses it itself" in details


def test_token_check_still_comes_first(served):
    address, servicer = served
    code, _details = _raw(address, CONNECT, [b"\xff\xff"], token="wrong-token-0123456789abcdef")
    assert code == "UNAUTHENTICATED"
    assert servicer.seen == []


def test_unknown_checks_are_a_programming_error():
    server, _bound = make_server(["127.0.0.1:0"], token=TOKEN, tls=None)
    with pytest.raises(ValueError, match="NoSuchMethod"):
        strict.add_service(server, SyncServicer(), "meshray.NodeService",
                           checks={"NoSuchMethod": _refuse_bad_roles})
    server.stop(0)


def test_peer_link_drops_only_the_refused_events(caplog):
    """A batch refused as malformed would be refused for ever: the link sends
    its events one by one, in order, and drops only the ones refused."""
    from meshray.node.peers import PeerLink

    received = []

    class Peer:
        async def Deliver(self, batch, context):
            received.extend(event.refs.add[0] for event in batch.events)
            return pb.PeerAck()

        async def PullObject(self, request, context):
            yield b""

    def refuse_removals(batch) -> None:
        for index, event in enumerate(batch.events):
            if event.refs.remove:
                raise strict.Malformed(f"events[{index}].refs.remove: refused by this test")

    async def scenario():
        server, bound = make_aio_server(["127.0.0.1:0"], token=TOKEN, tls=None)
        strict.add_service(server, Peer(), "meshray.NodePeer",
                           checks={"Deliver": refuse_removals}, raw_responses=("PullObject",))
        await server.start()
        link = PeerLink(b"n" * 16, "ab" * 16, bound[0], TOKEN)
        try:
            for number in range(5):
                refs = pb.RefUpdate(add=[bytes([number]) * 20])
                if number == 2:
                    refs.remove.append(b"r" * 20)
                link.send(pb.PeerEvent(refs=refs))
            for _ in range(200):
                if len(received) == 4:
                    break
                await asyncio.sleep(0.05)
        finally:
            await link.close()
            await server.stop(0)

    with caplog.at_level("ERROR", logger="meshray.node.peers"):
        asyncio.run(scenario())
    assert received == [bytes([n]) * 20 for n in (0, 1, 3, 4)]
    assert any("refused a refs event" in r.getMessage() for r in caplog.records)


def test_a_flood_of_refusals_does_not_grow_the_server():
    """Refusals set the status instead of raising through context.abort, which
    grpc.aio answers by keeping about a kilobyte per call (8000 refused calls
    grew the process by over 10 MiB that way)."""
    import psutil

    servicer = AioServicer()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def build():
        server, bound = make_aio_server(["127.0.0.1:0"], token=TOKEN, tls=None)
        strict.add_service(server, servicer, "meshray.NodeSession",
                           checks={"Connect": _refuse_bad_roles},
                           malformed_log=strict.MalformedLog(burst=0))
        await server.start()
        return server, bound

    server, bound = asyncio.run_coroutine_threadsafe(build(), loop).result(10)
    bad = _hello("overlord")
    try:
        with make_channel(bound[0], token=TOKEN, tls=None) as channel:
            call = channel.stream_stream(CONNECT, request_serializer=None,
                                         response_deserializer=None)

            def refuse(count: int) -> None:
                for _ in range(count):
                    with pytest.raises(grpc.RpcError) as info:
                        list(call(iter([bad]), timeout=5))
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            refuse(1000)      # warm up gRPC's own pools first
            before = psutil.Process().memory_info().rss
            refuse(5000)
            grown = psutil.Process().memory_info().rss - before
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    assert grown < 3 * 2 ** 20, f"5000 refusals grew the process by {grown / 2 ** 20:.1f} MiB"
    assert servicer.seen == []
