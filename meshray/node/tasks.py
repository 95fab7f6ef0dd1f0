"""Task records and the node's local queue, grouped by scheduling class.

Tasks that ask for the same resources in the same environment form one class;
the dispatcher only looks at the head of each class, so a deep backlog of
identical tasks costs O(classes) per dispatch rather than O(tasks).
"""
from __future__ import annotations

import json
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from functools import cached_property

from meshray.node.task_lifecycle import TaskState, move, new_story
from meshray.scheduler.resources import ResourceSet

__all__ = ["TaskRecord", "TaskQueue", "infeasible_notice", "sched_class_of"]


def sched_class_of(env_key: str, resources) -> tuple:
    """A scheduling class: tasks (and leases) of one environment asking for the same resources."""
    return (env_key, tuple(sorted(resources.items())))


@dataclass(eq=False)
class TaskRecord:
    spec: object                      # rpc TaskSpec
    owner: object                     # Connection of the submitter
    return_ids: list
    request: object                   # scheduler ResourceSet that must fit to place it
    env_key: str
    env_vars: dict
    pending_deps: set = field(default_factory=set)
    state: TaskState = TaskState.WAITING   # written only by task_lifecycle.move
    story: deque = field(default_factory=new_story)   # its last moves, for errors
    worker: object = None
    acquired: bool = False
    cpu_lent: bool = False            # CPU handed back while blocked in get()
    cancelled: bool = False
    retries_left: int = 0
    infeasible_reported: bool = False
    children: set = field(default_factory=set)
    hold: object = None               # ResourceSet held while it runs (default: request)
    actor: object = None              # ActorEntry, for actor creation tasks
    allocation: object = None         # scheduler Allocation when devices were assigned
    gpu_ids: list = field(default_factory=list)
    worker_key: str = ""              # which pooled workers may run it (env + devices)
    worker_env: dict = field(default_factory=dict)
    remote_node: str = ""             # spilled: the node running it for us
    spill_candidates: list = field(default_factory=list)
    refused_by: set = field(default_factory=set)
    only_elsewhere: bool = False      # its hard constraints exclude this node (policy.may_run_on)
    remote_args: list | None = None   # spilled to us: argument values sent by the origin
    runtime_env: dict = field(default_factory=dict)   # without the package map
    packages: dict = field(default_factory=dict)      # package uri -> object id hex
    pg_hex: str = ""                  # placement group it targets, if any
    pg_index: int = -1
    pg_since: float = 0.0
    bundle: tuple | None = None       # (pg hex, index) whose pool it runs in, on this node
    bundle_gpu_ids: list = field(default_factory=list)
    pg_error: object = None           # set when its group was removed while it ran
    pg_dropped: bool = False          # killed because its bundle left this node
    oom_kills: int = 0                # times the memory monitor killed it (retries apart from max_retries)
    started_at: float = 0.0           # when its worker began it (monotonic), for run-time stats
    # For its task events (node/task_events.py reads these, nothing else):
    created_at: float = 0.0           # when this node made the record (wall clock)
    started_wall: float | None = None  # when its worker began it (wall clock)
    ran_on: tuple = (None, None)      # (worker id, pid) that ran it
    stamps: deque = field(default_factory=new_story)   # when each move in `story` was made

    def __post_init__(self):
        if self.hold is None:
            self.hold = self.request
        self.worker_key = self.worker_key or self.env_key
        self.worker_env = self.worker_env or dict(self.env_vars)
        if self.spec is not None and getattr(self.spec, "runtime_env_json", ""):
            env = json.loads(self.spec.runtime_env_json)
            self.packages = env.pop("_packages", {}) or {}
            self.runtime_env = env

    @classmethod
    def from_spec(cls, spec, owner, env_key: str, *, return_ids: list,
                  actor=None) -> "TaskRecord":
        """The one way a node makes a task record (submitted here, spilled to
        us, or an actor's creation run again): what it asks for, holds and may
        retry all come from its spec. An actor's creation task holds the
        actor's resources and is never retried (the actor restarts instead)."""
        task = cls(spec=spec, owner=owner, return_ids=return_ids,
                   request=ResourceSet.from_dict(dict(spec.resources)), env_key=env_key,
                   env_vars=dict(spec.env_vars), retries_left=spec.max_retries, actor=actor,
                   created_at=time.time())
        if spec.actor_creation:
            task.hold = ResourceSet.from_dict(dict(spec.held_resources))
            task.retries_left = 0
        return task

    @property
    def task_id(self) -> bytes:
        return self.spec.task_id

    @cached_property
    def sched_class(self) -> tuple:
        return sched_class_of(self.env_key, self.spec.resources)


class TaskQueue:
    """Queued tasks, FIFO within each scheduling class."""

    def __init__(self, log=None):
        self._classes: "OrderedDict[tuple, deque]" = OrderedDict()
        self._held: list = []    # only_elsewhere tasks: offered to peers, never started here
        self._log = log          # the node's event log: queueing is a recorded move
        self.on_push = None      # called after each push (the peer duties wake on it)

    def push(self, task: TaskRecord, cause: str) -> None:
        """Queue `task`; one that may only run on other nodes is held apart,
        where nothing starts it here (see `held`)."""
        move(task, TaskState.QUEUED, cause, self._log)
        if self.on_push is not None:
            self.on_push()
        if task.only_elsewhere:
            self._held.append(task)
            return
        self._classes.setdefault(task.sched_class, deque()).append(task)

    def held(self) -> list:
        """Queued tasks waiting for another node to have room, oldest first."""
        self._held = [t for t in self._held if not t.cancelled]
        return list(self._held)

    def heads(self):
        """Yield (class, deque) pairs whose deque is non-empty."""
        for key in list(self._classes):
            tasks = self._classes[key]
            while tasks and tasks[0].cancelled:
                tasks.popleft()
            if not tasks:
                del self._classes[key]
                continue
            yield key, tasks

    def pop_matching_head(self, sched_class: tuple, accept):
        """The head of a class if accept(head) holds, removed from the queue; else None."""
        tasks = self._classes.get(sched_class)
        while tasks and tasks[0].cancelled:
            tasks.popleft()
        if tasks and accept(tasks[0]):
            return tasks.popleft()
        return None

    def has_class(self, sched_class: tuple) -> bool:
        """Are tasks of this class already waiting (so a newcomer must queue behind)?"""
        return bool(self._classes.get(sched_class))

    def remove(self, task: TaskRecord) -> bool:
        if task in self._held:
            self._held.remove(task)
            return True
        tasks = self._classes.get(task.sched_class)
        if tasks and task in tasks:
            tasks.remove(task)
            return True
        return False

    def waiting(self) -> int:
        """Tasks queued to start here (those held for other nodes not counted)."""
        return sum(len(t) for t in self._classes.values())

    def __len__(self) -> int:
        return self.waiting() + len(self._held)

    def __iter__(self):
        for tasks in self._classes.values():
            yield from tasks
        yield from list(self._held)


def infeasible_notice(task, reason: str) -> str:
    """What the owner is told, once, about work no node in the cluster can ever fit."""
    if task.actor is not None:
        what = (f"The actor {task.actor.options.get('class_name') or task.spec.name} "
                f"(actor id {task.actor.actor_id.hex()})")
    else:
        what = f"The task {task.spec.name} (id {task.task_id.hex()})"
    return (f"{what} cannot be scheduled right now. It requires {task.request.to_dict()} for "
            f"placement, however the cluster currently cannot provide the requested resources. "
            f"{reason + ' ' if reason else ''}It stays pending until a node that can fit it "
            f"joins the cluster; otherwise reduce what it requests.")
