"""A fault-injecting TCP proxy: partitions without root.

Without network namespaces the only place a test can cut a node off is the
path between it and everyone else, so the local cluster puts one of these in
front of every port a partitionable node exposes (its gRPC port, its actors'
ports) and in front of each etcd member for that node's own etcd client.

Modes, switchable at any time from any thread:

* ``pass``      -- forward bytes both ways.
* ``blackhole`` -- accept connections but forward nothing in either
  direction, and open no new upstream connections. This is what a real
  partition looks like to TCP: no RST, no FIN, the peer just stops answering,
  so clients find out through their own deadlines and keepalives. Healing
  resumes the stalled connections where they stopped (the bytes were only
  held back, as a retransmitting network would eventually deliver them).
* ``reset``     -- close every connection now and refuse new ones (a crash
  of the far side as TCP sees it).
* ``delay``     -- forward, but hold each chunk for ``delay`` seconds.

All proxies of one process share one asyncio loop on a background thread.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading

__all__ = ["ProxyHub", "Proxy", "MODES", "PortMirror"]

log = logging.getLogger(__name__)

MODES = ("pass", "blackhole", "reset", "delay")
_CHUNK = 256 * 1024


class Proxy:
    """One listening address forwarding to one target; lives on the hub's loop."""

    def __init__(self, hub: "ProxyHub", listen: tuple[str, int], target: tuple[str, int],
                 group: str):
        self.hub = hub
        self.listen = listen
        self.target = target
        self.group = group
        self.mode = "pass"
        self.delay = 0.0
        self._open: asyncio.Event | None = None      # set while bytes may flow
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    @property
    def address(self) -> str:
        return f"{self.listen[0]}:{self.listen[1]}"

    async def _start(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._server = await asyncio.start_server(self._accept, self.listen[0], self.listen[1],
                                                  reuse_address=True)
        self.listen = self._server.sockets[0].getsockname()[:2]

    async def _set_mode(self, mode: str, delay: float) -> None:
        self.mode, self.delay = mode, delay
        if mode in ("pass", "delay"):
            self._open.set()
        else:
            self._open.clear()
        if mode == "reset":
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.mode == "reset":
            writer.transport.abort()
            return
        self._writers.add(writer)
        try:
            await self._open.wait()          # a partitioned target cannot even be dialled
            if self.mode == "reset":
                return
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except (OSError, asyncio.CancelledError):
            self._writers.discard(writer)
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer),
                             return_exceptions=True)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                if self.mode == "delay" and self.delay > 0:
                    await asyncio.sleep(self.delay)
                await self._open.wait()      # blackhole: hold the bytes back
                if self.mode == "reset":
                    break
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            try:
                writer.write_eof()
            except (OSError, RuntimeError):
                pass

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()


class ProxyHub:
    """Owns the loop thread and every proxy; groups switch modes together."""

    def __init__(self):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-proxy",
                                        daemon=True)
        self._thread.start()
        self._proxies: list[Proxy] = []
        self._lock = threading.Lock()
        self._modes: dict[str, tuple[str, float]] = {}

    def _call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def add(self, listen: tuple[str, int], target: tuple[str, int], group: str) -> Proxy:
        """Start forwarding `listen` -> `target`; port 0 picks a free one."""
        proxy = Proxy(self, listen, target, group)
        self._call(proxy._start())
        mode, delay = self._modes.get(group, ("pass", 0.0))
        if mode != "pass":
            self._call(proxy._set_mode(mode, delay))
        with self._lock:
            self._proxies.append(proxy)
        return proxy

    def remove(self, proxy: Proxy) -> None:
        with self._lock:
            if proxy not in self._proxies:
                return
            self._proxies.remove(proxy)
        self._call(proxy._close())

    def group(self, group: str) -> list[Proxy]:
        with self._lock:
            return [p for p in self._proxies if p.group == group]

    def set_mode(self, group: str, mode: str, delay: float = 0.0) -> None:
        if mode not in MODES:
            raise ValueError(f"proxy mode must be one of {MODES}, got {mode!r}")
        self._modes[group] = (mode, delay)
        for proxy in self.group(group):
            self._call(proxy._set_mode(mode, delay))

    def mode(self, group: str) -> str:
        return self._modes.get(group, ("pass", 0.0))[0]

    def close(self) -> None:
        with self._lock:
            proxies, self._proxies = self._proxies, []
        for proxy in proxies:
            try:
                self._call(proxy._close(), timeout=5)
            except Exception:  # noqa: BLE001 - tearing down anyway
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._loop.is_running():
            self._loop.close()


class PortMirror:
    """Keep a proxy on `mirror_host` in front of every loopback TCP listener of a
    process tree (a node daemon and its workers).

    A node's actors listen on ports chosen at run time and are dialled
    directly by callers on other nodes, so a partition that only covered the
    daemon's port would leave its actors reachable. The node advertises
    `mirror_host`; this class notices each new listener (polling psutil) and
    puts a proxy of the node's group on the same port of `mirror_host`.
    """

    def __init__(self, hub: ProxyHub, root_pid: int, mirror_host: str, group: str,
                 interval: float = 0.1):
        self._hub = hub
        self._root_pid = root_pid
        self._mirror_host = mirror_host
        self._group = group
        self._interval = interval
        self._proxies: dict[int, Proxy] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"chaos-mirror-{group}",
                                        daemon=True)

    def start(self) -> "PortMirror":
        self.sync()
        self._thread.start()
        return self

    def _listeners(self) -> set[int]:
        """Loopback ports the tree listens on, read straight from /proc.

        psutil's per-process connection listing re-reads the whole socket
        table for every process; one read of /proc/net/tcp plus the trees'
        fd links costs a fraction of that, which matters at 10 polls/s on a
        2-core machine.
        """
        import psutil
        try:
            root = psutil.Process(self._root_pid)
            pids = [root.pid] + [p.pid for p in root.children(recursive=True)]
        except psutil.Error:
            return set()
        inodes = set()
        for pid in pids:
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    try:
                        link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    except OSError:
                        continue
                    if link.startswith("socket:["):
                        inodes.add(int(link[8:-1]))
            except OSError:
                continue
        return {port for inode, port in _loopback_listeners().items() if inode in inodes}

    def sync(self) -> None:
        """Bring the proxies in line with the listeners there are now."""
        ports = self._listeners()
        for port in ports - set(self._proxies):
            try:
                self._proxies[port] = self._hub.add((self._mirror_host, port),
                                                    ("127.0.0.1", port), self._group)
            except OSError as exc:
                log.warning("cannot mirror port %d on %s: %s", port, self._mirror_host, exc)
                self._proxies[port] = None
        for port in set(self._proxies) - ports:
            proxy = self._proxies.pop(port)
            if proxy is not None:
                self._hub.remove(proxy)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - keep mirroring; the next poll retries
                log.exception("port mirror %s failed", self._group)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)
        for proxy in self._proxies.values():
            if proxy is not None:
                self._hub.remove(proxy)
        self._proxies.clear()


def _loopback_listeners() -> dict[int, int]:
    """{socket inode: port} of every TCP socket listening on 127.0.0.1.

    gRPC binds "127.0.0.1" as an IPv6 socket with a v4-mapped address, so
    /proc/net/tcp6 counts as much as /proc/net/tcp.
    """
    loopback = ("0100007F:", "0000000000000000FFFF00000100007F:")
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                next(handle)
                for line in handle:
                    fields = line.split()
                    local, state, inode = fields[1], fields[3], int(fields[9])
                    if state == "0A" and local.startswith(loopback):   # 0A = LISTEN
                        out[inode] = int(local.rsplit(":", 1)[1], 16)
        except OSError:
            continue
    return out

