"""The state API answered by every node: tasks, actors, nodes, workers, objects,
placement groups and jobs, listed, filtered, paged and summarized across a
cluster with no head, including while a node does not answer."""
from __future__ import annotations

import json
import os
import warnings
from collections import Counter

import pytest

from tests.helpers import run_python

pytestmark = pytest.mark.cluster_args(lease_ttl=10.0, head_node_args={"num_cpus": 1})


def _spread_work(ray, count):
    """Run `count` tasks per node of the cluster, and one failing task; return the
    refs and how many tasks each node says it ran."""
    from collections import Counter

    from meshray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote
    def square(x):
        import meshray
        return x * x, meshray.get_runtime_context().get_node_id()

    @ray.remote(max_retries=0)
    def broken():
        raise KeyError("broken on purpose")

    refs = []
    for node in ray.nodes():
        strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        refs += [square.options(scheduling_strategy=strategy).remote(i) for i in range(count)]
    values = ray.get(refs)
    assert [v for v, _node in values] == [i * i for _node in ray.nodes() for i in range(count)]
    with pytest.raises(KeyError):
        ray.get(broken.remote())
    return refs, Counter(node for _v, node in values)


def test_tasks_from_every_node_are_listed_filtered_and_summarized(cluster):
    from meshray.util import state
    cluster.add_node(num_cpus=1)
    ray = cluster.connect()
    refs, ran_on = _spread_work(ray, 10)
    node_ids = {n["NodeID"] for n in ray.nodes()}

    tasks = state.list_tasks(limit=1000)
    squares = [t for t in tasks if t.name.endswith("square")]
    assert len(squares) == 20 and {t["state"] for t in squares} == {"FINISHED"}, sorted((t.task_id, t.node_id, t.attempt_number) for t in squares)
    # Each task is answered for by the node that ran it.
    assert {t.node_id for t in squares} <= node_ids
    assert Counter(t.node_id for t in squares) == ran_on
    assert all(t.worker_pid and t.worker_id for t in squares)

    failed = state.list_tasks(filters=[("state", "=", "failed")])   # case-insensitive
    assert [t.name.split(".")[-1] for t in failed] == ["broken"]
    assert failed[0].error_type == "TASK_EXECUTION_EXCEPTION"
    assert len(state.list_tasks(filters=[("state", "!=", "FAILED")], limit=1000)) == 20

    one = state.get_task(refs[0])
    assert one.task_id == refs[0].task_id().hex() and one.state == "FINISHED"
    assert one.start_time_ms <= one.end_time_ms          # get_* returns the detail
    assert [e[0] for e in one.events][-2:] == ["RUNNING", "FINISHED"]

    summary = state.summarize_tasks()["cluster"]
    by_name = {name.split(".")[-1]: group for name, group in summary["summary"].items()}
    assert by_name["square"]["state_counts"] == {"FINISHED": 20}
    assert by_name["broken"]["state_counts"] == {"FAILED": 1}
    assert summary["total_tasks"] == 21


def test_pages_cover_every_task_once_and_say_more_remain(cluster):
    from meshray.util import state
    cluster.add_node(num_cpus=1)
    ray = cluster.connect()
    _spread_work(ray, 7)
    seen, cursor = [], ""
    while True:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            page = state.list_tasks(limit=4, _cursor=cursor)
        seen += [t.task_id for t in page]
        more = [w for w in caught if "page on with _cursor=" in str(w.message)]
        if not more:
            break
        assert "15 tasks match; 4 returned" in str(more[0].message) or cursor
        cursor = page[-1].task_id
    assert len(seen) == len(set(seen)) == 15


def test_a_node_that_does_not_answer_is_named_not_dropped_silently(cluster):
    from meshray.util import state
    from meshray.util.state import RayStateApiException
    second = cluster.add_node(num_cpus=1)
    ray = cluster.connect()
    _refs, ran_on = _spread_work(ray, 3)
    second.pause()
    try:
        with pytest.raises(RayStateApiException, match=second.node_id):
            state.list_tasks(timeout=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            partial = state.list_tasks(timeout=1, raise_on_missing_output=False, limit=1000)
        assert any(second.node_id in str(w.message) for w in caught)
        # The answering node's tasks are all there.
        assert {t.node_id for t in partial} == {cluster.head_node.node_id}
        head = cluster.head_node.node_id
        assert len([t for t in partial if t.name.endswith("square")]) == ran_on[head]
    finally:
        second.resume()


def test_actors_nodes_workers_objects_groups_and_jobs(cluster):
    from meshray.util import state
    from meshray.util.placement_group import placement_group
    second = cluster.add_node(num_cpus=1)
    ray = cluster.connect()

    @ray.remote
    class Counter:
        def pid(self):
            import os
            return os.getpid()

    counter = Counter.options(name="tally").remote()
    pid = ray.get(counter.pid.remote())
    kept = ray.put(b"x" * 200_000)
    group = placement_group([{"CPU": 1}], name="grp")
    ray.get(group.ready(), timeout=30)

    actors = state.list_actors(filters=[("name", "=", "tally")])
    assert len(actors) == 1 and actors[0].state == "ALIVE" and actors[0].pid == pid
    assert state.get_actor(actors[0].actor_id).class_name == "Counter"
    assert {n.node_id for n in state.list_nodes()} == {cluster.head_node.node_id,
                                                        second.node_id}
    assert all(n.state == "ALIVE" and n.is_head_node is False for n in state.list_nodes())
    workers = state.list_workers(filters=[("pid", "=", pid)])
    assert len(workers) == 1 and workers[0].worker_type == "WORKER"
    assert any(w.worker_type == "DRIVER" for w in state.list_workers())
    objects = state.get_objects(kept.hex())
    assert objects and objects[0].object_size >= 200_000
    groups = state.list_placement_groups(filters=[("name", "=", "grp")])
    assert len(groups) == 1 and groups[0].state == "CREATED"
    jobs = state.list_jobs()
    assert ray.get_runtime_context().get_job_id() in {j.job_id for j in jobs}
    assert state.summarize_actors()["cluster"]["summary"]["Counter"]["state_counts"] == {
        "ALIVE": 1}


def test_bad_queries_name_what_is_wrong(cluster):
    from meshray.util import state
    cluster.connect()
    with pytest.raises(ValueError, match="filter column='colour'.*expected one of task_id"):
        state.list_tasks(filters=[("colour", "=", "red")])
    with pytest.raises(ValueError, match="filter predicate='>'"):
        state.list_actors(filters=[("state", ">", "ALIVE")])
    with pytest.raises(ValueError, match="limit=0"):
        state.list_nodes(limit=0)
    assert state.get_task("ab" * 16) is None


def test_cli_list_get_and_summary(cluster):
    ray = cluster.connect()
    _spread_work(ray, 2)
    env = {**os.environ, "MESHRAY_TOKEN": cluster.token}

    def cli(*args):
        # A deadline above the CLI's own (its query waits at most 40 s); past
        # it the failure shows the CLI's thread stacks.
        return run_python(["-m", "meshray.cli.main", *args, "--address", cluster.address],
                          timeout=90, env=env)

    listed = cli("list", "tasks", "--filter", "state=FAILED", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    failed = json.loads(listed.stdout)
    assert len(failed) == 1 and failed[0]["error_type"] == "TASK_EXECUTION_EXCEPTION"
    table = cli("list", "tasks", "--filter", "state!=FAILED")
    assert table.returncode == 0 and table.stdout.splitlines()[0].startswith("TASK_ID")
    assert len(table.stdout.splitlines()) == 1 + 2
    got = cli("get", "tasks", failed[0]["task_id"])
    assert got.returncode == 0 and "state: FAILED" in got.stdout
    summary = cli("summary", "tasks")
    assert summary.returncode == 0 and "FINISHED: 2" in summary.stdout
    bad = cli("list", "tasks", "--filter", "state~FAILED")
    assert bad.returncode == 2 and "expected KEY=VALUE or KEY!=VALUE" in bad.stderr


def test_timeline_is_trace_event_json_with_a_slice_per_task(cluster, tmp_path):
    cluster.add_node(num_cpus=1)
    ray = cluster.connect()
    _refs, ran_on = _spread_work(ray, 3)
    path = tmp_path / "trace.json"
    assert ray.timeline(str(path)) is None
    events = json.loads(path.read_text())
    slices = [e for e in events if e["ph"] == "X"]
    assert sorted(e["name"] for e in slices) == ["broken"] + ["square"] * 6
    for event in slices:
        assert {"cat", "name", "pid", "tid", "ts", "dur", "args"} <= set(event)
        assert isinstance(event["ts"], int) and event["dur"] >= 0
        assert event["pid"].startswith("Node ") and event["tid"].startswith("worker ")
    assert {e["pid"] for e in slices} == {f"Node {n[:12]}" for n in ran_on}
    assert [e["cname"] for e in slices if e["name"] == "broken"] == ["bad"]
    # Tasks that went to the second node show where they came from.
    spills = [e for e in events if e["cat"] == "spill"]
    elsewhere = sum(count for node, count in ran_on.items() if node != cluster.head_node.node_id)
    assert len(spills) == elsewhere
    assert len(ray.timeline()) == len(events)     # without a file: the events themselves


def test_actor_method_calls_are_tasks_too(cluster):
    from meshray.util import state
    from tests.helpers import wait_for
    ray = cluster.connect()

    @ray.remote
    class Worker:
        def work(self, x):
            return x + 1

        def fail(self):
            raise RuntimeError("no")

    @ray.remote(num_cpus=0)
    class Gate:
        def __init__(self):
            import threading
            self.event = threading.Event()

        def wait(self):
            return self.event.wait(60)

        def open(self):
            self.event.set()

    worker = Worker.remote()
    assert ray.get([worker.work.remote(i) for i in range(5)]) == [1, 2, 3, 4, 5]
    with pytest.raises(RuntimeError):
        ray.get(worker.fail.remote())
    gate = Gate.options(max_concurrency=2).remote()
    waiting = gate.wait.remote()

    def calls(name):
        return state.list_tasks(filters=[("type", "=", "ACTOR_TASK"), ("name", "=", name)])

    running = wait_for(lambda: calls("Gate.wait"), message="the running call is listed")
    assert running[0].state == "RUNNING" and running[0].task_id == waiting.task_id().hex()
    ray.get(gate.open.remote())
    assert ray.get(waiting) is True
    wait_for(lambda: [t.state for t in calls("Gate.wait")] == ["FINISHED"],
             message="the finished call replaces the running one")
    done = wait_for(lambda: len(calls("Worker.work")) == 5 and calls("Worker.work"))
    assert {t.state for t in done} == {"FINISHED"}
    (failed,) = calls("Worker.fail")
    assert failed.state == "FAILED" and failed.error_type == "TASK_EXECUTION_EXCEPTION"
    summary = state.summarize_tasks()["cluster"]
    assert summary["summary"]["Worker.work"]["state_counts"] == {"FINISHED": 5}
    assert summary["total_actor_tasks"] >= 7


def test_cli_memory_lists_objects_per_node(cluster):
    ray = cluster.connect()
    kept = ray.put(b"m" * 300_000)
    env = {**os.environ, "MESHRAY_TOKEN": cluster.token}
    out = run_python(["-m", "meshray.cli.main", "memory", "--address", cluster.address,
                      "--units", "KB"], timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert f"--- node_address {cluster.head_node.node_id}:" in out.stdout
    line = next(line for line in out.stdout.splitlines() if kept.hex() in line)
    assert "KB" in line and "True" in line               # its size, in shared memory
    assert "Aggregate:" in out.stdout.splitlines()[-1]


def test_actor_calls_past_the_rate_are_counted_and_summaries_stay_exact(cluster):
    from meshray.util import state
    from tests.helpers import wait_for
    ray = cluster.connect()

    @ray.remote
    class Busy:
        def hit(self, i):
            return i

    busy = Busy.options(runtime_env={"env_vars": {"MESHRAY_ACTOR_TASK_EVENTS_PER_S": "1"}}).remote()
    assert ray.get([busy.hit.remote(i) for i in range(300)]) == list(range(300))

    def hits():
        summary = state.summarize_tasks()["cluster"]["summary"]
        return summary.get("Busy.hit", {}).get("state_counts", {}).get("FINISHED", 0)

    wait_for(lambda: hits() == 300, message="every call in the summary")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        listed = state.list_tasks(filters=[("name", "=", "Busy.hit")], limit=1000)
    counted = [w for w in caught if "were counted, not listed" in str(w.message)]
    assert counted and 0 < len(listed) < 300
    assert str(300 - len(listed)) in str(counted[0].message)
