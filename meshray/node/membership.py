"""The node's membership in the cluster: its etcd lease, records and view.

Runs on its own thread so the daemon's event loop never waits on etcd. The
node record and availability live under the node's lease and vanish when the
node dies. Availability is published when the daemon's ledger changed
(it pokes this thread), at most every PUBLISH_INTERVAL_S and only when the
value differs from what was published: tasks never touch etcd. The lease
keeper moves the fence on itself at each refresh, so with nothing to publish
the thread sleeps (waking every IDLE_WAKE_S as a safety net): an idle node
costs next to nothing, which is what lets one machine run a thousand hollow
ones (docs/scale.md).

The view of the members is decoded once per change (node/member_records.py)
and the daemon is called once per burst of changes, not once per change:
both are paid at every node for every change anywhere, so they bound how
many nodes a cluster (or one machine of hollow nodes) can have.

The thread must outlive any etcd outage: a node whose membership thread died
would run on without a lease, invisible to its peers, for good. So etcd
being down at startup is waited out, and any error in the loop is logged
with its traceback and the loop carries on after a backoff.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

from meshray.common.env import positive_env
from meshray.coordination import keyspace
from meshray.node import avail_slice
from meshray.node.group_follow import InterestViews
from meshray.node.member_records import DecodedRecords

__all__ = ["Membership", "DEFAULT_LEASE_TTL_S", "PUBLISH_INTERVAL_S", "retry_delay",
           "availability_worth_publishing"]

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL_S = 5.0
PUBLISH_INTERVAL_S = 0.1
# Retry interval of the publish loop while etcd refuses its writes.
FENCE_INTERVAL_S = 1.0
# Longest sleep of the publish loop with nothing to publish (everything that
# needs it -- a ledger change, a lost lease, a location, a drain -- wakes it).
IDLE_WAKE_S = 30.0
# A change of less than this share of a resource's total is published once
# EXACT_AFTER_S passed since the last write (the loop wakes for it then):
# see availability_worth_publishing.
SIGNIFICANT_SHARE = 0.1
EXACT_AFTER_S = 1.0
VIEW_WAIT_S = 15.0
VIEW_START_TIMEOUT_S = 10.0


def retry_delay(failures: int, *, base: float = 0.2, cap: float = 5.0) -> float:
    """Seconds before the membership loop's next try after ``failures``
    (>= 1) failures in a row: exponential, capped so a node rejoins within
    seconds of etcd coming back."""
    if failures < 1:
        raise ValueError(f"failures must be >= 1, got {failures!r}")
    return min(cap, base * (2 ** min(failures - 1, 16)))


def availability_worth_publishing(published: dict, current: dict, total: dict,
                                  share: float = SIGNIFICANT_SHARE) -> bool:
    """Whether `current` availability differs enough from `published` to be
    written now rather than within EXACT_AFTER_S.

    Every write is delivered to every member, so a node whose availability
    jitters by a task or two (a big node running tiny tasks) must not write
    on every jitter: peers learn the exact room from the load on our batches
    (scheduler/peer_load.py) and from a refused offer. What peers must learn
    at once is room appearing or vanishing (a resource going to or from
    zero), or a change of at least `share` of the resource's total.
    """
    for name in set(published) | set(current):
        before, now = published.get(name, 0.0), current.get(name, 0.0)
        if before == now:
            continue
        if (before <= 0) != (now <= 0):
            return True
        if abs(now - before) >= share * total.get(name, 0.0):
            return True
    return False


def _decoded(parse_key, items) -> dict:
    """Records read from etcd (`(key, entry)` pairs) by node id hex, decoded
    and checked as the view's are: untrusted input, a bad one left out."""
    from meshray.coordination.mirror import Change
    decoded = DecodedRecords(parse_key)
    decoded.apply(Change(key, None, entry) for key, entry in items)
    return decoded.snapshot()


class Membership:
    def __init__(self, daemon, endpoints: list[str], *, ttl: float | None = None,
                 keys: keyspace.Keyspace | None = None, etcd_options: dict | None = None,
                 coordinator=None):
        """`coordinator`: an etcd connection to use instead of opening one,
        which stays its lender's to close (the nodes of one scale-test host
        share one: docs/scale.md). The lease, records and watches are this
        node's own either way."""
        self._daemon = daemon
        self._endpoints = endpoints
        self._etcd_options = etcd_options    # None: from the environment and the token
        self._borrowed = coordinator is not None
        self._ttl = ttl or float(os.environ.get("MESHRAY_LEASE_TTL", DEFAULT_LEASE_TTL_S))
        self.keys = keys or keyspace.Keyspace()
        self.coordinator = coordinator
        self._lease = None
        self._nodes_view = None
        self._avail_view = None
        self._registered = threading.Event()
        self._republish = threading.Event()   # the node record changed (a drain began)
        self._stop = threading.Event()
        self._seen_nodes: dict[str, dict] = {}
        self._records = DecodedRecords(self.keys.parse_node)    # node id hex -> record
        self._avails = DecodedRecords(self.keys.parse_avail)    # node id hex -> availability
        # Whose availability the avail view follows (node/avail_slice.py):
        # the top bits of the ids it covers (0: everyone's), and what the
        # member count calls for, which the membership thread carries out.
        self.avail_bits = 0
        self._wanted_bits = 0
        # The fewest members whose availability a node follows once it follows
        # a slice; tests lower it to slice a small cluster.
        self._slice_target = positive_env("MESHRAY_AVAIL_SLICE_TARGET",
                                          avail_slice.SLICE_TARGET,
                                          expected="a whole number >= 1")
        self._live_cache: tuple[int, list] = (-1, [])           # (records version, live ids)
        self._wake = threading.Event()    # something to publish (availability, locations)
        self._view_call_pending = False   # a daemon.peers.on_view_change is already scheduled
        self._thread = threading.Thread(target=self._run, name="meshray-membership", daemon=True)
        self.lease_generation = 0
        self.loop_failures = 0            # errors the loop survived (for tests and status)
        self._registrations = 0
        self._placer_started = False
        self._loop = None                 # the daemon's event loop, for view callbacks
        self._locations: dict[bytes, bool] = {}   # object id -> present here (unpublished)
        self._pgs_view = None
        self._alloc_view = None
        self._locations_lock = threading.Lock()
        self.watch_events = 0             # changes delivered by this node's watches (scale tests)
        self._events_lock = threading.Lock()
        from meshray.node.pg_placer import GroupPlacer, GroupView
        node_hex = daemon.node_id.hex()
        self.pg_view = GroupView(self.keys, node_hex)
        self.placer = GroupPlacer(node_hex=node_hex, view=self.pg_view, keys=self.keys,
                                  coordinator=lambda: self.coordinator,
                                  live_nodes=self._live_node_ids,
                                  ready=self._registered.wait, lease_ttl_s=self._ttl,
                                  slice_bits=lambda: self.avail_bits)
        # Groups followed outside the slice of pgs/ (group_follow.py).
        self.group_interest = InterestViews(self.keys, node_hex, on_change=self._pgs_changed,
                                            forget=self.pg_view.forget)

    # ------------------------------------------------------------ lifecycle
    def start(self, loop=None) -> None:
        self._loop = loop
        resources = getattr(self._daemon, "resources", None)
        if resources is not None:
            resources.on_change = self.poke
        self._thread.start()

    def _count(self, changes) -> None:
        with self._events_lock:
            self.watch_events += len(changes)

    def _nodes_changed(self, changes) -> None:
        self._count(changes)
        self._records.apply(changes)
        wanted = avail_slice.slice_bits(len(self._records), self._wanted_bits,
                                        self._slice_target)
        if wanted != self._wanted_bits:
            self._wanted_bits = wanted
            self._wake.set()      # the membership thread re-watches (not this watch thread)
        for change in changes:
            if change.new is None:
                continue
            try:
                node_hex = self.keys.parse_node(change.key)
            except ValueError:
                continue
            record = self._records.get(node_hex)
            if record is not None:
                self._seen_nodes[node_hex] = record   # so status can list it once dead
        self._view_changed()

    def _avails_changed(self, changes) -> None:
        self._count(changes)
        self._avails.apply(changes)
        self._view_changed()

    def _view_changed(self) -> None:
        # A member or its room changing matters to the placer only for groups
        # it knows of (a new group pokes it itself); with none, waking it at
        # every change anywhere costs each node O(members) for nothing.
        if self.pg_view.has_groups():
            self.placer.poke()
        loop = self._loop
        if loop is None or loop.is_closed() or self._view_call_pending:
            return      # the call already scheduled reads the view after this change
        self._view_call_pending = True
        try:
            loop.call_soon_threadsafe(self._deliver_view_change)
        except RuntimeError:
            self._view_call_pending = False   # the loop is shutting down

    def _deliver_view_change(self) -> None:
        """On the daemon's loop: one call for all changes since the last one.
        The flag drops before the daemon reads the view, so a change applied
        meanwhile schedules another call rather than being missed."""
        self._view_call_pending = False
        self._daemon.peers.on_view_change()

    def poke(self) -> None:
        """Something may need publishing (the node's availability changed).

        Called on every acquire and release: when a wake is already pending,
        setting it again would only take the event's lock for nothing."""
        if not self._wake.is_set():
            self._wake.set()

    def _pgs_changed(self, changes) -> None:
        self._count(changes)
        self.pg_view.apply_pg_changes(changes)
        self._pg_changed()

    def _alloc_changed(self, changes) -> None:
        self._count(changes)
        self.pg_view.apply_alloc_changes(changes)
        if self._alloc_view is not None:
            self.pg_view.note_alloc_revision(self._alloc_view.revision)
        self._pg_changed()

    def _pg_changed(self) -> None:
        self.placer.poke()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._daemon.placement.on_change)
            except RuntimeError:
                pass

    @property
    def registered(self) -> bool:
        """Whether this node holds its lease and its record is published."""
        return self._registered.is_set()

    def wait_registered(self, timeout: float) -> bool:
        """Block until `registered` or `timeout` seconds pass."""
        return self._registered.wait(timeout)

    def republish_record(self) -> None:
        """Write the node record again (from the daemon) on the next publish round."""
        self._republish.set()
        self._wake.set()

    def poke_placer(self) -> None:
        self.placer.poke()

    def follow_groups(self, groups) -> None:
        """The groups the daemon needs records of now (bundles here, work
        waiting here): those outside the slice get a watch of their own."""
        if self.group_interest.want(groups):
            self._wake.set()       # the membership thread reconciles

    def need_group(self, pg_hex: str) -> None:
        """One more group the daemon needs (work for it waits here)."""
        if self.group_interest.want_one(pg_hex):
            self._wake.set()

    def follows_group(self, pg_hex: str) -> bool:
        """Whether this node holds the group's record if it exists (a
        missing record then means the group is gone)."""
        return self.group_interest.follows(pg_hex)

    def pg_snapshot(self):
        """(group records by id hex: a live read-only mapping, this node's
        AllocRecord or None), parsed once per change by the GroupView."""
        return self.pg_view.records, self.pg_view.own_alloc

    def _live_node_ids(self) -> list[str]:
        """Members that may take placement-group bundles (a draining node may not).

        Asked by the group placer at every view change, availability ones
        included, so it is recomputed only when a node record changed."""
        version = self._records.version
        cached_version, live = self._live_cache
        if cached_version != version:
            live = [node_hex for node_hex, record in self._records.snapshot().items()
                    if not record.get("Draining")]
            self._live_cache = (version, live)
        return list(live)

    def note_location(self, object_id: bytes, present: bool) -> None:
        """Record that this node gained/lost a copy; published in the next batch."""
        with self._locations_lock:
            self._locations[object_id] = present
        self._wake.set()

    def _publish_locations(self) -> None:
        from meshray.coordination.client import Delete, Put
        with self._locations_lock:
            pending, self._locations = self._locations, {}
        if not pending or self._lease is None:
            return
        node = self._daemon.node_id
        ops = [Put(self.keys.objloc(oid, node), b"1", lease=self._lease.lease_id) if present
               else Delete(self.keys.objloc(oid, node)) for oid, present in pending.items()]
        try:
            for start in range(0, len(ops), 100):
                self.coordinator.txn([], ops[start:start + 100])
        except Exception:
            with self._locations_lock:     # not published: try again next round
                self._locations = {**pending, **self._locations}
            raise

    def locations(self, object_id: bytes) -> list[str]:
        """Nodes (hex) that registered a copy of `object_id` in etcd."""
        if self.coordinator is None:
            return []
        items, _rev = self.coordinator.get_prefix(self.keys.objloc_prefix(object_id))
        return [self.keys.parse_objloc(item[0])[1] for item in items]

    def view_snapshot(self) -> tuple[dict, dict]:
        """(node records, availabilities) of live nodes, keyed by node id hex.

        The inner dicts are shared with the view (decoded once per change):
        callers must not mutate them."""
        return self._records.snapshot(), self._avails.snapshot()

    def view_changes(self) -> tuple[dict, dict]:
        """(node records, availabilities) that changed since the last call,
        by node id hex (None: gone): for the daemon's ClusterView only."""
        return self._records.take_changes(), self._avails.take_changes()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()                  # the publish loop may be asleep on it
        self.placer.stop()
        self._thread.join(10)
        for view in (self._nodes_view, self._avail_view, self._pgs_view, self._alloc_view):
            if view is not None:
                view.stop()
        self.group_interest.stop()
        if self._lease is not None:
            try:
                self._lease.stop(revoke=True)
            except Exception:  # noqa: BLE001 - etcd may already be gone
                pass
        if self.coordinator is not None and not self._borrowed:
            self.coordinator.close()

    def abandon(self) -> None:
        """Go silent as a crashed process would: keepalives and watches end,
        nothing is revoked or written, so peers learn of it only from etcd
        (the lease expiring) or a refused connection (node/liveness.py)."""
        self._stop.set()
        self._wake.set()
        if self._lease is not None:
            self._lease.stop(revoke=False, timeout=0)
        self.placer.stop()
        for view in (self._nodes_view, self._avail_view, self._pgs_view, self._alloc_view):
            if view is not None:
                view.stop()
        self.group_interest.stop()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._serve()
                return
            except Exception:  # noqa: BLE001 - logged with traceback, then carried on
                failures += 1
                self.loop_failures += 1
                delay = retry_delay(failures)
                log.exception("membership of node %s failed (failure %d in a row); "
                              "carrying on in %.1fs", self._daemon.node_id.hex(), failures, delay)
                self._stop.wait(delay)

    def _connect(self):
        """A Coordinator, once etcd answers (None if stopped first)."""
        from meshray import security
        from meshray.coordination.client import Coordinator
        options = self._etcd_options
        if options is None:
            options = security.etcd_client_options(
                token=getattr(self._daemon.config, "token", None))
        failures = 0
        while not self._stop.is_set():
            try:
                coordinator = Coordinator(self._endpoints, timeout=5.0, **options)
                metrics = getattr(self._daemon, "metrics", None)
                if metrics is not None:
                    coordinator.on_round_trip = metrics.etcd_round_trip
                return coordinator
            except Exception as exc:  # noqa: BLE001 - down at startup: wait it out
                failures += 1
                delay = retry_delay(failures)
                log.warning("cannot reach etcd at %s (%s); retrying in %.1fs",
                            ",".join(self._endpoints), exc, delay)
                self._stop.wait(delay)
        return None

    def _start_views(self) -> None:
        """Start every view not running yet (a view whose first listing failed
        is replaced by a fresh one)."""
        from meshray.coordination.mirror import PrefixMirror
        specs = (("_nodes_view", self.keys.nodes_prefix(), self._nodes_changed),
                 ("_avail_view", self.keys.avail_prefix(), self._avails_changed),
                 ("_pgs_view", self.keys.pgs_prefix(), self._pgs_changed),
                 ("_alloc_view", self.keys.alloc(self._daemon.node_id), self._alloc_changed))
        for attr, prefix, on_change in specs:
            view = getattr(self, attr)
            if view is not None and view.watch is not None:
                continue
            end = None
            bits = self.avail_bits
            if attr == "_avail_view":
                # The member list is in by now: a node joining a big cluster
                # follows its slice from the start.
                bits = self._wanted_bits
                prefix, end = self._slice_range(prefix, self.keys.avail_range, bits)
            elif attr == "_pgs_view":
                # Cut as the avail view is; started after it (the same bits).
                prefix, end = self._slice_range(prefix, self.keys.pgs_range, bits)
            if view is not None:          # the fresh mirror lists everything again
                view.stop()
                decoded = {"_nodes_view": self._records, "_avail_view": self._avails}.get(attr)
                if decoded is not None:
                    decoded.reset()
            view = PrefixMirror(self.coordinator, prefix, on_change=on_change, end=end)
            setattr(self, attr, view)
            if attr == "_avail_view":
                self.avail_bits = bits
            elif attr == "_pgs_view":
                # Records of groups the new slice does not hold go, unless
                # followed by key; until the listing is in, a missing record
                # proves nothing.
                self.group_interest.bits = bits
                self.group_interest.slice_listed = False
                self.pg_view.retain(self.group_interest.follows)
            view.start(timeout=VIEW_START_TIMEOUT_S)
            if attr == "_alloc_view":
                self.pg_view.note_alloc_revision(view.revision)
            elif attr == "_pgs_view":
                self.group_interest.slice_listed = True

    def _slice_range(self, prefix: str, family_range, bits: int) -> tuple[str, str | None]:
        """(first key, end) of the keys of the family under `prefix` (cut by
        its `family_range`) that a slice of `bits` covers: all at bits 0."""
        bounds = avail_slice.slice_bounds(self._daemon.node_id.hex(), bits)
        if bounds is None:
            return prefix, None
        return family_range(*bounds)

    def _reslice(self) -> None:
        """Follow the slice (of availabilities and of groups) the member
        count now calls for.

        The old views stop before the new ones list their range, so no value
        from an old watch lands after the new listing; in between (one
        listing) the view has no availability, which costs a spill decision
        at most a refused offer (avail_slice.py says why that is safe), and
        a missing group record proves nothing (group_follow.py)."""
        view, groups = self._avail_view, self._pgs_view
        if self._nodes_view is None or (
                self._wanted_bits == self.avail_bits == self.group_interest.bits
                and all(v is not None and v.watch is not None for v in (view, groups))):
            return      # not started yet, or already the wanted slice (a failed start: again)
        log.info("node %s follows the availability and groups of %s",
                 self._daemon.node_id.hex(), "every member" if self._wanted_bits == 0 else
                 f"1/{2 ** self._wanted_bits} of the members ({len(self._records)} now)")
        for stale in (view, groups):
            if stale is not None:
                stale.stop()
        self._avails.reset()
        self._avail_view = self._pgs_view = None
        self._start_views()           # both again, cut for the wanted slice
        self._view_changed()
        self._pg_changed()

    def _serve(self) -> None:
        """Connect, start the views, then stay registered until stopped.

        Re-entrant: after an error `_run` calls it again and it resumes from
        what is already in place.
        """
        if self.coordinator is None:
            self.coordinator = self._connect()
            if self.coordinator is None:
                return
        self._start_views()
        if not self._placer_started:
            self.placer.start()
            self._placer_started = True
        while not self._stop.is_set():
            try:
                self._register()
            except Exception as exc:  # noqa: BLE001 - keep trying to be a member
                log.warning("cannot register in etcd (%s); retrying", exc)
                if self._lease is not None:
                    self._lease.stop(revoke=False)
                self._stop.wait(1.0)
                continue
            self._registrations += 1
            if self._registrations > 1:
                self._republish_store()
            self._publish_until_lost()
            if self._stop.is_set():
                return
            # Gone for sure (etcd says so): peers saw this node die and
            # re-ran its work; stop acting for the old membership, then rejoin.
            self._lease.stop(revoke=False)
            self._registered.clear()
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._daemon.peers.on_lease_lost)
            log.warning("node %s lost its etcd lease; stopped acting as a member until "
                        "re-registered", self._daemon.node_id.hex())

    def _republish_store(self) -> None:
        """Copies registered under the old lease vanished with it: register them again."""
        store = getattr(self._daemon, "store", None)
        for object_id in (store.object_ids() if store is not None else ()):
            self.note_location(object_id, True)

    def _register(self) -> None:
        from meshray.coordination.client import LeaseKeeper

        lost = threading.Event()
        self._lease = LeaseKeeper(self.coordinator, max(1, int(round(self._ttl))),
                                  on_lost=lambda _id: (lost.set(), self._wake.set()),
                                  on_refreshed=lambda _until: self._extend_fence(),
                                  lapse_is_loss=False)
        self._lease_lost = lost
        lease_id = self._lease.lease_id
        self._republish.clear()
        self._started_at = time.time()
        self._put_record()
        self._published = self._daemon.resources.available.to_dict()
        self._published_at = time.monotonic()
        self.coordinator.put(self.keys.avail(self._daemon.node_id),
                             keyspace.encode_json(self._published), lease=lease_id)
        self.lease_generation += 1
        self._extend_fence()
        self._registered.set()
        self._view_changed()
        log.info("registered node %s with lease %x", self._daemon.node_id.hex(), lease_id)

    def _put_record(self) -> None:
        record = self._daemon.local_node_record()
        record["Hostname"] = socket.gethostname()
        record["Address"] = self._daemon.address
        record["StartedAt"] = self._started_at
        record["LeaseID"] = self._lease.lease_id   # alloc/<node> rides on the same lease
        self.coordinator.put(self.keys.node(self._daemon.node_id), keyspace.encode_json(record),
                             lease=self._lease.lease_id)

    def _extend_fence(self) -> None:
        fence = getattr(self._daemon, "fence", None)
        if fence is not None:
            fence.set(self._lease.expires_at, self._lease.lease_id)

    def _publish_until_lost(self) -> None:
        """Publish until etcd says the lease is gone (or we stop).

        An etcd that cannot be reached is not a lost lease: the keeper keeps
        trying, the fence lapses meanwhile (actors a peer could replace
        refuse calls: common/fence.py), and the node carries on as the same
        member if the lease turns out alive.
        """
        failing_since = None
        sleep_s = IDLE_WAKE_S
        while not self._stop.is_set():
            # Sleep until poked, then publish; the second wait spaces rounds
            # PUBLISH_INTERVAL_S apart so a burst of ledger changes becomes
            # one write. A small change held back wakes the loop when it is
            # due; failing rounds retry every FENCE_INTERVAL_S (the wake was
            # spent).
            self._wake.wait(sleep_s)
            if self._stop.wait(PUBLISH_INTERVAL_S):
                return
            sleep_s = IDLE_WAKE_S
            self._wake.clear()
            self._extend_fence()
            if self._lease_lost.is_set():
                return
            try:
                self._reslice()
                self.group_interest.reconcile(self.coordinator, VIEW_START_TIMEOUT_S)
                if self._republish.is_set():
                    self._republish.clear()
                    try:
                        self._put_record()
                    except Exception:
                        self._republish.set()     # written on a later round
                        raise
                self._publish_locations()
                current = self._daemon.resources.available.to_dict()
                if current != self._published and (
                        time.monotonic() - self._published_at >= EXACT_AFTER_S
                        or availability_worth_publishing(
                            self._published, current,
                            self._daemon.resources.total.to_dict())):
                    self.coordinator.put(self.keys.avail(self._daemon.node_id),
                                         keyspace.encode_json(current),
                                         lease=self._lease.lease_id)
                    self._published = current
                    self._published_at = time.monotonic()
                elif current != self._published:     # held back: due EXACT_AFTER_S after
                    sleep_s = max(0.0, self._published_at + EXACT_AFTER_S - time.monotonic())
                failing_since = None
            except Exception as exc:  # noqa: BLE001 - etcd trouble, judged below
                sleep_s = FENCE_INTERVAL_S
                if "lease not found" in str(exc):
                    return                 # etcd itself says the lease is gone
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("publishing to etcd failed (%s); keeping lease %x and "
                                "retrying", exc, self._lease.lease_id)

    # ------------------------------------------------------------ view
    def _wait_view(self) -> None:
        """Wait until we are registered and our own record is in our view."""
        deadline = time.monotonic() + VIEW_WAIT_S
        if self._registered.wait(VIEW_WAIT_S) and self._records.wait_for(
                self._daemon.node_id.hex(), max(0.0, deadline - time.monotonic())):
            return
        raise ConnectionError(
            f"node is not registered in etcd at {','.join(self._endpoints)} "
            f"after {VIEW_WAIT_S:.0f}s")

    def _alive_records(self) -> dict[str, dict]:
        """Every live member's record, as etcd has them now.

        The view lags etcd by its watch (a node that just registered can be
        in etcd and not yet here), and what a caller is told about the
        cluster -- nodes(), its resources -- must not be older than what it
        could have read from etcd itself: so it is read from etcd (one range
        read of small records). The view answers only while etcd cannot."""
        self._wait_view()
        coordinator = self.coordinator
        if coordinator is not None:
            try:
                items, _rev = coordinator.get_prefix(self.keys.nodes_prefix(), timeout=5.0)
            except Exception as exc:  # noqa: BLE001 - etcd unreachable: the view answers
                log.warning("cannot read the members from etcd (%s: %s); answering from "
                            "this node's view", type(exc).__name__, exc)
            else:
                return _decoded(self.keys.parse_node, ((kv.key, kv) for kv in items))
        return self._records.snapshot()

    def nodes(self) -> list[dict]:
        alive = self._alive_records()
        for node_hex, record in alive.items():
            self._seen_nodes[node_hex] = record
        out = []
        for node_hex, record in self._seen_nodes.items():
            entry = dict(record)
            entry["Alive"] = node_hex in alive
            out.append(entry)
        return out

    def is_member(self, node_hex: str) -> bool:
        """Whether etcd holds a live record for `node_hex` now: read, not
        from the view, which lags etcd by its watch. A record that does not
        decode counts as none, as in the view; so does an id that is no id."""
        coordinator = self.coordinator
        if coordinator is None:
            raise ConnectionError("this node has not reached etcd yet")
        try:
            key = self.keys.node(node_hex)
        except (TypeError, ValueError):
            return False
        value, revision = coordinator.get(key, timeout=5.0)
        if value is None:
            return False
        from meshray.coordination.mirror import Entry
        return bool(_decoded(self.keys.parse_node, [(key, Entry(value, revision))]))

    def cluster_resources(self) -> dict:
        totals: dict[str, float] = {}
        for record in self._alive_records().values():
            for name, amount in record.get("Resources", {}).items():
                totals[name] = totals.get(name, 0.0) + amount
        return totals

    def availabilities(self) -> dict[str, dict]:
        """Every member's published availability, by node id hex: the view's
        when it follows everyone, else read from etcd (one range read)."""
        if self.avail_bits == 0 or self.coordinator is None:
            return self._avails.snapshot()
        items, _rev = self.coordinator.get_prefix(self.keys.avail_prefix(), timeout=5.0)
        return _decoded(self.keys.parse_avail, ((kv.key, kv) for kv in items))

    def available_resources(self, local_available: dict) -> dict:
        alive = self._alive_records()
        avail = self.availabilities()
        avail[self._daemon.node_id.hex()] = local_available
        totals: dict[str, float] = {}
        for node_hex in alive:
            for name, amount in avail.get(node_hex, {}).items():
                if amount > 0:
                    totals[name] = totals.get(name, 0.0) + amount
        return totals
