"""Prefix watches: :class:`WatchHandle`, which delivers every change under a
prefix in revision order, resumes a broken stream from the last revision
seen + 1, and re-lists after compaction, never skipping an event; and the
:class:`KeyValue` / :class:`Event` value types listings and watches deliver.

Watches are started with :meth:`Coordinator.watch_prefix`; ``client.py``
offers these names too.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import grpc
from pyetcd import etcdrpc
from pyetcd.etcdrpc import kv_pb2

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


# --------------------------------------------------------------------------
# Watches


class WatchHandle:
    """A running prefix watch. Created by :meth:`Coordinator.watch_prefix`."""

    def __init__(self, coordinator: Coordinator, prefix: bytes,
                 start_revision: int, on_events, on_reset):
        self._coord = coordinator
        self._prefix = prefix
        self._next_rev = start_revision
        self._on_events = on_events
        self._on_reset = on_reset
        self._stopped = threading.Event()
        self._established = threading.Event()
        self._lock = threading.Lock()
        self._call = None
        self._needs_reset = False
        self._failures = 0
        # The token this watch logged in for after etcd refused it; refused
        # again with that very token, the refusal is real (RBAC), not stale.
        self._fresh_token: str | None = None
        self.error: CoordinationError | None = None
        self._thread = threading.Thread(
            target=self._run, daemon=True,
            name=f"meshray-watch-{_ks(prefix)[-40:]}")

    def _start(self) -> None:
        self._thread.start()

    @property
    def revision(self) -> int:
        """The last revision fully delivered (events or reset)."""
        return self._next_rev - 1

    @property
    def active(self) -> bool:
        return self._thread.is_alive() and not self._stopped.is_set()

    def wait_established(self, timeout: float) -> bool:
        """True once etcd has confirmed the watch stream (mainly for tests
        and startup ordering; events are never lost before this)."""
        return self._established.wait(timeout)

    def cancel(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()
        if threading.current_thread() is not self._thread and \
                self._thread.is_alive():
            self._thread.join(timeout)

    # -- internals ------------------------------------------------------

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
        """Re-list after compaction; False if etcd was unavailable."""
        if self._on_reset is None:
            self.error = CompactedError(
                f"watch on {_ks(self._prefix)!r} fell behind compaction at "
                f"revision {self._next_rev} and has no on_reset to re-sync; "
                f"stopping")
            log.error("%s", self.error)
            self._stopped.set()
            return True
        try:
            items, revision = self._coord.get_prefix(self._prefix)
        except CoordinationUnavailable as exc:
            log.warning("watch %r: re-list after compaction failed: %s",
                        _ks(self._prefix), exc)
            return False
        try:
            self._on_reset(items, revision)
        except Exception:
            log.exception("watch %r: on_reset callback failed",
                          _ks(self._prefix))
        self._next_rev = revision + 1
        self._needs_reset = False
        return True

    def _stream_once(self, ep: _Endpoint) -> None:
        create = etcdrpc.WatchCreateRequest(
            key=self._prefix, range_end=_prefix_end(self._prefix),
            start_revision=self._next_rev)
        done = threading.Event()

        def requests():
            yield etcdrpc.WatchRequest(create_request=create)
            done.wait()  # keep the stream open until we drop it

        token = self._coord._token
        call = ep.watch.Watch(requests(),
                              metadata=self._coord._metadata(
                                  require_leader=True))
        with self._lock:
            self._call = call
        try:
            if self._stopped.is_set():
                return
            for resp in call:
                if self._stopped.is_set():
                    return
                if resp.compact_revision:
                    log.info("watch %r: revision %d compacted (compact "
                             "revision %d); re-listing", _ks(self._prefix),
                             self._next_rev, resp.compact_revision)
                    self._needs_reset = True
                    return
                if resp.created:
                    if resp.canceled:
                        if self._login_again(ep, token, resp.cancel_reason):
                            return      # resume with the new token
                        raise CoordinationError(
                            f"etcd refused watch on {_ks(self._prefix)!r}: "
                            f"{resp.cancel_reason}")
                    self._established.set()
                    self._failures = 0
                    self._fresh_token = None
                    continue
                if resp.canceled:
                    log.warning("watch %r canceled by %s: %s; resuming",
                                _ks(self._prefix), ep.address,
                                resp.cancel_reason)
                    self._coord._failover(ep)
                    return
                if resp.events:
                    self._deliver(resp.events)
        finally:
            done.set()
            call.cancel()
            with self._lock:
                self._call = None

    def _login_again(self, ep: _Endpoint, token: str | None,
                     reason: str) -> bool:
        """After etcd refused to create the watch: True if logging in again
        may help (and was done or is worth retrying), False if the refusal
        stands.

        etcd checks a watch's permission once, with the token the stream
        was opened with, and answers a stale token (etcd restarted, or auth
        came on after we connected) with a plain "permission denied".
        """
        coord = self._coord
        if coord._user is None or "permission denied" not in reason.lower() \
                or (token is not None and token == self._fresh_token):
            return False
        log.info("watch %r: etcd refused the stream (%s); logging in again",
                 _ks(self._prefix), reason)
        try:
            coord._refresh_token(ep, token, coord.timeout)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if not (_is_transient(code, details) or _token_stale(details)):
                return False
            log.warning("watch %r: logging in again failed (%s); retrying",
                        _ks(self._prefix), details)
            return True
        self._fresh_token = coord._token
        return True

    def _run(self) -> None:
        while not self._stopped.is_set():
            if self._needs_reset:
                if self._reset():
                    self._failures = 0
                    continue
            else:
                try:
                    ep = self._coord._endpoint()
                except CoordinationError:
                    return  # coordinator closed
                try:
                    self._stream_once(ep)
                    if self._needs_reset:
                        continue
                except grpc.RpcError as exc:
                    if self._stopped.is_set():
                        return
                    code = exc.code()
                    if self._coord._user is not None and (
                            code == grpc.StatusCode.UNAUTHENTICATED
                            or _token_stale(exc.details() or "")):
                        try:
                            self._coord._refresh_token(ep, self._coord._token,
                                                       self._coord.timeout)
                        except grpc.RpcError:
                            pass
                    log.warning("watch %r on %s broke (%s: %s); resuming at "
                                "revision %d", _ks(self._prefix), ep.address,
                                code.name if code else "?", exc.details(),
                                self._next_rev)
                    self._coord._failover(ep)
                except CoordinationError as exc:
                    self.error = exc
                    log.error("%s", exc)
                    return
            self._failures += 1
            self._stopped.wait(_backoff(self._failures, 0.05, 2.0))
