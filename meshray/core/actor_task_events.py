"""The method calls an actor runs, reported to its node for the state API.

Callers send method calls straight to the actor's process, so its node
never sees them; the actor reports them instead. A thread turns what was
recorded into one columnar report once a second, with the calls finished
since the last report and those running now. A call's start is when the
actor received it (time queued behind earlier calls included).

Each call is itemized up to MESHRAY_ACTOR_TASK_EVENTS_PER_S a second
(default 1,000, a token bucket holding at most one second's worth); past
that rate, calls are counted per method and outcome instead: summaries stay
exact, listings say how many were counted rather than listed. Which way a
call goes is decided when it arrives, so a counted call costs its serving
thread one dict insert then and one dict update when it is answered -- no
tuple, no queue, nothing for the report thread to walk -- and an actor
serving tens of thousands of calls a second spends next to nothing on
recording them. An itemized call costs a dict insert and a deque append
(no lock, no message built).

Only what the node accepts goes out (node/request_rules.py): a report it
refused would end this worker's session.
"""
from __future__ import annotations

import threading
import time
from collections import deque

from meshray.common.env import positive_env
from meshray.common.ids import TASK_ID_LEN
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.rpc.rules import JOB_ID_LEN

__all__ = ["ActorTaskRecorder"]

FLUSH_INTERVAL_S = 1.0
FLUSH_AT = 5000          # calls per report at most (the node's limit is higher)
MAX_RUNNING_REPORTED = 1000
MAX_NAME = 1024
DEFAULT_PER_S = 1000
_NO_JOB = bytes(JOB_ID_LEN)
_NO_TASK = bytes(TASK_ID_LEN)


class ActorTaskRecorder:
    def __init__(self, class_name: str, send, clock=time.time, enabled: bool = True,
                 per_second: int | None = None, thread: bool = True):
        self._class_name = class_name
        self._send = send                  # callable(pb.ActorTaskEvents)
        self._clock = clock
        # Itemized: task id -> (method, job id, parent task id, attempt, received)
        self._running: dict[bytes, tuple] = {}
        self._done: deque = deque()              # (task id, that tuple, finished, failed)
        # Counted: task id -> method while it runs; (method, failed) -> calls answered.
        self._counting: dict[bytes, str] = {}
        self._counted: dict[tuple, int] = {}
        self._lock = threading.Lock()
        self._reported_running = False
        self._per_s = per_second or _per_second()
        self._tokens = float(self._per_s)       # calls that may be itemized now
        self._refilled = clock()
        self._wake = threading.Event()
        self._closed = False
        if not enabled:                 # MESHRAY_TASK_EVENTS=0: nothing recorded
            self.received = self.answered = lambda batch: None
            return
        if thread:
            threading.Thread(target=self._flush_loop, name="meshray-actor-task-events",
                             daemon=True).start()

    def received(self, calls) -> None:
        """A batch of calls arrived (meshray's own `__ray_*` calls are not tasks)."""
        now = self._clock()
        tokens = min(float(self._per_s), self._tokens + (now - self._refilled) * self._per_s)
        self._refilled = now
        running, counting = self._running, self._counting
        for spec in calls:
            method = spec.method_name
            if method.startswith("__ray_"):
                continue
            if tokens >= 1.0:
                tokens -= 1.0
                # Fields, not the spec: holding a second of calls' specs (and
                # their argument bytes) costs more than copying four fields.
                running[spec.task_id] = (method, spec.job_id, spec.parent_task_id,
                                         spec.attempt, now)
            else:                          # past the rate: counted, not itemized
                counting[spec.task_id] = method
        self._tokens = tokens

    def answered(self, results) -> None:
        """A batch of calls was answered."""
        now = self._clock()
        pop, append, uncount = self._running.pop, self._done.append, self._counting.pop
        batch: dict = {}
        for result in results:
            task_id = result.task_id
            entry = pop(task_id, None)
            if entry is not None:
                append((task_id, entry, now, result.failed))
                continue
            method = uncount(task_id, None)
            if method is not None:
                key = (method, result.failed)
                batch[key] = batch.get(key, 0) + 1
        if batch:
            # Serving threads and the report thread meet here: one lock per batch.
            with self._lock:
                counted = self._counted
                for key, number in batch.items():
                    counted[key] = counted.get(key, 0) + number

    def flush(self) -> None:
        finished = []
        while self._done and len(finished) < FLUSH_AT:
            finished.append(self._done.popleft())
        if self._done:
            self._wake.set()               # more than one report's worth: next one soon
        with self._lock:
            counted, self._counted = self._counted, {}
        running = list(self._running.items())[:MAX_RUNNING_REPORTED]
        if not finished and not counted and not running and not self._reported_running:
            return
        self._reported_running = bool(running)
        calls = finished + [(task_id, entry, 0.0, False) for task_id, entry in running]
        try:
            self._send(self._report(calls, counted))
        except Exception:  # noqa: BLE001 - the session is gone: nothing to report to
            pass

    def _report(self, calls: list, counted: dict) -> pb.ActorTaskEvents:
        names: dict = {}
        report = pb.ActorTaskEvents()
        task_ids, job_ids, parents = [], [], []
        name_index, attempts, received, finished, failed = [], [], [], [], []
        for task_id, (method, job, parent, attempt, at), done_at, did_fail in calls:
            task_ids.append(task_id)
            job_ids.append(job if len(job) == JOB_ID_LEN else _NO_JOB)
            parents.append(parent if len(parent) == TASK_ID_LEN else _NO_TASK)
            index = names.get(method)
            if index is None:
                index = names[method] = len(names)
            name_index.append(index)
            attempts.append(max(0, attempt))
            received.append(at)
            finished.append(done_at)
            failed.append(did_fail)
        for method, _failed in counted:
            names.setdefault(method, len(names))
        report.task_ids = b"".join(task_ids)   # call_rules: every id is TASK_ID_LEN bytes
        report.job_ids = b"".join(job_ids)
        report.parent_task_ids = b"".join(parents)
        report.names.extend(f"{self._class_name}.{method}"[:MAX_NAME] for method in names)
        report.name_index.extend(name_index)
        report.attempts.extend(attempts)
        report.received.extend(received)
        report.finished.extend(finished)
        report.failed.extend(failed)
        report.counted_finished.extend(counted.get((m, False), 0) for m in names)
        report.counted_failed.extend(counted.get((m, True), 0) for m in names)
        return report

    def _flush_loop(self) -> None:
        while not self._closed:
            self._wake.wait(FLUSH_INTERVAL_S)
            self._wake.clear()
            self.flush()

    def close(self) -> None:
        self._closed = True
        self._wake.set()


def _per_second() -> int:
    return positive_env("MESHRAY_ACTOR_TASK_EVENTS_PER_S", DEFAULT_PER_S,
                        expected="a whole number >= 1 (calls itemized per second per actor)")
