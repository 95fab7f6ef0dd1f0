"""The call link: actor calls and their answers on a plain socket.

Why: a caller that waits for each answer pays the round trip of its
transport. A bidirectional gRPC stream in Python costs ~180 us per round
trip on this class of machine (measured: an echo stream between two
processes, nothing else in it), most of it in gRPC's own threads and
completion queues; a plain socket costs ~50 us over loopback TCP and less
over a unix socket. The call link is that plain socket, framed: the caller
writes a batch of calls from its own thread, the actor writes each answer
from the thread that produced it, and each side has one reading thread. The
calls' and answers' messages are the same protobufs gRPC carried
(``ActorCallBatch``, ``ActorReplyBatch``); nothing else travels on a link.

Membership, as on every gRPC call (``auth.py``) and on the data link: both
ends prove they know the cluster secret without sending it, and neither
reads a frame from the other before that. Per connection (HMAC-SHA256
under keys derived for this use only)::

    caller -> actor   MAGIC | nonce_c (16) | len (1) | target (the address it dialled)
    actor  -> caller  nonce_a (16)
    caller -> actor   mac_c = HMAC(K_link_call, MAGIC | nonce_c | nonce_a | target)
    actor  -> caller  HMAC(K_link_answer, mac_c)

The actor checks `mac_c` and that `target` is one of its own addresses (a
proof made for an impostor's address cannot be relayed to a member) and
closes the connection without a word otherwise. Both nonces are fresh per
connection, so a recorded exchange replays nothing. With TLS configured
(``MESHRAY_TLS_*``) a TCP link is TLS first, with the same certificates and
client rule as gRPC; a unix-socket link never leaves the machine and is
not (as with gRPC's unix listeners).

After the handshake both directions carry frames, ``length (4) | kind (1)
| payload``: the caller sends CALLS (an ``ActorCallBatch``) and END (no
more calls: answer what you have, then close); the actor sends REPLIES (an
``ActorReplyBatch``) and, last, STATUS (``code (1) | refused (1) |
details``), after which it closes. A link that breaks without a STATUS is
a broken stream: its unanswered calls may or may not have run.

Liveness: a TCP link has kernel keepalive (probes after 10 s idle, dead
after two unanswered 5 s apart) and TCP_USER_TIMEOUT (unacknowledged bytes
for 20 s), so a partitioned or vanished peer breaks the link within ~20 s,
as gRPC's keepalive did. A stopped (SIGSTOP) peer is not a dead one: its
kernel still answers, and its calls wait for it to go on.

Alternatives considered: keep gRPC and remove the hops around it (the
stream itself is the floor, ~180 us, above the goal); asyncio streams (an
event-loop wakeup on each side, and a thread hop to the caller's thread
anyway); shared-memory rings (fastest on one machine, but a second
transport for remote actors, and wakeups still need a syscall).

What safety rests on: the same secret and HMAC as ``auth.py``; frames read
only after the proof, each bounded by MAX_MESSAGE_BYTES and parsed as
protobuf by the owner of the link (call_rules checks what it means); a
bound on links at once per server.
"""
from __future__ import annotations

import hmac
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time

from meshray.rpc import strict
from meshray.rpc.auth import link_keys
from meshray.rpc.auth import link_mac as _mac
from meshray.rpc.factory import (
    MAX_MESSAGE_BYTES,
    _check_binds,
    _check_token,
    _Failpoints,
    _failpoints_wanted,
    join_host_port,
    split_host_port,
)
from meshray.rpc.limits import ENV_MAX_CONNECTIONS_PER_PEER, current_limits
from meshray.rpc.tls import TLS_FROM_ENV, TlsConfig, resolve_tls

__all__ = ["CALLS", "END", "REPLIES", "STATUS", "OK", "MALFORMED", "UNAVAILABLE", "SESSION_MAGIC",
           "Link", "LinkClosed", "LinkServer", "connect", "status_payload"]

log = logging.getLogger(__name__)

MAGIC = b"MRCALL1\n"
SESSION_MAGIC = b"MRSESS1\n"      # a process's session with its node (session_link.py)
CALL_METHOD = "/meshray.ActorService/Call"      # whose failpoints (actor.call) apply here
CALLS, END, REPLIES, STATUS = 1, 2, 3, 4
OK, MALFORMED, UNAVAILABLE = 0, 1, 2
CODE_NAMES = {OK: "OK", MALFORMED: "INVALID_ARGUMENT", UNAVAILABLE: "UNAVAILABLE"}
_HEADER = struct.Struct("!IB")
_NONCE = 16
_MAC = 32
HANDSHAKE_TIMEOUT_S = 10.0
_ACCEPT_RETRY_S = 0.05
_LOG_EVERY_S = 60.0
_TCP_KEEPALIVE = (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 2),
                  ("TCP_USER_TIMEOUT", 20_000), ("TCP_NODELAY", 1))


class LinkClosed(ConnectionError):
    """The link ended: `code` is what the other end said (UNAVAILABLE when it
    said nothing), `refused` whether it refused the calls it did not
    answer (none of them ran), `details` its words or the break's cause."""

    def __init__(self, details: str, code: int = UNAVAILABLE, refused: bool = False,
                 reached: bool = True):
        super().__init__(details)
        self.details = details
        self.code = code
        self.refused = refused
        self.reached = reached

    @property
    def code_name(self) -> str:
        return CODE_NAMES.get(self.code, str(self.code))


def status_payload(code: int, details: str = "", refused: bool = False) -> bytes:
    return bytes([code, 1 if refused else 0]) + details.encode("utf-8", "replace")[:8192]


def status_error(payload: bytes) -> LinkClosed | None:
    """What a STATUS frame says: None for OK, else the end as LinkClosed."""
    code = payload[0] if payload else UNAVAILABLE
    if code == OK:
        return None
    return LinkClosed(payload[2:].decode("utf-8", "replace"), code=code,
                      refused=len(payload) > 1 and bool(payload[1]))


def answer_proof(keys, magic: bytes, theirs: bytes, ours: bytes, target: bytes, mac: bytes,
                 accepted, what: str) -> bytes | None:
    """The answerer's side of a link handshake: the proof to send back, or
    None (logged) when the dialler's proof is wrong or made for an address
    `accepted(name)` refuses."""
    if keys is None:
        return bytes(_MAC)
    if not hmac.compare_digest(mac, _mac(keys[0], magic + theirs + ours + target)):
        log.warning("%s: refused a connection without a valid membership proof", what)
        return None
    name = target.decode("utf-8", "replace")
    if not accepted(name):
        log.warning("%s: refused a proof made for %r, not this one", what, name)
        return None
    return _mac(keys[1], mac)


def _keys(token: str | None):
    return link_keys(token, "link")


def decode_calls(kind: int, payload: bytes, message_class, check):
    """The message of a CALLS frame, decoded strictly and checked (strict.py);
    Malformed says why not (another kind of frame, or what is wrong)."""
    if kind != CALLS:
        raise strict.Malformed(f"a frame of kind {kind}: the caller's side sends messages "
                               f"({CALLS}) and their end ({END})")
    return strict.accept(message_class, payload, check)


def _tune(sock) -> None:
    if sock.family == socket.AF_UNIX:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in _TCP_KEEPALIVE:
        option = getattr(socket, name, None)
        if option is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
            except OSError:
                pass        # not on this kernel: keepalive's defaults still apply


def _recv_exact(sock, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise LinkClosed(f"the other end closed the link after {len(data)} of "
                             f"{count} handshake bytes")
        data += chunk
    return bytes(data)


# ------------------------------------------------------------------ the wire
class _PlainIo:
    """A plain socket: one thread reads while others write (the kernel allows it)."""

    def __init__(self, sock):
        self._sock = sock
        self._file = sock.makefile("rb", buffering=1 << 16)

    def read(self, count: int) -> bytes:
        return self._file.read(count)

    def sendall(self, data) -> None:
        self._sock.sendall(data)

    def close(self) -> None:
        self._file.close()


class _TlsIo:
    """A TLS socket: OpenSSL allows one call on a connection at a time, so
    reads and writes are non-blocking, each under one lock, and waiting for
    the socket happens outside it."""

    def __init__(self, sock: ssl.SSLSocket):
        self._sock = sock
        self._lock = threading.Lock()
        self._buffer = bytearray()
        sock.setblocking(False)

    def _wait(self, want: str) -> None:
        if want == "r":
            select.select([self._sock], [], [])
        else:
            select.select([], [self._sock], [])

    def read(self, count: int) -> bytes:
        while len(self._buffer) < count:
            with self._lock:
                try:
                    chunk = self._sock.recv(max(1 << 16, count - len(self._buffer)))
                    want = ""
                except ssl.SSLWantReadError:
                    want = "r"
                except ssl.SSLWantWriteError:
                    want = "w"
                except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                    chunk, want = b"", ""
            if want:
                self._wait(want)
                continue
            if not chunk:
                break
            self._buffer += chunk
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def sendall(self, data) -> None:
        view = memoryview(data)
        while len(view):
            with self._lock:
                try:
                    view = view[self._sock.send(view):]
                    continue
                except ssl.SSLWantWriteError:
                    want = "w"
                except ssl.SSLWantReadError:
                    want = "r"
            self._wait(want)

    def close(self) -> None:
        pass


class Link:
    """One authenticated connection, framed both ways.

    Writing: `enqueue` queues a frame (and numbers it); `flush(now=True)`
    writes the queue from the calling thread when no other thread is
    writing, which is what a caller waiting for this one frame's answer
    wants (no thread hop); `flush(now=False)` leaves it to the link's writer
    thread, which is what a burst wants: whatever queued while the writer
    was busy leaves in one write, consecutive CALLS (or REPLIES) frames
    merged into one message (concatenated protobuf messages of one type
    parse as one, their repeated fields joined). One thread reads (`recv`).
    """

    def __init__(self, sock, *, peer: str):
        self.peer = peer
        self._io = _TlsIo(sock) if isinstance(sock, ssl.SSLSocket) else _PlainIo(sock)
        self._sock = sock
        self._pending: list = []                 # (kind, payload) in order
        self._queued = 0                         # frames queued so far
        self.sent_upto = 0                       # frames handed to the socket so far
        self._cond = threading.Condition()
        self._turn = threading.Lock()            # held by the thread writing
        self._writer: threading.Thread | None = None
        self._broken: BaseException | None = None
        self._closed = False

    # -------------------------------------------------------------- writing
    def enqueue(self, kind: int, payload: bytes = b"") -> int:
        """Queue one frame; its number (compare with `sent_upto`)."""
        if len(payload) > MAX_MESSAGE_BYTES:
            raise ValueError(f"a link frame of {len(payload)} bytes exceeds the "
                             f"{MAX_MESSAGE_BYTES}-byte limit")
        with self._cond:
            if self._broken is not None or self._closed:
                raise LinkClosed(f"the link to {self.peer} is closed"
                                 + (f": {self._broken}" if self._broken else ""))
            self._pending.append((kind, payload))
            self._queued += 1
            return self._queued

    def flush(self, now: bool = True) -> None:
        """Write what is queued: from this thread (`now`) unless another is
        writing, else by the writer thread. Raises LinkClosed if this
        thread's write fails."""
        if now and self._turn.acquire(blocking=False):
            try:
                self._write_pending()
            finally:
                self._turn.release()
            if not self._pending:
                return
        with self._cond:
            if self._writer is None and not self._closed:
                self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                                name="meshray-link-writer")
                self._writer.start()
            self._cond.notify()

    def send(self, kind: int, payload: bytes = b"", now: bool = True) -> None:
        self.enqueue(kind, payload)
        self.flush(now)

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            with self._turn:
                try:
                    self._write_pending()
                except LinkClosed as exc:
                    log.debug("%s", exc)
                    return

    def _write_pending(self) -> None:
        while True:
            with self._cond:
                frames, self._pending = self._pending, []
                upto = self._queued
            if not frames:
                return
            data = _merged(frames)
            self.sent_upto = upto     # before the bytes go: a frame not counted never left
            try:
                self._io.sendall(data)
            except (OSError, ValueError) as exc:
                with self._cond:
                    self._broken = self._broken or exc
                    self._pending.clear()
                self.shutdown()
                raise LinkClosed(f"the link to {self.peer} broke while sending: "
                                 f"{exc}") from None

    def idle(self) -> bool:
        """Nothing queued and no write in progress."""
        return not self._pending and not self._turn.locked()

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` for what is queued to be written (before closing)."""
        deadline = time.monotonic() + timeout
        while not self.idle():
            if self._broken is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    # -------------------------------------------------------------- reading
    def recv(self) -> tuple[int, bytes]:
        """The next frame: ``(kind, payload)``. Raises LinkClosed at the end."""
        try:
            header = self._io.read(_HEADER.size)
            if len(header) < _HEADER.size:
                raise LinkClosed(f"{self.peer} closed the link")
            length, kind = _HEADER.unpack(header)
            if length > MAX_MESSAGE_BYTES:
                raise LinkClosed(f"{self.peer} sent a frame of {length} bytes, over the "
                                 f"{MAX_MESSAGE_BYTES}-byte limit", code=MALFORMED)
            payload = self._io.read(length) if length else b""
            if len(payload) < length:
                raise LinkClosed(f"{self.peer} closed the link in the middle of a frame")
            return kind, payload
        except (OSError, ValueError) as exc:
            if isinstance(exc, LinkClosed):
                raise
            raise LinkClosed(f"the link to {self.peer} broke: {exc}") from None

    def recv_reply(self) -> bytes | None:
        """The next REPLIES payload, or None once the other end ended with
        status OK; any other end (a status, a break, a stray frame) raises
        LinkClosed."""
        kind, payload = self.recv()
        if kind == REPLIES:
            return payload
        if kind != STATUS:
            raise LinkClosed(f"{self.peer} sent a frame of unknown kind {kind}")
        error = status_error(payload)
        if error is not None:
            raise error
        return None

    def set_timeout(self, seconds: float | None) -> None:
        """Bound every read and write (tools and tests that use a link from
        one thread; a timed-out read ends the link with LinkClosed)."""
        self._sock.settimeout(seconds)

    # -------------------------------------------------------------- ending
    def shutdown(self) -> None:
        """Break the link now: the reading thread (either end) sees it end."""
        self._end(socket.SHUT_RDWR)

    def shutdown_write(self) -> None:
        """Say nothing more comes from this end (the other end reads to the
        end, then closes); reading goes on."""
        self._end(socket.SHUT_WR)

    def _end(self, how: int) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        try:
            self._sock.shutdown(how)
        except OSError:
            pass

    def drain(self, timeout: float) -> None:
        """End the link gently (the actor, after its status): write what is
        queued, half-close, and read and discard until the caller closes or
        `timeout` passes. Closing a socket with unread bytes in it resets
        the connection, and a reset can destroy the status the caller has
        not read yet; this reads them first."""
        deadline = time.monotonic() + timeout
        self.wait_idle(timeout)
        self.shutdown_write()
        # After the half-close a TLS socket reads raw bytes: discarded all the same.
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                if not select.select([self._sock], [], [], remaining)[0]:
                    return
                if not self._sock.recv(1 << 16):
                    return
            except (OSError, ValueError):
                return

    def close(self) -> None:
        self.shutdown()
        try:
            self._io.close()
        except OSError:
            pass
        self._sock.close()


_MERGEABLE = (CALLS, REPLIES)
_MERGE_BYTES = 2 << 20


def _merged(frames: list) -> bytes:
    """The bytes of `frames`, consecutive mergeable frames of one kind as one."""
    out: list = []
    kind, parts, size = None, [], 0
    for frame_kind, payload in frames:
        if parts and (frame_kind != kind or kind not in _MERGEABLE
                      or size + len(payload) > _MERGE_BYTES):
            out.append(_HEADER.pack(size, kind))
            out.extend(parts)
            parts, size = [], 0
        kind = frame_kind
        parts.append(payload)
        size += len(payload)
    if parts:
        out.append(_HEADER.pack(size, kind))
        out.extend(parts)
    return out[0] + out[1] if len(out) == 2 else b"".join(out)


# ------------------------------------------------------------------ caller side
def connect(address: str, *, token: str | None, timeout: float = HANDSHAKE_TIMEOUT_S,
            tls=TLS_FROM_ENV, magic: bytes = MAGIC) -> Link:
    """Open a link to the actor at `address` ("host:port" or "unix:/path") and
    prove membership both ways; `magic` SESSION_MAGIC opens a session with
    the node at `address` instead. Raises LinkClosed (`reached` False when
    nothing could be connected at all)."""
    keys = _keys(_check_token(token))
    unix = address.startswith("unix:")
    target = address.encode("utf-8")
    if len(target) > 255:
        raise ValueError(f"address {address!r}: longer than 255 bytes")
    try:
        if unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(address[len("unix:"):])
        else:
            host, port = split_host_port(address)
            sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise LinkClosed(f"cannot reach {address}: {exc}", reached=False) from None
    try:
        _tune(sock)
        tls = None if unix else resolve_tls(tls)
        if tls is not None:
            sock = tls.ssl_client_context().wrap_socket(
                sock, server_hostname=tls.server_name or split_host_port(address)[0])
        nonce = os.urandom(_NONCE)
        try:
            sock.sendall(magic + nonce + bytes([len(target)]) + target)
            theirs = _recv_exact(sock, _NONCE)
        except OSError:
            raise LinkClosed(f"{address} closed the connection before its handshake "
                             "(at its limit of links, or not an actor)", reached=False) from None
        mac = _mac(keys[0], magic + nonce + theirs + target) if keys else bytes(_MAC)
        sock.sendall(mac)
        try:
            proof = _recv_exact(sock, _MAC)
        except OSError:
            raise LinkClosed(f"{address} closed the connection without proving membership "
                             "(not a member of this cluster, or it refused our proof)") from None
        if keys and not hmac.compare_digest(proof, _mac(keys[1], mac)):
            raise LinkClosed(f"{address} answered without proving membership; nothing it "
                             "sends is read")
        sock.settimeout(None)
        return Link(sock, peer=address)
    except BaseException as exc:
        sock.close()
        if isinstance(exc, OSError) and not isinstance(exc, LinkClosed):
            raise LinkClosed(f"the link to {address} failed: {exc}") from None
        raise


# ------------------------------------------------------------------ actor side
class LinkServer:
    """Listeners for links (TCP and unix socket), one thread per link.

    `on_link(link)` runs on the link's own thread once the caller proved
    membership; the link is closed when it returns. Binding follows the gRPC
    factory's rule: no non-loopback listener without a token. Connections
    are bounded as the factory bounds gRPC's (rpc/limits.py): at most
    `max_links` at once (default: half the descriptor limit, or
    MESHRAY_MAX_CONNECTIONS), a quarter of that from one TCP peer address
    (MESHRAY_MAX_CONNECTIONS_PER_PEER), each closed if its handshake takes
    over 10 s; more are closed on accept, and running out of descriptors
    pauses accepting rather than ending it. With
    failpoints armed (chaos testing), `failpoint` is what each received
    frame rolls: delay it, drop the link, or drop the link at the next
    answer.
    """

    def __init__(self, bind: list[str], *, token: str | None, on_link,
                 tls: TlsConfig | None = TLS_FROM_ENV, allow_insecure_remote: bool = False,
                 max_links: int | None = None, failpoint: str = CALL_METHOD):
        token = _check_token(token)
        _check_binds([b for b in bind if not b.startswith("unix:")], token,
                     allow_insecure_remote)
        tls = resolve_tls(tls)
        self._context = tls.ssl_server_context() if tls is not None else None
        self._keys = _keys(token)
        self._on_link = on_link
        self.failpoints = _Failpoints() if _failpoints_wanted() else None
        self.failpoint = failpoint
        limits = current_limits()
        self._slots = threading.BoundedSemaphore(max_links or limits.total)
        self._per_peer = limits.per_peer
        self._peers: dict = {}               # TCP peer address -> links open from it
        self._cut: dict = {}                 # peer address -> (closed unlogged, last logged)
        self._logged = 0.0
        self._lock = threading.Lock()
        self._open: set = set()
        self._closed = False
        self._listeners = []
        self.addresses: list[str] = []
        for address in bind:
            if address.startswith("unix:"):
                path = address[len("unix:"):]
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.bind(path)
                os.chmod(path, 0o600)
                sock.listen(128)
                self.addresses.append(address)
            else:
                host, port = split_host_port(address)
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                sock = socket.create_server((host, port), family=family, backlog=128)
                self.addresses.append(join_host_port(host, sock.getsockname()[1]))
            self._listeners.append(sock)
        self._targets: set = set()
        self.accept_targets(self.addresses)
        self._threads = [threading.Thread(target=self._accept_loop, args=(sock,),
                                          name="meshray-link-accept", daemon=True)
                         for sock in self._listeners]
        for thread in self._threads:
            thread.start()

    def accept_targets(self, addresses) -> None:
        """Addresses callers dial this server at besides the bound ones."""
        for address in addresses:
            self._targets.add(address)
            host, _, port = address.rpartition(":")
            if not address.startswith("unix:") and host in ("127.0.0.1", "localhost"):
                self._targets |= {f"127.0.0.1:{port}", f"localhost:{port}"}

    def close(self) -> None:
        """Stop accepting and break every open link."""
        with self._lock:
            self._closed = True
            links = list(self._open)
        for sock in self._listeners:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for address in self.addresses:
            if address.startswith("unix:"):
                try:
                    os.unlink(address[len("unix:"):])
                except OSError:
                    pass
        for link in links:
            link.shutdown()
        for thread in self._threads:
            thread.join(timeout=5)

    def _accept_loop(self, listener) -> None:
        while True:
            try:
                conn, peer = listener.accept()
            except OSError as exc:
                if self._closed:
                    return
                # Out of descriptors (EMFILE), or a connection reset before
                # it was accepted: accept again shortly.
                self._log_now(f"call link: accepting failed: {exc}")
                time.sleep(_ACCEPT_RETRY_S)
                continue
            ip = peer[0] if isinstance(peer, tuple) else None
            if not self._slots.acquire(blocking=False):
                conn.close()                 # too many at once: the caller retries
                self._log_now("call link: closed a connection: at the limit of links at once")
                continue
            with self._lock:
                if ip is not None and self._peers.get(ip, 0) >= self._per_peer:
                    refused = True
                else:
                    refused = False
                    if ip is not None:
                        self._peers[ip] = self._peers.get(ip, 0) + 1
            if refused:
                conn.close()
                self._slots.release()
                self._cut_peer(ip, listener)
                continue
            threading.Thread(target=self._serve, args=(conn, ip), name="meshray-link",
                             daemon=True).start()

    def _log_now(self, message: str) -> None:
        now = time.monotonic()
        if now - self._logged >= _LOG_EVERY_S:
            self._logged = now
            log.warning("%s (logged at most once a minute)", message)

    def _cut_peer(self, ip: str, listener) -> None:
        """Count a connection closed for its peer's cap; say so at most once a minute a peer."""
        closed, last = self._cut.get(ip, (0, 0.0))
        closed += 1
        now = time.monotonic()
        if now - last < _LOG_EVERY_S:
            self._cut[ip] = (closed, last)
            return
        self._cut[ip] = (0, now)
        log.warning("call link: closed %d connection(s) from %s to port %d: a peer address may "
                    "hold at most %d connections (%s=%d)", closed, ip,
                    listener.getsockname()[1], self._per_peer, ENV_MAX_CONNECTIONS_PER_PEER,
                    self._per_peer)

    def _serve(self, conn, ip) -> None:
        link = None
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            _tune(conn)
            if self._context is not None and conn.family != socket.AF_UNIX:
                conn = self._context.wrap_socket(conn, server_side=True)
            peer = self._handshake(conn)
            if peer is None:
                return
            conn.settimeout(None)
            link = Link(conn, peer=peer)
            with self._lock:
                if self._closed:
                    return
                self._open.add(link)
            self._on_link(link)
        except (OSError, ValueError) as exc:
            log.debug("link ended: %s", exc)
        except Exception:  # noqa: BLE001 - one bad link never takes the process down
            log.exception("link failed")
        finally:
            if link is not None:
                with self._lock:
                    self._open.discard(link)
                link.close()
            else:
                conn.close()
            if ip is not None:
                with self._lock:
                    self._peers[ip] -= 1
                    if not self._peers[ip]:
                        del self._peers[ip]
            self._slots.release()

    def _handshake(self, conn) -> str | None:
        hello = _recv_exact(conn, len(MAGIC) + _NONCE + 1)
        if hello[:len(MAGIC)] != MAGIC:
            return None
        theirs = hello[len(MAGIC):len(MAGIC) + _NONCE]
        target = _recv_exact(conn, hello[-1])
        nonce = os.urandom(_NONCE)
        conn.sendall(nonce)
        mac = _recv_exact(conn, _MAC)
        proof = answer_proof(self._keys, MAGIC, theirs, nonce, target, mac,
                             self._targets.__contains__, "call link")
        if proof is None:
            return None
        conn.sendall(proof)
        return target.decode("utf-8", "replace")

    def roll(self, actions=("delay", "drop", "drop_reply")):
        """A failpoint's verdict for one frame (chaos testing), after any delay."""
        if self.failpoints is None:
            return None
        fired = self.failpoints.roll(self.failpoint, actions)
        if fired and fired[0] == "delay":
            time.sleep(fired[1])
            return None
        return fired
