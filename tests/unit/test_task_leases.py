"""The holder's half of worker leases (core/task_leases.py).

Which tasks a process may push (only a task the node would hand unchanged to
a plain worker of its own; every other kind keeps the node's path, and the
reason names it), and what the holder does with each end of a pushed task,
over real call links to stand-in workers: an answer is delivered and the
idle lease goes back; a broken link retries through the node (a retry
spent, the worker killed) or fails with WorkerCrashedError; a refusal or an
unreachable worker costs the task nothing.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import threading

import pytest

from meshray import exceptions
from meshray.core.task_leases import TaskLeases, _spend_retry, pushable
from meshray.rpc import call_link
from meshray.rpc.call_link import LinkServer, status_payload
from meshray.rpc.generated import meshray_pb2 as pb
from tests.helpers import wait_for


def _spec(**fields) -> pb.TaskSpec:
    spec = pb.TaskSpec(task_id=b"t" * 16, function_id=b"f" * 16, num_returns=1,
                       resources={"CPU": 1.0}, scheduling_strategy="DEFAULT", max_retries=3)
    for name, value in fields.items():
        if isinstance(value, dict):
            getattr(spec, name).update(value)
        else:
            setattr(spec, name, value)
    return spec


def test_a_plain_task_may_be_pushed():
    assert pushable(_spec()) == ""
    assert pushable(_spec(num_returns=0, resources={"memory": 1e6})) == ""
    assert pushable(_spec(scheduling_strategy="")) == ""


@pytest.mark.parametrize("fields, why", [
    ({"actor_id": b"a" * 16}, "actor"),
    ({"actor_creation": True}, "actor"),
    ({"num_returns": -1}, "generator"),
    ({"dynamic_returns": True}, "generator"),
    ({"scheduling_strategy": "SPREAD"}, "SPREAD"),
    ({"scheduling_strategy": "PlacementGroupSchedulingStrategy", "strategy_blob": b"x"},
     "PlacementGroupSchedulingStrategy"),
    ({"runtime_env_json": '{"env_vars": {"A": "1"}}'}, "runtime environment"),
    ({"env_vars": {"A": "1"}}, "runtime environment"),
    ({"resources": {"GPU": 1.0}}, "resources other than CPU and memory"),
    ({"resources": {"custom": 1.0}}, "resources other than CPU and memory"),
    ({"args_image": True}, "argument file"),
])
def test_other_tasks_go_through_the_node_and_say_why(fields, why):
    assert why in pushable(_spec(**fields))


def test_a_retry_is_a_new_attempt_and_spends_one_of_max_retries():
    spec = _spec(max_retries=1)
    assert _spend_retry(spec) and spec.max_retries == 0 and spec.attempt == 1
    assert not _spend_retry(spec) and spec.attempt == 1
    forever = _spec(max_retries=-1)
    assert _spend_retry(forever) and forever.max_retries == -1 and forever.attempt == 1


# ---------------------------------------------------------------- the holder, over real links

TOKEN = "task-leases-test-secret-0123456789abcdef"
LEASE_HEX = "ab" * 16


class _Core:
    """The parts of a CoreWorker the holder uses: the node's answers are canned."""

    def __init__(self, address: str):
        self.token, self.worker_id, self.node_id = TOKEN, b"d" * 16, b"n" * 16
        self.address = address
        self.asked, self.rerouted, self.delivered, self.failed = [], [], [], []

    def has_values(self, object_ids):
        return True

    def request_async(self, method, payload=None):
        self.asked.append((method, payload))
        answer = ({"granted": True, "lease_id": LEASE_HEX, "address": self.address,
                   "worker_id": "77" * 16, "pid": 4242} if method == "lease_worker" else {})
        future = concurrent.futures.Future()
        future.set_result(pb.Reply(payload=json.dumps(answer).encode()))
        return future

    def request(self, method, payload=None, timeout=30.0):
        self.asked.append((method, payload))
        return {"pid": 4242, "exit": "killed by signal 9 (SIGKILL)"}

    def reroute_to_node(self, spec, return_ids):
        self.rerouted.append((spec.attempt, spec.max_retries))

    def deliver_actor_result(self, result):
        self.delivered.append(result.task_id)

    def fail_locally(self, object_ids, error):
        self.failed.append(error)

    def returns(self):
        return [p for m, p in self.asked if m == "return_lease"]


def _worker(tmp_path, behaviour):
    """A stand-in leased worker: `behaviour(link, batch)` after the first batch."""
    def serve(link):
        kind, payload = link.recv()
        behaviour(link, pb.ActorCallBatch.FromString(payload))
    return LinkServer([f"unix:{tmp_path / 'w.sock'}"], token=TOKEN, on_link=serve, tls=None)


def _leased(core) -> TaskLeases:
    """A holder and the lease its first task got: with none held, a task
    asks for one and waits for the answer."""
    leases = TaskLeases(core)
    lease = leases.take(_spec())
    assert lease is not None and core.asked[0][0] == "lease_worker"
    return leases, lease


def test_a_refused_class_goes_through_the_node_and_asks_again_only_after_a_while():
    core = _Core("")            # granted without an address: as refused
    leases = TaskLeases(core)
    assert leases.take(_spec()) is None and leases.take(_spec()) is None
    assert [m for m, _ in core.asked] == ["lease_worker"]       # the second did not ask


@contextlib.contextmanager
def _holder(tmp_path, behaviour):
    """A stand-in worker doing `behaviour`, and a holder with a lease on it:
    (its core, its TaskLeases, the lease)."""
    server = _worker(tmp_path, behaviour)
    core = _Core(server.addresses[0])
    try:
        leases, lease = _leased(core)
        yield core, leases, lease
    finally:
        server.close()


def _answer(link, batch):
    """A stand-in worker's answer to its first task; then it waits for the holder to close."""
    link.send(call_link.REPLIES, pb.ActorReplyBatch(results=[pb.TaskResult(
        task_id=batch.calls[0].task_id)]).SerializeToString())
    link.recv()


def _push(leases, lease, task_id=b"t" * 16):
    spec = _spec(task_id=task_id)
    leases.push(lease, spec, [b"r" * 20], [], b"pickled function")
    return spec


def test_an_answered_task_is_delivered_and_the_idle_lease_goes_back(tmp_path):
    def answer(link, batch):
        assert batch.lease_id == bytes.fromhex(LEASE_HEX) and len(batch.functions) == 1
        _answer(link, batch)
    with _holder(tmp_path, answer) as (core, leases, lease):
        _push(leases, lease)
        wait_for(lambda: core.delivered == [b"t" * 16], message="the result was delivered")
        returned = wait_for(core.returns, timeout=5, message="the idle lease went back")
        assert returned == [{"lease_id": LEASE_HEX, "kill": False, "why": ""}]
        assert core.rerouted == [] and core.failed == []


def test_a_task_whose_worker_dies_is_retried_through_the_node_and_the_worker_killed(tmp_path):
    with _holder(tmp_path, lambda link, batch: link.shutdown()) as (core, leases, lease):
        _push(leases, lease)                       # the link breaks with the task out
        wait_for(lambda: core.rerouted, message="the task went through the node")
        assert core.rerouted == [(1, 2)]          # a new attempt, one retry spent
        assert core.returns()[0]["kill"] is True


def test_a_task_the_worker_refused_goes_through_the_node_without_spending_a_retry(tmp_path):
    def refuse(link, batch):
        link.send(call_link.STATUS, status_payload(call_link.UNAVAILABLE, "not leased",
                                                   refused=True))
        link.wait_idle(5)
    with _holder(tmp_path, refuse) as (core, leases, lease):
        _push(leases, lease)
        wait_for(lambda: core.rerouted, message="the task went through the node")
        assert core.rerouted == [(0, 3)] and core.returns()[0]["kill"] is False


def test_a_worker_that_cannot_be_reached_costs_the_task_nothing(tmp_path):
    core = _Core(f"unix:{tmp_path / 'nobody.sock'}")
    leases, lease = _leased(core)
    done = threading.Event()
    threading.Thread(target=lambda: (_push(leases, lease), done.set()), daemon=True).start()
    assert done.wait(10), "pushing to an unreachable worker hung"
    assert core.rerouted == [(0, 3)] and core.returns()[0]["kill"] is False


def test_a_task_with_no_retry_left_fails_with_worker_crashed(tmp_path):
    with _holder(tmp_path, lambda link, batch: link.shutdown()) as (core, leases, lease):
        leases.push(lease, _spec(max_retries=0), [b"r" * 20], [], b"f")
        wait_for(lambda: core.failed, message="the task failed")
        error = core.failed[0]
        assert isinstance(error, exceptions.WorkerCrashedError)
        assert "killed by signal 9 (SIGKILL)" in str(error) and "max_retries=0" in str(error)
        assert ("lease_end", {"lease_id": LEASE_HEX}) in core.asked
        assert core.rerouted == []


def test_idle_leases_are_given_back_before_the_node_is_asked_what_is_free(tmp_path):
    with _holder(tmp_path, _answer) as (core, leases, lease):
        leases.release_idle()                # busy: kept
        assert core.returns() == []
        _push(leases, lease)
        wait_for(lambda: core.delivered, message="the result was delivered")
        leases.release_idle()                # idle now: given back at once
        assert core.returns() == [{"lease_id": LEASE_HEX, "kill": False, "why": ""}]
