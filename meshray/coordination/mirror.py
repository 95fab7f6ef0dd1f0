"""A live local copy of one etcd prefix.

The node daemon's cluster view (every node's resources) and actor directory
are read far more often than they change, and must never be a network call on
the scheduling path. A :class:`PrefixMirror` lists the prefix once, then
follows a watch; after compaction the watch re-lists and the mirror turns the
difference between old and new state into ordinary changes, so subscribers
see deletes they would otherwise have missed.
"""

from __future__ import annotations

import logging
import threading
import time
from types import MappingProxyType
from typing import Callable, Mapping, NamedTuple

from .client import Coordinator, Event, KeyValue, WatchHandle

__all__ = ["Entry", "Change", "PrefixMirror"]

log = logging.getLogger(__name__)


class Entry(NamedTuple):
    value: bytes
    mod_revision: int


class Change(NamedTuple):
    """One key's transition; ``old``/``new`` is None when absent."""

    key: str
    old: Entry | None
    new: Entry | None


class PrefixMirror:
    """Keep ``{key: Entry(value, mod_revision)}`` for ``prefix`` current.

    ``on_change(changes)`` (optional) runs after each applied batch, in
    revision order, with the lock released: first from ``start()`` with every
    listed key as an addition, then on the watch thread. It must not block
    for long, since it holds up later events.
    """

    def __init__(self, coordinator: Coordinator, prefix: str,
                 on_change: Callable[[list[Change]], None] | None = None, *,
                 end: str | None = None):
        """With `end`, the mirror holds only the keys from `prefix` up to
        (not including) `end`."""
        self._coord = coordinator
        self.prefix = prefix
        self.end = end
        self._on_change = on_change
        self._data: dict[str, Entry] = {}
        self._view = MappingProxyType(self._data)
        self._cond = threading.Condition()
        self._revision = 0
        self._watch: WatchHandle | None = None
        self._started = False
        self._stopped = False

    @property
    def revision(self) -> int:
        """The store revision the mirror reflects (everything up to it)."""
        return self._revision

    @property
    def watch(self) -> WatchHandle | None:
        return self._watch

    def start(self, timeout: float | None = None) -> "PrefixMirror":
        """List the prefix (raising CoordinationError if etcd does not answer
        within ``timeout``) and start following it."""
        if self._started:
            raise RuntimeError(f"mirror of {self.prefix!r} already started")
        self._started = True
        items, revision = self._coord.get_prefix(self.prefix, timeout=timeout, end=self.end)
        self._apply_reset(items, revision)
        self._watch = self._coord.watch_prefix(
            self.prefix, revision + 1, self._apply_events, self._apply_reset, end=self.end)
        return self

    def stop(self) -> None:
        self._stopped = True
        if self._watch is not None:
            self._watch.cancel()
        with self._cond:
            self._cond.notify_all()

    def snapshot(self) -> dict[str, Entry]:
        """A copy of the current state."""
        with self._cond:
            return dict(self._data)

    def get(self, key: str) -> Entry | None:
        with self._cond:
            return self._data.get(key)

    def wait_for(self, predicate: Callable[[Mapping[str, Entry]], bool],
                 timeout: float) -> bool:
        """Block until ``predicate(view)`` is true or ``timeout`` passes.

        ``view`` is a read-only live mapping, valid only during the call; the
        predicate runs under the mirror's lock after every applied change.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if predicate(self._view):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopped:
                    return False
                self._cond.wait(remaining)

    # -- watch callbacks (watch thread) --------------------------------

    def _apply_events(self, events: list[Event]) -> None:
        changes: list[Change] = []
        with self._cond:
            for ev in events:
                if ev.mod_revision <= self._revision:
                    continue  # already reflected by a listing
                old = self._data.get(ev.key)
                if ev.kind == "put":
                    new = Entry(ev.value or b"", ev.mod_revision)
                    self._data[ev.key] = new
                else:
                    new = None
                    if old is None:
                        continue
                    del self._data[ev.key]
                changes.append(Change(ev.key, old, new))
            if events:
                self._revision = max(self._revision, events[-1].mod_revision)
            self._cond.notify_all()
        self._notify(changes)

    def _apply_reset(self, items: list[KeyValue], revision: int) -> None:
        fresh = {kv.key: Entry(kv.value, kv.mod_revision) for kv in items}
        changes: list[Change] = []
        with self._cond:
            for key, old in self._data.items():
                new = fresh.get(key)
                if new != old:
                    changes.append(Change(key, old, new))
            for key, new in fresh.items():
                if key not in self._data:
                    changes.append(Change(key, None, new))
            self._data.clear()
            self._data.update(fresh)
            self._revision = revision
            self._cond.notify_all()
        self._notify(changes)

    def _notify(self, changes: list[Change]) -> None:
        if not changes or self._on_change is None:
            return
        try:
            self._on_change(changes)
        except Exception:
            log.exception("mirror %r: on_change callback failed", self.prefix)
