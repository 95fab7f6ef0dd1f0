"""The node's event log: bounded, ordered, fed by the lifecycle writers, and
quoted by an illegal move's error."""
from __future__ import annotations

import pytest

from meshray.node import actors as A
from meshray.node.event_log import EventLog
from meshray.node.task_lifecycle import InvalidTaskTransition, TaskState, move
from meshray.node.tasks import TaskQueue, TaskRecord
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.scheduler.resources import ResourceSet


def _task(n: int = 1) -> TaskRecord:
    spec = pb.TaskSpec(task_id=bytes([n]) * 16, name=f"t{n}", resources={"CPU": 1.0})
    return TaskRecord(spec=spec, owner=None, return_ids=[], env_key="", env_vars={},
                      request=ResourceSet.from_dict({"CPU": 1.0}))


def test_moves_and_actor_events_are_recorded_in_order_with_times():
    ticks = iter(range(100, 200))
    log = EventLog(capacity=100, clock=lambda: float(next(ticks)))
    task = _task()
    TaskQueue(log).push(task, "placed here")
    move(task, TaskState.RUNNING, "sent to worker 9", log)
    entry = A.ActorEntry(b"\x07" * 16, pb.TaskSpec(), None, {})
    A.apply(entry, "created", "worker 9", log)
    assert log.tail() == [
        {"time": 100.0, "kind": "task", "id": task.task_id.hex(), "from": "waiting",
         "to": "queued", "cause": "placed here"},
        {"time": 101.0, "kind": "task", "id": task.task_id.hex(), "from": "queued",
         "to": "running", "cause": "sent to worker 9"},
        {"time": 102.0, "kind": "actor", "id": entry.actor_id.hex(), "from": "PENDING",
         "to": "ALIVE", "cause": "created: worker 9"},
    ]
    assert [e["to"] for e in log.tail(1)] == ["ALIVE"] and log.tail(0) == []


def test_the_log_is_a_ring():
    log = EventLog(capacity=5)
    for n in range(1, 13):
        move(_task(n), TaskState.QUEUED, f"q{n}", log)
    assert log.recorded == 12 and log.capacity == 5
    assert [e["cause"] for e in log.tail()] == ["q8", "q9", "q10", "q11", "q12"]


def test_an_illegal_move_quotes_the_nodes_last_events():
    log = EventLog(capacity=50)
    other = _task(2)
    move(other, TaskState.QUEUED, "another task queued", log)
    task = _task(3)
    move(task, TaskState.QUEUED, "placed here", log)
    with pytest.raises(InvalidTaskTransition) as info:
        move(task, TaskState.CRASHED, "a bug", log)
    text = str(info.value)
    assert "The node's last events:" in text
    assert "another task queued" in text and "placed here" in text
    assert log.recorded == 2           # the refused move is not recorded


@pytest.mark.parametrize("raw", ["0", "-3", "many", ""])
def test_capacity_from_the_environment_is_checked(monkeypatch, raw):
    monkeypatch.setenv("MESHRAY_EVENT_LOG_SIZE", raw)
    with pytest.raises(ValueError, match="MESHRAY_EVENT_LOG_SIZE"):
        EventLog()
    monkeypatch.setenv("MESHRAY_EVENT_LOG_SIZE", "7")
    assert EventLog().capacity == 7
