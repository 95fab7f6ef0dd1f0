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

Mixed into NodeDaemon.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import os

import grpc
import tenacity

from meshray import exceptions
from meshray.object_store import layout
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["ObjectTransfer", "PULL_CHUNK_BYTES", "PULL_DEADLINE_S", "REBUILD_WAIT_S"]

log = logging.getLogger(__name__)

PULL_CHUNK_BYTES = 4 * 1024 * 1024
# Transient pull failures are retried for this long before the object is
# reported lost; longer than a lease TTL, so a holder that is really gone
# is seen dead (and the object rebuilt) before this gives up.
PULL_DEADLINE_S = 60.0
REBUILD_WAIT_S = 120.0
# A transfer that receives nothing for this long is abandoned and retried.
PULL_STALL_S = 15.0


class _PullFailed(Exception):
    """Every live copy failed this round, for reasons that may pass."""


class _NoLiveCopy(Exception):
    def __init__(self, tried: list):
        super().__init__(f"no live node holds a copy (tried {tried})")
        self.tried = tried


class ObjectTransfer:
    """Mixed into NodeDaemon: pulls, the PullObject server, and rebuilds."""

    # ------------------------------------------------------------ reader side
    async def _ask_restore(self, conn, payload: dict) -> dict:
        """Make an object's bytes local (restore from disk, or pull from a peer).

        Answers {"path"}, or {"error_value"} (a serialized exception, such as
        ObjectReconstructionFailedError) when the object cannot be had.
        """
        object_id = bytes.fromhex(payload["object_id"])
        if self.store.contains(object_id):
            return {"path": self.store.ensure_in_memory(object_id)}
        pending = self.pulls.get(object_id)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = self.pulls[object_id] = loop.create_future()
            loop.create_task(self._fetch(object_id, payload.get("location") or "", pending))
        try:
            return {"path": await asyncio.shield(pending)}
        except exceptions.RayError as exc:
            from meshray.node.daemon import error_value
            return {"error_value": base64.b64encode(
                error_value(object_id, exc).inline_data).decode()}

    async def _fetch(self, object_id: bytes, location: str, done: asyncio.Future) -> None:
        """Pull a copy; when none is left, have the owner rebuild it and pull that."""
        try:
            try:
                path = await self._pull_any(object_id, location)
            except _NoLiveCopy as gone:
                value = await self._rebuilt_value(object_id, gone.tried)
                if value.is_error:
                    from meshray.core import serialization
                    raise serialization.deserialize_inline(value.inline_data)
                if self.store.contains(object_id):
                    path = self.store.ensure_in_memory(object_id)
                else:
                    path = await self._pull_any(object_id, value.location)
            if not done.done():
                done.set_result(path)
        except _NoLiveCopy as exc:
            if not done.done():
                done.set_exception(exceptions.ObjectLostError(
                    object_id.hex(), call_site=f"it was rebuilt, but {exc}"))
        except BaseException as exc:  # noqa: BLE001 - every waiter gets the error
            if not done.done():
                done.set_exception(exc)
        finally:
            self.pulls.pop(object_id, None)

    def _live_copies(self, object_id: bytes, hint: str, listed: list) -> list:
        candidates = [hint] if hint else []
        candidates += [n for n in listed if n not in candidates]
        return [n for n in candidates if n != self.node_hex and n not in self.known_dead
                and (self.membership is None or n in self.view_nodes)]

    async def _pull_any(self, object_id: bytes, hint: str) -> str:
        """Pull from any live copy, retrying transient failures with backoff."""
        tried: list = []
        last_error: list = [None]

        async def one_round() -> str:
            listed = []
            if self.membership is not None:
                listed = await asyncio.get_running_loop().run_in_executor(
                    None, self.membership.locations, object_id)
            candidates = self._live_copies(object_id, hint, listed)
            if not candidates:
                raise _NoLiveCopy(tried or ([hint] if hint else []))
            missing = 0
            for node_hex in candidates:
                link = self._link(node_hex)
                if link is None:
                    continue
                if node_hex not in tried:
                    tried.append(node_hex)
                try:
                    path = await self._pull_from(link, object_id, node_hex)
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
                self._note_location(object_id, True)
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

    async def _pull_from(self, link, object_id: bytes, node_hex: str) -> str:
        """Stream the object in chunks straight into our store (never held twice).

        Abandoned when its holder is declared dead mid-transfer, or sends
        nothing for PULL_STALL_S (a paused process keeps its sockets open).
        """
        writer = None
        path = ""
        call = link.stub.PullObject(
            pb.PullRequest(object_id=object_id, chunk_size=PULL_CHUNK_BYTES), timeout=600)
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
                    if node_hex in self.known_dead or loop.time() > stalled_at:
                        waiting.cancel()
                        call.cancel()
                        why = "died" if node_hex in self.known_dead else "stalled"
                        raise ConnectionError(f"holder {node_hex} {why} mid-transfer")
                try:
                    chunk = waiting.result()
                except StopAsyncIteration:
                    break
                except asyncio.CancelledError:
                    # The call, not this coroutine: its link was closed under it.
                    raise ConnectionError(f"link to {node_hex} closed mid-transfer") from None
                if writer is None:
                    path = self.store.reserve(object_id, chunk.total_size)
                    writer = layout.ChunkWriter(path, chunk.total_size)
                writer.write(chunk.offset, chunk.data)
            if writer is None:
                raise exceptions.ObjectLostError(object_id.hex(), call_site="empty transfer")
            size = writer.finish()
            self.store.seal(object_id, size)
            return path
        except BaseException:
            if writer is not None:
                writer.abort()
            if hasattr(self.store, "abort"):
                self.store.abort(object_id)
            raise

    async def _rebuilt_value(self, object_id: bytes, lost: list) -> pb.ObjectValue:
        """The object's value once its owner has replaced the lost copies."""
        if self.is_local_object(object_id):
            value = await self._rebuild_object(object_id, lost)
        else:
            owner = self._node_for_prefix(object_id)
            if owner is None or owner in self.known_dead:
                raise exceptions.OwnerDiedError(
                    object_id.hex(), call_site=f"no live node holds a copy (tried {lost}) and "
                    "its owner node, which could rebuild it, is not in the cluster")
            reply = await self.ask_peer(owner, "rebuild_object", {
                "object_id": object_id.hex(), "lost": lost}, REBUILD_WAIT_S + 10)
            value = pb.ObjectValue.FromString(base64.b64decode(reply["value"]))
        if self.objects.get(object_id) is not None:
            self.objects.replace_value(object_id, value)
        return value

    # ------------------------------------------------------------ owner side
    async def _ask_rebuild_object(self, conn, payload: dict) -> dict:
        value = await self._rebuild_object(bytes.fromhex(payload["object_id"]),
                                           list(payload.get("lost", ())))
        return {"value": base64.b64encode(value.SerializeToString()).decode()}

    async def _rebuild_object(self, object_id: bytes, lost: list) -> pb.ObjectValue:
        """Wait until the value no longer points at a lost copy, rebuilding if needed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REBUILD_WAIT_S
        while True:
            value = self.objects.get(object_id)
            if value is not None:
                where = value.location or self.node_hex
                if not value.in_store or where not in lost or (
                        where == self.node_hex and self.store.contains(object_id)):
                    return self._exportable(value)
                if where not in self.known_dead:
                    # Its holder lives on but cannot serve it: the copy is lost.
                    log.warning("object %s is missing on its holder %s; rebuilding",
                                object_id.hex(), where)
                    self._object_copy_lost(object_id, where)
                    continue
                # Its holder died: the node-death handling rebuilds it.
            elif object_id not in self.objects:
                raise exceptions.ObjectLostError(
                    object_id.hex(), call_site="its owner no longer tracks it (it was freed)")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise exceptions.ObjectReconstructionFailedError(
                    object_id.hex(), call_site=f"it was not rebuilt within {REBUILD_WAIT_S:.0f}s "
                    f"after its copies on {lost} were lost")
            future = loop.create_future()
            self.object_waiters.setdefault(object_id, []).append(future)
            try:
                await asyncio.wait_for(future, min(remaining, 0.5))
            except asyncio.TimeoutError:
                pass

    # ------------------------------------------------------------ holder side
    async def PullObject(self, request: pb.PullRequest, context):
        object_id = request.object_id
        if not self.store.contains(object_id):
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"object {object_id.hex()} is not on node {self.node_hex}")
        path = self.store.ensure_in_memory(object_id)
        chunk_size = int(request.chunk_size or PULL_CHUNK_BYTES)
        total = os.path.getsize(path)
        offset = 0
        for chunk in layout.copy_file_chunks(path, chunk_size):
            yield pb.ObjectChunk(offset=offset, data=bytes(chunk), total_size=total)
            offset += len(chunk)
