"""Membership proofs on every call: both ends show they know the cluster
secret, and neither ever sends it.

Why not a bearer token: a caller that presents the secret itself hands it to
whoever answers at the address it dialled, and meshray dials addresses it
reads from etcd and from files. One forged record was enough to collect the
token and run code everywhere. With proofs, a caller sends a MAC that is
worth nothing anywhere else, and reads no reply from a server that has not
proved membership too.

The exchange, per call (all MACs HMAC-SHA256, keys derived from the secret
under distinct labels, so a value made for one use is useless for another):

* the caller sends ``meshray-auth: v1.<ms>.<nonce>.<mac>`` and
  ``meshray-target: <address it dialled>``, where
  ``mac = HMAC(K_call, v1|ms|nonce|method|target)``;
* the server accepts the call only if the MAC is right, the target is one of
  its own addresses (so a proof collected by an impostor at another address
  cannot be relayed to a real member), the time is within the allowed clock
  skew and the nonce was not seen in that window (no replay); it checks all
  of this on metadata, before any request byte is read;
* the server's first act in an accepted call is to send
  ``meshray-proof: HMAC(K_answer, mac)`` as initial metadata, and the
  caller's channel checks it before the application sees any response
  message (so nothing a non-member sends is ever unpickled).

Before the first call with a payload on a channel, the channel sends an
empty ``/meshray.Auth/Hello`` call and checks the proof, so a request body
(a pickled function, arguments) is not sent to an address that has not
proved membership. A channel may reconnect to another process later (the
member died and something else took its port): the per-call proof still
guards replies, and the impostor learns nothing reusable from the requests.

Alternatives considered: mutual TLS with certificates issued at cluster
creation gives channel binding too, but needs a CA and key distribution for
every joining node and costs every byte on loopback (1 GiB transfers); it
stays available as an extra layer (``MESHRAY_TLS_*``). A per-connection
handshake with session keys is what TLS is; per-call MACs cost ~2 µs per
call, and meshray's hot paths are long-lived streams.

What safety rests on: the secret's entropy (256 random bits), HMAC-SHA256,
and each server knowing the addresses it is dialled at (its bound and
advertised addresses, registered with :func:`accept_targets`). Without TLS a
network eavesdropper still sees payloads; replaying a proof with another
payload fails on the nonce cache.
"""
from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import os
import threading
import time
from urllib.parse import quote, unquote

import grpc

__all__ = [
    "AUTH_METADATA_KEY",
    "HELLO_METHOD",
    "PROOF_METADATA_KEY",
    "TARGET_METADATA_KEY",
    "CallSigner",
    "MembershipError",
    "ProofChecker",
    "derive_key",
    "link_keys",
    "link_mac",
]

AUTH_METADATA_KEY = "meshray-auth"
TARGET_METADATA_KEY = "meshray-target"
PROOF_METADATA_KEY = "meshray-proof"
HELLO_METHOD = "/meshray.Auth/Hello"
_VERSION = "v1"


def _max_skew_from_env() -> float:
    raw = os.environ.get("MESHRAY_AUTH_MAX_SKEW_S", "300")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 1.0 <= value <= 86400.0:
        raise ValueError(f"MESHRAY_AUTH_MAX_SKEW_S={raw!r} must be a number of seconds "
                         "between 1 and 86400 (default 300)")
    return value


MAX_SKEW_S = _max_skew_from_env()
"""How far a caller's clock may be from the server's. Calls are also bound to
a nonce remembered for this long, so a larger window costs memory only."""
_MAX_REMEMBERED_NONCES = 1_000_000


def derive_key(secret: str, purpose: str) -> bytes:
    """HMAC-SHA256(secret, "meshray/v1/" + purpose): one key per use."""
    return hmac.new(secret.encode("ascii"), b"meshray/v1/" + purpose.encode(),
                    hashlib.sha256).digest()


def link_keys(secret: str | None, use: str) -> tuple[bytes, bytes] | None:
    """The two keys of a plain-socket link's handshake (data link, call and
    session links): (the dialler's, the answerer's); None without a secret."""
    if not secret:
        return None
    return derive_key(secret, f"{use}-call"), derive_key(secret, f"{use}-answer")


def link_mac(key: bytes, data: bytes) -> bytes:
    """A link handshake's proof: HMAC-SHA256 over raw bytes."""
    return hmac.new(key, data, hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _mac(key: bytes, *parts: str) -> str:
    return _b64(hmac.new(key, "|".join(parts).encode("utf-8", "surrogateescape"),
                         hashlib.sha256).digest())


def _metadata_value(metadata, key: str) -> str | None:
    for k, v in metadata or ():
        if k == key:
            return v if isinstance(v, str) else bytes(v).decode("ascii", "replace")
    return None


class MembershipError(grpc.RpcError, grpc.Call):
    """The server answered without proving it belongs to the cluster.

    Raised by channels from :mod:`meshray.rpc.factory` in place of the
    call's result; behaves like an ``UNAUTHENTICATED`` RpcError so callers'
    existing error handling applies.
    """

    def __init__(self, target: str, method: str, why: str):
        super().__init__(f"{target} did not prove cluster membership on {method}: {why}")
        self._details = (f"server at {target} did not prove cluster membership on {method} "
                         f"({why}); nothing it sent was read")

    def code(self):
        return grpc.StatusCode.UNAUTHENTICATED

    def details(self):
        return self._details

    def initial_metadata(self):
        return ()

    def trailing_metadata(self):
        return ()

    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def cancel(self):
        return False

    def add_callback(self, callback):
        return False

    def __str__(self):
        return self._details


class CallSigner:
    """The caller's half: proofs for calls to one target."""

    def __init__(self, secret: str, target: str):
        self.target = target
        self._quoted_target = quote(target, safe=":/[]@.-_")
        self._call_key = derive_key(secret, "call")
        self._answer_key = derive_key(secret, "answer")

    def sign(self, method: str) -> tuple[tuple[str, str], tuple[str, str], str]:
        """(auth pair, target pair, expected server proof) for one call."""
        stamp = str(int(time.time() * 1000))
        nonce = _b64(os.urandom(12))
        mac = _mac(self._call_key, _VERSION, stamp, nonce, method, self.target)
        return ((AUTH_METADATA_KEY, f"{_VERSION}.{stamp}.{nonce}.{mac}"),
                (TARGET_METADATA_KEY, self._quoted_target),
                _mac(self._answer_key, mac))

    def verdict(self, initial_metadata, expected: str) -> str | None:
        """None when the server's proof is right, else why not."""
        sent = _metadata_value(initial_metadata, PROOF_METADATA_KEY)
        if sent is None:
            return "no proof in its answer"
        if not hmac.compare_digest(sent.encode("ascii", "replace"), expected.encode("ascii")):
            return "wrong proof"
        return None


class _NonceWindow:
    """Nonces seen in the last MAX_SKEW_S (both directions), to refuse replays.

    Entries expire in arrival order; a deque of (expiry, nonce) plus a set
    keeps both the check and the pruning O(1) amortised. The bound on entries
    keeps a flood of valid calls (only members can make them) from growing
    memory without limit: past it the oldest are forgotten first.
    """

    def __init__(self, window_s: float):
        self._window = window_s
        self._order: collections.deque = collections.deque()
        self._seen: set = set()
        self._lock = threading.Lock()

    def first_use(self, nonce: str, now: float) -> bool:
        with self._lock:
            while self._order and (self._order[0][0] <= now
                                   or len(self._order) > _MAX_REMEMBERED_NONCES):
                self._seen.discard(self._order.popleft()[1])
            if nonce in self._seen:
                return False
            self._seen.add(nonce)
            # Kept for a window on both sides of the stamp it came with.
            self._order.append((now + 2 * self._window, nonce))
            return True


class ProofChecker:
    """The server's half: is a call's proof good, and what to answer."""

    def __init__(self, secret: str, window_s: float = MAX_SKEW_S):
        self._call_key = derive_key(secret, "call")
        self._answer_key = derive_key(secret, "answer")
        self._window = window_s
        self._targets: set[str] = set()
        self._nonces = _NonceWindow(window_s)

    def accept_targets(self, addresses) -> None:
        """Addresses callers dial this server at ("host:port", "unix:/path")."""
        for address in addresses:
            self._targets.add(address)
            host, _, port = address.rpartition(":")
            if not address.startswith("unix:") and host in ("127.0.0.1", "localhost"):
                self._targets.add(f"127.0.0.1:{port}")
                self._targets.add(f"localhost:{port}")

    @property
    def targets(self) -> frozenset:
        return frozenset(self._targets)

    def check(self, method: str, metadata) -> tuple[str | None, str | None]:
        """(None, proof to send) for a good call, else (why it is refused, None)."""
        header = _metadata_value(metadata, AUTH_METADATA_KEY)
        if header is None:
            return "no membership proof in the call metadata", None
        parts = header.split(".")
        if len(parts) != 4 or parts[0] != _VERSION or not parts[1].isdigit():
            return "malformed membership proof", None
        _version, stamp, nonce, mac = parts
        quoted = _metadata_value(metadata, TARGET_METADATA_KEY)
        if quoted is None:
            return "no target in the call metadata", None
        target = unquote(quoted)
        expected = _mac(self._call_key, _VERSION, stamp, nonce, method, target)
        if not hmac.compare_digest(mac.encode("ascii", "replace"), expected.encode("ascii")):
            return "wrong membership proof (not signed with this cluster's secret)", None
        if target not in self._targets:
            return (f"proof made for {target!r}, which is not this server "
                    f"({', '.join(sorted(self._targets)) or 'no address yet'})"), None
        now = time.time()
        if abs(now - int(stamp) / 1000.0) > self._window:
            return (f"proof is {now - int(stamp) / 1000.0:+.0f}s off this server's clock "
                    f"(allowed: {self._window:.0f}s; MESHRAY_AUTH_MAX_SKEW_S)"), None
        if not self._nonces.first_use(nonce, now):
            return "replayed membership proof", None
        return None, _mac(self._answer_key, mac)
