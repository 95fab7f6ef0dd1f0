"""Liveness evidence: only an actively refused connection counts as death,
and a peer whose link left READY is probed until it is proven gone."""
from __future__ import annotations

import asyncio
import socket
import types

import grpc

from meshray.node.liveness import LinkWatch, PeerLiveness, probe_refused

READY = grpc.ChannelConnectivity.READY
IDLE = grpc.ChannelConnectivity.IDLE
FAILURE = grpc.ChannelConnectivity.TRANSIENT_FAILURE


def test_only_a_link_that_was_ready_is_probed():
    watch = LinkWatch()
    assert not watch.observe(IDLE, 0.0)           # never connected: nothing to suspect
    assert not watch.observe(FAILURE, 10.0)
    assert not watch.observe(READY, 11.0)
    assert not watch.observe(READY, 12.0)
    assert watch.observe(IDLE, 12.1)              # it left READY: probe at once


def test_a_link_out_of_ready_is_probed_again_with_a_growing_interval():
    """One inconclusive probe must not leave the death to the lease: the
    link of a dead peer never becomes READY again to prompt another."""
    watch = LinkWatch()
    watch.observe(READY, 0.0)
    times = [t / 10 for t in range(1, 400)]       # polled every 0.1 s for 40 s
    probes = [t for t in times if watch.observe(FAILURE, t)]
    gaps = [round(b - a, 1) for a, b in zip(probes, probes[1:])]
    assert probes[0] == 0.1
    assert gaps[:4] == [0.5, 1.0, 2.0, 4.0]
    assert set(gaps[4:]) == {5.0}                 # capped: a silent peer costs little


def test_a_return_to_ready_resets_the_interval():
    watch = LinkWatch()
    watch.observe(READY, 0.0)
    assert watch.observe(IDLE, 1.0)
    assert not watch.observe(IDLE, 1.2)           # within the first interval
    assert watch.observe(IDLE, 1.5)
    assert not watch.observe(READY, 2.0)
    assert watch.observe(IDLE, 2.1)               # a new departure: at once
    assert not watch.observe(IDLE, 2.5)
    assert watch.observe(IDLE, 2.6)               # and the first interval again


def test_a_failed_revocation_is_tried_again_until_it_succeeds():
    """The probe proves the peer gone, but etcd does not commit the
    revocation in time: the next probe revokes again."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()                              # nothing listens: refused
    link = types.SimpleNamespace(address=f"127.0.0.1:{port}", channel_state=lambda: state)
    view = types.SimpleNamespace(nodes={"dead": {"LeaseID": "42"}}, known_dead=set())
    peers = types.SimpleNamespace(links={"dead": link}, view=view)
    revocations = []

    def revoke(node_hex, lease_id):
        revocations.append((node_hex, lease_id))
        if len(revocations) == 1:
            raise TimeoutError("etcd did not answer in 3 s")
        del view.nodes[node_hex]                  # the watch drops the dead node

    async def scenario():
        nonlocal state
        liveness = PeerLiveness(peers, revoke)
        loop = asyncio.get_running_loop()
        state = READY
        liveness.poll(loop.time())
        state = FAILURE
        deadline = loop.time() + 10
        while view.nodes and loop.time() < deadline:
            liveness.poll(loop.time())
            await asyncio.sleep(0.05)

    state = None
    asyncio.run(scenario())
    assert revocations == [("dead", 42), ("dead", 42)]


def test_a_closed_port_is_refused_and_a_listening_one_is_not():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        assert asyncio.run(probe_refused(f"127.0.0.1:{port}")) is False
    finally:
        listener.close()
    assert asyncio.run(probe_refused(f"127.0.0.1:{port}")) is True


def test_unusable_addresses_prove_nothing():
    assert asyncio.run(probe_refused("unix:/tmp/x.sock")) is False
    assert asyncio.run(probe_refused("no-port")) is False
