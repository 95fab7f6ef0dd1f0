"""The node's memory monitor kills a task that eats memory, and only it.

The node gets the test-only limit (MESHRAY_TEST_NODE_MEMORY_LIMIT: its
workers' summed RSS against a made-up ceiling), so the kill happens at the
same point on any host, however busy.
"""
from __future__ import annotations

import os

import pytest

from meshray import exceptions

LIMIT = 1536 << 20
THRESHOLD = 0.9
NODE_ENV = {"MESHRAY_TEST_NODE_MEMORY_LIMIT": str(LIMIT),
            "RAY_memory_usage_threshold": str(THRESHOLD),
            "RAY_memory_monitor_refresh_ms": "50"}
pytestmark = pytest.mark.cluster_args(
    initialize_head=True, head_node_args={"num_cpus": 2, "env": NODE_ENV})
STEPS = 80           # 80 x 50 MB: well past the limit if nothing stops it


def node_log(cluster) -> str:
    with open(os.path.join(cluster.head_node._process.session_dir, "node.log")) as handle:
        return handle.read()


def hog(marker: str = "", hogging_attempts: int = 1) -> str:
    """Allocate 50 MB at a time (written, so it is resident) until killed; with
    `marker`, only the first `hogging_attempts` attempts do (each adds a line)."""
    import time
    if marker:
        done = open(marker).read().count("\n") if os.path.exists(marker) else 0
        if done >= hogging_attempts:
            return f"retried after {done}"
        with open(marker, "a") as handle:
            handle.write("attempt\n")
    held = []
    for _ in range(STEPS):
        held.append(b"x" * (50 << 20))
        time.sleep(0.02)
    return "never killed"


def eviction_count(ray, kind: str, name: str) -> float:
    """The node's ray_memory_manager_worker_eviction_total for (kind, name), scraped."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    (record,) = [node for node in ray.nodes() if node["Alive"]]
    endpoint = f"{record['Address'].rsplit(':', 1)[0]}:{record['MetricsExportPort']}"
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "ray_memory_manager_worker_eviction_total"
               and sample.labels.get("Type") == kind and sample.labels.get("Name") == name)


def test_a_task_over_the_limit_fails_with_the_figures_and_the_rest_survives(cluster):
    ray = cluster.connect()

    @ray.remote
    class Keeper:
        def ping(self):
            return os.getpid()

    keeper = Keeper.remote()
    keeper_pid = ray.get(keeper.ping.remote(), timeout=60)
    with pytest.raises(exceptions.OutOfMemoryError) as info:
        ray.get(ray.remote(max_retries=0)(hog).remote(), timeout=120)
    error = info.value
    text = str(error)
    node_hex = cluster.head_node.node_id
    assert "task " in text and "hog" in text and node_hex in text
    assert f"threshold {THRESHOLD}" in text and "RSS" in text and "test limit" in text
    assert error.node_id == node_hex and error.task_id
    assert error.memory_limit == LIMIT and error.threshold == THRESHOLD
    assert error.memory_used > THRESHOLD * LIMIT and error.rss > 0
    # The actor (killed last) and the node live on; new work runs.
    assert ray.get(keeper.ping.remote(), timeout=60) == keeper_pid
    assert ray.get(ray.remote(lambda: "ok").remote(), timeout=60) == "ok"
    assert cluster.head_node.alive()
    log = node_log(cluster)
    assert "WARNING meshray.node.memory_monitor: memory monitor: The task" in log and "hog" in log
    assert eviction_count(ray, "Task", f"{__name__}.hog") >= 1


def sleeper(started: str, gate: str) -> str:
    """Small and long-running: a task of the same owner that must survive the kill."""
    import time
    open(started, "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)
    return "slept"


def test_a_retriable_task_killed_for_memory_is_retried_and_its_sibling_runs_on(cluster, tmp_path):
    """Ray's rules: the owner's newest task is killed and retried apart from
    its max_retries (here 1, yet killed twice), after a doubling delay; the
    owner's other running task is untouched."""
    from tests.helpers import wait_for
    ray = cluster.connect()
    marker, started, gate = (str(tmp_path / name) for name in ("first-attempt", "started", "gate"))
    calm = ray.remote(max_retries=0)(sleeper).remote(started, gate)
    wait_for(lambda: os.path.exists(started), timeout=60, message="the sibling task started")
    result = ray.get(ray.remote(max_retries=1)(hog).remote(marker, 2), timeout=120)
    assert result == "retried after 2"
    open(gate, "w").close()
    assert ray.get(calm, timeout=60) == "slept"
    log = node_log(cluster)
    assert "memory monitor: The task" in log and "hog" in log


def test_an_owners_last_task_is_not_retried_whatever_its_max_retries(cluster, tmp_path):
    """Every owner keeps one task making progress: its only task, killed for
    memory, fails with the figures instead of being retried forever."""
    ray = cluster.connect()
    marker = str(tmp_path / "first-attempt")
    with pytest.raises(exceptions.OutOfMemoryError, match="last task running here"):
        ray.get(ray.remote(max_retries=3)(hog).remote(marker), timeout=120)


def test_an_actor_killed_for_memory_dies_with_the_cause(cluster):
    ray = cluster.connect()

    @ray.remote(max_restarts=0)
    class Hoarder:
        def hoard(self):
            return hog()

    hoarder = Hoarder.remote()
    with pytest.raises(exceptions.RayActorError) as info:
        ray.get(hoarder.hoard.remote(), timeout=120)
    assert "ran low on memory" in str(info.value) and "actor Hoarder" in str(info.value)
    assert ray.get(ray.remote(lambda: "ok").remote(), timeout=60) == "ok"


def test_a_task_pushed_on_a_worker_lease_is_judged_and_named_as_the_nodes_own(cluster):
    """A sync task goes straight to a leased worker (core/task_leases.py); the
    worker told its node what it runs, so the monitor's error names it."""
    from meshray.core import state as state_mod
    ray = cluster.connect()
    leases = state_mod.state.core.leases
    assert ray.get(ray.remote(lambda: "warm").remote(), timeout=60) == "warm"
    before = leases.pushed
    with pytest.raises(exceptions.OutOfMemoryError) as info:
        ray.get(ray.remote(max_retries=0)(hog).remote(), timeout=120)
    assert leases.pushed == before + 1, "the task was not pushed on a lease"
    text = str(info.value)
    assert "task " in text and "hog" in text and info.value.task_id
    assert info.value.memory_limit == LIMIT and info.value.rss > 0
    assert ray.get(ray.remote(lambda: "ok").remote(), timeout=60) == "ok"
