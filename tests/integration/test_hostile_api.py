"""Regression tests for defects found by hostile use of the public API.

Each test drives real etcd, a real node daemon and real workers; the ones
about the driver's `__main__` or process lifetimes run a driver script in a
fresh interpreter so `__main__` and the process tree are really the driver's.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.helpers import REPO, run_driver, wait_for


NAMESPACE = "hostile-ns"


# The `ray` fixture: a private 2-CPU cluster whose driver runs in a named namespace.
pytestmark = pytest.mark.meshray_init(num_cpus=2, namespace=NAMESPACE)


def _last_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------ user exceptions
_MAIN_EXCEPTION_DRIVER = """
import json, os, sys
import meshray as ray

class MainError(Exception):
    '''Defined in the driver's __main__: a worker can only get it by value.'''

class RefusesPickling(Exception):
    def __reduce__(self):
        raise RuntimeError("this exception refuses to be pickled")

runs = sys.argv[1]
ray.init(num_cpus=1)

@ray.remote(max_retries=3)
def failing():
    with open(runs, "a") as handle:
        handle.write("x")
    raise MainError("custom failure 17")

@ray.remote(max_retries=1, retry_exceptions=[MainError])
def retried():
    with open(runs + ".retried", "a") as handle:
        handle.write("x")
    raise MainError("retried failure 19")

@ray.remote
def unpicklable():
    raise RefusesPickling("cannot travel 23")

@ray.remote
def still_works():
    return os.getpid()

@ray.remote
class Holder:
    def __init__(self, fail):
        if fail == "main":
            raise MainError("constructor failure 31")
        if fail == "unpicklable":
            raise RefusesPickling("constructor cannot travel 37")
    def boom(self):
        raise MainError("method failure 41")
    def pid(self):
        return os.getpid()

out = {}

def outcome(call):
    try:
        call()
    except Exception as error:
        return {"types": [t.__name__ for t in type(error).__mro__],
                "is_main_error": isinstance(error, MainError), "text": str(error)}
    return {"types": []}

out["task"] = outcome(lambda: ray.get(failing.remote(), timeout=60))
out["runs"] = open(runs).read()
out["retried"] = outcome(lambda: ray.get(retried.remote(), timeout=60))
out["retried_runs"] = open(runs + ".retried").read()
out["unpicklable"] = outcome(lambda: ray.get(unpicklable.remote(), timeout=60))
holder = Holder.remote(None)
pid = ray.get(holder.pid.remote(), timeout=60)
out["method"] = outcome(lambda: ray.get(holder.boom.remote(), timeout=60))
out["actor_alive_after"] = ray.get(holder.pid.remote(), timeout=60) == pid
out["ctor"] = outcome(lambda: ray.get(Holder.remote("main").pid.remote(), timeout=60))
out["ctor_unpicklable"] = outcome(
    lambda: ray.get(Holder.remote("unpicklable").pid.remote(), timeout=60))
out["after"] = isinstance(ray.get(still_works.remote(), timeout=60), int)
ray.shutdown()
print(json.dumps(out))
"""


def test_exceptions_from_driver_main_travel_by_value(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(_MAIN_EXCEPTION_DRIVER)
    runs = tmp_path / "runs"
    result = subprocess.run([sys.executable, str(script), str(runs)], capture_output=True,
                            text=True, timeout=240, cwd=REPO)
    out = _last_json(result)
    # The task's own exception reaches the driver, catchable as its class, and
    # the body ran once: packaging the error neither crashed nor retried it.
    task = out["task"]
    assert task["is_main_error"], out
    assert "RayTaskError" in task["types"] and "custom failure 17" in task["text"]
    assert "WorkerCrashedError" not in task["types"]
    assert out["runs"] == "x"
    # retry_exceptions naming a class from __main__ is honoured: one retry.
    assert out["retried"]["is_main_error"] and out["retried_runs"] == "xx", out
    # Same for an actor method; the actor survives its method's error.
    assert out["method"]["is_main_error"] and "method failure 41" in out["method"]["text"]
    assert out["actor_alive_after"] is True
    # A constructor's error kills the actor with that error as the reason,
    # not as "the actor's worker process died".
    ctor = out["ctor"]
    assert "ActorDiedError" in ctor["types"], ctor
    assert "MainError" in ctor["text"] and "constructor failure 31" in ctor["text"]
    assert "worker process died" not in ctor["text"]
    # An exception that cannot be pickled at all arrives as a RayTaskError
    # naming its type, text and where it was raised.
    bad = out["unpicklable"]
    assert "RayTaskError" in bad["types"], bad
    assert "RefusesPickling" in bad["text"] and "cannot travel 23" in bad["text"]
    assert "in unpicklable" in bad["text"]
    bad_ctor = out["ctor_unpicklable"]
    assert "ActorDiedError" in bad_ctor["types"], bad_ctor
    assert "constructor cannot travel 37" in bad_ctor["text"]
    assert "worker process died" not in bad_ctor["text"]
    assert out["after"] is True


# ------------------------------------------------------------ namespaces
def test_tasks_and_actors_run_in_the_jobs_namespace(ray):
    @ray.remote
    class Registry:
        def where(self):
            return ray.get_runtime_context().namespace

        def finds(self, name):
            return ray.get_actor(name)._actor_id.hex() == self_id()

    def self_id():
        return ray.get_runtime_context().get_actor_id()

    registry = Registry.options(name="hostile-registry").remote()
    assert ray.get(registry.where.remote(), timeout=60) == NAMESPACE

    @ray.remote
    def look_up():
        handle = ray.get_actor("hostile-registry")
        return ray.get_runtime_context().namespace, ray.get(handle.where.remote())

    @ray.remote
    def nested():
        return ray.get(look_up.remote())

    assert ray.get(look_up.remote(), timeout=60) == (NAMESPACE, NAMESPACE)
    assert ray.get(nested.remote(), timeout=60) == (NAMESPACE, NAMESPACE)
    assert ray.get(registry.finds.remote("hostile-registry"), timeout=60) is True
    # An actor named into another namespace still runs in its job's namespace.
    elsewhere = Registry.options(name="hostile-other", namespace="elsewhere").remote()
    assert ray.get(elsewhere.where.remote(), timeout=60) == NAMESPACE
    assert ray.get_actor("hostile-other", namespace="elsewhere") is not None
    ray.kill(elsewhere)
    ray.kill(registry)


# ------------------------------------------------------------ cancel
def test_cancel_interrupts_a_blocking_sleep_and_keeps_the_worker(ray, tmp_path):
    started = tmp_path / "started"

    @ray.remote(max_retries=0)
    def sleeper(path):
        with open(path, "w") as handle:
            handle.write(str(os.getpid()))
        time.sleep(60)
        return "finished"

    @ray.remote
    def pid():
        return os.getpid()

    ref = sleeper.remote(str(started))
    wait_for(lambda: started.exists() and started.read_text(), timeout=60, message="task started")
    worker_pid = int(started.read_text())
    ray.cancel(ref)
    # Interrupted at once, not when the 60 s sleep would have ended.
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(ref, timeout=15)
    # Not killed: the same worker process is alive and runs the next tasks.
    assert psutil.pid_exists(worker_pid)
    assert psutil.Process(worker_pid).status() != psutil.STATUS_ZOMBIE
    assert all(isinstance(p, int) for p in ray.get([pid.remote() for _ in range(4)], timeout=60))
    assert psutil.pid_exists(worker_pid)


def test_cancel_interrupts_a_task_blocked_in_get(ray, tmp_path):
    started = tmp_path / "started"

    @ray.remote(num_cpus=0)
    def forever():
        time.sleep(600)

    @ray.remote(max_retries=0)
    def waiter(path, inner):
        with open(path, "w") as handle:
            handle.write("1")
        return ray.get(inner[0])

    inner = forever.remote()
    ref = waiter.remote(str(started), [inner])
    wait_for(started.exists, timeout=60, message="task started")
    ray.cancel(ref)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(ref, timeout=15)
    ray.cancel(inner, force=True)


# ------------------------------------------------------------ infeasible work
_INFEASIBLE_DRIVER = """
import io, sys, time
import meshray as ray

class Tee(io.TextIOBase):
    '''Forwards to the real stderr and keeps a copy, so we know when notices came.'''
    def __init__(self, real):
        self.real, self.seen = real, []
    def write(self, text):
        self.seen.append(text)
        return self.real.write(text)
    def flush(self):
        self.real.flush()

tee = sys.stderr = Tee(sys.stderr)
ray.init(num_cpus=1)

@ray.remote(num_cpus=64)
def huge_task():
    return 1

@ray.remote(num_cpus=32)
class HugeActor:
    def ping(self):
        return 1

@ray.remote
def small():
    return 2

task_ref = huge_task.remote()
actor = HugeActor.remote()
call_ref = actor.ping.remote()
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    text = "".join(tee.seen)
    if "huge_task" in text and "HugeActor" in text:
        break
    time.sleep(0.05)
assert ray.get(small.remote(), timeout=60) == 2
# An observation window in which a repeated notice would show up.
ready, _ = ray.wait([task_ref, call_ref], num_returns=1, timeout=1.0)
assert ready == []
print("DONE", file=sys.__stdout__, flush=True)
"""


def test_infeasible_task_and_actor_each_warn_exactly_once():
    result = run_driver(_INFEASIBLE_DRIVER, timeout=120)
    assert result.returncode == 0 and "DONE" in result.stdout, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    task_lines = [line for line in lines if "huge_task" in line]
    actor_lines = [line for line in lines if "HugeActor" in line]
    assert len(task_lines) == 1, result.stderr
    assert len(actor_lines) == 1, result.stderr
    assert "The task" in task_lines[0] and "cannot be scheduled right now" in task_lines[0]
    assert "'CPU': 64.0" in task_lines[0]
    assert "The actor HugeActor" in actor_lines[0]
    assert "cannot be scheduled right now" in actor_lines[0] and "'CPU': 32.0" in actor_lines[0]


# ------------------------------------------------------------ bad numbers
def test_nan_inf_and_negative_numbers_fail_in_the_caller(ray):
    nan, inf = float("nan"), float("inf")

    @ray.remote
    def one():
        return 1

    ref = one.remote()
    for bad in (nan, -1):
        with pytest.raises(ValueError, match=r"get\(\) argument timeout=.*>= 0"):
            ray.get(ref, timeout=bad)
        with pytest.raises(ValueError, match=r"wait\(\) argument timeout=.*>= 0"):
            ray.wait([ref], timeout=bad)
    with pytest.raises(ValueError, match="num_returns"):
        ray.wait([ref], num_returns=nan)
    assert ray.get(ref, timeout=inf) == 1      # inf: wait as long as it takes
    assert ray.wait([ref], timeout=inf)[0] == [ref]
    for option in ("num_cpus", "num_gpus", "memory"):
        with pytest.raises(ValueError, match=option):
            one.options(**{option: nan})
    with pytest.raises(ValueError, match="must be finite"):
        one.options(resources={"custom": inf})
    with pytest.raises(ValueError, match="num_returns"):
        one.options(num_returns=nan)
    from meshray.util.placement_group import placement_group, remove_placement_group
    group = placement_group([{"CPU": 1}])
    with pytest.raises(ValueError, match="timeout_seconds"):
        group.wait(nan)
    assert group.wait(inf) is True
    remove_placement_group(group)
    # Checked before "already initialised", and nothing changes.
    with pytest.raises(ValueError, match=r"init\(\) argument num_cpus=nan"):
        ray.init(num_cpus=nan, ignore_reinit_error=True)
    assert ray.get(one.remote(), timeout=60) == 1


def test_bad_init_numbers_fail_before_any_process_starts():
    code = """
import json, psutil, meshray as ray
out = []
for kwargs in ({"num_cpus": float("nan")}, {"num_gpus": float("inf")},
               {"object_store_memory": float("nan")}, {"object_store_memory": 1.5},
               {"resources": {"ssd": float("nan")}}, {"resources": {"ssd": -2}}):
    try:
        ray.init(**kwargs)
        out.append("accepted")
    except ValueError as error:
        out.append(str(error))
print(json.dumps({"errors": out, "children": len(psutil.Process().children(recursive=True)),
                  "initialized": ray.is_initialized()}))
"""
    out = _last_json(run_driver(code))
    assert out["children"] == 0 and out["initialized"] is False, out
    errors = out["errors"]
    assert "num_cpus=nan" in errors[0] and "finite number >= 0" in errors[0]
    assert "num_gpus=inf" in errors[1]
    assert "object_store_memory=nan" in errors[2] and "object_store_memory=1.5" in errors[3]
    assert "resources['ssd'] must be finite" in errors[4]
    assert "resources['ssd'] cannot be negative" in errors[5]


# ------------------------------------------------------------ worker crashes
def test_worker_crashed_error_reports_the_exit_code_or_signal(ray):
    @ray.remote(max_retries=0)
    def killed():
        os.kill(os.getpid(), signal.SIGKILL)

    @ray.remote(max_retries=0)
    def exits():
        os._exit(7)

    with pytest.raises(ray.exceptions.WorkerCrashedError) as info:
        ray.get(killed.remote(), timeout=60)
    assert "killed by signal 9 (SIGKILL)" in str(info.value)
    assert "exit code None" not in str(info.value)
    with pytest.raises(ray.exceptions.WorkerCrashedError) as info:
        ray.get(exits.remote(), timeout=60)
    assert "exited with code 7" in str(info.value)
    assert info.value.task_id and info.value.worker_id


# ------------------------------------------------------------ leftovers
def test_sigkilled_daemon_store_is_removed_while_the_driver_lives():
    code = """
import json, os, signal, sys, time, meshray as ray
ray.init(num_cpus=1)
@ray.remote
def f():
    return 1
ray.get(f.remote())
from meshray.core.state import state
node = state.local_node
print(json.dumps({"daemon": node.pid, "store": state.core.store_dir,
                  "session": state.core.session_dir}), flush=True)
sys.stdin.readline()     # the test kills the daemon, then lets us go
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        info = json.loads(proc.stdout.readline())
        assert os.path.isdir(info["store"])
        os.kill(info["daemon"], signal.SIGKILL)
        wait_for(lambda: not os.path.exists(info["store"]), timeout=20,
                 message="the killed daemon's shared-memory store removed")
        wait_for(lambda: not os.path.exists(info["session"]), timeout=20,
                 message="the killed daemon's session dir removed")
        assert proc.poll() is None          # the driver is still running
    finally:
        proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
