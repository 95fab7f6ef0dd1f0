"""Low-level plumbing shared by the Coordinator, watches and lease keepers:
key/value encoding, endpoint parsing, gRPC channels and backoff.

A module of its own so :mod:`.watch` and :mod:`.leases` can use the same
helpers without importing the Coordinator. Private to the coordination
package.
"""

from __future__ import annotations

import random

import grpc
from pyetcd import etcdrpc

_DEFAULT_PORT = 2379
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


def _range_end(start: bytes, end: str | bytes | None) -> bytes:
    """etcd's range_end for the keys from ``start`` up to ``end``; without
    ``end``, every key that starts with ``start``."""
    if end is None:
        return _prefix_end(start)
    end_b = end.encode() if isinstance(end, str) else bytes(end)
    if end_b <= start:
        raise ValueError(f"end={end!r}: expected a key after the start {start!r}")
    return end_b


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
