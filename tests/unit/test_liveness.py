"""Liveness evidence: only an actively refused connection counts as death."""
from __future__ import annotations

import asyncio
import socket

import grpc

from meshray.node.liveness import probe_refused, should_probe

READY = grpc.ChannelConnectivity.READY
IDLE = grpc.ChannelConnectivity.IDLE
FAILURE = grpc.ChannelConnectivity.TRANSIENT_FAILURE


def test_only_a_link_leaving_ready_is_probed():
    assert should_probe(READY, IDLE) and should_probe(READY, FAILURE)
    assert not should_probe(READY, READY)
    assert not should_probe(None, FAILURE)       # never connected: nothing to suspect
    assert not should_probe(IDLE, FAILURE)


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
