"""A node's actor duties (node/actor_hosting.py), acting on a stand-in node.

ActorHosting is given the node whose actor and task tables, resources, pool,
peer duties and etcd it acts on; here that node is a recorder and etcd a
list of writes, so these tests check what each actor event makes it do:
records reach etcd in the order of their states with only the latest one
waiting, a kill goes to the host of an actor running elsewhere, an actor
not started yet dies by its creation being cancelled, a hosting worker's
death gives the actor's resources back and places its restart, an actor
whose host died restarts while it may, and a departing process takes only
its non-detached actors with it.
"""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from meshray.coordination.keyspace import Keyspace
from meshray.node import actors as actor_states
from meshray.node.actor_hosting import ActorHosting
from meshray.node.actors import ActorEntry
from meshray.node.cluster_view import ClusterView
from meshray.node.event_log import EventLog
from meshray.node.tasks import TaskRecord
from meshray.node.worker_pool import WorkerProcess
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.scheduler.resources import NodeResources, ResourceSet

HERE, PEER = "aa" * 28, "bb" * 28
DEADLINE_S = 10.0


class _Etcd:
    """The coordinator's writes, in order: (call, key, the record's state)."""

    def __init__(self):
        self.writes = []

    def put(self, key, value):
        self.writes.append(("put", key, json.loads(value)["state"]))

    def put_if_absent(self, key, value):
        self.writes.append(("put_if_absent", key, json.loads(value)["state"]))


class _Node:
    """What ActorHosting reads and calls on its node, recorded."""

    def __init__(self):
        self.node_hex = HERE
        self.actors, self.tasks = {}, {}
        self.resources = NodeResources({"CPU": 2.0})
        self.events = EventLog()
        self.etcd = _Etcd()
        self.membership = SimpleNamespace(keys=Keyspace())
        self.killed, self.placed, self.sent, self.cancelled, self.finished = [], [], [], [], []
        self.pool = SimpleNamespace(kill=self.killed.append)
        self.dispatch = SimpleNamespace(release=lambda task: None)
        self.peers = SimpleNamespace(view=ClusterView(HERE), place_or_queue=self.placed.append,
                                     send=lambda node_hex, event: self.sent.append(
                                         (node_hex, event)))
        self.task_events = SimpleNamespace(worker_gone=lambda worker_id: None)

    async def _coordinator(self):
        return self.etcd

    def _finish(self, task, values, error=None):
        self.finished.append(task)

    def _cancel(self, task, force, recursive):
        self.cancelled.append(task)

    def _env_key(self, spec):
        return "default"


def _entry(number: int, *, owner=None, **options) -> ActorEntry:
    spec = pb.TaskSpec(task_id=bytes([number]) * 4, actor_id=bytes([number]) * 16,
                       name=f"A{number}", actor_creation=True, held_resources={"CPU": 1.0},
                       actor_options=json.dumps(options).encode())
    return ActorEntry.from_spec(spec, owner)


async def _until(condition) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def _hosting_a_created_actor(**options):
    """A stand-in node, its ActorHosting, and one actor it has created."""
    node = _Node()
    part = ActorHosting(node)
    entry = part.admit(_entry(1, **options))
    part.set_state(entry, "created")
    return node, part, entry


def test_records_reach_etcd_in_the_order_of_their_states_and_only_the_latest_waits():
    async def scenario():
        node = _Node()
        part = ActorHosting(node)
        first = part.admit(_entry(1))
        part.set_state(first, "created")     # before the writer ran: PENDING is never written
        second = part.admit(_entry(2))
        await _until(lambda: len(node.etcd.writes) == 2)
        keys = Keyspace()
        assert node.etcd.writes == [("put", keys.actor(first.actor_id), "ALIVE"),
                                    ("put_if_absent", keys.actor(second.actor_id), "PENDING")]
        assert node.actors == {first.actor_id: first, second.actor_id: second}
    asyncio.run(scenario())


def test_killing_an_actor_hosted_elsewhere_asks_its_host_and_stops_restarting_it():
    async def scenario():
        node = _Node()
        part = ActorHosting(node)
        entry = part.admit(_entry(1, max_restarts=-1))
        entry.remote_node = PEER
        part.kill(entry, no_restart=True, cause="stopped by its owner")
        ((to, event),) = node.sent
        assert to == PEER and event.request.method == "kill_actor"
        assert json.loads(event.request.payload) == {
            "actor_id": entry.actor_id.hex(), "no_restart": True, "cause": "stopped by its owner"}
        assert entry.state == actor_states.DEAD and entry.death_cause == "stopped by its owner"
        assert node.killed == [] and node.cancelled == []
    asyncio.run(scenario())


def test_an_actor_not_started_yet_dies_by_its_creation_being_cancelled():
    async def scenario():
        node = _Node()
        part = ActorHosting(node)
        entry = part.admit(_entry(1))
        creation = TaskRecord.from_spec(entry.spec, None, "default", return_ids=[], actor=entry)
        node.tasks[creation.task_id] = creation
        part.kill(entry, no_restart=True, cause="killed before it started")
        assert node.cancelled == [creation] and node.killed == []
        assert entry.state == actor_states.DEAD
        await _until(lambda: node.etcd.writes[-1:] == [
            ("put", Keyspace().actor(entry.actor_id), "DEAD")])
    asyncio.run(scenario())


def test_a_hosting_workers_death_gives_the_resources_back_and_places_the_restart():
    async def scenario():
        node, part, entry = _hosting_a_created_actor(max_restarts=1)
        assert node.resources.try_acquire(entry.hold)
        entry.holding = True
        worker = WorkerProcess(worker_id=b"\x09" * 4, env_key="default",
                               process=SimpleNamespace(pid=9, poll=lambda: 1))
        worker.actor, entry.worker = entry, worker
        part.worker_died(worker)
        assert node.resources.available == ResourceSet.from_dict({"CPU": 2.0})
        assert entry.state == actor_states.RESTARTING and entry.num_restarts == 1
        (restart,) = node.placed
        assert restart.actor is entry and restart.spec.attempt == entry.spec.attempt + 1
        assert node.tasks == {restart.task_id: restart}
    asyncio.run(scenario())


def test_a_departing_process_takes_only_its_non_detached_actors():
    async def scenario():
        node = _Node()
        part = ActorHosting(node)
        owner, other = SimpleNamespace(pid=7), SimpleNamespace(pid=8)
        mine = part.admit(_entry(1, owner=owner))
        detached = part.admit(_entry(2, owner=owner, lifetime="detached"))
        theirs = part.admit(_entry(3, owner=other))
        part.owner_left(owner)
        assert mine.state == actor_states.DEAD and "pid 7" in mine.death_cause
        assert detached.state == theirs.state == actor_states.PENDING
    asyncio.run(scenario())


def test_an_actor_whose_host_died_restarts_while_restarts_are_left_then_dies():
    async def scenario():
        node, part, entry = _hosting_a_created_actor(max_restarts=1)
        entry.remote_node = PEER
        part.host_died(entry, PEER)
        assert entry.state == actor_states.RESTARTING and entry.remote_node == ""
        assert [task.actor for task in node.placed] == [entry]
        part.set_state(entry, "created")
        entry.remote_node = PEER
        part.host_died(entry, PEER)
        assert entry.state == actor_states.DEAD and PEER in entry.death_cause
        assert len(node.placed) == 1
        await _until(lambda: node.etcd.writes[-1:] == [
            ("put", Keyspace().actor(entry.actor_id), "DEAD")])
    asyncio.run(scenario())
