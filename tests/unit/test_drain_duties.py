"""The node's drain (node/draining.py), acting on a stand-in node.

Drain is given the node whose queue, tables, peer links and stop it acts
on; here that node is a recorder, so these tests check what stop signals
make it do: the first one drains (the plan is set, a peer's queued task is
refused back to its owner, a local driver's is left to be offered to
peers), a second one stops at once, a node that may not drain stops at the
first, and a drain with nothing left to wait for stops the node by itself.
"""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from meshray.node import drain
from meshray.node.cluster import RemoteOwner
from meshray.node.draining import Drain
from meshray.node.state import messages as m
from meshray.node.task_lifecycle import TaskState, move
from meshray.node.tasks import TaskQueue, TaskRecord
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.scheduler.resources import NodeResources, ResourceSet
from tests.helpers import RecordingDispatch

PEER = "bb" * 28
DEADLINE_S = 10.0


class _Node:
    """What Drain reads and calls on its node, recorded."""

    def __init__(self):
        self.node_hex = "aa" * 28
        self._stopping = asyncio.Event()
        self.republished = 0
        self.membership = SimpleNamespace(republish_record=self._republish)
        self.tasks = {}
        self.queue = TaskQueue()
        self.sent, self.replaced = [], 0
        # The node's state machine; none of Drain's events may call for
        # anything to be carried out.
        self.dispatch = RecordingDispatch(self.queue, NodeResources({"CPU": 4.0}))
        self.peers = SimpleNamespace(send=self._send, replace_waiting=self._replace_waiting,
                                     links_idle=lambda: True)

    def _republish(self):
        self.republished += 1

    def _move(self, task, new, cause):
        move(task, new, cause)

    def _send(self, node_hex, event):
        self.sent.append((node_hex, event))
        return True

    def _replace_waiting(self):
        self.replaced += 1

    def request_stop(self):
        self._stopping.set()

    def queued_task(self, number: int, owner) -> TaskRecord:
        spec = pb.TaskSpec(task_id=bytes([number]) * 4, name=f"t{number}", resources={"CPU": 1.0})
        task = TaskRecord(spec=spec, owner=owner, return_ids=[],
                          request=ResourceSet.from_dict({"CPU": 1.0}), env_key="", env_vars={})
        self.tasks[task.task_id] = task
        self.queue.push(task, "test: queued here")
        return task


def test_the_first_stop_signal_drains_and_hands_a_peers_queued_task_back():
    async def scenario():
        node = _Node()
        part = Drain(node)
        guest = node.queued_task(1, RemoteOwner(PEER))
        local = node.queued_task(2, SimpleNamespace(conn_id=7))
        running = node.queued_task(3, SimpleNamespace(conn_id=7))
        node.queue.remove(running)
        move(running, TaskState.RUNNING, "test: running")     # keeps the drain waiting

        part.on_stop_signal("SIGTERM", may_drain=True, timeout_s=DEADLINE_S)

        assert part.draining and part.plan.record()["reason_message"] == "SIGTERM"
        assert part.plan.reason == drain.REASON_PREEMPTION and node.republished == 1
        assert guest.state == TaskState.DONE and guest.task_id not in node.tasks
        assert node.dispatch.events == [m.Drain(), m.Release(guest)]
        assert node.dispatch.instructions == []
        assert node.dispatch.machine.draining and list(node.queue) == [local]
        ((to, event),) = node.sent
        assert to == PEER and event.verdict.task_id == guest.task_id
        assert not event.verdict.accepted and event.verdict.reason == "node is draining"
        assert node.replaced == 1            # the local driver's task is offered to peers
        assert not node._stopping.is_set()   # a task still runs here

        part.on_stop_signal("SIGTERM", may_drain=True, timeout_s=DEADLINE_S)
        assert node._stopping.is_set()       # a second signal stops at once
    asyncio.run(scenario())


def test_a_node_that_may_not_drain_stops_at_the_first_signal():
    async def scenario():
        node = _Node()
        part = Drain(node)
        part.on_stop_signal("SIGINT", may_drain=False, timeout_s=DEADLINE_S)
        assert node._stopping.is_set() and not part.draining and node.republished == 0
    asyncio.run(scenario())


def test_a_drain_with_nothing_running_stops_the_node_by_itself():
    async def scenario():
        node = _Node()
        part = Drain(node)
        assert part.request(DEADLINE_S, reason=drain.REASON_IDLE_TERMINATION)
        assert not part.request(DEADLINE_S)      # one drain at a time
        await asyncio.wait_for(node._stopping.wait(), DEADLINE_S)
        assert part.lifecycle.state == drain.NodeLifecycle.STOPPING
    asyncio.run(scenario())
