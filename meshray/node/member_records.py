"""The decoded contents of one membership prefix (node records or availabilities).

A prefix mirror (coordination/mirror.py) holds raw JSON bytes. Decoding all
of them whenever anything changed cost O(N) per change at each of N nodes,
which is what capped a machine of hollow nodes at about a hundred. Here each
changed key is decoded once, on the watch thread that delivered it, and
readers get the decoded dicts by reference (shallow copies of the mapping):
a record that did not change is the same object as before, so consumers can
also compare by identity.

Values come from etcd, so they are untrusted: a key that does not parse as
the family's key, or a value that is not a JSON object, is left out of the
view (as if absent) and logged once per change.

`take_changes` hands out what changed since it was last called (each
changed id with its value now), so the one consumer that keeps derived
state (the daemon's ClusterView) updates it in O(changes) rather than
copying the whole view at each burst; it is no concern of other readers.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Iterable

from meshray.coordination import keyspace

__all__ = ["DecodedRecords"]

log = logging.getLogger(__name__)

# Values decoded lately, by their bytes, for every DecodedRecords of the
# process. The nodes of one scale-test host each receive every change and
# decode the same bytes (docs/scale.md); a real node decodes each value once
# anyway. Decoding is a pure function of the bytes and the decoded dicts are
# shared read-only already, so sharing them across views changes nothing
# else. Bounded: cleared when full.
_DECODED: dict[bytes, dict] = {}
_DECODED_MAX = 8192


class DecodedRecords:
    """node id hex -> decoded dict, kept current from mirror changes."""

    def __init__(self, parse_key: Callable[[str], str]):
        self._parse_key = parse_key
        self._lock = threading.Condition()
        self._by_node: dict[str, dict] = {}
        self._changed: set[str] = set()
        self.version = 0          # bumped per applied batch (derived caches key on it)

    def apply(self, changes: Iterable) -> None:
        """Apply mirror changes (objects with .key and .new: an Entry or None)."""
        with self._lock:
            for change in changes:
                try:
                    node_hex = self._parse_key(change.key)
                except ValueError:
                    continue
                value = None
                if change.new is not None:
                    value = self._decode(change.key, change.new.value)
                if value is None:
                    self._by_node.pop(node_hex, None)
                else:
                    self._by_node[node_hex] = value
                self._changed.add(node_hex)
            self.version += 1
            self._lock.notify_all()

    def __len__(self) -> int:
        return len(self._by_node)

    def reset(self) -> None:
        """Forget everything (the mirror behind it is being replaced); every
        node known so far counts as changed."""
        with self._lock:
            self._changed.update(self._by_node)
            self._by_node.clear()
            self.version += 1

    @staticmethod
    def _decode(key: str, raw: bytes) -> dict | None:
        raw = bytes(raw)
        known = _DECODED.get(raw)
        if known is not None:
            return known
        try:
            value = keyspace.decode_json(raw)
        except ValueError as exc:      # JSONDecodeError and UnicodeDecodeError
            log.warning("ignoring %s: its value is not JSON (%s)", key, exc)
            return None
        if not isinstance(value, dict):
            log.warning("ignoring %s: expected a JSON object, got %s", key,
                        type(value).__name__)
            return None
        if len(_DECODED) >= _DECODED_MAX:
            _DECODED.clear()
        _DECODED[raw] = value
        return value

    def snapshot(self) -> dict[str, dict]:
        """node id hex -> decoded value; the dicts are shared: do not mutate them."""
        with self._lock:
            return dict(self._by_node)

    def get(self, node_hex: str) -> dict | None:
        with self._lock:
            return self._by_node.get(node_hex)

    def wait_for(self, node_hex: str, timeout: float) -> bool:
        """Block until `node_hex` has a value or `timeout` seconds pass."""
        with self._lock:
            return self._lock.wait_for(lambda: node_hex in self._by_node, timeout)

    def take_changes(self) -> dict[str, dict | None]:
        """What changed since the last call: node id hex -> its value now
        (None: gone). O(changes), where a snapshot is O(members): the
        daemon's view takes these at every burst of changes anywhere."""
        with self._lock:
            changed, self._changed = self._changed, set()
            return {node_hex: self._by_node.get(node_hex) for node_hex in changed}
