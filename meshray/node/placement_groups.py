"""A node's placement-group duties.

Reservation itself is etcd's job (meshray.placement.reservation: one
transaction per group, compared against every involved node's allocation
record). Here a node carries out what etcd says about it:

- each bundle listed in its own `alloc/<node>` record becomes a *bundle
  pool*: the bundle's resources are taken out of the node's general pool
  (ordinary work cannot use them) and tasks/actors scheduled into that bundle
  acquire from the pool instead;
- work with a PlacementGroupSchedulingStrategy goes to the node holding its
  bundle (waiting while the bundle is unplaced), and fails fast with
  TaskPlacementGroupRemoved / ActorPlacementGroupRemoved once the group is
  removed -- queued, waiting or running.
"""
from __future__ import annotations

import asyncio
import logging
import time

import cloudpickle

from meshray import exceptions
from meshray.node.state import messages as m
from meshray.node.task_lifecycle import TaskState
from meshray.placement.snapshot import get_record
from meshray.scheduler.resources import ResourceSet, UnitInstanceAllocator

__all__ = ["PlacementDuties", "BundlePool"]

log = logging.getLogger(__name__)

MISSING_GROUP_GRACE_S = 10.0


class BundlePool:
    """The resources of one bundle reserved on this node."""

    def __init__(self, pg_hex: str, index: int, resources: dict):
        self.pg_hex = pg_hex
        self.index = index
        self.total = ResourceSet.from_dict(resources)
        self.available = self.total
        self.acquired_from_node = False   # taken out of the node's general pool yet?
        self.allocation = None            # device assignment of the whole bundle
        self.gpus: UnitInstanceAllocator | None = None
        self.tasks: set = set()

    def fits(self, request: ResourceSet) -> bool:
        return self.acquired_from_node and request.fits_in(self.available)

    def take(self, request: ResourceSet) -> None:
        self.available = self.available - request

    def give(self, request: ResourceSet) -> None:
        self.available = self.available + request


def pg_strategy(spec):
    """The task's PlacementGroupSchedulingStrategy, or None."""
    if not spec.strategy_blob or spec.scheduling_strategy != "PlacementGroupSchedulingStrategy":
        return None
    strategy = cloudpickle.loads(spec.strategy_blob)
    return strategy if getattr(strategy, "placement_group", None) is not None else None


class PlacementDuties:
    """The bundle pools reserved on this node, and the group work it routes.

    It owns the group records as last read from etcd (`records`), the
    bundle pools listed in this node's allocation record (`bundles`) and the
    work waiting for its bundle to be placed (`waiting`). It is given the
    node because carrying out what etcd says moves tasks through the
    lifecycle the daemon owns (fail, cancel, finish, move, enqueue, spill,
    schedule, kill an actor, pin a task's GPUs), takes bundles out of the
    node's resources, and asks the node's membership (its group snapshot,
    placer and keyspace), all of which change as the node runs.
    """

    def __init__(self, node):
        self._node = node
        self.records: dict[str, object] = {}
        self.bundles: dict[tuple, BundlePool] = {}
        self._leaving: dict[tuple, BundlePool] = {}   # dropped, the reason being read
        self.waiting: list = []

    # ------------------------------------------------------------ etcd view
    def on_change(self) -> None:
        """Our alloc record or some group record changed: follow what etcd says."""
        if self._node.membership is None:
            return
        records, own_alloc = self._node.membership.pg_snapshot()
        self.records = records
        wanted = {}
        if own_alloc is not None:
            for bundle in own_alloc.bundles:
                wanted[(bundle.pg_id, bundle.index)] = bundle.resources
        for key in [k for k in self.bundles if k not in wanted]:
            pool = self.bundles.pop(key)
            record = self.records.get(pool.pg_hex)
            if record is None or record.state == "REMOVED":
                self._drop_bundle(pool, self.known_gone(pool.pg_hex))
            else:
                self._drop_when_known(pool)
        for key, resources in wanted.items():
            if key not in self.bundles:
                self.bundles[key] = BundlePool(key[0], key[1], resources)
        self.take_bundles()
        self._fail_removed_group_work()
        self._route_waiting()
        self._follow_needed()
        self._node.dispatch.schedule()

    def _follow_needed(self) -> None:
        """Tell the membership which groups this node needs records of: those
        with a bundle here or work waiting here (node/group_follow.py)."""
        membership = self._node.membership
        if membership is not None:
            membership.follow_groups({pg for pg, _index in self.bundles}
                                     | {task.pg_hex for task in self.waiting})

    def known_gone(self, pg_hex: str) -> bool:
        """Whether the group is removed: its record says so, or this node
        follows it and it has no record (group_follow.py: a record not
        followed yet proves nothing)."""
        record = self.records.get(pg_hex)
        if record is not None:
            return record.state == "REMOVED"
        membership = self._node.membership
        return membership is None or membership.follows_group(pg_hex)

    def take_bundles(self) -> None:
        """Move reserved bundles out of the general pool (as soon as it has room)."""
        for pool in self.bundles.values():
            if pool.acquired_from_node:
                continue
            if self._node.config.gpu_ids and pool.total.get("GPU"):
                allocation = self._node.resources.allocate(pool.total)
                if allocation is None:
                    continue
                pool.allocation = allocation
                pool.gpus = UnitInstanceAllocator(list(allocation.instances.get("GPU", ())), "GPU")
            elif not self._node.resources.try_acquire(pool.total):
                continue
            pool.acquired_from_node = True

    def _drop_when_known(self, pool: BundlePool) -> None:
        """The bundle left our alloc record, and the group's record here does
        not say it was removed -- yet. The transaction that removes a group
        writes its record and the allocation records at one revision, but
        they reach this node on different watches (the record perhaps on a
        watch of its own: group_follow.py), so ask etcd, then drop."""
        loop = asyncio.get_running_loop()
        key = (pool.pg_hex, pool.index)
        self._leaving[key] = pool

        async def confirm() -> None:
            removed = False
            try:
                coordinator = await self._node._coordinator()
                if coordinator is not None:
                    record, _rev = await loop.run_in_executor(
                        None, get_record, coordinator, pool.pg_hex, self._node.membership.keys)
                    removed = record is None or record.state == "REMOVED"
            except Exception as exc:  # noqa: BLE001 - unread or unreadable: taken as moved
                log.warning("could not read placement group %s: %s", pool.pg_hex, exc)
            if self._leaving.get(key) is pool:
                del self._leaving[key]
            self._drop_bundle(pool, removed)
            self.take_bundles()
            self._node.dispatch.schedule()

        loop.create_task(confirm())

    def _drop_bundle(self, pool: BundlePool, removed: bool) -> None:
        """The bundle left our alloc record: its work stops, its resources
        return; `removed`: because its group was removed (else it moved)."""
        for task in list(pool.tasks):
            self._stop_group_task(task, removed)
        if pool.acquired_from_node:
            self._node.resources.release(pool.allocation if pool.allocation is not None else pool.total)
            pool.acquired_from_node = False

    def _stop_group_task(self, task, removed: bool) -> None:
        error = self.group_removed_error(task) if removed else None
        if task.actor is not None:
            self._node.dispatch.handle(m.KillActor(task.actor, removed, (
                "its placement group was removed" if removed else "its bundle moved")))
            return
        if task.worker is not None and task.state == "running":
            # Whether the group was removed or the bundle moved is decided when
            # the worker is gone (our view of the group may lag the alloc change).
            self._node.dispatch.handle(m.StopRunning(task, "bundle_left"))
        elif error is not None:
            self._node._cancel(task, force=False, recursive=False)

    def group_removed_error(self, task):
        group = task.pg_hex or "?"
        if task.actor is not None:
            return exceptions.ActorPlacementGroupRemoved(
                f"actor {task.actor.actor_id.hex()} cannot run: placement group {group} "
                "was removed")
        return exceptions.TaskPlacementGroupRemoved(
            f"task {task.spec.name} (id {task.task_id.hex()}) cannot run: placement group "
            f"{group} was removed")

    def _fail_removed_group_work(self) -> None:
        now = time.monotonic()
        for task in list(self.waiting):
            record = self.records.get(task.pg_hex)
            missing_too_long = (record is None and now - task.pg_since > MISSING_GROUP_GRACE_S
                                and not self._node.membership.placer.creating(task.pg_hex)
                                and self._node.membership.follows_group(task.pg_hex))
            if (record is not None and record.state == "REMOVED") or missing_too_long:
                self.waiting.remove(task)
                self._node._fail(task, self.group_removed_error(task))
        for task in list(self._node.queue):
            if task.pg_hex:
                record = self.records.get(task.pg_hex)
                if record is not None and record.state == "REMOVED":
                    self._node._fail(task, self.group_removed_error(task))   # out of line too

    # ------------------------------------------------------------ routing
    def route_to_group(self, task) -> None:
        """Send group work to the node with its bundle, or hold it until placed."""
        strategy = pg_strategy(task.spec)
        task.pg_hex = strategy.placement_group.id.hex()
        task.pg_index = int(strategy.placement_group_bundle_index)
        if not task.pg_since:
            task.pg_since = time.monotonic()
        record = self.records.get(task.pg_hex)
        removing = self._node.membership is not None and self._node.membership.placer.removing(task.pg_hex)
        if (record is None or record.state != "REMOVED") and not removing:
            target = self._bundle_target(task, record) if record is not None else None
            if target is None:
                self.waiting.append(task)
                self._node._move(task, TaskState.WAITING_GROUP, f"no bundle reserved yet in group {task.pg_hex}")
                if record is None and self._node.membership is not None:
                    self._node.membership.need_group(task.pg_hex)
                return
            node, index = target
            if node == self._node.node_hex:
                task.bundle = (task.pg_hex, index)
                self._node.dispatch.handle(m.Enqueue(
                    task, f"its bundle {index} of group {task.pg_hex} is here"))
            else:
                self._node.peers.spill(task, [node])
            return
        self._node._fail(task, self.group_removed_error(task))

    def _bundle_target(self, task, record):
        placement = list(record.placement)
        if task.pg_index >= 0:
            if task.pg_index >= len(placement):
                return None
            node = placement[task.pg_index]
            return (node, task.pg_index) if node else None
        choices = [(node, i) for i, node in enumerate(placement) if node]
        if not choices:
            return None
        for node, index in choices:   # prefer a local bundle with room
            pool = self.bundles.get((task.pg_hex, index))
            if node == self._node.node_hex and pool is not None and pool.fits(task.hold):
                return node, index
        for node, index in choices:
            if node == self._node.node_hex:
                return node, index
        return choices[0]

    def _route_waiting(self) -> None:
        waiting, self.waiting = self.waiting, []
        for task in waiting:
            if not task.cancelled:
                self._node._move(task, TaskState.WAITING, "routed again: the group view changed")
                self.route_to_group(task)

    def bind_bundle(self, task) -> bool:
        """A spilled-in group task: run it only if its bundle is reserved here."""
        strategy = pg_strategy(task.spec)
        if strategy is None:
            return True
        task.pg_hex = strategy.placement_group.id.hex()
        index = int(strategy.placement_group_bundle_index)
        keys = ([(task.pg_hex, index)] if index >= 0 else
                [k for k in self.bundles if k[0] == task.pg_hex])
        for key in keys:
            pool = self.bundles.get(key)
            if pool is not None and task.hold.fits_in(pool.total):   # it may queue for room
                task.bundle = key
                return True
        return False

    # ------------------------------------------------------------ accounting
    def try_acquire_bundle(self, task) -> bool:
        pool = self.bundles.get(task.bundle)
        if pool is None or not pool.fits(task.hold):
            return False
        if pool.gpus is not None and task.hold.get("GPU"):
            ids = pool.gpus.assign(task.hold.get("GPU"))
            if ids is None:
                return False
            task.bundle_gpu_ids = ids       # the node state pins its worker to them
        pool.take(task.hold)
        pool.tasks.add(task)
        return True

    def release_bundle(self, task) -> None:
        pool = self.bundles.get(task.bundle) or self._leaving.get(task.bundle)
        if pool is None:
            return
        if task.bundle_gpu_ids and pool.gpus is not None:
            pool.gpus.release(task.bundle_gpu_ids, task.hold.get("GPU"))
        task.bundle_gpu_ids = []
        pool.give(task.hold)
        pool.tasks.discard(task)

    # ------------------------------------------------------------ requests
    # Creations and removals go to the node's GroupPlacer, which commits what
    # has queued up in a few batched transactions, in submission order. The
    # part of each handler before its first await runs in the order the
    # requests arrived (asyncio starts tasks FIFO), so a client's requests
    # are queued in the order it sent them; reads wait behind a barrier for
    # everything queued before them, so every client reads its own writes
    # even when it did not wait for the replies (the public API does not, for
    # unnamed creations and for removals).
    def _pg_placer(self):
        if self._node.membership is None:
            raise ConnectionError("this node is not connected to etcd")
        return self._node.membership.placer

    async def _pg_request(self, conn, method: str, payload: dict) -> dict:
        from meshray.placement import reservation
        barrier = self._pg_placer().barrier()
        await asyncio.wrap_future(barrier)
        coordinator = await self._node._coordinator()
        if coordinator is None:
            raise ConnectionError("this node is not connected to etcd")
        job = conn.job_id.hex() if getattr(conn, "job_id", b"") else None
        namespace = getattr(conn, "namespace", None) or None
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: reservation.handle_request(
                coordinator, method, payload, node_id=self._node.node_hex, keys=self._node.membership.keys,
                job_id=job, namespace=namespace))

    @staticmethod
    async def _pg_outcome(future) -> object:
        from meshray.coordination.client import CoordinationError
        try:
            return await asyncio.wrap_future(future)
        except CoordinationError:
            raise  # some are ValueErrors too, but not the caller's mistake
        except ValueError as exc:
            return {"error": {"type": "ValueError", "message": str(exc)}}

    async def ask_create(self, conn, payload):
        from meshray.placement import reservation
        placer = self._pg_placer()
        job = conn.job_id.hex() if getattr(conn, "job_id", b"") else None
        namespace = getattr(conn, "namespace", None) or None
        try:
            request = reservation.parse_create_request(payload, node_id=self._node.node_hex,
                                                       job_id=job, namespace=namespace)
        except ValueError as exc:
            return {"error": {"type": "ValueError", "message": str(exc)}}
        outcome = await self._pg_outcome(placer.submit("create", request))
        if isinstance(outcome, dict):
            return outcome
        return {"record": outcome.to_dict() if outcome is not None else None}

    async def ask_remove(self, conn, payload):
        from meshray.coordination.keyspace import id_hex
        placer = self._pg_placer()
        try:
            pg_hex = id_hex(str(payload.get("pg_id", "")), "pg_id")
        except ValueError as exc:
            return {"error": {"type": "ValueError", "message": str(exc)}}
        outcome = await self._pg_outcome(placer.submit("remove", pg_hex))
        if isinstance(outcome, dict):
            return outcome
        return {"removed": bool(outcome)}

    async def ask_get(self, conn, payload):
        return await self._pg_request(conn, "pg_get", payload)

    async def ask_get_by_name(self, conn, payload):
        return await self._pg_request(conn, "pg_get_by_name", payload)

    async def ask_table(self, conn, payload):
        return await self._pg_request(conn, "pg_table", payload)

    def drop_waiting(self, task) -> None:
        """`task` no longer waits for its bundle (it was cancelled)."""
        if task in self.waiting:
            self.waiting.remove(task)

    def remove_job_groups(self, job_id: bytes) -> None:
        """The job's driver left: remove its non-detached groups, after
        everything it asked for (queued in the same placer) is done."""
        if self._node.membership is None:
            return
        job_hex = job_id.hex()

        def report(future) -> None:
            if future.exception() is not None:
                # The orphan sweep catches up later.
                log.warning("could not remove the placement groups of job %s: %s", job_hex,
                            future.exception())

        self._node.membership.placer.submit("job_ended", job_hex).add_done_callback(report)
