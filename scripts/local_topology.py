"""The docker-compose topology as plain processes, with faults.

Starts a 3-member etcd cluster and 3 meshray nodes on this machine, runs a
job across them, and while the job runs SIGKILLs one node that the driver
does not sit on and the etcd leader. The job must still finish with every
result correct. Exit code 0 means it did.

    python scripts/local_topology.py [--nodes 3] [--tasks 60] [--loopback]

Two modes; the first output line says which one ran:

* netns (the default as root, where `ip netns` works): like the compose
  file, every etcd member and every node is its own "host" -- a network
  namespace with its own address on a private bridge
  (meshray/testing/netns.py). etcd members listen on <address>:2379/2380
  as in compose; nodes bind and advertise their address, so everything
  between them crosses a real interface. A non-loopback bind needs a
  cluster token, so one is generated and handed to nodes and driver
  (compose's shared secret). The driver stays in the root namespace, which
  reaches every address over the bridge, and attaches to its node through
  that node's unix socket.
* loopback (`--loopback`, or when not root / namespaces unavailable): the
  same processes on 127.0.0.1 with free ports.

Everything is torn down on exit, faults or not: processes by pid,
namespaces and links by name, session and store dirs. The processes and
namespaces come from meshray's cluster engine (meshray/testing/engine.py);
this script holds the scenario and its command line.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import cloudpickle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)     # this checkout's meshray, whatever is installed

from meshray.testing.engine import ClusterEngine  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])

LEASE_TTL_S = 2.0
ETCD_MEMBERS = 3


def run(nodes: int = 3, tasks: int = 60, mode: str = "auto") -> int:
    from meshray.testing.netns import netns_available
    if mode == "auto":
        reason = netns_available()
        mode = "netns" if reason is None else "loopback"
        if reason:
            print(f"(network namespaces unavailable: {reason})", flush=True)
    print(f"mode: {mode}", flush=True)
    # Like the compose file: in netns mode every etcd member is a "host" too.
    engine = ClusterEngine(etcd_members=ETCD_MEMBERS, network=mode,
                           etcd_in_namespaces=(mode == "netns"), lease_ttl=LEASE_TTL_S,
                           dir_prefix="meshray-topology-")
    try:
        engine.start()
        if engine.lab is not None:
            print(f"netns lab: tag {engine.lab.tag}, bridge {engine.lab.bridge} "
                  f"({engine.lab.subnet})", flush=True)
        return _job(engine, nodes, tasks)
    finally:
        os.environ.pop("MESHRAY_PREFERRED_NODE", None)
        import meshray
        if meshray.is_initialized():
            meshray.shutdown()
        engine.close()
        print("torn down", flush=True)


def _job(engine: ClusterEngine, nodes: int, tasks: int) -> int:
    import meshray as ray
    print(f"etcd members: {engine.address}", flush=True)
    started = [engine.start_node(f"n{i}", num_cpus=1) for i in range(nodes)]
    engine.wait_for_nodes({n.node_id for n in started})
    print("nodes: " + ", ".join(f"{n.node_id[:12]}@{n.address}" for n in started), flush=True)
    os.environ["MESHRAY_PREFERRED_NODE"] = started[0].node_id
    ray.init(address=engine.address, _token=engine.token, log_to_driver=False)
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
        engine.kill_node(victim)
        leader = engine.etcd.leader_index()
        which = "the leader" if leader is not None else "no leader known; member 0"
        index = leader if leader is not None else 0
        print(f"fault: SIGKILL etcd member {index} at "
              f"{engine.etcd.members[index].endpoint} ({which})", flush=True)
        engine.kill_etcd_member(index)
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
