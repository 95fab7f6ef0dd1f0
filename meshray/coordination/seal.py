"""Signed etcd records: a value in etcd counts only if a member wrote it.

etcd is inside the trust boundary but not trusted on its own: whoever can
write a key there (a leaked etcd credential, a misconfigured operator etcd,
a backup restored from elsewhere) could otherwise advertise a fake node that
receives spilled work, or a fake actor address that callers dial. So every
value a meshray member writes is sealed with an HMAC over the key and the
value under a key derived from the cluster secret, and every value read is
checked; one that fails is treated as absent and logged with its key.

Binding the etcd key into the MAC stops a valid record from being copied to
another key (node A's record under node B's id). Stale records replayed at
their own key are not caught here; they are harmless beyond a denial of
service, because a peer is then dialled at an address that must still prove
membership on every call (see :mod:`meshray.rpc.auth`).

Format: ``b"\\x00msr1" + HMAC-SHA256(key_record, etcd_key + b"\\x00" + value)
+ value``. The leading NUL byte can never start a JSON record, so an unsealed
value is recognised as such, not misparsed. Sealing is deterministic, so a
``ValueEquals`` compare is sealed the same way and still matches.

Alternatives: per-node signing keys (Ed25519) would let a node's records be
told apart from another member's, but every member already holds the one
secret that runs code everywhere, so they would add key distribution and no
protection; etcd's own auth keeps non-members from writing at all and is
turned on too (the embedded etcd runs with users).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time

__all__ = ["RecordSeal"]

log = logging.getLogger(__name__)

_MAGIC = b"\x00msr1"
_MAC_LEN = 32
_LOG_EVERY_S = 10.0


class RecordSeal:
    """Seals values written to etcd and opens (verifies) values read back."""

    def __init__(self, key: bytes):
        if not isinstance(key, bytes) or len(key) < 16:
            raise ValueError("record key must be at least 16 bytes (derive it from the "
                             "cluster token with meshray.security.derive_key(token, 'records'))")
        self._key = key
        self._lock = threading.Lock()
        self._last_logged: dict[bytes, float] = {}
        self.refused = 0

    def _mac(self, key: bytes, value: bytes) -> bytes:
        return hmac.new(self._key, key + b"\x00" + value, hashlib.sha256).digest()

    def seal(self, key: bytes, value: bytes) -> bytes:
        return _MAGIC + self._mac(key, value) + value

    def open(self, key: bytes, sealed: bytes) -> bytes | None:
        """The value a member wrote at `key`, or None (logged) for anything else."""
        sealed = bytes(sealed)
        if not sealed.startswith(_MAGIC) or len(sealed) < len(_MAGIC) + _MAC_LEN:
            self._refuse(key, "it is not signed")
            return None
        mac = sealed[len(_MAGIC):len(_MAGIC) + _MAC_LEN]
        value = sealed[len(_MAGIC) + _MAC_LEN:]
        if not hmac.compare_digest(mac, self._mac(key, value)):
            self._refuse(key, "its signature does not match (not written by a member of "
                              "this cluster, or moved from another key)")
            return None
        return value

    def _refuse(self, key: bytes, why: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.refused += 1
            last = self._last_logged.get(key)
            if last is not None and now - last < _LOG_EVERY_S:
                return
            if len(self._last_logged) > 10_000:
                self._last_logged.clear()
            self._last_logged[key] = now
        log.warning("refused etcd record %s: %s; treating it as absent",
                    key.decode("utf-8", "replace"), why)
