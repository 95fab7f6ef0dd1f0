"""The cluster a chaos run attacks: one it builds here, or one that already runs.

Etcd, daemons, namespaces and the plain faults (kill, pause, restart a
member) come from meshray's cluster engine (`meshray.testing.engine`); this
module adds what only a chaos run needs: node *slots* with generations, the
proxy network mode, failpoint files per node, and the bookkeeping the
nemeses and checkers rely on -- which pid is which node, every process it
ever saw (for the orphan check), and each node's shared-memory directory.

Slot 0 is the *stable* node: the driver attaches to it, so it is never a
victim (a driver whose node dies dies with it, which tests the driver rather
than the cluster). Every other slot is a victim slot; a killed victim is
replaced by a fresh daemon in the same slot, so a slot has generations and
a schedule that names slot 2 replays identically even though node ids differ.

Network modes:

* ``loopback`` -- every daemon on 127.0.0.1; no partitions possible.
* ``proxy``    -- victims sit behind chaos.proxy (their gRPC port, their
  actors' ports and their etcd connections); a partition blackholes those.
  The cut is one-way for node-to-node traffic: the victim's own outgoing
  calls to peers still arrive (a proxy cannot tell who dialled it). The
  victim does lose etcd, so its lease expires and peers declare it dead.
* ``netns``    -- each node in its own network namespace on a bridge; a
  partition takes the node's link down: everything, both ways (root only).
"""
from __future__ import annotations

import logging
import os
import random
import signal
import tempfile
import threading
from dataclasses import dataclass, field

from meshray.testing.engine import ClusterEngine, EtcdView, pause_tree, process_tree, resume_pids

__all__ = ["ChaosNode", "LocalCluster", "ExternalCluster", "STABLE_SLOT", "VICTIM_RESOURCE",
           "REPO_ROOT", "shm_dir_of"]

log = logging.getLogger(__name__)

STABLE_SLOT = 0
# Every victim node offers this; work that should be exposed to faults asks
# for a sliver of it so it never lands on the stable node.
VICTIM_RESOURCE = "chaos-victim"
PG_RESOURCE = "chaos-pg"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shm_dir_of(node_id: str) -> str:
    """Where a node daemon keeps its shared-memory objects (see meshray/node/daemon.py)."""
    return f"/dev/shm/meshray-{node_id[:12]}"


@dataclass
class ChaosNode:
    slot: int
    generation: int
    process: object                      # meshray.node.launcher.NodeProcess
    state: str = "up"                    # up | killed | paused | partitioned | stopped
    stopped_pids: list = field(default_factory=list)
    mirror: object = None                # chaos.proxy.PortMirror in proxy mode

    @property
    def node_id(self) -> str:
        return self.process.node_id

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def session_dir(self) -> str:
        return self.process.session_dir

    def alive(self) -> bool:
        return self.process.alive()

    def descendants(self) -> list[int]:
        return process_tree(self.pid)

    def workers(self) -> list[int]:
        """Pids of this daemon's worker processes (direct children running worker_main)."""
        import psutil
        out = []
        try:
            for child in psutil.Process(self.pid).children():
                try:
                    if "meshray.core.worker_main" in " ".join(child.cmdline()):
                        out.append(child.pid)
                except psutil.Error:
                    continue
        except psutil.Error:
            pass
        return out

    def __repr__(self):
        return f"ChaosNode(slot={self.slot}, gen={self.generation}, {self.node_id[:8]}, pid={self.pid}, {self.state})"


class _ClusterBase:
    """What nemeses, workloads and checkers may rely on, whoever started the cluster."""

    name = "cluster"
    mode = "external"
    lease_ttl = 2.0
    capabilities: frozenset = frozenset()
    etcd = None

    def __init__(self):
        self.nodes: dict[int, ChaosNode] = {}
        self.retired: list[ChaosNode] = []          # killed or replaced generations
        self.seen_pids: dict[int, dict] = {}         # pid -> {create_time, kind, slot}
        self._etcd_view = None
        self._tracker_stop = threading.Event()
        self._tracker = None
        self.run_dir = ""
        self.address = ""
        self.token = None

    # ------------------------------------------------------------ etcd view
    def _view(self) -> EtcdView:
        if self._etcd_view is None:
            self._etcd_view = EtcdView(self.address, self.token)
        return self._etcd_view

    def coordinator(self):
        return self._view().coordinator()

    def registered(self) -> dict[str, dict]:
        """Node records in etcd now, keyed by node id (live leases only)."""
        return self._view().registered()

    def availability(self) -> dict[str, dict]:
        """{node id: {"total": {...}, "available": {...}}} for registered nodes."""
        return self._view().availability()

    def etcd_health(self) -> tuple[bool, str]:
        return self._view().etcd_health()

    # ------------------------------------------------------------ nodes
    def live_nodes(self) -> list[ChaosNode]:
        return [n for _, n in sorted(self.nodes.items()) if n.state != "killed"]

    def victim_slots(self) -> list[int]:
        return sorted(slot for slot in self.nodes if slot != STABLE_SLOT)

    def expected_node_ids(self) -> set[str]:
        return {n.node_id for n in self.nodes.values() if n.state in ("up",)}

    def all_node_ids(self) -> list[str]:
        return [n.node_id for n in list(self.nodes.values()) + self.retired]

    # ------------------------------------------------------------ pids
    def _track_once(self) -> None:
        import psutil
        for node in list(self.nodes.values()):
            for pid in [node.pid] + node.descendants():
                if pid in self.seen_pids:
                    continue
                try:
                    proc = psutil.Process(pid)
                    cmd = " ".join(proc.cmdline())
                    self.seen_pids[pid] = {"create_time": proc.create_time(), "slot": node.slot,
                                           "node_id": node.node_id,
                                           "kind": "daemon" if pid == node.pid else (
                                               "worker" if "worker_main" in cmd else "other")}
                except psutil.Error:
                    continue

    def start_tracking(self, interval: float = 0.5) -> None:
        def loop():
            while not self._tracker_stop.wait(interval):
                try:
                    self._track_once()
                except Exception:  # noqa: BLE001 - best effort bookkeeping
                    log.debug("pid tracking failed", exc_info=True)
        self._track_once()
        self._tracker = threading.Thread(target=loop, name="chaos-pids", daemon=True)
        self._tracker.start()

    def stop_tracking(self) -> None:
        self._tracker_stop.set()
        if self._tracker is not None:
            self._tracker.join(2)

    # ------------------------------------------------------------ driver
    def connect(self, namespace: str | None = None):
        """Attach this process as the driver, on the stable node.

        The driver finds its node through the node registry, so the
        environment points it there for the duration of the connection
        (and gets its old values back on disconnect: a test process that
        runs chaos must not find other tests' clusters changed under it).
        """
        import meshray
        wanted = {"MESHRAY_RUN_DIR": self.run_dir or None,
                  "MESHRAY_PREFERRED_NODE": self.nodes[STABLE_SLOT].node_id
                  if STABLE_SLOT in self.nodes else None}
        self._saved_env = {key: os.environ.get(key) for key in wanted}
        for key, value in wanted.items():
            if value is not None:
                os.environ[key] = value
        meshray.init(address=self.address, namespace=namespace, _token=self.token,
                     log_to_driver=False)
        return meshray

    def disconnect(self) -> None:
        import meshray
        try:
            if meshray.is_initialized():
                meshray.shutdown()
        finally:
            for key, value in getattr(self, "_saved_env", {}).items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            self._saved_env = {}

    # ------------------------------------------------------------ faults (overridden)
    def kill_node(self, slot: int) -> ChaosNode:
        node = self.nodes[slot]
        os.kill(node.pid, signal.SIGKILL)
        node.state = "killed"
        return node

    def pause_node(self, slot: int) -> ChaosNode:
        """SIGSTOP the daemon and all its workers: a frozen machine, not a dead one."""
        node = self.nodes[slot]
        node.stopped_pids.extend(self._freeze(node))
        node.state = "paused"
        return node

    def resume_node(self, slot: int) -> ChaosNode:
        node = self.nodes[slot]
        self._thaw(node)
        node.stopped_pids.clear()
        if node.state == "paused":
            node.state = "up"
        return node

    def _freeze(self, node: ChaosNode) -> list[int]:
        return pause_tree(node.pid)

    def _thaw(self, node: ChaosNode) -> None:
        resume_pids(node.stopped_pids)

    def close(self) -> None:
        self.stop_tracking()
        if self._etcd_view is not None:
            self._etcd_view.close_view()


class LocalCluster(_ClusterBase):
    """Etcd plus `nodes` daemons started here, torn down by `close()`."""

    name = "local"

    def __init__(self, nodes: int = 4, *, mode: str = "loopback", etcd_members: int = 1,
                 lease_ttl: float = 2.0, num_cpus: float = 2, victim_capacity: float = 100,
                 pg_capacity: float = 1, failpoints: bool = False, seed: int = 0,
                 base_dir: str | None = None):
        super().__init__()
        if nodes < 2:
            raise ValueError("a chaos cluster needs at least 2 nodes (slot 0 is never a victim)")
        if mode not in ("loopback", "proxy", "netns"):
            raise ValueError(f"mode must be loopback, proxy or netns, got {mode!r}")
        self.mode = mode
        self.size = nodes
        self.lease_ttl = lease_ttl
        self.num_cpus = num_cpus
        self.victim_capacity = victim_capacity
        self.pg_capacity = pg_capacity
        self.failpoints = failpoints
        self.etcd_members = etcd_members
        self.capabilities = frozenset(
            {"kill-node", "restart-node", "pause-node", "workers", "failpoints" if failpoints else "",
             "etcd-members" if etcd_members >= 3 else "",
             "partition" if mode in ("proxy", "netns") else ""} - {""})
        self.engine = ClusterEngine(
            etcd_members=etcd_members, network="netns" if mode == "netns" else "loopback",
            lease_ttl=lease_ttl, object_store_memory=128 * 1024 * 1024,
            base_dir=base_dir or tempfile.mkdtemp(prefix="chaos-"))
        self._etcd_view = self.engine
        self.base_dir = self.engine.base_dir
        self.run_dir = os.path.join(self.base_dir, "run")
        self.failpoint_dir = os.path.join(self.base_dir, "failpoints")
        os.makedirs(self.failpoint_dir, exist_ok=True)
        self._generations: dict[int, int] = {}
        self._hub = None
        self._etcd_proxies: dict[int, list] = {}
        self._rng = random.Random(seed)
        self._proxy_net = f"127.{self._rng.randrange(100, 250)}.{self._rng.randrange(0, 250)}"

    @property
    def etcd(self):
        """The etcd members (`EtcdCluster` interface): nemeses find the leader here."""
        return self.engine.etcd

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "LocalCluster":
        try:
            self.engine.start()
            # The engine makes the token first: etcd runs with auth on, its
            # root password derived from the token, like a node's embedded etcd.
            self.token = self.engine.token
            self.address = self.engine.address
            if self.mode == "proxy":
                from chaos.proxy import ProxyHub
                self._hub = ProxyHub()
            for slot in range(self.size):
                self.start_node(slot, wait=False)
            self.wait_for_nodes()
            self.start_tracking()
        except BaseException:
            self.close()
            raise
        return self

    def slot_resources(self, slot: int) -> dict:
        if slot == STABLE_SLOT:
            return {}
        return {VICTIM_RESOURCE: self.victim_capacity, PG_RESOURCE: self.pg_capacity}

    def failpoint_file(self, slot: int) -> str:
        return os.path.join(self.failpoint_dir, f"slot-{slot}")

    def _node_env(self, slot: int) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env["MESHRAY_RUN_DIR"] = self.run_dir
        env.pop("MESHRAY_PREFERRED_NODE", None)
        if self.failpoints:
            env["MESHRAY_FAILPOINTS_FILE"] = self.failpoint_file(slot)
        else:
            env.pop("MESHRAY_FAILPOINTS_FILE", None)
            env.pop("MESHRAY_FAILPOINTS", None)
        return env

    def restart_etcd_member(self, index: int, timeout: float = 20.0) -> None:
        self.engine.restart_etcd_member(index, timeout)

    def start_node(self, slot: int, wait: bool = True) -> ChaosNode:
        """Start (or refill) `slot` with a fresh daemon."""
        old = self.nodes.get(slot)
        if old is not None and old.alive() and old.state != "killed":
            raise RuntimeError(f"slot {slot} still has a live node {old!r}")
        if old is not None:
            self.retired.append(old)
        generation = self._generations.get(slot, -1) + 1
        self._generations[slot] = generation
        session = os.path.join(self.base_dir, f"s{slot}g{generation}")
        os.makedirs(session, exist_ok=True)
        kwargs = dict(num_cpus=self.num_cpus, resources=self.slot_resources(slot),
                      env=self._node_env(slot), session_dir=session,
                      labels={"chaos-slot": str(slot)})
        mirror = None
        if self.mode == "proxy" and slot != STABLE_SLOT:
            advertise = f"{self._proxy_net}.{10 + slot}"
            process = self.engine.start_node(
                slot, host="127.0.0.1", advertise_host=advertise,
                etcd=",".join(self._etcd_proxy_endpoints(slot, advertise)), **kwargs)
            from chaos.proxy import PortMirror
            mirror = PortMirror(self._hub, process.pid, advertise, f"slot-{slot}").start()
        else:
            process = self.engine.start_node(slot, **kwargs)
        node = ChaosNode(slot, generation, process, mirror=mirror)
        self.nodes[slot] = node
        if wait:
            self.wait_for_nodes()
        return node

    def _etcd_proxy_endpoints(self, slot: int, host: str) -> list[str]:
        """This slot's own way to etcd: one proxy per member, in its group."""
        if slot not in self._etcd_proxies:
            proxies = []
            for member in self.etcd.members:
                proxies.append(self._hub.add((host, 0), (member.host, member.client_port),
                                             f"slot-{slot}"))
            self._etcd_proxies[slot] = proxies
        return [p.address for p in self._etcd_proxies[slot]]

    def wait_for_nodes(self, timeout: float = 30.0) -> None:
        self.engine.wait_for_nodes(self.expected_node_ids(), exact=False, timeout=timeout)

    # ------------------------------------------------------------ faults
    def kill_node(self, slot: int) -> ChaosNode:
        node = self.nodes[slot]
        self._track_once()           # know its workers before they vanish
        self.engine.kill_node(node.process)
        node.state = "killed"
        if node.mirror is not None:
            node.mirror.stop()
        return node

    def _freeze(self, node: ChaosNode) -> list[int]:
        return self.engine.pause_node(node.process)

    def _thaw(self, node: ChaosNode) -> None:
        self.engine.resume_node(node.process)

    def partition(self, slot: int) -> None:
        if slot == STABLE_SLOT:
            raise ValueError("the stable node (slot 0) carries the driver; it is never partitioned")
        if self.mode == "netns":
            self.engine.partition(slot)
        elif self.mode == "proxy":
            self._hub.set_mode(f"slot-{slot}", "blackhole")
        else:
            raise RuntimeError("partitions need --netns (root) or the proxy network mode")
        self.nodes[slot].state = "partitioned"

    def heal_partition(self, slot: int) -> None:
        if self.mode == "netns":
            self.engine.heal(slot)
        elif self.mode == "proxy":
            self._hub.set_mode(f"slot-{slot}", "pass")
        if self.nodes[slot].state == "partitioned":
            self.nodes[slot].state = "up"

    def set_failpoints(self, slot: int, spec: str) -> None:
        if not self.failpoints:
            raise RuntimeError("this cluster was started without failpoint files")
        if spec:
            from meshray.rpc.factory import parse_failpoints
            parse_failpoints(spec)           # fail here, not silently in the daemons
        path = self.failpoint_file(slot)
        with open(path + ".tmp", "w") as handle:
            handle.write(spec)
        os.replace(path + ".tmp", path)

    # ------------------------------------------------------------ teardown
    def stop_nodes(self) -> None:
        for node in list(self.nodes.values()):
            if node.stopped_pids:
                self.resume_node(node.slot)
            if node.state == "partitioned":
                self.heal_partition(node.slot)
        self._track_once()
        try:
            self.engine.stop_nodes()
        finally:
            for node in list(self.nodes.values()):
                if node.state != "killed":
                    node.state = "stopped"
                if node.mirror is not None:
                    node.mirror.stop()

    def close(self, keep_dir: bool = False) -> None:
        """Stop everything started here (by pid), remove namespaces and links."""
        self.stop_tracking()
        try:
            self.stop_nodes()
        finally:
            try:
                self.engine.close(keep_dir=keep_dir)
            finally:
                if self._hub is not None:
                    self._hub.close()

    def etcd_pids(self) -> list[int]:
        return self.engine.etcd_pids()


class ExternalCluster(_ClusterBase):
    """A cluster someone else started (`--address`): attack what is reachable.

    Nodes are found through the local node registry (the files `meshray start`
    writes), so process faults work only on nodes running on this machine;
    killed nodes are not restarted, etcd members and network paths are not
    ours to touch.
    """

    name = "external"

    def __init__(self, address: str, token: str | None = None, lease_ttl: float = 5.0):
        super().__init__()
        from meshray.node import registry
        self.address = address
        self.lease_ttl = lease_ttl
        wanted = set(address.split(","))
        records = [r for r in registry.read_records()
                   if wanted & set(r.get("etcd", "").split(","))]
        if not records:
            raise ConnectionError(f"no node on this machine is joined to etcd at {address}; "
                                  "external targets must run here (`meshray start`)")
        records.sort(key=lambda r: (not r.get("cli"), r.get("started_at", 0)))
        from meshray import security
        if token is None:
            path = os.path.join(records[0].get("session_dir", ""), "token")
            token = security.read_token_file(path) if os.path.exists(path) else None
        self.token = token or security.resolve_token()
        self.capabilities = frozenset({"kill-node", "pause-node", "workers"})
        for slot, record in enumerate(records):
            self.nodes[slot] = ChaosNode(slot, 0, _ForeignProcess(record))
        self.start_tracking()

    def kill_node(self, slot: int) -> ChaosNode:
        self._track_once()
        return super().kill_node(slot)

    def close(self, keep_dir: bool = False) -> None:
        super().close()


class _ForeignProcess:
    """NodeProcess look-alike for a daemon this process did not start."""

    def __init__(self, record: dict):
        self.info = record
        self.session_dir = record.get("session_dir", "")

    @property
    def node_id(self) -> str:
        return self.info["node_id"]

    @property
    def pid(self) -> int:
        return int(self.info["pid"])

    def alive(self) -> bool:
        from meshray.node.registry import pid_alive
        return pid_alive(self.pid)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def stop(self, timeout: float = 10.0) -> None:
        raise RuntimeError("an external cluster is not stopped by the chaos runner")


def describe(cluster: _ClusterBase) -> dict:
    """The cluster as the report records it."""
    return {"kind": cluster.name, "mode": cluster.mode, "address": cluster.address,
            "lease_ttl": cluster.lease_ttl,
            "etcd_members": len(cluster.etcd.members) if cluster.etcd else None,
            "nodes": {slot: {"node_id": n.node_id, "pid": n.pid, "generation": n.generation}
                      for slot, n in sorted(cluster.nodes.items())},
            "capabilities": sorted(cluster.capabilities)}

