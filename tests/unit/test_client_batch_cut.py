"""A client batch is cut where it leaves a peer delivery waiting to start
(node/daemon.py, `_read_client`): the delivery goes out while the rest of
the batch is still being handled, not after it.

The daemon's reader runs here over a stand-in for the rest of the daemon,
with a real peer link (gRPC aio, membership proof) to a real peer server in
another thread, connected before the batch. The batch's second event waits (10 s at most) for the peer
to have received the first event's delivery: that can only happen if the
reader let the loop turn between the two events, since the reader's loop is
what starts the link's call.
"""
from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

from meshray.node.daemon import NodeDaemon
from meshray.node.peers import PeerLink
from meshray.node.session import Connection
from meshray.rpc import strict
from meshray.rpc.factory import make_server
from meshray.rpc.generated import meshray_pb2 as pb

TOKEN = "unit-test-token-0123456789abcdef"


class _Peer:
    def __init__(self):
        self.received = threading.Event()

    def Deliver(self, batch, context):
        self.received.set()
        return pb.PeerAck()

    def PullObject(self, request, context):
        yield b""


async def _batches(*batches):
    for batch in batches:
        yield batch


def test_the_rest_of_a_batch_waits_for_a_peer_delivery_to_start():
    peer = _Peer()
    server, bound = make_server(["127.0.0.1:0"], token=TOKEN, tls=None)
    strict.add_service(server, peer, "meshray.NodePeer", raw_responses=("PullObject",))
    server.start()
    seen: list = []

    async def scenario():
        peers = SimpleNamespace(deliveries_due=0, flush_borrows=lambda: seen.append("flush"))

        def due():
            peers.deliveries_due += 1

        link = PeerLink(b"n" * 16, "ab" * 16, bound[0], TOKEN, on_start=due)
        # A link in use is connected: connecting takes more than a turn or two.
        link.send(pb.PeerEvent(refs=pb.RefUpdate(add=[b"w" * 20])))
        for _ in range(200):
            if peer.received.is_set() and not link.pending:
                break
            await asyncio.sleep(0.05)
        peer.received.clear()

        def handle(_conn, event):
            if event.HasField("hello"):
                link.send(pb.PeerEvent(refs=pb.RefUpdate(add=[b"r" * 20])))
                seen.append("offered")
            else:
                seen.append(("peer had it", peer.received.wait(10)))

        daemon = SimpleNamespace(peers=peers, _handle=handle,
                                 dispatch=SimpleNamespace(schedule=lambda: seen.append("schedule")))
        daemon._sent_to = {}
        daemon._batch_done = lambda: NodeDaemon._batch_done(daemon)
        daemon._write_sent = lambda: NodeDaemon._write_sent(daemon)
        conn = Connection(1, asyncio.Queue())
        batch = pb.ClientBatch(events=[pb.ClientEvent(hello=pb.Hello(role="driver")),
                                       pb.ClientEvent(refs=pb.RefUpdate())])
        try:
            await NodeDaemon._read_client(daemon, conn, _batches(batch))
        finally:
            await link.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop(0)
    # Cut after the offer (the batch's end work ran there), then the rest.
    assert seen == ["offered", "flush", "schedule", ("peer had it", True), "flush", "schedule"]
