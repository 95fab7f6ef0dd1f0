"""meshray's etcd client: the only module that talks to etcd over the wire.

Everything above this layer (node daemon, actor directory, placement groups)
uses :class:`Coordinator` and the small value types defined here, never a
third-party client, so the client library can be swapped without touching
them. Today the wire layer is the etcd v3 gRPC API through the generated stubs
shipped by ``etcd-sdk-python`` (module ``pyetcd.etcdrpc``); channel management,
failover, deadlines, retries and watch resumption are done here because the
meshray failure model (DESIGN.md §2, §7) needs guarantees pyetcd's high-level
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
  continue from there — they never skip an event.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import grpc
import tenacity
from pyetcd import etcdrpc
from pyetcd.etcdrpc import kv_pb2

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

MAX_TXN_OPS = 128
"""etcd's default ``--max-txn-ops``. meshray counts compares and both branches
together, which is stricter than etcd (it limits each list separately) and so
stays valid if a server is configured a little lower."""

_DEFAULT_PORT = 2379
_PAGE_SIZE = 2000
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    # Detect a dead peer under a quiet watch; etcd accepts pings >= 5 s apart
    # while a stream is open and rejects them when none is.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect to a restarted member within ~1 s, not grpc's default 120 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


# --------------------------------------------------------------------------
# Errors


class CoordinationError(Exception):
    """Base of every error this module raises."""


class CoordinationUnavailable(CoordinationError, ConnectionError):
    """etcd could not be reached, had no leader, or did not answer in time.

    ``outcome_unknown`` is True when a state-changing request may or may not
    have been applied; the caller must re-read before acting on either
    assumption.
    """

    def __init__(self, message: str, *, outcome_unknown: bool = False):
        super().__init__(message)
        self.outcome_unknown = outcome_unknown


class InvalidRequestError(CoordinationError, ValueError):
    """etcd rejected the request as malformed (e.g. a key put twice in one
    transaction branch)."""


class RequestTooLargeError(InvalidRequestError):
    """A request exceeded etcd's size limit (``--max-request-bytes``, 1.5 MiB
    by default). meshray values belong well below 64 KiB; big data goes
    through the object store."""


class TxnTooLargeError(InvalidRequestError):
    """A transaction has more than :data:`MAX_TXN_OPS` compares plus ops."""


class QuotaExceededError(CoordinationError):
    """etcd's backend is full (NOSPACE alarm); writes fail until an operator
    compacts, defragments and disarms the alarm."""


class LeaseNotFoundError(CoordinationError):
    """The lease expired or was revoked."""


class CompactedError(CoordinationError):
    """The requested revision has been compacted away."""

    def __init__(self, message: str, compact_revision: int = 0):
        super().__init__(message)
        self.compact_revision = compact_revision


class AuthError(CoordinationError, PermissionError):
    """Authentication failed or the user lacks permission for the key."""


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


@dataclass(frozen=True)
class KeyMissing:
    key: str | bytes


@dataclass(frozen=True)
class ModRevisionEquals:
    """True when ``key``'s last modification is ``revision`` (0: missing)."""

    key: str | bytes
    revision: int


@dataclass(frozen=True)
class ValueEquals:
    """True when ``key`` exists and holds exactly ``value``."""

    key: str | bytes
    value: bytes | str


@dataclass(frozen=True)
class Put:
    key: str | bytes
    value: bytes | str
    lease: int | None = None


@dataclass(frozen=True)
class Delete:
    key: str | bytes


@dataclass(frozen=True)
class Get:
    key: str | bytes


@dataclass(frozen=True)
class TxnResult:
    """Outcome of :meth:`Coordinator.txn`.

    ``responses`` has one entry per op of the branch that ran: ``None`` for
    Put, the number of deleted keys for Delete, ``(value | None,
    mod_revision)`` for Get. ``revision`` is the store revision after the
    transaction.
    """

    succeeded: bool
    responses: list[Any] = field(default_factory=list)
    revision: int = 0


_Compare = (KeyMissing, ModRevisionEquals, ValueEquals)
_Op = (Put, Delete, Get)


# --------------------------------------------------------------------------
# Helpers


def _kb(key: str | bytes, what: str = "key") -> bytes:
    if isinstance(key, str):
        return key.encode("utf-8", "surrogateescape")
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    raise TypeError(f"{what} must be str or bytes, got {type(key).__name__}")


def _ks(key: bytes) -> str:
    return key.decode("utf-8", "surrogateescape")


def _vb(value: bytes | str, what: str = "value") -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"{what} must be bytes or str, got "
                    f"{type(value).__name__}")


def _lease_id(lease: int | None) -> int:
    if lease is None:
        return 0
    if isinstance(lease, bool) or not isinstance(lease, int):
        raise TypeError(f"lease must be an int lease id or None, got "
                        f"{type(lease).__name__}")
    return lease


def _prefix_end(prefix: bytes) -> bytes:
    """Smallest key greater than every key that starts with ``prefix``."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\0"  # etcd: "all keys >= key"
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


def _parse_endpoint(text: str) -> tuple[str, bool]:
    """``host:port`` / ``http://`` / ``https://`` / ``etcd://`` -> (netloc,
    secure)."""
    raw = text.strip()
    secure = False
    for scheme, is_secure in (("https://", True), ("http://", False),
                              ("etcds://", True), ("etcd://", False)):
        if raw.lower().startswith(scheme):
            raw, secure = raw[len(scheme):], is_secure
            break
    raw = raw.rstrip("/")
    if not raw or "/" in raw:
        raise ValueError(f"etcd endpoint must look like HOST:PORT, "
                         f"http://HOST:PORT or etcd://HOST:PORT; got {text!r}")
    if raw.startswith("["):  # IPv6 literal
        if "]:" not in raw:
            raw = f"{raw}:{_DEFAULT_PORT}"
    elif ":" not in raw:
        raw = f"{raw}:{_DEFAULT_PORT}"
    port = raw.rsplit(":", 1)[1]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"etcd endpoint {text!r} has an invalid port "
                         f"{port!r}")
    return raw, secure


def _read_file(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path!r}: {exc}") from exc


_NOT_SENT_MARKERS = (
    "failed to connect", "connection refused", "no leader", "not capable",
    "unhealthy cluster", "too many requests", "dns resolution failed",
    "name resolution", "channel closed",
)


def _is_transient(code: grpc.StatusCode, details: str) -> bool:
    if code in (grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED):
        return True
    return (code == grpc.StatusCode.RESOURCE_EXHAUSTED
            and "too many requests" in details)


def _never_applied(code: grpc.StatusCode, details: str) -> bool:
    """True only when the error proves etcd did not apply the request."""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return False
    low = details.lower()
    return any(marker in low for marker in _NOT_SENT_MARKERS)


def _map_error(code: grpc.StatusCode, details: str, what: str,
               where: str) -> CoordinationError:
    low = details.lower()
    prefix = f"etcd {what} at {where} failed"
    if "request is too large" in low or "larger than max" in low:
        return RequestTooLargeError(
            f"{prefix}: request too large ({details}). etcd limits requests "
            f"to --max-request-bytes (1.5 MiB by default); keep meshray "
            f"values small and send data through the object store.")
    if "too many operations in txn" in low:
        return TxnTooLargeError(
            f"{prefix}: the server's --max-txn-ops is lower than this "
            f"transaction ({details}); split it.")
    if "database space exceeded" in low or "nospace" in low:
        return QuotaExceededError(
            f"{prefix}: etcd storage quota exceeded ({details}). An operator "
            f"must compact, defragment and `etcdctl alarm disarm`, or raise "
            f"--quota-backend-bytes.")
    if code == grpc.StatusCode.NOT_FOUND and "lease" in low:
        return LeaseNotFoundError(f"{prefix}: {details}")
    if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in low:
        return CompactedError(f"{prefix}: {details}")
    if code in (grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED) or "authentication" in low \
            or "user name is empty" in low:
        return AuthError(f"{prefix}: {details}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(f"{prefix}: {details}")
    if _is_transient(code, details):
        return CoordinationUnavailable(f"{prefix}: {code.name}: {details}")
    return CoordinationError(f"{prefix}: {code.name}: {details}")


class _Transient(Exception):
    """Internal: one attempt failed in a way worth retrying elsewhere."""

    def __init__(self, code: grpc.StatusCode, details: str, where: str):
        super().__init__(f"{code.name}: {details} ({where})")
        self.code, self.details, self.where = code, details, where


def _backoff(attempt: int, base: float = 0.05, cap: float = 1.0) -> float:
    """Full-jitter exponential backoff for the long-running loops (watch,
    lease keeper), matching what tenacity does for single calls."""
    return random.uniform(0, min(cap, base * (2 ** min(attempt, 16))))


class _Endpoint:
    __slots__ = ("address", "channel", "kv", "lease", "watch", "maint", "auth")

    def __init__(self, address: str, creds: grpc.ChannelCredentials | None):
        self.address = address
        if creds is None:
            self.channel = grpc.insecure_channel(address, _CHANNEL_OPTIONS)
        else:
            self.channel = grpc.secure_channel(address, creds,
                                               _CHANNEL_OPTIONS)
        self.kv = etcdrpc.KVStub(self.channel)
        self.lease = etcdrpc.LeaseStub(self.channel)
        self.watch = etcdrpc.WatchStub(self.channel)
        self.maint = etcdrpc.MaintenanceStub(self.channel)
        self.auth = etcdrpc.AuthStub(self.channel)


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
                 password: str | None = None):
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
        self._user, self._password = user, password
        self._token: str | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._eps = [_Endpoint(addr, creds) for addr, _ in parsed]
        self._current = random.randrange(len(self._eps))
        self._watches: weakref.WeakSet[WatchHandle] = weakref.WeakSet()
        self._keepers: weakref.WeakSet[LeaseKeeper] = weakref.WeakSet()
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
        resp = ep.auth.Authenticate(
            etcdrpc.AuthenticateRequest(name=self._user,
                                        password=self._password),
            timeout=timeout)
        self._token = resp.token

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
        reauthenticated = False

        def attempt() -> Any:
            nonlocal reauthenticated
            ep = self._endpoint()
            remaining = deadline - time.monotonic()
            if idempotent and len(self._eps) > 1:
                # A proposal forwarded to a leader that just died is lost,
                # not rejected: cap each try so another member gets a turn.
                per_try = min(remaining, max(1.0, total / 3))
            else:
                per_try = remaining
            try:
                return fn(ep, max(0.05, per_try), self._metadata())
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if (code == grpc.StatusCode.UNAUTHENTICATED
                        and self._user is not None and not reauthenticated
                        and "invalid auth token" in details):
                    reauthenticated = True
                    self._authenticate(ep, max(0.05, remaining))
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
        return kv.value, kv.mod_revision

    def get_prefix(self, prefix: str | bytes, *,
                   timeout: float | None = None
                   ) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix``, sorted, read at one revision.

        Returns the items and that revision, which is where a watch that
        follows this listing must start (revision + 1). Large prefixes are
        read in pages pinned to the first page's revision.
        """
        start = _kb(prefix, "prefix")
        end = _prefix_end(start)
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
                    items.extend(KeyValue(_ks(kv.key), kv.value,
                                          kv.mod_revision) for kv in resp.kvs)
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
        req = etcdrpc.PutRequest(key=_kb(key), value=_vb(value),
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

    # -- transactions ---------------------------------------------------

    @staticmethod
    def _compare_msg(c) -> etcdrpc.Compare:
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
                                   value=_vb(c.value))
        raise TypeError(f"compares must be KeyMissing, ModRevisionEquals or "
                        f"ValueEquals; got {type(c).__name__}")

    @staticmethod
    def _op_msg(op) -> etcdrpc.RequestOp:
        if isinstance(op, Put):
            return etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(
                key=_kb(op.key), value=_vb(op.value),
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

    @staticmethod
    def _op_result(resp) -> Any:
        kind = resp.WhichOneof("response")
        if kind == "response_put":
            return None
        if kind == "response_delete_range":
            return resp.response_delete_range.deleted
        if kind == "response_range":
            kvs = resp.response_range.kvs
            return (kvs[0].value, kvs[0].mod_revision) if kvs else (None, 0)
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
                     = None) -> "WatchHandle":
        """Deliver every change under ``prefix`` from ``start_revision`` on.

        ``on_events(batch)`` runs on the watch's own thread, in revision
        order. If history before the resume point was compacted, the prefix is
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
        handle = WatchHandle(self, _kb(prefix, "prefix"), start_revision,
                             on_events, on_reset)
        self._watches.add(handle)
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
        for handle in list(self._watches):
            handle.cancel()
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
                batch.append(Event("put", _ks(kv.key), kv.value,
                                   kv.mod_revision))
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
                        raise CoordinationError(
                            f"etcd refused watch on {_ks(self._prefix)!r}: "
                            f"{resp.cancel_reason}")
                    self._established.set()
                    self._failures = 0
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
                    if code == grpc.StatusCode.UNAUTHENTICATED and \
                            self._coord._user is not None:
                        try:
                            self._coord._authenticate(ep, self._coord.timeout)
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


# --------------------------------------------------------------------------
# Leases


class LeaseKeeper:
    """Hold a lease alive from a daemon thread; report its loss exactly once.

    A node's membership is its lease (DESIGN.md §2): when the keeper can no
    longer vouch for the lease — etcd says it is gone, or no refresh has
    succeeded for a whole TTL so it must be assumed expired — it calls
    ``on_lost(lease_id)`` once and stops. The owner then stops acting as a
    member and registers again under a new lease.
    """

    def __init__(self, coordinator: Coordinator, ttl: int,
                 on_lost: Callable[[int], None] | None = None):
        self._coord = coordinator
        granted_at = time.monotonic()
        self.lease_id, self.ttl = coordinator._grant(ttl, None)
        self._on_lost = on_lost
        # Conservative: the server's clock started before our request left.
        self._expires_at = granted_at + self.ttl
        self._stopped = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(
            target=self._run, daemon=True,
            name=f"meshray-lease-{self.lease_id:x}")
        coordinator._keepers.add(self)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """True while the lease is believed valid and kept."""
        return not (self._lost.is_set() or self._stopped.is_set())

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    @property
    def expires_at(self) -> float:
        """CLOCK_MONOTONIC time until which the lease is certainly valid (0 once lost)."""
        return 0.0 if self._lost.is_set() else self._expires_at

    def _declare_lost(self, why: str) -> None:
        if self._lost.is_set():
            return
        self._lost.set()
        log.warning("lease %x lost: %s", self.lease_id, why)
        if self._on_lost is not None:
            try:
                self._on_lost(self.lease_id)
            except Exception:
                log.exception("lease %x: on_lost callback failed",
                              self.lease_id)

    def _run(self) -> None:
        interval = max(self.ttl / 3.0, 0.1)
        wait_s = interval
        failures = 0
        while not self._stopped.wait(wait_s):
            sent = time.monotonic()
            budget = max(0.2, min(interval, self._expires_at - sent))
            try:
                ttl = self._coord.refresh_lease(self.lease_id, timeout=budget)
            except CoordinationError as exc:
                if self._stopped.is_set():
                    return
                failures += 1
                now = time.monotonic()
                if now >= self._expires_at:
                    self._declare_lost(f"no successful refresh for a whole "
                                       f"TTL ({self.ttl}s); last error: {exc}")
                    return
                wait_s = min(_backoff(failures, 0.1, interval),
                             max(0.0, self._expires_at - now))
                log.warning("lease %x refresh failed (%s); retrying in "
                            "%.2fs, expires in %.1fs", self.lease_id, exc,
                            wait_s, self._expires_at - now)
                continue
            if self._stopped.is_set():
                return
            if ttl <= 0:
                self._declare_lost("etcd reports it expired or revoked")
                return
            failures = 0
            self._expires_at = sent + ttl
            wait_s = min(interval, ttl / 3.0)

    def stop(self, revoke: bool = True, timeout: float | None = None) -> None:
        """Stop refreshing; with ``revoke`` also revoke the lease now so its
        keys disappear immediately instead of after the TTL."""
        self._stopped.set()
        if threading.current_thread() is not self._thread and \
                self._thread.is_alive():
            self._thread.join(timeout if timeout is not None
                              else self._coord.timeout)
        if revoke and not self._lost.is_set() and not self._coord._closed:
            try:
                self._coord.revoke_lease(self.lease_id, timeout=timeout)
            except CoordinationError as exc:
                log.warning("lease %x: revoke failed (%s); it will expire in "
                            "at most %ss", self.lease_id, exc, self.ttl)

    def __enter__(self) -> "LeaseKeeper":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
