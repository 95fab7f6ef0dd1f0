"""`Cluster`: several real node daemons on one machine, for tests.

Same interface as Ray's `ray.cluster_utils.Cluster`, so tests port
unchanged. Unlike Ray's, no node is special: etcd runs as its own process
owned by the Cluster object, so any node -- the first one included -- can be
killed and the others carry on. That etcd runs with auth on, like a node's
embedded one: members log in with credentials derived from the cluster token.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

__all__ = ["Cluster", "ClusterNode"]

DEFAULT_TEST_LEASE_TTL_S = 2.0


class ClusterNode:
    """A node daemon process started by a Cluster."""

    def __init__(self, process, args: dict):
        self._process = process
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

    def __repr__(self):
        return f"ClusterNode({self.node_id}, pid={self.pid})"


class Cluster:
    def __init__(self, initialize_head: bool = False, connect: bool = False,
                 head_node_args: dict | None = None, shutdown_at_exit: bool = True,
                 *, lease_ttl: float = DEFAULT_TEST_LEASE_TTL_S, etcd_endpoints: str | None = None):
        from meshray import security
        from meshray.coordination.embedded import EmbeddedEtcd
        from meshray.node.launcher import new_token

        self._dir = tempfile.mkdtemp(prefix="meshray-cluster-")
        self._lease_ttl = lease_ttl
        self._token = new_token()
        self._nodes: list[ClusterNode] = []
        self._removed: list[ClusterNode] = []
        self._etcd = None
        self._coordinator = None
        if etcd_endpoints is None:
            self._etcd = EmbeddedEtcd(os.path.join(self._dir, "etcd"), private_peer=True,
                                      auth_user=security.ETCD_ROOT_USER,
                                      auth_password=security.etcd_password(self._token))
            self._etcd.start()
            etcd_endpoints = self._etcd.endpoint
        self._endpoints = etcd_endpoints
        self.head_node = None
        self.connected = False
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
        return self._endpoints

    @property
    def token(self) -> str:
        return self._token

    @property
    def etcd_pid(self) -> int | None:
        """The pid of the etcd member this Cluster runs (None for external
        etcd): fault tests freeze it with SIGSTOP."""
        return self._etcd.pid if self._etcd is not None else None

    def connect(self, namespace: str | None = None, **init_args):
        import meshray
        meshray.init(address=self.address, namespace=namespace, _token=self._token, **init_args)
        self.connected = True
        return meshray

    def add_node(self, wait: bool = True, num_cpus: float | None = 1, num_gpus: float | None = None,
                 resources: dict | None = None, labels: dict | None = None,
                 object_store_memory: int | None = None, env: dict | None = None,
                 **ignored) -> ClusterNode:
        from meshray.node.launcher import start_node
        args = {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": resources,
                "labels": labels, "object_store_memory": object_store_memory}
        child_env = dict(os.environ)
        child_env.update(env or {})
        process = start_node(
            etcd=self._endpoints, num_cpus=num_cpus, num_gpus=num_gpus, resources=resources,
            labels=labels, object_store_memory=object_store_memory or 256 * 1024 * 1024,
            token=self._token, lease_ttl=self._lease_ttl, env=child_env)
        node = ClusterNode(process, args)
        self._nodes.append(node)
        if wait:
            self.wait_for_nodes()
        return node

    def remove_node(self, node: ClusterNode, allow_graceful: bool = True) -> None:
        """Stop a node: gracefully (SIGTERM) or as a crash (SIGKILL)."""
        if allow_graceful:
            node.stop()
        else:
            node.kill()
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
        if self._coordinator is None:
            from meshray import security
            from meshray.coordination.client import Coordinator
            self._coordinator = Coordinator(
                self._endpoints.split(","), timeout=5.0,
                **security.etcd_client_options(token=self._token))
        return self._coordinator

    def _registered(self) -> set[str]:
        from meshray.coordination import keyspace
        keys = keyspace.Keyspace()
        items, _rev = self.coordinator().get_prefix(keys.nodes_prefix())
        return {keys.parse_node(item[0]) for item in items}

    def wait_for_nodes(self, timeout: float = 30.0) -> None:
        """Block until etcd shows exactly the live nodes (removed ones gone)."""
        wanted = {node.node_id for node in self._nodes}
        deadline = time.monotonic() + timeout
        while True:
            registered = self._registered()
            if registered == wanted:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for nodes: want {sorted(wanted)}, "
                                   f"etcd has {sorted(registered)}")
            time.sleep(0.05)

    def shutdown(self) -> None:
        if self.connected:
            import meshray
            meshray.shutdown()
            self.connected = False
        for node in self._nodes:
            node.stop()
        self._nodes.clear()
        if self._coordinator is not None:
            self._coordinator.close()
            self._coordinator = None
        if self._etcd is not None:
            self._etcd.stop()
            self._etcd = None
        shutil.rmtree(self._dir, ignore_errors=True)
