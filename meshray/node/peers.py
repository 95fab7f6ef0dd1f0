"""Links from this node daemon to its peers.

Each peer gets one PeerLink: events for it are queued and sent as batches by
a single task, one Deliver call in flight at a time, so the peer sees them in
the order they were queued. A link whose calls fail keeps its events and
retries with backoff until the peer is declared dead (its etcd lease is gone),
at which point the daemon drops the link and handles the node's death.
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
    def __init__(self, local_node_id: bytes, node_hex: str, address: str, token: str | None):
        self.node_hex = node_hex
        self.address = address
        self._local_node_id = local_node_id
        self._channel = make_aio_channel(address, token=token)
        self.stub = pb_grpc.NodePeerStub(self._channel)
        self._queue: list[pb.PeerEvent] = []
        self.functions_sent: set[bytes] = set()   # function bytes this peer already has
        self._wakeup = asyncio.Event()
        self._closed = False
        self._sender = asyncio.get_running_loop().create_task(self._send_loop())

    def channel_state(self):
        """The connection's state, without triggering a connect (liveness.py polls it)."""
        return self._channel.get_state(try_to_connect=False)

    def send(self, event: pb.PeerEvent) -> None:
        if self._closed:
            return
        self._queue.append(event)
        self._wakeup.set()

    async def _send_loop(self) -> None:
        delay = 0.05
        while not self._closed:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue and not self._closed:
                batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
                try:
                    await self.stub.Deliver(pb.PeerBatch(from_node=self._local_node_id,
                                                         events=batch),
                                            timeout=PEER_CALL_TIMEOUT_S)
                    delay = 0.05
                except grpc.aio.AioRpcError as exc:
                    if self._closed:
                        return
                    log.warning("delivery to node %s at %s failed (%s); retrying",
                                self.node_hex, self.address, exc.code().name)
                    self._queue[:0] = batch
                    await asyncio.sleep(delay * (1 + random.random()))
                    delay = min(delay * 2, 2.0)

    async def close(self) -> None:
        self._closed = True
        self._wakeup.set()
        self._sender.cancel()
        await self._channel.close()
