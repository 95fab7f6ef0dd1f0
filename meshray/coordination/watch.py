"""Prefix watches: :class:`WatchHandle`, which delivers every change under a
prefix in revision order, resumes a broken stream from the last revision
delivered + 1, and re-lists after compaction, never skipping an event; and
the :class:`KeyValue` / :class:`Event` value types listings and watches
deliver.

Watches are started with :meth:`Coordinator.watch_prefix`; ``client.py``
offers these names too.

One stream per Coordinator
--------------------------

etcd's Watch RPC is a bidirectional stream that carries any number of
watches: create requests are answered in the order they were sent, each by
a "created" response naming the id etcd gave the watch (or -1 and a reason
when it refused it), and every later response names the watch it is for.
All watches of a Coordinator share one such stream and one thread
(:class:`_WatchStream`). A node follows four prefixes, and a machine that
runs hundreds of nodes (hollow ones, docs/scale.md) paid four threads, four
streams and four gRPC request threads per node, nearly all of them waiting.

Sharing is the default and the only mode: every guarantee holds for each
watch on its own, so nothing a caller can observe depends on it --

* events in revision order, none skipped, none repeated;
* a broken stream (an error, a restarted member, a lost leader) is opened
  again and every watch created again from its own last delivered revision
  + 1;
* compaction of one watch's history (``compact_revision`` in a response, or
  a refused create naming compaction) re-lists that prefix through its
  ``on_reset`` and creates that watch again; the others go on untouched;
* a refused create ends only that watch, with ``error`` set -- unless the
  refusal is etcd forgetting our auth token, which a new login and a new
  stream cure (etcd checks a watch's permission once, with the token the
  stream was opened with);
* ``cancel()`` sends a WatchCancelRequest for that watch alone, and once it
  returns no callback of that watch runs.

The cost is that the callbacks of a Coordinator's watches run one after
another on the one thread, which is what a callback already promised: not
to block for long (PrefixMirror's say so). A caller that needs a watch
whose callbacks may stall the others can give it a Coordinator of its own.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import grpc
from pyetcd import etcdrpc
from pyetcd.etcdrpc import kv_pb2

from meshray.rpc.streams import release_stream_error

from .errors import (
    CompactedError,
    CoordinationError,
    CoordinationUnavailable,
    _is_transient,
    _token_stale,
)
from .wire import _backoff, _Endpoint, _ks, _prefix_end

if TYPE_CHECKING:
    from .client import Coordinator

__all__ = ["KeyValue", "Event", "WatchHandle"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------
# Value types


class KeyValue(NamedTuple):
    key: str
    value: bytes
    mod_revision: int


@dataclass(frozen=True)
class Event:
    """One change under a watched prefix. ``value`` is None for deletes;
    ``mod_revision`` is the revision of the change itself."""

    kind: str  # "put" | "delete"
    key: str
    value: bytes | None
    mod_revision: int


def _compaction(reason: str) -> bool:
    """Whether etcd's reason for cancelling a watch is compacted history."""
    return "compacted" in reason.lower()


# --------------------------------------------------------------------------
# Watches


class WatchHandle:
    """A running prefix watch. Created by :meth:`Coordinator.watch_prefix`.

    Its callbacks run on its Coordinator's watch thread, shared with the
    Coordinator's other watches (see the module docstring).
    """

    def __init__(self, coordinator: Coordinator, prefix: bytes,
                 start_revision: int, on_events, on_reset, *, end: bytes | None = None):
        self._coord = coordinator
        self._stream = coordinator._watch_stream
        self._prefix = prefix
        self._end = end if end is not None else _prefix_end(prefix)   # etcd's range_end
        self._next_rev = start_revision
        self._on_events = on_events
        self._on_reset = on_reset
        self._stopped = threading.Event()
        self._established = threading.Event()
        # Held while a callback of this watch runs; cancel() waits on it.
        self._callback_lock = threading.RLock()
        # The compacted history must be re-listed before the watch goes on.
        self._needs_reset = False
        # etcd's id for this watch on the current stream (None: not created).
        self._watch_id: int | None = None
        # The token this watch logged in for after etcd refused it; refused
        # again with that very token, the refusal is real (RBAC), not stale.
        self._fresh_token: str | None = None
        self.error: CoordinationError | None = None

    def _start(self) -> None:
        self._stream.add(self)

    @property
    def _thread(self) -> threading.Thread | None:
        """The thread that delivers this watch's callbacks."""
        return self._stream.thread

    @property
    def revision(self) -> int:
        """The last revision fully delivered (events or reset)."""
        return self._next_rev - 1

    @property
    def active(self) -> bool:
        return not self._stopped.is_set() and self._stream.running

    def wait_established(self, timeout: float) -> bool:
        """True once etcd has confirmed the watch (mainly for tests and
        startup ordering; events are never lost before this)."""
        return self._established.wait(timeout)

    def cancel(self, timeout: float = 5.0) -> None:
        """Stop this watch. Called from another thread, it waits (up to
        ``timeout``) for a callback of this watch that is running to end."""
        self._stream.remove(self)
        if threading.current_thread() is not self._stream.thread:
            if self._callback_lock.acquire(timeout=timeout):
                self._callback_lock.release()

    def __repr__(self) -> str:
        return f"WatchHandle({_ks(self._prefix)!r}, revision={self.revision})"

    # -- internals (the watch thread, with _callback_lock held) ---------

    def _create_request(self) -> etcdrpc.WatchRequest:
        return etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
            key=self._prefix, range_end=self._end,
            start_revision=self._next_rev))

    def _deliver(self, raw_events) -> None:
        batch = []
        for ev in raw_events:
            kv = ev.kv
            if ev.type == kv_pb2.Event.DELETE:
                batch.append(Event("delete", _ks(kv.key), None,
                                   kv.mod_revision))
            else:
                value = kv.value if self._coord.seal is None else \
                    self._coord.seal.open(kv.key, kv.value)
                # A value no member wrote leaves the key without a record.
                batch.append(Event("put", _ks(kv.key), value, kv.mod_revision)
                             if value is not None else
                             Event("delete", _ks(kv.key), None, kv.mod_revision))
        try:
            self._on_events(batch)
        except Exception:
            log.exception("watch %r: on_events callback failed",
                          _ks(self._prefix))
        self._next_rev = batch[-1].mod_revision + 1

    def _reset(self) -> bool:
        """Re-list after compaction. False if etcd was unavailable (try
        again later); True otherwise, with the watch stopped and ``error``
        set if it cannot go on."""
        if self._on_reset is None:
            return self._fail(CompactedError(
                f"watch on {_ks(self._prefix)!r} fell behind compaction at "
                f"revision {self._next_rev} and has no on_reset to re-sync; "
                f"stopping"))
        try:
            items, revision = self._coord.get_prefix(self._prefix, end=self._end)
        except CoordinationUnavailable as exc:
            log.warning("watch %r: re-list after compaction failed: %s",
                        _ks(self._prefix), exc)
            return False
        except CoordinationError as exc:
            return self._fail(CoordinationError(
                f"watch on {_ks(self._prefix)!r}: re-list after compaction "
                f"refused: {exc}; stopping"))
        try:
            self._on_reset(items, revision)
        except Exception:
            log.exception("watch %r: on_reset callback failed",
                          _ks(self._prefix))
        self._next_rev = revision + 1
        self._needs_reset = False
        return True

    def _fail(self, error: CoordinationError) -> bool:
        self.error = error
        log.error("%s", error)
        self._stopped.set()
        return True


class _Restart(Exception):
    """Internal: end the current stream; the watches resume on a new one."""


class _Call:
    """One Watch stream: its requests, and which watch each etcd id is.

    Creates are answered in the order sent, so ``creating`` (a FIFO) says
    whose a "created" response is even when etcd names no id (a refusal).
    Touched under the owning _WatchStream's lock, except ``requests``.
    """

    def __init__(self, ep: _Endpoint, token: str | None):
        self.ep = ep
        self.token = token
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.by_id: dict[int, WatchHandle] = {}
        self.creating: deque[WatchHandle] = deque()
        self.grpc_call = None
        self.ended = False

    def create(self, handle: WatchHandle) -> None:
        handle._watch_id = None
        self.creating.append(handle)
        self.requests.put(handle._create_request())

    def cancel_watch(self, watch_id: int) -> None:
        self.requests.put(etcdrpc.WatchRequest(
            cancel_request=etcdrpc.WatchCancelRequest(watch_id=watch_id)))

    def request_iterator(self):
        """What gRPC sends: requests until the stream ends (None)."""
        while True:
            request = self.requests.get()
            if request is None:
                return
            yield request

    def end(self) -> None:
        self.ended = True
        self.requests.put(None)
        if self.grpc_call is not None:
            self.grpc_call.cancel()


class _WatchStream:
    """Every watch of one Coordinator, on one etcd Watch stream and thread.

    The thread runs while there are watches: it opens a stream, creates each
    watch at its next revision, dispatches responses by watch id, and opens
    a new stream (after a backoff) when one breaks. It ends, closing the
    stream, when the last watch is cancelled; the next watch starts another.
    """

    def __init__(self, coordinator: Coordinator):
        self._coord = coordinator
        self._lock = threading.Lock()
        self._watches: list[WatchHandle] = []   # live, in the order started
        self._call: _Call | None = None
        self._thread: threading.Thread | None = None  # the latest one
        self._running = False
        self._closed = threading.Event()
        self._failures = 0
        self.streams_opened = 0

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def add(self, handle: WatchHandle) -> None:
        with self._lock:
            if self._closed.is_set():
                handle._stopped.set()     # as a closed Coordinator's watch
                return
            self._watches.append(handle)
            if self._call is not None and not self._call.ended:
                self._call.create(handle)
            if not self._running:
                self._running = True
                self._thread = threading.Thread(
                    target=self._run, daemon=True, name="meshray-watch")
                self._thread.start()

    def remove(self, handle: WatchHandle) -> None:
        """Stop ``handle``: cancel it on the stream (a watch still being
        created is cancelled when etcd names it), and end the stream if it
        was the last."""
        handle._stopped.set()
        with self._lock:
            if handle in self._watches:
                self._watches.remove(handle)
            call, watch_id = self._call, handle._watch_id
            if call is not None and watch_id is not None \
                    and call.by_id.get(watch_id) is handle:
                del call.by_id[watch_id]
                call.cancel_watch(watch_id)
            handle._watch_id = None
            if not self._watches and call is not None:
                call.end()

    def close(self, timeout: float = 5.0) -> None:
        """Stop every watch and the thread (the Coordinator is closing)."""
        with self._lock:
            self._closed.set()
            watches, self._watches = self._watches, []
            call = self._call
        for handle in watches:
            handle._stopped.set()
        if call is not None:
            call.end()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- the watch thread ------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed.is_set() or not self._watches:
                    self._running = False
                    return
                pending = [h for h in self._watches if h._needs_reset]
            try:
                if self._reset_all(pending) and self._stream_once():
                    continue      # ended on purpose: no backoff
            except Exception:
                log.exception("etcd watch stream failed; starting it again")
            self._failures += 1
            self._closed.wait(_backoff(self._failures, 0.05, 2.0))

    def _reset_all(self, handles: list[WatchHandle]) -> bool:
        """Re-list the watches whose history was compacted; False if etcd
        was unavailable for one of them."""
        for handle in handles:
            with handle._callback_lock:
                if handle._stopped.is_set():
                    continue
                if not handle._reset():
                    return False
            if handle._stopped.is_set():
                self.remove(handle)
        return True

    def _stream_once(self) -> bool:
        """Open a stream, create every watch on it and dispatch until it
        ends. True if it was ended on purpose (nothing left to watch, or
        closing), False if it broke."""
        try:
            ep = self._coord._endpoint()
        except CoordinationError:     # the Coordinator was closed
            self.close(timeout=0)
            return True
        call = _Call(ep, self._coord._token)
        with self._lock:
            if self._closed.is_set() or not self._watches:
                return True
            for handle in self._watches:
                if not handle._needs_reset:
                    call.create(handle)
            call.grpc_call = ep.watch.Watch(
                call.request_iterator(),
                metadata=self._coord._metadata(require_leader=True))
            self._call = call
            self.streams_opened += 1
        try:
            for resp in call.grpc_call:
                self._dispatch(call, resp)
            if call.ended:
                return True
            log.warning("etcd watch stream on %s ended; resuming %d watches",
                        ep.address, len(self._watches))
            return False
        except _Restart:
            return False
        except grpc.RpcError as exc:
            if call.ended:
                return True
            self._broken(call, exc)
            release_stream_error(exc)
            return False
        finally:
            call.end()
            with self._lock:
                if self._call is call:
                    self._call = None

    def _broken(self, call: _Call, exc: grpc.RpcError) -> None:
        coord = self._coord
        code, details = exc.code(), exc.details() or ""
        if coord._user is not None and (
                code == grpc.StatusCode.UNAUTHENTICATED
                or _token_stale(details)):
            try:
                coord._refresh_token(call.ep, call.token, coord.timeout)
            except grpc.RpcError:
                pass
        with self._lock:
            resume = ", ".join(f"{_ks(h._prefix)!r} at {h._next_rev}"
                               for h in self._watches)
        log.warning("etcd watch stream on %s broke (%s: %s); resuming %s",
                    call.ep.address, code.name if code else "?", details,
                    resume or "nothing")
        coord._failover(call.ep)

    def _dispatch(self, call: _Call, resp) -> None:
        if resp.created:
            self._created(call, resp)
            return
        with self._lock:
            handle = call.by_id.get(resp.watch_id)
        if handle is None:
            return      # cancelled meanwhile: its last responses are dropped
        if resp.compact_revision or (resp.canceled
                                     and _compaction(resp.cancel_reason)):
            log.info("watch %r: revision %d compacted (compact revision %d);"
                     " re-listing", _ks(handle._prefix), handle._next_rev,
                     resp.compact_revision)
            with self._lock:
                call.by_id.pop(resp.watch_id, None)
                handle._watch_id = None
            call.cancel_watch(resp.watch_id)
            self._resync(call, handle)
            return
        if resp.canceled:
            log.warning("watch %r canceled by %s: %s; resuming",
                        _ks(handle._prefix), call.ep.address,
                        resp.cancel_reason)
            self._coord._failover(call.ep)
            raise _Restart
        if resp.events:
            with handle._callback_lock:
                if not handle._stopped.is_set():
                    handle._deliver(resp.events)

    def _created(self, call: _Call, resp) -> None:
        with self._lock:
            handle = call.creating.popleft() if call.creating else None
            if handle is not None and not resp.canceled:
                if handle._stopped.is_set():
                    call.cancel_watch(resp.watch_id)
                    return
                call.by_id[resp.watch_id] = handle
                handle._watch_id = resp.watch_id
        if handle is None:
            log.warning("etcd on %s confirmed a watch this client did not "
                        "ask for (id %d)", call.ep.address, resp.watch_id)
            return
        if not resp.canceled:
            handle._established.set()
            handle._fresh_token = None
            self._failures = 0
            return
        if not handle._stopped.is_set():
            self._refused(call, handle, resp.cancel_reason)
        with self._lock:
            zero = call.by_id.get(0)
        if zero is not None:
            # etcd 3.5.1 names a refusal with id 0 and then holds back
            # the events of the watch that has id 0, for good.
            log.info("watch %r: etcd's refusal of another watch on this "
                     "stream stalls it; opening a new stream",
                     _ks(zero._prefix))
            raise _Restart

    def _refused(self, call: _Call, handle: WatchHandle, reason: str) -> None:
        if _compaction(reason):
            self._resync(call, handle)
            return
        if self._login_again(call, handle, reason):
            raise _Restart        # a new stream, with the new token
        with handle._callback_lock:
            handle._fail(CoordinationError(
                f"etcd refused watch on {_ks(handle._prefix)!r}: {reason}"))
        self.remove(handle)

    def _resync(self, call: _Call, handle: WatchHandle) -> None:
        """Re-list a compacted watch, then create it again on ``call``."""
        handle._needs_reset = True
        with handle._callback_lock:
            if handle._stopped.is_set():
                return
            if not handle._reset():
                raise _Restart    # etcd unavailable: the next stream re-lists
        if handle._stopped.is_set():
            self.remove(handle)
            return
        with self._lock:
            if not handle._stopped.is_set() and not call.ended:
                call.create(handle)

    def _login_again(self, call: _Call, handle: WatchHandle,
                     reason: str) -> bool:
        """After etcd refused to create ``handle``: True if logging in again
        may help (and was done or is worth retrying), False if the refusal
        stands.

        etcd checks a watch's permission once, with the token the stream
        was opened with, and answers a stale token (etcd restarted, or auth
        came on after we connected) with a plain "permission denied".
        """
        coord = self._coord
        if coord._user is None or "permission denied" not in reason.lower() \
                or (call.token is not None
                    and call.token == handle._fresh_token):
            return False
        log.info("watch %r: etcd refused it (%s); logging in again",
                 _ks(handle._prefix), reason)
        try:
            coord._refresh_token(call.ep, call.token, coord.timeout)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if not (_is_transient(code, details) or _token_stale(details)):
                return False
            log.warning("watch %r: logging in again failed (%s); retrying",
                        _ks(handle._prefix), details)
            return True
        handle._fresh_token = coord._token
        return True
