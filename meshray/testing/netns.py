"""Network namespaces: real partitions for a cluster on one machine (root only).

A proxy can only cut the paths it sits on; a node in its own network
namespace has exactly one link to the world, so pulling that link down cuts
everything at once and in both directions -- peers, actors, etcd, drivers --
which is what a partitioned machine experiences.

Layout: one Linux bridge in the root namespace holding the subnet's first
address (etcd members and the driver live there), and one namespace per node
joined to the bridge by a veth pair. `partition(i)` sets the root-side end of
node i's veth down; `heal(i)` sets it up again. Everything is named with a
random tag and torn down by `close()`; nothing outside the namespaces and
links created here is touched.

Processes are started inside a namespace without a wrapper command: a thread
enters the namespace with setns(2) (which moves only the calling thread) and
forks from there, so the child -- a meshray node daemon started by the
ordinary launcher -- is born inside it and keeps its own pid. `run_in` uses a
throwaway thread; `executor(slot)` keeps one alive until `close()`, for
children that die with the thread that forked them (etcd members set
PR_SET_PDEATHSIG, which Linux ties to the forking thread).

Slots are any short names or numbers (the chaos harness numbers its nodes;
the topology script also gives etcd members namespaces of their own);
interface names must stay within Linux's 15 characters, so keep them short.
"""
from __future__ import annotations

import ctypes
import ipaddress
import os
import secrets
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["NetnsLab", "netns_available", "NetnsError"]

CLONE_NEWNET = 0x40000000


class NetnsError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)
    if check and result.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def netns_available() -> str | None:
    """None when namespaces can be used here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    name = f"mrprobe{secrets.token_hex(3)}"
    probe = _ip("netns", "add", name, check=False)
    if probe.returncode != 0:
        return f"`ip netns add` failed: {probe.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = _ip("-4", "-o", "addr", "show").stdout
    nets = []
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    return nets


class NetnsLab:
    """A bridge plus one namespace per node slot."""

    def __init__(self, tag: str | None = None):
        reason = netns_available()
        if reason:
            raise NetnsError(f"cannot use network namespaces: {reason}")
        self.tag = tag or secrets.token_hex(2)
        self.bridge = f"mr{self.tag}br"
        self.subnet = self._pick_subnet()
        hosts = self.subnet.hosts()
        self.bridge_ip = str(next(hosts))
        self._free_ips = list(hosts)
        self.slots: dict[int | str, dict] = {}
        self._executors: dict[int | str, ThreadPoolExecutor] = {}
        self._closed = False
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.bridge_ip}/{self.subnet.prefixlen}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _pick_subnet() -> ipaddress.IPv4Network:
        used = _used_networks()
        for third in range(200, 256):
            candidate = ipaddress.ip_network(f"10.213.{third}.0/24")
            if not any(candidate.overlaps(net) for net in used):
                return candidate
        raise NetnsError("no free 10.213.x.0/24 subnet for the lab's bridge")

    def add_slot(self, slot: int | str) -> str:
        """Create namespace + veth for `slot` (idempotent); returns its address."""
        if slot in self.slots:
            return self.slots[slot]["ip"]
        ns, veth = f"mr{self.tag}n{slot}", f"mr{self.tag}v{slot}"
        if len(veth) > 15:
            raise NetnsError(f"slot name {slot!r} too long: {veth!r} exceeds 15 characters")
        address = str(self._free_ips.pop(0))
        self.slots[slot] = {"ns": ns, "veth": veth, "ip": address}
        _ip("netns", "add", ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", ns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return address

    def namespace(self, slot: int) -> str:
        return self.slots[slot]["ns"]

    def address(self, slot: int) -> str:
        return self.slots[slot]["ip"]

    def _enter(self, slot) -> None:
        """Move the calling thread (only it) into slot's namespace."""
        ns_path = f"/var/run/netns/{self.namespace(slot)}"
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(ns_path, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise NetnsError(f"setns({ns_path}) failed: {os.strerror(err)}")
        finally:
            os.close(fd)

    def run_in(self, slot, fn, *args, **kwargs):
        """Call fn in a thread that has entered slot's namespace; children it
        forks are born there."""
        box: dict = {}

        def body():
            try:
                self._enter(slot)
                box["result"] = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box["error"] = exc

        thread = threading.Thread(target=body, name=f"netns-{slot}", daemon=True)
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["result"]

    def executor(self, slot) -> ThreadPoolExecutor:
        """A one-thread executor living in slot's namespace until `close()`.

        For children that must outlive the call that started them but die
        with the thread that forked them (PR_SET_PDEATHSIG): `run_in`'s
        thread ends when fn returns, and such a child would die with it.
        """
        if slot not in self._executors:
            self.namespace(slot)     # KeyError now, not a broken pool later
            self._executors[slot] = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"netns-{slot}",
                initializer=self._enter, initargs=(slot,))
        return self._executors[slot]

    def partition(self, slot: int) -> None:
        _ip("link", "set", self.slots[slot]["veth"], "down")

    def heal(self, slot: int) -> None:
        _ip("link", "set", self.slots[slot]["veth"], "up")

    def close(self) -> None:
        """Delete the links and namespaces made here (processes must be gone:
        a namespace with a live process in it outlives its name)."""
        if self._closed:
            return
        self._closed = True
        for pool in self._executors.values():
            pool.shutdown(wait=True)
        for info in self.slots.values():
            _ip("link", "del", info["veth"], check=False)
            _ip("netns", "del", info["ns"], check=False)
        _ip("link", "del", self.bridge, check=False)
