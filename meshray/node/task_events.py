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
import operator
import os
import time
from collections import OrderedDict

from meshray.common.env import positive_env
from meshray.node.task_lifecycle import TaskState

__all__ = ["TaskEvents", "RAY_STATES", "error_type_of"]

# The task states of Ray's state API, in lifecycle order.
RAY_STATES = ("NIL", "PENDING_ARGS_AVAIL", "PENDING_NODE_ASSIGNMENT", "SUBMITTED_TO_WORKER",
              "RUNNING", "FINISHED", "FAILED")
_DONE = TaskState.DONE
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
    return positive_env(name, default, kind=float)


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _ms_or_none(seconds):
    return None if seconds is None else int(seconds * 1000)


# A record is a tuple (cheaper than a dict on the hot path), indexed by these;
# ids stay bytes and times seconds until a record is read (`_raw`, `_dict`).
(TID, ATTEMPT, NAME, JOB, ACTOR, PARENT, REQUEST, KIND, STATE, WORKER, PID, ERROR_TYPE,
 ERROR_MESSAGE, CREATED, START, END, EVENTS, SPILLED_TO, SPILLED_FROM, PG) = range(20)
# On disk: a batch of records a line, one JSON object of columns (TaskEvents._spill).
SPILL_BATCH = 500        # finished records written to disk at a time (at most)


def _hex_or_none(value: bytes):
    return value.hex() if value else None


_SPILLED = TaskState.SPILLED
_STATE_NAMES = {TaskState.WAITING: "PENDING_NODE_ASSIGNMENT",
                TaskState.QUEUED: "PENDING_NODE_ASSIGNMENT",
                TaskState.ASSIGNED: "PENDING_NODE_ASSIGNMENT",
                TaskState.INFEASIBLE: "PENDING_NODE_ASSIGNMENT",
                TaskState.WAITING_GROUP: "PENDING_NODE_ASSIGNMENT",
                TaskState.SPILLED: "PENDING_NODE_ASSIGNMENT",
                TaskState.RUNNING: "SUBMITTED_TO_WORKER",   # RUNNING once its worker takes it
                TaskState.CRASHED: "RUNNING",               # until its exit status is in
                TaskState.DONE: "FINISHED"}
# What a move to each state adds to a task's events (the final state is added
# with its end time instead).
_MOVE_NAMES = {**_STATE_NAMES, TaskState.DONE: None}
_NEW_STATE = operator.itemgetter(1)


def _ray_state(task) -> str:
    """Ray's name for the state of a task still on this node."""
    state = task.state
    if state is TaskState.WAITING and task.pending_deps:
        return "PENDING_ARGS_AVAIL"
    if state is TaskState.RUNNING and task.started_wall is not None:
        return "RUNNING"
    return _STATE_NAMES[state]


def _events(moves, stamps, created: float, started: float | None, final: str | None,
            end: float | None) -> tuple:
    """Ray's states a task went through, with times: from the Ray names of its
    moves (`_move_names`, stamped by the event log), when it was made, and when
    its worker began it."""
    last = "PENDING_NODE_ASSIGNMENT"
    events = [(last, created)]
    if len(moves) != len(stamps):          # moves made without a log carry no time
        moves = tuple(moves)[-len(stamps):] if stamps else ()
    for name, when in zip(moves, stamps):
        if name is not None and name != last:
            events.append((name, when))
            last = name
    if started is not None:
        events.append(("RUNNING", started))
    if final is not None:
        events.append((final, end))
    return tuple(events)


def _move_names(story) -> tuple:
    """The Ray state name each move of `story` led to (None for the final move).

    Plain strings, not TaskState members: a finished record built of plain
    values is one the garbage collector stops tracking after one pass, so the
    tens of thousands a node keeps cost its full collections nothing (enum
    members would keep every record tracked and walked).
    """
    return tuple(map(_MOVE_NAMES.__getitem__, map(_NEW_STATE, story)))


def _task_events(task, final: str | None, end: float | None) -> tuple:
    return _events(_move_names(task.story), task.stamps, task.created_at, task.started_wall, final, end)


def _live_record(task) -> list:
    """A record for a task not finished yet, read off the node's TaskRecord."""
    spec = task.spec
    worker_id, pid = task.ran_on
    return [spec.task_id, spec.attempt, spec.name, spec.job_id, spec.actor_id,
            spec.parent_task_id, task.sched_class[1],
            "ACTOR_CREATION_TASK" if spec.actor_creation else "NORMAL_TASK", _ray_state(task),
            worker_id, pid, None, None, task.created_at, task.started_wall, None,
            _task_events(task, None, None), None, getattr(task.owner, "node_hex", None),
            task.pg_hex or None]


_UNNAMED = "unnamed"      # first item of a finished record's raw events (never a named event)


def _named_events(record) -> tuple:
    """A record's events: named already (live tasks, actor calls), or named now
    from the story and stamps a finished task's record keeps."""
    events = record[EVENTS]
    if events and events[0] is _UNNAMED:
        return _events(events[1], events[2], record[CREATED], record[START], record[STATE],
                       record[END])
    return events


class TaskEvents:
    """This node's task records (see the module docstring for retention)."""

    def __init__(self, node_hex: str, spill_dir: str | None, *, memory_limit: int | None = None,
                 disk_limit: int | None = None, max_age_s: float | None = None, clock=time.time,
                 live_tasks=lambda: ()):
        self.node_hex = node_hex
        self._clock = clock
        # The node's own task table answers for unfinished tasks: nothing is
        # recorded twice while a task lives (callable -> its TaskRecords).
        self._live_tasks = live_tasks
        self._actor_running: dict[bytes, list] = {}   # worker id -> its actor's running calls
        self._leased_running: dict[bytes, tuple] = {}  # task id -> a pushed task running here
        self._actor_common: dict[bytes, tuple] = {}   # worker id -> (actor id, pid)
        self._finished: "OrderedDict[bytes, list]" = OrderedDict()
        self.memory_limit = int(memory_limit or _positive_env("MESHRAY_TASK_EVENTS_MEMORY", 20_000))
        self.disk_limit = int(disk_limit or _positive_env("MESHRAY_TASK_EVENTS_DISK_BYTES",
                                                          256 << 20))
        self.max_age_s = max_age_s or _positive_env("MESHRAY_TASK_EVENTS_MAX_AGE_S", 86_400.0)
        self._spill_dir = spill_dir
        self._segment = None          # open file of the current segment
        self._segments: list = []     # [path, bytes, newest end (ms), records], oldest first
        self._next_segment = 0
        self.dropped = 0              # tasks removed for good (disk cap or age)
        # Actor calls past their actor's itemizing rate, counted, not listed:
        # (actor id hex, Class.method) -> {"FINISHED": n, "FAILED": m}.
        self.counted: dict = {}
        self.counted_total = 0
        self.spilled = 0              # tasks written to disk
        self.on_end = None            # callable(state, name, attempt): a final state (metrics)
        self._spill_batch = max(1, min(SPILL_BATCH, self.memory_limit // 10))
        # MESHRAY_TASK_EVENTS=0 turns recording finished tasks off (as Ray's
        # RAY_task_events_report_interval_ms=0): what the recording costs is
        # measured against it; live tasks are still listed.
        self.enabled = os.environ.get("MESHRAY_TASK_EVENTS", "1") != "0"

    # ------------------------------------------------------------ recording
    def finished(self, task, failed: bool, error: BaseException | None = None) -> None:
        """`task` finished here: keep its record (a task a peer ran is the peer's)."""
        story = task.story
        if not self.enabled or (story and story[-1][0] is _SPILLED):
            return
        now = self._clock()
        state = "FAILED" if failed else "FINISHED"
        spec = task.spec
        worker_id, pid = task.ran_on
        # A tuple of plain values (and tuples of them): the collector stops
        # tracking it after one pass, so thousands kept cost no GC time. Its
        # events are kept as the moves' Ray names and their stamps (C-level
        # copies) and assembled only if the record is read; the disk keeps
        # main times only.
        record = (spec.task_id, spec.attempt, spec.name, spec.job_id, spec.actor_id,
                  spec.parent_task_id, task.sched_class[1],
                  "ACTOR_CREATION_TASK" if spec.actor_creation else "NORMAL_TASK", state,
                  worker_id, pid, error_type_of(error) if failed else None,
                  str(error)[:2000] if failed and error is not None else None,
                  task.created_at, task.started_wall, now,
                  (_UNNAMED, _move_names(story), tuple(task.stamps)), None,
                  getattr(task.owner, "node_hex", None), task.pg_hex or None)
        if self.on_end is not None:
            self.on_end(state, spec.name, spec.attempt)
        self._finished.pop(spec.task_id, None)     # run again from lineage: the new run
        self._keep(spec.task_id, record)

    def _keep(self, task_id: bytes, record: list) -> None:
        self._finished[task_id] = record
        if len(self._finished) >= self.memory_limit + self._spill_batch:
            oldest = [self._finished.popitem(last=False)[1] for _ in range(self._spill_batch)]
            self._spill(oldest)

    def actor_calls(self, worker_id: bytes, pid: int, actor_id: bytes, report) -> None:
        """An actor's report of its method calls (core/actor_task_events.py; columns
        checked by node/request_rules.py)."""
        if not self.enabled:
            return
        running = []
        task_ids, job_ids, parents = report.task_ids, report.job_ids, report.parent_task_ids
        names = report.names
        for i, (index, attempt, received, finished, failed) in enumerate(zip(
                report.name_index, report.attempts, report.received, report.finished,
                report.failed)):
            task_id = task_ids[16 * i:16 * i + 16]
            parent = parents[16 * i:16 * i + 16]
            job = job_ids[8 * i:8 * i + 8]
            record = self._actor_call(
                task_id, attempt, names[index], job.strip(b"\0") and job,
                parent.strip(b"\0") and parent, received, finished, failed, worker_id, pid,
                actor_id)
            if finished:
                self._finished.pop(task_id, None)
                self._keep(task_id, record)
            else:
                running.append(record)
        self._actor_running[worker_id] = running
        if report.counted_finished or report.counted_failed:
            actor_hex = actor_id.hex()
            for name, done, failed in zip(names, report.counted_finished or
                                          [0] * len(names), report.counted_failed or
                                          [0] * len(names)):
                if done or failed:
                    counts = self.counted.setdefault((actor_hex, name),
                                                     {"FINISHED": 0, "FAILED": 0})
                    counts["FINISHED"] += done
                    counts["FAILED"] += failed
                    self.counted_total += done + failed

    def counted_summary(self) -> dict:
        """The counted actor calls as a task summary (state_queries.summarize's shape)."""
        summary: dict = {}
        for (_actor, name), counts in self.counted.items():
            entry = summary.setdefault(name, {"type": "ACTOR_TASK", "state_counts": {}})
            for state, number in counts.items():
                if number:
                    entry["state_counts"][state] = entry["state_counts"].get(state, 0) + number
        return summary

    @staticmethod
    def _actor_call(task_id, attempt, name, job, parent, received, finished, failed,
                    worker_id, pid, actor_id, kind: str = "ACTOR_TASK") -> tuple:
        """The record of a call a worker reports (an actor's method call, or --
        `kind` NORMAL_TASK -- a task pushed to it on a lease); `finished` 0: running."""
        if finished:
            state = "FAILED" if failed else "FINISHED"
            end, events = finished, (("RUNNING", received), (state, finished))
        else:
            state, end, events = "RUNNING", None, (("RUNNING", received),)
        return (task_id, attempt, name, job, actor_id, parent, None, kind, state,
                worker_id, pid, "TASK_EXECUTION_EXCEPTION" if failed else None, None,
                received, received, end, events, None, None, None)

    def leased_task(self, worker_id: bytes, pid: int, msg, wall: float) -> None:
        """A leased worker's pushed task started or ended (`LeasedTask`): it is
        recorded as the node's own tasks are, and its end counts in the metrics."""
        if not self.enabled:
            return
        task_id = msg.task_id
        if not msg.finished:
            self._leased_running[task_id] = self._actor_call(
                task_id, msg.attempt, msg.name, msg.job_id, msg.parent_task_id, wall, 0.0,
                False, worker_id, pid, None, kind="NORMAL_TASK")
            return
        started = self._leased_running.pop(task_id, None)
        record = self._actor_call(
            task_id, msg.attempt, msg.name, msg.job_id, msg.parent_task_id,
            started[START] if started is not None else wall, wall, msg.failed, worker_id, pid,
            None, kind="NORMAL_TASK")
        if self.on_end is not None:
            self.on_end(record[STATE], msg.name, msg.attempt)
        self._finished.pop(task_id, None)
        self._keep(task_id, record)

    def worker_gone(self, worker_id: bytes) -> None:
        """Its actor's running calls, or the pushed task it ran, end with it
        (their callers get the error; a pushed task's holder retries it)."""
        self._actor_running.pop(worker_id, None)
        for task_id, record in list(self._leased_running.items()):
            if record[WORKER] == worker_id:
                del self._leased_running[task_id]

    # ------------------------------------------------------------ reading a record
    @staticmethod
    def _raw(record: list) -> list:
        """A record as JSON-able values, cheaply (what goes to disk); `_dict` formats it."""
        return [record[TID].hex(), record[ATTEMPT], record[NAME], record[STATE],
                record[JOB].hex(), _hex_or_none(record[ACTOR]), record[KIND],
                record[PARENT].hex(), _hex_or_none(record[WORKER]), record[PID],
                record[ERROR_TYPE], record[ERROR_MESSAGE], record[REQUEST], record[PG],
                record[CREATED], record[START], record[END], _named_events(record),
                record[SPILLED_TO], record[SPILLED_FROM]]

    def _dict(self, raw: list) -> dict:
        """A raw record formatted with Ray's field names."""
        (task_id, attempt, name, state, job, actor, kind, parent, worker, pid, error_type,
         error_message, request, pg, created, start, end, events, spilled_to,
         spilled_from) = raw
        return {
            "task_id": task_id, "attempt_number": attempt, "name": name, "state": state,
            "job_id": job, "actor_id": actor, "type": kind, "func_or_class_name": name,
            "parent_task_id": parent, "node_id": self.node_hex, "worker_id": worker,
            "worker_pid": pid, "error_type": error_type, "error_message": error_message,
            "language": "PYTHON", "required_resources": dict(request or ()),
            "placement_group_id": pg, "creation_time_ms": _ms(created),
            "start_time_ms": _ms_or_none(start), "end_time_ms": _ms_or_none(end),
            "events": [(event_state, _ms(when)) for event_state, when in events],
            "spilled_to": spilled_to, "spilled_from": spilled_from,
        }

    # ------------------------------------------------------------ disk
    def _spill(self, records: list) -> None:
        """Write finished records to disk, a batch a line, column by column (one
        JSON object: cheap to write, read back by `_batch_rows`)."""
        if self._spill_dir is None:
            self.dropped += len(records)
            return
        cols = list(zip(*records))
        ends = [end for end in cols[END] if end]
        batch = {
            "n": len(records), "ids": b"".join(cols[TID]).hex(),
            "jobs": b"".join([job.ljust(8, b"\0") for job in cols[JOB]]).hex(),
            "actors": b"".join([(a or b"").ljust(16, b"\0") for a in cols[ACTOR]]).hex(),
            "parents": b"".join([(p or b"").ljust(16, b"\0") for p in cols[PARENT]]).hex(),
            "workers": b"".join([(w or b"").ljust(16, b"\0") for w in cols[WORKER]]).hex(),
            "attempt": cols[ATTEMPT], "name": cols[NAME], "request": cols[REQUEST],
            "kind": cols[KIND], "state": cols[STATE], "pid": cols[PID],
            "error_type": cols[ERROR_TYPE], "error_message": cols[ERROR_MESSAGE],
            "created": cols[CREATED], "start": cols[START], "end": cols[END],
            "spilled_from": cols[SPILLED_FROM], "pg": cols[PG],
        }
        data = (json.dumps(batch, separators=(",", ":")) + "\n").encode()
        try:
            if self._segment is None or self._segments[-1][1] + len(data) > SEGMENT_BYTES:
                self._open_segment()
            self._segment.write(data)
            self._segment.flush()
        except OSError:
            self.dropped += len(records)
            return
        segment = self._segments[-1]
        segment[1] += len(data)
        segment[2] = max(segment[2], _ms(max(ends)) if ends else 0)
        segment[3] += len(records)
        self.spilled += len(records)
        self._trim()

    @staticmethod
    def _batch_rows(batch: dict):
        """The raw records (`_raw`'s shape) of one spilled batch."""
        ids, jobs = batch["ids"], batch["jobs"]
        actors, parents, workers = batch["actors"], batch["parents"], batch["workers"]

        def field(text: str, i: int, width: int):
            value = text[2 * width * i:2 * width * (i + 1)]
            return None if value.strip("0") == "" else value

        for i in range(int(batch["n"])):
            created, start, end, state = (batch["created"][i], batch["start"][i],
                                          batch["end"][i], batch["state"][i])
            # On disk a record keeps its main times only: created, began, ended.
            events = [("PENDING_NODE_ASSIGNMENT", created)]
            if start is not None:
                events.append(("RUNNING", start))
            events.append((state, end))
            yield [ids[32 * i:32 * i + 32], batch["attempt"][i], batch["name"][i], state,
                   field(jobs, i, 8) or "", field(actors, i, 16), batch["kind"][i],
                   field(parents, i, 16) or "", field(workers, i, 16), batch["pid"][i],
                   batch["error_type"][i], batch["error_message"][i], batch["request"][i],
                   batch["pg"][i], created, start, end, events, None, batch["spilled_from"][i]]

    def _open_segment(self) -> None:
        if self._segment is not None:
            self._segment.close()
        os.makedirs(self._spill_dir, mode=0o700, exist_ok=True)
        path = os.path.join(self._spill_dir, f"segment-{self._next_segment:06d}.jsonl")
        self._next_segment += 1
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        self._segment = os.fdopen(fd, "ab")
        self._segments.append([path, 0, 0, 0])   # path, bytes, newest end, records

    def _trim(self) -> None:
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
        """Every record this node answers for, as dicts: on disk (oldest first),
        then in memory. A task that went to a peer is left out: the peer
        answers for it."""
        if self._segment is not None:
            self._segment.flush()
        for path, _size, _newest, _count in list(self._segments):
            try:
                with open(path, "rb") as handle:
                    for line in handle:
                        try:
                            rows = list(self._batch_rows(json.loads(line)))
                        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                            continue      # a line cut short by a crash, or not ours
                        for row in rows:
                            try:
                                yield self._dict(row)
                            except (TypeError, ValueError):
                                continue  # not a record this node wrote

            except OSError:
                continue
        live = [_live_record(task) for task in self._live_tasks()
                if task.state is not _SPILLED]
        for record in [*self._finished.values(), *(r for running in
                                                   list(self._actor_running.values())
                                                   for r in running),
                       *list(self._leased_running.values()), *live]:
            yield self._dict(self._raw(record))

    def live_states(self):
        """(state, name, attempt) of each task not finished yet that this node answers
        for, pushed tasks running on its leased workers included."""
        for task in self._live_tasks():
            if task.state is not _SPILLED and task.state is not _DONE:
                yield _ray_state(task), task.spec.name, task.spec.attempt
        for record in list(self._leased_running.values()):
            yield "RUNNING", record[2], record[1]

    def stats(self) -> dict:
        return {"live": sum(1 for _ in self._live_tasks()),
                "finished_in_memory": len(self._finished),
                "spilled": self.spilled, "dropped": self.dropped,
                "counted": self.counted_total,
                "disk_bytes": sum(s[1] for s in self._segments)}
