"""The method calls an actor runs, reported to its node for the state API.

Callers send method calls straight to the actor's process, so its node
never sees them; the actor reports them instead. Each call costs a dict
insert when it arrives and a list append when it is answered; a report
goes to the node at most once a second (and at once past a few thousand
calls), with the calls finished since the last report and the ones running
now. A call's start is when the actor received it (time queued behind
earlier calls included).
"""
from __future__ import annotations

import threading
import time

from meshray.common.ids import TASK_ID_LEN
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.rpc.rules import JOB_ID_LEN

__all__ = ["ActorTaskRecorder"]

FLUSH_INTERVAL_S = 1.0
FLUSH_AT = 5000
MAX_RUNNING_REPORTED = 1000
MAX_NAME = 1024


class ActorTaskRecorder:
    def __init__(self, class_name: str, send, clock=time.time):
        self._class_name = class_name
        self._send = send                  # callable(pb.ActorTaskEvents)
        self._clock = clock
        self._lock = threading.Lock()
        self._running: dict[bytes, pb.ActorTaskEvent] = {}
        self._finished: list = []
        self._dirty = False
        self._wake = threading.Event()
        self._closed = False
        threading.Thread(target=self._flush_loop, name="meshray-actor-task-events",
                         daemon=True).start()

    def received(self, spec) -> None:
        if len(spec.task_id) != TASK_ID_LEN:
            return     # refused as malformed before it runs; nothing to report
        # Only what the node accepts (node/request_rules.py): a report it
        # refused would end this worker's session.
        event = pb.ActorTaskEvent(
            task_id=spec.task_id,
            name=f"{self._class_name}.{spec.method_name}"[:MAX_NAME],
            job_id=spec.job_id if len(spec.job_id) == JOB_ID_LEN else b"",
            attempt=max(0, spec.attempt), received=self._clock(),
            parent_task_id=spec.parent_task_id if len(spec.parent_task_id) == TASK_ID_LEN
            else b"")
        with self._lock:
            self._running[spec.task_id] = event
            self._dirty = True

    def answered(self, result: pb.TaskResult) -> None:
        with self._lock:
            event = self._running.pop(result.task_id, None)
            if event is None:
                return
            event.finished = self._clock()
            event.failed = result.failed
            self._finished.append(event)
            full = len(self._finished) >= FLUSH_AT
        if full:
            self._wake.set()

    def flush(self) -> None:
        with self._lock:
            if not self._dirty and not self._finished:
                return
            finished, self._finished = self._finished, []
            running = list(self._running.values())[:MAX_RUNNING_REPORTED]
            self._dirty = bool(self._running)
        # Reports stay under the node's per-message limit (request_rules.py).
        chunks = [finished[i:i + FLUSH_AT] for i in range(0, len(finished), FLUSH_AT)] or [[]]
        try:
            for index, chunk in enumerate(chunks):
                last = index == len(chunks) - 1
                self._send(pb.ActorTaskEvents(finished=chunk, running=running if last else ()))
        except Exception:  # noqa: BLE001 - the session is gone: nothing to report to
            pass

    def _flush_loop(self) -> None:
        while not self._closed:
            self._wake.wait(FLUSH_INTERVAL_S)
            self._wake.clear()
            self.flush()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
