"""The job supervisor: a detached actor that runs one job's entrypoint.

Created by meshray/job_submission/launch.py with the entrypoint's resources,
so it lands on a node that has them. It runs the entrypoint shell command as
a child in a process group of its own, with the environment of the actor's
worker (the job's runtime_env: working dir, env vars, pip...) plus what makes
``meshray.init()`` / ``ray.init()`` inside the entrypoint join this cluster
through this node. Output goes to ``job-driver-<submission id>.log`` in the
node's logs dir, readable from any node (get_log).

Status changes go through the ``job_update`` question to this node, which
writes them by compare-and-swap (node/job_api.py): a supervisor whose job was
stopped before it started, or that belongs to an attempt the job has left,
is refused and runs nothing. A stop is seen by polling the record: the
process group gets SIGTERM, then SIGKILL after ``STOP_GRACE_S``.

The child is killed by the kernel when the thread that started it dies
(PR_SET_PDEATHSIG, set by a wrapper at the head of its command, never by a
``preexec_fn`` in the forked child of this threaded worker): if the
supervisor's worker is killed with its node, the entrypoint does not run on
unsupervised.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

from meshray.common.death_signal import death_signal_prefix
from meshray.common.file_tail import read_tail

__all__ = ["JobSupervisor", "STOP_GRACE_S", "entrypoint_env"]

STOP_GRACE_S = 3.0
POLL_S = 0.5
LOG_TAIL_CHARS = 20_000
# A worker's own wiring, which must not make the entrypoint's init() think it
# is that worker.
_WORKER_ONLY = ("MESHRAY_DAEMON_ADDRESS", "MESHRAY_WORKER_ID", "MESHRAY_TOKEN_FD",
                "MESHRAY_LEASE_FENCE")


def entrypoint_env(environ: dict, *, etcd: str, node_hex: str, submission_id: str) -> dict:
    """The entrypoint's environment: the worker's, minus its wiring, plus the cluster."""
    env = {k: v for k, v in environ.items() if k not in _WORKER_ONLY
           and not k.startswith("MESHRAY_WORKER_")}
    env.update({"MESHRAY_ADDRESS": etcd, "RAY_ADDRESS": etcd,
                "MESHRAY_PREFERRED_NODE": node_hex,
                "MESHRAY_JOB_SUBMISSION_ID": submission_id,
                "RAY_JOB_SUBMISSION_ID": submission_id})
    return env


class JobSupervisor:
    """Runs the entrypoint of `submission_id` (attempt `attempt`) on this node."""

    def __init__(self, submission_id: str, attempt: int):
        self.submission_id = submission_id
        self.attempt = attempt
        self.process = None
        threading.Thread(target=self._run, name="meshray-job-supervisor", daemon=True).start()

    def ping(self) -> bool:
        return True

    def _ask(self, method: str, payload: dict):
        from meshray.core.state import state
        return state.core.request(method, {"submission_id": self.submission_id, **payload})

    def _update(self, **change) -> dict:
        return self._ask("job_update", {"for_attempt": self.attempt, **change})

    def _run(self) -> None:
        try:
            reply = self._update(status="RUNNING", message="Job is currently running.")
        except Exception:  # noqa: BLE001 - stopped, or another attempt runs: nothing to do
            self._exit()
            return
        record = reply["record"]
        try:
            self._supervise(record, reply["etcd"])
        except Exception as exc:  # noqa: BLE001 - recorded as the job's failure
            try:
                self._update(status="FAILED", error_type="JOB_SUPERVISOR_ERROR",
                             message=f"The job supervisor failed: {type(exc).__name__}: {exc}")
            except Exception:  # noqa: BLE001 - the record moved on
                pass
        self._exit()

    def _supervise(self, record: dict, etcd: str) -> None:
        import meshray
        node_hex = meshray.get_runtime_context().get_node_id()
        path = os.path.join(os.environ["MESHRAY_SESSION_DIR"], "logs", record["log_file"])
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600)
        try:
            self.process = subprocess.Popen(
                [*death_signal_prefix(), "/bin/sh", "-c", record["entrypoint"]],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
                env=entrypoint_env(dict(os.environ), etcd=etcd, node_hex=node_hex,
                                   submission_id=self.submission_id))
        finally:
            os.close(out)
        stopped = self._wait()
        code = self.process.returncode
        if stopped:
            self._update(status="STOPPED", message="Job was intentionally stopped.",
                         driver_exit_code=code)
        elif code == 0:
            self._update(status="SUCCEEDED", message="Job finished successfully.",
                         driver_exit_code=0)
        else:
            self._update(status="FAILED", error_type="JOB_ENTRYPOINT_COMMAND_ERROR",
                         driver_exit_code=code,
                         message=f"Job entrypoint command failed with exit code {code}, last "
                                 f"available logs (truncated to {LOG_TAIL_CHARS:,} chars):\n"
                                 + _tail(path))

    def _wait(self) -> bool:
        """Wait for the entrypoint; True when it was stopped on request."""
        while True:
            try:
                self.process.wait(POLL_S)
                return False
            except subprocess.TimeoutExpired:
                pass
            try:
                record = self._ask("job_get", {})
            except Exception:  # noqa: BLE001 - etcd trouble: look again next time
                continue
            if record.get("stop_requested") or record.get("attempt") != self.attempt:
                self._terminate()
                return True

    def _terminate(self) -> None:
        for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    return
                time.sleep(0.05)
        self.process.wait()

    def _exit(self) -> None:
        """End this actor: its job is over (or was never its to run)."""
        import meshray
        from meshray.core.state import state
        actor_id = meshray.get_runtime_context().get_actor_id()
        if actor_id:
            state.core.request_async("kill_actor", {
                "actor_id": actor_id, "no_restart": True,
                "cause": f"the supervisor of job {self.submission_id} finished"})


def _tail(path: str) -> str:
    return read_tail(path, LOG_TAIL_CHARS * 4)[-LOG_TAIL_CHARS:]
