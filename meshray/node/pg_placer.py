"""The node's placement-group worker: one thread that talks to etcd for groups.

Drivers and workers ask their daemon to create and remove groups; the daemon
hands each request to the `GroupPlacer` and the placer commits whatever has
queued up since its last round in as few transactions as etcd allows
(`reservation.create_placement_groups` / `remove_placement_groups`): a burst of
a hundred creations costs a few transactions, not two hundred. Requests are
executed in the order they were submitted, and `barrier()` lets a read wait
until everything submitted before it is committed, so a client always reads
its own writes.

The same thread keeps groups placed: it is woken by changes of the mirrored
``pgs/`` (the groups this node follows: group_follow.py), own ``alloc/``,
``nodes/`` and ``avail/`` prefixes and asks the `GroupView` (a parsed,
incrementally maintained copy of those group records) which groups need
placing. Only when some do does it go to etcd, and then only for those
groups (plus a full pass every few seconds while any wait, and a slow
background sweep for orphans and garbage). Nothing here polls etcd in a loop.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import types
from collections import deque
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from meshray.coordination.keyspace import decode_json
from meshray.node import group_follow
from meshray.placement import policy
from meshray.placement.records import (
    PENDING,
    REMOVED,
    RESCHEDULING,
    AllocRecord,
    PlacementGroupRecord,
)

__all__ = ["GroupView", "GroupPlacer"]

log = logging.getLogger(__name__)

RETRY_S = 1.0          # while groups wait: retry at least this often
DEBOUNCE_S = 0.2       # ... and at most this often when woken by view changes
FULL_PASS_S = 5.0      # while groups wait: also act on groups other nodes are responsible for
GC_PASS_S = 30.0       # list every group (garbage of interrupted removals, missed losses)


class GroupView:
    """The group records this node follows and its ``alloc/`` record,
    parsed once per change.

    Fed with the change lists of the daemon's mirrors (watch threads); read
    by the event loop (`records`, a live read-only mapping) and the placer.
    Keeps the indexes that make "does any group need placing?" cheap: the
    groups that wait, and the groups holding a bundle on each node.
    """

    def __init__(self, keys, node_hex: str):
        self._keys = keys
        self._me = node_hex
        self._lock = threading.Lock()
        self._records: Dict[str, PlacementGroupRecord] = {}
        self._revs: Dict[str, int] = {}
        self.records = types.MappingProxyType(self._records)
        self._waiting: Dict[str, float] = {}          # pg -> created_at
        self._on_node: Dict[str, set] = {}
        self.own_alloc: Optional[AllocRecord] = None
        self._own_keys: frozenset = frozenset()
        self._alloc_revision = 0

    # ------------------------------------------------------------ updates
    def apply_pg_changes(self, changes) -> None:
        with self._lock:
            for change in changes:
                try:
                    pg_hex = self._keys.parse_pg(change.key)
                except ValueError:
                    continue
                self._forget(pg_hex)
                if change.new is None:
                    continue
                try:
                    record = PlacementGroupRecord.from_dict(decode_json(change.new.value))
                except (ValueError, TypeError, KeyError):
                    continue
                self._records[pg_hex] = record
                self._revs[pg_hex] = change.new.mod_revision
                if record.state in (PENDING, RESCHEDULING):
                    self._waiting[pg_hex] = record.created_at
                if record.state != REMOVED:
                    for node in set(record.placement):
                        if node is not None:
                            self._on_node.setdefault(node, set()).add(pg_hex)

    def forget(self, pg_hex: str) -> None:
        """Drop the group's record: this node no longer follows it."""
        with self._lock:
            self._forget(pg_hex)

    def retain(self, keep: Callable[[str], bool]) -> None:
        """Drop every record `keep` says this node no longer follows."""
        with self._lock:
            for pg_hex in [pg for pg in self._records if not keep(pg)]:
                self._forget(pg_hex)

    def _forget(self, pg_hex: str) -> None:
        old = self._records.pop(pg_hex, None)
        self._revs.pop(pg_hex, None)
        self._waiting.pop(pg_hex, None)
        if old is not None:
            for node in set(old.placement):
                groups = self._on_node.get(node)
                if groups is not None:
                    groups.discard(pg_hex)
                    if not groups:
                        del self._on_node[node]

    def apply_alloc_changes(self, changes) -> None:
        with self._lock:
            for change in changes:
                self._alloc_revision = max(self._alloc_revision, change.new.mod_revision
                                           if change.new is not None else 0)
                if change.new is None:
                    self.own_alloc = None
                    self._own_keys = frozenset()
                    continue
                try:
                    alloc = AllocRecord.from_dict(decode_json(change.new.value))
                except (ValueError, TypeError, KeyError):
                    continue
                self.own_alloc = alloc
                self._own_keys = frozenset(alloc.keys())

    def note_alloc_revision(self, revision: int) -> None:
        """The own-alloc mirror reflects the store up to ``revision`` (a
        deletion event carries no value, so its revision comes from here)."""
        with self._lock:
            self._alloc_revision = max(self._alloc_revision, revision)

    # ------------------------------------------------------------ reads
    def get(self, pg_hex: str) -> Optional[Tuple[PlacementGroupRecord, int]]:
        with self._lock:
            record = self._records.get(pg_hex)
            return (record, self._revs[pg_hex]) if record is not None else None

    def has_groups(self) -> bool:
        return bool(self._records)

    def needing_placement(self, live_nodes: Iterable[str]) -> List[str]:
        """Groups that wait, hold a bundle on a node that is gone, or (as far
        as this node can tell) lost a bundle from its own alloc; oldest first.
        A superset is harmless: the placer re-reads each one from etcd."""
        live = set(live_nodes)
        with self._lock:
            out = dict(self._waiting)
            for node, groups in self._on_node.items():
                if node not in live:
                    for pg_hex in groups:
                        out[pg_hex] = self._records[pg_hex].created_at
            for pg_hex in self._on_node.get(self._me, ()):
                # Judge only against an alloc at least as new as the record:
                # the transaction that placed a bundle here wrote both.
                if self._revs[pg_hex] > self._alloc_revision:
                    continue
                record = self._records[pg_hex]
                for index, node in enumerate(record.placement):
                    if node == self._me and (pg_hex, index) not in self._own_keys:
                        out[pg_hex] = record.created_at
                        break
        return [pg for pg, _t in sorted(out.items(), key=lambda item: (item[1], item[0]))]


class _Op:
    __slots__ = ("kind", "arg", "future")

    def __init__(self, kind: str, arg: Any):
        self.kind = kind
        self.arg = arg
        self.future: concurrent.futures.Future = concurrent.futures.Future()


class GroupPlacer:
    """The thread that runs every placement-group transaction of one node."""

    def __init__(self, *, node_hex: str, view: GroupView, keys,
                 coordinator: Callable[[], Any], live_nodes: Callable[[], Iterable[str]],
                 ready: Callable[[float], bool], lease_ttl_s: float,
                 slice_bits: Callable[[], int] = lambda: 0):
        self._me = node_hex
        self._slice_bits = slice_bits
        self._view = view
        self._keys = keys
        self._coordinator = coordinator
        self._live_nodes = live_nodes
        self._ready = ready
        self._sweep_every = 4 * lease_ttl_s
        self._cond = threading.Condition()
        self._queue: deque = deque()
        self._submitted = 0
        self._done = 0
        self._barriers: List[Tuple[int, concurrent.futures.Future]] = []
        self._poked = True
        self._stopped = False
        self._removing: Dict[str, int] = {}   # pg -> queued removals not yet executed
        self._creating: Dict[str, int] = {}   # pg -> queued creations not yet executed
        self._thread: Optional[threading.Thread] = None
        from meshray.placement.reservation import TombstoneLeases
        self._leases = TombstoneLeases()

    # ------------------------------------------------------------ API
    def submit(self, kind: str, arg: Any) -> concurrent.futures.Future:
        """Queue ``create`` (a reservation.CreateRequest), ``remove`` (a pg id
        hex) or ``job_ended`` (a job id hex). The future gets the record /
        True-False / removed ids, or the exception."""
        op = _Op(kind, arg)
        with self._cond:
            if self._stopped:
                op.future.set_exception(ConnectionError("this node is shutting down"))
                return op.future
            self._queue.append(op)
            self._submitted += 1
            pending = self._pending_of(op)
            if pending is not None:
                pending[op.arg if kind == "remove" else op.arg.pg_id] = \
                    pending.get(op.arg if kind == "remove" else op.arg.pg_id, 0) + 1
            self._cond.notify()
        return op.future

    def _pending_of(self, op: _Op) -> Optional[Dict[str, int]]:
        return {"remove": self._removing, "create": self._creating}.get(op.kind)

    def removing(self, pg_hex: str) -> bool:
        """A removal of the group is queued or running here (work submitted
        after it may fail fast, before etcd has it)."""
        return pg_hex in self._removing

    def creating(self, pg_hex: str) -> bool:
        """A creation of the group is queued or running here (its record may
        not exist yet: work for it waits rather than counting it removed)."""
        return pg_hex in self._creating

    def barrier(self) -> concurrent.futures.Future:
        """Done once every operation submitted so far has been executed."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._done >= self._submitted:
                future.set_result(None)
            else:
                self._barriers.append((self._submitted, future))
        return future

    def poke(self) -> None:
        """Something changed that may let a waiting group be placed."""
        with self._cond:
            if not self._poked:
                self._poked = True
                self._cond.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="meshray-pg-placer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify()
        for op in pending:
            if not op.future.done():
                op.future.set_exception(ConnectionError("this node is shutting down"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)

    # ------------------------------------------------------------ thread
    def _run(self) -> None:
        now = time.monotonic()
        self._next_gc = now + GC_PASS_S
        self._next_sweep = now + self._sweep_every
        self._next_retry = 0.0
        self._last_run = 0.0
        self._last_full = now
        give_up = now + 15.0   # wait until registered (our node record exists), or not
        while not self._stopped and not self._ready(0.2) and time.monotonic() < give_up:
            pass
        while True:
            with self._cond:
                while not self._queue and not self._poked and not self._stopped:
                    timeout = self._next_wakeup() - time.monotonic()
                    if timeout <= 0:
                        break
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                ops = list(self._queue)
                self._queue.clear()
                poked, self._poked = self._poked, False
            if ops:
                self._execute(ops)
            try:
                self._maintain(poked)
            except Exception as exc:  # noqa: BLE001 - retried on the next wakeup
                log.warning("placing placement groups failed: %s", exc)
                self._next_retry = time.monotonic() + RETRY_S

    def _next_wakeup(self) -> float:
        wake = min(self._next_gc, self._next_sweep)
        if self._next_retry:
            wake = min(wake, self._next_retry)
        return wake

    def _execute(self, ops: List[_Op]) -> None:
        from meshray.placement import reservation
        coordinator = self._coordinator()
        start = 0
        while start < len(ops):
            kind = ops[start].kind
            end = start
            while end < len(ops) and ops[end].kind == kind and kind != "job_ended":
                end += 1
            end = max(end, start + 1)
            run = ops[start:end]
            try:
                if coordinator is None:
                    raise ConnectionError("this node is not connected to etcd")
                if kind == "create":
                    outcomes = reservation.create_placement_groups(
                        coordinator, [op.arg for op in run], keys=self._keys)
                elif kind == "remove":
                    outcomes = reservation.remove_placement_groups(
                        coordinator, [op.arg for op in run], keys=self._keys,
                        leases=self._leases, known=self._view.get)
                elif kind == "job_ended":
                    outcomes = [reservation.remove_job_groups(coordinator, run[0].arg,
                                                              keys=self._keys)]
                else:
                    raise ValueError(f"unknown placement operation {kind!r}")
            except Exception as exc:  # noqa: BLE001 - every caller hears of it
                outcomes = [exc] * len(run)
            for op, outcome in zip(run, outcomes):
                if isinstance(outcome, BaseException):
                    op.future.set_exception(outcome)
                else:
                    op.future.set_result(outcome)
            start = end
        with self._cond:
            self._done += len(ops)
            for op in ops:
                pending = self._pending_of(op)
                if pending is not None:
                    pg_hex = op.arg if op.kind == "remove" else op.arg.pg_id
                    left = pending.get(pg_hex, 0) - 1
                    if left > 0:
                        pending[pg_hex] = left
                    else:
                        pending.pop(pg_hex, None)
            ready = [f for seq, f in self._barriers if seq <= self._done]
            self._barriers = [(seq, f) for seq, f in self._barriers if seq > self._done]
        for future in ready:
            future.set_result(None)

    def _maintain(self, poked: bool) -> None:
        from meshray.placement import reservation
        now = time.monotonic()
        coordinator = self._coordinator()
        if coordinator is None:
            return
        live = set(self._live_nodes())
        waiting = self._view.needing_placement(live)
        if not waiting:
            self._next_retry = 0.0
        else:
            if poked:
                # Capacity may have appeared: act now, but at most every
                # DEBOUNCE_S (availability changes arrive every 0.1 s per node).
                soon = max(now, self._last_run + DEBOUNCE_S)
                self._next_retry = min(self._next_retry or soon, soon)
            if now >= self._next_retry:
                if now - self._last_full >= FULL_PASS_S:
                    mine = waiting
                    self._last_full = now
                else:
                    # Responsible among the nodes that follow the group's
                    # slice (group_follow.py): only they know of it.
                    bits = self._slice_bits()
                    everyone = list(live)
                    members = group_follow.slice_members(everyone, bits)
                    mine = [pg for pg in waiting if policy.responsible_node(
                        pg, group_follow.followers(pg, members, bits, everyone)) == self._me]
                self._last_run = now
                self._next_retry = now + RETRY_S
                if mine:
                    reservation.try_place_pending(coordinator, keys=self._keys,
                                                  candidates=mine)
        if not self._view.has_groups():
            self._next_gc = now + GC_PASS_S
            self._next_sweep = now + self._sweep_every
            return
        if now >= self._next_sweep:
            self._next_sweep = now + self._sweep_every
            reservation.sweep_orphans(coordinator, keys=self._keys)
        if now >= self._next_gc:
            self._next_gc = now + GC_PASS_S
            reservation.try_place_pending(coordinator, keys=self._keys)
