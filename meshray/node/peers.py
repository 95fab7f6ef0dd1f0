"""Links from this node daemon to its peers.

Each peer gets one PeerLink: events for it are queued and sent as batches by
a single task, one Deliver call in flight at a time, so the peer sees them in
the order they were queued. Every batch also carries this node's load as of
its sending (free resources, backlog room), which the peer uses to offer us
spilled work. A link whose calls fail keeps its events and retries with
backoff until the peer is declared dead (its etcd lease is gone), at which
point the daemon drops the link and handles the node's death. A batch the
peer refuses as malformed is not retried as is (it would be refused for
ever): its events go one by one and only the refused ones are dropped.
"""
from __future__ import annotations

import asyncio
import logging
import random

import grpc

from meshray.rpc import make_aio_channel
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.rpc.generated import meshray_pb2_grpc as pb_grpc

__all__ = ["PeerLink", "PEER_CALL_TIMEOUT_S"]

log = logging.getLogger(__name__)

PEER_CALL_TIMEOUT_S = 10.0
_MAX_BATCH = 1000


class PeerLink:
    def __init__(self, local_node_id: bytes, node_hex: str, address: str, token: str | None,
                 load=None, on_start=None):
        self.node_hex = node_hex
        self.address = address
        self._local_node_id = local_node_id
        self._load = load    # callable -> pb.NodeLoad: ours, attached to every batch
        # Called when an event arrives at a link with nothing on its way: the
        # delivery it needs starts only when the event loop turns.
        self._on_start = on_start
        self._channel = make_aio_channel(address, token=token)
        self.stub = pb_grpc.NodePeerStub(self._channel)
        # PullObject with its replies left as bytes: transfer.decode_chunk
        # reads them without copying the chunk's data into a message object.
        self.pull_chunks = self._channel.unary_stream(
            "/meshray.NodePeer/PullObject",
            request_serializer=pb.PullRequest.SerializeToString, response_deserializer=None)
        self._queue: list[pb.PeerEvent] = []
        self.functions_sent: set[bytes] = set()   # function bytes this peer already has
        self._wakeup = asyncio.Event()
        self._closed = False
        self._delivering = False
        self._sender = asyncio.get_running_loop().create_task(self._send_loop())

    def channel_state(self):
        """The connection's state, without triggering a connect (liveness.py polls it)."""
        return self._channel.get_state(try_to_connect=False)

    @property
    def pending(self) -> bool:
        """Whether events wait to be sent or a batch is on its way (a drain waits for it)."""
        return not self._closed and (bool(self._queue) or self._delivering)

    def send(self, event: pb.PeerEvent) -> None:
        if self._closed:
            return
        if not self._queue and not self._delivering and self._on_start is not None:
            self._on_start()
        self._queue.append(event)
        self._wakeup.set()

    async def _send_loop(self) -> None:
        delay = 0.05
        while not self._closed:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue and not self._closed:
                batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
                self._delivering = True
                try:
                    await self._deliver(batch)
                    delay = 0.05
                except grpc.aio.AioRpcError as exc:
                    if self._closed:
                        return
                    self._queue[:0] = batch
                    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and \
                            await self._deliver_singly(len(batch)):
                        continue
                    log.warning("delivery to node %s at %s failed (%s); retrying",
                                self.node_hex, self.address, exc.code().name)
                    await asyncio.sleep(delay * (1 + random.random()))
                    delay = min(delay * 2, 2.0)
                finally:
                    self._delivering = False

    async def _deliver(self, events: list) -> None:
        message = pb.PeerBatch(from_node=self._local_node_id, events=events)
        if self._load is not None:
            try:
                message.load.CopyFrom(self._load())   # as of now, not when queued
            except Exception:  # noqa: BLE001 - the events matter more than the load
                log.exception("could not attach this node's load for %s", self.node_hex)
        await self.stub.Deliver(message, timeout=PEER_CALL_TIMEOUT_S)

    async def _deliver_singly(self, count: int) -> bool:
        """The peer refused a batch as malformed (a bug here; it would refuse it
        again): send its `count` events one by one, dropping (and logging) only
        those refused, so one bad event cannot wedge the link. False when a
        transient failure interrupts it (the rest stay queued, in order)."""
        for _ in range(count):
            if self._closed or not self._queue:
                return True
            event = self._queue[0]
            try:
                await self._deliver([event])
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    return False
                log.error("node %s refused a %s event from this node as malformed; it is "
                          "dropped: %s", self.node_hex, event.WhichOneof("kind"), exc.details())
            del self._queue[0]
        return True

    async def close(self) -> None:
        self._closed = True
        self._wakeup.set()
        self._sender.cancel()
        await self._channel.close()
