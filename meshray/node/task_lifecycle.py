"""The lifecycle of a task on a node: its states, the legal moves between
them, and the one function that makes a move.

Why a table: a task's state decides what a cancel, a worker's death, a peer's
death or a result does to it, and those arrive from different code paths in
any order. When every path writes the state through :func:`move`, a move the
table does not allow is a bug caught where it happens -- raised with the
task's recent story (the moves that led there and why) -- instead of a task
silently lost in a state nothing looks at. The story is a short ring per
task, so keeping it costs a tuple per move.

States (a task is in exactly one):

==============  ===========================================================
WAITING         known here, not placed: arguments pending, or about to be
                (re)placed (new, retried, re-run from lineage)
QUEUED          placed on this node, waiting for resources
ASSIGNED        resources taken, waiting for a worker to start
RUNNING         sent to a worker (as its current task or pipelined behind it)
SPILLED         offered to / running on a peer, which answers for it
INFEASIBLE      fits no node in the view; placed again when the view changes
WAITING_GROUP   its placement group has no reserved bundle for it yet
CRASHED         its worker died and no retry is left; finished once the
                worker's exit status is in (so the error can name it)
DONE            finished (a value or an error was delivered)
==============  ===========================================================

Alternatives considered: a state object per task with methods per event
(the State pattern) spreads the table over classes; the table keeps every
legal move in one screen, which is what a reviewer checks.
"""
from __future__ import annotations

from collections import deque

from meshray.common.state_names import StateName

__all__ = ["TaskState", "TRANSITIONS", "InvalidTaskTransition", "move", "take_retry",
           "take_memory_retry", "new_story"]


class TaskState(StateName):
    WAITING = "waiting"
    QUEUED = "queued"
    ASSIGNED = "assigned"
    RUNNING = "running"
    SPILLED = "spilled"
    INFEASIBLE = "infeasible"
    WAITING_GROUP = "waiting_group"
    CRASHED = "crashed"
    DONE = "done"


S = TaskState
_PLACED = frozenset({S.QUEUED, S.ASSIGNED, S.RUNNING, S.SPILLED, S.INFEASIBLE, S.WAITING_GROUP})
TRANSITIONS: dict[TaskState, frozenset] = {
    # Placement decides where a waiting task goes; a cancel or an unschedulable
    # decision finishes it.
    S.WAITING: _PLACED | {S.DONE},
    # Resources freed: start (directly, or after a worker starts); offered to a
    # peer with room; cancelled or its group removed.
    # (QUEUED again: offered to peers, none reachable, so back in line.)
    S.QUEUED: frozenset({S.QUEUED, S.ASSIGNED, S.RUNNING, S.SPILLED, S.DONE}),
    S.ASSIGNED: frozenset({S.RUNNING, S.DONE}),
    # A result, a retry (back to WAITING), or a death with no retry left.
    S.RUNNING: frozenset({S.DONE, S.WAITING, S.CRASHED}),
    # A peer refused (next candidate, or queue here), its node died (retry),
    # or it answered.
    S.SPILLED: frozenset({S.SPILLED, S.QUEUED, S.WAITING, S.DONE}),
    # Re-placed (through WAITING) as the cluster or group view changes.
    S.INFEASIBLE: _PLACED - {S.INFEASIBLE} | {S.WAITING, S.DONE},
    S.WAITING_GROUP: _PLACED - {S.WAITING_GROUP} | {S.WAITING, S.DONE},
    S.CRASHED: frozenset({S.DONE}),
    # A lost output is rebuilt by running the task again (lineage).
    S.DONE: frozenset({S.WAITING}),
}
STORY_LENGTH = 16


class InvalidTaskTransition(RuntimeError):
    """A move the lifecycle table does not allow: a bug, told with its story
    (and the tail of the node's event log when the move came with one)."""

    def __init__(self, task, new: TaskState, cause: str, log=None):
        story = "\n".join(f"  {old} -> {to}: {why}" for old, to, why in task.story) or "  (none)"
        name = getattr(task.spec, "name", "?")
        super().__init__(
            f"task {name} (id {task.task_id.hex()}) cannot move from {task.state} to {new} "
            f"({cause}); allowed from {task.state}: "
            f"{', '.join(sorted(str(s) for s in TRANSITIONS[task.state])) or 'nothing'}.\n"
            f"Its last moves:\n{story}"
            + (f"\nThe node's last events:\n{log.format_tail()}" if log is not None else ""))
        self.task_id = task.task_id
        self.old, self.new = task.state, new


def new_story() -> deque:
    return deque(maxlen=STORY_LENGTH)


def move(task, new: TaskState, cause: str, log=None) -> None:
    """Set `task.state` to `new` -- the only place that does -- or raise.

    `log` is the node's :class:`~meshray.node.event_log.EventLog`, which
    records the move too.
    """
    old = task.state
    if new not in TRANSITIONS[old]:
        raise InvalidTaskTransition(task, new, cause, log)
    task.story.append((old, new, cause))
    task.state = new
    if log is not None:
        log.task_moved(task, old, new, cause)


def take_retry(task) -> bool:
    """Spend one retry of `task` if it has one (-1 = unlimited): the one retry rule.

    A retried task runs as a new attempt (its spec says which), so a result
    from the attempt that failed can be told apart from the new one.
    """
    if task.retries_left == 0:
        return False
    if task.retries_left > 0:
        task.retries_left -= 1
    task.spec.attempt += 1
    return True


def take_memory_retry(task) -> None:
    """Run `task` again after the memory monitor killed it: a new attempt that
    spends none of its `max_retries` (the monitor's own limit, `task_oom_retries`,
    was checked when it chose to retry it, as Ray does)."""
    task.spec.attempt += 1
