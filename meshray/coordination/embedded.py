"""Run etcd as a child process: the embedded default and local test clusters.

``meshray.init()`` with no address needs an etcd of its own, and the test
suites need real one- and three-member clusters that start in well under a
second and never outlive the test. This module finds an etcd binary, launches
members on loopback, waits until they answer, and tears them down by pid.

It speaks to etcd only over its HTTP endpoints (``/health`` and the JSON
gateway for status and auth setup), so it has no dependency on the gRPC
client and can be used to bring etcd up before any client exists.

Members are spawned without running Python in the child (no ``preexec_fn``),
so CPython can vfork and no fork handler of a threaded parent (gRPC's
``pthread_atfork`` handlers abort in a forked child, grpc/grpc#43055) ever
runs: the death signal that ties a member to its parent is set by
``setpriv --pdeathsig`` in the exec chain instead.

Given ``auth_password`` a member runs with etcd auth on (user ``root``, see
:mod:`.etcd_auth`). A fresh single member is set up before it ever listens
on TCP: it first serves on a unix socket in its (private) data dir, auth is
enabled there, and only then does it restart on its TCP address -- so no
other local user gets a moment with an open store. ``private_peer`` puts a
single member's raft port on a unix socket too: an unauthenticated TCP peer
port would let any local user speak raft to it and bypass auth.

Which binary runs, and whether its release may keep a store that persists,
is :mod:`.etcd_release`'s decision; a member given ``persistent=True`` refuses
a release with a known data-loss bug unless the operator allowed it.
"""

from __future__ import annotations

import errno
import http.client
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

from meshray.common.death_signal import death_signal_prefix

from .etcd_auth import EtcdAuthError, enable_root_auth, exchange_json
from .etcd_release import (ETCD_BIN_ENV, check_release, corrupt_check_args, etcd_version,
                           find_etcd_binary)

__all__ = [
    "ETCD_BIN_ENV",
    "find_etcd_binary",
    "free_port",
    "EmbeddedEtcd",
    "EtcdCluster",
]

log = logging.getLogger(__name__)

# Unix sockets a member may use, relative to its data dir (the process's
# working directory, which keeps the path short whatever the dir). etcd only
# takes URLs of the form scheme://host:port, so the ":0" is part of the name.
_SETUP_SOCKET = "setup.sock:0"
_PEER_SOCKET = "peer.sock:0"
_UNIX_PATH_MAX = 107


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


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP to a unix socket; paths too long for sockaddr_un are reached
    through the directory's /proc/self/fd entry."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        dir_fd = None
        try:
            path = self._path
            if len(os.fsencode(path)) > _UNIX_PATH_MAX:
                dir_fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
                path = f"/proc/self/fd/{dir_fd}/{os.path.basename(path)}"
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        finally:
            if dir_fd is not None:
                os.close(dir_fd)
        self.sock = sock


def _http_json(host: str, port: int, method: str, path: str,
               timeout: float, body: bytes | None = None, *,
               unix_path: str | None = None) -> tuple[int, dict]:
    conn = (_UnixHTTPConnection(unix_path, timeout) if unix_path
            else http.client.HTTPConnection(host, port, timeout=timeout))
    return exchange_json(conn, method, path, body)


class EmbeddedEtcd:
    """One etcd member running as a child of this process.

    Defaults favour a fast, small, single-member store: short raft ticks (a
    lone member has nobody to disagree with, and a restarted one waits a
    whole election timeout before it serves), a 512 MiB quota, revision-based
    auto-compaction and a small snapshot count. Members of a multi-member
    cluster get etcd's standard 100/1000 ms heartbeat/election timing unless
    told otherwise, because short timeouts cause spurious elections on busy
    machines. ``unsafe_no_fsync`` exists for tests only: it trades crash
    safety for speed.

    ``auth_password`` turns etcd auth on for ``auth_user`` (role root); it
    must be a machine-made secret such as the one derived from the cluster
    token, since the member stores it with a cheap bcrypt cost (a 256-bit
    secret gains nothing from a slow hash, and every login pays for it).
    ``private_peer`` (single members only) serves raft on a unix socket in
    the data dir instead of a TCP port. ``persistent`` marks a store that is
    kept and restarted from (``meshray start``): it refuses an etcd release
    with a known data-loss bug unless ``allow_unsafe`` (default: the
    ``MESHRAY_ALLOW_UNSAFE_ETCD`` environment variable) says otherwise.
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
                 auth_password: str | None = None,
                 auth_user: str = "root",
                 private_peer: bool = False,
                 persistent: bool = False,
                 allow_unsafe: bool | None = None,
                 extra_args: Sequence[str] = ()):
        if initial_cluster_state not in ("new", "existing"):
            raise ValueError(f"initial_cluster_state must be 'new' or "
                             f"'existing', got {initial_cluster_state!r}")
        if initial_cluster is not None and not peer_port:
            raise ValueError("peer_port must be given explicitly when "
                             "initial_cluster is set (the other members must "
                             "know this member's peer URL in advance)")
        if private_peer and (initial_cluster is not None or peer_port):
            raise ValueError("private_peer is for a single member without a peer_port "
                             "(other members could not reach a unix socket)")
        if auth_password is not None and not (isinstance(auth_password, str)
                                              and auth_password):
            raise ValueError(f"auth_password must be a non-empty string, got "
                             f"{type(auth_password).__name__}")
        single = initial_cluster is None
        self.data_dir = Path(data_dir)
        self.host = host
        self.name = name
        self.initial_cluster = initial_cluster
        self.initial_cluster_state = initial_cluster_state
        self.initial_cluster_token = initial_cluster_token
        self.heartbeat_ms = heartbeat_ms or (10 if single else 100)
        self.election_ms = election_ms or (100 if single else 1000)
        if self.election_ms < 5 * self.heartbeat_ms:
            raise ValueError(f"election_ms ({self.election_ms}) must be at "
                             f"least 5x heartbeat_ms ({self.heartbeat_ms})")
        self.quota_backend_bytes = quota_backend_bytes
        self.auto_compaction_retention = auto_compaction_retention
        self.snapshot_count = snapshot_count
        self.unsafe_no_fsync = unsafe_no_fsync
        self.extra_args = list(extra_args)
        self.die_with_parent = die_with_parent
        self.auth_password = auth_password
        self.auth_user = auth_user
        self.private_peer = private_peer
        self._auth_ready = False
        self._etcd_bin = etcd_bin
        self.persistent = persistent
        self.allow_unsafe = allow_unsafe
        self.etcd_version: tuple[int, int, int] | None = None
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
        if self.private_peer:
            return f"unix://{_PEER_SOCKET}"
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

    @property
    def returncode(self) -> int | None:
        """Exit status of the last launched process (None while it runs)."""
        return self._proc.poll() if self._proc is not None else None

    def __repr__(self) -> str:
        return (f"EmbeddedEtcd(name={self.name!r}, endpoint={self.endpoint!r}, "
                f"pid={self.pid})")

    # -- lifecycle ------------------------------------------------------

    def _args(self, binary: str, client_url: str | None = None) -> list[str]:
        initial_cluster = self.initial_cluster or f"{self.name}={self.peer_url}"
        token = self.initial_cluster_token or f"meshray-{self.name}"
        client_url = client_url or self.client_url
        args = [
            binary,
            "--name", self.name,
            "--data-dir", str(self.member_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
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
        if self.auth_password is not None:
            args += ["--bcrypt-cost", "4"]
        return args + corrupt_check_args(self.etcd_version) + self.extra_args

    def _prepare(self) -> str:
        """Create the directories, choose ports, clear stale sockets; returns
        the binary to run."""
        if self.is_running():
            raise RuntimeError(f"{self!r} is already running")
        # Chosen once: a restart runs the binary whose release was checked.
        binary = self._etcd_bin = self._etcd_bin or find_etcd_binary()
        self.etcd_version = etcd_version(binary)
        check_release(binary, self.etcd_version, persistent=self.persistent,
                      allow_unsafe=self.allow_unsafe)
        if not self.data_dir.exists():
            self._created_data_dir = True
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Ports are chosen once; a restart keeps its address so clients and
        # peers that knew it keep working.
        if not self.client_port:
            self.client_port = free_port(self.host)
        if not self.peer_port and not self.private_peer:
            self.peer_port = free_port(self.host)
        # A member killed without a chance to close its unix listeners leaves
        # the socket files, and binding over them fails.
        for name in (_SETUP_SOCKET, _PEER_SOCKET):
            try:
                (self.data_dir / name).unlink()
            except FileNotFoundError:
                pass
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        return binary

    def _spawn(self, args: list[str]) -> None:
        prefix = list(death_signal_prefix()) if self.die_with_parent else []
        with open(self.log_path, "ab") as log_file:
            self._proc = subprocess.Popen(
                prefix + args, stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT, close_fds=True, start_new_session=True,
                cwd=str(self.data_dir))

    def launch(self) -> None:
        """Start the process without waiting for it to serve (a cluster's
        members must all be launched before any of them can elect a leader)."""
        binary = self._prepare()
        self._spawn(self._args(binary))
        self._launched_at = time.monotonic()
        self._ready_pending = True
        self._auth_ready = False
        log.debug("launched etcd %s pid=%s", self.endpoint, self._proc.pid)

    def _needs_private_setup(self) -> bool:
        return (self.auth_password is not None and self.initial_cluster is None
                and not self.member_dir.exists())

    def _private_setup(self, timeout: float) -> None:
        """Bring a fresh single member up on a unix socket in its data dir,
        turn auth on there, and stop it: its TCP port then opens on a store
        that already refuses strangers."""
        binary = self._prepare()
        socket_path = str(self.data_dir / _SETUP_SOCKET)
        self._spawn(self._args(binary, client_url=f"unix://{_SETUP_SOCKET}"))
        deadline = time.monotonic() + timeout

        def request(path: str, body: dict) -> tuple[int, dict]:
            return _http_json("", 0, "POST", path, max(0.1, deadline - time.monotonic()),
                              json.dumps(body).encode(), unix_path=socket_path)

        try:
            delay = 0.005
            while not self.healthy(0.5, unix_path=socket_path):
                if self._proc.poll() is not None or time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"etcd {self.name} did not come up on its setup socket within "
                        f"{timeout:.1f}s (exit code {self._proc.poll()}, log: "
                        f"{self.log_path}). Log tail:\n{self.log_tail()}")
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
            try:
                enable_root_auth(request, self.auth_user, self.auth_password,
                                 f"{self.name} (setup socket)")
            except (EtcdAuthError, OSError) as exc:
                raise RuntimeError(f"could not enable auth on etcd {self.name}: {exc}") from exc
        except BaseException:
            self._kill_proc()
            shutil.rmtree(self.member_dir, ignore_errors=True)   # fresh: nothing to keep
            raise
        self._terminate(timeout=5.0)
        log.debug("etcd %s: auth enabled for user %r before opening %s", self.name,
                  self.auth_user, self.endpoint)

    def healthy(self, timeout: float = 0.5, *, unix_path: str | None = None) -> bool:
        """True when the member has a leader and serves linearizable reads."""
        try:
            status, body = _http_json(self.host, self.client_port, "GET",
                                      "/health", timeout, unix_path=unix_path)
        except OSError:
            return False
        return status == 200 and body.get("health") == "true"

    def _ensure_auth(self, probe_timeout: float) -> bool:
        """Check (or, on a member not set up privately, turn on) auth;
        False while the member cannot answer yet."""
        def request(path: str, body: dict) -> tuple[int, dict]:
            return _http_json(self.host, self.client_port, "POST", path,
                              max(probe_timeout, 1.0), json.dumps(body).encode())

        try:
            if enable_root_auth(request, self.auth_user, self.auth_password,
                                self.endpoint):
                log.info("etcd %s: auth enabled for user %r", self.endpoint, self.auth_user)
        except OSError as exc:
            log.debug("etcd %s: auth check failed (%s); retrying", self.endpoint, exc)
            return False
        except EtcdAuthError as exc:
            if not exc.retryable:
                raise RuntimeError(str(exc)) from None
            log.debug("etcd %s: auth setup not done yet (%s); retrying", self.endpoint, exc)
            return False
        self._auth_ready = True
        return True

    def _poll_ready(self, probe_timeout: float) -> bool:
        """One readiness probe; raises RuntimeError if the process died."""
        if self._proc is None:
            raise RuntimeError("etcd was never launched")
        code = self._proc.poll()
        if code is not None:
            raise RuntimeError(
                f"etcd {self.name} exited with code {code} during startup "
                f"(log: {self.log_path}). Log tail:\n{self.log_tail()}")
        if not self.healthy(timeout=probe_timeout):
            return False
        if self.auth_password is not None and not self._auth_ready \
                and not self._ensure_auth(probe_timeout):
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
            try:
                if self._needs_private_setup():
                    self._private_setup(max(0.1, deadline - time.monotonic()))
                self.launch()
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
    restarted on their old data and ports. With ``auth_password`` auth is
    turned on as soon as the cluster is healthy (members of a multi-member
    cluster cannot be set up privately first: none serves without a quorum).
    """

    def __init__(self, base_dir: str | os.PathLike, size: int = 3, *,
                 host: str = "127.0.0.1", heartbeat_ms: int = 50,
                 election_ms: int = 500, unsafe_no_fsync: bool = False,
                 start_timeout: float = 15.0, start: bool = True,
                 auth_password: str | None = None):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.base_dir = Path(base_dir)
        self._created_base_dir = not self.base_dir.exists()
        self.host = host
        self.size = size
        self._opts = dict(heartbeat_ms=heartbeat_ms, election_ms=election_ms,
                          unsafe_no_fsync=unsafe_no_fsync, auth_password=auth_password)
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
