"""Task events: what each task this node handled went through, kept by this node.

There is no head node to send task events to, so every node keeps the
events of the tasks it handles and answers for them (the state API asks every
node and merges; meshray/node/state_queries.py). A task that left for a peer
(spilled) is answered for by the peer that runs it; the record here only says
where it went.

Where the events come from: the node's lifecycle moves (task_lifecycle.move,
through the event log) and the few facts a move does not carry — which
worker started it, and why it failed. Recording is a dict lookup and a list
append per move; states are Ray's names (``RUNNING``, ``FINISHED``...), mapped
from the node's own states when recorded.

Retention (``docs/observability.md``):

- in memory: every task not finished yet, and the newest finished ones up to
  ``MESHRAY_TASK_EVENTS_MEMORY`` (default 20,000 tasks);
- on disk: finished tasks pushed out of memory are appended, a JSON line
  each, to segment files under ``<session>/task_events/<node>/``; segments are
  removed oldest first when they exceed ``MESHRAY_TASK_EVENTS_DISK_BYTES``
  (default 256 MiB) or hold only tasks older than
  ``MESHRAY_TASK_EVENTS_MAX_AGE_S`` (default 24 h). What is removed is
  counted (``dropped``) and every listing reports it: nothing is lost
  silently.
"""
from __future__ import annotations

import json
import os
import time
from collections import OrderedDict

from meshray.node.task_lifecycle import TaskState

__all__ = ["TaskEvents", "RAY_STATES", "error_type_of"]

# The task states of Ray's state API, in lifecycle order.
RAY_STATES = ("NIL", "PENDING_ARGS_AVAIL", "PENDING_NODE_ASSIGNMENT", "SUBMITTED_TO_WORKER",
              "RUNNING", "FINISHED", "FAILED")
_FROM_NODE_STATE = {
    TaskState.QUEUED: "PENDING_NODE_ASSIGNMENT",
    TaskState.ASSIGNED: "PENDING_NODE_ASSIGNMENT",   # resources granted, worker starting
    TaskState.INFEASIBLE: "PENDING_NODE_ASSIGNMENT",
    TaskState.WAITING_GROUP: "PENDING_NODE_ASSIGNMENT",
    TaskState.SPILLED: "PENDING_NODE_ASSIGNMENT",
    TaskState.RUNNING: "SUBMITTED_TO_WORKER",       # RUNNING once the worker takes it
}
# Ray's ErrorType names for the failures a node itself decides.
_ERROR_TYPES = {
    "WorkerCrashedError": "WORKER_DIED",
    "TaskCancelledError": "TASK_CANCELLED",
    "ActorDiedError": "ACTOR_DIED",
    "ActorUnschedulableError": "ACTOR_UNSCHEDULABLE_ERROR",
    "TaskUnschedulableError": "TASK_UNSCHEDULABLE_ERROR",
    "TaskPlacementGroupRemoved": "TASK_PLACEMENT_GROUP_REMOVED",
    "ActorPlacementGroupRemoved": "ACTOR_PLACEMENT_GROUP_REMOVED",
    "RuntimeEnvSetupError": "RUNTIME_ENV_SETUP_FAILED",
    "OutOfMemoryError": "OUT_OF_MEMORY",
    "ObjectLostError": "OBJECT_LOST",
}
TASK_EXECUTION_EXCEPTION = "TASK_EXECUTION_EXCEPTION"
SEGMENT_BYTES = 8 << 20


def error_type_of(error: BaseException | None) -> str:
    """Ray's ErrorType name for a failure the node decided (else the task raised)."""
    if error is None:
        return TASK_EXECUTION_EXCEPTION
    return _ERROR_TYPES.get(type(error).__name__, TASK_EXECUTION_EXCEPTION)


def _positive_env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be a positive number")
    return value


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class TaskEvents:
    """This node's task records (see the module docstring for retention)."""

    def __init__(self, node_hex: str, spill_dir: str | None, *, memory_limit: int | None = None,
                 disk_limit: int | None = None, max_age_s: float | None = None, clock=time.time):
        self.node_hex = node_hex
        self._clock = clock
        self._live: dict[bytes, dict] = {}
        self._actor_running: dict[bytes, list] = {}   # worker id -> its actor's running calls
        self._finished: "OrderedDict[bytes, dict]" = OrderedDict()
        self.memory_limit = int(memory_limit or _positive_env("MESHRAY_TASK_EVENTS_MEMORY", 20_000))
        self.disk_limit = int(disk_limit or _positive_env("MESHRAY_TASK_EVENTS_DISK_BYTES",
                                                          256 << 20))
        self.max_age_s = max_age_s or _positive_env("MESHRAY_TASK_EVENTS_MAX_AGE_S", 86_400.0)
        self._spill_dir = spill_dir
        self._segment = None          # open file of the current segment
        self._segment_path = ""
        self._segments: list = []     # [path, bytes, newest end time], oldest first
        self._next_segment = 0
        self.dropped = 0              # tasks removed for good (disk cap or age)
        self.spilled = 0              # tasks written to disk
        self.on_end = None            # callable(record): a final state (node metrics)

    # ------------------------------------------------------------ recording
    def submitted(self, task, node_state_pending_args: bool) -> None:
        """A task record was made here (submitted, spilled in, re-run or restarted)."""
        spec = task.spec
        now = _ms(self._clock())
        if spec.actor_creation:
            kind, name = "ACTOR_CREATION_TASK", spec.name
        else:
            kind, name = "NORMAL_TASK", spec.name
        state = "PENDING_ARGS_AVAIL" if node_state_pending_args else "PENDING_NODE_ASSIGNMENT"
        record = self._finished.pop(spec.task_id, None)
        if record is not None:      # run again (retry, lineage, restart): a new attempt
            record.update(attempt_number=spec.attempt, state=state, error_type=None,
                          error_message=None, end_time_ms=None, worker_id=None, worker_pid=None)
            record["events"].append((state, now))
        else:
            record = {
                "task_id": spec.task_id.hex(), "attempt_number": spec.attempt, "name": name,
                "state": state, "job_id": spec.job_id.hex(),
                "actor_id": spec.actor_id.hex() if spec.actor_id else None, "type": kind,
                "func_or_class_name": name, "parent_task_id": spec.parent_task_id.hex(),
                "node_id": self.node_hex, "worker_id": None, "worker_pid": None,
                "error_type": None, "error_message": None, "language": "PYTHON",
                "required_resources": dict(spec.resources),
                "placement_group_id": None, "creation_time_ms": now, "start_time_ms": None,
                "end_time_ms": None, "events": [(state, now)], "spilled_to": None,
                # Spilled here by another node (its RemoteOwner stands for it).
                "spilled_from": getattr(task.owner, "node_hex", None),
            }
        self._live[spec.task_id] = record

    def moved(self, task, new: TaskState, cause: str) -> None:
        """A lifecycle move (task_lifecycle.move calls this through the event log)."""
        record = self._live.get(task.task_id)
        if record is None:
            return
        if new is TaskState.DONE:
            return       # finished() says how it ended
        if new is TaskState.WAITING:
            state = "PENDING_ARGS_AVAIL" if task.pending_deps else "PENDING_NODE_ASSIGNMENT"
        else:
            state = _FROM_NODE_STATE.get(new)
            if state is None:         # CRASHED: still running until its exit status is in
                return
        record["spilled_to"] = task.remote_node if new is TaskState.SPILLED else None
        if task.pg_hex and not record["placement_group_id"]:
            record["placement_group_id"] = task.pg_hex
        if record["state"] != state:
            record["state"] = state
            record["events"].append((state, _ms(self._clock())))

    def started(self, task, worker_id: bytes, pid: int) -> None:
        """The worker began the task (dispatched, or promoted from its pipeline)."""
        record = self._live.get(task.task_id)
        if record is None:
            return
        now = _ms(self._clock())
        record.update(state="RUNNING", worker_id=worker_id.hex(), worker_pid=pid,
                      start_time_ms=now)
        record["events"].append(("RUNNING", now))

    def finished(self, task, failed: bool, error: BaseException | None = None) -> None:
        record = self._live.pop(task.task_id, None)
        if record is None or record["spilled_to"]:
            return     # a peer ran it and answers for it
        now = _ms(self._clock())
        state = "FAILED" if failed else "FINISHED"
        record.update(state=state, end_time_ms=now)
        if failed:
            record["error_type"] = error_type_of(error)
            if error is not None:
                record["error_message"] = str(error)[:2000]
        record["events"].append((state, now))
        if self.on_end is not None:
            self.on_end(record)
        self._finished[task.task_id] = record
        while len(self._finished) > self.memory_limit:
            self._spill(self._finished.popitem(last=False)[1])

    def actor_calls(self, worker_id: bytes, pid: int, actor_id: bytes, report) -> None:
        """An actor's report of its method calls (core/actor_task_events.py)."""
        common = {"actor_id": actor_id.hex(), "node_id": self.node_hex,
                  "worker_id": worker_id.hex(), "worker_pid": pid}
        self._actor_running[worker_id] = [
            self._actor_call(event, common) for event in report.running]
        for event in report.finished:
            record = self._actor_call(event, common)
            self._finished.pop(event.task_id, None)
            self._finished[event.task_id] = record
        while len(self._finished) > self.memory_limit:
            self._spill(self._finished.popitem(last=False)[1])

    @staticmethod
    def _actor_call(event, common: dict) -> dict:
        received = _ms(event.received)
        if event.finished:
            state = "FAILED" if event.failed else "FINISHED"
            end = _ms(event.finished)
            events = [("RUNNING", received), (state, end)]
        else:
            state, end, events = "RUNNING", None, [("RUNNING", received)]
        return {
            "task_id": event.task_id.hex(), "attempt_number": event.attempt, "name": event.name,
            "state": state, "job_id": event.job_id.hex(), "type": "ACTOR_TASK",
            "func_or_class_name": event.name, "parent_task_id": event.parent_task_id.hex(),
            "error_type": "TASK_EXECUTION_EXCEPTION" if event.failed else None,
            "error_message": None, "language": "PYTHON", "required_resources": {},
            "placement_group_id": None, "creation_time_ms": received,
            "start_time_ms": received, "end_time_ms": end, "events": events,
            "spilled_to": None, "spilled_from": None, **common,
        }

    def worker_gone(self, worker_id: bytes) -> None:
        """Its actor's running calls end with it (its callers get the error)."""
        self._actor_running.pop(worker_id, None)

    # ------------------------------------------------------------ disk
    def _spill(self, record: dict) -> None:
        if self._spill_dir is None:
            self.dropped += 1
            return
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        try:
            if self._segment is None or self._segments[-1][1] + len(line) > SEGMENT_BYTES:
                self._open_segment()
            self._segment.write(line)
            self._segment.flush()
        except OSError:
            self.dropped += 1
            return
        segment = self._segments[-1]
        segment[1] += len(line)
        segment[2] = max(segment[2], record["end_time_ms"] or 0)
        self.spilled += 1
        self._trim()

    def _open_segment(self) -> None:
        if self._segment is not None:
            self._segment.close()
        os.makedirs(self._spill_dir, mode=0o700, exist_ok=True)
        path = os.path.join(self._spill_dir, f"segment-{self._next_segment:06d}.jsonl")
        self._next_segment += 1
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        self._segment = os.fdopen(fd, "ab")
        self._segments.append([path, 0, 0, 0])   # path, bytes, newest end, records
        self._segment_path = path

    def _trim(self) -> None:
        segment = self._segments[-1]
        segment[3] += 1
        oldest_allowed = _ms(self._clock() - self.max_age_s)
        while len(self._segments) > 1 and (
                sum(s[1] for s in self._segments) > self.disk_limit
                or self._segments[0][2] < oldest_allowed):
            path, _size, _newest, count = self._segments.pop(0)
            self.dropped += count
            try:
                os.unlink(path)
            except OSError:
                pass

    def close(self) -> None:
        if self._segment is not None:
            self._segment.close()
            self._segment = None

    # ------------------------------------------------------------ reading
    def records(self):
        """Every record this node answers for: on disk (oldest first), then in memory.

        A task that went to a peer is left out: the peer answers for it.
        """
        if self._segment is not None:
            self._segment.flush()
        for path, _size, _newest, _count in list(self._segments):
            try:
                with open(path, "rb") as handle:
                    for line in handle:
                        try:
                            yield json.loads(line)
                        except ValueError:
                            continue      # a line cut short by a crash
            except OSError:
                continue
        yield from list(self._finished.values())
        for running in list(self._actor_running.values()):
            yield from running
        for record in list(self._live.values()):
            if not record["spilled_to"]:
                yield record

    def live_states(self):
        """(state, name, attempt) of each task not finished yet that this node answers for."""
        for record in self._live.values():
            if not record["spilled_to"]:
                yield record["state"], record["name"], record["attempt_number"]

    def stats(self) -> dict:
        return {"live": len(self._live), "finished_in_memory": len(self._finished),
                "spilled": self.spilled, "dropped": self.dropped,
                "disk_bytes": sum(s[1] for s in self._segments)}
