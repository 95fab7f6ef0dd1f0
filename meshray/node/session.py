"""A local process's session with its node, and which workers an environment may use.

A driver or worker opens one session link to its node; the node keeps a
`Connection` for it: who it is (its role, worker and job ids, pid),
the queue its events leave by, and what it reserved in the store and has
not sealed (given back if it goes). Workers are pooled by an environment
key: tasks whose env vars hash alike may share a worker.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable

from meshray.node.worker_pool import WorkerProcess
from meshray.rpc import strict
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["Connection", "DEFAULT_ENV_KEY", "MAX_EVENTS_PER_BATCH", "env_key_for"]

DEFAULT_ENV_KEY = "default"
MAX_EVENTS_PER_BATCH = 2000       # events in one batch to a process


@dataclass(eq=False)
class Connection:
    conn_id: int
    outbox: asyncio.Queue
    role: str = ""
    worker_id: bytes = b""
    job_id: bytes = b""
    pid: int = 0
    namespace: str = ""
    log_to_driver: bool = True
    submission_id: str = ""                     # a job's driver: the job it runs (job API)
    worker: WorkerProcess | None = None
    closed: bool = False
    malformed: strict.Malformed | None = None   # ends the session with INVALID_ARGUMENT
    ended: tuple | None = None       # (status code, why): ends the session with that status
    drop_reply: bool = False         # chaos (failpoint node.connect=drop_reply)
    reserved: set = field(default_factory=set)  # store reservations it has not sealed yet
    # The session's writer (the daemon's): `parked` while it waits for events
    # with everything before written, `write_now` puts a batch on the link
    # without that task's hop, `congested` says the link has bytes unsent.
    # `on_send` tells the daemon this connection has events waiting.
    parked: bool = False
    ending: bool = False                        # the end of the session is queued
    write_now: Callable[[list], None] | None = None
    congested: Callable[[], bool] | None = None
    on_send: Callable[["Connection"], None] | None = None

    def send(self, event: pb.ServerEvent) -> None:
        if not self.closed:
            self.outbox.put_nowait(event)
            if self.on_send is not None:
                self.on_send(self)

    async def next_event(self):
        """The writer's wait for its next event, parked meanwhile (so
        `flush_now` may write for it); None when the session ends."""
        self.parked = True
        try:
            return await self.outbox.get()
        finally:
            self.parked = False

    def end(self) -> None:
        """Queue the end of the session: its writer stops after what is queued."""
        self.ending = True
        self.outbox.put_nowait(None)

    def flush_now(self) -> bool:
        """Write the waiting events now, from the caller, when the writer is
        parked and the link has nothing unsent: the same bytes in the same
        order the writer would send, one event-loop hop sooner. Otherwise
        (the writer busy, the link congested, the session ending, a chaos
        failpoint armed) the writer sends them. True when it wrote."""
        if (not self.parked or self.closed or self.ending or self.drop_reply
                or self.write_now is None or self.outbox.empty()
                or (self.congested is not None and self.congested())):
            return False
        events = []
        while not self.outbox.empty() and len(events) < MAX_EVENTS_PER_BATCH:
            events.append(self.outbox.get_nowait())
        self.write_now(events)
        return True


def env_key_for(env_vars: dict) -> str:
    if not env_vars:
        return DEFAULT_ENV_KEY
    blob = json.dumps(env_vars, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
