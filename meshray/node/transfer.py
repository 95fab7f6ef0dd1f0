"""Moving store objects between nodes, and getting them back when a copy is lost.

A reader node pulls an object's bytes from a node that holds a copy, in
chunks written straight into its own store. Two kinds of failure are told
apart, because they need opposite answers:

- transient (a dropped stream, a peer that is slow or briefly unreachable but
  still holds its lease): the pull is retried with backoff, against every
  live copy, until PULL_DEADLINE_S -- one failed call is never final;
- no live copy left (every holder died, or answered that it has no copy): the
  object's owner is asked to rebuild it. The owner re-runs the producing task
  from lineage (or answers with ObjectReconstructionFailedError / an
  ObjectLostError value when it cannot), and the reader pulls the new copy.

The data path copies as little as Python gRPC allows (about 1 GiB/s here):
the holder encodes each chunk around its store file's bytes by hand (no
protobuf object), the reader writes a view of each received message with
a writer thread (at most PULL_WRITES_IN_FLIGHT chunks in flight, so an
object is never held twice), into a recycled file's resident pages when the
store has one, and the daemon's malloc keeps chunk-sized blocks instead of
faulting in fresh pages for every chunk (_tune_allocator).

A pulled copy is a cache: the store drops it (never spills it) when room is
needed, and the holder remembers who pulled from it, so once the object is
freed (by its owner, or the primary's holder after the owner let go) every
copy is deleted and its pages go to the next large object.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import io
import logging
import os
import pickle
import socket
import time

import grpc
import tenacity

from meshray import exceptions
from meshray.node.objects import error_of, error_value
from meshray.node.state import messages as m
from meshray.object_store import layout
from meshray.object_store.store import ObjectStateError
from meshray.rpc import data_link, join_host_port, split_host_port
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["ObjectTransfer", "PULL_CHUNK_BYTES", "PULL_DEADLINE_S", "PULL_METHOD",
           "REBUILD_WAIT_S", "decode_chunk", "encode_chunk"]

log = logging.getLogger(__name__)

PULL_CHUNK_BYTES = 4 * 1024 * 1024
# Transient pull failures are retried for this long before the object is
# reported lost; longer than a lease TTL, so a holder that is really gone
# is seen dead (and the object rebuilt) before this gives up.
PULL_DEADLINE_S = 60.0
REBUILD_WAIT_S = 120.0
# A transfer that receives nothing for this long is abandoned and retried.
PULL_STALL_S = 15.0
PULL_METHOD = "/meshray.NodePeer/PullObject"
PULLER_METADATA_KEY = "meshray-puller"   # the pulling node's id (hex), on PullObject calls
# Chunks received but still being written to the store file, per transfer.
PULL_WRITES_IN_FLIGHT = 2
# Objects at least this large travel on the data link (rpc/data_link.py) when
# the holder has one; smaller ones on the PullObject RPC, whose cost is the
# round trip, not the bytes.
DATA_LINK_MIN_BYTES = 1 << 20
# A large object is read as ranges on parallel connections, one per this many
# bytes, at most DATA_LINK_STREAMS: one per two cores, since each stream keeps
# a core busy at each end (on 2 cores one stream moved 1 GiB at 5.5-7 GB/s,
# two at 3.3-4.3).
DATA_LINK_STREAM_BYTES = 64 << 20
DATA_LINK_STREAMS = max(1, min(4, (os.cpu_count() or 2) // 2))
# After the data link to a holder could not be reached, its pulls take the
# RPC for this long (a firewall that lets only --port through, say).
DATA_LINK_RETRY_S = 60.0
_pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}


def _threads(name: str, workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """The node's pool of threads named `name` (made on first use)."""
    pool = _pools.get(name)
    if pool is None:
        pool = _pools[name] = concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix=name)
    return pool


def _chunk_writers() -> concurrent.futures.ThreadPoolExecutor:
    return _threads("meshray-pull", 2)


def _data_link_threads() -> concurrent.futures.ThreadPoolExecutor:
    return _threads("meshray-data-pull", 8)


# ------------------------------------------------------------ chunk wire format
# PullObject's replies are ObjectChunk messages, but neither side builds a
# protobuf object for them: each would copy the chunk's bytes twice more. The
# holder encodes a chunk around the file's bytes with one copy (encode_chunk),
# the reader takes the data as a view into the received message
# (decode_chunk). The bytes on the wire are a valid ObjectChunk, and
# decode_chunk reads any valid ObjectChunk (fields in any order).

def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_chunk(offset: int, data, total_size: int) -> bytes:
    """The wire bytes of ObjectChunk(offset, data, total_size); copies `data` once."""
    head = b"".join((b"\x08", _varint(offset), b"\x18", _varint(total_size),
                     b"\x12", _varint(len(data))))
    return b"".join((head, data))


def decode_chunk(message) -> tuple:
    """(offset, data, total_size) of an ObjectChunk's wire bytes; data is a view."""
    view = memoryview(message)
    fields = {1: 0, 2: view[0:0], 3: 0}
    pos, end = 0, len(view)

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= end or shift > 63:
                raise ValueError("truncated or overlong varint in an ObjectChunk")
            byte = view[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    while pos < end:
        key = varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value = varint()
        elif wire_type == 2:
            length = varint()
            if pos + length > end:
                raise ValueError("an ObjectChunk field runs past the message's end")
            value = view[pos:pos + length]
            pos += length
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            continue
        else:
            raise ValueError(f"unexpected wire type {wire_type} in an ObjectChunk")
        if number in fields and (wire_type == 2) == (number == 2):
            fields[number] = value
    if pos != end:
        raise ValueError("an ObjectChunk's last field runs past the message's end")
    return fields[1], fields[2], fields[3]


class _BytesOnly(pickle.Unpickler):
    """Package bytes arrive pickled; refuse anything but plain data."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"runtime_env package holds {module}.{name}, not bytes")


class _PullFailed(Exception):
    """Every live copy failed this round, for reasons that may pass."""


class _NoLiveCopy(Exception):
    def __init__(self, tried: list):
        super().__init__(f"no live node holds a copy (tried {tried})")
        self.tried = tried


class ObjectTransfer:
    """A node's object transfers: pulls, the PullObject server, and rebuilds.

    It owns the pulls under way (one per object, joined by every reader),
    the nodes that pulled each object from here, and the futures waiting for
    an object's value (`object_ready` wakes them). It keeps the node's
    store, object directory, cluster view and metrics, which live as long
    as the node, and the node itself for what changes as it runs or belongs
    to the node's peer duties: its membership (where copies are listed),
    its peer links and questions, applying a directory change's effects,
    and rebuilding a lost copy from lineage.
    """

    def __init__(self, node):
        self._node = node
        self._store = node.store
        self._objects = node.objects
        self._view = node.peers.view
        self._node_hex = node.node_hex
        self._metrics = node.metrics
        self._pulls: dict[bytes, asyncio.Future] = {}
        self._copies_sent: dict[bytes, set] = {}     # object id -> nodes that pulled it from us
        self._waiters: dict[bytes, list] = {}        # object id -> futures awaiting its value
        self._data_down: dict[str, float] = {}       # holder -> when to try its data link again
        self._loop = None

    # ------------------------------------------------------------ reader side
    async def ask_restore(self, conn, payload: dict) -> dict:
        """Make an object's bytes local (restore from disk, or pull from a peer).

        Answers {"path"}, or {"error_value"} (a serialized exception, such as
        ObjectReconstructionFailedError) when the object cannot be had.
        """
        object_id = bytes.fromhex(payload["object_id"])
        if self._store.contains(object_id):
            return {"path": self._store.ensure_in_memory(object_id)}
        size = payload.get("size")
        size = size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else 0
        pending = self._pull(object_id, payload.get("location") or "", size)
        try:
            return {"path": await asyncio.shield(pending)}
        except exceptions.RayError as exc:
            return {"error_value": base64.b64encode(
                error_value(object_id, exc).inline_data).decode()}

    def _pull(self, object_id: bytes, location: str, size: int = 0) -> asyncio.Future:
        """The pull of `object_id` under way, started now if none is (`size`:
        its file's size when the caller knows it, which picks the way)."""
        pending = self._pulls.get(object_id)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = self._pulls[object_id] = loop.create_future()
            loop.create_task(self._fetch(object_id, location, pending, size))
            # Nobody may await a prefetch: its failure is read by the reader who
            # asks for the object, not reported as never retrieved.
            pending.add_done_callback(lambda f: f.cancelled() or f.exception())
        return pending

    def prefetch_args(self, task) -> None:
        """Start pulling the task's arguments that live on other nodes.

        Called when the task gets its resources here, so the copies travel
        while its worker is found or started rather than after the worker
        fails to open them (it then joins the pull under way).
        """
        args = task.remote_args if task.remote_args is not None else [
            self._objects.get(object_id) for object_id in task.spec.arg_ref_ids]
        for value in args:
            if value is None or not value.in_store or value.is_error:
                continue
            location = value.location
            if location in ("", self._node_hex) or self._store.contains(value.object_id):
                continue
            self._pull(value.object_id, location, value.size)

    async def _fetch(self, object_id: bytes, location: str, done: asyncio.Future,
                     size: int = 0) -> None:
        """Pull a copy; when none is left, have the owner rebuild it and pull that."""
        try:
            try:
                path = await self._pull_any(object_id, location, size)
            except _NoLiveCopy as gone:
                value = await self._rebuilt_value(object_id, gone.tried)
                if value.is_error:
                    raise error_of(value)
                if self._store.contains(object_id):
                    path = self._store.ensure_in_memory(object_id)
                else:
                    path = await self._pull_any(object_id, value.location, value.size)
            if not done.done():
                done.set_result(path)
        except _NoLiveCopy as exc:
            if not done.done():
                done.set_exception(exceptions.ObjectLostError(
                    object_id.hex(), call_site=f"it was rebuilt, but {exc}"))
        except BaseException as exc:  # noqa: BLE001 - every waiter gets the error
            if not done.done():
                if self._store.contains(object_id) and not isinstance(exc, asyncio.CancelledError):
                    # The pull failed because the object was made here
                    # meanwhile (a rebuild on this node sealed it under the
                    # same reservation): the readers get that copy.
                    log.info("pull of %s failed (%s), but a copy was made here meanwhile",
                             object_id.hex(), exc)
                    done.set_result(self._store.ensure_in_memory(object_id))
                else:
                    done.set_exception(exc)
        finally:
            self._pulls.pop(object_id, None)

    def _live_copies(self, object_id: bytes, hint: str, listed: list) -> list:
        candidates = [hint] if hint else []
        candidates += [n for n in listed if n not in candidates]
        return [n for n in candidates if n != self._node_hex and n not in self._view.known_dead
                and (self._node.membership is None or n in self._view.nodes)]

    async def _pull_any(self, object_id: bytes, hint: str, size: int = 0) -> str:
        """Pull from any live copy, retrying transient failures with backoff."""
        tried: list = []
        last_error: list = [None]

        async def one_round() -> str:
            listed = []
            if self._node.membership is not None:
                listed = await asyncio.get_running_loop().run_in_executor(
                    None, self._node.membership.locations, object_id)
            candidates = self._live_copies(object_id, hint, listed)
            if not candidates:
                raise _NoLiveCopy(tried or ([hint] if hint else []))
            missing = 0
            for node_hex in candidates:
                link = self._node.peers.link(node_hex)
                if link is None:
                    continue
                if node_hex not in tried:
                    tried.append(node_hex)
                try:
                    path = await self._pull_from(link, object_id, node_hex, size)
                except data_link.RangeNotServed as exc:
                    missing += 1
                    last_error[0] = str(exc)
                    log.warning("pulling %s from %s failed: %s", object_id.hex(), node_hex,
                                last_error[0])
                    continue
                except grpc.aio.AioRpcError as exc:
                    missing += exc.code() == grpc.StatusCode.NOT_FOUND
                    last_error[0] = exc.details() or exc.code().name
                    log.warning("pulling %s from %s failed: %s", object_id.hex(), node_hex,
                                last_error[0])
                    continue
                except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
                    last_error[0] = repr(exc)
                    log.warning("pulling %s from %s failed: %r", object_id.hex(), node_hex, exc)
                    continue
                self._node.peers.note_location(object_id, True)
                return path
            if missing == len(candidates):
                raise _NoLiveCopy(candidates)   # holders alive, but none has it
            raise _PullFailed()

        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_delay(PULL_DEADLINE_S),
            wait=tenacity.wait_exponential_jitter(initial=0.05, max=2.0),
            retry=tenacity.retry_if_exception_type(_PullFailed), reraise=True)
        try:
            return await retrying(one_round)
        except _PullFailed:
            raise exceptions.ObjectLostError(
                object_id.hex(), call_site=f"no copy could be pulled within {PULL_DEADLINE_S:.0f}s "
                f"(tried {tried}): {last_error[0]}") from None

    async def _pull_from(self, link, object_id: bytes, node_hex: str, size: int = 0) -> str:
        """Pull on the holder's data link when the object is large (or its size
        unknown) and the link is up, else on the PullObject RPC."""
        if not size:
            known = self._objects.get(object_id)
            size = known.size if known is not None and known.in_store else 0
        address = self._data_address(node_hex) if not 0 < size < DATA_LINK_MIN_BYTES else None
        if address is not None:
            try:
                return await self._pull_data(address, object_id, node_hex, size)
            except data_link.DataLinkError as exc:
                if not exc.reached:
                    log.warning("the data link of node %s (%s) cannot be reached (%s); its "
                                "pulls take the RPC for %.0f s", node_hex, address, exc,
                                DATA_LINK_RETRY_S)
                    self._data_down[node_hex] = time.monotonic() + DATA_LINK_RETRY_S
                    return await self._pull_rpc(link, object_id, node_hex)
                raise
        return await self._pull_rpc(link, object_id, node_hex)

    def _data_address(self, node_hex: str) -> str | None:
        """The holder's data link ("host:port"), when it has one and it is worth it."""
        record = self._view.nodes.get(node_hex)
        port = record.get("DataPort") if isinstance(record, dict) else None
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            return None                    # none (a hollow node), or a malformed record
        if self._data_down.get(node_hex, 0.0) > time.monotonic():
            return None
        try:
            host, _port = split_host_port(str(record.get("Address") or ""))
        except ValueError:
            return None
        return join_host_port(host, port)

    async def _pull_data(self, address: str, object_id: bytes, node_hex: str,
                         size: int) -> str:
        """Receive the object on the data link, in ranges on parallel connections,
        straight into our store file (spliced; under TLS, into its mapped pages).

        Abandoned when its holder is declared dead mid-transfer, or sends
        nothing for PULL_STALL_S (every read has that deadline).
        """
        loop = asyncio.get_running_loop()
        threads = _data_link_threads()
        token = self._node.config.token
        opened: list = []

        def open_one(offset: int, length: int):
            sock, total, count = data_link.open_range(
                address, token=token, object_id=object_id, offset=offset, length=length,
                puller=self._node_hex, timeout=PULL_STALL_S)
            opened.append(sock)
            return sock, total, count

        streams = max(1, min(DATA_LINK_STREAMS, size // DATA_LINK_STREAM_BYTES))
        first = -(-size // streams) if streams > 1 else data_link.WHOLE
        writer = None
        reserved = False
        running: list = []
        try:
            running.append(loop.run_in_executor(threads, open_one, 0, first))
            sock, total, count = await self._until_done(node_hex, running[:1])
            path = self._reserve_for_pull(object_id, total)
            reserved = True
            try:
                writer = layout.ChunkWriter(path, total)
            except ValueError as exc:
                raise data_link.DataLinkError(f"node {node_hex} sent a bad size: {exc}",
                                              reached=True) from None

            def receive(sock, offset: int, count: int) -> None:
                try:
                    if data_link.can_splice(sock):      # socket -> pipe -> file, in the kernel
                        writer.fill_fd(offset, count, lambda fd, at, size: data_link.splice_into(
                            sock, fd, at, size, PULL_STALL_S))
                    else:                               # TLS: into the mapped pages
                        writer.fill(offset, count,
                                    lambda view: data_link.receive_into(sock, view))
                finally:
                    sock.close()

            def fetch(offset: int, length: int) -> None:
                sock, their_total, count = open_one(offset, length)
                if their_total != total or count != length:
                    sock.close()
                    raise data_link.DataLinkError(
                        f"node {node_hex} sent {count} bytes of a {their_total}-byte object "
                        f"for a range of {length} of {total}", reached=True)
                receive(sock, offset, count)

            running.append(loop.run_in_executor(threads, receive, sock, 0, count))
            if total > count:                       # the other streams share the rest
                step = -(-(total - count) // max(1, streams - 1))
                for offset in range(count, total, step):
                    running.append(loop.run_in_executor(
                        threads, fetch, offset, min(step, total - offset)))
            await self._until_done(node_hex, running)
            size = writer.finish()
            self._metrics.bytes_received += total
            self._metrics.data_link_received += total
            self._store.seal(object_id, size)
            if hasattr(self._store, "mark_copy"):
                self._store.mark_copy(object_id)   # dropped, not spilled, when room is short
            return path
        except BaseException:
            for sock in opened:                  # unblock the threads still reading
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            for pending in running:
                try:
                    await asyncio.shield(pending)
                except BaseException:  # noqa: BLE001 - the transfer failed anyway
                    pass
            for sock in opened:
                sock.close()
            if writer is not None:
                writer.abort()
            if reserved:
                self._drop_reservation(object_id)
            raise

    async def _until_done(self, node_hex: str, futures: list):
        """Wait for `futures` (threads on the data link), giving up when the
        holder is declared dead; the first one's result."""
        pending = set(futures)
        while pending:
            done, pending = await asyncio.wait(pending, timeout=0.25,
                                               return_when=asyncio.FIRST_EXCEPTION)
            for future in done:
                if future.exception() is not None:
                    raise future.exception()
            if pending and node_hex in self._view.known_dead:
                raise data_link.DataLinkError(f"holder {node_hex} died mid-transfer",
                                              reached=True)
        return futures[0].result()

    async def _pull_rpc(self, link, object_id: bytes, node_hex: str) -> str:
        """Stream the object in chunks straight into our store (never held twice).

        Abandoned when its holder is declared dead mid-transfer, or sends
        nothing for PULL_STALL_S (a paused process keeps its sockets open).
        """
        writer = None
        path = ""
        writes: collections.deque = collections.deque()
        call = link.pull_chunks(
            pb.PullRequest(object_id=object_id, chunk_size=PULL_CHUNK_BYTES), timeout=600,
            metadata=((PULLER_METADATA_KEY, self._node_hex),))
        chunks = call.__aiter__()
        loop = asyncio.get_running_loop()
        try:
            while True:
                waiting = loop.create_task(chunks.__anext__())
                stalled_at = loop.time() + PULL_STALL_S
                while not waiting.done():
                    await asyncio.wait({waiting}, timeout=0.25)
                    if waiting.done():
                        break
                    if node_hex in self._view.known_dead or loop.time() > stalled_at:
                        waiting.cancel()
                        call.cancel()
                        why = "died" if node_hex in self._view.known_dead else "stalled"
                        raise ConnectionError(f"holder {node_hex} {why} mid-transfer")
                try:
                    message = waiting.result()
                except StopAsyncIteration:
                    break
                except asyncio.CancelledError:
                    # The call, not this coroutine: its link was closed under it.
                    raise ConnectionError(f"link to {node_hex} closed mid-transfer") from None
                try:
                    offset, data, total_size = decode_chunk(message)
                except ValueError as exc:   # another holder may send it whole
                    raise ConnectionError(f"bad chunk from {node_hex}: {exc}") from None
                self._metrics.bytes_received += len(data)
                if writer is None:
                    path = self._reserve_for_pull(object_id, total_size)
                    writer = layout.ChunkWriter(path, total_size)
                # Written by a thread while the next chunk arrives; a few in
                # flight at most, so the data is never buffered beyond that.
                writes.append(loop.run_in_executor(_chunk_writers(), writer.write, offset, data))
                if len(writes) >= PULL_WRITES_IN_FLIGHT:
                    await writes.popleft()
            if writer is None:
                raise exceptions.ObjectLostError(object_id.hex(), call_site="empty transfer")
            while writes:
                await writes.popleft()
            size = writer.finish()
            self._store.seal(object_id, size)
            if hasattr(self._store, "mark_copy"):
                self._store.mark_copy(object_id)   # dropped, not spilled, when room is short
            return path
        except BaseException:
            # A write still running would use the descriptor abort() closes.
            for pending in writes:
                try:
                    await asyncio.shield(pending)
                except BaseException:  # noqa: BLE001 - the transfer failed anyway
                    pass
            if writer is not None:
                writer.abort()
            self._drop_reservation(object_id)
            raise

    def _drop_reservation(self, object_id: bytes) -> None:
        """Give back a failed pull's reservation -- unless the object was
        sealed meanwhile by another creator here (a rebuild writes under the
        same reservation): that copy is the object, and stays."""
        if not hasattr(self._store, "abort"):
            return
        try:
            self._store.abort(object_id)
        except ObjectStateError as exc:
            log.info("a failed pull leaves %s as it is: %s", object_id.hex(), exc)

    def _reserve_for_pull(self, object_id: bytes, size: int) -> str:
        if hasattr(self._store, "mark_copy"):
            # ChunkWriter takes a recycled file left at the path (resident pages).
            return self._store.reserve(object_id, size, recycled=True)
        return self._store.reserve(object_id, size)

    async def object_bytes(self, object_id: bytes) -> bytes:
        """The bytes held by a put(bytes) object, wherever it lives."""
        holder = "runtime_env"
        handle = self._node.dispatch.handle
        handle(m.RefsChanged(holder, add=(object_id,)))
        try:
            value = self._objects.get(object_id)
            if value is None:
                future = asyncio.get_running_loop().create_future()
                self._waiters.setdefault(object_id, []).append(future)
                handle(m.Subscribe(holder, (object_id,)))
                self._node.peers.flush_borrows()
                value = self._objects.get(object_id) or await asyncio.wait_for(future, 120)
            if value.is_error:
                raise exceptions.RuntimeEnvSetupError(
                    f"the runtime_env package object {object_id.hex()} is an error value")
            if value.in_store:
                reply = await self.ask_restore(None, {"object_id": object_id.hex(),
                                                      "location": value.location})
                inband, buffers = layout.read_object(reply["path"])
                data = pickle.loads(inband, buffers=buffers) if not buffers else bytes(buffers[0])
                return bytes(data)
            return _BytesOnly(io.BytesIO(value.inline_data)).load()
        finally:
            handle(m.RefsChanged(holder, remove=(object_id,)))
            self._node.peers.flush_borrows()

    def object_ready(self, object_id: bytes) -> None:
        """`object_id` has its value now: wake whoever here awaits it."""
        for future in self._waiters.pop(object_id, ()):
            if not future.done():
                future.set_result(self._objects.get(object_id))

    # ------------------------------------------------------------ copies
    def _copy_dropped(self, object_id: bytes) -> None:
        """The store dropped a pulled copy for room (any thread, store lock held)."""
        self._node.peers.note_location(object_id, False)

    def copies_freed(self, object_id: bytes) -> None:
        """The object was freed for good: nodes that pulled it from us drop their copies.

        Called where the free is global (by the owner, or by the holder of
        the primary copy once the owner let go), never for a borrower's local
        release, so a copy goes only when nothing anywhere can ask for it.
        """
        for node_hex in self._copies_sent.pop(object_id, ()):
            self._node.peers.send(node_hex, pb.PeerEvent(free=pb.FreeObjects(object_ids=[object_id])))

    def copy_source_freed(self, object_id: bytes) -> None:
        """A node we pulled from says the object is freed: drop our copy, and
        tell the nodes that pulled it from us. Deleting lets the store reuse
        the pages (recycle.py) for the next large object."""
        if object_id not in self._pulls and self._store.contains(object_id):
            self._store.delete(object_id)
            self._node.peers.note_location(object_id, False)
        self.copies_freed(object_id)

    async def _rebuilt_value(self, object_id: bytes, lost: list) -> pb.ObjectValue:
        """The object's value once its owner has replaced the lost copies."""
        if self._node._owns(object_id):
            value = await self._rebuild_object(object_id, lost)
        else:
            owner = self._view.node_for_prefix(object_id)
            if owner is None or owner in self._view.known_dead:
                raise exceptions.OwnerDiedError(
                    object_id.hex(), call_site=f"no live node holds a copy (tried {lost}) and "
                    "its owner node, which could rebuild it, is not in the cluster")
            reply = await self._node.peers.ask(owner, "rebuild_object", {
                "object_id": object_id.hex(), "lost": lost}, REBUILD_WAIT_S + 10)
            value = pb.ObjectValue.FromString(base64.b64decode(reply["value"]))
        if self._objects.get(object_id) is not None:
            self._node.dispatch.handle(m.CopyMoved(value))
        return value

    # ------------------------------------------------------------ owner side
    async def ask_rebuild_object(self, conn, payload: dict) -> dict:
        value = await self._rebuild_object(bytes.fromhex(payload["object_id"]),
                                           list(payload.get("lost", ())))
        return {"value": base64.b64encode(value.SerializeToString()).decode()}

    async def _rebuild_object(self, object_id: bytes, lost: list) -> pb.ObjectValue:
        """Wait until the value no longer points at a lost copy, rebuilding if needed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REBUILD_WAIT_S
        while True:
            value = self._objects.get(object_id)
            if value is not None:
                where = value.location or self._node_hex
                if not value.in_store or where not in lost or (
                        where == self._node_hex and self._store.contains(object_id)):
                    return self._node.peers.exportable(value)
                if where not in self._view.known_dead:
                    # Its holder lives on but cannot serve it: the copy is lost.
                    log.warning("object %s is missing on its holder %s; rebuilding",
                                object_id.hex(), where)
                    self._node.peers.object_copy_lost(object_id, where)
                    continue
                # Its holder died: the node-death handling rebuilds it.
            elif object_id not in self._objects:
                raise exceptions.ObjectLostError(
                    object_id.hex(), call_site="its owner no longer tracks it (it was freed)")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise exceptions.ObjectReconstructionFailedError(
                    object_id.hex(), call_site=f"it was not rebuilt within {REBUILD_WAIT_S:.0f}s "
                    f"after its copies on {lost} were lost")
            future = loop.create_future()
            self._waiters.setdefault(object_id, []).append(future)
            try:
                await asyncio.wait_for(future, min(remaining, 0.5))
            except asyncio.TimeoutError:
                pass

    # ------------------------------------------------------------ holder side
    def start(self) -> None:
        """Set this node up for transfers; call before the server starts.

        The node's PullObject answers with serve_pull, registered with the
        node's other methods (daemon._serve). A pulled copy
        the store drops for room is no longer listed as located here.
        """
        _tune_allocator()
        self._loop = asyncio.get_running_loop()
        if hasattr(self._store, "on_copy_dropped"):
            self._store.on_copy_dropped = self._copy_dropped

    def serve_data(self, host: str, port: int, token: str | None) -> data_link.DataServer:
        """Serve this node's objects on a data link (rpc/data_link.py); after start()."""
        return data_link.DataServer(host, port=port, token=token, stall_s=PULL_STALL_S,
                                    open_object=self._open_for_peer, sent=self._sent_to_peer)

    def _open_for_peer(self, object_id: bytes, puller: str) -> str:
        """The file of an object a peer reads on the data link (its thread asks the loop)."""
        future = asyncio.run_coroutine_threadsafe(self._path_for_peer(object_id), self._loop)
        return future.result(timeout=data_link.HANDSHAKE_TIMEOUT_S)

    async def _path_for_peer(self, object_id: bytes) -> str:
        if not self._store.contains(object_id):
            raise data_link.RangeNotServed(f"object {object_id.hex()} is not on node "
                                           f"{self._node_hex}")
        path = self._store.ensure_in_memory(object_id)
        try:
            layout.read_object_layout(path)     # a damaged object is never shipped
        except (layout.CorruptObjectError, OSError) as exc:
            raise data_link.RangeNotServed(f"object {object_id.hex()} on node "
                                           f"{self._node_hex} is damaged: {exc}") from None
        return path

    def _sent_to_peer(self, object_id: bytes, puller: str, count: int) -> None:
        """A range went out on the data link (called on its thread)."""
        self._loop.call_soon_threadsafe(self._note_sent, object_id, puller, count)

    def _note_sent(self, object_id: bytes, puller: str, count: int) -> None:
        self._metrics.bytes_sent += count
        self._metrics.data_link_sent += count
        if puller and puller != self._node_hex:
            self._copies_sent.setdefault(object_id, set()).add(puller)

    async def serve_pull(self, request: pb.PullRequest, context):
        """PullObject: the object's chunks as ObjectChunk wire bytes (encode_chunk)."""
        async for chunk in self._pull_chunks(request, context, encode_chunk):
            yield chunk

    async def _pull_chunks(self, request: pb.PullRequest, context, make_chunk):
        """The object's chunks; a reader that got them all is remembered, so
        its copy is dropped when the object is freed (copies_freed)."""
        object_id = request.object_id
        if not self._store.contains(object_id):
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"object {object_id.hex()} is not on node {self._node_hex}")
        path = self._store.ensure_in_memory(object_id)
        chunk_size = int(request.chunk_size or PULL_CHUNK_BYTES)
        total = os.path.getsize(path)
        offset = 0
        for chunk in layout.copy_file_chunks(path, chunk_size):
            yield make_chunk(offset, chunk, total)
            offset += len(chunk)
            self._metrics.bytes_sent += len(chunk)
        puller = dict(context.invocation_metadata() or ()).get(PULLER_METADATA_KEY)
        if puller and puller != self._node_hex:
            self._copies_sent.setdefault(object_id, set()).add(puller)


_tuned = False


def _tune_allocator() -> None:
    """Keep the daemon's malloc from returning chunk-sized blocks to the kernel.

    Every chunk passes through a few multi-MiB buffers (the encoded message,
    gRPC's slices, the received bytes). With glibc's adaptive defaults such a
    block is often trimmed or unmapped when freed and the next one faults in
    fresh zeroed pages, which cost more than copying the chunk. Fixed
    thresholds above the chunk size keep those pages for reuse; the cost is
    that up to _TRIM_THRESHOLD of freed memory may stay with the process.
    """
    global _tuned
    if _tuned:
        return
    _tuned = True
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 4 * PULL_CHUNK_BYTES
_TRIM_THRESHOLD = 16 * PULL_CHUNK_BYTES
