"""A peer's death as this node's peer duties (node/cluster.py) handle it.

PeerDuties is given the node whose tables, queue and lifecycles it acts on;
here that node is a recorder with one free CPU that dispatch never takes,
so these tests check what a death undoes: work offered to the dead peer is
retried here (never offered to it again), work it sent here is dropped, a
question out to it fails at once naming it, the actors it owned die, and a
death seen twice is handled (and reported to `on_death`) once.
"""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from meshray.node.cluster import PeerDuties, RemoteOwner
from meshray.node.objects import ObjectDirectory
from meshray.node.state import messages as m
from meshray.node.task_lifecycle import TaskState, move
from meshray.node.tasks import TaskQueue, TaskRecord
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.scheduler.resources import NodeResources, ResourceSet

HERE, DEAD_PEER, LIVE_PEER = "aa" * 28, "bb" * 28, "cc" * 28


class _Node:
    """What PeerDuties reads and calls on its node, recorded."""

    def __init__(self):
        self.node_id = bytes.fromhex(HERE)
        self.node_hex = HERE
        self.config = SimpleNamespace(labels={}, token=None)
        self.resources = NodeResources({"CPU": 1.0})
        self.queue = TaskQueue()
        self.objects = ObjectDirectory()
        self.store = None
        self.functions, self.tasks, self.actors = {}, {}, {}
        self.membership = None
        self.drain = SimpleNamespace(draining=False)
        # The node's state machine finds no room: work placed here queues.
        self.dispatch = SimpleNamespace(schedule=lambda: None, handle=self._handle)
        self.actor_events = []     # what the state machine is told about actors
        self.handled = []          # every event, in order

    def _move(self, task, new, cause):
        move(task, new, cause)

    def _handle(self, event):
        self.handled.append(event)
        if isinstance(event, m.Enqueue):
            self.queue.push(event.task, event.cause)
        elif isinstance(event, m.Decided):             # whatever the verdict: it waits here
            self.queue.push(event.task, f"placed here ({event.decision.kind})")
        elif isinstance(event, m.PlaceWhenArgsReady):  # as the machine, its arguments ready
            self.queue.push(event.task, "placed here (run again)")
        elif isinstance(event, m.Dequeue):
            self.queue.remove(event.task)
        elif isinstance(event, m.Release) and event.task.state is TaskState.QUEUED:
            self.queue.remove(event.task)
        elif isinstance(event, (m.OwnerNodeDied, m.ActorHostDied)):
            self.actor_events.append(event)

    def _owns(self, object_id):
        return True


def _task(node, number: int, owner) -> TaskRecord:
    spec = pb.TaskSpec(task_id=bytes([number]) * 4, name=f"t{number}", resources={"CPU": 1.0},
                       scheduling_strategy="DEFAULT")
    task = TaskRecord(spec=spec, owner=owner, return_ids=[], retries_left=1,
                      request=ResourceSet.from_dict({"CPU": 1.0}), env_key="", env_vars={})
    node.tasks[task.task_id] = task
    node.queue.push(task, "test: queued here")
    return task


def _duties():
    node = _Node()
    part = PeerDuties(node)
    part.view.update({n: {"Resources": {"CPU": 1.0}} for n in (HERE, DEAD_PEER, LIVE_PEER)},
                     {}, time.monotonic())
    deaths = []
    part.on_death = deaths.append
    return node, part, deaths


def test_a_peers_death_retries_the_work_sent_there_and_drops_the_work_it_sent_here():
    async def scenario():
        node, part, deaths = _duties()
        offered = _task(node, 1, SimpleNamespace(conn_id=1))
        node.queue.remove(offered)
        offered.remote_node = DEAD_PEER
        move(offered, TaskState.SPILLED, "test: offered to the peer")
        guest = _task(node, 2, RemoteOwner(DEAD_PEER))

        part.node_died(DEAD_PEER)

        assert offered.state == TaskState.QUEUED and offered.refused_by == {DEAD_PEER}
        assert offered.retries_left == 0 and offered.spec.attempt == 1
        assert guest.state == TaskState.DONE and guest.task_id not in node.tasks
        assert list(node.queue) == [offered]
        assert deaths == [DEAD_PEER] and DEAD_PEER in part.view.known_dead

        part.node_died(DEAD_PEER)                 # seen again: nothing more happens
        assert deaths == [DEAD_PEER] and offered.retries_left == 0
    asyncio.run(scenario())


def test_work_needing_a_copy_that_died_with_the_peer_is_retried_after_that_copy_is_dealt_with():
    # Retried at once, it could be placed where it holds the resources the
    # rebuild of its argument needs, and wait for that argument for ever.
    async def scenario():
        node, part, _deaths = _duties()
        node.store = SimpleNamespace(contains=lambda object_id: False)   # no copy here
        part._store = node.store
        held_there = b"o" * 28
        node.objects.add_holder(held_there, 1)
        node.objects.set_value(held_there, pb.ObjectValue(
            object_id=held_there, in_store=True, location=DEAD_PEER, size=10))
        needs_it = _task(node, 1, SimpleNamespace(conn_id=1))
        needs_it.spec.arg_ref_ids.append(held_there)
        plain = _task(node, 2, SimpleNamespace(conn_id=1))
        for task in (needs_it, plain):
            node.queue.remove(task)
            task.remote_node = DEAD_PEER
            move(task, TaskState.SPILLED, "test: offered to the peer")

        part.node_died(DEAD_PEER)
        assert plain.state == TaskState.QUEUED                # retried at once
        assert needs_it.state == TaskState.SPILLED            # not yet
        # Meanwhile the copy is not ready: work submitted now waits for it.
        assert node.handled[-1] == m.Lost((held_there,))
        for _ in range(5):
            await asyncio.sleep(0)
        assert needs_it.state == TaskState.QUEUED and needs_it.refused_by == {DEAD_PEER}
        kinds = [type(event).__name__ for event in node.handled]
        # The copy was dealt with first (no lineage here: it is lost for good), then the task placed.
        assert kinds.index("Lost") < len(kinds) - 1 - kinds[::-1].index("PlaceWhenArgsReady")
        assert node.handled[-1] == m.PlaceWhenArgsReady(needs_it)
    asyncio.run(scenario())


def test_a_question_out_to_a_peer_that_dies_fails_at_once_naming_it():
    async def scenario():
        node, part, _deaths = _duties()
        sent = []
        part.links[DEAD_PEER] = SimpleNamespace(send=sent.append, close=lambda: asyncio.sleep(0))
        asking = asyncio.get_running_loop().create_task(part.ask(DEAD_PEER, "dump_events", {}))
        await asyncio.sleep(0)
        assert [event.request.method for event in sent] == ["dump_events"]
        part.node_died(DEAD_PEER)
        with pytest.raises(ConnectionError, match=f"node {DEAD_PEER} died"):
            await asyncio.wait_for(asking, 5)
        assert DEAD_PEER not in part.links
        with pytest.raises(ConnectionError, match="not in this node's cluster view"):
            await part.ask("dd" * 28, "dump_events", {})
    asyncio.run(scenario())


def test_the_state_machine_hears_of_a_dead_peer_and_of_each_actor_it_hosted_for_us():
    # Which of them die or restart is the machine's (tests/unit/test_actor_life.py).
    async def scenario():
        node, part, _deaths = _duties()
        ours_there = SimpleNamespace(actor_id=b"1")
        ours_alive = SimpleNamespace(actor_id=b"2")
        part._remote_actors.update({b"1": {"node": DEAD_PEER, "entry": ours_there},
                                    b"2": {"node": LIVE_PEER, "entry": ours_alive}})
        part.node_died(DEAD_PEER)
        assert node.actor_events == [m.OwnerNodeDied(DEAD_PEER),
                                     m.ActorHostDied(ours_there, DEAD_PEER)]
        assert list(part._remote_actors) == [b"2"]
    asyncio.run(scenario())
