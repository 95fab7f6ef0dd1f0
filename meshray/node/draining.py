"""Draining the node before it exits, as a mixin of NodeDaemon.

The decisions (what a signal means, when a drain is over) are in
node/drain.py; this module acts on them: it marks the node draining (its
etcd record, its placement view, its answers to spill offers), hands queued
work back, waits for running tasks and then asks the daemon to stop. The
seams it uses elsewhere: ClusterDuties._peer_spill refuses offers while
``draining``; TaskDispatch._schedule starts nothing new; the local node is
no candidate in ``_node_views``; peers skip a node whose record carries
``Draining`` (cluster_view.py).
"""
from __future__ import annotations

import asyncio
import logging
import time

from meshray.node import drain
from meshray.node.cluster import RemoteOwner
from meshray.node.task_lifecycle import TaskState
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["DrainDuties"]

log = logging.getLogger(__name__)

DRAIN_POLL_S = 0.1
# After the last task, how long queued messages (results going home, the
# late verdicts of handed-back tasks) may take to reach their peers.
FLUSH_TIMEOUT_S = 3.0
_BUSY_STATES = frozenset({"running", "assigned"})


class DrainDuties:
    """Mixed into NodeDaemon (``drain_plan`` and ``draining`` live on ClusterDuties)."""

    def request_drain(self, timeout_s: float, *, reason: str = drain.REASON_PREEMPTION,
                      reason_message: str = "") -> bool:
        """Start draining (see node/drain.py); False when a drain already runs."""
        if self.drain_plan is not None or self._stopping.is_set():
            return False
        self.drain_plan = drain.DrainPlan.start(reason, reason_message, timeout_s,
                                                now=time.monotonic(), wall_now=time.time())
        log.warning("node %s draining (%s: %s); running tasks get %.1fs to finish",
                    self.node_hex, reason, reason_message or "-", timeout_s)
        if self.membership is not None:
            self.membership.republish_record()
        self._hand_back_queued()
        asyncio.get_running_loop().create_task(self._drain_loop())
        return True

    def _drain_counts(self) -> tuple[int, int]:
        """(tasks executing here, tasks still queued here), actors' own work aside."""
        running = queued = 0
        for task in self.tasks.values():
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
        handed = 0
        for task in list(self.queue):
            if task.actor is not None or task.state != "queued":
                continue
            if isinstance(task.owner, RemoteOwner):
                self.queue.remove(task)
                self._move(task, TaskState.DONE, "handed back: this node is draining")
                self._release(task)
                self.tasks.pop(task.task_id, None)
                self._send_peer(task.owner.node_hex, pb.PeerEvent(verdict=pb.SpillVerdict(
                    task_id=task.task_id, accepted=False, reason="node is draining")))
                handed += 1
        if handed:
            log.info("node %s handed %d queued task(s) back to their owners",
                     self.node_hex, handed)
        self._replace_waiting()      # local drivers' queued tasks go to peers

    def _links_idle(self) -> bool:
        return not any(link.pending for link in self.links.values())

    async def _drain_loop(self) -> None:
        plan = self.drain_plan
        while not self._stopping.is_set():
            running, queued = self._drain_counts()
            done, why = drain.drain_progress(time.monotonic(), plan.deadline, running, queued)
            if done:
                log.warning("node %s drained: %s", self.node_hex, why)
                break
            if queued:
                self._hand_back_queued()
            await asyncio.sleep(DRAIN_POLL_S)
        flush_until = time.monotonic() + FLUSH_TIMEOUT_S
        while not self._links_idle() and time.monotonic() < flush_until \
                and not self._stopping.is_set():
            await asyncio.sleep(0.02)
        self.request_stop()
