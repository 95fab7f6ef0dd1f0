"""Worker output to the drivers of its job, on this node or the node the job came from.

A line a worker prints goes to the drivers of the task's job connected to
this node, prefixed as Ray prints it: ``(name pid=N)``. When the job's driver
is elsewhere -- the task was spilled here from its node -- the line goes to
that node (``PeerEvent.logs``, batched per loop turn) with the prefix
``(name pid=N, ip=HOST)``, and that node hands it to its drivers of the job.
Which node a job came from is learnt from the tasks peers spill here.

(The files are written apart from this, by the worker pool: node/log_files.py.)
"""
from __future__ import annotations

import asyncio

from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["LogStreams", "MAX_JOB_ORIGINS"]

# Jobs remembered as coming from a peer (oldest forgotten first).
MAX_JOB_ORIGINS = 10_000


class LogStreams:
    """Composed into the daemon with what it reads: its session connections, a
    way to send a peer an event, and the host it advertises."""

    def __init__(self, node_hex: str, conns: dict, send_peer, host):
        self.node_hex = node_hex
        self.conns = conns                          # the daemon's: conn id -> Connection
        self._send_peer = send_peer                 # callable(node hex, pb.PeerEvent)
        self._host = host                           # callable() -> advertised host
        self.job_origins: dict[str, str] = {}      # job hex -> node that spilled its tasks here
        self._outgoing_logs: dict[tuple, list] = {}  # (node hex, job hex) -> lines to send
        self._log_ip = ""

    def note_job_origin(self, job_hex: str, node_hex: str) -> None:
        self.job_origins.pop(job_hex, None)
        self.job_origins[job_hex] = node_hex
        while len(self.job_origins) > MAX_JOB_ORIGINS:
            self.job_origins.pop(next(iter(self.job_origins)))

    def worker_output(self, worker, line: str, is_err: bool) -> None:
        # Named as Ray names them: an actor's lines by its class, a task's by its
        # function (a task's default name is "module.qualname").
        name = (worker.actor.options.get("class_name") if worker.actor is not None else None) \
            or (worker.task_name or "worker").rsplit(".", 1)[-1]
        job_hex = worker.job_hex
        log_line = pb.LogLine(prefix=f"({name} pid={worker.pid})", text=line, is_err=is_err)
        if self.deliver(job_hex, [log_line]) or not job_hex:
            return
        origin = self.job_origins.get(job_hex)
        if origin is None or origin == self.node_hex:
            return
        if not self._log_ip:
            self._log_ip = self._host()
        key = (origin, job_hex)
        if not self._outgoing_logs:
            asyncio.get_running_loop().call_soon(self._send_logs)
        self._outgoing_logs.setdefault(key, []).append(pb.LogLine(
            prefix=f"({name} pid={worker.pid}, ip={self._log_ip})", text=line, is_err=is_err))

    def _send_logs(self) -> None:
        outgoing, self._outgoing_logs = self._outgoing_logs, {}
        for (node_hex, job_hex), lines in outgoing.items():
            self._send_peer(node_hex, pb.PeerEvent(logs=pb.LogBatch(
                lines=lines, job_id=bytes.fromhex(job_hex))))

    def deliver(self, job_hex: str, lines: list) -> bool:
        """Lines to this node's drivers of `job_hex` (all drivers when it is unknown).

        True when a driver of the job is connected here (even one that asked
        not to get worker output): then no other node's driver wants them.
        """
        found = False
        for conn in self.conns.values():
            if conn.role != "driver" or (job_hex and conn.job_id.hex() != job_hex):
                continue
            found = True
            if conn.log_to_driver:
                conn.send(pb.ServerEvent(logs=pb.LogBatch(lines=lines)))
        return found

    def on_peer_logs(self, origin: str, msg: pb.LogBatch) -> None:
        """A peer's worker output for a job whose driver may be connected here."""
        if msg.job_id:
            self.deliver(msg.job_id.hex(), list(msg.lines))
