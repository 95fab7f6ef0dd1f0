"""The call link (meshray/rpc/call_link.py): actor calls on a plain socket,
with membership proved both ways before either end reads a frame.

Real sockets (loopback TCP and a unix socket); the server's `on_link` is a
plain function that records what arrived and answers as told.
"""
from __future__ import annotations

import os
import socket
import stat
import threading

import pytest

from meshray.rpc import call_link
from meshray.rpc.call_link import LinkClosed, LinkServer, connect
from meshray.rpc.generated import meshray_pb2 as pb
from tests.helpers import relay_to, wait_for

TOKEN = "call-link-test-secret-0123456789abcdef"


class _Echo:
    """A server that answers each frame with (REPLIES, same payload), and
    STATUS OK after END."""

    def __init__(self):
        self.frames: list = []
        self.links = 0

    def __call__(self, link):
        self.links += 1
        while True:
            try:
                kind, payload = link.recv()
            except LinkClosed:
                return
            self.frames.append((kind, payload))
            if kind == call_link.END:
                link.send(call_link.STATUS, call_link.status_payload(call_link.OK))
                link.wait_idle(5)
                return
            link.send(call_link.REPLIES, payload)


@pytest.fixture
def server(tmp_path):
    echo = _Echo()
    server = LinkServer(["127.0.0.1:0", f"unix:{tmp_path / 'a.sock'}"], token=TOKEN,
                        on_link=echo, tls=None)
    server.echo = echo
    yield server
    server.close()


def _tcp(server):
    return next(a for a in server.addresses if not a.startswith("unix:"))


def _unix(server):
    return next(a for a in server.addresses if a.startswith("unix:"))


@pytest.mark.parametrize("which", ["tcp", "unix"])
def test_frames_go_both_ways_and_the_link_ends_with_its_status(server, which):
    address = _tcp(server) if which == "tcp" else _unix(server)
    link = connect(address, token=TOKEN, tls=None)
    try:
        for size in (0, 1, 70_000, 3_000_000):
            payload = os.urandom(size)
            link.send(call_link.CALLS, payload)
            assert link.recv() == (call_link.REPLIES, payload)
        link.send(call_link.END)
        kind, payload = link.recv()
        assert kind == call_link.STATUS and payload[0] == call_link.OK
        with pytest.raises(LinkClosed, match="closed the link"):
            link.recv()
    finally:
        link.close()


def test_frames_queued_in_a_burst_leave_merged_and_parse_as_one_message(server):
    """Consecutive CALLS frames written together become one frame whose
    payload is the concatenated messages: protobuf parses it as one batch
    with every call, in order."""
    link = connect(_tcp(server), token=TOKEN, tls=None)
    try:
        specs = [pb.TaskSpec(task_id=bytes([i]) * 24, method_name=f"m{i}") for i in range(50)]
        numbers = [link.enqueue(call_link.CALLS, pb.ActorCallBatch(calls=[spec])
                                .SerializeToString()) for spec in specs]
        assert numbers == list(range(1, 51)) and link.sent_upto == 0   # nothing left yet
        link.flush(now=True)
        assert link.sent_upto == 50
        got: list = []
        while len(got) < 50:
            kind, payload = link.recv()
            assert kind == call_link.REPLIES
            got.extend(pb.ActorCallBatch.FromString(payload).calls)
        assert [spec.method_name for spec in got] == [f"m{i}" for i in range(50)]
        assert len(server.echo.frames) < 50          # fewer frames than messages
        link.send(call_link.END)
        assert link.recv()[0] == call_link.STATUS
    finally:
        link.close()


def test_the_writer_thread_sends_what_is_left_to_it(server):
    link = connect(_tcp(server), token=TOKEN, tls=None)
    try:
        for i in range(20):
            link.send(call_link.REPLIES, bytes([i]) * 10, now=False)
        got = b""
        while len(got) < 200:
            kind, payload = link.recv()
            got += payload
        assert got == b"".join(bytes([i]) * 10 for i in range(20))
    finally:
        link.close()


def test_a_caller_without_the_secret_is_refused_before_any_frame_is_read(server):
    for token in ("wrong-secret-0123456789abcdef0123456789", None):
        for address in server.addresses:
            with pytest.raises(LinkClosed, match="without proving membership"):
                connect(address, token=token, tls=None)
    assert server.echo.links == 0


def test_a_proof_relayed_through_another_address_is_refused(server):
    """An impostor at another address forwarding a member's bytes gets no
    link: the proof names the address the member dialled."""
    upstream_port = int(_tcp(server).rsplit(":", 1)[1])
    with relay_to(upstream_port) as port:
        with pytest.raises(LinkClosed, match="without proving membership"):
            connect(f"127.0.0.1:{port}", token=TOKEN, tls=None)
    assert server.echo.links == 0


def test_an_actor_that_cannot_prove_membership_is_not_read():
    """A listener that speaks the handshake without the secret: the caller
    stops at its proof, and the secret never travels."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    got = []

    def impostor():
        conn, _ = listener.accept()
        with conn:
            got.append(conn.recv(1024))
            conn.sendall(os.urandom(16))
            got.append(conn.recv(1024))
            conn.sendall(os.urandom(32) + b"\x00\x00\x00\x01\x03E")

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    try:
        with pytest.raises(LinkClosed, match="answered without proving membership"):
            connect(f"127.0.0.1:{port}", token=TOKEN, tls=None)
    finally:
        thread.join(10)
        listener.close()
    assert len(got) == 2 and TOKEN.encode() not in b"".join(got)


def test_nothing_listening_is_told_apart_from_a_refusal(tmp_path):
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    for address in (f"127.0.0.1:{port}", f"unix:{tmp_path / 'none.sock'}"):
        with pytest.raises(LinkClosed, match="cannot reach") as info:
            connect(address, token=TOKEN, tls=None)
        assert not info.value.reached


def test_an_open_listener_needs_the_secret():
    with pytest.raises(ValueError, match="without a cluster token"):
        LinkServer(["0.0.0.0:0"], token=None, on_link=None, tls=None)


def test_a_frame_over_the_limit_is_never_sent_nor_read(server):
    link = connect(_tcp(server), token=TOKEN, tls=None)
    try:
        with pytest.raises(ValueError, match="exceeds"):
            link.enqueue(call_link.CALLS, _Huge())
    finally:
        link.close()
    # A peer that announces one is cut off without reading it.
    a, b = socket.socketpair()
    with a, b:
        reader = call_link.Link(a, peer="test")
        b.sendall(call_link._HEADER.pack(call_link.MAX_MESSAGE_BYTES + 1, call_link.CALLS))
        with pytest.raises(LinkClosed, match="over the") as info:
            reader.recv()
        assert info.value.code == call_link.MALFORMED


class _Huge(bytes):
    def __len__(self):
        return call_link.MAX_MESSAGE_BYTES + 1


def test_the_unix_socket_is_private_and_removed_on_close(tmp_path):
    path = tmp_path / "p.sock"
    server = LinkServer([f"unix:{path}"], token=TOKEN, on_link=_Echo(), tls=None)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        server.close()
    assert not path.exists()


def test_closing_the_server_breaks_open_links(server):
    link = connect(_tcp(server), token=TOKEN, tls=None)
    try:
        wait_for(lambda: server.echo.links == 1, timeout=10, message="the link being served")
        server.close()
        with pytest.raises(LinkClosed):
            link.recv()
    finally:
        link.close()


def test_links_past_the_limit_are_closed_on_accept_and_the_caller_told_none_opened():
    echo = _Echo()
    server = LinkServer(["127.0.0.1:0"], token=TOKEN, on_link=echo, tls=None, max_links=2)
    address = server.addresses[0]
    host, port = address.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port))) for _ in range(2)]   # no handshake
    try:
        def refused():
            try:
                connect(address, token=TOKEN, tls=None).close()
            except LinkClosed as exc:
                return not exc.reached
            return False
        wait_for(refused, timeout=10, message="a third connection refused at the limit")
        for sock in idle:
            sock.close()
        link = wait_for(lambda: _try_connect(address), timeout=15,
                        message="a link once the idle connections are gone")
        link.send(call_link.CALLS, b"x")
        assert link.recv() == (call_link.REPLIES, b"x")
        link.close()
    finally:
        for sock in idle:
            sock.close()
        server.close()


def _try_connect(address):
    try:
        return connect(address, token=TOKEN, tls=None)
    except LinkClosed:
        return None
