"""Worker leases in the node's state machine (meshray/node/state/lease_life.py).

Each test feeds lease events to a `NodeState` and checks the instructions,
the node's free resources and idle workers, and the lease's state: when a
lease is granted or refused (and why), and what each way of ending it gives
back -- no daemon, process or socket.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from meshray.node.state import messages as m
from meshray.node.state.lease_life import InvalidLeaseTransition, Lease, LeaseState
from meshray.node.task_lifecycle import TaskState
from meshray.scheduler.resources import ResourceSet
from tests.helpers import T0, W0
from tests.helpers import MachineNode as Node

L = LeaseState
HOLDER = SimpleNamespace(conn_id=7, worker_id=b"h" * 16, job_id=b"j" * 4)


def _lease(cpus: float = 1.0, gpus: float = 0.0, holder=HOLDER, lease_id: bytes = b"L" * 16):
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return Lease(lease_id=lease_id, holder=holder, hold=ResourceSet.from_dict(resources),
                 worker_key="default", sched_class=("default", tuple(sorted(resources.items()))),
                 requested_wall=W0)


def _granted(node, **options):
    lease = _lease(**options)
    out = node.handle(m.LeaseRequested(lease, T0, W0))
    assert lease.state is L.GRANTED, lease.reason
    assert out == [m.GrantLease(lease, lease.worker)]
    return lease


def test_a_lease_takes_one_tasks_resources_and_an_idle_worker():
    node = Node(cpus=2.0)
    worker = node.worker(101)
    lease = _granted(node)
    assert lease.worker is worker and worker.lease is lease
    assert node.free_cpus() == 1.0
    assert node.workers.idle["default"] == []
    assert lease.record()["state"] == "GRANTED" and lease.record()["worker_pid"] == 101


def test_a_leased_worker_gets_none_of_the_nodes_tasks():
    node = Node(cpus=2.0)
    node.worker(101)
    _granted(node)
    task = node.task()
    out = node.handle(m.Schedule(T0, W0))
    # The task has the second CPU but no worker: one is started for it.
    assert out == [m.EnsureWorkers(task, 1)] and task.state is TaskState.ASSIGNED


@pytest.mark.parametrize("why, setup, reason", [
    ("no CPU is free", lambda node: node.running(101), "resources are not free"),
    ("no worker is idle", lambda node: None, "no worker of its environment is idle"),
    ("tasks of its class queue here", lambda node: (node.worker(101), node.task(cpus=4.0),
                                                    node.task()),
     "tasks of its class wait"),
    ("the node drains", lambda node: (node.worker(101), node.handle(m.Drain())), "draining"),
])
def test_a_lease_is_refused_with_the_reason_and_takes_nothing(why, setup, reason):
    node = Node(cpus=1.0)
    setup(node)
    free = node.free_cpus()
    idle = list(node.workers.idle.get("default", []))
    lease = _lease()
    assert node.handle(m.LeaseRequested(lease, T0, W0)) == []
    assert lease.state is L.REFUSED and reason in lease.reason, why
    assert node.free_cpus() == free and node.workers.idle.get("default", []) == idle


def test_a_lease_for_gpus_is_refused():
    node = Node(cpus=2.0, gpu_ids=[0])
    node.worker(101)
    lease = _lease(gpus=1.0)
    node.handle(m.LeaseRequested(lease, T0, W0))
    assert lease.state is L.REFUSED and "GPU" in lease.reason
    assert node.free_cpus() == 2.0


def test_a_returned_lease_gives_its_worker_to_a_task_waiting_for_one():
    node = Node(cpus=2.0)
    worker = node.worker(101)
    lease = _granted(node)
    task = node.task()
    node.handle(m.Schedule(T0, W0))          # the second CPU: waits for a worker
    out = node.handle(m.LeaseReturned(lease.lease_id, HOLDER.conn_id, False, "", T0, W0 + 1))
    assert out == [m.EndLease(lease, worker), m.Execute(task, worker)]
    assert lease.state is L.RETURNED and worker.lease is None and worker.current_task is task
    assert node.free_cpus() == 1.0            # the lease's CPU back, the task's still taken
    assert lease.ended_wall == W0 + 1


def test_a_returned_lease_with_nothing_waiting_leaves_its_worker_idle():
    node = Node(cpus=2.0)
    worker = node.worker(101)
    lease = _granted(node)
    out = node.handle(m.LeaseReturned(lease.lease_id, HOLDER.conn_id, False, "", T0, W0))
    assert out == [m.EndLease(lease, worker)]
    assert node.workers.idle["default"] == [worker] and node.free_cpus() == 2.0
    assert node.state.lease_life.granted == {}


def test_only_its_holder_ends_a_lease_and_ending_it_twice_changes_nothing():
    node = Node(cpus=2.0)
    node.worker(101)
    lease = _granted(node)
    assert node.handle(m.LeaseReturned(lease.lease_id, 99, False, "", T0, W0)) == []
    assert lease.state is L.GRANTED
    node.handle(m.LeaseReturned(lease.lease_id, HOLDER.conn_id, False, "", T0, W0))
    assert node.handle(m.LeaseReturned(lease.lease_id, HOLDER.conn_id, True, "", T0, W0)) == []
    assert node.free_cpus() == 2.0            # given back once


def test_a_kill_asked_by_the_holder_kills_the_worker_and_gives_the_resources_back():
    node = Node(cpus=2.0)
    worker = node.worker(101)
    lease = _granted(node)
    out = node.handle(m.LeaseReturned(lease.lease_id, HOLDER.conn_id, True, "cancel(force=True)",
                                      T0, W0))
    assert out == [m.KillWorker(worker)]
    assert lease.state is L.REVOKED and "cancel(force=True)" in lease.reason
    assert node.free_cpus() == 2.0 and node.workers.idle["default"] == []
    # Its death then changes nothing more: the lease is over.
    assert node.handle(m.WorkerLost(worker, owner_present=True)) == [m.KillWorker(worker)]
    assert node.free_cpus() == 2.0


def test_a_leased_workers_death_ends_the_lease_and_frees_its_resources():
    node = Node(cpus=2.0)
    worker = node.worker(101)
    lease = _granted(node)
    node.handle(m.WorkerLost(worker, owner_present=True))
    assert lease.state is L.LOST and worker.lease is None and node.free_cpus() == 2.0


def test_a_holder_that_leaves_has_its_leased_workers_killed():
    node = Node(cpus=3.0)
    first, second = node.worker(101), node.worker(102)
    mine = _granted(node)
    other_holder = SimpleNamespace(conn_id=8, worker_id=b"o" * 16, job_id=b"")
    theirs = _lease(holder=other_holder, lease_id=b"M" * 16)
    node.handle(m.LeaseRequested(theirs, T0, W0))
    out = node.handle(m.OwnerLeft(HOLDER))
    assert m.KillWorker(mine.worker) in out and m.KillWorker(theirs.worker) not in out
    assert mine.state is L.REVOKED and theirs.state is L.GRANTED
    assert {first.pid, second.pid} == {mine.worker.pid, theirs.worker.pid}
    assert node.free_cpus() == 2.0


def test_a_leased_worker_blocked_in_get_lends_its_cpu_and_takes_it_back():
    node = Node(cpus=1.0)
    worker = node.worker(101)
    lease = _granted(node)
    assert node.free_cpus() == 0.0
    node.handle(m.Blocked(worker, True))
    assert node.free_cpus() == 1.0 and lease.cpu_lent
    node.handle(m.Blocked(worker, False))
    assert node.free_cpus() == 0.0 and not lease.cpu_lent
    node.handle(m.Blocked(worker, True))
    node.handle(m.LeaseReturned(lease.lease_id, HOLDER.conn_id, False, "", T0, W0))
    assert node.free_cpus() == 1.0            # the lent CPU is not given back twice


def test_an_ended_lease_cannot_move_again_and_the_error_tells_its_story():
    node = Node(cpus=1.0)
    node.worker(101)
    lease = _granted(node)
    node.handle(m.LeaseReturned(lease.lease_id, HOLDER.conn_id, False, "", T0, W0))
    with pytest.raises(InvalidLeaseTransition) as caught:
        node.state.lease_life._move(lease, L.GRANTED, "test: granted again")
    text = str(caught.value)
    assert "returned -> granted" not in text and "from returned to granted" in text
    assert "requested -> granted: worker 101" in text and "granted -> returned" in text


def test_the_state_api_sees_granted_and_ended_leases():
    node = Node(cpus=2.0)
    node.worker(101)
    node.worker(102)
    first = _granted(node)
    second = _lease(lease_id=b"N" * 16)
    node.handle(m.LeaseRequested(second, T0, W0))
    node.handle(m.LeaseReturned(first.lease_id, HOLDER.conn_id, False, "", T0, W0))
    records = {r["lease_id"]: r for r in node.state.lease_life.records()}
    assert records[first.lease_id.hex()]["state"] == "RETURNED"
    assert records[second.lease_id.hex()]["state"] == "GRANTED"
    assert records[second.lease_id.hex()]["holder_worker_id"] == HOLDER.worker_id.hex()
    assert node.state.lease_life.counts["granted"] == 2


def test_a_worker_that_serves_no_leases_is_not_leased():
    node = Node(cpus=2.0)
    worker = node.worker(101)
    worker.call_address = ""          # a hollow node's worker
    lease = _lease()
    assert node.handle(m.LeaseRequested(lease, T0, W0)) == []
    assert lease.state is L.REFUSED and node.workers.idle["default"] == [worker]
    assert node.free_cpus() == 2.0
