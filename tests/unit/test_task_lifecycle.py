"""The task lifecycle table: every legal move is made, every other one raises
with the task's story, and retries follow one rule."""
from __future__ import annotations

import itertools

import pytest

from meshray.node.task_lifecycle import (
    TRANSITIONS,
    InvalidTaskTransition,
    TaskState,
    move,
    take_retry,
)
from meshray.node.tasks import TaskQueue, TaskRecord
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.scheduler.resources import ResourceSet

S = TaskState


def _task(state: TaskState = S.WAITING, retries: int = 0) -> TaskRecord:
    spec = pb.TaskSpec(task_id=b"\x01" * 16, name="f", resources={"CPU": 1.0})
    task = TaskRecord(spec=spec, owner=None, return_ids=[], request=ResourceSet.from_dict(
        {"CPU": 1.0}), env_key="", env_vars={}, retries_left=retries)
    task.state = state      # the starting point of each case, set directly
    return task


ALL_MOVES = list(itertools.product(TaskState, TaskState))


@pytest.mark.parametrize("old,new", [m for m in ALL_MOVES if m[1] in TRANSITIONS[m[0]]])
def test_every_legal_move_is_made_and_told(old, new):
    task = _task(old)
    move(task, new, "because")
    assert task.state is new
    assert list(task.story) == [(old, new, "because")]


@pytest.mark.parametrize("old,new", [m for m in ALL_MOVES if m[1] not in TRANSITIONS[m[0]]])
def test_every_other_move_raises_and_leaves_the_task_alone(old, new):
    task = _task(old)
    with pytest.raises(InvalidTaskTransition) as info:
        move(task, new, "a bug")
    assert task.state is old
    assert f"cannot move from {old} to {new} (a bug)" in str(info.value)
    assert info.value.task_id == task.task_id


def test_an_illegal_move_tells_the_story_that_led_there():
    task = _task()
    move(task, S.QUEUED, "placed here")
    move(task, S.RUNNING, "sent to worker 7")
    move(task, S.DONE, "finished")
    with pytest.raises(InvalidTaskTransition) as info:
        move(task, S.RUNNING, "a late dispatch")
    text = str(info.value)
    for line in ("waiting -> queued: placed here", "queued -> running: sent to worker 7",
                 "running -> done: finished"):
        assert line in text
    assert "allowed from done: waiting" in text


def test_a_finished_task_only_comes_back_to_be_rebuilt():
    assert TRANSITIONS[S.DONE] == {S.WAITING}
    assert TRANSITIONS[S.CRASHED] == {S.DONE}


def test_the_story_is_bounded():
    task = _task()
    for i in range(100):
        move(task, S.QUEUED, f"q{i}")
        move(task, S.SPILLED, f"s{i}")
        move(task, S.QUEUED, f"back{i}")
        move(task, S.ASSIGNED, f"a{i}")
        move(task, S.RUNNING, f"r{i}")
        move(task, S.WAITING, f"retry{i}")
    assert len(task.story) == 16
    assert task.story[-1] == (S.RUNNING, S.WAITING, "retry99")


def test_retries_are_counted_by_one_rule():
    task = _task(retries=2)
    assert take_retry(task) and (task.retries_left, task.spec.attempt) == (1, 1)
    assert take_retry(task) and (task.retries_left, task.spec.attempt) == (0, 2)
    assert not take_retry(task) and (task.retries_left, task.spec.attempt) == (0, 2)
    unlimited = _task(retries=-1)
    for attempt in range(1, 6):
        assert take_retry(unlimited)
        assert (unlimited.retries_left, unlimited.spec.attempt) == (-1, attempt)


def test_queueing_is_a_move():
    queue = TaskQueue()
    task = _task()
    queue.push(task, "placed here")
    assert task.state is S.QUEUED and list(queue) == [task]
    running = _task(S.RUNNING)
    with pytest.raises(InvalidTaskTransition):
        queue.push(running, "a bug")
    assert list(queue) == [task]
