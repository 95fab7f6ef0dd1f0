"""The data link (meshray/rpc/data_link.py): object bytes on raw TCP, with
membership proved both ways before the reader reads or the holder serves.

Real sockets on loopback, a real object file; the holder's callbacks are
plain functions that record what they were asked.
"""
from __future__ import annotations

import os
import socket
import threading

import pytest

from meshray.object_store import layout
from meshray.rpc import data_link
from meshray.rpc.data_link import DataLinkError, DataServer, RangeNotServed, open_range
from tests.helpers import relay_to, wait_for

TOKEN = "data-link-test-secret-0123456789abcdef"
OID = b"\x07" * 28


@pytest.fixture
def holder(tmp_path):
    path = str(tmp_path / "object")
    layout.write_object(path, b"inband", [os.urandom(3_000_000)])
    asked, sent = [], []

    def open_object(object_id, puller):
        asked.append((object_id, puller))
        if object_id != OID:
            raise RangeNotServed(f"object {object_id.hex()} is not here")
        return path

    server = DataServer("127.0.0.1", token=TOKEN, tls=None, open_object=open_object,
                        sent=lambda *args: sent.append(args))
    server.asked, server.sent_ranges, server.path = asked, sent, path
    yield server
    server.close()


def _read(address, offset=0, length=data_link.WHOLE, token=TOKEN, object_id=OID):
    sock, total, count = open_range(address, token=token, object_id=object_id, offset=offset,
                                    length=length, puller="aa" * 28, timeout=10, tls=None)
    try:
        buf = bytearray(count)
        data_link.receive_into(sock, memoryview(buf))
    finally:
        sock.close()
    return total, bytes(buf)


def test_a_member_reads_the_whole_object_and_any_range_of_it(holder):
    data = open(holder.path, "rb").read()
    assert _read(holder.address) == (len(data), data)
    assert _read(holder.address, offset=1000, length=5000) == (len(data), data[1000:6000])
    # A range past the end is cut to what is there.
    assert _read(holder.address, offset=len(data) - 10, length=100) == (len(data), data[-10:])
    assert holder.asked == [(OID, "aa" * 28)] * 3
    # Told after the holder's last byte left, which may be after the reader has it.
    wait_for(lambda: len(holder.sent_ranges) == 3, timeout=10, message="three ranges sent")
    assert [count for _oid, _puller, count in holder.sent_ranges] == [len(data), 5000, 10]


def test_an_object_the_holder_lacks_is_answered_not_served(holder):
    with pytest.raises(RangeNotServed, match="is not here"):
        _read(holder.address, object_id=b"\x01" * 28)


def test_a_reader_without_the_secret_is_refused_before_the_holder_looks_anything_up(holder):
    with pytest.raises(DataLinkError, match="without proving membership") as info:
        _read(holder.address, token="not-the-cluster-secret-000000000000")
    assert info.value.reached and holder.asked == [] and holder.sent_ranges == []


def test_a_proof_relayed_through_another_address_is_refused(holder):
    """An impostor at another address forwarding a member's bytes gets nothing:
    the proof names the address the member dialled."""
    with relay_to(holder.port) as port:
        with pytest.raises(DataLinkError, match="without proving membership"):
            _read(f"127.0.0.1:{port}")
    assert holder.asked == []


def test_a_holder_that_cannot_prove_membership_is_not_read(tmp_path):
    """A listener that speaks the protocol without the secret: the reader
    stops at its proof and reads none of the bytes that follow."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    got = []

    def impostor():
        conn, _ = listener.accept()
        with conn:
            got.append(conn.recv(1024))
            conn.sendall(os.urandom(16))                           # its nonce
            got.append(conn.recv(1024))                            # the reader's proof + request
            conn.sendall(os.urandom(32) + b"\x00" + data_link._FOUND.pack(5, 5) + b"EVIL!")

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    try:
        with pytest.raises(DataLinkError, match="answered without proving membership"):
            _read(f"127.0.0.1:{port}")
    finally:
        thread.join(10)
        listener.close()
    assert len(got) == 2 and TOKEN.encode() not in b"".join(got)     # the secret never travels


def test_nothing_listening_is_told_apart_from_a_refusal():
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(DataLinkError, match="cannot reach") as info:
        _read(f"127.0.0.1:{port}")
    assert not info.value.reached


def test_an_open_listener_needs_the_secret():
    with pytest.raises(ValueError, match="without a cluster token"):
        DataServer("0.0.0.0", token=None, tls=None, open_object=None, sent=None)


def test_bad_ranges_are_refused_by_name(holder):
    with pytest.raises(ValueError, match="offset=-1, length=5"):
        open_range(holder.address, token=TOKEN, object_id=OID, offset=-1, length=5,
                   puller="p", timeout=5, tls=None)


def test_a_received_range_lands_in_the_file_and_ranges_complete_it(tmp_path):
    source = str(tmp_path / "source")
    layout.write_object(source, b"head", [os.urandom(1_000_000)])
    data = open(source, "rb").read()
    target = str(tmp_path / "copy")
    writer = layout.ChunkWriter(target, len(data))
    half = len(data) // 2 + 123               # not page aligned
    threads = [threading.Thread(target=writer.fill, args=(start, end - start, lambda view, s=start,
                                e=end: view.__setitem__(slice(None), data[s:e])))
               for start, end in ((0, half), (half, len(data)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert writer.finish() == len(data)
    assert open(target, "rb").read() == data


def test_a_failed_receive_leaves_the_range_missing(tmp_path):
    writer = layout.ChunkWriter(str(tmp_path / "copy"), 100_000)

    def broken(view):
        view[:10] = b"x" * 10
        raise DataLinkError("the holder went away")

    with pytest.raises(DataLinkError):
        writer.fill(0, 100_000, broken)
    assert writer.missing_ranges() == [(0, 100_000)]
    writer.abort()
    assert os.listdir(tmp_path) == []


def test_connections_past_the_limit_are_closed_and_the_reader_told_none_opened(tmp_path):
    server = DataServer("127.0.0.1", token=TOKEN, tls=None, max_connections=1,
                        open_object=lambda *a: pytest.fail("nothing is served"),
                        sent=lambda *a: None)
    idle = socket.create_connection(("127.0.0.1", server.port))   # holds the only slot
    try:
        idle.sendall(data_link.MAGIC)
        with pytest.raises(DataLinkError, match="closed the connection before its handshake") \
                as info:
            _read(server.address)
        assert not info.value.reached
    finally:
        idle.close()
        server.close()


def _read_spliced(address, tmp_path, total_expected):
    sock, total, count = open_range(address, token=TOKEN, object_id=OID, offset=0,
                                    length=data_link.WHOLE, puller="p", timeout=10, tls=None)
    assert data_link.can_splice(sock) and total == count == total_expected
    writer = layout.ChunkWriter(str(tmp_path / "copy"), total)
    with sock:
        # Two pieces, the second at an offset, as ranges land in one file.
        writer.fill_fd(0, 1000, lambda fd, at, size: data_link.splice_into(sock, fd, at, size, 5))
        writer.fill_fd(1000, total - 1000,
                       lambda fd, at, size: data_link.splice_into(sock, fd, at, size, 5))
    writer.finish()
    return open(str(tmp_path / "copy"), "rb").read()


def test_spliced_bytes_land_in_the_file_without_passing_through_the_reader(holder, tmp_path):
    data = open(holder.path, "rb").read()
    assert _read_spliced(holder.address, tmp_path, len(data)) == data


def test_a_holder_that_stops_sending_is_given_up_on_after_the_deadline(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    writer = layout.ChunkWriter(str(tmp_path / "copy"), 100_000)
    reader = socket.create_connection(listener.getsockname())
    stalled, _ = listener.accept()
    try:
        stalled.sendall(b"x" * 10)                 # a little, then nothing
        reader.settimeout(0.3)
        with pytest.raises(DataLinkError, match="sent nothing for 0.3 s \\(10 of 100000"):
            writer.fill_fd(0, 100_000,
                           lambda fd, at, size: data_link.splice_into(reader, fd, at, size, 0.3))
        stalled.close()                            # and a holder that goes away
        with pytest.raises(DataLinkError, match="closed the data link after 0 of"):
            writer.fill_fd(0, 100_000,
                           lambda fd, at, size: data_link.splice_into(reader, fd, at, size, 5))
    finally:
        writer.abort()
        reader.close()
        listener.close()


def test_a_lookup_that_fails_otherwise_is_a_transient_failure_not_a_missing_copy(tmp_path):
    def slow(object_id, puller):
        raise TimeoutError("the node's loop did not answer in time")

    server = DataServer("127.0.0.1", token=TOKEN, tls=None, open_object=slow,
                        sent=lambda *a: None)
    try:
        with pytest.raises(DataLinkError) as info:     # retried, never "no copy here"
            _read(server.address)
        assert info.value.reached and not isinstance(info.value, RangeNotServed)
    finally:
        server.close()
