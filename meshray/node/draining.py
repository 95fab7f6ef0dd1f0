"""Draining the node before it exits: the part of the daemon that carries it out.

The decisions (what a signal means, when a drain is over) are in
node/drain.py; this module acts on them: it marks the node draining (its
etcd record, its placement view, its answers to spill offers), hands queued
work back, waits for running tasks and then asks the daemon to stop. Others
only ask it whether the node drains (``draining``): the peer duties refuse
offers and report no backlog room, dispatch starts nothing new, placement
treats the local node as no candidate, readiness fails; peers skip a node
whose record carries ``Draining`` (cluster_view.py).
"""
from __future__ import annotations

import asyncio
import logging
import time

from meshray.node import drain
from meshray.node.cluster import RemoteOwner
from meshray.node.state import messages as m
from meshray.node.task_lifecycle import TaskState
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["Drain"]

log = logging.getLogger(__name__)

DRAIN_POLL_S = 0.1
# After the last task, how long queued messages (results going home, the
# late verdicts of handed-back tasks) may take to reach their peers.
FLUSH_TIMEOUT_S = 3.0
_BUSY_STATES = frozenset({"running", "assigned"})


class Drain:
    """The node's drain: its plan once one starts, and the loop that ends it.

    It owns `plan` (a drain.DrainPlan, None while the node serves), so one
    object says whether the node drains. It is given the node because a
    drain hands tasks back through the lifecycle the node owns (move,
    release, the peer links, re-placing a local driver's work), reads its
    tables and membership as they are at that moment, and ends by asking
    the node to stop.
    """

    def __init__(self, node):
        self._node = node
        self.plan: drain.DrainPlan | None = None
        self.lifecycle = drain.NodeLifecycle()

    def on_stop_signal(self, name: str, *, may_drain: bool, timeout_s: float) -> None:
        """SIGTERM/SIGINT `name` arrived: drain, stop now, or ignore it (NodeLifecycle)."""
        action = self.lifecycle.on_signal(drain=may_drain)
        if action == "drain":
            self.request(timeout_s, reason_message=name)
        elif action == "stop":
            if self.draining:
                log.warning("second stop signal: stopping node %s now", self._node.node_hex)
            self._node.request_stop()

    @property
    def draining(self) -> bool:
        """Peers get no work from a draining node, and it takes none (node/drain.py)."""
        return self.plan is not None

    def request(self, timeout_s: float, *, reason: str = drain.REASON_PREEMPTION,
                reason_message: str = "") -> bool:
        """Start draining (see node/drain.py); False when a drain already runs."""
        node = self._node
        if self.plan is not None or node._stopping.is_set():
            return False
        self.plan = drain.DrainPlan.start(reason, reason_message, timeout_s,
                                          now=time.monotonic(), wall_now=time.time())
        log.warning("node %s draining (%s: %s); running tasks get %.1fs to finish",
                    node.node_hex, reason, reason_message or "-", timeout_s)
        node.dispatch.handle(m.Drain())       # it starts no more queued work
        if node.membership is not None:
            node.membership.republish_record()
        self._hand_back_queued()
        asyncio.get_running_loop().create_task(self._loop())
        return True

    def _counts(self) -> tuple[int, int]:
        """(tasks executing here, tasks still queued here), actors' own work aside."""
        running = queued = 0
        for task in self._node.tasks.values():
            if task.actor is not None:
                continue
            if task.state in _BUSY_STATES:
                running += 1
            elif task.state == "queued" and isinstance(task.owner, RemoteOwner):
                queued += 1
        return running, queued

    def _hand_back_queued(self) -> None:
        """Give back every task queued here that has not started.

        A peer's task is refused after the fact: its owner takes a refused
        verdict for a task it had spilled here as "place it again". A local
        driver's task is offered to peers (this node is no candidate now).
        """
        node = self._node
        handed = 0
        for task in list(node.queue):
            if task.actor is not None or task.state != "queued":
                continue
            if isinstance(task.owner, RemoteOwner):
                node.dispatch.handle(m.Release(task))
                node._move(task, TaskState.DONE, "handed back: this node is draining")
                node.tasks.pop(task.task_id, None)
                node.peers.send(task.owner.node_hex, pb.PeerEvent(verdict=pb.SpillVerdict(
                    task_id=task.task_id, accepted=False, reason="node is draining")))
                handed += 1
        if handed:
            log.info("node %s handed %d queued task(s) back to their owners",
                     node.node_hex, handed)
        node.peers.replace_waiting()      # local drivers' queued tasks go to peers


    async def _loop(self) -> None:
        node, plan = self._node, self.plan
        while not node._stopping.is_set():
            running, queued = self._counts()
            done, why = drain.drain_progress(time.monotonic(), plan.deadline, running, queued)
            if done:
                log.warning("node %s drained: %s", node.node_hex, why)
                break
            if queued:
                self._hand_back_queued()
            await asyncio.sleep(DRAIN_POLL_S)
        flush_until = time.monotonic() + FLUSH_TIMEOUT_S
        while not node.peers.links_idle() and time.monotonic() < flush_until \
                and not node._stopping.is_set():
            await asyncio.sleep(0.02)
        if self.lifecycle.drained() == "stop":
            node.request_stop()
