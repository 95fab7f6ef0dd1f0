"""meshray's etcd client: with its sibling modules (listed below), the only
code that talks to etcd over the wire.

Everything above this layer (node daemon, actor directory, placement groups)
uses :class:`Coordinator` and the small value types defined here, never a
third-party client, so the client library can be swapped without touching
them. Today the wire layer is the etcd v3 gRPC API through the generated stubs
shipped by ``etcd-sdk-python`` (module ``pyetcd.etcdrpc``); channel management,
failover, deadlines, retries and watch resumption are done here because the
meshray failure model (docs/architecture.md, "Several nodes") needs guarantees pyetcd's high-level
client does not give (see docs/keyspace.md, "Client notes").

Guarantees:

* Every call has a deadline (``timeout``, default the coordinator's) and
  surfaces as a :class:`CoordinationError` subclass — never a hang.
* Reads and idempotent writes are retried with jittered exponential backoff
  across endpoints until the deadline. A transaction is retried only when the
  failure proves it never reached etcd; otherwise the caller gets
  :class:`CoordinationUnavailable` with ``outcome_unknown=True``.
* Watches deliver events in revision order, resume after a broken stream from
  the last revision seen + 1, and after compaction re-list at one revision and
  continue from there — they never skip an event. All watches of a
  Coordinator share one gRPC stream and one thread (see :mod:`.watch`).
* With a user and password, a request refused for a stale auth token (etcd
  restarted and forgot it, it expired, or auth was turned on after we
  connected) logs in again and is retried; an etcd without auth is used
  without a token, as etcd's own client does.

The pieces live in sibling modules, all re-exported here so
``from meshray.coordination.client import X`` keeps working:

* :mod:`.errors` — the :class:`CoordinationError` hierarchy and the mapping
  from gRPC failures onto it;
* :mod:`.txn` — transaction compares/ops (:class:`KeyMissing`,
  :class:`Put`, ...), :class:`TxnResult` and :data:`MAX_TXN_OPS`;
* :mod:`.watch` — :class:`WatchHandle`, the stream its Coordinator's
  watches share, and the :class:`KeyValue` / :class:`Event` value types;
* :mod:`.leases` — :class:`LeaseKeeper`;
* :mod:`.wire` — encoding, endpoint and channel plumbing (private).
"""

from __future__ import annotations

import logging
import random
import threading
import time
import weakref
from typing import Any, Callable, Iterable, Sequence

import grpc
import tenacity
from pyetcd import etcdrpc

from meshray.rpc.streams import release_stream_error

from .errors import (
    AuthError,
    CompactedError,
    CoordinationError,
    CoordinationUnavailable,
    InvalidRequestError,
    LeaseNotFoundError,
    QuotaExceededError,
    RequestTooLargeError,
    TxnTooLargeError,
    _auth_not_enabled,
    _is_transient,
    _map_error,
    _never_applied,
    _token_stale,
    _Transient,
)
from .leases import LeaseKeeper
from .seal import RecordSeal
from .txn import (
    MAX_TXN_OPS,
    Delete,
    Get,
    KeyMissing,
    ModRevisionEquals,
    Put,
    TxnResult,
    ValueEquals,
)
from .watch import Event, KeyValue, WatchHandle, _WatchStream
from .wire import (
    _backoff,
    _Endpoint,
    _kb,
    _ks,
    _lease_id,
    _parse_endpoint,
    _prefix_end,
    _range_end,
    _read_file,
    _vb,
)

__all__ = [
    "MAX_TXN_OPS",
    "Coordinator",
    "KeyValue",
    "Event",
    "WatchHandle",
    "LeaseKeeper",
    "KeyMissing",
    "ModRevisionEquals",
    "ValueEquals",
    "Put",
    "Delete",
    "Get",
    "TxnResult",
    "CoordinationError",
    "CoordinationUnavailable",
    "RequestTooLargeError",
    "TxnTooLargeError",
    "QuotaExceededError",
    "LeaseNotFoundError",
    "CompactedError",
    "AuthError",
    "InvalidRequestError",
]

log = logging.getLogger(__name__)

_PAGE_SIZE = 2000
# A token refused, refreshed, then refused again means etcd restarted again
# mid-call; past a few rounds it is something logging in cannot fix.
_MAX_LOGINS_PER_CALL = 3


# --------------------------------------------------------------------------
# Coordinator


class Coordinator:
    """A connection to one etcd cluster (one or more endpoints).

    Construction proves connectivity: it raises :class:`ConnectionError`
    (:class:`CoordinationUnavailable`) naming the addresses if no endpoint
    answers within ``timeout`` seconds. Thread-safe; share one per process.
    """

    def __init__(self, endpoints: Sequence[str] | str, timeout: float = 5.0,
                 ca_cert: str | None = None, cert_key: str | None = None,
                 cert_cert: str | None = None, user: str | None = None,
                 password: str | None = None, record_key: bytes | None = None):
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e.strip()]
        endpoints = list(endpoints)
        if not endpoints:
            raise ValueError("endpoints must name at least one etcd address")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, "
                             f"got {timeout!r}")
        if (cert_key is None) != (cert_cert is None):
            raise ValueError("cert_key and cert_cert must be given together "
                             "(client certificate authentication)")
        if (user is None) != (password is None):
            raise ValueError("user and password must be given together")
        parsed = [_parse_endpoint(e) for e in endpoints]
        secure = ca_cert is not None or cert_cert is not None or any(
            s for _, s in parsed)
        creds = None
        if secure:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read_file(ca_cert, "ca_cert"),
                private_key=_read_file(cert_key, "cert_key"),
                certificate_chain=_read_file(cert_cert, "cert_cert"))
        self._timeout = float(timeout)
        # Values are sealed on the way in and checked on the way out (seal.py);
        # without a key (a tokenless loopback cluster) they pass unchanged.
        self.seal = RecordSeal(record_key) if record_key is not None else None
        self._user, self._password = user, password
        self._token: str | None = None
        self._lock = threading.Lock()
        self._auth_lock = threading.Lock()
        self._said_no_auth = False
        self._closed = False
        self._eps = [_Endpoint(addr, creds) for addr, _ in parsed]
        self._current = random.randrange(len(self._eps))
        self._watch_stream = _WatchStream(self)
        self._keepers: weakref.WeakSet[LeaseKeeper] = weakref.WeakSet()
        # callable(what, seconds) told of every answered request (node metrics).
        self.on_round_trip: Callable[[str, float], None] | None = None
        try:
            self._connect()
        except BaseException:
            self._close_channels()
            raise

    # -- plumbing -------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return [ep.address for ep in self._eps]

    @property
    def timeout(self) -> float:
        return self._timeout

    def _where(self) -> str:
        return ", ".join(self.endpoints)

    def _endpoint(self) -> _Endpoint:
        if self._closed:
            raise CoordinationError("Coordinator is closed")
        with self._lock:
            return self._eps[self._current]

    def _failover(self, ep: _Endpoint) -> None:
        """Move off ``ep`` if it is still the current endpoint."""
        with self._lock:
            if len(self._eps) > 1 and self._eps[self._current] is ep:
                self._current = (self._current + 1) % len(self._eps)
                log.info("etcd: switching from %s to %s", ep.address,
                         self._eps[self._current].address)

    def _metadata(self, require_leader: bool = False):
        md = []
        if self._token:
            md.append(("token", self._token))
        if require_leader:
            md.append(("hasleader", "true"))
        return tuple(md) or None

    def _authenticate(self, ep: _Endpoint, timeout: float) -> None:
        """Log in; raises grpc.RpcError. Auth being off is not an error:
        requests then go without a token."""
        try:
            resp = ep.auth.Authenticate(
                etcdrpc.AuthenticateRequest(name=self._user,
                                            password=self._password),
                timeout=timeout)
        except grpc.RpcError as exc:
            if not _auth_not_enabled(exc.details() or ""):
                raise
            if not self._said_no_auth:
                log.info("etcd at %s has auth disabled; using it without "
                         "logging in as %r", ep.address, self._user)
                self._said_no_auth = True
            self._token = None
            return
        self._token = resp.token

    def _refresh_token(self, ep: _Endpoint, stale: str | None,
                       timeout: float) -> None:
        """Log in again, unless another thread already replaced ``stale``.

        Raises grpc.RpcError. Many requests fail together when etcd forgets
        a token; one login serves them all.
        """
        with self._auth_lock:
            if self._token != stale:
                return
            log.info("etcd at %s refused the auth token; logging in again",
                     ep.address)
            self._authenticate(ep, timeout)

    def _connect(self) -> None:
        deadline = time.monotonic() + self._timeout
        last = "no attempt made"
        attempt = 0
        while True:
            for _ in range(len(self._eps)):
                ep = self._endpoint()
                per_try = max(0.05, min(deadline - time.monotonic(), 2.0))
                try:
                    if self._user is not None:
                        self._authenticate(ep, per_try)
                    else:
                        ep.maint.Status(etcdrpc.StatusRequest(),
                                        timeout=per_try)
                    return
                except grpc.RpcError as exc:
                    code, details = exc.code(), exc.details() or ""
                    if not _is_transient(code, details):
                        raise _map_error(code, details, "connect",
                                         ep.address) from None
                    last = f"{ep.address}: {code.name}: {details}"
                    self._failover(ep)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CoordinationUnavailable(
                    f"cannot reach etcd at {self._where()} within "
                    f"{self._timeout:.1f}s (last error: {last}). Is etcd "
                    f"running and is the address right?")
            attempt += 1
            time.sleep(min(remaining, _backoff(attempt, 0.05, 0.5)))

    def _invoke(self, what: str, fn: Callable[[_Endpoint, float, Any], Any],
                timeout: float | None, idempotent: bool = True) -> Any:
        """Run ``fn(endpoint, attempt_timeout, metadata)`` with failover.

        Transient failures move to the next endpoint and retry with
        tenacity's jittered backoff until the deadline. Non-idempotent calls
        retry only when the failure proves nothing was applied.
        """
        total = self._timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + total
        logins = 0

        def attempt() -> Any:
            nonlocal logins
            ep = self._endpoint()
            remaining = deadline - time.monotonic()
            if idempotent and len(self._eps) > 1:
                # A proposal forwarded to a leader that just died is lost,
                # not rejected: cap each try so another member gets a turn.
                per_try = min(remaining, max(1.0, total / 3))
            else:
                per_try = remaining
            token = self._token
            try:
                started = time.monotonic()
                result = fn(ep, max(0.05, per_try), self._metadata())
                if self.on_round_trip is not None:
                    self.on_round_trip(what, time.monotonic() - started)
                return result
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
                release_stream_error(exc)    # each path below raises anew
                if (self._user is not None and logins < _MAX_LOGINS_PER_CALL
                        and _token_stale(details)):
                    # Refused before anything was applied: safe to retry
                    # even a transaction.
                    logins += 1
                    self._login_again(ep, token, remaining)
                    raise _Transient(code, details, ep.address) from None
                if not _is_transient(code, details):
                    raise _map_error(code, details, what, ep.address) from None
                self._failover(ep)
                if not idempotent and not _never_applied(code, details):
                    raise CoordinationUnavailable(
                        f"etcd {what} at {ep.address} failed with "
                        f"{code.name}: {details}; the request may or may not "
                        f"have been applied (re-read before retrying)",
                        outcome_unknown=True) from None
                raise _Transient(code, details, ep.address) from None

        def before_sleep(state: tenacity.RetryCallState) -> None:
            sleep = state.next_action.sleep if state.next_action else 0.0
            log.warning("etcd %s failed (%s); retry %d in %.2fs", what,
                        state.outcome.exception(), state.attempt_number,
                        sleep)

        base_wait = tenacity.wait_random_exponential(multiplier=0.05, max=1.0)
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Transient),
            stop=lambda state: time.monotonic() >= deadline - 0.02,
            wait=lambda state: min(base_wait(state),
                                   max(0.0, deadline - time.monotonic())),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return retrying(attempt)
        except _Transient as exc:
            raise CoordinationUnavailable(
                f"etcd {what} failed: no endpoint of {self._where()} answered "
                f"within {total:.1f}s (last error: {exc})") from None

    def _login_again(self, ep: _Endpoint, stale: str | None,
                     remaining: float) -> None:
        """Refresh the token for a refused request; errors as _invoke raises
        them (a login that cannot reach etcd is worth another try)."""
        try:
            self._refresh_token(ep, stale, max(0.05, remaining))
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if _is_transient(code, details):
                self._failover(ep)
                raise _Transient(code, details, ep.address) from None
            raise _map_error(code, details, "authenticate", ep.address) from None

    # -- key/value ------------------------------------------------------

    def get(self, key: str | bytes, *, timeout: float | None = None
            ) -> tuple[bytes | None, int]:
        """``(value, mod_revision)``; ``(None, 0)`` when the key is missing,
        so the revision can feed ``ModRevisionEquals`` directly."""
        req = etcdrpc.RangeRequest(key=_kb(key))
        resp = self._invoke(
            "get", lambda ep, t, md: ep.kv.Range(req, timeout=t, metadata=md),
            timeout)
        if not resp.kvs:
            return None, 0
        kv = resp.kvs[0]
        return self._open(kv.key, kv.value), kv.mod_revision

    def get_prefix(self, prefix: str | bytes, *,
                   timeout: float | None = None, end: str | bytes | None = None
                   ) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix``, sorted, read at one revision.

        Returns the items and that revision, which is where a watch that
        follows this listing must start (revision + 1). Large prefixes are
        read in pages pinned to the first page's revision. With ``end``,
        only the keys from ``prefix`` up to (not including) ``end``.
        """
        start = _kb(prefix, "prefix")
        end = _range_end(start, end)
        for _ in range(3):
            items: list[KeyValue] = []
            revision = 0
            key = start
            try:
                while True:
                    req = etcdrpc.RangeRequest(key=key, range_end=end,
                                               limit=_PAGE_SIZE,
                                               revision=revision)
                    resp = self._invoke(
                        "get_prefix",
                        lambda ep, t, md, req=req: ep.kv.Range(
                            req, timeout=t, metadata=md),
                        timeout)
                    if revision == 0:
                        revision = resp.header.revision
                    for kv in resp.kvs:
                        value = self._open(kv.key, kv.value)
                        if value is not None:
                            items.append(KeyValue(_ks(kv.key), value, kv.mod_revision))
                    if not resp.more or not resp.kvs:
                        return items, revision
                    key = resp.kvs[-1].key + b"\0"
            except CompactedError:
                log.info("etcd: revision %d compacted while paging %r; "
                         "re-reading", revision, prefix)
        raise CoordinationError(f"could not list {prefix!r} consistently: "
                                f"the store was compacted during every try")

    def put(self, key: str | bytes, value: bytes | str,
            lease: int | None = None, *, timeout: float | None = None) -> int:
        """Write ``key``; returns the store revision of the write."""
        req = etcdrpc.PutRequest(key=_kb(key), value=self._sealed(key, value),
                                 lease=_lease_id(lease))
        resp = self._invoke(
            "put", lambda ep, t, md: ep.kv.Put(req, timeout=t, metadata=md),
            timeout)
        return resp.header.revision

    def delete(self, key: str | bytes, *, timeout: float | None = None
               ) -> bool:
        """Delete one key; True if it existed."""
        req = etcdrpc.DeleteRangeRequest(key=_kb(key))
        resp = self._invoke(
            "delete",
            lambda ep, t, md: ep.kv.DeleteRange(req, timeout=t, metadata=md),
            timeout)
        return resp.deleted > 0

    def delete_prefix(self, prefix: str | bytes, *,
                      timeout: float | None = None) -> int:
        """Delete every key under ``prefix``; returns how many."""
        start = _kb(prefix, "prefix")
        if not start:
            raise ValueError("refusing to delete_prefix('') (the whole store)")
        req = etcdrpc.DeleteRangeRequest(key=start, range_end=_prefix_end(start))
        resp = self._invoke(
            "delete_prefix",
            lambda ep, t, md: ep.kv.DeleteRange(req, timeout=t, metadata=md),
            timeout)
        return resp.deleted

    def put_if_absent(self, key: str | bytes, value: bytes | str,
                      lease: int | None = None, *,
                      timeout: float | None = None) -> bool:
        """Create ``key`` only if it does not exist; True if this call did."""
        return self.txn([KeyMissing(key)], [Put(key, value, lease)],
                        timeout=timeout).succeeded

    # -- record seals ---------------------------------------------------

    def _sealed(self, key, value) -> bytes:
        value = _vb(value)
        return value if self.seal is None else self.seal.seal(_kb(key), value)

    def _open(self, key, raw: bytes) -> bytes | None:
        return raw if self.seal is None else self.seal.open(_kb(key), raw)

    # -- transactions ---------------------------------------------------

    def _compare_msg(self, c) -> etcdrpc.Compare:
        if isinstance(c, KeyMissing):
            return etcdrpc.Compare(key=_kb(c.key),
                                   target=etcdrpc.Compare.CREATE,
                                   result=etcdrpc.Compare.EQUAL,
                                   create_revision=0)
        if isinstance(c, ModRevisionEquals):
            if not isinstance(c.revision, int) or c.revision < 0:
                raise ValueError(f"ModRevisionEquals.revision must be an int "
                                 f">= 0, got {c.revision!r}")
            return etcdrpc.Compare(key=_kb(c.key), target=etcdrpc.Compare.MOD,
                                   result=etcdrpc.Compare.EQUAL,
                                   mod_revision=c.revision)
        if isinstance(c, ValueEquals):
            return etcdrpc.Compare(key=_kb(c.key),
                                   target=etcdrpc.Compare.VALUE,
                                   result=etcdrpc.Compare.EQUAL,
                                   value=self._sealed(c.key, c.value))
        raise TypeError(f"compares must be KeyMissing, ModRevisionEquals or "
                        f"ValueEquals; got {type(c).__name__}")

    def _op_msg(self, op) -> etcdrpc.RequestOp:
        if isinstance(op, Put):
            return etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(
                key=_kb(op.key), value=self._sealed(op.key, op.value),
                lease=_lease_id(op.lease)))
        if isinstance(op, Delete):
            return etcdrpc.RequestOp(request_delete_range=
                                     etcdrpc.DeleteRangeRequest(
                                         key=_kb(op.key)))
        if isinstance(op, Get):
            return etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(
                key=_kb(op.key)))
        raise TypeError(f"transaction ops must be Put, Delete or Get; got "
                        f"{type(op).__name__}")

    def _op_result(self, resp) -> Any:
        kind = resp.WhichOneof("response")
        if kind == "response_put":
            return None
        if kind == "response_delete_range":
            return resp.response_delete_range.deleted
        if kind == "response_range":
            kvs = resp.response_range.kvs
            return ((self._open(kvs[0].key, kvs[0].value), kvs[0].mod_revision) if kvs
                    else (None, 0))
        return resp

    def txn(self, compares: Iterable, success: Iterable,
            failure: Iterable = (), *, timeout: float | None = None
            ) -> TxnResult:
        """Atomically: if every compare holds run ``success``, else
        ``failure``. At most :data:`MAX_TXN_OPS` compares + ops in total."""
        compares, success, failure = list(compares), list(success), \
            list(failure)
        total = len(compares) + len(success) + len(failure)
        if total > MAX_TXN_OPS:
            raise TxnTooLargeError(
                f"transaction has {total} compares+ops ({len(compares)} "
                f"compares, {len(success)} success ops, {len(failure)} "
                f"failure ops); etcd allows at most {MAX_TXN_OPS}. Split it, "
                f"or guard the pieces with a single version key.")
        req = etcdrpc.TxnRequest(
            compare=[self._compare_msg(c) for c in compares],
            success=[self._op_msg(o) for o in success],
            failure=[self._op_msg(o) for o in failure])
        resp = self._invoke(
            "txn", lambda ep, t, md: ep.kv.Txn(req, timeout=t, metadata=md),
            timeout, idempotent=False)
        return TxnResult(resp.succeeded,
                         [self._op_result(r) for r in resp.responses],
                         resp.header.revision)

    # -- leases ---------------------------------------------------------

    def _grant(self, ttl: int, timeout: float | None) -> tuple[int, int]:
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
            raise ValueError(f"lease ttl must be an int >= 1 second, got "
                             f"{ttl!r}")
        req = etcdrpc.LeaseGrantRequest(TTL=ttl)
        # A retried grant can leave an orphan lease; it holds no keys and
        # expires on its own, so retrying is harmless.
        resp = self._invoke(
            "grant_lease",
            lambda ep, t, md: ep.lease.LeaseGrant(req, timeout=t, metadata=md),
            timeout)
        if resp.error:
            raise CoordinationError(f"etcd refused a lease of {ttl}s: "
                                    f"{resp.error}")
        return resp.ID, resp.TTL

    def grant_lease(self, ttl: int, *, timeout: float | None = None) -> int:
        """Grant a lease of ``ttl`` seconds (etcd may round small TTLs up);
        returns its id. Keys put with it vanish when it expires."""
        return self._grant(ttl, timeout)[0]

    def revoke_lease(self, lease_id: int, *, timeout: float | None = None
                     ) -> bool:
        """Revoke a lease, deleting its keys; False if it was already gone."""
        req = etcdrpc.LeaseRevokeRequest(ID=lease_id)
        try:
            self._invoke(
                "revoke_lease",
                lambda ep, t, md: ep.lease.LeaseRevoke(req, timeout=t,
                                                       metadata=md),
                timeout)
        except LeaseNotFoundError:
            return False
        return True

    def refresh_lease(self, lease_id: int, *, timeout: float | None = None
                      ) -> int:
        """Send one keep-alive; returns the renewed TTL, 0 if the lease is
        gone."""
        req = etcdrpc.LeaseKeepAliveRequest(ID=lease_id)

        def once(ep: _Endpoint, t: float, md) -> int:
            call = ep.lease.LeaseKeepAlive(iter((req,)), timeout=t,
                                           metadata=md)
            try:
                for resp in call:
                    return resp.TTL
            finally:
                call.cancel()
            raise _Transient(grpc.StatusCode.UNAVAILABLE,
                             "keep-alive stream closed without an answer",
                             ep.address)

        try:
            return self._invoke("refresh_lease", once, timeout)
        except LeaseNotFoundError:
            return 0

    def lease_ttl(self, lease_id: int, *, timeout: float | None = None
                  ) -> int:
        """Remaining TTL in seconds; -1 if the lease does not exist."""
        req = etcdrpc.LeaseTimeToLiveRequest(ID=lease_id)
        resp = self._invoke(
            "lease_ttl",
            lambda ep, t, md: ep.lease.LeaseTimeToLive(req, timeout=t,
                                                       metadata=md),
            timeout)
        return resp.TTL

    # -- watches --------------------------------------------------------

    def watch_prefix(self, prefix: str | bytes, start_revision: int,
                     on_events: Callable[[list[Event]], None],
                     on_reset: Callable[[list[KeyValue], int], None] | None
                     = None, *, end: str | bytes | None = None) -> "WatchHandle":
        """Deliver every change under ``prefix`` from ``start_revision`` on
        (with ``end``, to the keys from ``prefix`` up to ``end``, as
        :meth:`get_prefix` lists them).

        ``on_events(batch)`` runs on the Coordinator's watch thread (shared
        by its watches, so it must not block for long), in revision order. If history before the resume point was compacted, the prefix is
        re-listed at one revision ``R`` and ``on_reset(items, R)`` replaces
        the caller's state; events continue from ``R + 1``. Without
        ``on_reset`` such a watch stops and records a :class:`CompactedError`
        in ``handle.error``.
        """
        if isinstance(start_revision, bool) or not isinstance(
                start_revision, int) or start_revision < 1:
            raise ValueError(f"start_revision must be an int >= 1 (use the "
                             f"revision from get_prefix() + 1); got "
                             f"{start_revision!r}")
        start = _kb(prefix, "prefix")
        handle = WatchHandle(self, start, start_revision, on_events, on_reset,
                             end=_range_end(start, end))
        handle._start()
        return handle

    # -- lifecycle ------------------------------------------------------

    def _close_channels(self) -> None:
        for ep in self._eps:
            try:
                ep.channel.close()
            except Exception:  # closing is best effort
                pass

    def close(self) -> None:
        """Cancel watches, stop lease keepers (without revoking, so the
        leases simply expire) and close the channels."""
        if self._closed:
            return
        self._watch_stream.close()
        for keeper in list(self._keepers):
            keeper.stop(revoke=False)
        self._closed = True
        self._close_channels()

    def __enter__(self) -> "Coordinator":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Coordinator({self.endpoints!r})"
