"""The pure rules of the gRPC servers' connection limits.

How the limits scale with the descriptor limit, how the environment overrides
them, and which connections a peer over its cap loses. The integration test
(tests/integration/test_connection_flood.py) shows them holding against a
real flood.
"""
from __future__ import annotations

import time

import pytest

from meshray.rpc.limits import (
    ENV_MAX_CONNECTIONS,
    ENV_MAX_CONNECTIONS_PER_PEER,
    ConnectionLimits,
    excess_connections,
    limits_for,
)


def test_limits_scale_with_the_descriptor_limit():
    assert limits_for(1024, {}) == ConnectionLimits(total=512, per_peer=128)
    assert limits_for(1 << 20, {}) == ConnectionLimits(total=1 << 19, per_peer=1024)
    assert limits_for(64, {}) == ConnectionLimits(total=64, per_peer=16)
    assert limits_for(-1, {}).total == 1 << 19          # RLIM_INFINITY


def test_limits_from_environment_are_validated():
    assert limits_for(1024, {ENV_MAX_CONNECTIONS: "100", ENV_MAX_CONNECTIONS_PER_PEER: "10"}) \
        == ConnectionLimits(total=100, per_peer=10)
    with pytest.raises(ValueError, match=r"MESHRAY_MAX_CONNECTIONS='lots' must be a positive"):
        limits_for(1024, {ENV_MAX_CONNECTIONS: "lots"})
    with pytest.raises(ValueError, match=r"MESHRAY_MAX_CONNECTIONS_PER_PEER='0'"):
        limits_for(1024, {ENV_MAX_CONNECTIONS_PER_PEER: "0"})
    with pytest.raises(ValueError, match="more than the 100 connections"):
        limits_for(1024, {ENV_MAX_CONNECTIONS: "100", ENV_MAX_CONNECTIONS_PER_PEER: "101"})


def test_excess_connections_keep_each_peers_oldest():
    rows = [(fd, 7000, "10.0.0.9", 1) for fd in range(5)]            # flood, seen first sweep
    rows += [(fd, 7000, "10.0.0.9", 2) for fd in range(5, 8)]        # more, seen later
    rows += [(fd, 7000, "10.0.0.2", 1) for fd in range(20, 23)]      # a normal peer
    rows += [(fd, 7001, "10.0.0.9", 1) for fd in range(30, 33)]      # same peer, other port
    assert excess_connections(rows, 3) == {(7000, "10.0.0.9"): [3, 4, 5, 6, 7]}
    assert excess_connections(rows, 8) == {}


def test_watcher_cuts_a_peer_down_to_its_cap_and_says_so(monkeypatch, caplog):
    """A real server and real sockets: the sweep closes one peer's excess only."""
    import socket

    from meshray.rpc import limits
    from meshray.rpc.factory import make_server

    monkeypatch.setenv(ENV_MAX_CONNECTIONS, "64")
    monkeypatch.setenv(ENV_MAX_CONNECTIONS_PER_PEER, "4")
    server, bound = make_server(["127.0.0.1:0"], token=None, tls=None)
    server.start()
    port = int(bound[0].rsplit(":", 1)[1])
    flood, others = [], []
    try:
        for source, group, count in (("127.0.0.2", flood, 20), ("127.0.0.3", others, 3)):
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5,
                                                source_address=(source, 0))
                sock.setblocking(False)
                group.append(sock)

        def closed_by_server(sockets):
            gone = 0
            for sock in sockets:
                try:
                    gone += sock.recv(1) == b""
                except BlockingIOError:
                    pass
                except OSError:
                    gone += 1
            return gone

        caplog.set_level("WARNING", logger="meshray.rpc.limits")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and closed_by_server(flood) < 16:
            limits._watcher.sweep()
            time.sleep(0.05)
        assert closed_by_server(flood) == 16       # 20 - the cap of 4
        assert closed_by_server(others) == 0       # another peer under its cap keeps all
        assert any(f"from 127.0.0.2 to port {port}" in r.getMessage()
                   and "at most 4 connections (MESHRAY_MAX_CONNECTIONS_PER_PEER=4)"
                   in r.getMessage() for r in caplog.records)
    finally:
        for sock in flood + others:
            sock.close()
        server.stop(0)
