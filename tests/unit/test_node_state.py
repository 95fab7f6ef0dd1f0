"""The node's state machine for tasks placed on it (meshray/node/state/).

Each test feeds events to a `NodeState` and compares the instructions it
returns, and the states it leaves, with what the node must do: no daemon,
process, socket or event loop. The worker pool and bundle pools it reads are
plain bookkeeping here, as they are to it in the daemon.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from meshray import exceptions
from meshray.node.event_log import EventLog
from meshray.node.state import (
    CRASHED,
    FAIL,
    RETRY,
    RETRY_LATER,
    retry_or_fail,
)
from meshray.node.state import messages as m
from meshray.node.task_lifecycle import InvalidTaskTransition, TaskState, move
from meshray.node.tasks import TaskRecord
from meshray.scheduler.resources import ResourceSet
from meshray.rpc.generated import meshray_pb2 as pb
from tests.helpers import FUNCTION, T0, W0, MachineBundles
from tests.helpers import MachineNode as Node

S = TaskState


def _value(object_id: bytes):
    return pb.ObjectValue(object_id=object_id, inline_data=b"v")


def _returned(task, worker, *, retryable=False, values=("v",), now=T0 + 1):
    return m.TaskReturned(worker, task, tuple(values), retryable, now, W0 + 1)


# ---------------------------------------------------------------- starting
def test_a_task_whose_arguments_are_ready_is_placed_at_once():
    node = Node()
    task = node.task(queued=False)
    assert node.handle(m.Submitted(task)) == [m.Replace(task)]
    assert task.state is S.WAITING and node.state.waiting_on == {}


def test_a_task_waits_for_every_missing_argument_then_is_placed():
    node = Node()
    both = node.task(queued=False, args=[b"a", b"b"])
    one = node.task(queued=False, args=[b"a"])
    ready = node.task(queued=False, args=[b"z"])
    node.handle(m.Put(1, _value(b"z")))
    assert node.handle(m.Submitted(both)) == []
    assert node.handle(m.Submitted(one)) == []
    assert node.handle(m.Submitted(ready)) == [m.Replace(ready)]     # its argument exists
    assert node.state.waiting_on == {b"a": [both, one], b"b": [both]}
    a, b = _value(b"a"), _value(b"b")
    # The value is made ready, readers are woken, and the task is placed, in one call.
    assert node.handle(m.Produced((a,))) == [m.ValuesReady((b"a",)), m.Replace(one)]
    assert both.pending_deps == {b"b"}
    assert node.handle(m.Produced((b,))) == [m.ValuesReady((b"b",)), m.Replace(both)]
    assert node.state.waiting_on == {}


def test_a_task_run_again_waits_for_an_argument_being_rebuilt_before_it_is_placed():
    node = Node()
    task = node.task(queued=False, args=[b"a", b"z"])
    node.handle(m.Put(1, _value(b"z")))
    node.handle(m.Put(1, _value(b"a")))
    node.handle(m.Lost((b"a",)))                 # its only copy died: rebuilt
    assert node.handle(m.PlaceWhenArgsReady(task)) == []
    assert task.pending_deps == {b"a"} and node.state.waiting_on == {b"a": [task]}
    assert node.handle(m.Produced((_value(b"a"),))) == [m.ValuesReady((b"a",)), m.Replace(task)]
    ready = node.task(queued=False, args=[b"z"])
    assert node.handle(m.PlaceWhenArgsReady(ready)) == [m.Replace(ready)]


def test_arguments_are_pulled_when_a_task_gets_its_resources_and_only_a_task_with_some():
    node = Node(cpus=2.0)
    worker = node.worker(101)
    plain, with_args = node.task(), node.task(args=[b"o" * 28])
    out = node.handle(m.Schedule(T0, W0))
    # The first has nothing to pull; the second waits for a worker, its
    # argument already on its way.
    assert out == [m.Execute(plain, worker), m.Prefetch(with_args),
                   m.EnsureWorkers(with_args, 1)]


def test_queued_tasks_start_while_cpus_last_and_one_without_a_worker_waits_for_the_next():
    node = Node(cpus=2.0)
    first = node.worker(101)
    one, two, three = node.task(), node.task(), node.task()

    out = node.handle(m.Schedule(T0, W0))

    assert out == [m.Execute(one, first), m.EnsureWorkers(two, 1)]
    assert one.state is S.RUNNING and first.current_task is one and one.worker is first
    assert one.started_at == T0 and one.started_wall == W0 and one.ran_on == (first.worker_id, 101)
    assert two.state is S.ASSIGNED and two.acquired and node.state.awaiting == [two]
    assert three.state is S.QUEUED and list(node.queue) == [three]
    assert node.free_cpus() == 0.0

    second = node.worker(102, idle=False)
    out = node.handle(m.WorkerReady(second, T0 + 1, W0 + 1))     # it connected: it takes `two`
    assert out == [m.Execute(two, second)] and node.state.awaiting == []
    assert two.state is S.RUNNING and second.current_task is two


def test_a_worker_with_nothing_waiting_for_it_becomes_idle():
    node = Node()
    worker = node.worker(101, idle=False)
    assert node.handle(m.WorkerReady(worker, T0, W0)) == []
    assert node.workers.idle["default"] == [worker] and worker.current_task is None


def test_a_worker_that_never_connected_is_replaced_for_the_tasks_that_wait():
    node = Node()
    one, two = node.task(), node.task()
    node.handle(m.Schedule(T0, W0))
    assert node.state.awaiting == [one, two]
    assert node.handle(m.WorkerStartFailed("default")) == [m.EnsureWorkers(one, 2)]
    assert node.handle(m.WorkerStartFailed("other-env")) == []


def test_a_draining_node_starts_nothing():
    node = Node(cpus=2.0)
    node.worker(101)
    task = node.task()
    assert node.handle(m.Drain()) == []
    assert node.handle(m.Schedule(T0, W0)) == []
    assert task.state is S.QUEUED and node.free_cpus() == 2.0


def _run_local(task):
    return m.Decided(task, _decision("run_local"), T0, W0)


def test_placed_here_a_task_starts_at_once_only_when_it_fits_and_none_of_its_class_waits():
    node = Node(cpus=1.0)
    worker = node.worker(101)
    first = node.task(queued=False)
    assert node.handle(_run_local(first)) == [m.Execute(first, worker)]
    second = node.task(queued=False)
    assert node.handle(_run_local(second)) == []
    assert second.state is S.QUEUED and list(second.story)[-1][2] == "placed here (run_local)"

    # Room again, but `second` of the same class waits: a newcomer queues behind it.
    node.handle(_returned(first, worker))
    third = node.task(queued=False)
    assert node.handle(_run_local(third)) == []
    assert list(node.queue) == [second, third]


def test_a_peers_offer_starts_if_it_fits_else_joins_the_backlog_or_is_refused():
    node = Node(cpus=1.0)
    worker = node.worker(101)
    fits = node.task(queued=False)
    assert node.handle(m.Offer(fits, T0, W0, backlog=False)) == [
        m.Execute(fits, worker)]
    backlog = node.task(queued=False)
    assert node.handle(m.Offer(backlog, T0, W0, backlog=True)) == []
    assert backlog.state is S.QUEUED
    refused = node.task(queued=False)
    assert node.handle(m.Offer(refused, T0, W0, backlog=False)) == []
    assert refused.state is S.WAITING and not refused.acquired


def test_a_gpu_task_is_pinned_to_its_devices_and_to_workers_of_that_assignment():
    node = Node(cpus=4.0, gpu_ids=[0, 1])
    task = node.task(gpus=1.0)
    out = node.handle(m.Schedule(T0, W0))
    assert task.state is S.ASSIGNED and task.allocation is not None
    assert task.gpu_ids in (["0"], ["1"])
    assert task.worker_key == f"default|gpu:{task.gpu_ids[0]}"
    assert task.worker_env["CUDA_VISIBLE_DEVICES"] == task.gpu_ids[0]
    assert out == [m.EnsureWorkers(task, 1)]
    # Its GPU goes back with it.
    node.handle(m.Cancel(task, force=False))
    assert node.resources.available.get("GPU") == 2.0 and task.allocation is None


def test_a_bundle_task_takes_its_bundles_share_and_gives_it_back():
    bundles = MachineBundles()
    bundles.left = {("g", 0): ResourceSet.from_dict({"CPU": 1.0})}
    node = Node(cpus=2.0, bundles=bundles)
    worker = node.worker(101)
    task = node.task(bundle=("g", 0))
    other = node.task(bundle=("g", 0))
    node.handle(m.Schedule(T0, W0))
    assert task.state is S.RUNNING and other.state is S.QUEUED
    assert bundles.left[("g", 0)].get("CPU", 0.0) == 0.0 and node.free_cpus() == 2.0
    node.handle(_returned(task, worker))
    node.handle(m.Schedule(T0, W0))
    assert other.state is S.RUNNING                # the share went back, and on to `other`


def test_a_bundle_task_with_a_gpu_is_pinned_to_the_bundles_device():
    bundles = MachineBundles()
    bundles.left = {("g", 0): ResourceSet.from_dict({"CPU": 1.0, "GPU": 1.0})}
    bundles.gpus = {("g", 0): [3]}
    node = Node(cpus=2.0, bundles=bundles)
    node.worker(101)                               # a worker of no device assignment
    task = node.task(bundle=("g", 0), gpus=1.0)
    assert node.handle(m.Schedule(T0, W0)) == [m.EnsureWorkers(task, 1)]
    assert task.gpu_ids == ["3"] and task.worker_key == "default|gpu:3"


# ---------------------------------------------------------------- placement's verdicts
def _decision(kind, **fields):
    return SimpleNamespace(kind=kind, **fields)


def test_each_placement_verdict_does_what_it_says():
    node = Node(cpus=1.0)
    worker = node.worker(101)
    here = node.task(queued=False)
    assert node.handle(m.Decided(here, _decision("run_local"), T0, W0)) == [
        m.Execute(here, worker)]
    for kind in ("wait", "placement_group"):
        waits = node.task(queued=False)
        assert node.handle(m.Decided(waits, _decision(kind), T0, W0)) == []
        assert waits.state is S.QUEUED and list(waits.story)[-1][2] == f"placed here ({kind})"
    away = node.task(queued=False)
    assert node.handle(m.Decided(away, _decision("spill", candidates=("b", "c")), T0, W0)) == [
        m.Spill(away, ["b", "c"])]
    assert away.state is S.WAITING              # the offer itself moves it (SPILLED)

    nowhere = node.task(queued=False, name="f")
    (failed,) = node.handle(m.Decided(nowhere, _decision("unschedulable", reason="its node died"),
                                      T0, W0))
    assert isinstance(failed.error, exceptions.TaskUnschedulableError)
    assert f"f (id {nowhere.task_id.hex()}) cannot be scheduled: its node died" \
        in str(failed.error)


def test_a_task_pinned_to_a_node_the_view_does_not_know_waits_for_etcd_before_failing():
    # A node that just joined is in etcd before this node's watch shows it:
    # the task waits for the view while etcd is asked, and fails only when
    # etcd has no such member.
    node = Node(cpus=1.0)
    reason = "Hard NodeAffinitySchedulingStrategy cannot be satisfied: node n1 is not known."
    unknown = _decision("unschedulable", reason=reason, unknown_node="n1")
    joined = node.task(queued=False)
    assert node.handle(m.Decided(joined, unknown, T0, W0)) == [
        m.ConfirmMember(joined, "n1", reason)]
    assert joined.state is S.INFEASIBLE and node.state.infeasible == [joined]
    # The view change that shows the node places it again; a late "absent"
    # (from a question asked before) no longer touches it.
    assert node.handle(m.ViewChanged()) == [m.Replace(joined)]
    assert node.handle(m.MemberAbsent(joined, "n1", reason)) == []
    assert joined.state is S.WAITING

    stranger = node.task(queued=False, name="f")
    node.handle(m.Decided(stranger, unknown, T0, W0))
    (failed,) = node.handle(m.MemberAbsent(stranger, "n1", reason))
    assert failed.task is stranger and isinstance(failed.error, exceptions.TaskUnschedulableError)
    assert f"f (id {stranger.task_id.hex()}) cannot be scheduled: {reason}" in str(failed.error)
    assert node.state.infeasible == []

    # A node this one saw die is not asked about: the task fails at once.
    node.dead_peers.add("n1")
    (failed,) = node.handle(m.Decided(node.task(queued=False), unknown, T0, W0))
    assert isinstance(failed.error, exceptions.TaskUnschedulableError)


def test_a_task_that_fits_no_node_is_told_once_and_placed_again_when_the_view_changes():
    node = Node(cpus=1.0)
    task = node.task(queued=False, cpus=64.0)
    task.refused_by.add("b")
    (notice,) = node.handle(m.Decided(task, _decision("infeasible", reason="no node has 64 CPU"),
                                      T0, W0))
    assert notice.task is task and "cannot be scheduled right now" in notice.text
    assert "no node has 64 CPU" in notice.text
    assert task.state is S.INFEASIBLE and node.state.infeasible == [task]

    assert node.handle(m.ViewChanged()) == [m.Replace(task)]
    assert task.state is S.WAITING and not task.refused_by and node.state.infeasible == []
    assert node.handle(m.Decided(task, _decision("infeasible", reason=""), T0, W0)) == []  # told once

    (failed,) = node.handle(m.Cancel(task, force=False))       # no longer waits for the view
    assert failed.task is task and node.state.infeasible == []
    assert node.handle(m.ViewChanged()) == []


def test_a_refused_offer_goes_to_the_next_candidate_then_back_in_line():
    node = Node(cpus=0.0)
    task = node.task(queued=False)
    move(task, S.SPILLED, "test: offered to b")
    task.spill_candidates = ["c"]
    assert node.handle(m.Refused(task, "b")) == [m.Spill(task, ["c"])]
    assert task.refused_by == {"b"}
    task.spill_candidates = []
    assert node.handle(m.Refused(task, "c")) == []
    assert task.state is S.QUEUED and not task.refused_by        # every candidate refused


def test_a_verdict_of_no_known_kind_is_refused_by_name():
    node = Node()
    with pytest.raises(ValueError, match="decision.kind='maybe'"):
        node.handle(m.Decided(node.task(queued=False), _decision("maybe"), T0, W0))


# ---------------------------------------------------------------- results
def test_a_returned_task_gives_its_cpu_and_worker_back_and_finishes():
    node = Node(cpus=1.0)
    task, worker = node.running()
    out = node.handle(_returned(task, worker, values=("a", "b")))
    assert out == [m.Finish(task, ("a", "b"))]
    assert node.free_cpus() == 1.0 and not task.acquired and task.worker is None
    assert node.workers.idle["default"] == [worker] and worker.current_task is None


def test_a_returned_tasks_worker_goes_first_to_a_task_holding_resources_for_one():
    node = Node(cpus=2.0)
    task, worker = node.running()
    waiting = node.task()
    node.handle(m.Schedule(T0, W0))
    assert waiting.state is S.ASSIGNED               # no idle worker when it got its CPU
    queued = node.task()
    out = node.handle(_returned(task, worker))
    assert out == [m.Execute(waiting, worker), m.Finish(task, ("v",))]
    # The queued one starts at the next schedule, when a CPU and a worker are free.
    assert queued.state is S.QUEUED


def test_a_retryable_error_runs_the_task_again_while_retries_last():
    node = Node(cpus=1.0)
    task, worker = node.running(retries=1)
    out = node.handle(_returned(task, worker, retryable=True))
    assert out == [m.Replace(task)]
    assert task.state is S.WAITING and task.retries_left == 0 and task.spec.attempt == 1
    assert node.free_cpus() == 1.0

    node.handle(_run_local(task))
    out = node.handle(_returned(task, worker, retryable=True))
    assert out == [m.Finish(task, ("v",))]          # no retry left: the error is the result


def test_a_cancelled_task_that_raised_is_not_retried():
    node = Node(cpus=1.0)
    task, worker = node.running(retries=5)
    node.handle(m.Cancel(task, force=False))
    assert node.handle(_returned(task, worker, retryable=True)) == [m.Finish(task, ("v",))]
    assert task.retries_left == 5


def test_a_pipelined_task_with_arguments_has_them_pulled_before_it_is_sent():
    node = Node(cpus=1.0)
    for _ in range(3):
        node.state.runtime_stats.observe(FUNCTION, 0.0001)    # known to be short
    worker = node.worker(101)
    leader, follower = node.task(), node.task(args=[b"o" * 28])
    assert node.handle(m.Schedule(T0, W0)) == [
        m.Execute(leader, worker), m.Prefetch(follower), m.Execute(follower, worker)]


def test_a_pipelined_short_task_inherits_the_cpu_of_the_one_it_followed():
    node = Node(cpus=1.0)
    for _ in range(3):
        node.state.runtime_stats.observe(FUNCTION, 0.0001)    # known to be short
    worker = node.worker(101)
    leader, follower = node.task(), node.task()

    out = node.handle(m.Schedule(T0, W0))

    assert out == [m.Execute(leader, worker),
                   m.Execute(follower, worker)]
    assert follower.state is S.RUNNING and list(worker.pipeline) == [follower]
    assert not follower.acquired and len(node.queue) == 0

    out = node.handle(_returned(leader, worker, now=T0 + 0.5))

    assert out == [m.Finish(leader, ("v",))]
    assert worker.current_task is follower and follower.acquired and not leader.acquired
    assert follower.started_at == T0 + 0.5
    assert node.free_cpus() == 0.0    # still held, by the follower


def test_run_times_are_measured_from_the_times_events_carry():
    node = Node(cpus=1.0)
    for start in (0.0, 10.0, 20.0):
        task, worker = node.running(pid=101 + int(start))
        node.handle(_returned(task, worker, now=T0 + 0.001))
    assert node.state.runtime_stats.is_short(FUNCTION)     # 1 ms each: short


def test_busy_workers_take_short_tasks_behind_them_when_cpus_run_out():
    node = Node(cpus=1.0)
    for _ in range(3):
        node.state.runtime_stats.observe(FUNCTION, 0.0001)
    worker = node.worker(101)
    leader = node.task()
    node.handle(m.Schedule(T0, W0))
    assert list(worker.pipeline) == []
    late = node.task()
    assert node.handle(m.Schedule(T0, W0)) == [m.Execute(late, worker)]
    assert list(worker.pipeline) == [late] and leader.state is S.RUNNING


# ---------------------------------------------------------------- worker deaths
def test_a_worker_death_retries_its_task_and_places_its_pipelined_ones_again():
    node = Node(cpus=1.0)
    for _ in range(3):
        node.state.runtime_stats.observe(FUNCTION, 0.0001)
    worker = node.worker(101)
    task, follower = node.task(retries=2), node.task()
    node.handle(m.Schedule(T0, W0))
    assert list(worker.pipeline) == [follower]

    out = node.handle(m.WorkerLost(worker, owner_present=True))

    assert out == [m.KillWorker(worker), m.Replace(follower), m.Replace(task)]
    assert task.state is S.WAITING and follower.state is S.WAITING
    assert task.retries_left == 1 and follower.retries_left == 3     # only `task` ran
    assert node.free_cpus() == 1.0 and worker.current_task is None and not worker.pipeline


def test_a_worker_death_with_no_retry_left_waits_for_the_exit_status():
    node = Node(cpus=1.0)
    task, worker = node.running(retries=0)
    out = node.handle(m.WorkerLost(worker, owner_present=True))
    assert out == [m.ReportCrash(task, worker)]       # not killed: its exit status names why
    assert task.state is S.CRASHED and node.free_cpus() == 1.0


def test_a_worker_death_whose_owner_left_is_not_retried():
    node = Node(cpus=1.0)
    task, worker = node.running(retries=3)
    out = node.handle(m.WorkerLost(worker, owner_present=False))
    assert out == [m.ReportCrash(task, worker)] and task.retries_left == 3


def test_a_worker_the_node_killed_on_purpose_fails_its_task_with_that_error():
    node = Node(cpus=1.0)
    task, worker = node.running(retries=3)
    worker.kill_error = exceptions.OutOfMemoryError("killed for memory")
    out = node.handle(m.WorkerLost(worker, owner_present=True))
    assert out == [m.ReportCrash(task, worker)] and task.state is S.CRASHED


def test_a_task_the_memory_monitor_killed_is_retried_after_its_delay_without_spending_a_retry():
    node = Node(cpus=1.0)
    task, worker = node.running(retries=1)
    worker.oom_retry_in = 2.5
    out = node.handle(m.WorkerLost(worker, owner_present=True))
    assert out == [m.KillWorker(worker), m.ReplaceLater(task, 2.5)]
    assert task.state is S.WAITING and task.retries_left == 1 and task.spec.attempt == 1


def test_a_cancelled_tasks_worker_death_fails_it_as_cancelled():
    node = Node(cpus=1.0)
    task, worker = node.running()
    assert node.handle(m.Cancel(task, force=True)) == [m.KillWorker(worker)]
    (kill, failed) = node.handle(m.WorkerLost(worker, owner_present=True))
    assert kill == m.KillWorker(worker)
    assert failed.task is task and isinstance(failed.error, exceptions.TaskCancelledError)


@pytest.mark.parametrize("group_gone, retries, expected", [
    (True, 3, "removed"), (False, 3, "retry"), (False, 0, "fail")])
def test_a_task_whose_bundle_left_fails_when_its_group_is_gone_else_retries(
        group_gone, retries, expected):
    bundles = MachineBundles()
    bundles.left = {("g", 0): ResourceSet.from_dict({"CPU": 1.0})}
    node = Node(cpus=1.0, bundles=bundles)
    task, worker = node.running(retries=retries, bundle=("g", 0))
    task.pg_dropped = True
    out = node.handle(m.WorkerLost(worker, owner_present=True, group_gone=group_gone))
    assert out[0] == m.KillWorker(worker)            # a bundle loss is never "reported"
    assert task.bundle is None and not task.pg_dropped
    if expected == "removed":
        assert out[1:] == [m.GroupRemoved(task)]
    elif expected == "retry":
        assert out[1:] == [m.Replace(task)] and task.state is S.WAITING
    else:
        assert isinstance(out[1], m.FailTask)
        assert isinstance(out[1].error, exceptions.WorkerCrashedError)
        assert "lost its placement-group bundle" in str(out[1].error)


def test_a_runtime_env_that_cannot_be_set_up_fails_the_tasks_waiting_for_its_workers():
    node = Node(cpus=2.0)
    one, two = node.task(), node.task()
    node.handle(m.Schedule(T0, W0))
    error = exceptions.RuntimeEnvSetupError("pip failed")
    out = node.handle(m.EnvSetupFailed("default", error))
    assert out == [m.FailTask(one, error), m.FailTask(two, error)]
    assert node.state.awaiting == [] and node.free_cpus() == 2.0


# ---------------------------------------------------------------- cancel
def test_cancel_in_each_state_does_what_that_state_needs():
    node = Node(cpus=1.0)
    worker = node.worker(101)
    running, queued = node.task(), node.task()
    node.handle(m.Schedule(T0, W0))
    assert node.handle(m.Cancel(running, force=False)) == [m.KillTask(running, worker)]
    assert running.cancelled and running.state is S.RUNNING     # ends when its worker says

    (failed,) = node.handle(m.Cancel(queued, force=False))
    assert failed.task is queued and isinstance(failed.error, exceptions.TaskCancelledError)
    assert len(node.queue) == 0

    spilled = node.task(queued=False)
    move(spilled, S.SPILLED, "test: offered to a peer")
    assert node.handle(m.Cancel(spilled, force=True, recursive=True)) == [
        m.CancelRemote(spilled, True, True)]

    for_group = node.task(queued=False)
    move(for_group, S.WAITING_GROUP, "test: waits for its bundle")
    unwait, failed = node.handle(m.Cancel(for_group, force=False))
    assert unwait == m.Unwait(for_group, S.WAITING_GROUP) and failed.task is for_group

    for_args = node.task(queued=False, args=[b"arg1"])
    node.handle(m.Submitted(for_args))
    (failed,) = node.handle(m.Cancel(for_args, force=False))
    assert failed.task is for_args and node.state.waiting_on == {}

    crashed, worker2 = Node(cpus=1.0).running(retries=0)
    move(crashed, S.CRASHED, "test: died")
    assert Node().handle(m.Cancel(crashed, force=False)) == []   # fails with its exit status


def test_cancel_of_a_task_holding_resources_for_a_worker_gives_them_back():
    node = Node(cpus=1.0)
    task = node.task()
    node.handle(m.Schedule(T0, W0))
    assert task.state is S.ASSIGNED and node.free_cpus() == 0.0
    (failed,) = node.handle(m.Cancel(task, force=False))
    assert failed.task is task and node.state.awaiting == [] and node.free_cpus() == 1.0


def test_cancel_of_a_finished_or_already_cancelled_task_does_nothing():
    node = Node(cpus=1.0)
    task, worker = node.running()
    assert node.handle(m.Cancel(task, force=True)) == [m.KillWorker(worker)]
    assert node.handle(m.Cancel(task, force=True)) == []
    done = node.task(queued=False)
    move(done, S.DONE, "test: finished")
    assert node.handle(m.Cancel(done, force=True)) == [] and not done.cancelled


# ---------------------------------------------------------------- resources
def test_a_task_blocked_in_get_lends_its_cpu_and_takes_it_back_when_free():
    node = Node(cpus=1.0)
    task, worker = node.running()
    assert node.handle(m.Blocked(worker, True)) == []
    assert task.cpu_lent and node.free_cpus() == 1.0
    assert node.handle(m.Blocked(worker, False)) == []
    assert not task.cpu_lent and node.free_cpus() == 0.0
    # Lent, and taken meanwhile: it runs on without it; its release does not double-count.
    node.handle(m.Blocked(worker, True))
    assert node.resources.try_acquire(ResourceSet.from_dict({"CPU": 1.0}))
    node.handle(m.Blocked(worker, False))
    assert task.cpu_lent
    node.handle(_returned(task, worker))
    assert node.free_cpus() == 0.0                  # the other holder still has it


def test_release_takes_a_task_out_of_line_and_gives_back_what_it_held():
    node = Node(cpus=1.0)
    queued = node.task()
    assigned = node.task(queued=False)
    node.handle(m.Schedule(T0, W0))              # `queued` takes the CPU, waits for a worker
    assert node.handle(m.Release(queued)) == []
    assert node.state.awaiting == [] and node.free_cpus() == 1.0
    node.queue.push(assigned, "test: queued")
    assert node.handle(m.Release(assigned)) == [] and len(node.queue) == 0


# ---------------------------------------------------------------- errors and the log
def test_an_illegal_move_raises_with_the_tasks_story_and_the_nodes_last_events():
    log = EventLog(capacity=50)
    node = Node(cpus=1.0, log=log)
    task, _worker = node.running()
    with pytest.raises(InvalidTaskTransition) as caught:
        node.handle(_run_local(task))           # placed twice: RUNNING cannot queue
    text = str(caught.value)
    assert "cannot move from running to queued (placed here (run_local))" in text
    assert "queued -> running: sent to worker 101" in text       # its story
    assert "The node's last events:" in text and " Decided" in text


def test_an_unknown_event_is_refused_by_name():
    with pytest.raises(TypeError, match="event='schedule!': expected one of Submitted, Decided, .*, OwnerNodeDied$"):
        Node().handle("schedule!")


def test_the_event_log_keeps_each_event_handled_but_the_frequent_ones():
    log = EventLog(capacity=50)
    node = Node(cpus=1.0, log=log)
    task, worker = node.running()
    node.handle(m.RefsChanged(7, add=(b"x",)))
    node.handle(_returned(task, worker))
    events = [e for e in log.tail() if e["kind"] == "event"]
    assert [e["to"] for e in events] == ["TaskReturned"]
    assert events[0]["id"] == task.task_id.hex()
    assert [(e["from"], e["to"]) for e in log.tail() if e["kind"] == "task"] == [
        ("waiting", "queued"), ("queued", "running")]


# ---------------------------------------------------------------- the retry rule
def _bare(retries: int, cancelled: bool = False):
    spec = pb.TaskSpec(task_id=b"\x01" * 4, max_retries=retries)
    task = TaskRecord.from_spec(spec, None, "default", return_ids=[])
    task.cancelled = cancelled
    return task


@pytest.mark.parametrize("retries, options, verdict, left", [
    (2, {}, RETRY, 1),
    (-1, {}, RETRY, -1),                                   # unlimited
    (0, {}, FAIL, 0),
    (0, {"crashed": True}, CRASHED, 0),
    (2, {"owner_present": False, "crashed": True}, CRASHED, 2),
    (2, {"kill_error": RuntimeError("x"), "crashed": True}, CRASHED, 2),
    (0, {"oom_delay": 1.0}, RETRY_LATER, 0),               # spends no retry
    (0, {"oom_delay": 1.0, "owner_present": False}, FAIL, 0),
])
def test_retry_or_fail_is_the_one_rule(retries, options, verdict, left):
    task = _bare(retries)
    attempt = task.spec.attempt
    assert retry_or_fail(task, **options) == verdict
    assert task.retries_left == left
    assert task.spec.attempt == attempt + (verdict in (RETRY, RETRY_LATER))


def test_retry_or_fail_never_runs_a_cancelled_task_again():
    task = _bare(5, cancelled=True)
    assert retry_or_fail(task, oom_delay=1.0) == FAIL and task.retries_left == 5


def test_stopping_a_running_task_kills_its_worker_and_its_loss_decides_the_rest():
    node = Node(cpus=1.0)
    task, worker = node.running(retries=3)
    assert node.handle(m.StopRunning(task, "cancelled")) == [m.KillWorker(worker)]
    (kill, failed) = node.handle(m.WorkerLost(worker, owner_present=True))
    assert isinstance(failed.error, exceptions.TaskCancelledError) and task.retries_left == 3

    moved, worker2 = node.running(pid=102, retries=3)
    assert node.handle(m.StopRunning(moved, "bundle_left")) == [m.KillWorker(worker2)]
    assert moved.pg_dropped

    waiting = node.task(queued=False)
    assert node.handle(m.StopRunning(waiting, "cancelled")) == [] and waiting.cancelled
    with pytest.raises(ValueError, match="why='bored'"):
        node.handle(m.StopRunning(waiting, "bored"))
