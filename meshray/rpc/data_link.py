"""The data link: object bytes between nodes on a raw TCP connection.

Why: a large object pulled over gRPC passes through about six copies in
Python (protobuf framing, gRPC's slices, the received message, the write to
the store file), which caps a transfer near 1-2 GB/s here. On a plain socket
the holder sends the store file with ``sendfile`` and the reader moves the
bytes from the socket into its own store file with ``splice`` (through a
pipe): neither process touches them, and the kernel copies them once, into
the reader's file pages. gRPC keeps every other message, and small
objects, whose cost is the round trip, not bytes.

Membership, as on every gRPC call (``auth.py``): both ends prove they know
the cluster secret without sending it, and the reader reads nothing from a
holder that has not proved it. One connection carries one request; per
connection (HMAC-SHA256 under keys derived for this use only)::

    reader -> holder   MAGIC | nonce_r (16) | len (1) | target (the address it dialled)
    holder -> reader   nonce_h (16)
    reader -> holder   mac_r = HMAC(K_data_call, MAGIC|nonce_r|nonce_h|target|request) | request
    holder -> reader   HMAC(K_data_answer, mac_r) | status (1) | ...

The holder checks `mac_r` and that `target` is one of its own addresses (a
proof made for an impostor's address cannot be relayed to a member) before
it answers anything; it closes the connection without a word otherwise.
Both nonces are fresh per connection, so a recorded exchange replays
nothing, and no clock is involved. With TLS configured (``MESHRAY_TLS_*``)
the connection is TLS first, with the same certificates and client rule as
gRPC; the holder then writes the file's mapped bytes and the reader
``recv_into``'s them into its file's mapped pages (encrypted bytes cannot be
spliced).

A request names an object, a byte range and the reading node; the answer is
``status 0 | total size (8) | count (8)`` and `count` bytes of the object
file from the range's start, or ``status 1 | len (2) | why``. A large
object is read as a few ranges on parallel connections.

Alternatives considered: a second gRPC service with bytes fields (the copies
this avoids); ``recv_into`` a populated mapping of the file for plain TCP
too (measured here: 2.3-3.4 GB/s for 1 GiB, against 5.5-7 GB/s spliced into
a file whose pages exist); shared memory across nodes (nodes are separate
machines).

What safety rests on: the same secret and HMAC as ``auth.py``; a holder
serving only objects its store holds, to connections that proved
membership; a bound on connections at once, with a deadline on every read
and write, so a peer that stops reading or writing ties up no more than
that.
"""
from __future__ import annotations

import fcntl
import hmac
import logging
import mmap
import os
import select
import socket
import ssl
import struct
import threading
import time

from meshray.rpc.auth import link_keys
from meshray.rpc.auth import link_mac as _mac
from meshray.rpc.factory import (
    _check_binds,
    _check_token,
    _Failpoints,
    _failpoints_wanted,
    join_host_port,
    split_host_port,
)
from meshray.rpc.tls import TLS_FROM_ENV, TlsConfig, resolve_tls

__all__ = ["DataServer", "DataLinkError", "RangeNotServed", "open_range", "receive_into",
           "splice_into", "can_splice", "WHOLE"]

log = logging.getLogger(__name__)

MAGIC = b"MRDATA1\n"
PULL_METHOD = "/meshray.NodePeer/PullObject"    # whose failpoints apply here
_SPLICE_NONBLOCK = getattr(os, "SPLICE_F_NONBLOCK", 2)
_NONCE = 16
_MAC = 32
_RANGE = struct.Struct("!QQ")
_FOUND = struct.Struct("!QQ")
WHOLE = (1 << 63) - 1            # a range length meaning "to the end of the object"
HANDSHAKE_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 32


class DataLinkError(ConnectionError):
    """A data connection failed: refused, broken, stalled, or not a member.

    `reached` is False when no connection to the holder could be opened at
    all (nothing listens there, or a firewall drops it), True after that.
    """

    def __init__(self, message: str, reached: bool = True):
        super().__init__(message)
        self.reached = reached


class RangeNotServed(Exception):
    """What a holder answers when it has no such object (``why`` goes to the reader)."""


def _keys(token: str | None):
    return link_keys(token, "data")


def _recv_exact(sock, count: int) -> bytes:
    buf = bytearray(count)
    receive_into(sock, memoryview(buf))
    return bytes(buf)


def _request(object_id: bytes, offset: int, length: int, puller: str) -> bytes:
    who = puller.encode("ascii")
    if not 0 < len(object_id) < 256 or len(who) > 255:
        raise ValueError(f"object_id of {len(object_id)} bytes and puller {puller!r}: expected "
                         "1..255 bytes each")
    if offset < 0 or length <= 0:
        raise ValueError(f"range offset={offset}, length={length}: expected offset >= 0 "
                         "and length > 0")
    return (bytes([len(object_id)]) + object_id + _RANGE.pack(offset, length)
            + bytes([len(who)]) + who)


# ------------------------------------------------------------------ reader side
def open_range(address: str, *, token: str | None, object_id: bytes, offset: int,
               length: int, puller: str, timeout: float, tls=TLS_FROM_ENV):
    """Connect to the holder at `address` ("host:port"), prove membership
    both ways and ask for `length` bytes of `object_id` from `offset`.

    Returns ``(sock, total_size, count)``: the socket is positioned at the
    first of `count` bytes, with `timeout` on every read. Raises
    DataLinkError when the holder cannot be reached or does not prove
    membership, and RangeNotServed when it has no such object.
    """
    host, port = split_host_port(address)
    tls = resolve_tls(tls)
    keys = _keys(_check_token(token))
    request = _request(object_id, offset, length, puller)
    target = join_host_port(host, port).encode("ascii")
    try:
        sock = socket.create_connection((host, port), timeout=min(timeout, HANDSHAKE_TIMEOUT_S))
    except OSError as exc:
        raise DataLinkError(f"cannot reach the data link at {address}: {exc}",
                            reached=False) from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = tls.ssl_client_context().wrap_socket(
                sock, server_hostname=tls.server_name or host)
        nonce = os.urandom(_NONCE)
        try:
            sock.sendall(MAGIC + nonce + bytes([len(target)]) + target)
            theirs = _recv_exact(sock, _NONCE)
        except (DataLinkError, OSError):
            # Closed at once: the holder is at its connection limit, or this
            # is not a data link at all. Either way no data connection opened.
            raise DataLinkError(f"the data link at {address} closed the connection before "
                                "its handshake", reached=False) from None
        mac = _mac(keys[0], MAGIC + nonce + theirs + target + request) if keys else bytes(_MAC)
        sock.sendall(mac + request)
        try:
            proof = _recv_exact(sock, _MAC)
        except (DataLinkError, OSError):
            raise DataLinkError(f"the data link at {address} closed the connection without "
                                "proving membership (not a member of this cluster, or it "
                                "refused our proof)") from None
        if keys and not hmac.compare_digest(proof, _mac(keys[1], mac)):
            raise DataLinkError(f"the data link at {address} answered without proving "
                                "membership; nothing it sends is read")
        status = _recv_exact(sock, 1)[0]
        if status != 0:
            (size,) = struct.unpack("!H", _recv_exact(sock, 2))
            raise RangeNotServed(_recv_exact(sock, size).decode("utf-8", "replace"))
        total, count = _FOUND.unpack(_recv_exact(sock, _FOUND.size))
        sock.settimeout(timeout)
        return sock, total, count
    except BaseException as exc:
        sock.close()
        if isinstance(exc, (OSError, EOFError)) and not isinstance(exc, DataLinkError):
            raise DataLinkError(f"data link to {address} failed: {exc}") from None
        raise


def receive_into(sock, view: memoryview) -> None:
    """Fill `view` from `sock` (its reads time out as `open_range` set)."""
    got, size = 0, len(view)
    try:
        while got < size:
            n = sock.recv_into(view[got:], size - got)
            if not n:
                raise DataLinkError(f"the other end closed the data link after {got} of "
                                    f"{size} bytes")
            got += n
    except OSError as exc:
        if isinstance(exc, DataLinkError):
            raise
        raise DataLinkError(f"data link broke after {got} of {size} bytes: {exc}") from None


_PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = 1031


def can_splice(sock) -> bool:
    """Whether `sock`'s bytes can go straight to a file (plain TCP on Linux, not TLS)."""
    return hasattr(os, "splice") and not isinstance(sock, ssl.SSLSocket)


def splice_into(sock, fd: int, offset: int, length: int, timeout: float) -> None:
    """Move `length` bytes from `sock` into file `fd` at `offset` through a
    pipe (``splice``): the kernel copies them once, into the file's pages,
    and they never enter this process. Waits at most `timeout` for each
    piece."""
    read_end, write_end = os.pipe()
    try:
        try:
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, _PIPE_BYTES)
        except OSError:
            pass                       # the default pipe size works, in smaller steps
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        got, limit = 0, int(timeout * 1000)
        while got < length:
            try:
                moved = os.splice(sock.fileno(), write_end, min(_PIPE_BYTES, length - got),
                                  flags=_SPLICE_NONBLOCK)
            except BlockingIOError:
                if not poller.poll(limit):
                    raise DataLinkError(f"the holder sent nothing for {timeout:g} s "
                                        f"({got} of {length} bytes in)") from None
                continue
            if not moved:
                raise DataLinkError(f"the holder closed the data link after {got} of "
                                    f"{length} bytes")
            while moved:
                written = os.splice(read_end, fd, moved, offset_dst=offset + got)
                got += written
                moved -= written
    except OSError as exc:
        if isinstance(exc, DataLinkError):
            raise
        raise DataLinkError(f"data link broke while receiving: {exc}") from None
    finally:
        os.close(read_end)
        os.close(write_end)


# ------------------------------------------------------------------ holder side
_SEND_SLICE = 4 << 20


def _send_mapped(conn, fd: int, offset: int, count: int) -> None:
    """Write a file range from its mapping (TLS sockets cannot sendfile)."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(fd, offset - start + count, prot=mmap.PROT_READ, offset=start) as mapped:
        view = memoryview(mapped)
        try:
            for pos in range(offset - start, offset - start + count, _SEND_SLICE):
                conn.sendall(view[pos:min(pos + _SEND_SLICE, offset - start + count)])
        finally:
            view.release()

class DataServer:
    """A listener serving object byte ranges to members, one thread per connection.

    `open_object(object_id, puller)` (called on a connection's thread)
    returns the path of the object's file or raises RangeNotServed;
    `sent(object_id, puller, count)` is called after a range went out.
    Binding follows the gRPC factory's rule: no non-loopback listener
    without a token.
    """

    def __init__(self, host: str, *, token: str | None, open_object, sent, port: int = 0,
                 tls: TlsConfig | None = TLS_FROM_ENV, allow_insecure_remote: bool = False,
                 stall_s: float = 15.0, max_connections: int = MAX_CONNECTIONS):
        token = _check_token(token)
        _check_binds([join_host_port(host, port)], token, allow_insecure_remote)
        tls = resolve_tls(tls)
        self._context = tls.ssl_server_context() if tls is not None else None
        self._keys = _keys(token)
        self._open_object, self._sent = open_object, sent
        self._stall_s = stall_s
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, backlog=64)
        self.port = self._sock.getsockname()[1]
        self.address = join_host_port(host, self.port)
        self._targets = {self.address}
        if host in ("127.0.0.1", "localhost"):
            self._targets |= {f"127.0.0.1:{self.port}", f"localhost:{self.port}"}
        # Chaos testing: the PullObject failpoints (peer.pull) fault this way of pulling too.
        self._failpoints = _Failpoints() if _failpoints_wanted() else None
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open: set = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="meshray-data-accept",
                                        daemon=True)
        self._thread.start()

    def accept_hosts(self, hosts) -> None:
        """Hosts readers dial this node at besides the bound one (its advertised address)."""
        for host in hosts:
            self._targets.add(join_host_port(host, self.port))

    def close(self) -> None:
        """Stop accepting and break every open connection."""
        with self._lock:
            self._closed = True
            conns = list(self._open)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _peer = self._sock.accept()
            except OSError:
                return                       # closed
            if not self._slots.acquire(blocking=False):
                conn.close()                 # too many at once: the reader retries
                continue
            with self._lock:
                if self._closed:
                    conn.close()
                    self._slots.release()
                    return
                self._open.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="meshray-data-serve",
                             daemon=True).start()

    def _serve(self, conn) -> None:
        raw = conn
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._context is not None:
                conn = self._context.wrap_socket(conn, server_side=True)
            self._answer(conn)
        except (OSError, ValueError, DataLinkError) as exc:
            log.debug("data link connection ended: %s", exc)
        except Exception:  # noqa: BLE001 - one bad connection never takes the node down
            log.exception("data link connection failed")
        finally:
            with self._lock:
                self._open.discard(raw)
            conn.close()
            self._slots.release()

    def _answer(self, conn) -> None:
        hello = _recv_exact(conn, len(MAGIC) + _NONCE + 1)
        if hello[:len(MAGIC)] != MAGIC:
            return
        theirs = hello[len(MAGIC):len(MAGIC) + _NONCE]
        target = _recv_exact(conn, hello[-1])
        nonce = os.urandom(_NONCE)
        conn.sendall(nonce)
        mac = _recv_exact(conn, _MAC)
        head = _recv_exact(conn, 1)
        object_id = _recv_exact(conn, head[0])
        offset, length = _RANGE.unpack(_recv_exact(conn, _RANGE.size))
        who = _recv_exact(conn, 1)
        puller_raw = _recv_exact(conn, who[0])
        request = head + object_id + _RANGE.pack(offset, length) + who + puller_raw
        if self._keys is not None:
            expected = _mac(self._keys[0], MAGIC + theirs + nonce + target + request)
            if not hmac.compare_digest(mac, expected):
                log.warning("data link: refused a connection without a valid membership proof")
                return
            if target.decode("ascii", "replace") not in self._targets:
                log.warning("data link: refused a proof made for %r, not this node",
                            target.decode("ascii", "replace"))
                return
            proof = _mac(self._keys[1], mac)
        else:
            proof = bytes(_MAC)
        puller = puller_raw.decode("ascii", "replace")
        fired = self._failpoints.roll(PULL_METHOD, ("delay", "drop", "drop_reply")) \
            if self._failpoints is not None else None
        if fired and fired[0] == "delay":
            time.sleep(fired[1])
        elif fired:                  # a transient failure: the reader's pull is retried
            conn.sendall(proof if fired[0] == "drop" else proof + b"\x00")
            return
        try:
            path = self._open_object(object_id, puller)
            file = open(path, "rb")
        except (RangeNotServed, FileNotFoundError) as exc:     # not here (any more)
            why = str(exc).encode("utf-8", "replace")[:4096]
            conn.sendall(proof + b"\x01" + struct.pack("!H", len(why)) + why)
            return
        except Exception as exc:  # noqa: BLE001 - slow or failed lookup: the reader retries
            log.warning("data link: could not open object %s for %s: %r", object_id.hex(),
                        puller, exc)
            return
        with file:
            total = os.fstat(file.fileno()).st_size
            count = max(0, min(length, total - offset))
            conn.sendall(proof + b"\x00" + _FOUND.pack(total, count))
            conn.settimeout(self._stall_s)
            if count and self._context is None:
                conn.sendfile(file, offset, count)    # os.sendfile: no copy here
            elif count:
                _send_mapped(conn, file.fileno(), offset, count)
        self._sent(object_id, puller, count)
