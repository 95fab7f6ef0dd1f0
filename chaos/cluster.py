"""The cluster a chaos run attacks: one it builds here, or one that already runs.

A run needs more control than `meshray.testing.Cluster` offers -- a
3-member etcd it can kill members of, nodes it can pause, partition or fence
behind proxies, node slots it can refill after a kill, failpoint files per
node -- so this module starts daemons with meshray's own launcher
(`meshray.node.launcher.start_node`) and keeps the bookkeeping the nemeses
and checkers need: which pid is which node, every process it ever saw (for
the orphan check), and each node's shared-memory directory.

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
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field

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
        import psutil
        try:
            return [p.pid for p in psutil.Process(self.pid).children(recursive=True)]
        except psutil.Error:
            return []

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
        self._coordinator = None
        self._tracker_stop = threading.Event()
        self._tracker = None
        self.run_dir = ""
        self.address = ""
        self.token = None

    # ------------------------------------------------------------ etcd view
    def coordinator(self):
        if self._coordinator is None:
            from meshray import security
            from meshray.coordination.client import Coordinator
            self._coordinator = Coordinator(self.address.split(","), timeout=5.0,
                                            **security.etcd_client_options(token=self.token))
        return self._coordinator

    def registered(self) -> dict[str, dict]:
        """Node records in etcd now, keyed by node id (live leases only)."""
        from meshray.coordination import keyspace
        keys = keyspace.Keyspace()
        items, _rev = self.coordinator().get_prefix(keys.nodes_prefix(), timeout=5.0)
        return {keys.parse_node(item.key): keyspace.decode_json(item.value) for item in items}

    def availability(self) -> dict[str, dict]:
        """{node id: {"total": {...}, "available": {...}}} for registered nodes."""
        from meshray.coordination import keyspace
        keys = keyspace.Keyspace()
        nodes = self.registered()
        items, _rev = self.coordinator().get_prefix(keys.avail_prefix(), timeout=5.0)
        avail = {keys.parse_avail(item.key): keyspace.decode_json(item.value) for item in items}
        return {node: {"total": record.get("Resources", {}), "available": avail.get(node)}
                for node, record in nodes.items()}

    def etcd_health(self) -> tuple[bool, str]:
        try:
            self.coordinator().get("health-probe", timeout=3.0)
            return True, "etcd answers"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return False, f"etcd does not answer: {exc}"

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
        import psutil
        node = self.nodes[slot]
        pids = node.descendants() + [node.pid]
        for pid in pids:
            try:
                psutil.Process(pid).send_signal(signal.SIGSTOP)
                node.stopped_pids.append(pid)
            except psutil.Error:
                pass
        node.state = "paused"
        return node

    def resume_node(self, slot: int) -> ChaosNode:
        import psutil
        node = self.nodes[slot]
        for pid in reversed(node.stopped_pids):
            try:
                psutil.Process(pid).send_signal(signal.SIGCONT)
            except psutil.Error:
                pass
        node.stopped_pids.clear()
        if node.state == "paused":
            node.state = "up"
        return node

    def close(self) -> None:
        self.stop_tracking()
        if self._coordinator is not None:
            try:
                self._coordinator.close()
            except Exception:  # noqa: BLE001
                pass
            self._coordinator = None


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
        self.base_dir = base_dir or tempfile.mkdtemp(prefix="chaos-")
        self.run_dir = os.path.join(self.base_dir, "run")
        self.failpoint_dir = os.path.join(self.base_dir, "failpoints")
        os.makedirs(self.failpoint_dir, exist_ok=True)
        self._generations: dict[int, int] = {}
        self._lab = None
        self._hub = None
        self._etcd_proxies: dict[int, list] = {}
        self._rng = random.Random(seed)
        self._proxy_net = f"127.{self._rng.randrange(100, 250)}.{self._rng.randrange(0, 250)}"
        # etcd members ask Linux to kill them when the *thread* that started them
        # exits (PR_SET_PDEATHSIG), so restarts must come from a thread that
        # lives as long as the cluster -- not from the nemesis thread.
        from concurrent.futures import ThreadPoolExecutor
        self._launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chaos-launcher")

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "LocalCluster":
        from meshray import security
        from meshray.coordination.embedded import EtcdCluster
        from meshray.node.launcher import new_token
        try:
            # The token first: etcd runs with auth on, its root password
            # derived from the token, like a node's embedded etcd.
            self.token = new_token()
            host = "127.0.0.1"
            if self.mode == "netns":
                from chaos.netns import NetnsLab
                self._lab = NetnsLab()
                host = self._lab.bridge_ip
            elif self.mode == "proxy":
                from chaos.proxy import ProxyHub
                self._hub = ProxyHub()
            self.etcd = self._launcher.submit(
                EtcdCluster, os.path.join(self.base_dir, "etcd"), size=self.etcd_members,
                host=host, auth_password=security.etcd_password(self.token)).result()
            self.address = ",".join(self.etcd.endpoints)
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
        self._launcher.submit(self.etcd.restart_member, index, timeout).result()

    def start_node(self, slot: int, wait: bool = True) -> ChaosNode:
        """Start (or refill) `slot` with a fresh daemon (from the launcher thread)."""
        return self._launcher.submit(self._start_node, slot, wait).result()

    def _start_node(self, slot: int, wait: bool) -> ChaosNode:
        from meshray.node.launcher import start_node
        old = self.nodes.get(slot)
        if old is not None and old.alive() and old.state != "killed":
            raise RuntimeError(f"slot {slot} still has a live node {old!r}")
        if old is not None:
            self.retired.append(old)
        generation = self._generations.get(slot, -1) + 1
        self._generations[slot] = generation
        session = os.path.join(self.base_dir, f"s{slot}g{generation}")
        os.makedirs(session, exist_ok=True)
        kwargs = dict(etcd=self.address, num_cpus=self.num_cpus,
                      resources=self.slot_resources(slot), object_store_memory=128 * 1024 * 1024,
                      token=self.token, lease_ttl=self.lease_ttl, env=self._node_env(slot),
                      session_dir=session, labels={"chaos-slot": str(slot)})
        mirror = None
        if self.mode == "netns":
            address = self._lab.add_slot(slot)
            process = self._lab.run_in(slot, start_node, host=address, **kwargs)
        elif self.mode == "proxy" and slot != STABLE_SLOT:
            advertise = f"{self._proxy_net}.{10 + slot}"
            kwargs["etcd"] = ",".join(self._etcd_proxy_endpoints(slot, advertise))
            process = start_node(host="127.0.0.1", advertise_host=advertise, **kwargs)
            from chaos.proxy import PortMirror
            mirror = PortMirror(self._hub, process.pid, advertise, f"slot-{slot}").start()
        else:
            process = start_node(**kwargs)
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
        wanted = self.expected_node_ids()
        deadline = time.monotonic() + timeout
        while True:
            try:
                registered = set(self.registered())
            except Exception:  # noqa: BLE001 - etcd may be electing
                registered = set()
            if wanted <= registered:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes did not register within {timeout}s: want "
                                   f"{sorted(wanted)}, etcd has {sorted(registered)}")
            time.sleep(0.05)

    # ------------------------------------------------------------ faults
    def kill_node(self, slot: int) -> ChaosNode:
        node = self.nodes[slot]
        self._track_once()           # know its workers before they vanish
        node.process.kill()
        node.state = "killed"
        if node.mirror is not None:
            node.mirror.stop()
        return node

    def partition(self, slot: int) -> None:
        if slot == STABLE_SLOT:
            raise ValueError("the stable node (slot 0) carries the driver; it is never partitioned")
        if self.mode == "netns":
            self._lab.partition(slot)
        elif self.mode == "proxy":
            self._hub.set_mode(f"slot-{slot}", "blackhole")
        else:
            raise RuntimeError("partitions need --netns (root) or the proxy network mode")
        self.nodes[slot].state = "partitioned"

    def heal_partition(self, slot: int) -> None:
        if self.mode == "netns":
            self._lab.heal(slot)
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
        for node in list(self.nodes.values()):
            if node.state != "killed":
                try:
                    node.process.stop(timeout=10.0)
                except Exception:  # noqa: BLE001 - fall back to SIGKILL
                    node.process.kill()
                node.state = "stopped"
            if node.mirror is not None:
                node.mirror.stop()

    def close(self, keep_dir: bool = False) -> None:
        """Stop everything started here (by pid), remove namespaces and links."""
        super().close()
        try:
            self.stop_nodes()
        finally:
            if self.etcd is not None:
                try:
                    self.etcd.stop()
                except Exception:  # noqa: BLE001
                    log.exception("stopping etcd failed")
            if self._hub is not None:
                self._hub.close()
            if self._lab is not None:
                self._lab.close()
            self._launcher.shutdown(wait=False)
            if not keep_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)

    def etcd_pids(self) -> list[int]:
        return [m.pid for m in self.etcd.members if m.pid] if self.etcd else []


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

