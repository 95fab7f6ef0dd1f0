"""A node's bounded log of the lifecycle moves it made, with wall-clock times.

Every task and actor move on a node goes through one writer
(:func:`meshray.node.task_lifecycle.move`, :func:`meshray.node.actors.apply`);
each also lands here, so a node can say what it did lately without a
debugger: ``meshray debug dump-events`` writes it, and an illegal move's error
carries its tail. It is also the raw material for task events in an
observability API.

Bounded (a ring of ``capacity`` entries, 10,000 by default or
``MESHRAY_EVENT_LOG_SIZE``) so a busy node's memory does not grow with its
history; at ~150 bytes an entry the default costs about 1.5 MB. Times are
read when an entry is recorded: the log is the shell around the lifecycle
tables, which themselves read no clock.
"""
from __future__ import annotations

import time
from collections import deque

from meshray.common.env import positive_env

__all__ = ["EventLog", "DEFAULT_CAPACITY"]

DEFAULT_CAPACITY = 10_000


def _capacity_from_env() -> int:
    return positive_env("MESHRAY_EVENT_LOG_SIZE", DEFAULT_CAPACITY,
                        expected="a positive whole number of entries")


class EventLog:
    def __init__(self, capacity: int | None = None, clock=time.time):
        self._entries: deque = deque(maxlen=capacity or _capacity_from_env())
        self._clock = clock
        self.recorded = 0          # ever, including entries the ring has dropped

    @property
    def capacity(self) -> int:
        return self._entries.maxlen

    def record(self, kind: str, ident: bytes, old, new, cause: str) -> None:
        # States are kept as given and named only when read: recording runs for
        # every move on a node's hot path, reading almost never.
        self._entries.append((self._clock(), kind, ident, old, new, cause))
        self.recorded += 1

    def task_moved(self, task, old, new, cause: str) -> None:
        """A task's move: logged here, and its time stamped on the task (its
        task events read the stamps beside its story)."""
        now = self._clock()
        self._entries.append((now, "task", task.task_id, old, new, cause))
        self.recorded += 1
        task.stamps.append(now)

    def handled(self, event) -> None:
        """An event the node's state machine handled (meshray/node/state): its
        kind and the task (or worker, or object) it is about; what it changed follows as
        the moves it made."""
        task = getattr(event, "task", None)
        if task is not None:
            ident = task.task_id
        elif getattr(event, "worker", None) is not None:
            ident = event.worker.worker_id
        elif getattr(event, "object_ids", None):
            ident = event.object_ids[0]
        elif getattr(event, "value", None) is not None:
            ident = event.value.object_id
        else:
            ident = b""
        self._entries.append((self._clock(), "event", ident, "", type(event).__name__, ""))
        self.recorded += 1

    def tail(self, count: int | None = None) -> list[dict]:
        """The last `count` entries (all when None), oldest first, as plain dicts."""
        entries = list(self._entries)
        if count is not None:
            entries = entries[-count:] if count > 0 else []
        return [{"time": when, "kind": kind, "id": ident.hex(), "from": str(old),
                 "to": str(new), "cause": cause} for when, kind, ident, old, new, cause in entries]

    def format_tail(self, count: int = 20) -> str:
        lines = [f"  {time.strftime('%H:%M:%S', time.localtime(e['time']))}"
                 f".{int(e['time'] * 1000) % 1000:03d} {e['kind']} {e['id'][:16]} "
                 + (e['to'] if e['kind'] == "event" else f"{e['from']} -> {e['to']}: {e['cause']}")
                 for e in self.tail(count)]
        return "\n".join(lines) or "  (empty)"
