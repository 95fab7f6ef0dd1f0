"""A node's actor duties (node/actor_hosting.py), acting on a stand-in node.

What an actor event means is the node state machine's to decide
(tests/unit/test_actor_life.py); ActorHosting carries out what it says. It is
given the node whose tables, peer duties and etcd it acts on; here that node
is a recorder and etcd a list of writes, so these tests check each duty:
records reach etcd in the order of their states with only the latest one
waiting, a change wakes waiters and is published only when asked, a kill
request to a host names actor, restart rule and cause, a restart places the
next attempt in the same bundle, and a creation lost with its actor finishes
with the actor's death.
"""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from meshray import exceptions
from meshray.coordination.keyspace import Keyspace
from meshray.node import actors as actor_states
from meshray.node.actor_hosting import ActorHosting
from meshray.node.actors import ActorEntry
from meshray.node.cluster_view import ClusterView
from meshray.node.event_log import EventLog
from meshray.node.tasks import TaskRecord
from meshray.node.objects import error_of
from meshray.rpc.generated import meshray_pb2 as pb

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
        self.events = EventLog()
        self.etcd = _Etcd()
        self.membership = SimpleNamespace(keys=Keyspace())
        self.placed, self.sent, self.finished = [], [], []
        self.peers = SimpleNamespace(view=ClusterView(HERE), place_or_queue=self.placed.append,
                                     send=lambda node_hex, event: self.sent.append(
                                         (node_hex, event)))

    async def _coordinator(self):
        return self.etcd

    def _finish(self, task, values, error=None):
        self.finished.append((task, values, error))

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


def test_records_reach_etcd_in_the_order_of_their_states_and_only_the_latest_waits():
    async def scenario():
        node = _Node()
        part = ActorHosting(node)
        first = part.admit(_entry(1))
        actor_states.apply(first, "created")
        part.changed(first, True)            # before the writer ran: PENDING is never written
        second = part.admit(_entry(2))
        await _until(lambda: len(node.etcd.writes) == 2)
        keys = Keyspace()
        assert node.etcd.writes == [("put", keys.actor(first.actor_id), "ALIVE"),
                                    ("put_if_absent", keys.actor(second.actor_id), "PENDING")]
        assert node.actors == {first.actor_id: first, second.actor_id: second}
    asyncio.run(scenario())


def test_a_change_wakes_who_waits_on_the_actor_and_is_published_only_when_asked():
    async def scenario():
        node = _Node()
        part = ActorHosting(node)
        entry = part.admit(_entry(1))
        await _until(lambda: len(node.etcd.writes) == 1)
        waiter = asyncio.get_running_loop().create_future()
        entry.waiters.append(waiter)
        actor_states.apply(entry, "created")
        part.changed(entry, False)
        assert waiter.done() and entry.waiters == []
        await asyncio.sleep(0)
        assert len(node.etcd.writes) == 1
    asyncio.run(scenario())


def test_asking_a_host_to_kill_names_the_actor_the_restart_rule_and_the_cause():
    node = _Node()
    part = ActorHosting(node)
    entry = _entry(1, max_restarts=-1)
    entry.remote_node = PEER
    part.ask_host_to_kill(entry, True, "stopped by its owner")
    ((to, event),) = node.sent
    assert to == PEER and event.request.method == "kill_actor"
    assert json.loads(event.request.payload) == {
        "actor_id": entry.actor_id.hex(), "no_restart": True, "cause": "stopped by its owner"}


def test_a_restart_places_the_next_attempt_of_the_creation_in_the_same_bundle():
    node = _Node()
    part = ActorHosting(node)
    entry = _entry(1, max_restarts=1)
    entry.bundle_task = SimpleNamespace(bundle=("g" * 8, 0))
    part.restart(entry)
    (restart,) = node.placed
    assert restart.actor is entry and restart.spec.attempt == entry.spec.attempt + 1
    assert restart.bundle == ("g" * 8, 0) and entry.bundle_task is None
    assert node.tasks == {restart.task_id: restart}


def test_a_creation_lost_with_its_actor_finishes_with_the_actors_death():
    node = _Node()
    part = ActorHosting(node)
    entry = _entry(1, class_name="Counter")
    entry.death_cause = "the worker died"
    creation = TaskRecord.from_spec(entry.spec, None, "default", return_ids=[b"r" * 28],
                                    actor=entry)
    part.creation_lost(creation, entry)
    ((task, values, error),) = node.finished
    assert task is creation and isinstance(error, exceptions.ActorDiedError)
    (value,) = values
    died = error_of(value)
    assert value.is_error and isinstance(died, exceptions.ActorDiedError)
    assert "the worker died" in str(died)
