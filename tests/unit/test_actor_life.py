"""The actor part of the node's state machine (meshray/node/state/actor_life.py).

Each test feeds events to a `NodeState` and compares the instructions it
returns, and the actor's state, resources and death cause after them: its
creation (here or on a peer), its worker's death with and without restarts
left, its host's death, every kind of kill, its owner leaving, its own exit,
and this node losing its lease.
"""
from __future__ import annotations

from types import SimpleNamespace

from meshray import exceptions
from meshray.node.actors import ALIVE, DEAD, PENDING, RESTARTING
from meshray.node.event_log import EventLog
from meshray.node.state import messages as m
from meshray.node.task_lifecycle import TaskState as S
from meshray.node.task_lifecycle import move
from tests.helpers import T0, W0
from tests.helpers import MachineNode as Node


def _started(node: Node, pid: int = 101, **options):
    """An actor whose creation task runs on a fresh worker: (task, entry, worker)."""
    worker = node.worker(pid)
    task = node.actor(**options)
    node.handle(m.Schedule(T0, W0))
    assert task.state is S.RUNNING and worker.actor is task.actor
    return task, task.actor, worker


def _elsewhere(node: Node, task, node_hex: str, failed: bool = False):
    """`task`'s actor was created on peer `node_hex`; the creation task is done."""
    out = node.handle(m.ActorCreatedElsewhere(task, node_hex, failed, "", "addr:9"))
    if task.state is not S.DONE:                   # (a restart reuses it here)
        move(task, S.DONE, "test: its result came back")
    return out


def _alive(node: Node, pid: int = 101, **options):
    task, entry, worker = _started(node, pid, **options)
    node.handle(m.ActorCreated(task, worker, False, "", "addr:1", ("v",)))
    assert entry.state is ALIVE
    return task, entry, worker


# ---------------------------------------------------------------- creation
def test_a_created_actor_keeps_its_worker_and_the_resources_its_creation_took():
    node = Node(cpus=2.0)
    task, entry, worker = _started(node)
    out = node.handle(m.ActorCreated(task, worker, False, "", "addr:1", ("v",)))
    assert out == [m.ActorChanged(entry, True), m.Finish(task, ("v",))]
    assert entry.state is ALIVE and entry.address == "addr:1" and entry.holding
    assert worker.current_task is None and task.worker is None and not task.acquired
    assert node.free_cpus() == 1.0                 # the actor holds its CPU now


def test_an_actor_whose_init_failed_is_dead_its_worker_killed_and_its_cpu_back():
    node = Node(cpus=2.0)
    task, entry, worker = _started(node, name="named")
    out = node.handle(m.ActorCreated(task, worker, True, "ValueError: no", "", ("err",)))
    assert out == [m.KillWorker(worker), m.ReleaseActorName(entry),
                   m.ActorChanged(entry, True), m.Finish(task, ("err",))]
    assert entry.state is DEAD and entry.death_cause == "ValueError: no"
    assert worker.actor is None and node.free_cpus() == 2.0


def test_an_actor_created_on_a_peer_lives_there_and_its_host_publishes_it():
    node = Node()
    task = node.actor(queued=False)
    entry = task.actor
    assert _elsewhere(node, task, "peer1") == [m.ActorChanged(entry, False)]
    assert entry.state is ALIVE and entry.remote_node == "peer1" and entry.address == "addr:9"

    failed = node.actor(queued=False)
    _elsewhere(node, failed, "peer1", failed=True)
    assert failed.actor.state is DEAD
    assert failed.actor.death_cause == "the actor's __init__ failed"


def test_a_creation_that_fails_before_it_runs_buries_the_actor_with_the_error():
    node = Node(cpus=1.0)
    task = node.actor()
    entry = task.actor
    error = exceptions.TaskUnschedulableError("nowhere fits")
    out = node.handle(m.Fail(task, error))
    assert out == [m.ReleaseActorName(entry), m.ActorChanged(entry, True),
                   m.FailTask(task, error)]
    assert entry.state is DEAD
    assert entry.death_cause == f"TaskUnschedulableError: {error}"
    assert len(node.queue) == 0


# ---------------------------------------------------------------- deaths
def test_an_actor_whose_worker_died_restarts_while_restarts_are_left():
    node = Node(cpus=2.0)
    _task, entry, worker = _alive(node, max_restarts=1)
    out = node.handle(m.WorkerLost(worker, owner_present=True))
    assert out == [m.KillWorker(worker), m.ActorChanged(entry, True), m.RestartActor(entry)]
    assert entry.state is RESTARTING and entry.num_restarts == 1
    assert not entry.holding and entry.worker is None and node.free_cpus() == 2.0


def test_an_actor_whose_worker_died_with_no_restarts_left_is_dead_and_says_why():
    node = Node(cpus=2.0)
    _task, entry, worker = _alive(node, max_restarts=0, name="named")
    out = node.handle(m.WorkerLost(worker, owner_present=True))
    assert out == [m.KillWorker(worker), m.ReleaseActorName(entry), m.ActorChanged(entry, True)]
    assert entry.state is DEAD and "max_restarts=0" in entry.death_cause
    assert entry.address == "" and node.free_cpus() == 2.0


def test_a_worker_dying_inside_init_finishes_the_creation_with_the_actors_death():
    node = Node(cpus=2.0)
    task, entry, worker = _started(node)
    out = node.handle(m.WorkerLost(worker, owner_present=True))
    assert out == [m.KillWorker(worker), m.ReleaseActorName(entry),
                   m.ActorChanged(entry, True), m.ActorCreationLost(task, entry)]
    assert entry.state is DEAD and node.free_cpus() == 2.0 and not task.acquired


def test_an_actor_whose_host_died_restarts_or_is_dead():
    node = Node()
    task = node.actor(queued=False, max_restarts=1)
    _elsewhere(node, task, "peer1")
    entry = task.actor
    assert node.handle(m.ActorHostDied(entry, "peer1")) == [
        m.ActorChanged(entry, False), m.RestartActor(entry)]
    assert entry.state is RESTARTING and entry.num_restarts == 1 and entry.remote_node == ""

    _elsewhere(node, task, "peer2")
    assert node.handle(m.ActorHostDied(entry, "peer2")) == [
        m.ActorChanged(entry, True), m.ReleaseActorName(entry)]
    assert entry.state is DEAD and entry.death_cause == "the node peer2 hosting the actor died"


def test_an_actor_that_exits_on_purpose_is_dead_however_many_restarts_it_has():
    node = Node(cpus=2.0)
    _task, entry, worker = _alive(node, max_restarts=5)
    assert node.handle(m.ActorExiting(entry, False, "exit_actor() called")) == []
    node.handle(m.WorkerLost(worker, owner_present=True))
    assert entry.state is DEAD and entry.death_cause == "exit_actor() called"


def test_an_actor_that_exits_restartably_restarts_like_after_a_crash():
    node = Node(cpus=2.0)
    _task, entry, worker = _alive(node, max_restarts=1)
    node.handle(m.ActorExiting(entry, True, "sys.exit(1)"))
    assert m.RestartActor(entry) in node.handle(m.WorkerLost(worker, owner_present=True))
    assert entry.state is RESTARTING


# ---------------------------------------------------------------- kills
def test_killing_a_live_actor_kills_its_worker_and_its_death_names_the_kill():
    node = Node(cpus=2.0)
    _task, entry, worker = _alive(node, max_restarts=3)
    assert node.handle(m.KillActor(entry, True, "killed with meshray.kill()")) == [
        m.KillWorker(worker)]
    assert entry.state is ALIVE                    # until its worker is gone
    out = node.handle(m.WorkerLost(worker, owner_present=True))
    assert m.RestartActor(entry) not in out
    assert entry.state is DEAD and entry.death_cause == "killed with meshray.kill()"


def test_a_kill_that_allows_restarts_restarts_the_actor():
    node = Node(cpus=2.0)
    _task, entry, worker = _alive(node, max_restarts=1)
    node.handle(m.KillActor(entry, False, "killed, restart allowed"))
    assert m.RestartActor(entry) in node.handle(m.WorkerLost(worker, owner_present=True))
    assert entry.state is RESTARTING and not entry.killed and entry.kill_cause == ""


def test_killing_an_actor_whose_creation_is_queued_cancels_the_creation():
    node = Node(cpus=1.0)
    node.running()                                 # the only CPU is busy
    task = node.actor()
    entry = task.actor
    out = node.handle(m.KillActor(entry, True, "killed with meshray.kill()"))
    assert out[:2] == [m.ReleaseActorName(entry), m.ActorChanged(entry, True)]
    assert len(out) == 3 and out[2].task is task
    assert isinstance(out[2].error, exceptions.TaskCancelledError)
    assert entry.state is DEAD and task.cancelled and len(node.queue) == 0
    assert node.handle(m.KillActor(entry, True, "again")) == []     # dead stays dead


def test_killing_an_actor_hosted_on_a_live_peer_asks_that_peer():
    node = Node()
    task = node.actor(queued=False, max_restarts=2)
    entry = task.actor
    _elsewhere(node, task, "peer1")
    out = node.handle(m.KillActor(entry, True, "killed with meshray.kill()"))
    assert out == [m.AskHostToKill(entry, True, "killed with meshray.kill()"),
                   m.ActorChanged(entry, False)]
    assert entry.state is DEAD and entry.no_restart

    other = node.actor(queued=False, max_restarts=2)
    _elsewhere(node, other, "peer1")
    assert node.handle(m.KillActor(other.actor, False, "restart it")) == [
        m.AskHostToKill(other.actor, False, "restart it")]
    assert other.actor.state is ALIVE              # its host restarts it


def test_killing_an_actor_whose_host_is_known_dead_is_decided_here():
    node = Node()
    task = node.actor(queued=False)
    entry = task.actor
    _elsewhere(node, task, "peer1")
    node.dead_peers.add("peer1")
    out = node.handle(m.KillActor(entry, True, "killed"))
    assert m.AskHostToKill(entry, True, "killed") not in out
    assert entry.state is DEAD and entry.death_cause == "killed"


# ---------------------------------------------------------------- owners and leases
def test_the_actors_of_an_owner_that_left_die_unless_detached():
    node = Node(cpus=3.0)
    owner = SimpleNamespace(conn_id=7, pid=555)
    _t1, mine, worker = _alive(node, 101, owner=owner)
    _t2, detached, _w2 = _alive(node, 102, owner=owner, detached=True)
    _t3, others, _w3 = _alive(node, 103)
    assert node.handle(m.OwnerLeft(owner)) == [m.KillWorker(worker)]
    assert mine.no_restart and "owner (pid 555) exited" in mine.kill_cause
    assert not detached.killed and not others.killed


def test_actors_hosted_for_a_dead_node_die_unless_detached_and_all_when_our_lease_is_lost():
    node = Node(cpus=3.0)
    _t1, guest, w1 = _alive(node, 101)
    _t2, detached_guest, w2 = _alive(node, 102, detached=True)
    _t3, ours, _w3 = _alive(node, 103)
    guest.owner_node = detached_guest.owner_node = "peer1"
    assert node.handle(m.OwnerNodeDied("peer1")) == [m.KillWorker(w1)]
    assert guest.kill_cause == "the actor's owner node peer1 died"
    out = node.handle(m.LeaseLost("node n lost its etcd lease"))
    assert out == [m.KillWorker(w1), m.KillWorker(w2)]       # ours is not a guest
    assert detached_guest.kill_cause == "node n lost its etcd lease" and not ours.killed


def test_a_fresh_actor_is_pending_until_its_creation_returns():
    node = Node()
    assert node.actor().actor.state is PENDING


def test_a_closed_connection_is_not_logged_but_what_it_kills_is():
    log = EventLog(capacity=50)
    node = Node(cpus=2.0, log=log)
    owner = SimpleNamespace(conn_id=7, pid=555)
    _task, entry, worker = _alive(node, owner=owner)
    before = log.recorded
    node.handle(m.OwnerLeft(SimpleNamespace(conn_id=8, pid=556)))   # owns nothing here
    assert log.recorded == before
    node.handle(m.OwnerLeft(owner))
    node.handle(m.WorkerLost(worker, owner_present=False))
    moves = [(e["kind"], e["from"], e["to"]) for e in log.tail()[before - log.recorded:]]
    assert moves == [("event", "", "WorkerLost"), ("actor", "ALIVE", "DEAD")]
