"""The node daemon's actor duties (`daemon.hosting`, an ActorHosting).

Creation is an ordinary queued task whose worker is then kept for the actor;
after that, callers talk to the actor's worker directly and the daemon only
hears about lifecycle events: created, worker died, killed, exiting. What
each means for the actor is decided by the node's state machine
(``node/state/actor_life.py``); this carries out what it says -- publish the
record to etcd (the actor directory) off the event loop, free a dead actor's
name, place a restart, ask a host to kill -- and answers questions about
actors.
"""
from __future__ import annotations

import asyncio
import json
import logging

from meshray import exceptions
from meshray.node import actors as actor_states
from meshray.node.actors import ActorEntry
from meshray.node.objects import error_value
from meshray.node.state import messages as m
from meshray.node.tasks import TaskRecord
from meshray.rpc import strict
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["ActorHosting"]

log = logging.getLogger(__name__)

ACTOR_WAIT_S = 60.0


class ActorHosting:
    """The actors this node creates and hosts, from creation to death.

    It owns the actor records queued for etcd and the task writing them.
    It keeps the node's actor and task tables, which live as long as the
    node, and the node itself for what is made later or belongs to another
    part: membership (etcd, once a member), resources, the worker pool,
    dispatch, placement groups, the peer duties (an actor hosted elsewhere
    is reached there), the task events and event log, and the task
    lifecycle the node owns (finish, cancel).
    """

    def __init__(self, node):
        self._node = node
        self._node_hex = node.node_hex
        self._actors, self._tasks = node.actors, node.tasks
        self._records: dict = {}       # actor id -> (record, first): queued for etcd
        self._publisher = None         # the task writing them, in order

    # ------------------------------------------------------------ lifecycle
    def admit(self, entry: ActorEntry) -> ActorEntry:
        """A new actor created here or hosted for a peer: into the node's table,
        its first record on its way to etcd."""
        self._actors[entry.actor_id] = entry
        self.publish(entry)
        return entry

    def changed(self, entry: ActorEntry, publish: bool) -> None:
        """`entry` changed: wake who waits on it; queue its record for etcd."""
        entry.wake()
        if publish:
            self.publish(entry)

    def restart(self, entry: ActorEntry) -> None:
        """Place a new creation task for `entry` (a new attempt of its spec)."""
        spec = pb.TaskSpec()
        spec.CopyFrom(entry.spec)
        spec.attempt += 1
        task = TaskRecord.from_spec(spec, entry.owner, self._node._env_key(spec), return_ids=[],
                                    actor=entry)
        if entry.bundle_task is not None:
            task.bundle = entry.bundle_task.bundle   # restarts stay in the same bundle
        entry.bundle_task = None
        self._tasks[spec.task_id] = task
        self._node.peers.place_or_queue(task)

    def ask_host_to_kill(self, entry: ActorEntry, no_restart: bool, cause: str) -> None:
        self._node.peers.send(entry.remote_node, pb.PeerEvent(request=pb.Request(
            request_id=0, method="kill_actor", payload=json.dumps({
                "actor_id": entry.actor_id.hex(), "no_restart": no_restart,
                "cause": cause}).encode())))

    def creation_lost(self, task, entry: ActorEntry) -> None:
        """`entry` died before its creation `task` returned: that is the task's result."""
        values = [self._actor_error_value(oid, entry) for oid in task.return_ids]
        self._node._finish(task, values, exceptions.ActorDiedError(error_message=entry.death_cause))

    def on_actor_exiting(self, conn, msg: pb.ActorExiting) -> None:
        entry = self._actors.get(msg.actor_id)
        if entry is None:
            return
        if conn.worker is None or conn.worker.actor is not entry:
            # Else any process could turn an actor's later crash into an intended exit.
            raise strict.Malformed(
                f"actor_exiting.actor_id={msg.actor_id.hex()}: only the worker hosting an "
                "actor may say that it exits")
        self._node.dispatch.handle(m.ActorExiting(entry, msg.restartable, msg.reason))

    def on_task_events(self, conn, msg: pb.ActorTaskEvents) -> None:
        worker = conn.worker
        if worker is None or worker.actor is None:
            raise strict.Malformed("task_events: only the worker hosting an actor reports "
                                   "its method calls")
        self._node.task_events.actor_calls(worker.worker_id, worker.pid,
                                           worker.actor.actor_id, msg)

    def _actor_error_value(self, object_id: bytes, entry: ActorEntry) -> pb.ObjectValue:
        return error_value(object_id, exceptions.ActorDiedError(
            actor_id=entry.actor_id.hex(), class_name=entry.options.get("class_name"),
            name=entry.options.get("name") or None, node_id=self._node_hex,
            error_message=entry.death_cause))

    # ------------------------------------------------------------ etcd
    def publish(self, entry: ActorEntry) -> None:
        """Queue `entry`'s record for etcd; records reach etcd in the order
        their states were reached.

        Writes made independently could land in either order: an actor's
        ALIVE record overwritten by its older PENDING one would leave callers
        on other nodes waiting for an actor that is already serving. So one
        writer per node takes the records in order, and only the latest
        record of an actor waits in the queue (an older one is never written
        after a newer one). The creator's first record (PENDING, no restart
        yet) is written only if the key is absent: the node that hosts the
        actor may already have published that it is ALIVE.
        """
        record = entry.encode(self._node_hex)
        first = entry.state == actor_states.PENDING and entry.num_restarts == 0
        self._records.pop(entry.actor_id, None)      # keep queue order = change order
        self._records[entry.actor_id] = (record, first)
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.get_running_loop().create_task(self._publish_records())

    async def _publish_records(self) -> None:
        loop = asyncio.get_running_loop()
        while self._records:
            coordinator = await self._node._coordinator()
            if coordinator is None:
                self._records.clear()     # not a member: nothing to publish into
                return
            actor_id, (record, first) = next(iter(self._records.items()))
            del self._records[actor_id]   # a newer record arriving now is written next
            key = self._node.membership.keys.actor(actor_id)
            try:
                if first:
                    await loop.run_in_executor(None, coordinator.put_if_absent, key, record)
                else:
                    await loop.run_in_executor(None, coordinator.put, key, record)
            except Exception as exc:  # noqa: BLE001 - the local table stays authoritative
                log.warning("could not publish actor %s: %s", actor_id.hex(), exc)

    def release_name(self, entry: ActorEntry) -> None:
        """Free the dead actor's name in etcd (if it still maps to this actor)."""
        name = entry.options.get("name")
        if not name:
            return
        namespace = entry.options.get("namespace") or ""

        async def release():
            from meshray.coordination.client import Delete, ValueEquals
            coordinator = await self._node._coordinator()
            if coordinator is None:
                return
            key = self._node.membership.keys.actor_name(namespace, name)
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: coordinator.txn([ValueEquals(key, entry.actor_id.hex().encode())],
                                              [Delete(key)]))

        asyncio.get_running_loop().create_task(release())

    async def _etcd_call(self, fn, *args):
        coordinator = await self._node._coordinator()
        if coordinator is None:
            raise ConnectionError("this node is not connected to etcd")
        return await asyncio.get_running_loop().run_in_executor(None, fn, coordinator, *args)

    # ------------------------------------------------------------ questions
    async def ask_actor_info(self, conn, payload: dict) -> dict:
        """The actor's record; with wait, once it is DEAD or ALIVE with a live worker.

        The node hosting the actor answers for it; the node that created it
        answers while it is being placed or restarted after its host died.
        Incarnation counts are not compared: a restart elsewhere starts a new
        host entry, so only "is what you would dial alive" is well defined.
        """
        actor_id = bytes.fromhex(payload["actor_id"])
        entry = self._actors.get(actor_id)
        timeout = float(payload.get("timeout", ACTOR_WAIT_S))
        if entry is None:
            return await self._remote_actor_info(actor_id, payload, timeout)
        peers = self._node.peers
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = max(0.0, deadline - loop.time())
            host = entry.remote_node
            if host and host not in peers.view.known_dead and entry.state == actor_states.ALIVE:
                try:
                    record = await peers.ask(host, "actor_info",
                                             {**payload, "timeout": remaining}, remaining + 10)
                except (ConnectionError, asyncio.TimeoutError):
                    if host in peers.view.known_dead and loop.time() < deadline:
                        continue   # its host died while we asked: we restart it
                    raise
                entry.num_restarts = max(entry.num_restarts, int(record.get("num_restarts", 0)))
                return record
            if payload.get("wait") and not entry.settled() and remaining > 0:
                await entry.wait_settled(remaining)
                if entry.settled() and loop.time() < deadline:
                    continue
            return entry.record(self._node_hex)

    async def _remote_actor_info(self, actor_id: bytes, payload: dict, timeout: float) -> dict:
        """An actor neither hosted nor created here: etcd says where; ask that node.

        A failed etcd read says nothing about the actor (etcd may be stalled
        or electing a leader): it is retried until the caller's deadline.
        """
        peers = self._node.peers
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        failures = 0
        while True:
            try:
                record = await self._etcd_call(self._read_actor_record, actor_id)
            except Exception as exc:  # noqa: BLE001 - etcd trouble, not the actor's fate
                failures += 1
                if loop.time() >= deadline:
                    raise ConnectionError(f"could not read the record of actor {actor_id.hex()} "
                                          f"from etcd within {timeout:.0f}s: {exc}") from exc
                if failures == 1:
                    log.warning("reading the record of actor %s from etcd failed (%s); "
                                "retrying", actor_id.hex(), exc)
                await asyncio.sleep(min(0.1 * 2 ** failures, 1.0, max(0.0, deadline - loop.time())))
                continue
            failures = 0
            node = record.get("node_id", "")
            if record.get("state") == "UNKNOWN":
                # No record yet is not "no such actor": its creator queues the
                # first record for etcd (publish) while the handle may
                # already be in a task on this node. The creator, named by the
                # actor id's prefix, knows the actor from the start.
                creator = peers.view.node_for_prefix(actor_id)
                if creator is not None and creator != self._node_hex:
                    remaining = max(0.0, deadline - loop.time())
                    return await peers.ask(creator, "actor_info",
                                           {**payload, "timeout": remaining}, remaining + 10)
                return record
            if record.get("state") == "DEAD":
                return record
            if node == self._node_hex:
                entry = self._actors.get(actor_id)
                if entry is not None:
                    return entry.record(self._node_hex)
            elif node in peers.view.nodes and record.get("state") == "ALIVE":
                return await peers.ask(node, "actor_info", payload, timeout + 10)
            if not payload.get("wait") or loop.time() >= deadline:
                return record
            await asyncio.sleep(0.2)  # placed, restarting, or its host just died

    def _read_actor_record(self, coordinator, actor_id: bytes) -> dict:
        from meshray.coordination import keyspace
        value, _rev = coordinator.get(self._node.membership.keys.actor(actor_id))
        if value is None:
            return {"actor_id": actor_id.hex(), "state": "UNKNOWN"}
        return keyspace.decode_json(value)

    async def ask_kill_actor(self, conn, payload: dict) -> dict:
        peers = self._node.peers
        actor_id = bytes.fromhex(payload["actor_id"])
        entry = self._actors.get(actor_id)
        if entry is not None and entry.remote_node \
                and entry.remote_node not in peers.view.known_dead:
            return await peers.ask(entry.remote_node, "kill_actor", payload)
        if entry is None:
            record = await self._etcd_call(self._read_actor_record, actor_id)
            node = record.get("node_id", "")
            if node and node != self._node_hex and node in peers.view.nodes:
                return await peers.ask(node, "kill_actor", payload)
            raise ValueError(f"actor {payload['actor_id']} is not known to this node "
                             f"(its record says state {record.get('state')}, node {node or '?'})")
        self._node.dispatch.handle(m.KillActor(
            entry, bool(payload.get("no_restart", True)),
            payload.get("cause") or "the actor was killed with meshray.kill()"))
        return {"ok": True}

    async def ask_claim_actor_name(self, conn, payload: dict) -> dict:
        """Claim (namespace, name) for an actor in one etcd transaction."""
        from meshray.coordination.client import Get, KeyMissing, Put

        def claim(coordinator):
            key = self._node.membership.keys.actor_name(payload["namespace"], payload["name"])
            result = coordinator.txn([KeyMissing(key)], [Put(key, payload["actor_id"].encode())],
                                     [Get(key)])
            if result.succeeded:
                return {"claimed": True}
            value, _revision = result.responses[0]
            return {"claimed": False, "existing": (value or b"").decode()}

        return await self._etcd_call(claim)

    async def ask_get_named_actor(self, conn, payload: dict) -> dict:
        def lookup(coordinator):
            from meshray.coordination import keyspace
            key = self._node.membership.keys.actor_name(payload["namespace"], payload["name"])
            value, _ = coordinator.get(key)
            if value is None:
                return {"state": "UNKNOWN"}
            record_value, _ = coordinator.get(self._node.membership.keys.actor(value.decode()))
            if record_value is None:
                return {"actor_id": value.decode(), "state": "PENDING"}
            return keyspace.decode_json(record_value)

        return await self._etcd_call(lookup)

    async def ask_list_actors(self, conn, payload: dict) -> list:
        def listing(coordinator):
            from meshray.coordination import keyspace
            items, _rev = coordinator.get_prefix(self._node.membership.keys.actors_prefix())
            return [keyspace.decode_json(item[1]) for item in items]

        return await self._etcd_call(listing)
