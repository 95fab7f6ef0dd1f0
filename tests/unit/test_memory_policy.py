"""The memory monitor's pure parts: usage, settings, and whom it kills first."""
from __future__ import annotations

import pytest

from meshray.node.memory_monitor import MemorySettings, read_cgroup
from meshray.node.memory_policy import (
    Candidate,
    MemoryReading,
    choose_victim,
    effective_usage,
    kill_order,
    oom_retry_allowed,
    oom_retry_delay,
    over_threshold,
)

GB = 1 << 30
FULL = MemoryReading("host", 99 * GB, 100 * GB)


def task(name: str, owner: str, started: float, retriable: bool = True) -> Candidate:
    return Candidate(name.encode(), owner.encode(), started, retriable)


def actor(name: str, owner: str, started: float, restartable: bool = False) -> Candidate:
    return Candidate(name.encode(), owner.encode(), started, restartable, is_actor=True)


def names(order) -> list[str]:
    return [candidate.worker_id.decode() for candidate in order]


def test_the_smallest_limit_is_the_usage_that_counts():
    host = MemoryReading("host", 10 * GB, 64 * GB)
    cgroup = MemoryReading("cgroup v1", 3 * GB, 4 * GB)
    assert effective_usage([host, cgroup, None]) == cgroup
    assert effective_usage([host, MemoryReading("cgroup v2", 0, 0)]) == host
    assert effective_usage([]) is None


def test_threshold_is_a_fraction_of_the_limit():
    assert over_threshold(MemoryReading("host", 96, 100), 0.95)
    assert not over_threshold(MemoryReading("host", 95, 100), 0.95)
    assert not over_threshold(None, 0.95)


def test_nothing_is_killed_under_the_threshold_or_with_nothing_running():
    calm = MemoryReading("host", 50 * GB, 100 * GB)
    assert choose_victim(calm, 0.95, [task("a", "o", 1.0)]) is None
    assert choose_victim(FULL, 0.95, []) is None


def test_the_newest_task_is_killed_first():
    running = [task("old", "o", 1.0), task("newest", "o", 3.0), task("mid", "o", 2.0)]
    assert names(kill_order(running)) == ["newest", "mid", "old"]
    assert choose_victim(FULL, 0.95, running).worker_id == b"newest"


def test_the_owner_with_the_most_tasks_pays_first():
    running = [task("a1", "A", 1.0), task("a2", "A", 2.0),
               task("b1", "B", 5.0)]           # B's task is the newest, but A has more
    # After a2, the groups are equal: the newer task's group goes next.
    assert names(kill_order(running)) == ["a2", "b1", "a1"]
    running.append(task("a3", "A", 0.5))
    assert names(kill_order(running)) == ["a2", "a1", "b1", "a3"]
    # Equal groups: the group whose newest task started last.
    running = [task("a1", "A", 1.0), task("b1", "B", 2.0)]
    assert names(kill_order(running)) == ["b1", "a1"]


def test_retriable_tasks_go_before_tasks_a_kill_would_fail():
    running = [task("final1", "A", 9.0, retriable=False), task("final2", "A", 8.0, retriable=False),
               task("retry", "B", 1.0), task("retry2", "B", 0.9)]
    # retry2, left alone as B's last task, is no longer retriable.
    assert names(kill_order(running)) == ["retry", "final1", "final2", "retry2"]


def test_actors_go_last_restartable_first():
    running = [actor("stateful", "A", 9.0), actor("restartable", "A", 1.0, restartable=True),
               task("final", "A", 0.5, retriable=False), task("retry", "B", 0.1),
               task("retry2", "B", 0.05)]
    assert names(kill_order(running)) == ["retry", "final", "retry2", "restartable", "stateful"]


def test_an_owners_last_running_task_is_killed_without_a_retry():
    """Every owner keeps one task making progress: its last one fails instead."""
    only = choose_victim(FULL, 0.95, [task("only", "A", 1.0)])
    assert only.worker_id == b"only" and only.retriable is False
    pair = choose_victim(FULL, 0.95, [task("old", "A", 1.0), task("new", "A", 2.0)])
    assert pair.worker_id == b"new" and pair.retriable is True
    # Actors are judged by their restarts alone.
    assert choose_victim(FULL, 0.95, [actor("x", "A", 1.0, restartable=True)]).retriable


def test_oom_retries_are_apart_from_max_retries_and_back_off():
    assert oom_retry_allowed(max_retries=3, oom_kills=100, oom_retries=-1)
    assert not oom_retry_allowed(max_retries=0, oom_kills=0, oom_retries=-1)
    assert oom_retry_allowed(max_retries=-1, oom_kills=1, oom_retries=2)
    assert not oom_retry_allowed(max_retries=-1, oom_kills=2, oom_retries=2)
    assert [oom_retry_delay(kills, 1.0) for kills in (1, 2, 3, 7, 50)] == [1.0, 2.0, 4.0, 60.0, 60.0]


def test_settings_read_rays_names_and_meshray_names_win():
    assert MemorySettings.from_env({}) == MemorySettings(0.95, 250, 0)
    settings = MemorySettings.from_env({"RAY_memory_usage_threshold": "0.8",
                                        "RAY_memory_monitor_refresh_ms": "0",
                                        "MESHRAY_memory_usage_threshold": "0.7"})
    assert (settings.threshold, settings.refresh_ms) == (0.7, 0)
    assert (settings.oom_retries, settings.oom_retry_delay_base_ms) == (-1, 1000)
    settings = MemorySettings.from_env({"RAY_task_oom_retries": "3",
                                        "RAY_task_oom_retry_delay_base_ms": "10"})
    assert (settings.oom_retries, settings.oom_retry_delay_base_ms) == (3, 10)


@pytest.mark.parametrize("env, named", [
    ({"RAY_memory_usage_threshold": "1.5"}, "RAY_memory_usage_threshold='1.5'"),
    ({"RAY_memory_usage_threshold": "lots"}, "RAY_memory_usage_threshold='lots'"),
    ({"RAY_memory_monitor_refresh_ms": "-1"}, "RAY_memory_monitor_refresh_ms='-1'"),
    ({"MESHRAY_TEST_NODE_MEMORY_LIMIT": "1GB"}, "MESHRAY_TEST_NODE_MEMORY_LIMIT='1GB'"),
    ({"RAY_task_oom_retries": "-2"}, "RAY_task_oom_retries='-2'"),
    ({"MESHRAY_task_oom_retry_delay_base_ms": "soon"},
     "MESHRAY_task_oom_retry_delay_base_ms='soon'"),
])
def test_bad_settings_name_the_variable_and_value(env, named):
    with pytest.raises(ValueError, match="expected") as info:
        MemorySettings.from_env(env)
    assert named in str(info.value)


def test_cgroup_v2_limit_and_usage_without_inactive_file(tmp_path):
    (tmp_path / "memory.max").write_text("4294967296\n")
    (tmp_path / "memory.current").write_text("3221225472\n")
    (tmp_path / "memory.stat").write_text("anon 1\ninactive_file 1073741824\nactive_file 5\n")
    assert read_cgroup(str(tmp_path)) == MemoryReading("cgroup v2", 2 * GB, 4 * GB)
    (tmp_path / "memory.max").write_text("max\n")
    assert read_cgroup(str(tmp_path)) is None


def test_cgroup_v1_limit_and_no_limit(tmp_path):
    v1 = tmp_path / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text(f"{2 * GB}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{GB}\n")
    (v1 / "memory.stat").write_text(f"inactive_file 7\ntotal_inactive_file {GB // 2}\n")
    assert read_cgroup(str(tmp_path)) == MemoryReading("cgroup v1", GB // 2, 2 * GB)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert read_cgroup(str(tmp_path)) is None
    assert read_cgroup(str(tmp_path / "absent")) is None
