"""The method calls an actor runs, reported to its node for the state API.

Callers send method calls straight to the actor's process, so its node
never sees them; the actor reports them instead. On a call's path this costs
a dict insert when it arrives and a deque append when it is answered (no
lock, no message built); a thread turns them into one columnar report at
most once a second (at once past a few thousand calls), with the calls
finished since the last report and those running now. A call's start is
when the actor received it (time queued behind earlier calls included).

Each call is reported on its own up to MESHRAY_ACTOR_TASK_EVENTS_PER_S a
second (default 1,000); past that rate, calls are counted per method and
outcome instead: summaries stay exact, listings say how many were counted
rather than listed, and an actor serving tens of thousands of calls a second
does not spend its node's CPU on recording them one by one.

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
    def __init__(self, class_name: str, send, clock=time.time, enabled: bool = True):
        self._class_name = class_name
        self._send = send                  # callable(pb.ActorTaskEvents)
        self._clock = clock
        # task id -> (method, job id, parent task id, attempt, received)
        self._running: dict[bytes, tuple] = {}
        self._done: deque = deque()              # (task id, that tuple, finished, failed)
        self._reported_running = False
        self._per_s = _per_second()
        self._last_flush = clock()
        self._wake = threading.Event()
        self._closed = False
        if not enabled:                 # MESHRAY_TASK_EVENTS=0: nothing recorded
            self.received = self.answered = lambda batch: None
            return
        threading.Thread(target=self._flush_loop, name="meshray-actor-task-events",
                         daemon=True).start()

    def received(self, calls) -> None:
        """A batch of calls arrived (meshray's own `__ray_*` calls are not tasks)."""
        now = self._clock()
        running = self._running
        for spec in calls:
            method = spec.method_name
            if not method.startswith("__ray_"):
                # Fields, not the spec: holding a second of calls' specs (and
                # their argument bytes) costs more than copying four fields.
                running[spec.task_id] = (method, spec.job_id, spec.parent_task_id,
                                         spec.attempt, now)

    def answered(self, results) -> None:
        """A batch of calls was answered."""
        now = self._clock()
        pop, append = self._running.pop, self._done.append
        for result in results:
            task_id = result.task_id
            entry = pop(task_id, None)
            if entry is not None:
                append((task_id, entry, now, result.failed))

    def flush(self) -> None:
        now = self._clock()
        budget = min(FLUSH_AT, max(1, int(self._per_s * max(0.0, now - self._last_flush))))
        self._last_flush = now
        finished, counted = [], {}
        while self._done:
            call = self._done.popleft()
            if len(finished) < budget:
                finished.append(call)
            else:                  # past the rate: counted, not itemized
                key = (call[1][0], call[3])
                counted[key] = counted.get(key, 0) + 1
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
