"""Hollow nodes: the real node daemon with simulated workers, many per process.

A hollow node is a `NodeDaemon` -- its task queue, placement, peer protocol,
object directory, placement-group duties and (run beside it by its host) its
etcd membership are the real code -- whose worker pool starts no processes.
A simulated worker is a session on the daemon like any worker's: it says
hello, receives `execute` events and answers each with a `TaskResult`
through the daemon's own client handler, so results travel the real result
path (to a local owner, or home to the peer that spilled the task). A task
"runs" for `task_s` seconds and returns a small fixed value; an actor's
creation returns at once and its worker keeps the actor's resources, as a
real one does; bundles are reserved by the real placement code.

What it cannot do: run user code, answer actor method calls (callers dial
an actor's own server, which a hollow actor does not have), or stream
generator items. Scale tests (meshray/scale/) use it to put hundreds of
members on one machine.
"""
from __future__ import annotations

import asyncio
import itertools
import pickle
import time

from meshray.node.daemon import NodeDaemon
from meshray.node.session import Connection
from meshray.node.worker_pool import WorkerPool, WorkerProcess
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["HollowNode", "HollowPool", "hollow_value", "HOLLOW_MARK"]

HOLLOW_MARK = "hollow"
# Above any pid_max Linux allows (2**22), so no real process ever has one:
# the daemon's checks on a worker's pid (its memory maps) find nothing.
_fake_pids = itertools.count(1 << 22)


def hollow_value(node_hex: str) -> tuple:
    """What every task run on hollow node `node_hex` returns."""
    return (HOLLOW_MARK, node_hex)


class SimulatedProcess:
    """Stands in for a worker's Popen: alive until killed."""

    def __init__(self):
        self.pid = next(_fake_pids)
        self.returncode = None

    def poll(self):
        return self.returncode


class HollowPool(WorkerPool):
    """A WorkerPool whose workers are coroutines on the daemon's loop."""

    def __init__(self, daemon: NodeDaemon, task_s: float, **options):
        super().__init__(**options)
        self._daemon = daemon
        self._task_s = task_s
        self._result = pickle.dumps(hollow_value(daemon.node_hex), protocol=5)
        self._none = pickle.dumps(None, protocol=5)
        self._conns: dict[bytes, Connection] = {}

    def start(self, worker_id: bytes, env_key: str, extra_env: dict, *,
              python: str | None = None, cwd: str | None = None) -> WorkerProcess:
        worker = WorkerProcess(worker_id, env_key, SimulatedProcess())
        self.by_id[worker_id] = worker
        self.starting[env_key] = self.starting.get(env_key, 0) + 1
        asyncio.get_running_loop().create_task(self._serve(worker))
        return worker

    async def _serve(self, worker: WorkerProcess) -> None:
        """One worker's session: hello, then answer each `execute` in turn."""
        daemon = self._daemon
        conn = Connection(next(daemon._conn_ids), asyncio.Queue())
        daemon.conns[conn.conn_id] = conn
        self._conns[worker.worker_id] = conn
        try:
            self._client_event(conn, pb.ClientEvent(hello=pb.Hello(
                role="worker", worker_id=worker.worker_id, pid=worker.pid)))
            while True:
                event = await conn.next_event()
                if event is None or worker.process.returncode is not None:
                    break
                if event.WhichOneof("kind") != "execute":
                    continue
                spec = event.execute.spec
                if self._task_s > 0 and not spec.actor_creation:
                    await asyncio.sleep(self._task_s)
                if worker.process.returncode is not None:
                    break
                self._client_event(conn, pb.ClientEvent(task_result=self._result_of(spec)))
        finally:
            conn.closed = True
            self._conns.pop(worker.worker_id, None)
            daemon._disconnected(conn)

    def _client_event(self, conn: Connection, event: pb.ClientEvent) -> None:
        """Handled as the daemon handles a batch from a worker's stream."""
        daemon = self._daemon
        daemon._handle(conn, event)
        daemon._batch_done()

    def _result_of(self, spec: pb.TaskSpec) -> pb.TaskResult:
        result = pb.TaskResult(task_id=spec.task_id)
        data = self._none if spec.actor_creation else self._result
        for object_id in NodeDaemon._return_ids(spec):
            result.returns.append(pb.ObjectValue(object_id=object_id, inline_data=data))
        if spec.actor_creation:
            result.actor_address = self._daemon.address
        return result

    def kill(self, worker: WorkerProcess, sig: int = 9) -> None:
        """The worker "dies": its session ends as a dead process's stream would."""
        if worker.process.returncode is None:
            worker.process.returncode = -sig
            conn = self._conns.get(worker.worker_id)
            if conn is not None:
                conn.end()

    def _drain_output(self, worker: WorkerProcess) -> None:
        return None          # no pipes

    def stop_all(self, timeout: float = 3.0) -> None:
        for worker in list(self.by_id.values()):
            worker.process.returncode = worker.process.returncode or -15


class HollowNode(NodeDaemon):
    """A NodeDaemon with simulated workers that also notes when it saw each peer die."""

    def __init__(self, config, task_s: float = 0.0):
        super().__init__(config)
        self.task_s = task_s
        self.deaths: dict[str, float] = {}    # peer node id hex -> wall time its death was seen
        self.peers.on_death = self._note_death

    def _make_pool(self, **options) -> WorkerPool:
        return HollowPool(self, self.task_s, **options)

    def _note_death(self, node_hex: str) -> None:
        self.deaths.setdefault(node_hex, time.time())

    async def crash(self, close_port: bool = True) -> None:
        """Stop as a killed process would, but leave the process running:
        the lease is no longer kept alive (nothing revoked) and the node's
        own loops end. With `close_port` its port closes too, so a peer
        that probes it is refused and revokes the lease at once
        (node/liveness.py); without, only the lease's expiry tells (a frozen
        or unreachable machine)."""
        self._stopping.set()
        await asyncio.get_running_loop().run_in_executor(None, self.membership.abandon)
        if close_port and self.server is not None:
            await self.server.stop(0)
