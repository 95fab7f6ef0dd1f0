"""get_runtime_context(): each member's value in the driver, tasks, actors and placement groups.

Expected values follow Ray's RuntimeContext documentation; docs/compatibility.md
lists what differs here.
"""
import asyncio
import json
import warnings

import pytest

from meshray.core import state as state_mod
from meshray.util.placement_group import placement_group, remove_placement_group
from meshray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

# One GPU (a device id, no hardware needed) for the accelerator-id questions.
pytestmark = pytest.mark.meshray_init(num_cpus=3, num_gpus=1, labels={"zone": "blue"},
                                      object_store_memory=256 * 1024 * 1024)


def _snapshot(ray):
    c = ray.get_runtime_context()
    return {"task": c.get_task_id(), "job": c.get_job_id(), "node": c.get_node_id(),
            "worker": c.get_worker_id(), "actor": c.get_actor_id(),
            "actor_name": c.get_actor_name(), "task_name": c.get_task_name(),
            "function": c.get_task_function_name(), "pg": c.get_placement_group_id(),
            "capture": c.should_capture_child_tasks_in_placement_group,
            "namespace": c.namespace, "env": c.runtime_env}


def test_driver(ray):
    c = ray.get_runtime_context()
    assert c is ray.get_runtime_context()
    assert c.get_job_id() == state_mod.state.job_id.hex() and len(c.get_job_id()) == 16
    assert c.get_node_id() == state_mod.state.core.node_id.hex()
    assert c.get_worker_id() == state_mod.state.core.worker_id.hex()
    # Ray: the task and actor questions answer None in a driver.
    for member in (c.get_task_id, c.get_actor_id, c.get_task_name, c.get_task_function_name,
                   c.get_actor_name, c.get_placement_group_id):
        assert member() is None, member
    assert c.should_capture_child_tasks_in_placement_group is True   # Ray's documented value
    assert c.namespace.startswith("anonymous-")
    assert c.runtime_env == {} and c.get_runtime_env_string() == "{}"
    assert c.get_node_labels()["zone"] == "blue"
    assert c.gcs_address == state_mod.state.local_node.etcd   # what init(address=) takes
    port = next(n["DashboardPort"] for n in ray.nodes() if n["NodeID"] == c.get_node_id())
    assert c.get_dashboard_url() == f"127.0.0.1:{port}"       # Ray's form: host:port
    assert c.get_accelerator_ids() == {"GPU": []}
    with pytest.raises(AssertionError, match="get_assigned_resources"):
        c.get_assigned_resources()
    with pytest.raises(RuntimeError, match="only available in an actor"):
        c.current_actor
    with pytest.raises(AssertionError, match="was_current_actor_reconstructed"):
        c.was_current_actor_reconstructed


def test_deprecated_members_return_id_objects_and_warn(ray):
    c = ray.get_runtime_context()
    with pytest.warns(DeprecationWarning, match="get_job_id"):
        job = c.job_id
    assert job == ray.JobID.from_hex(c.get_job_id())
    with pytest.warns(DeprecationWarning):
        assert c.node_id == ray.NodeID.from_hex(c.get_node_id())
    with pytest.warns(DeprecationWarning):
        assert c.current_placement_group_id.is_nil()
    with pytest.warns(DeprecationWarning), pytest.raises(AssertionError, match="task_id"):
        c.task_id
    with pytest.warns(DeprecationWarning):
        assert c.get() == {"job_id": job, "node_id": ray.NodeID.from_hex(c.get_node_id()),
                           "namespace": c.namespace}


def test_task(ray):
    @ray.remote(num_cpus=0.5, runtime_env={"env_vars": {"COLOR": "red"}})
    def probe():
        c = ray.get_runtime_context()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            legacy = (c.task_id.hex(), c.actor_id, c.get())
        return _snapshot(ray), c.get_assigned_resources(), legacy, c.get_runtime_env_string()

    ref = probe.remote()
    seen, resources, legacy, env_string = ray.get(ref)
    driver = ray.get_runtime_context()
    assert seen["task"] == ref.task_id().hex()
    assert seen["job"] == driver.get_job_id() and seen["node"] == driver.get_node_id()
    assert seen["worker"] != driver.get_worker_id()
    assert seen["actor"] is None and seen["actor_name"] is None and seen["pg"] is None
    # Ray: the function's (qualified) name by default, without its module.
    assert seen["task_name"] == "test_task.<locals>.probe"
    assert seen["function"] == f"{__name__}.test_task.<locals>.probe"
    assert seen["capture"] is False
    assert seen["namespace"] == driver.namespace
    assert seen["env"]["env_vars"] == {"COLOR": "red"}
    assert json.loads(env_string) == seen["env"]
    assert resources == {"CPU": 0.5}
    assert legacy[0] == seen["task"] and legacy[1] is None
    assert legacy[2]["task_id"] == ray.TaskID.from_hex(seen["task"])
    named = probe.options(name="custom-name").remote()
    assert ray.get(named)[0]["task_name"] == "custom-name"


def test_actor(ray):
    @ray.remote(num_cpus=1)
    class Probe:
        def __init__(self):
            self.init_seen = _snapshot(ray)

        def seen(self):
            c = ray.get_runtime_context()
            return (self.init_seen, _snapshot(ray), c.get_assigned_resources(),
                    c.current_actor, c.was_current_actor_reconstructed)

    actor = Probe.options(name="probe-actor").remote()
    ref = actor.seen.remote()
    init_seen, seen, resources, handle, reconstructed = ray.get(ref)
    actor_id = actor._actor_id.hex()
    assert seen["actor"] == actor_id == init_seen["actor"]
    assert seen["actor_name"] == "probe-actor"
    assert seen["task"] == ref.task_id().hex() != init_seen["task"]
    assert init_seen["task_name"] == "Probe.__init__" and seen["task_name"] == "Probe.seen"
    assert seen["function"].startswith(f"{__name__}.") and seen["function"].endswith("Probe.seen")
    assert init_seen["function"].endswith("Probe.__init__")
    assert seen["job"] == ray.get_runtime_context().get_job_id()
    assert resources == {"CPU": 1.0}      # what the actor holds for its lifetime
    assert handle == actor and reconstructed is False

    @ray.remote
    class Unnamed:
        def name(self):
            return ray.get_runtime_context().get_actor_name()

    assert ray.get(Unnamed.remote().name.remote()) == ""   # Ray: "" for an unnamed actor


def test_async_actor_calls_each_see_their_own_task(ray):
    @ray.remote
    class Async:
        def __init__(self):
            self.gate = asyncio.Event()

        async def call(self, release):
            before = ray.get_runtime_context().get_task_id()
            if release:
                self.gate.set()
            else:
                await self.gate.wait()      # the other call runs meanwhile
            return before, ray.get_runtime_context().get_task_id(), \
                ray.get_runtime_context().get_task_name()

    actor = Async.remote()
    waiting = actor.call.remote(False)
    releasing = actor.call.remote(True)
    for ref in (waiting, releasing):
        before, after, name = ray.get(ref, timeout=60)
        assert before == after == ref.task_id().hex()
        assert name == "Async.call"


def test_placement_group_task_and_capture(ray):
    group = placement_group([{"CPU": 1}])
    ray.get(group.ready(), timeout=60)
    try:
        @ray.remote(num_cpus=0)
        def child():
            return ray.get_runtime_context().get_placement_group_id()

        @ray.remote(num_cpus=1)
        def parent():
            return _snapshot(ray), ray.get(child.remote())

        for capture in (True, False):
            strategy = PlacementGroupSchedulingStrategy(
                group, placement_group_capture_child_tasks=capture)
            seen, child_group = ray.get(parent.options(scheduling_strategy=strategy).remote(),
                                        timeout=60)
            assert seen["pg"] == group.id.hex()
            assert seen["capture"] is capture
            assert child_group == (group.id.hex() if capture else None)
    finally:
        remove_placement_group(group)


def test_is_canceled_inside_a_cancelled_task_and_the_temp_dir(ray, tmp_path):
    import os

    from tests.helpers import wait_for
    context = ray.get_runtime_context()
    assert os.path.isdir(context.get_temp_dir())
    with pytest.raises(RuntimeError, match="is_canceled"):     # as Ray: worker only
        context.is_canceled()
    started, seen = tmp_path / "started", tmp_path / "seen"

    @ray.remote(max_retries=0)
    def loop(started_path, seen_path):
        import time

        import meshray
        open(started_path, "w").close()
        before = meshray.get_runtime_context().is_canceled()
        try:
            while True:
                time.sleep(0.01)
        except KeyboardInterrupt:
            after = meshray.get_runtime_context().is_canceled()
            with open(seen_path, "w") as handle:
                handle.write(f"{before} {after}")
            raise

    ref = loop.remote(str(started), str(seen))
    wait_for(started.exists, message="the task started")
    ray.cancel(ref)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(ref, timeout=30)
    wait_for(seen.exists, message="the task saw its cancel")
    assert seen.read_text() == "False True"


def _session_and_resource_ids(ray):
    c = ray.get_runtime_context()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resource_ids = c.get_resource_ids()
    return (c.get_session_name(), resource_ids, c.get_accelerator_ids(),
            [(w.category.__name__, str(w.message)) for w in caught])


def test_session_name_and_resource_ids_in_driver_task_and_actor(ray):
    import os

    @ray.remote(num_gpus=1)
    def task():
        return _session_and_resource_ids(ray)

    @ray.remote(num_gpus=1)
    class Holder:
        def ask(self):
            return _session_and_resource_ids(ray)

    session_dir = state_mod.state.core.session_dir
    deprecated = [("DeprecationWarning", "RuntimeContext.get_resource_ids() is deprecated; "
                                         "use get_accelerator_ids() instead")]
    session, ids, accelerator_ids, warned = _session_and_resource_ids(ray)
    assert session == os.path.basename(session_dir.rstrip("/")) and session
    assert ids == accelerator_ids == {"GPU": []} and warned == deprecated
    for answer in (ray.get(task.remote(), timeout=60),
                   ray.get(Holder.remote().ask.remote(), timeout=60)):
        # One node: the same session everywhere; the GPU the work holds, by id.
        assert answer == (session, {"GPU": ["0"]}, {"GPU": ["0"]}, deprecated)
