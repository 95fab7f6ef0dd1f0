"""A local process's session with its node, and which workers an environment may use.

A driver or worker opens one bidirectional stream to its node; the node
keeps a `Connection` for it: who it is (its role, worker and job ids, pid),
the queue its events leave by, and what it reserved in the store and has
not sealed (given back if it goes). Workers are pooled by an environment
key: tasks whose env vars hash alike may share a worker.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field

from meshray.node.worker_pool import WorkerProcess
from meshray.rpc import strict
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["Connection", "DEFAULT_ENV_KEY", "env_key_for"]

DEFAULT_ENV_KEY = "default"


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

    def send(self, event: pb.ServerEvent) -> None:
        if not self.closed:
            self.outbox.put_nowait(event)


def env_key_for(env_vars: dict) -> str:
    if not env_vars:
        return DEFAULT_ENV_KEY
    blob = json.dumps(env_vars, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
