"""`Cluster`: several real node daemons on one machine, for tests.

Same interface as Ray's `ray.cluster_utils.Cluster`, so tests port
unchanged. Unlike Ray's, no node is special: etcd runs as its own process
owned by the Cluster object, so any node -- the first one included -- can be
killed and the others carry on. That etcd runs with auth on, like a node's
embedded one: members log in with credentials derived from the cluster token.

The processes, faults and etcd view come from `meshray.testing.engine`; this
module only adds Ray's names on top. `engine` is there for what Ray's class
has no name for: a 3-member etcd whose leader a test kills, namespaces.
"""
from __future__ import annotations

from meshray.testing.engine import ClusterEngine

__all__ = ["Cluster", "ClusterNode"]

DEFAULT_TEST_LEASE_TTL_S = 2.0


class ClusterNode:
    """A node daemon process started by a Cluster."""

    def __init__(self, process, args: dict, engine: ClusterEngine | None = None):
        self._process = process
        self._engine = engine
        self.node_args = args

    @property
    def node_id(self) -> str:
        return self._process.node_id

    unique_id = node_id

    @property
    def address(self) -> str:
        return self._process.address

    @property
    def pid(self) -> int:
        return self._process.pid

    def alive(self) -> bool:
        return self._process.alive()

    def kill(self) -> None:
        self._process.kill()

    def stop(self) -> None:
        self._process.stop()

    def pause(self) -> None:
        """SIGSTOP the daemon and its workers (a frozen machine)."""
        self._engine.pause_node(self._process)

    def resume(self) -> None:
        self._engine.resume_node(self._process)

    def __repr__(self):
        return f"ClusterNode({self.node_id}, pid={self.pid})"


class Cluster:
    def __init__(self, initialize_head: bool = False, connect: bool = False,
                 head_node_args: dict | None = None, shutdown_at_exit: bool = True,
                 *, lease_ttl: float = DEFAULT_TEST_LEASE_TTL_S, etcd_endpoints: str | None = None,
                 etcd_members: int = 1, network: str = "loopback"):
        self.engine = ClusterEngine(etcd_members=etcd_members, network=network,
                                    etcd_endpoints=etcd_endpoints, lease_ttl=lease_ttl,
                                    dir_prefix="meshray-cluster-")
        self._nodes: list[ClusterNode] = []
        self._removed: list[ClusterNode] = []
        self.head_node = None
        self.connected = False
        self.engine.start()
        if shutdown_at_exit:
            import atexit
            atexit.register(self.shutdown)
        if initialize_head:
            self.head_node = self.add_node(**(head_node_args or {}))
            if connect:
                self.connect()

    @property
    def address(self) -> str:
        """The etcd endpoint(s): what `meshray.init(address=...)` takes."""
        return self.engine.address

    @property
    def token(self) -> str:
        return self.engine.token

    @property
    def etcd_pid(self) -> int | None:
        """The pid of the (first) etcd member this Cluster runs (None for
        external etcd): fault tests freeze it with SIGSTOP."""
        pids = self.engine.etcd_pids()
        return pids[0] if pids else None

    @property
    def worker_nodes(self) -> set[ClusterNode]:
        """Every live node but the head, as in Ray."""
        return {node for node in self._nodes if node is not self.head_node}

    def connect(self, namespace: str | None = None, **init_args):
        import meshray
        meshray.init(address=self.address, namespace=namespace, _token=self.token, **init_args)
        self.connected = True
        return meshray

    def add_node(self, wait: bool = True, num_cpus: float | None = 1, num_gpus: float | None = None,
                 resources: dict | None = None, labels: dict | None = None,
                 object_store_memory: int | None = None, env: dict | None = None,
                 node_id: str | None = None, **ignored) -> ClusterNode:
        import os
        args = {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": resources,
                "labels": labels, "object_store_memory": object_store_memory}
        child_env = dict(os.environ)
        child_env.update(env or {})
        extra = {} if node_id is None else {"node_id": node_id}
        process = self.engine.start_node(
            num_cpus=num_cpus, num_gpus=num_gpus, resources=resources, labels=labels,
            object_store_memory=object_store_memory or self.engine.object_store_memory,
            env=child_env, **extra)
        node = ClusterNode(process, args, self.engine)
        self._nodes.append(node)
        if wait:
            self.wait_for_nodes()
        return node

    def remove_node(self, node: ClusterNode, allow_graceful: bool = True) -> None:
        """Stop a node: gracefully (SIGTERM) or as a crash (SIGKILL)."""
        if allow_graceful:
            self.engine.stop_node(node._process)
        else:
            self.engine.kill_node(node._process)
        if node in self._nodes:
            self._nodes.remove(node)
            self._removed.append(node)
        if node is self.head_node:
            self.head_node = None

    def list_all_nodes(self) -> list[ClusterNode]:
        return list(self._nodes)

    def coordinator(self):
        """An etcd client of this cluster's store, logged in with the
        credentials the token gives (closed by shutdown())."""
        return self.engine.coordinator()

    def _registered(self) -> set[str]:
        return self.engine.node_ids()

    def wait_for_nodes(self, timeout: float = 30.0) -> None:
        """Block until etcd shows exactly the live nodes (removed ones gone)."""
        self.engine.wait_for_nodes({node.node_id for node in self._nodes}, timeout=timeout)

    def shutdown(self) -> None:
        if self.connected:
            import meshray
            meshray.shutdown()
            self.connected = False
        self._nodes.clear()
        self.engine.close()
