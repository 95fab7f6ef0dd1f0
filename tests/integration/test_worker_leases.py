"""Tasks pushed straight to a leased worker keep every guarantee of the node's path.

A driver that submits plain tasks one after another gets a worker lease from
its node and pushes the tasks to that worker itself (core/task_leases.py,
node/state/lease_life.py). These tests run a real cluster and check, for
pushed tasks: that they are pushed at all and seen by the state API; that a
worker's death retries them through the node or fails them with
WorkerCrashedError; retryable errors; both kinds of cancel; and that a
driver that dies holding a lease leaves no task of its running.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import time

import cloudpickle
import pytest

from tests.helpers import run_driver, wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.cluster_args(head_node_args={"num_cpus": 2})


def quick(x):
    return x + 1


def mark_and_sleep(directory, name, seconds):
    """Leave `name-<pid>` in `directory`, then sleep: a pushed task to kill or cancel."""
    open(os.path.join(directory, f"{name}-{os.getpid()}"), "w").close()
    time.sleep(seconds)
    return os.getpid()


def fails_once(directory):
    marker = os.path.join(directory, "failed-once")
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise ValueError("the first attempt fails")
    return "second attempt"


def _leases(ray):
    from meshray.core import state as state_mod
    return state_mod.state.core.leases


def _pid_of(directory, name):
    found = [n for n in os.listdir(directory) if n.startswith(f"{name}-")]
    return int(found[0].rsplit("-", 1)[1]) if found else None


def _pushed_while_leased(ray, fn, *args):
    """Submit fn(*args) right after a sync task that was pushed on a lease,
    while that lease is idle: the task is pushed on it too (asserted)."""
    fn_quick = ray.remote(quick)
    leases = _leases(ray)
    deadline = time.monotonic() + 30
    while True:     # (the node grants a lease once a worker is idle)
        before = leases.pushed
        assert ray.get(fn_quick.remote(1), timeout=30) == 2
        if leases.pushed > before:
            break
        assert time.monotonic() < deadline, "no sync task was pushed on a lease in 30 s"
    before = leases.pushed
    ref = fn.remote(*args)
    assert leases.pushed == before + 1, "the task went through the node, not the idle lease"
    return ref


def test_sync_tasks_are_pushed_on_a_lease_that_the_state_api_shows(cluster, tmp_path):
    ray = cluster.connect()
    fn = ray.remote(quick)
    leases = _leases(ray)
    # (The node grants a lease once a worker is idle: its workers may still be starting.)
    deadline = time.monotonic() + 30
    while leases.pushed < 20 and time.monotonic() < deadline:
        assert ray.get(fn.remote(1), timeout=30) == 2
    assert leases.pushed >= 20, "sync tasks went through the node, not a lease"

    slow = ray.remote(mark_and_sleep)
    ref = _pushed_while_leased(ray, slow, str(tmp_path), "slow", 3.0)
    pid = wait_for(lambda: _pid_of(tmp_path, "slow"), message="the pushed task started")
    from meshray.util.state import list_tasks, list_workers
    driver_id = ray.get_runtime_context().get_worker_id()
    worker = wait_for(lambda: next((w for w in list_workers(detail=True) if w["pid"] == pid),
                                   None), message="the leased worker is listed")
    assert worker["state"] == "LEASED" and worker["lease_holder_id"] == driver_id
    assert ray.get(ref, timeout=30) == pid

    def listed():
        tasks = list_tasks(filters=[("worker_pid", "=", pid), ("state", "=", "FINISHED")],
                           detail=True)
        return [t for t in tasks if t["name"].endswith("mark_and_sleep")]
    task = wait_for(listed, message="the pushed task is in the state API")[0]
    assert task["type"] == "NORMAL_TASK" and task["node_id"] == worker["node_id"]


def _pushed_then_killed(ray, tmp_path, retries: int):
    """A pushed task whose worker is SIGKILLed while it runs: (its ref, the pid killed)."""
    slow = ray.remote(max_retries=retries)(mark_and_sleep)
    ref = _pushed_while_leased(ray, slow, str(tmp_path), "victim", 30.0 if retries == 0 else 2.0)
    pid = wait_for(lambda: _pid_of(tmp_path, "victim"), message="the pushed task started")
    os.kill(pid, signal.SIGKILL)
    return ref, pid


def test_a_pushed_task_whose_worker_dies_runs_again_through_the_node(cluster, tmp_path):
    ray = cluster.connect()
    ref, pid = _pushed_then_killed(ray, tmp_path, retries=2)
    assert ray.get(ref, timeout=60) != pid       # the retry ran on another worker


def test_a_pushed_task_without_retries_fails_with_worker_crashed(cluster, tmp_path):
    ray = cluster.connect()
    ref, _pid = _pushed_then_killed(ray, tmp_path, retries=0)
    with pytest.raises(ray.exceptions.WorkerCrashedError, match="max_retries=0"):
        ray.get(ref, timeout=60)


def test_a_pushed_task_with_a_retryable_error_runs_again(cluster, tmp_path):
    ray = cluster.connect()
    flaky = ray.remote(retry_exceptions=True, max_retries=1)(fails_once)
    ref = _pushed_while_leased(ray, flaky, str(tmp_path))
    assert ray.get(ref, timeout=60) == "second attempt"


@pytest.mark.parametrize("force", [False, True])
def test_a_pushed_task_can_be_cancelled(cluster, tmp_path, force):
    ray = cluster.connect()
    slow = ray.remote(max_retries=3)(mark_and_sleep)
    ref = _pushed_while_leased(ray, slow, str(tmp_path), "long", 60.0)
    pid = wait_for(lambda: _pid_of(tmp_path, "long"), message="the pushed task started")
    ray.cancel(ref, force=force)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(ref, timeout=30)
    if force:
        wait_for(lambda: not _alive(pid), message=f"the worker {pid} was killed")
    else:
        assert _alive(pid)       # interrupted, not killed: the worker serves on
    assert ray.get(ray.remote(quick).remote(1), timeout=30) == 2


def test_a_driver_that_dies_holding_a_lease_leaves_no_task_running(cluster, tmp_path):
    ray = cluster.connect()    # (this driver's own session keeps the cluster in use)
    code = f"""
import os, sys, time
sys.path.insert(0, {os.getcwd()!r})
import meshray as ray
from tests.integration.test_worker_leases import mark_and_sleep, quick
ray.init(address={cluster.address!r}, _token={cluster.token!r})
q, slow = ray.remote(quick), ray.remote(mark_and_sleep)
from meshray.core import state
for i in range(20):
    ray.get(q.remote(i), timeout=30)
    before = state.state.core.leases.pushed
    ref = slow.remote({str(tmp_path)!r}, f"orphan{{i}}", 120.0)
    if state.state.core.leases.pushed > before:
        name = f"orphan{{i}}"
        break
    # It went through the node (the lease was already given back): it would
    # hold a CPU for two minutes, and two of them every CPU of the node.
    ray.cancel(ref, force=True)
else:
    raise SystemExit("no task was pushed in 20 tries")
deadline = time.monotonic() + 30
while not any(n.startswith(name + "-") for n in os.listdir({str(tmp_path)!r})):
    assert time.monotonic() < deadline, "the pushed task never started"
    time.sleep(0.05)
print("PUSHED", name, flush=True)
os._exit(0)
"""
    driver = run_driver(code, timeout=90)
    pushed = re.search(r"^PUSHED (orphan\d+)$", driver.stdout, re.MULTILINE)
    assert pushed, driver.stderr
    pid = _pid_of(tmp_path, pushed.group(1))
    wait_for(lambda: not _alive(pid), timeout=30,
             message=f"the leased worker {pid} of the dead driver was killed")
    assert ray.get(ray.remote(quick).remote(1), timeout=30) == 2


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def parent_of_a_child(x):
    """A task that submits a task and waits for it (its CPU must be lent meanwhile)."""
    import meshray
    return meshray.get(meshray.remote(quick).remote(x), timeout=60) * 10


@pytest.mark.cluster_args(head_node_args={"num_cpus": 1})
def test_a_pushed_task_waiting_for_its_child_on_a_one_cpu_node_does_not_deadlock(cluster):
    ray = cluster.connect()
    parent = ray.remote(parent_of_a_child)
    ref = _pushed_while_leased(ray, parent, 4)
    assert ray.get(ref, timeout=60) == 50


def test_a_pushed_tasks_result_passed_to_another_task_reaches_it(cluster):
    ray = cluster.connect()
    add = ray.remote(quick)
    first = _pushed_while_leased(ray, add, 1)
    # Passed on before and after its value arrived: either way the node gets it.
    second = add.remote(first)
    assert ray.get(first, timeout=30) == 2
    third = add.remote(first)
    assert ray.get([second, third], timeout=30) == [3, 3]
    import numpy as np
    big = ray.remote(lambda n: np.ones(n, dtype=np.uint8))
    stored = _pushed_while_leased(ray, big, 4 << 20)      # a stored (not inline) result
    assert ray.get(ray.remote(lambda a: int(a.sum())).remote(stored), timeout=30) == 4 << 20
