"""The coordination layer's errors, and how gRPC failures map onto them.

A module of its own so the error types can be imported (and the gRPC status
mapping read) without the whole Coordinator. Every error the coordination
layer raises is a :class:`CoordinationError`; ``client.py`` offers them all.
"""

from __future__ import annotations

import grpc

__all__ = [
    "CoordinationError",
    "CoordinationUnavailable",
    "InvalidRequestError",
    "RequestTooLargeError",
    "TxnTooLargeError",
    "QuotaExceededError",
    "LeaseNotFoundError",
    "CompactedError",
    "AuthError",
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
# Mapping gRPC failures


_NOT_SENT_MARKERS = (
    "failed to connect", "connection refused", "no leader", "not capable",
    "unhealthy cluster", "too many requests", "dns resolution failed",
    "name resolution", "channel closed",
)


# What etcd answers a request whose auth token it no longer knows (simple
# tokens live in memory: a restarted member, or one idle past
# --auth-token-ttl), that carries none while auth is on, or that predates a
# change to users and roles. Each is cured by logging in again.
_STALE_TOKEN_MARKERS = ("invalid auth token", "user name is empty",
                        "revision of auth store is old")


def _token_stale(details: str) -> bool:
    """True when logging in again may make the refused request succeed."""
    low = details.lower()
    return any(marker in low for marker in _STALE_TOKEN_MARKERS)


def _auth_not_enabled(details: str) -> bool:
    """etcd's answer to a login when auth is off: credentials are not
    needed, and etcd's own client carries on without a token."""
    return "authentication is not enabled" in details.lower()


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
