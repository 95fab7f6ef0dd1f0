"""Connection limits for meshray's gRPC servers, so a flood cannot take their descriptors.

Every accepted TCP connection costs the server one file descriptor, before
the peer has sent a byte -- the token check only happens once a call
arrives. Left alone, a few thousand idle sockets from anyone who can reach a
port use up a process's descriptors; then it can no longer accept its own
workers, open files or start actors, and gRPC does not recover by itself when
descriptors free up again. Three limits keep that from happening:

* a cap on the connections each listener holds (gRPC's
  ``grpc.max_allowed_incoming_connections``: connections beyond it are
  closed as soon as they are accepted), set to half the process's
  descriptor limit, so the other half always stays free for its real work;
* deadlines for connections that do not behave like clients: one that has
  not finished the HTTP/2 (and TLS) handshake within
  HANDSHAKE_TIMEOUT_MS, or has had no call for IDLE_CONNECTION_MS, is
  closed (a client reconnects transparently on its next call);
* a cap per peer address, so one host cannot take all of a listener's
  connections from everyone else. grpcio offers no hook at accept time, so
  a watcher thread compares the process's own sockets (from ``/proc``)
  against the cap once a second and shuts down a peer's newest connections
  beyond it, with a log line naming the peer and the limit. A peer that
  reconnects as fast as it is cut off can still crowd a listener between
  two sweeps; the per-listener cap is what guarantees the descriptors.

Sockets on unix paths are not counted per peer: they live in 0700 session
dirs, so only this user can connect to them.
"""
from __future__ import annotations

import logging
import os
import resource
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping

from meshray.common.env import positive_env

__all__ = [
    "ConnectionLimits",
    "ENV_MAX_CONNECTIONS",
    "ENV_MAX_CONNECTIONS_PER_PEER",
    "HANDSHAKE_TIMEOUT_MS",
    "IDLE_CONNECTION_MS",
    "excess_connections",
    "limits_for",
    "raise_nofile_limit",
    "server_options",
    "watch",
]

log = logging.getLogger(__name__)

ENV_MAX_CONNECTIONS = "MESHRAY_MAX_CONNECTIONS"
ENV_MAX_CONNECTIONS_PER_PEER = "MESHRAY_MAX_CONNECTIONS_PER_PEER"
HANDSHAKE_TIMEOUT_MS = 10_000
"""A real client finishes TCP, TLS and the HTTP/2 preface in milliseconds;
gRPC's default (120 s) lets an idle socket hold a descriptor for two minutes."""
IDLE_CONNECTION_MS = 300_000
"""Connections without calls are recycled after this; meshray's own
long-lived streams are calls, so they never count as idle."""
PER_PEER_CEILING = 1024
"""Default per-peer cap on large machines: about one connection per process
on the peer host (gRPC shares a connection per target within a process)."""
SWEEP_INTERVAL_S = 1.0
LOG_INTERVAL_S = 60.0


@dataclass(frozen=True)
class ConnectionLimits:
    total: int       # connections one listener holds
    per_peer: int    # of those, from one peer address


def _positive_int(environ: Mapping[str, str], name: str) -> int | None:
    if environ.get(name) == "":
        return None                      # set but empty: the default, as unset
    return positive_env(name, None, environ=environ,
                        expected="a positive integer (a number of connections)")


def limits_for(nofile_soft: int, environ: Mapping[str, str]) -> ConnectionLimits:
    """The limits a process with descriptor limit `nofile_soft` uses. Pure.

    Defaults: half the descriptors per listener, a quarter of that (at most
    PER_PEER_CEILING) per peer. MESHRAY_MAX_CONNECTIONS and
    MESHRAY_MAX_CONNECTIONS_PER_PEER override them.
    """
    if nofile_soft < 0 or nofile_soft > 1 << 20:      # RLIM_INFINITY or beyond any use
        nofile_soft = 1 << 20
    total = _positive_int(environ, ENV_MAX_CONNECTIONS) or max(64, nofile_soft // 2)
    per_peer = (_positive_int(environ, ENV_MAX_CONNECTIONS_PER_PEER)
                or max(8, min(PER_PEER_CEILING, total // 4)))
    if per_peer > total:
        raise ValueError(f"{ENV_MAX_CONNECTIONS_PER_PEER}={per_peer} is more than the "
                         f"{total} connections a listener holds in all ({ENV_MAX_CONNECTIONS})")
    return ConnectionLimits(total=total, per_peer=per_peer)


def current_limits() -> ConnectionLimits:
    return limits_for(resource.getrlimit(resource.RLIMIT_NOFILE)[0], os.environ)


def server_options() -> list:
    """gRPC server options (channel arguments) that put the limits in force."""
    limits = current_limits()
    return [
        ("grpc.max_allowed_incoming_connections", limits.total),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
        ("grpc.max_connection_idle_ms", IDLE_CONNECTION_MS),
    ]


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's descriptor soft limit to its hard limit; (before, after).

    Distributions default the soft limit to 1024 for compatibility with
    select(); meshray uses epoll, and a node holds a socket per peer and
    client, pipes per worker and files per object.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return soft, hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft, soft


def excess_connections(connections: Iterable[tuple], per_peer: int) -> dict:
    """Which connections to close: {(port, peer): [key, ...]}. Pure.

    `connections` holds (key, port, peer, first_seen) tuples. Each peer keeps
    its `per_peer` oldest connections to a port: a client that has been
    connected longest is the least likely to be part of a flood.
    """
    groups = defaultdict(list)
    for key, port, peer, first_seen in connections:
        groups[(port, peer)].append((first_seen, key))
    excess = {}
    for group, members in groups.items():
        if len(members) > per_peer:
            members.sort(key=lambda item: (item[0], str(item[1])))
            excess[group] = [key for _seen, key in members[per_peer:]]
    return excess


def _peer_ip(ip: str) -> str:
    return ip[len("::ffff:"):] if ip.startswith("::ffff:") and "." in ip else ip


def _shut_down(fd: int, laddr: tuple, raddr: tuple) -> bool:
    """Shut down the socket at `fd` if it is still the connection laddr<->raddr.

    The watcher does not own the descriptor (gRPC does), so it acts on a
    duplicate: shutdown() ends the connection for every descriptor of it,
    gRPC sees end-of-file and closes its own in the normal way. Checking the
    addresses on the duplicate makes sure a descriptor number reused since
    the scan is left alone.
    """
    try:
        dup = os.dup(fd)
    except OSError:
        return False
    try:
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return False
    try:
        if (_peer_ip(sock.getsockname()[0]), sock.getsockname()[1]) != laddr or \
                (_peer_ip(sock.getpeername()[0]), sock.getpeername()[1]) != raddr:
            return False
        sock.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False
    finally:
        sock.close()


class _Watcher:
    """One thread per process that keeps each watched port within its per-peer cap."""

    def __init__(self):
        self._lock = threading.Lock()
        self._ports: dict[int, ConnectionLimits] = {}
        self._thread: threading.Thread | None = None
        self._first_seen: dict = {}
        self._sweeps = 0
        self._logged: dict = {}        # (port, peer) -> (last log time, closed since)

    def watch(self, port: int, limits: ConnectionLimits) -> None:
        with self._lock:
            self._ports[port] = limits
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="meshray-conn-limits",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(SWEEP_INTERVAL_S)
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad sweep
                log.exception("connection limit sweep failed")

    def sweep(self) -> int:
        """Close connections beyond the per-peer caps now; returns how many."""
        with self._lock:
            ports = dict(self._ports)
        if not ports:
            return 0
        smallest = min(limits.per_peer for limits in ports.values())
        try:
            open_fds = len(os.listdir("/proc/self/fd"))
        except OSError:
            return 0
        if open_fds <= smallest:          # no peer can be over its cap: skip the scan
            self._first_seen.clear()
            return 0
        import psutil

        self._sweeps += 1
        seen, rows, addresses, totals = {}, [], {}, defaultdict(int)
        for conn in psutil.Process().net_connections(kind="tcp"):
            if (conn.status != psutil.CONN_ESTABLISHED or not conn.raddr or conn.fd < 0
                    or conn.laddr.port not in ports):
                continue
            laddr = (_peer_ip(conn.laddr.ip), conn.laddr.port)
            raddr = (_peer_ip(conn.raddr.ip), conn.raddr.port)
            key = (conn.fd, laddr, raddr)
            seen[key] = self._first_seen.get(key, self._sweeps)
            addresses[key] = (conn.fd, laddr, raddr)
            rows.append((key, laddr[1], raddr[0], seen[key]))
            totals[laddr[1]] += 1
        self._first_seen = seen
        closed = 0
        for port, count in totals.items():
            if count >= ports[port].total:
                self._report((port, "*"), 0, lambda _n, port=port, count=count: (
                    f"port {port} holds {count} connections, its limit "
                    f"({ENV_MAX_CONNECTIONS}={ports[port].total}); new ones are refused until "
                    "some close"))
        by_port = defaultdict(list)
        for row in rows:
            by_port[row[1]].append(row)
        for port, port_rows in by_port.items():
            limit = ports[port].per_peer
            for (_port, peer), keys in excess_connections(port_rows, limit).items():
                shut = sum(_shut_down(*addresses[key]) for key in keys)
                closed += shut
                self._report((port, peer), shut, lambda n, peer=peer, port=port, limit=limit: (
                    f"closed {n} connection(s) from {peer} to port {port}: a peer address may "
                    f"hold at most {limit} connections ({ENV_MAX_CONNECTIONS_PER_PEER}={limit})"))
        return closed

    def _report(self, group, closed: int, message) -> None:
        """Log `message(count closed)` at most once a minute per (port, peer)."""
        now = time.monotonic()
        last, pending = self._logged.get(group, (None, 0))
        pending += closed
        if last is not None and now - last < LOG_INTERVAL_S:
            self._logged[group] = (last, pending)
            return
        self._logged[group] = (now, 0)
        log.warning(message(pending))


_watcher = _Watcher()


def watch(bound: list[str]) -> list[str]:
    """Keep the TCP addresses in `bound` (as _bind_all returns them) within the caps."""
    limits = current_limits()
    for address in bound:
        if address.startswith("unix:"):
            continue
        port = int(address.rsplit(":", 1)[1])
        if port > 0:
            _watcher.watch(port, limits)
    return bound
