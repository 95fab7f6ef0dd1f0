"""Task events on one node: Ray's state names, retention in memory and on disk."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from meshray import exceptions
from meshray.node.task_events import TaskEvents, error_type_of
from meshray.node.task_lifecycle import TaskState
from meshray.rpc.generated import meshray_pb2 as pb


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _task(i: int, **spec):
    return SimpleNamespace(
        task_id=i.to_bytes(4, "big") * 4, spec=pb.TaskSpec(
            task_id=i.to_bytes(4, "big") * 4, name=f"f{i % 3}", job_id=b"\x01" * 4,
            resources={"CPU": 1.0}, **spec),
        pending_deps=set(), remote_node="", pg_hex="", owner=None,
        sched_class=("", (("CPU", 1.0),)))


def _run(events: TaskEvents, task, clock, failed=False, error=None):
    events.submitted(task, False)
    events.moved(task, TaskState.QUEUED, "placed here")
    events.moved(task, TaskState.RUNNING, "sent to worker")
    clock.now += 1
    events.started(task, b"\xaa" * 16, 4242)
    clock.now += 1
    events.finished(task, failed, error)


def test_a_task_moves_through_rays_states_with_times():
    clock = Clock()
    events = TaskEvents("n1", None, clock=clock)
    task = _task(1)
    task.pending_deps = {b"x"}
    events.submitted(task, True)
    (record,) = events.records()
    assert record["state"] == "PENDING_ARGS_AVAIL" and record["creation_time_ms"] == 1_000_000
    task.pending_deps = set()
    events.moved(task, TaskState.QUEUED, "args ready")
    events.moved(task, TaskState.RUNNING, "sent")
    events.started(task, b"\xaa" * 16, 77)
    clock.now = 1002.5
    events.finished(task, False)
    (record,) = events.records()
    assert [state for state, _ in record["events"]] == [
        "PENDING_ARGS_AVAIL", "PENDING_NODE_ASSIGNMENT", "SUBMITTED_TO_WORKER", "RUNNING",
        "FINISHED"]
    assert record["worker_pid"] == 77 and record["end_time_ms"] == 1_002_500


def test_failures_say_rays_error_type():
    clock = Clock()
    events = TaskEvents("n1", None, clock=clock)
    _run(events, _task(1), clock, failed=True)
    _run(events, _task(2), clock, failed=True, error=exceptions.WorkerCrashedError("gone"))
    _run(events, _task(3), clock, failed=True, error=exceptions.TaskCancelledError(b"t"))
    types = {r["task_id"][:8]: r["error_type"] for r in events.records()}
    assert list(types.values()) == ["TASK_EXECUTION_EXCEPTION", "WORKER_DIED", "TASK_CANCELLED"]
    assert error_type_of(None) == "TASK_EXECUTION_EXCEPTION"


def test_a_task_a_peer_ran_is_left_to_the_peer():
    clock = Clock()
    events = TaskEvents("n1", None, clock=clock)
    task = _task(1)
    events.submitted(task, False)
    task.remote_node = "peer"
    events.moved(task, TaskState.SPILLED, "offered to peer")
    assert list(events.records()) == []
    events.finished(task, False)
    assert list(events.records()) == [] and events.dropped == 0


def test_a_retry_is_a_new_attempt_of_the_same_record():
    clock = Clock()
    events = TaskEvents("n1", None, clock=clock)
    task = _task(1)
    _run(events, task, clock, failed=True)
    task.spec.attempt = 1
    _run(events, task, clock)
    (record,) = events.records()
    assert record["attempt_number"] == 1 and record["state"] == "FINISHED"
    assert record["error_type"] is None


def test_finished_tasks_past_the_memory_limit_go_to_disk_and_still_list(tmp_path):
    clock = Clock()
    events = TaskEvents("n1", str(tmp_path / "ev"), memory_limit=10, clock=clock)
    for i in range(50):
        _run(events, _task(i), clock)
    assert events.stats()["finished_in_memory"] == 10 and events.spilled == 40   # batch of 1
    assert len({r["task_id"] for r in events.records()}) == 50
    assert events.dropped == 0
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in (tmp_path / "ev").iterdir())
    events.close()


def test_the_disk_cap_drops_oldest_segments_and_counts_them(tmp_path, monkeypatch):
    from meshray.node import task_events
    monkeypatch.setattr(task_events, "SEGMENT_BYTES", 2_000)
    clock = Clock()
    events = TaskEvents("n1", str(tmp_path / "ev"), memory_limit=1, disk_limit=6_000,
                        clock=clock)
    for i in range(100):
        _run(events, _task(i), clock)
    listed = list(events.records())
    assert events.dropped > 0
    assert len(listed) + events.dropped == 100
    assert events.stats()["disk_bytes"] <= 6_000 + 2_000
    # What is kept is the newest.
    assert _task(99).task_id.hex() in {r["task_id"] for r in listed}
    events.close()


def test_old_segments_age_out(tmp_path, monkeypatch):
    from meshray.node import task_events
    monkeypatch.setattr(task_events, "SEGMENT_BYTES", 1_000)
    clock = Clock()
    events = TaskEvents("n1", str(tmp_path / "ev"), memory_limit=1, max_age_s=60, clock=clock)
    for i in range(20):
        _run(events, _task(i), clock)
    clock.now += 3600
    for i in range(20, 40):
        _run(events, _task(i), clock)
    kept = {r["task_id"] for r in events.records()}
    assert _task(0).task_id.hex() not in kept and _task(39).task_id.hex() in kept
    assert events.dropped >= 10
    events.close()


def test_bad_retention_settings_name_the_variable(monkeypatch):
    monkeypatch.setenv("MESHRAY_TASK_EVENTS_MEMORY", "lots")
    with pytest.raises(ValueError, match="MESHRAY_TASK_EVENTS_MEMORY='lots'"):
        TaskEvents("n1", None)
