"""Worker processes of one node: start, track, reap.

Workers are pooled by environment key (a hash of their runtime environment
and device assignment): a task only ever runs in a worker started for its own
environment. A worker's stdout/stderr come back through pipes so the daemon
can forward lines to the driver that owns the running task, and write them to
the worker's log files (node/log_files.py) -- kept after the worker exits.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from meshray import security
from meshray.common.fence import FENCE_ENV
from meshray.common.worker_output import parse_context_line
from meshray.common.worker_socket import worker_socket_path
from meshray.node.log_files import section_header, worker_log_name

__all__ = ["WorkerProcess", "WorkerPool", "describe_exit", "wait_for_exit"]

log = logging.getLogger(__name__)

# A line longer than this without a newline (a progress bar redrawn with \r)
# is passed on in pieces rather than held in memory until the newline.
MAX_PARTIAL_LINE = 64 << 10


def describe_exit(returncode: int | None) -> str:
    """How a process ended, from Popen's returncode (negative: the signal)."""
    if returncode is None:
        return "its connection closed but it did not exit, so the node killed it"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-returncode} ({name})"
    return f"exited with code {returncode}"


async def wait_for_exit(process: subprocess.Popen, timeout: float) -> int | None:
    """The process's exit status once it has one, or None after `timeout` seconds.

    A worker's session stream closes while it is still exiting (sockets close
    before the exit status exists), so the status is worth a short wait.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.005
    while process.poll() is None and loop.time() < deadline:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)
    return process.poll()


@dataclass
class WorkerProcess:
    worker_id: bytes
    env_key: str
    process: subprocess.Popen
    started_at: float = field(default_factory=time.monotonic)
    conn: object = None              # the daemon's Connection once it says hello
    current_task: object = None      # TaskRecord it runs
    pipeline: deque = field(default_factory=deque)   # short tasks sent to run next
    functions_sent: set = field(default_factory=set)
    idle_since: float = 0.0
    actor: object = None             # its ActorEntry
    lease: object = None             # the worker lease its holder pushes tasks under
    leased_task: object = None       # lease_service.LeasedRun: the pushed task it runs now
    call_address: str = ""           # where a lease's holder reaches it (its hello says)
    resolved_env: object = None      # runtime env pinned in the node's cache while it lives
    job_hex: str = ""
    task_name: str = ""
    log_names: tuple = ()            # its (stdout, stderr) log file names
    kill_error: object = None        # what its task fails with when the node killed it on purpose
    oom_retry_in: float | None = None  # killed for memory: its task is retried after this delay

    @property
    def pid(self) -> int:
        return self.process.pid


class WorkerPool:
    """Tracks worker processes; the daemon decides when to start or stop one."""

    def __init__(self, *, daemon_address: str, token: str | None, session_dir: str,
                 on_output, node_host: str = "127.0.0.1", advertise_host: str = "127.0.0.1",
                 fence_path: str = "", log_writer=None):
        self._fence_path = fence_path
        self._log_writer = log_writer        # node/log_files.LogWriter, or None: no files
        self._node_host = node_host
        self._advertise_host = advertise_host
        self._daemon_address = daemon_address
        self._token = token
        self._session_dir = session_dir
        self._on_output = on_output          # (worker, line, is_err) -> None
        self.by_id: dict[bytes, WorkerProcess] = {}
        self.idle: dict[str, list[WorkerProcess]] = {}
        self.starting: dict[str, int] = {}
        self._exited: list[subprocess.Popen] = []   # forgotten, still to be reaped
        self.on_forget = None                        # (worker) -> None, releases its env

    def start(self, worker_id: bytes, env_key: str, extra_env: dict[str, str], *,
              python: str | None = None, cwd: str | None = None) -> WorkerProcess:
        # No token in a worker's environment (task code and every process it
        # starts would inherit it): it arrives on a pipe the worker reads once.
        env = security.environment_without_token({**os.environ, **extra_env})
        env["MESHRAY_DAEMON_ADDRESS"] = self._daemon_address
        env["MESHRAY_WORKER_ID"] = worker_id.hex()
        env["MESHRAY_SESSION_DIR"] = self._session_dir
        env["PYTHONUNBUFFERED"] = "1"
        env["MESHRAY_NODE_HOST"] = self._node_host            # actor servers bind here
        env["MESHRAY_ADVERTISE_HOST"] = self._advertise_host  # and are dialled here
        if self._fence_path:
            env[FENCE_ENV] = self._fence_path   # actors refuse calls once it lapses
        token_fd = security.token_pipe(self._token) if self._token else None
        if token_fd is not None:
            env[security.TOKEN_FD_ENV] = str(token_fd)
        try:
            process = subprocess.Popen(
                [python or sys.executable, "-m", "meshray.core.worker_main"],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, close_fds=True, cwd=cwd,
                pass_fds=() if token_fd is None else (token_fd,),
            )
        finally:
            if token_fd is not None:
                os.close(token_fd)
        worker = WorkerProcess(worker_id, env_key, process)
        if self._log_writer is not None:
            worker.log_names = tuple(worker_log_name(worker_id.hex(), process.pid, suffix)
                                     for suffix in ("out", "err"))
            for name in worker.log_names:
                self._log_writer.append(name, b"")    # the files exist from the start
        self.by_id[worker_id] = worker
        self.starting[env_key] = self.starting.get(env_key, 0) + 1
        loop = asyncio.get_running_loop()
        for stream, is_err in ((process.stdout, False), (process.stderr, True)):
            os.set_blocking(stream.fileno(), False)
            loop.add_reader(stream.fileno(), self._read_output, worker, stream, is_err)
        return worker

    def drain_output(self, worker: WorkerProcess) -> None:
        """Read and pass on everything the worker's pipes hold now."""
        for stream, is_err in ((worker.process.stdout, False), (worker.process.stderr, True)):
            if stream is not None and not stream.closed:
                while self._read_output(worker, stream, is_err):
                    pass

    def _read_output(self, worker: WorkerProcess, stream, is_err: bool) -> bool:
        """Take what the pipe holds now; False once there is nothing (more) to read."""
        try:
            data = stream.read()
        except (BlockingIOError, ValueError):
            return False
        if data is None:
            return False
        if not data:
            self._stream_ended(worker, stream, is_err)
            return False
        buffered = getattr(stream, "_meshray_partial", b"") + data
        *lines, rest = buffered.split(b"\n")
        if len(rest) > MAX_PARTIAL_LINE:
            lines.append(rest)
            rest = b""
        stream._meshray_partial = rest
        self._emit(worker, lines, is_err)
        return True

    def _emit(self, worker: WorkerProcess, lines: list, is_err: bool) -> None:
        """Complete lines of output: to the worker's log file and to the drivers."""
        to_file = []
        for raw in lines:
            line = raw.decode(errors="replace")
            context = parse_context_line(line)
            if context is not None:
                worker.job_hex, worker.task_name = context
                to_file.append(section_header(*context))
                continue
            to_file.append(raw + b"\n")
            self._on_output(worker, line, is_err)
        if self._log_writer is not None and worker.log_names and to_file:
            self._log_writer.append(worker.log_names[is_err], b"".join(to_file))

    def _stream_ended(self, worker: WorkerProcess, stream, is_err: bool) -> None:
        """The pipe closed (or the worker is forgotten): pass on the last partial line."""
        try:
            asyncio.get_running_loop().remove_reader(stream.fileno())
        except (ValueError, OSError):
            pass
        rest = getattr(stream, "_meshray_partial", b"")
        stream._meshray_partial = b""
        if rest:
            self._emit(worker, [rest], is_err)
        if self._log_writer is not None and worker.log_names:
            self._log_writer.finish(worker.log_names[is_err])

    def connected(self, worker: WorkerProcess) -> None:
        self.starting[worker.env_key] = max(0, self.starting.get(worker.env_key, 1) - 1)

    def push_idle(self, worker: WorkerProcess) -> None:
        worker.idle_since = time.monotonic()
        self.idle.setdefault(worker.env_key, []).append(worker)

    def pop_idle(self, env_key: str) -> WorkerProcess | None:
        workers = self.idle.get(env_key)
        while workers:
            worker = workers.pop()
            if worker.process.poll() is None and worker.conn is not None:
                return worker
        return None

    def reap(self) -> None:
        """Collect the exit status of forgotten workers so none stays a zombie."""
        self._exited = [process for process in self._exited if process.poll() is None]

    def forget(self, worker: WorkerProcess) -> None:
        if worker.resolved_env is not None and self.on_forget is not None:
            self.on_forget(worker)
            worker.resolved_env = None
        self._exited.append(worker.process)
        self.by_id.pop(worker.worker_id, None)
        workers = self.idle.get(worker.env_key)
        if workers and worker in workers:
            workers.remove(worker)
        if worker.conn is None:
            self.starting[worker.env_key] = max(0, self.starting.get(worker.env_key, 1) - 1)
        try:
            # Where it listened for a lease's holder (closed only if it exited cleanly).
            os.unlink(worker_socket_path(self._session_dir, worker.worker_id))
        except OSError:
            pass
        self._drain_output(worker)

    def _drain_output(self, worker: WorkerProcess) -> None:
        """What the worker wrote before it went is in the pipes: keep it, then
        stop reading (a child it left behind may hold the pipes open forever)."""
        for stream, is_err in ((worker.process.stdout, False), (worker.process.stderr, True)):
            for _ in range(64):
                if not self._read_output(worker, stream, is_err):
                    break
            self._stream_ended(worker, stream, is_err)

    def kill(self, worker: WorkerProcess, sig: int = signal.SIGKILL) -> None:
        if worker.process.poll() is None:
            try:
                os.kill(worker.pid, sig)
            except ProcessLookupError:
                pass

    def stop_all(self, timeout: float = 3.0) -> None:
        """Terminate every worker we started, by pid, and reap them."""
        workers = list(self.by_id.values())
        for worker in workers:
            self.kill(worker, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for worker in workers:
            try:
                worker.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(worker, signal.SIGKILL)
                worker.process.wait()
            for stream in (worker.process.stdout, worker.process.stderr):
                try:
                    stream.close()
                except OSError:
                    pass
