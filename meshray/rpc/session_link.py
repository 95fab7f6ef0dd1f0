"""The session link's node side: each process's session with its node,
served on the node's unix socket by the daemon's event loop.

Why: every task, value and question of a process passes through its session
with its node, and with gRPC the stream's own machinery was most of what a
task cost (measured on the 2-core development machine: ~500 us of daemon
CPU, ~290 us of worker CPU and ~340 us of driver CPU per sync task, almost
none of it in meshray's Python); a framed unix socket costs a few
microseconds a message. Every process that opens a session runs on its
node's machine (drivers connect to a node on their own host; workers are
the node's children), so the link is a unix socket only: no TCP, no TLS.

The link is the call link's (``call_link.py``): the same handshake proving
membership both ways (with its own magic, so a proof made for one kind of
link is no use on the other), the same frames. A process sends CALLS frames
holding ``ClientBatch`` messages and END when it is done; the node answers
REPLIES frames holding ``ServerBatch`` and ends with STATUS: OK, or
INVALID_ARGUMENT naming what was malformed (``strict.py``'s rules, applied
to each batch whole before any event in it is handled), or UNAVAILABLE.

Failpoints ``node.connect`` (chaos) apply per received frame: delay it,
drop the session (status UNAVAILABLE), or drop it at the next answer.

What safety rests on: the handshake (``call_link.py``); a socket only this
user can open (its session directory's permissions, and 0600 on the
socket); at most MESHRAY_MAX_CONNECTIONS links at once (half the descriptor
limit by default), a handshake finished within 10 s, and every frame
bounded and decoded strictly before it is handled.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

from meshray.rpc.call_link import (
    _HEADER,
    _MAC,
    _NONCE,
    HANDSHAKE_TIMEOUT_S,
    MALFORMED,
    MAX_MESSAGE_BYTES,
    SESSION_MAGIC,
    LinkClosed,
    _keys,
    answer_proof,
)
from meshray.rpc.factory import _check_token, _Failpoints, _failpoints_wanted
from meshray.rpc.limits import current_limits

__all__ = ["SESSION_METHOD", "AioLink", "SessionServer", "session_address"]

log = logging.getLogger(__name__)

SESSION_METHOD = "/meshray.NodeSession/Connect"     # names it in logs and failpoints
_FINISH_S = 5.0


def session_address(session_dir: str, node_id: bytes) -> str:
    """Where the node `node_id` with `session_dir` listens for sessions."""
    return f"unix:{os.path.join(session_dir, f'node-{node_id.hex()[:8]}.sock')}"


class AioLink:
    """One session link on the event loop: frames in (`recv`), frames out
    (`write`, which only buffers; `drain` waits while the buffer is full)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str):
        self._reader, self._writer = reader, writer
        self.peer = peer

    async def recv(self) -> tuple[int, bytes]:
        try:
            header = await self._reader.readexactly(_HEADER.size)
            length, kind = _HEADER.unpack(header)
            if length > MAX_MESSAGE_BYTES:
                raise LinkClosed(f"{self.peer} sent a frame of {length} bytes, over the "
                                 f"{MAX_MESSAGE_BYTES}-byte limit", code=MALFORMED)
            payload = await self._reader.readexactly(length) if length else b""
            return kind, payload
        except asyncio.IncompleteReadError:
            raise LinkClosed(f"{self.peer} closed the session link") from None
        except (OSError, ValueError) as exc:
            raise LinkClosed(f"the session link to {self.peer} broke: {exc}") from None

    def write(self, kind: int, payload: bytes = b"") -> None:
        if not self._writer.is_closing():
            self._writer.write(_HEADER.pack(len(payload), kind) + payload)

    def congested(self) -> bool:
        """Bytes written earlier are still waiting for the socket."""
        return self._writer.transport.get_write_buffer_size() > 0

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except (OSError, RuntimeError) as exc:
            raise LinkClosed(f"the session link to {self.peer} broke: {exc}") from None

    async def finish(self, kind: int, payload: bytes, timeout: float = _FINISH_S) -> None:
        """Write the last frame, say no more comes, and read until the
        process closes (or `timeout`): data left unread would reset the
        connection under the frame it has not read yet."""
        deadline = time.monotonic() + timeout
        try:
            self.write(kind, payload)
            await asyncio.wait_for(self._writer.drain(), timeout)
            if self._writer.can_write_eof():
                self._writer.write_eof()
            while time.monotonic() < deadline:
                if not await asyncio.wait_for(self._reader.read(1 << 16),
                                              max(0.0, deadline - time.monotonic())):
                    return
        except (OSError, RuntimeError, asyncio.TimeoutError):
            return

    def close(self) -> None:
        self._writer.close()


class SessionServer:
    """The node's session listener (a unix socket): each link that proves
    membership is handed to `on_link(link)`, a coroutine; the link is closed
    when it returns."""

    def __init__(self, path: str, *, token: str | None, on_link, max_links: int | None = None):
        self.path = path
        self.address = f"unix:{path}"
        self._keys = _keys(_check_token(token))
        self._on_link = on_link
        self._slots = max_links or current_limits().total
        self._open = 0
        self._logged = 0.0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set = set()
        self.failpoints = _Failpoints() if _failpoints_wanted() else None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=self.path,
                                                       limit=1 << 20)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    async def roll(self, actions=("delay", "drop", "drop_reply")):
        """A failpoint's verdict for one frame (chaos testing), after any delay."""
        if self.failpoints is None:
            return None
        fired = self.failpoints.roll(SESSION_METHOD, actions)
        if fired and fired[0] == "delay":
            await asyncio.sleep(fired[1])
            return None
        return fired

    async def _serve(self, reader, writer) -> None:
        if self._open >= self._slots:
            now = time.monotonic()
            if now - self._logged >= 60.0:
                self._logged = now
                log.warning("session link: closed a connection: at the limit of %d links at "
                            "once (logged at most once a minute)", self._slots)
            writer.close()
            return
        self._open += 1
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            try:
                peer = await asyncio.wait_for(self._handshake(reader, writer),
                                              HANDSHAKE_TIMEOUT_S)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, OSError):
                peer = None
            if peer is not None:
                await self._on_link(AioLink(reader, writer, peer))
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001 - one bad session never takes the node down
            log.exception("session link failed")
        finally:
            self._tasks.discard(task)
            self._open -= 1
            writer.close()

    async def _handshake(self, reader, writer) -> str | None:
        hello = await reader.readexactly(len(SESSION_MAGIC) + _NONCE + 1)
        if hello[:len(SESSION_MAGIC)] != SESSION_MAGIC:
            return None
        theirs = hello[len(SESSION_MAGIC):len(SESSION_MAGIC) + _NONCE]
        target = await reader.readexactly(hello[-1])
        nonce = os.urandom(_NONCE)
        writer.write(nonce)
        mac = await reader.readexactly(_MAC)
        proof = answer_proof(self._keys, SESSION_MAGIC, theirs, nonce, target, mac,
                             self.address.__eq__, "session link")
        if proof is None:
            return None
        writer.write(proof)
        return target.decode("utf-8", "replace")
