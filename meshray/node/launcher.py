"""Start a node daemon as a child process and wait until it serves.

Used by `meshray.init()` (embedded default), `meshray start` and the
testing Cluster. A daemon started with a parent pipe exits when the pipe
closes -- that is, when this process ends for any reason, SIGKILL included --
and takes its workers, shared memory, embedded etcd and session dir with it.
The other way round, a daemon that dies without cleaning up (SIGKILL, OOM
killer) cannot remove its shared memory itself, and /dev/shm is not freed by
the kernel when its creator dies; so the process that started it watches it
and removes what it left, while that process lives on.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from meshray.common.fd_wait import wait_readable

__all__ = ["NodeProcess", "start_node", "new_token"]

READY_TIMEOUT_S = 30.0


def new_token() -> str:
    from meshray.security import generate_token
    return generate_token()


@dataclass
class NodeProcess:
    """Handle on a node daemon this process started."""
    process: subprocess.Popen
    info: dict
    session_dir: str
    owns_session_dir: bool
    token: str | None
    parent_fd: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def node_id(self) -> str:
        return self.info["node_id"]

    @property
    def address(self) -> str:
        return self.info["address"]

    @property
    def local_address(self) -> str:
        return self.info["local_address"]

    @property
    def etcd(self) -> str:
        return self.info["etcd"]

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the daemon (a crash, for fault tests), then clear what it left.

        A SIGKILLed daemon cannot clean up after itself; its workers die with
        it (PR_SET_PDEATHSIG), and we, who started it, remove its shared
        memory, registry record and session dir.
        """
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self._close_parent_fd()
        self.remove_leftovers()

    def remove_leftovers(self) -> None:
        from meshray.node import registry
        if self.info.get("store_dir"):
            shutil.rmtree(self.info["store_dir"], ignore_errors=True)
        if self.info.get("node_id"):
            registry.remove_record(self.info["node_id"])
        if self.owns_session_dir:
            shutil.rmtree(self.session_dir, ignore_errors=True)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the daemon to stop, wait for it, and make sure it is gone."""
        if self.alive():
            self._close_parent_fd()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
                self.process.wait()
        self._close_parent_fd()
        self.remove_leftovers()

    def watch(self) -> None:
        """Remove the daemon's leftovers as soon as it exits, however it exits."""
        def run() -> None:
            self.process.wait()
            self.remove_leftovers()

        threading.Thread(target=run, name=f"meshray-watch-node-{self.pid}", daemon=True).start()

    def _close_parent_fd(self) -> None:
        if self.parent_fd is not None:
            try:
                os.close(self.parent_fd)
            except OSError:
                pass
            self.parent_fd = None


def start_node(*, etcd: str | None = None, embedded_etcd: bool = False,
               num_cpus: float | None = None, num_gpus: float | None = None,
               resources: dict | None = None, labels: dict | None = None,
               object_store_memory: int | None = None, host: str = "127.0.0.1",
               port: int = 0, token: str | None = None, session_dir: str | None = None,
               tie_to_parent: bool = True, cli: bool = False, lease_ttl: float | None = None,
               env: dict | None = None, prestart_workers: int | None = None,
               tls=None, etcd_options: dict | None = None,
               advertise_host: str = "", metrics_export_port: int | None = None,
               dashboard_port: int | None = None, data_port: int | None = None,
               memory: int | None = None,
               drain_timeout: float | None = None,
               include_dashboard: bool = True, node_id: str | None = None) -> NodeProcess:
    from meshray import security

    if not embedded_etcd and not etcd:
        raise ValueError("start_node needs etcd endpoints or embedded_etcd=True")
    source_env = os.environ if env is None else env
    if not token:
        token = security.resolve_token(environ=source_env)
    owns = session_dir is None
    session_dir = session_dir or tempfile.mkdtemp(prefix="meshray-")
    ready_r, ready_w = os.pipe()
    pass_fds = [ready_w]
    args = [sys.executable, "-m", "meshray.node.main", "--session-dir", session_dir,
            "--host", host, "--port", str(port), "--ready-fd", str(ready_w),
            "--resources", json.dumps(resources or {}), "--labels", json.dumps(labels or {})]
    if owns:
        args.append("--owns-session-dir")
    if embedded_etcd:
        args.append("--embedded-etcd")
    else:
        args += ["--etcd", etcd]
    for flag, value in (("--num-cpus", num_cpus), ("--num-gpus", num_gpus),
                        ("--object-store-memory", object_store_memory),
                        ("--lease-ttl", lease_ttl), ("--prestart-workers", prestart_workers),
                        ("--metrics-export-port", metrics_export_port),
                        ("--dashboard-port", dashboard_port), ("--data-port", data_port),
                        ("--memory", memory),
                        ("--drain-timeout", drain_timeout), ("--node-id", node_id)):
        if value is not None:
            args += [flag, str(value)]
    if cli:
        args.append("--cli")
    if not include_dashboard:
        args.append("--no-dashboard")
    if advertise_host:
        args += ["--advertise-host", advertise_host]
    parent_w = None
    if tie_to_parent:
        parent_r, parent_w = os.pipe()
        pass_fds.append(parent_r)
        args += ["--parent-fd", str(parent_r)]
    # The daemon gets the token on a pipe, not in its environment, which its
    # workers, etcd and runtime-env installers would otherwise inherit.
    child_env = security.environment_without_token(source_env)
    if tls is not None:      # a meshray.rpc.tls.TlsConfig; workers inherit it too
        child_env.update(tls.to_env())
    if etcd_options:
        from meshray.security import etcd_options_to_env
        child_env.update(etcd_options_to_env(etcd_options, token=token))
    # The daemon logs to its session dir; its own stdout/stderr must not hold
    # the caller's pipes open (a detached `meshray start` would never "finish").
    token_fd = security.token_pipe(token) if token else None
    if token_fd is not None:
        pass_fds.append(token_fd)
        child_env[security.TOKEN_FD_ENV] = str(token_fd)
    try:
        with open(os.path.join(session_dir, "node.stderr"), "ab") as stderr_file:
            process = subprocess.Popen(args, pass_fds=pass_fds, env=child_env,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=stderr_file, start_new_session=True)
    finally:
        if token_fd is not None:
            os.close(token_fd)
    os.close(ready_w)
    if tie_to_parent:
        os.close(parent_r)
        os.set_inheritable(parent_w, False)
    handle = NodeProcess(process, {}, session_dir, owns, token, parent_w)
    try:
        handle.info = _read_ready(ready_r, process, session_dir)
    except BaseException:
        handle.stop()
        raise
    finally:
        os.close(ready_r)
    handle.watch()
    return handle


def _read_ready(fd: int, process: subprocess.Popen, session_dir: str) -> dict:
    deadline = time.monotonic() + READY_TIMEOUT_S
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"node daemon (pid {process.pid}) did not start within "
                               f"{READY_TIMEOUT_S:.0f}s; see {session_dir}/node.log")
        if not wait_readable(fd, min(remaining, 0.5)):
            if process.poll() is not None:
                raise RuntimeError(_startup_failure(process, session_dir))
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            process.wait(5)
            raise RuntimeError(_startup_failure(process, session_dir))
        data += chunk
    return json.loads(data)


def session_log_tail(session_dir: str, lines: int = 20) -> str:
    """The last `lines` lines of a daemon's log and of its stderr (what it
    printed before logging was set up, or a crash), as they are."""
    tail = ""
    for name in ("node.log", "node.stderr"):
        try:
            with open(os.path.join(session_dir, name), errors="replace") as handle:
                tail += "".join(handle.readlines()[-lines:])
        except OSError:
            pass
    return tail


def _startup_failure(process: subprocess.Popen, session_dir: str) -> str:
    return (f"node daemon exited with code {process.returncode} during startup.\n"
            f"Last lines of {session_dir}/node.log:\n{session_log_tail(session_dir)}")
