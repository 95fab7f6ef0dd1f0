"""The daemon's side of worker leases: questions in, the state machine's
verdicts out (``node/state/lease_life.py`` decides; nothing here does).

A local process asks ``lease_worker`` with the resources and environment
variables of the task it is about to submit; the answer is a lease (its id
and the worker's call address) or a refusal with the reason. It gives the
lease back with ``return_lease`` (``kill``: the worker must not live on --
a forced cancel, or a link that broke with a task on it), and asks
``lease_end`` how its worker ended when a pushed task's error must say so.
No lease question is answered for a peer: a lease is a local process's only.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from meshray import exceptions
from meshray.common import ids
from meshray.node.session import env_key_for
from meshray.node.tasks import sched_class_of
from meshray.node.state import messages as m
from meshray.node.state.lease_life import Lease, LeaseState
from meshray.node.worker_pool import describe_exit, wait_for_exit
from meshray.rpc import strict
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.scheduler.resources import ResourceSet

__all__ = ["LeaseService", "LEASE_QUESTIONS"]

LEASE_QUESTIONS = frozenset({"lease_worker", "return_lease", "lease_end"})
WORKER_EXIT_WAIT_S = 2.0      # how long lease_end waits for the worker's exit status
_MAX_WHY = 512


def _resources(payload: dict) -> dict:
    resources = payload.get("resources")
    if not isinstance(resources, dict) or not resources or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            and 0 <= v < 1e12 for k, v in resources.items()):
        raise ValueError(f"resources={resources!r}: expected a non-empty map of resource "
                         "names to amounts >= 0")
    return resources


def _env_vars(payload: dict) -> dict:
    env_vars = payload.get("env_vars") or {}
    if not isinstance(env_vars, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()):
        raise ValueError(f"env_vars={env_vars!r}: expected a map of strings to strings")
    return env_vars


@dataclass(frozen=True)
class LeasedRun:
    """The task a leased worker says it runs (its `leased_task` event)."""
    task_id: bytes
    name: str
    max_retries: int
    attempt: int
    started_at: float          # monotonic, when the node heard of it


def _lease_id(payload: dict) -> bytes:
    lease_hex = payload.get("lease_id")
    try:
        return bytes.fromhex(lease_hex)
    except (TypeError, ValueError):
        raise ValueError(f"lease_id={lease_hex!r}: expected a lease id in hex") from None


class LeaseService:
    def __init__(self, node):
        self._node = node

    def questions(self) -> dict:
        return {"lease_worker": self.ask_lease, "return_lease": self.ask_return,
                "lease_end": self.ask_end}

    def instructions(self) -> dict:
        return {m.GrantLease: self._grant, m.EndLease: self._end}

    # ------------------------------------------------------------ questions
    async def ask_lease(self, conn, payload: dict) -> dict:
        resources = _resources(payload)
        env_vars = _env_vars(payload)
        if conn.role not in ("driver", "worker") or not conn.worker_id:
            raise ValueError("lease_worker: only a process that said hello may hold a lease")
        env_key = env_key_for(env_vars)
        lease = Lease(lease_id=ids.new_id(), holder=conn,
                      hold=ResourceSet.from_dict(resources), worker_key=env_key,
                      sched_class=sched_class_of(env_key, resources),
                      requested_wall=time.time())
        node = self._node
        node.dispatch.handle(m.LeaseRequested(lease, time.monotonic(), time.time()))
        if lease.state is not LeaseState.GRANTED:
            return {"granted": False, "reason": lease.reason}
        worker = lease.worker
        return {"granted": True, "lease_id": lease.lease_id.hex(),
                "address": worker.call_address, "worker_id": worker.worker_id.hex(),
                "pid": worker.pid}

    async def ask_return(self, conn, payload: dict) -> dict:
        lease_id = _lease_id(payload)
        why = str(payload.get("why") or "")[:_MAX_WHY]
        node = self._node
        node.dispatch.handle(m.LeaseReturned(lease_id, conn.conn_id, bool(payload.get("kill")),
                                             why, time.monotonic(), time.time()))
        node.dispatch.schedule()      # what waited for its resources may start now
        return {}

    async def ask_end(self, conn, payload: dict) -> dict:
        """How the worker of the holder's lease ended -- "killed by signal 9
        (SIGKILL)" -- once its exit status is in (WORKER_EXIT_WAIT_S at most):
        for the error of a pushed task that had no retry left."""
        lease_id = _lease_id(payload)
        lease = self._node.dispatch.machine.lease_life.find(lease_id)
        if lease is None or lease.holder.conn_id != conn.conn_id or lease.worker is None:
            raise ValueError(f"lease_id={lease_id.hex()}: not a lease of this process")
        worker = lease.worker
        code = await wait_for_exit(worker.process, WORKER_EXIT_WAIT_S)
        answer = {"pid": worker.pid, "exit": describe_exit(code) if code is not None
                  else "still running after its link broke (killed now)"}
        error = worker.kill_error
        if isinstance(error, exceptions.OutOfMemoryError):
            # The memory monitor killed it: the holder fails or retries the
            # task as the node would its own (memory_monitor.py).
            answer["oom"] = {"message": error.message, "task_id": error.task_id,
                             "node_id": error.node_id, "worker_id": error.worker_id,
                             "memory_used": error.memory_used,
                             "memory_limit": error.memory_limit,
                             "threshold": error.threshold, "rss": error.rss}
            answer["retry_in"] = worker.oom_retry_in
        return answer

    def on_leased_task(self, conn, msg: pb.LeasedTask) -> None:
        """A leased worker's pushed task starts or ends (for the memory monitor)."""
        worker = conn.worker
        if worker is None:
            raise strict.Malformed("leased_task: only a worker runs pushed tasks")
        self._node.task_events.leased_task(worker.worker_id, worker.pid, msg, time.time())
        if msg.finished or worker.lease is None:
            if worker.leased_task is not None and worker.leased_task.task_id == msg.task_id:
                worker.leased_task = None
            return
        worker.leased_task = LeasedRun(msg.task_id, msg.name, msg.max_retries, msg.attempt,
                                       time.monotonic())

    # ------------------------------------------------------------ instructions
    @staticmethod
    def _grant(ins: m.GrantLease) -> None:
        lease = ins.lease
        ins.worker.conn.send(pb.ServerEvent(lease=pb.LeaseChange(
            lease_id=lease.lease_id, holder_id=lease.holder.worker_id, granted=True)))

    @staticmethod
    def _end(ins: m.EndLease) -> None:
        conn = ins.worker.conn
        if conn is not None:
            conn.send(pb.ServerEvent(lease=pb.LeaseChange(lease_id=ins.lease.lease_id,
                                                          granted=False)))
