"""Remote functions end to end: real etcd, a real node daemon, real workers."""
from __future__ import annotations

import asyncio
import os
import pickle
import time

import pytest

from tests.helpers import wait_for


def test_task_returns_value(ray):
    @ray.remote
    def add(a, b):
        return a + b

    assert ray.get(add.remote(1, 2)) == 3
    assert ray.get([add.remote(i, i) for i in range(20)]) == [2 * i for i in range(20)]


def test_decorator_with_options_and_options_override(ray):
    @ray.remote(num_cpus=0.5)
    def resources():
        return ray.get_runtime_context().get_assigned_resources()

    assert ray.get(resources.remote())["CPU"] == 0.5
    assert ray.get(resources.options(num_cpus=0.25).remote())["CPU"] == 0.25


def test_calling_remote_function_directly_is_type_error(ray):
    @ray.remote
    def f():
        return 1

    with pytest.raises(TypeError, match=r"f.remote\(\)"):
        f()


def test_unknown_option_is_value_error_naming_it(ray):
    @ray.remote
    def f():
        return 1

    with pytest.raises(ValueError, match="bogus"):
        f.options(bogus=1)
    with pytest.raises(ValueError, match="bogus"):
        ray.remote(bogus=1)(lambda: 1)


def test_top_level_refs_resolve_nested_refs_stay_refs(ray):
    @ray.remote
    def inspect_args(top, nested):
        return type(top).__name__, type(nested[0]).__name__, ray.get(nested[0])

    ref = ray.put(41)
    assert ray.get(inspect_args.remote(ref, [ref])) == ("int", "ObjectRef", 41)


def test_refs_inside_returns_and_chains(ray):
    @ray.remote
    def make():
        return [ray.put("inner")]

    @ray.remote
    def double(x):
        return x * 2

    outer = ray.get(make.remote())
    assert ray.get(outer[0]) == "inner"
    ref = double.remote(1)
    for _ in range(5):
        ref = double.remote(ref)
    assert ray.get(ref) == 64


def test_num_returns_variants(ray):
    @ray.remote(num_returns=2)
    def pair():
        return 1, 2

    @ray.remote(num_returns=0)
    def nothing():
        return None

    a, b = pair.remote()
    assert ray.get([a, b]) == [1, 2]
    assert nothing.remote() is None

    @ray.remote(num_returns=3)
    def wrong():
        return 1, 2

    with pytest.raises(ValueError, match="num_returns=3"):
        ray.get(wrong.remote()[0])


def test_generator_streams_and_raises_after_good_items(ray):
    @ray.remote
    def gen(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise RuntimeError("boom at %d" % i)
            yield i

    assert [ray.get(r) for r in gen.remote(4)] == [0, 1, 2, 3]
    stream = gen.remote(5, fail_at=2)
    assert ray.get(next(stream)) == 0
    assert ray.get(next(stream)) == 1
    with pytest.raises(RuntimeError, match="boom at 2"):
        ray.get(next(stream))
    with pytest.raises(StopIteration):
        next(stream)


def test_task_error_is_both_ray_task_error_and_cause(ray):
    @ray.remote
    def fail():
        raise KeyError("missing thing")

    with pytest.raises(KeyError) as info:
        ray.get(fail.remote())
    assert isinstance(info.value, ray.exceptions.RayTaskError)
    assert "missing thing" in str(info.value)
    assert "in fail" in str(info.value)  # the remote traceback
    assert isinstance(info.value.cause, KeyError)


def test_error_propagates_through_dependent_task(ray):
    @ray.remote
    def fail():
        raise ValueError("first")

    @ray.remote
    def use(x):
        return x

    with pytest.raises(ValueError, match="first"):
        ray.get(use.remote(fail.remote()))


def test_worker_crash_retried_then_worker_crashed_error(ray, tmp_path):
    marker = tmp_path / "attempts"

    @ray.remote(max_retries=2)
    def crash_until_third(path):
        with open(path, "a") as handle:
            handle.write("x")
        if len(open(path).read()) < 3:
            os._exit(1)
        return "survived"

    assert ray.get(crash_until_third.remote(str(marker))) == "survived"
    assert marker.read_text() == "xxx"

    @ray.remote(max_retries=1)
    def always_crash():
        os._exit(1)

    with pytest.raises(ray.exceptions.WorkerCrashedError):
        ray.get(always_crash.remote())


def test_retry_exceptions_list_and_bool(ray, tmp_path):
    path = str(tmp_path / "count")

    @ray.remote(max_retries=3, retry_exceptions=[OSError])
    def flaky(path):
        with open(path, "a") as handle:
            handle.write("x")
        if len(open(path).read()) < 3:
            raise OSError("transient")
        return "ok"

    assert ray.get(flaky.remote(path)) == "ok"

    @ray.remote(max_retries=3, retry_exceptions=[OSError])
    def wrong_kind(path):
        with open(path, "a") as handle:
            handle.write("y")
        raise KeyError("not retried")

    other = str(tmp_path / "other")
    with pytest.raises(KeyError):
        ray.get(wrong_kind.remote(other))
    assert open(other).read() == "y"


def test_unpicklable_argument_names_the_argument(ray):
    import threading

    @ray.remote
    def f(a, b):
        return 1

    with pytest.raises(TypeError, match="argument 1"):
        f.remote(1, threading.Lock())


def test_unpicklable_return_is_type_error(ray):
    import threading

    @ray.remote
    def f():
        return threading.Lock()

    with pytest.raises(TypeError, match="return value"):
        ray.get(f.remote())


def test_nested_tasks_do_not_deadlock_on_one_cpu_each(ray):
    @ray.remote
    def leaf(x):
        return x + 1

    @ray.remote
    def parent(depth):
        if depth == 0:
            return ray.get(leaf.remote(0))
        return ray.get(parent.remote(depth - 1)) + 1

    assert ray.get(parent.remote(4), timeout=60) == 5


def test_env_vars_runtime_env(ray):
    @ray.remote(runtime_env={"env_vars": {"MESHRAY_TEST_VAR": "hello"}})
    def read_env():
        return os.environ.get("MESHRAY_TEST_VAR")

    assert ray.get(read_env.remote()) == "hello"

    @ray.remote
    def plain():
        return os.environ.get("MESHRAY_TEST_VAR")

    assert ray.get(plain.remote()) is None


def test_runtime_context_inside_task(ray):
    @ray.remote
    def ctx():
        c = ray.get_runtime_context()
        return c.get_task_id(), c.get_node_id(), c.get_job_id(), c.get_worker_id()

    task_id, node_id, job_id, worker_id = ray.get(ctx.remote())
    driver = ray.get_runtime_context()
    assert task_id and len(task_id) == 32
    assert node_id == driver.get_node_id()
    assert job_id == driver.get_job_id()
    assert worker_id != driver.get_worker_id()
    assert driver.get_task_id() is None


def test_object_ref_protocols(ray):
    ref = ray.put({"a": 1})
    assert {ref: 1}[ref] == 1
    clone = pickle.loads(pickle.dumps(ref))
    assert clone == ref and hash(clone) == hash(ref)
    assert ref.future().result(10) == {"a": 1}

    async def await_it():
        return await ref

    assert asyncio.run(await_it()) == {"a": 1}


def test_put_object_ref_is_type_error(ray):
    with pytest.raises(TypeError):
        ray.put(ray.put(1))


def test_get_timeout(ray):
    @ray.remote
    def slow():
        time.sleep(30)

    ref = slow.remote()
    with pytest.raises(ray.exceptions.GetTimeoutError) as info:
        ray.get(ref, timeout=0.2)
    assert isinstance(info.value, TimeoutError)
    ray.cancel(ref, force=True)


def test_wait_semantics(ray):
    @ray.remote
    def sleep_then(x, seconds):
        time.sleep(seconds)
        return x

    fast = sleep_then.remote("fast", 0)
    slow = sleep_then.remote("slow", 30)
    ready, not_ready = ray.wait([slow, fast], num_returns=1, timeout=20)
    assert ready == [fast] and not_ready == [slow]
    ready, not_ready = ray.wait([slow, fast], num_returns=2, timeout=0.1)
    assert ready == [fast] and not_ready == [slow]
    with pytest.raises(ValueError):
        ray.wait([fast, fast])
    with pytest.raises(ValueError):
        ray.wait([fast], num_returns=2)
    with pytest.raises(TypeError):
        ray.wait(fast)
    ray.cancel(slow, force=True)


def test_cancel_pending_task_never_runs(ray, tmp_path):
    marker = tmp_path / "ran"

    @ray.remote(resources={"nonexistent_resource": 1})
    def never(path):
        open(path, "w").write("ran")

    ref = never.remote(str(marker))
    ray.cancel(ref)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(ref, timeout=20)
    assert not marker.exists()


def test_cancel_running_task_interrupts_it(ray, tmp_path):
    started = tmp_path / "started"

    @ray.remote(max_retries=3)
    def spin(path):
        open(path, "w").write("1")
        while True:
            time.sleep(0.01)

    ref = spin.remote(str(started))
    wait_for(started.exists, message="task started")
    ray.cancel(ref)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(ref, timeout=20)


def test_force_cancel_kills_worker_and_is_not_retried(ray, tmp_path):
    started = tmp_path / "started"

    @ray.remote(max_retries=3)
    def stuck(path):
        with open(path, "a") as handle:
            handle.write("x")
        time.sleep(600)

    ref = stuck.remote(str(started))
    wait_for(started.exists, message="task started")
    ray.cancel(ref, force=True)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(ref, timeout=20)
    assert started.read_text() == "x"


def test_introspection_keys(ray):
    nodes = ray.nodes()
    assert len(nodes) == 1
    node = nodes[0]
    for key in ("NodeID", "Alive", "NodeManagerAddress", "Resources", "Labels"):
        assert key in node
    assert node["Alive"] is True
    assert ray.cluster_resources()["CPU"] == 2.0
    assert wait_for(lambda: ray.available_resources().get("CPU") == 2.0,
                    message="all CPUs free again")


def test_infeasible_task_waits(ray):
    @ray.remote(num_cpus=64)
    def big():
        return 1

    ref = big.remote()
    ready, _ = ray.wait([ref], timeout=0.5)
    assert ready == []
    ray.cancel(ref)
