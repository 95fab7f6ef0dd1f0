"""The docker-compose topology as plain processes, with faults.

Starts a 3-member etcd cluster and 3 meshray nodes on this machine, runs a
job across them, and while the job runs SIGKILLs one node that the driver
does not sit on and the etcd leader. The job must still finish with every
result correct. Exit code 0 means it did.

    python scripts/local_topology.py [--nodes 3] [--tasks 60] [--loopback]

Two modes; the first output line says which one ran:

* netns (the default as root, where `ip netns` works): like the compose
  file, every etcd member and every node is its own "host" -- a network
  namespace with its own address on a private bridge (chaos/netns.py). etcd
  members listen on <address>:2379/2380 as in compose; nodes bind and
  advertise their address, so everything between them crosses a real
  interface. A non-loopback bind needs a cluster token, so one is generated
  and handed to nodes and driver (compose's shared secret). The driver stays
  in the root namespace, which reaches every address over the bridge, and
  attaches to its node through that node's unix socket.
* loopback (`--loopback`, or when not root / namespaces unavailable): the
  same processes on 127.0.0.1 with free ports.

Everything is torn down on exit, faults or not: processes by pid,
namespaces and links by name, session and store dirs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid

import cloudpickle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)     # chaos/ is a top-level package of the checkout

from meshray.coordination.embedded import EmbeddedEtcd, EtcdCluster  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])

LEASE_TTL_S = 2.0


class NetnsEtcdCluster(EtcdCluster):
    """An EtcdCluster whose members each live in a namespace of `lab`.

    Members use compose's fixed ports (2379 client, 2380 peer) on their own
    address, so there is no port race to retry. Each is launched from the
    lab's long-lived thread for its namespace: etcd dies with the thread that
    forked it (PR_SET_PDEATHSIG), and that thread must outlive the launch.
    """

    def __init__(self, base_dir: str, lab, slots: list[str], **kwargs):
        self.lab, self.slots = lab, slots
        super().__init__(base_dir, size=len(slots), **kwargs)

    def _plan_members(self) -> None:
        hosts = [self.lab.add_slot(slot) for slot in self.slots]
        names = [f"m{i}" for i in range(len(hosts))]
        initial = ",".join(f"{n}=http://{h}:2380" for n, h in zip(names, hosts))
        token = f"meshray-topology-{uuid.uuid4().hex[:12]}"
        self.members = [
            EmbeddedEtcd(self.base_dir / n, host=h, client_port=2379, peer_port=2380, name=n,
                         initial_cluster=initial, initial_cluster_token=token, **self._opts)
            for n, h in zip(names, hosts)]

    def start(self, timeout: float = 15.0) -> "NetnsEtcdCluster":
        deadline = time.monotonic() + timeout
        try:
            for slot, member in zip(self.slots, self.members):
                self.lab.executor(slot).submit(member.launch).result(timeout=10)
            for member in self.members:       # none serves before a quorum is up
                member.wait_ready(max(0.1, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self


class Topology:
    """3 etcd members and `nodes` node daemons, in namespaces or on loopback."""

    def __init__(self, base: str, netns: bool):
        from meshray import security
        from meshray.node.launcher import new_token
        self.base = base
        self.lab = None
        self.etcd = None
        self.nodes: list = []
        self.token = new_token()
        # etcd runs with auth on; everyone holding the token derives the login.
        password = security.etcd_password(self.token)
        if netns:
            from chaos.netns import NetnsLab
            self.lab = NetnsLab()
            print(f"netns lab: tag {self.lab.tag}, bridge {self.lab.bridge} "
                  f"({self.lab.subnet})", flush=True)
            self.etcd = NetnsEtcdCluster(os.path.join(base, "etcd"), self.lab,
                                         ["e0", "e1", "e2"], auth_password=password)
        else:
            self.etcd = EtcdCluster(os.path.join(base, "etcd"), size=3, auth_password=password)
        self.endpoints = ",".join(self.etcd.endpoints)

    def add_node(self, index: int):
        from meshray.node.launcher import start_node
        kwargs = dict(etcd=self.endpoints, num_cpus=1, token=self.token, lease_ttl=LEASE_TTL_S,
                      object_store_memory=256 * 1024 * 1024)
        if self.lab is None:
            node = start_node(**kwargs)
        else:
            slot = f"n{index}"
            node = self.lab.run_in(slot, start_node, host=self.lab.add_slot(slot), **kwargs)
        self.nodes.append(node)
        return node

    def wait_registered(self, want: set[str], timeout: float = 30.0) -> None:
        """Block until etcd lists exactly the node ids in `want`."""
        from meshray import security
        from meshray.coordination import keyspace
        from meshray.coordination.client import Coordinator
        keys = keyspace.Keyspace()
        deadline = time.monotonic() + timeout
        coordinator = Coordinator(self.endpoints.split(","), timeout=5.0,
                                  **security.etcd_client_options(token=self.token))
        try:
            while True:
                items, _rev = coordinator.get_prefix(keys.nodes_prefix())
                have = {keys.parse_node(item[0]) for item in items}
                if have == want:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nodes did not register within {timeout}s: want "
                                       f"{sorted(want)}, etcd has {sorted(have)}")
                time.sleep(0.05)
        finally:
            coordinator.close()

    def close(self) -> None:
        for node in self.nodes:
            try:
                node.stop()
            except Exception as exc:  # noqa: BLE001 - keep tearing down
                print(f"teardown: stopping node pid {node.pid}: {exc}", flush=True)
        if self.etcd is not None:
            self.etcd.stop()
        if self.lab is not None:
            self.lab.close()      # only after every process in it is gone


def run(nodes: int = 3, tasks: int = 60, mode: str = "auto") -> int:
    from chaos.netns import netns_available
    if mode == "auto":
        reason = netns_available()
        mode = "netns" if reason is None else "loopback"
        if reason:
            print(f"(network namespaces unavailable: {reason})", flush=True)
    print(f"mode: {mode}", flush=True)
    base = tempfile.mkdtemp(prefix="meshray-topology-")
    topology = None
    try:
        topology = Topology(base, netns=(mode == "netns"))
        return _job(topology, nodes, tasks)
    finally:
        os.environ.pop("MESHRAY_PREFERRED_NODE", None)
        import meshray
        if meshray.is_initialized():
            meshray.shutdown()
        if topology is not None:
            topology.close()
        shutil.rmtree(base, ignore_errors=True)
        print("torn down", flush=True)


def _job(topology: Topology, nodes: int, tasks: int) -> int:
    import meshray as ray
    print(f"etcd members: {topology.endpoints}", flush=True)
    started = [topology.add_node(i) for i in range(nodes)]
    topology.wait_registered({n.node_id for n in started})
    print("nodes: " + ", ".join(f"{n.node_id[:12]}@{n.address}" for n in started), flush=True)
    os.environ["MESHRAY_PREFERRED_NODE"] = started[0].node_id
    ray.init(address=topology.endpoints, _token=topology.token, log_to_driver=False)
    addresses = sorted(n["Address"] for n in ray.nodes() if n.get("Alive"))
    print("node addresses seen by the driver: " + ", ".join(addresses), flush=True)

    @ray.remote(num_cpus=1, max_retries=5)
    def square(i):
        time.sleep(0.1)
        return i * i, ray.get_runtime_context().get_node_id()

    @ray.remote(num_cpus=1, max_retries=5)
    def checksum(blob):
        return sum(blob[::4096]), ray.get_runtime_context().get_node_id()

    refs = [square.remote(i) for i in range(tasks)]
    victim = started[-1]
    faults_done = threading.Event()

    def faults():
        time.sleep(1.0)
        print(f"fault: SIGKILL node {victim.node_id[:12]} (pid {victim.pid})", flush=True)
        victim.kill()
        leader = topology.etcd.leader_index()
        which = "the leader" if leader is not None else "no leader known; member 0"
        index = leader if leader is not None else 0
        print(f"fault: SIGKILL etcd member {index} at "
              f"{topology.etcd.members[index].endpoint} ({which})", flush=True)
        topology.etcd.kill_member(index)
        faults_done.set()

    injector = threading.Thread(target=faults, name="faults")
    injector.start()
    results = ray.get(refs, timeout=240)
    injector.join()
    wrong = [i for i, (value, _node) in enumerate(results) if value != i * i]
    used = {node for _value, node in results}
    print(f"{len(results)} results from {len(used)} node(s); wrong: {wrong}", flush=True)

    # After the faults: new work, and an 8 MiB object read on every survivor
    # (across the bridge in netns mode).
    after = ray.get(square.remote(7), timeout=120)
    print(f"after the faults a new task ran on {after[1][:12]}", flush=True)
    survivors = len(started) - 1
    blob = bytes(range(256)) * (32 * 1024)
    blob_ref = ray.put(blob)
    sums = ray.get([checksum.options(scheduling_strategy="SPREAD").remote(blob_ref)
                    for _ in range(2 * survivors)], timeout=120)
    intact = all(value == sum(blob[::4096]) for value, _node in sums)
    print(f"8 MiB object read on {len({n for _v, n in sums})} node(s), intact: {intact}",
          flush=True)
    ok = (faults_done.is_set() and not wrong and len(results) == tasks and len(used) > 1
          and after[0] == 49 and after[1] != victim.node_id and intact)
    print("OK" if ok else "FAIL", flush=True)
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=60)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--loopback", action="store_true",
                       help="run on loopback ports even where namespaces are available")
    group.add_argument("--netns", action="store_true",
                       help="require network namespaces (fail rather than fall back)")
    args = parser.parse_args(argv)
    if args.nodes < 2:
        parser.error("--nodes must be at least 2 (one is killed, the driver sits on another)")
    mode = "loopback" if args.loopback else "netns" if args.netns else "auto"
    return run(args.nodes, args.tasks, mode)


if __name__ == "__main__":
    sys.exit(main())
