"""Proof after the fact that no node's placement-group bundles ever exceeded
its resources: a recorder of the etcd history of reservations, and a replay
of that history revision by revision.

The guarantee checked is the one reservation rests on: a group is reserved
in one etcd transaction that compares every allocation record it changes
(`placing.py`), so at *every* revision each node's ``alloc/<node>`` record
asks for no more than the node's record offers. Sampling the cluster now and
then could miss a revision where it did not hold; reading etcd's history
afterwards depends on it not being compacted. So :class:`AllocRecorder`
follows ``alloc/`` and ``nodes/`` with a watch started before the first
group, which delivers every revision in order (and re-lists, recorded as a
``reset``, if it ever falls behind compaction), and :func:`replay_allocations`
rebuilds the state from that record.

The replay is incremental: it keeps each node's reserved sums and, after
each revision, re-checks only the nodes that revision touched, since
re-checking every node at every revision costs revisions x nodes record
decodes, which a thousand-node history cannot pay. The chaos harness's
checker and ``meshray scale-test`` call the same function.

Pure apart from the recorder's watches; the parser of an allocation record
is the placement component's own (:class:`~.records.AllocRecord`).
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field

from meshray.coordination import keyspace
from meshray.placement.records import AllocRecord

__all__ = ["AllocRecorder", "AllocReplay", "replay_allocations"]

_TOLERANCE = 1e-9


class AllocRecorder:
    """Record every change to etcd's ``alloc/`` and ``nodes/`` keys from now on.

    ``initial`` holds both prefixes as listed at start; ``events`` each later
    change as ``{"rev", "kind": "put" | "delete" | "reset", "key", "value"}``
    (a reset carries ``prefix`` and the re-listed ``items``).
    """

    def __init__(self, coordinator):
        self._coordinator = coordinator
        self._keys = keyspace.Keyspace()
        self.events: list[dict] = []
        self.initial: dict[str, bytes] = {}
        self.resets = 0
        self._lock = threading.Lock()
        self._watches = []

    def start(self) -> AllocRecorder:
        for prefix in (self._keys.alloc_prefix(), self._keys.nodes_prefix()):
            items, revision = self._coordinator.get_prefix(prefix)
            self.initial.update({item.key: item.value for item in items})
            self._watches.append(self._coordinator.watch_prefix(
                prefix, revision + 1, self._on_events,
                lambda items, rev, prefix=prefix: self._on_reset(prefix, items, rev)))
        return self

    def _on_events(self, events) -> None:
        with self._lock:
            for event in events:
                self.events.append({"rev": event.mod_revision, "kind": event.kind,
                                    "key": event.key, "value": event.value})

    def _on_reset(self, prefix: str, items, revision) -> None:
        with self._lock:
            self.resets += 1
            self.events.append({"rev": revision, "kind": "reset", "prefix": prefix, "key": "",
                                "items": {item.key: item.value for item in items}})

    def stop(self) -> None:
        for watch in self._watches:
            watch.cancel()


@dataclass
class AllocReplay:
    """What a replay found."""
    revisions: int = 0            # revisions that changed an allocation (or re-listed)
    peak_bundles: int = 0         # most bundles reserved cluster-wide at one revision
    unparsed: set = field(default_factory=set)   # keys whose value could not be read
    violations: list = field(default_factory=list)


def bundle_demands(value: bytes) -> list[dict]:
    """The resource demand of each bundle in one ``alloc/<node>`` record."""
    record = keyspace.decode_json(value)
    return [dict(bundle.resources) for bundle in AllocRecord.from_dict(record).bundles]


class _State:
    """The replayed keys, and per node its offered resources and reserved sums."""

    def __init__(self):
        self.keys = keyspace.Keyspace()
        self.values: dict[str, bytes] = {}
        self.totals: dict[str, dict] = {}
        self.used: dict[str, collections.Counter] = {}
        self.bundles: dict[str, int] = {}
        self.reserved = 0
        self.unparsed: set = set()

    def set(self, key: str, value: bytes | None) -> str | None:
        """Put (or delete, with None) `key`; the node it concerns, if any."""
        if value is None:
            self.values.pop(key, None)
        else:
            self.values[key] = value
        try:
            family, parts = self.keys.parse(key)
        except (ValueError, KeyError, TypeError):
            self.unparsed.add(key)
            return None
        if family not in ("nodes", "alloc") or len(parts) != 1:
            return None
        node = parts[0]
        self.unparsed.discard(key)
        if family == "nodes":
            self.totals.pop(node, None)
            if value is not None:
                try:
                    self.totals[node] = dict(keyspace.decode_json(value).get("Resources", {}))
                except (ValueError, TypeError, AttributeError):
                    self.unparsed.add(key)
            return node
        self.reserved -= self.bundles.pop(node, 0)
        self.used.pop(node, None)
        if value is not None:
            try:
                demands = bundle_demands(value)
            except (ValueError, KeyError, TypeError):
                self.unparsed.add(key)
                return node
            used = collections.Counter()
            for demand in demands:
                used.update(demand)
            self.used[node] = used
            self.bundles[node] = len(demands)
            self.reserved += len(demands)
        return node

    def overcommitted(self, node: str, revision: int) -> list[str]:
        total = self.totals.get(node)
        if total is None:
            return []          # node gone: its reservations are being moved
        return [f"revision {revision}: node {node[:12]} has {amount} {resource} reserved "
                f"but only {total.get(resource, 0.0)}"
                for resource, amount in self.used.get(node, {}).items()
                if amount > total.get(resource, 0.0) + _TOLERANCE]


def replay_allocations(initial: dict, events: list) -> AllocReplay:
    """Replay `initial` then `events` (an :class:`AllocRecorder`'s) revision by
    revision; a violation names each revision at which a node it touched had
    more reserved than it offers."""
    state = _State()
    for key, value in initial.items():
        state.set(key, value)
    by_rev = collections.defaultdict(list)
    for event in events:
        by_rev[event["rev"]].append(event)
    result = AllocReplay()
    for rev in sorted(by_rev):
        touched = set()
        counts = False
        for event in by_rev[rev]:
            if event["kind"] == "reset":      # re-listed after compaction
                counts = True
                for key in [k for k in state.values if k.startswith(event["prefix"])]:
                    touched.add(state.set(key, None))
                for key, value in event["items"].items():
                    touched.add(state.set(key, value))
                continue
            counts = counts or "/alloc/" in event["key"]
            touched.add(state.set(event["key"], event["value"] if event["kind"] == "put"
                                  else None))
        result.revisions += counts
        result.peak_bundles = max(result.peak_bundles, state.reserved)
        for node in sorted(n for n in touched if n is not None):
            result.violations += state.overcommitted(node, rev)
    result.unparsed = set(state.unparsed)
    return result
