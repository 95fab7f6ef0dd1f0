"""Spill offers driven by the load peers attach to their batches (node/cluster.py).

PeerDuties acts on a stand-in node (a busy CPU, a queue, recorded moves)
with in-memory links; these tests check who gets queued work: a batch
showing room gets work offered at once, a peer's backlog is used only when
no peer can start the task, unanswered offers are never counted twice, and
an answered offer stops counting even if its task was cancelled meanwhile.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

from meshray.node.cluster import PeerDuties
from meshray.node.objects import ObjectDirectory
from meshray.node.state import messages as m
from meshray.node.task_lifecycle import move
from meshray.node.tasks import TaskQueue, TaskRecord
from meshray.rpc.dispatch import dispatch_table, event_kinds
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.scheduler.resources import NodeResources, ResourceSet
from tests.helpers import RecordingDispatch

HEAD, A, B = "aa" * 14, "bb" * 14, "cc" * 14


class _Link:
    def __init__(self):
        self.functions_sent = set()
        self.sent = []

    def send(self, event):
        self.sent.append(event)


class _Config:
    labels: dict = {}


class _Node:
    """What PeerDuties reads and calls on its node here: a busy CPU, a queue, moves."""

    def __init__(self, cpus: float = 1.0):
        self.node_id = bytes.fromhex(HEAD)
        self.node_hex = HEAD
        self.drain = SimpleNamespace(draining=False)
        self.decision_times: list[float] = []     # what the node's metrics were told
        self.metrics = SimpleNamespace(spill_decided=self.decision_times.append)
        self.config = _Config()
        self.membership = None
        self.resources = NodeResources({"CPU": cpus})
        self.resources.try_acquire(ResourceSet.from_dict({"CPU": cpus}))   # busy here
        self.queue = TaskQueue()
        self.dispatch = RecordingDispatch(self.queue, self.resources)
        self.objects = ObjectDirectory()
        self.store = None
        self.functions, self.tasks, self.actors = {}, {}, {}

    def _move(self, task, new, cause):
        move(task, new, cause)


class _Daemon:
    """A node and its peer duties, whose links to A and B record what they send."""

    def __init__(self, peers_free: dict, cpus: float = 1.0):
        self.node = node = _Node(cpus)
        self.tasks, self.queue = node.tasks, node.queue
        self.part = part = PeerDuties(node)
        node.dispatch.carry_out[m.Spill] = lambda ins: part.spill(ins.task, ins.candidates)
        part.view.nodes = {n: {"Resources": {"CPU": 1.0}, "Address": "x"}
                           for n in (HEAD, A, B)}
        part.view.avail = {HEAD: {"CPU": 0.0}, **peers_free}
        part.view.avail_changed_at = {n: time.monotonic() - 5 for n in part.view.avail}
        part.links.update({A: _Link(), B: _Link()})
        node.routes = SimpleNamespace(peer=dispatch_table(pb.PeerEvent, {
            kind: getattr(part, "on_" + kind, lambda *event: None)
            for kind in event_kinds(pb.PeerEvent)}))

    def offers_to(self, node_hex):
        return [e.spill.spec.task_id for e in self.part.links[node_hex].sent
                if e.HasField("spill")]

    def queue_tasks(self, count):
        tasks = []
        for i in range(count):
            spec = pb.TaskSpec(task_id=bytes([i + 1]) * 4, name=f"t{i}", resources={"CPU": 1.0},
                               scheduling_strategy="DEFAULT")
            task = TaskRecord(spec=spec, owner=None, return_ids=[],
                              request=ResourceSet.from_dict({"CPU": 1.0}), env_key="", env_vars={})
            self.tasks[spec.task_id] = task
            self.queue.push(task, "test: queued here")
            tasks.append(task)
        return tasks


def _deliver(daemon, from_hex, *, free, backlog, events=()):
    batch = pb.PeerBatch(from_node=bytes.fromhex(from_hex), events=list(events),
                         load=pb.NodeLoad(available={"CPU": free}, backlog_room=backlog))
    daemon.part.deliver(batch)


def test_a_batch_showing_room_gets_queued_work_offered_at_once():
    daemon = _Daemon({A: {"CPU": 0.0}, B: {"CPU": 0.0}})   # etcd: everyone busy
    daemon.queue_tasks(3)
    daemon.part.offer_queued()
    assert daemon.offers_to(A) == daemon.offers_to(B) == []
    _deliver(daemon, A, free=1.0, backlog=0)        # a result came back: A has room
    assert len(daemon.offers_to(A)) == 1
    assert daemon.offers_to(B) == []
    assert len(daemon.queue) == 2
    # Every decision taken on the way was timed for the node's metrics.
    assert daemon.node.decision_times and all(t >= 0 for t in daemon.node.decision_times)


def test_unanswered_offers_are_not_counted_twice():
    daemon = _Daemon({A: {"CPU": 0.0}, B: {"CPU": 0.0}})
    daemon.queue_tasks(3)
    _deliver(daemon, A, free=1.0, backlog=0)
    _deliver(daemon, A, free=1.0, backlog=0)        # still one CPU: the offer is in flight
    assert len(daemon.offers_to(A)) == 1


def test_backlog_only_when_no_peer_can_start_the_task():
    daemon = _Daemon({A: {"CPU": 0.0}, B: {"CPU": 1.0}})
    daemon.queue_tasks(6)
    _deliver(daemon, A, free=0.0, backlog=2)
    # B (free per etcd) gets the first; then A queues two, as many as it said.
    assert len(daemon.offers_to(B)) == 1
    assert len(daemon.offers_to(A)) == 2
    assert len(daemon.queue) == 3


def test_backlog_only_while_the_task_would_start_there_sooner_than_here():
    """The end of a burst: two wait here behind a busy CPU, and A would
    queue two. The first goes (it starts after A's one running task, the
    last here after two); the second would wait as long there as here."""
    daemon = _Daemon({A: {"CPU": 0.0}, B: {"CPU": 0.0}})
    daemon.queue_tasks(2)
    _deliver(daemon, A, free=0.0, backlog=2)
    assert len(daemon.offers_to(A)) == 1
    assert len(daemon.queue) == 1
    batch = pb.PeerBatch(from_node=bytes.fromhex(B), events=[],
                         load=pb.NodeLoad(available={"CPU": 0.0}, backlog_room=2, queued=1))
    daemon.part.deliver(batch)                   # B already has one queued: no better
    assert daemon.offers_to(B) == [] and len(daemon.queue) == 1


def test_a_node_that_cannot_run_the_task_fills_a_backlog_whatever_waits_here():
    """A CPU-less node (a driver's, say) never runs the task: any peer's
    backlog is sooner, even for the one task waiting here."""
    daemon = _Daemon({A: {"CPU": 0.0}, B: {"CPU": 0.0}}, cpus=0.0)
    daemon.queue_tasks(1)
    _deliver(daemon, A, free=0.0, backlog=2)
    assert len(daemon.offers_to(A)) == 1 and len(daemon.queue) == 0


def test_an_answered_offer_stops_counting_even_for_a_cancelled_task():
    daemon = _Daemon({A: {"CPU": 0.0}, B: {"CPU": 0.0}})
    (task,) = daemon.queue_tasks(1)
    _deliver(daemon, A, free=1.0, backlog=0)
    assert daemon.offers_to(A) == [task.task_id]
    del daemon.tasks[task.task_id]                 # cancelled while the offer was out
    verdict = pb.PeerEvent(verdict=pb.SpillVerdict(task_id=task.task_id, accepted=True))
    _deliver(daemon, A, free=0.0, backlog=0, events=[verdict])
    assert daemon.part.view.offered.get(A) == {}


def test_an_old_load_yields_to_a_newer_etcd_value():
    daemon = _Daemon({A: {"CPU": 0.0}, B: {"CPU": 0.0}})
    daemon.part.view.loads[A] = (pb.NodeLoad(available={"CPU": 1.0}), time.monotonic() - 10)
    daemon.part.view.avail_changed_at[A] = time.monotonic() - 1   # etcd changed since: busy
    daemon.queue_tasks(1)
    daemon.part.offer_queued()
    assert daemon.offers_to(A) == []
