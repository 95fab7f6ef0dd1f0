"""Task events on one node: Ray's state names read off the node's task records,
finished ones kept in memory and on disk."""
from __future__ import annotations

import pytest

from meshray import exceptions
from meshray.node.event_log import EventLog
from meshray.node.task_events import TaskEvents, error_type_of
from meshray.node.task_lifecycle import TaskState, move
from meshray.node.tasks import TaskRecord
from meshray.rpc.generated import meshray_pb2 as pb


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Node:
    """The node's task table and event log, as the daemon holds them."""

    def __init__(self, tmp_path=None, **limits):
        self.clock = Clock()
        self.tasks: dict = {}
        self.log = EventLog(clock=self.clock)
        self.events = TaskEvents("n1", str(tmp_path / "ev") if tmp_path else None,
                                 clock=self.clock, live_tasks=lambda: list(self.tasks.values()),
                                 **limits)

    def submit(self, i: int, **spec) -> TaskRecord:
        task_id = i.to_bytes(4, "big") * 4
        task = TaskRecord.from_spec(pb.TaskSpec(task_id=task_id, name=f"f{i % 3}",
                                                job_id=b"\x01" * 8, resources={"CPU": 1.0},
                                                **spec), None, "", return_ids=[])
        task.created_at = self.clock.now
        self.tasks[task_id] = task
        return task

    def move(self, task, state, cause="test"):
        self.clock.now += 0.5
        move(task, state, cause, self.log)

    def run(self, task, failed=False, error=None):
        self.move(task, TaskState.QUEUED)
        self.move(task, TaskState.RUNNING)
        task.started_wall, task.ran_on = self.clock.now, (b"\xaa" * 16, 4242)
        self.finish(task, failed, error)

    def finish(self, task, failed=False, error=None):
        self.move(task, TaskState.DONE)
        del self.tasks[task.task_id]
        self.events.finished(task, failed, error)

    def records(self):
        return list(self.events.records())


def test_a_live_task_is_read_off_the_node_with_rays_state_names():
    node = Node()
    task = node.submit(1)
    task.pending_deps = {b"x"}
    (record,) = node.records()
    assert record["state"] == "PENDING_ARGS_AVAIL" and record["creation_time_ms"] == 1_000_000
    task.pending_deps = set()
    node.move(task, TaskState.QUEUED)
    node.move(task, TaskState.RUNNING)
    assert node.records()[0]["state"] == "SUBMITTED_TO_WORKER"   # sent, not begun
    task.started_wall, task.ran_on = node.clock.now, (b"\xaa" * 16, 77)
    (record,) = node.records()
    assert record["state"] == "RUNNING" and record["worker_pid"] == 77
    assert record["worker_id"] == "aa" * 16


def test_a_finished_task_keeps_every_state_with_its_time():
    node = Node()
    task = node.submit(1)
    node.run(task)
    (record,) = node.records()
    assert [state for state, _ in record["events"]] == [
        "PENDING_NODE_ASSIGNMENT", "SUBMITTED_TO_WORKER", "RUNNING", "FINISHED"]
    assert [when for _, when in record["events"]] == [1_000_000, 1_001_000, 1_001_000, 1_001_500]
    assert record["end_time_ms"] == 1_001_500 and record["start_time_ms"] == 1_001_000
    assert record["required_resources"] == {"CPU": 1.0}


def test_failures_say_rays_error_type():
    node = Node()
    node.run(node.submit(1), failed=True)
    node.run(node.submit(2), failed=True, error=exceptions.WorkerCrashedError("gone"))
    node.run(node.submit(3), failed=True, error=exceptions.TaskCancelledError(b"t"))
    assert [r["error_type"] for r in node.records()] == [
        "TASK_EXECUTION_EXCEPTION", "WORKER_DIED", "TASK_CANCELLED"]
    assert error_type_of(None) == "TASK_EXECUTION_EXCEPTION"


def test_a_task_a_peer_ran_is_left_to_the_peer():
    node = Node()
    task = node.submit(1)
    node.move(task, TaskState.SPILLED)
    assert node.records() == []
    node.finish(task)
    assert node.records() == [] and node.events.dropped == 0


def test_a_rerun_replaces_the_record_with_its_new_attempt():
    node = Node()
    task = node.submit(1)
    node.run(task, failed=True)
    node.tasks[task.task_id] = task
    task.spec.attempt = 1
    node.move(task, TaskState.WAITING)                # DONE -> WAITING: re-run from lineage
    node.run(task)
    (record,) = node.records()
    assert record["attempt_number"] == 1 and record["state"] == "FINISHED"
    assert record["error_type"] is None


def test_finished_tasks_past_the_memory_limit_go_to_disk_and_still_list(tmp_path):
    node = Node(tmp_path, memory_limit=10)
    for i in range(50):
        node.run(node.submit(i))
    assert node.events.stats()["finished_in_memory"] == 10 and node.events.spilled == 40
    listed = node.records()
    assert len({r["task_id"] for r in listed}) == 50 and node.events.dropped == 0
    assert {r["state"] for r in listed} == {"FINISHED"}
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in (tmp_path / "ev").iterdir())
    node.events.close()


def test_the_disk_cap_drops_oldest_segments_and_counts_them(tmp_path, monkeypatch):
    from meshray.node import task_events
    monkeypatch.setattr(task_events, "SEGMENT_BYTES", 2_000)
    node = Node(tmp_path, memory_limit=1, disk_limit=6_000)
    for i in range(100):
        node.run(node.submit(i))
    listed = node.records()
    assert node.events.dropped > 0
    assert len(listed) + node.events.dropped == 100
    assert node.events.stats()["disk_bytes"] <= 6_000 + 2_000
    assert node.submit(99).task_id.hex() in {r["task_id"] for r in listed}   # the newest stay
    node.events.close()


def test_old_segments_age_out(tmp_path, monkeypatch):
    from meshray.node import task_events
    monkeypatch.setattr(task_events, "SEGMENT_BYTES", 1_000)
    node = Node(tmp_path, memory_limit=1, max_age_s=60)
    for i in range(20):
        node.run(node.submit(i))
    node.clock.now += 3600
    for i in range(20, 40):
        node.run(node.submit(i))
    kept = {r["task_id"] for r in node.records()}
    assert (0).to_bytes(4, "big").hex() * 4 not in kept
    assert (39).to_bytes(4, "big").hex() * 4 in kept
    assert node.events.dropped >= 10
    node.events.close()


def test_bad_retention_settings_name_the_variable(monkeypatch):
    monkeypatch.setenv("MESHRAY_TASK_EVENTS_MEMORY", "lots")
    with pytest.raises(ValueError, match="MESHRAY_TASK_EVENTS_MEMORY='lots'"):
        TaskEvents("n1", None)


def test_nothing_is_recorded_twice_while_a_task_lives():
    """A live task is read off the node's own table; only its finish is kept."""
    node = Node()
    tasks = [node.submit(i) for i in range(100)]
    for task in tasks:
        node.move(task, TaskState.QUEUED)
    assert node.events.stats()["finished_in_memory"] == 0
    assert len(node.records()) == 100
    del node.tasks[tasks[0].task_id]          # gone from the node without finishing
    assert len(node.records()) == 99


def test_recording_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("MESHRAY_TASK_EVENTS", "0")
    node = Node()
    live = node.submit(1)
    node.run(node.submit(2))
    assert [r["task_id"] for r in node.records()] == [live.task_id.hex()]   # only the live one


def _leased(task_id: bytes, finished=False, failed=False) -> pb.LeasedTask:
    return pb.LeasedTask(task_id=task_id, name="pushed", attempt=0, job_id=b"\x01" * 8,
                         finished=finished, failed=failed)


def test_a_pushed_task_is_running_then_finished_and_counted_once():
    node, ended = Node(), []
    node.events.on_end = lambda *args: ended.append(args)
    node.events.leased_task(b"w" * 16, 77, _leased(b"t" * 16), 1000.0)
    [running] = node.records()
    assert running["state"] == "RUNNING" and running["type"] == "NORMAL_TASK"
    assert list(node.events.live_states()) == [("RUNNING", "pushed", 0)]
    node.events.leased_task(b"w" * 16, 77, _leased(b"t" * 16, finished=True, failed=True),
                            1002.0)
    [done] = node.records()
    assert done["state"] == "FAILED" and done["worker_pid"] == 77
    assert done["start_time_ms"] == 1_000_000 and done["end_time_ms"] == 1_002_000
    assert ended == [("FAILED", "pushed", 0)] and list(node.events.live_states()) == []


def test_a_pushed_task_whose_worker_died_stops_running():
    node = Node()
    node.events.leased_task(b"w" * 16, 77, _leased(b"t" * 16), 1000.0)
    node.events.leased_task(b"v" * 16, 78, _leased(b"u" * 16), 1000.0)
    node.events.worker_gone(b"w" * 16)
    assert [r["task_id"] for r in node.records()] == [(b"u" * 16).hex()]
    assert list(node.events.live_states()) == [("RUNNING", "pushed", 0)]
