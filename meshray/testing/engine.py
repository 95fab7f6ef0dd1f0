"""The engine behind every local cluster harness: etcd, node daemons, faults.

`meshray.testing.Cluster` (Ray's test interface), the chaos runner's local
cluster and the topology script need the same parts: an etcd with auth on
(one member, or several that can lose their leader), node daemons joined to
it -- on loopback, or each in a network namespace of its own -- the
credentials the cluster token derives, faults aimed at daemons and etcd
members (kill, pause, restart, partition), and a view of the node records
etcd holds. They are built once, here; each harness keeps only what is its
own.

Everything is started by this process, tracked by pid and torn down by
`ClusterEngine.close()`: daemons, etcd members, namespaces and links, and the
engine's directory.

etcd members die with the *thread* that started them (PR_SET_PDEATHSIG, so a
crashed harness never leaves one behind), so they are started and restarted
from a thread that lives as long as the engine -- its launcher thread, or,
for a member inside a namespace, that namespace's own thread -- never from
whichever short-lived thread (a nemesis, a fixture) asked for the restart.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from meshray.coordination.embedded import EmbeddedEtcd, EtcdCluster

__all__ = ["ClusterEngine", "EtcdView", "NETWORKS", "NetnsEtcdCluster", "process_tree",
           "pause_tree", "resume_pids"]

log = logging.getLogger(__name__)

LOOPBACK = "loopback"
NETNS = "netns"
NETWORKS = (LOOPBACK, NETNS)
DEFAULT_OBJECT_STORE_BYTES = 256 * 1024 * 1024


# ------------------------------------------------------------------ process trees
def process_tree(pid: int) -> list[int]:
    """Pids of every descendant of `pid` (empty when it is gone)."""
    import psutil
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def pause_tree(pid: int) -> list[int]:
    """SIGSTOP `pid` and its descendants -- a frozen machine, not a dead one.

    Children are stopped before the parent so none is forked unseen while
    the walk runs. Returns the pids actually stopped, for `resume_pids`.
    """
    import psutil
    stopped = []
    for target in process_tree(pid) + [pid]:
        try:
            psutil.Process(target).send_signal(signal.SIGSTOP)
            stopped.append(target)
        except psutil.Error:
            continue
    return stopped


def resume_pids(pids: list[int]) -> None:
    """SIGCONT what `pause_tree` stopped, parent first."""
    import psutil
    for target in reversed(pids):
        try:
            psutil.Process(target).send_signal(signal.SIGCONT)
        except psutil.Error:
            continue


# ------------------------------------------------------------------ etcd view
class EtcdView:
    """What a harness reads from a cluster's etcd: node records, availability.

    Logs in with the credentials the cluster token derives, like a member.
    What it reads is the cluster's own bookkeeping, decoded as data only.
    """

    def __init__(self, address: str = "", token: str | None = None):
        self.address = address
        self.token = token
        self._coordinator = None

    def coordinator(self):
        """An etcd client of this cluster's store (closed by `close_view()`)."""
        if self._coordinator is None:
            if not self.address:
                raise RuntimeError("this cluster has no etcd address yet (not started)")
            from meshray import security
            from meshray.coordination.client import Coordinator
            self._coordinator = Coordinator(self.address.split(","), timeout=5.0,
                                            **security.etcd_client_options(token=self.token))
        return self._coordinator

    def node_ids(self, timeout: float = 5.0) -> set[str]:
        """Ids of the nodes registered now (live leases only)."""
        from meshray.coordination import keyspace
        keys = keyspace.Keyspace()
        items, _rev = self.coordinator().get_prefix(keys.nodes_prefix(), timeout=timeout)
        return {keys.parse_node(item.key) for item in items}

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

    def wait_for_nodes(self, want: set[str], *, exact: bool = True,
                       timeout: float = 30.0) -> None:
        """Block until etcd lists the node ids in `want` -- exactly them, or
        (``exact=False``) at least them. An etcd that does not answer (a
        leader election) is retried until the deadline."""
        want = set(want)
        deadline = time.monotonic() + timeout
        error = None
        while True:
            try:
                have = self.node_ids()
                error = None
            except Exception as exc:  # noqa: BLE001 - etcd may be electing
                have, error = set(), exc
            if have == want or (not exact and want <= have):
                return
            if time.monotonic() > deadline:
                why = f" (last read failed: {error})" if error is not None else ""
                raise TimeoutError(f"nodes did not register within {timeout}s: want "
                                   f"{sorted(want)}, etcd has {sorted(have)}{why}")
            time.sleep(0.05)

    def close_view(self) -> None:
        if self._coordinator is not None:
            try:
                self._coordinator.close()
            except Exception:  # noqa: BLE001 - closing a client of a dead etcd
                log.debug("closing the etcd client failed", exc_info=True)
            self._coordinator = None


# ------------------------------------------------------------------ etcd members
class _SingleEtcd:
    """One member behind `EtcdCluster`'s interface, its raft port on a unix
    socket (a lone member has no peers; a TCP peer port would let any local
    user speak raft to it and go around auth)."""

    def __init__(self, member: EmbeddedEtcd):
        self.members = [member]

    @property
    def endpoints(self) -> list[str]:
        return [self.members[0].endpoint]

    def leader_index(self, timeout: float = 1.0) -> int | None:
        return 0 if self.members[0].healthy(timeout) else None

    def stop_member(self, index: int, timeout: float = 5.0) -> None:
        self.members[index].stop(timeout, remove_data=False)

    def kill_member(self, index: int) -> None:
        self.members[index].kill()

    def restart_member(self, index: int, timeout: float = 10.0) -> None:
        """Start the member again on its data and address."""
        member = self.members[index]
        if member.is_running():
            raise RuntimeError(f"etcd member {index} is still running")
        member.start(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self.members[0].stop(timeout)


class NetnsEtcdCluster(EtcdCluster):
    """An EtcdCluster whose members each live in a namespace of `lab`.

    Members use etcd's standard ports (2379 client, 2380 peer) on their own
    address, as separate hosts would, so there is no port race to retry.
    Each is launched -- and relaunched -- from the lab's long-lived thread
    for its namespace, which it dies with.
    """

    def __init__(self, base_dir: str, lab, slots: list[str], **kwargs):
        self.lab, self.slots = lab, slots
        super().__init__(base_dir, size=len(slots), **kwargs)

    def _plan_members(self) -> None:
        hosts = [self.lab.add_slot(slot) for slot in self.slots]
        names = [f"m{i}" for i in range(len(hosts))]
        initial = ",".join(f"{n}=http://{h}:2380" for n, h in zip(names, hosts))
        token = f"meshray-netns-{uuid.uuid4().hex[:12]}"
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

    def restart_member(self, i: int, timeout: float = 10.0) -> None:
        self.lab.executor(self.slots[i]).submit(
            super().restart_member, i, timeout).result(timeout=timeout + 10)


# ------------------------------------------------------------------ the engine
class ClusterEngine(EtcdView):
    """etcd plus node daemons started here, with the faults tests inject.

    ``etcd_members``: 1 (a private single member) or more (a raft cluster
    whose leader can be killed). ``network``: ``"loopback"`` (everything on
    127.0.0.1) or ``"netns"`` (root only: every node in a network namespace
    of its own on a private bridge; etcd on the bridge, or with
    ``etcd_in_namespaces`` each member in a namespace too). Given
    ``etcd_endpoints`` no etcd is started: nodes join that one.

    `close()` removes ``base_dir`` (a fresh temporary directory when not
    given) unless told to keep it.
    """

    def __init__(self, *, etcd_members: int = 1, network: str = LOOPBACK,
                 etcd_in_namespaces: bool = False, etcd_endpoints: str | None = None,
                 token: str | None = None, lease_ttl: float = 2.0,
                 object_store_memory: int = DEFAULT_OBJECT_STORE_BYTES,
                 base_dir: str | None = None, dir_prefix: str = "meshray-cluster-"):
        if isinstance(etcd_members, bool) or not isinstance(etcd_members, int) \
                or etcd_members < 1:
            raise ValueError(f"etcd_members must be an int >= 1, got {etcd_members!r}")
        if network not in NETWORKS:
            raise ValueError(f"network must be one of {', '.join(NETWORKS)}, got {network!r}")
        if etcd_in_namespaces and network != NETNS:
            raise ValueError(f"etcd_in_namespaces=True needs network={NETNS!r}, "
                             f"got network={network!r}")
        if etcd_endpoints is not None and (etcd_members != 1 or etcd_in_namespaces):
            raise ValueError(f"etcd_endpoints={etcd_endpoints!r} names an etcd this engine "
                             "does not start: etcd_members and etcd_in_namespaces do not apply")
        if not (isinstance(lease_ttl, (int, float)) and lease_ttl > 0):
            raise ValueError(f"lease_ttl must be a positive number of seconds, "
                             f"got {lease_ttl!r}")
        super().__init__(etcd_endpoints or "", token)
        self.etcd_members = etcd_members
        self.network = network
        self.etcd_in_namespaces = etcd_in_namespaces
        self.lease_ttl = lease_ttl
        self.object_store_memory = object_store_memory
        self._external_etcd = etcd_endpoints is not None
        if base_dir is None:
            base_dir = tempfile.mkdtemp(prefix=dir_prefix)
        else:
            os.makedirs(base_dir, exist_ok=True)
        self.base_dir = base_dir
        self.etcd = None
        self.lab = None
        self.nodes: list = []                      # every NodeProcess started here
        self._launches: dict[int, tuple] = {}      # node pid -> (name, host, options)
        self._paused: dict[int, list[int]] = {}    # node pid -> pids it stopped
        self._partitioned: set = set()
        self._next_name = 0
        self._started = False
        self._closed = False
        self._launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshray-launcher")

    # ------------------------------------------------------------ lifecycle
    @property
    def host(self) -> str:
        """The address etcd (outside namespaces) and drivers use."""
        return self.lab.bridge_ip if self.lab is not None else "127.0.0.1"

    def start(self) -> "ClusterEngine":
        """Token, network and etcd; nodes come with `start_node`."""
        if self._started:
            raise RuntimeError("this ClusterEngine was already started")
        self._started = True
        from meshray import security
        from meshray.node.launcher import new_token
        try:
            # The token first: etcd runs with auth on, its root password
            # derived from the token, like a node's embedded etcd.
            self.token = self.token or new_token()
            if self.network == NETNS:
                from meshray.testing.netns import NetnsLab
                self.lab = NetnsLab()
            if not self._external_etcd:
                password = security.etcd_password(self.token)
                self.etcd = self._launcher.submit(self._start_etcd, password).result()
                self.address = ",".join(self.etcd.endpoints)
        except BaseException:
            self.close()
            raise
        return self

    def _start_etcd(self, password: str):
        from meshray import security
        path = os.path.join(self.base_dir, "etcd")
        if self.etcd_in_namespaces:
            slots = [f"e{i}" for i in range(self.etcd_members)]
            return NetnsEtcdCluster(path, self.lab, slots, auth_password=password)
        if self.etcd_members == 1:
            member = EmbeddedEtcd(path, host=self.host, private_peer=True,
                                  auth_user=security.ETCD_ROOT_USER, auth_password=password)
            member.start()
            return _SingleEtcd(member)
        return EtcdCluster(path, size=self.etcd_members, host=self.host,
                           auth_password=password)

    def close(self, keep_dir: bool = False) -> None:
        """Stop every node and etcd member started here (by pid), remove
        namespaces and links, and the engine's directory unless `keep_dir`."""
        if self._closed:
            return
        self._closed = True
        try:
            self.stop_nodes()
        finally:
            self.close_view()
            if self.etcd is not None:
                try:
                    self.etcd.stop()
                except Exception:  # noqa: BLE001 - keep tearing down
                    log.exception("stopping etcd failed")
            if self.lab is not None:
                self.lab.close()        # only after every process in it is gone
            self._launcher.shutdown(wait=False)
            if not keep_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)

    # ------------------------------------------------------------ nodes
    def start_node(self, name=None, *, host: str | None = None, **kwargs):
        """Start a node daemon joined to this cluster and wait until it serves.

        In netns mode it runs in the namespace called `name` (made on first
        use, so a restarted node keeps its address); an explicit `host`
        starts it in this namespace instead. Other keyword arguments go to
        `meshray.node.launcher.start_node` and override the engine's
        defaults (etcd endpoints, token, lease, object store size).
        """
        from meshray.node.launcher import start_node
        if not self._started or self._closed:
            raise RuntimeError("start the ClusterEngine before its nodes (and not after close)")
        options = dict(etcd=self.address, token=self.token, lease_ttl=self.lease_ttl,
                       object_store_memory=self.object_store_memory)
        options.update(kwargs)
        if self.lab is not None and host is None:
            if name is None:
                name, self._next_name = f"n{self._next_name}", self._next_name + 1
            address = self.lab.add_slot(name)
            process = self._launcher.submit(self.lab.run_in, name, start_node,
                                            host=address, **options).result()
        else:
            process = self._launcher.submit(start_node, host=host or "127.0.0.1",
                                            **options).result()
        self._launches[process.pid] = (name, host, kwargs)
        self.nodes.append(process)
        return process

    def wait_for_nodes(self, want: set[str], *, exact: bool = True,
                       timeout: float = 30.0) -> None:
        """As :meth:`EtcdView.wait_for_nodes`; a timeout also quotes the last
        lines of the log of each node started here that is still missing,
        since the test's temporary directories go with its teardown."""
        try:
            super().wait_for_nodes(want, exact=exact, timeout=timeout)
        except TimeoutError as exc:
            try:
                missing = set(want) - self.node_ids()
            except Exception:  # noqa: BLE001 - etcd may not answer: quote them all
                missing = set(want)
            tails = [_log_tail(node) for node in self.nodes
                     if node.info.get("node_id") in missing]
            if not tails:
                raise
            raise TimeoutError("\n".join([str(exc), *tails])) from exc

    def kill_node(self, node) -> None:
        """SIGKILL a daemon (a crash); its workers die with it."""
        self._paused.pop(node.pid, None)
        node.kill()

    def stop_node(self, node, timeout: float = 10.0) -> None:
        """Stop a daemon gracefully, or kill it if it will not stop."""
        self.resume_node(node)
        try:
            node.stop(timeout=timeout)
        except Exception:  # noqa: BLE001 - fall back to SIGKILL
            log.warning("node pid %s did not stop; killing it", node.pid, exc_info=True)
            node.kill()

    def restart_node(self, node, **kwargs):
        """Kill `node` if it still runs and start a fresh daemon in its place
        (same namespace, same launch options unless overridden); the new
        daemon has a new node id."""
        if node.alive():
            self.kill_node(node)
        name, host, options = self._launches[node.pid]
        return self.start_node(name, host=host, **{**options, **kwargs})

    def pause_node(self, node) -> list[int]:
        """SIGSTOP a daemon and its workers; returns the pids stopped."""
        stopped = pause_tree(node.pid)
        self._paused.setdefault(node.pid, []).extend(stopped)
        return stopped

    def resume_node(self, node) -> None:
        resume_pids(self._paused.pop(node.pid, []))

    def partition(self, name) -> None:
        """Take node `name`'s link down: everything, both ways (netns only)."""
        if self.lab is None:
            raise RuntimeError(f"partitions need network={NETNS!r}; this engine runs "
                               f"network={self.network!r}")
        self.lab.partition(name)
        self._partitioned.add(name)

    def heal(self, name) -> None:
        if self.lab is None:
            raise RuntimeError(f"partitions need network={NETNS!r}; this engine runs "
                               f"network={self.network!r}")
        self.lab.heal(name)
        self._partitioned.discard(name)

    def stop_nodes(self) -> None:
        """Stop every node still running: paused ones resumed and partitioned
        ones healed first, so each leaves the cluster as it normally would."""
        for node in list(self.nodes):
            self.resume_node(node)
        for name in list(self._partitioned):
            try:
                self.heal(name)
            except Exception:  # noqa: BLE001 - keep tearing down
                log.exception("healing the partition of %s failed", name)
        for node in list(self.nodes):
            if node.alive():
                self.stop_node(node)

    # ------------------------------------------------------------ etcd faults
    def etcd_pids(self) -> list[int]:
        return [m.pid for m in self.etcd.members if m.pid] if self.etcd is not None else []

    def _need_etcd(self):
        if self.etcd is None:
            raise RuntimeError("this engine started no etcd (it joined etcd_endpoints, "
                               "or was not started)")
        return self.etcd

    def kill_etcd_member(self, index: int) -> None:
        self._need_etcd().kill_member(index)

    def stop_etcd_member(self, index: int, timeout: float = 5.0) -> None:
        self._need_etcd().stop_member(index, timeout)

    def restart_etcd_member(self, index: int, timeout: float = 20.0) -> None:
        """Start a killed or stopped member again on its data and address
        (from a thread that outlives the call: see the module docstring)."""
        etcd = self._need_etcd()
        if isinstance(etcd, NetnsEtcdCluster):
            etcd.restart_member(index, timeout)
        else:
            self._launcher.submit(etcd.restart_member, index, timeout).result()

    def etcd_leader(self, timeout: float = 10.0) -> int | None:
        """Index of the member that leads, waiting up to `timeout` for one."""
        etcd = self._need_etcd()
        deadline = time.monotonic() + timeout
        while True:
            leader = etcd.leader_index()
            if leader is not None or time.monotonic() > deadline:
                return leader
            time.sleep(0.1)


def _log_tail(node, lines: int = 40) -> str:
    """The end of a node's log (and its stderr), headed by its id and pid."""
    from meshray.node.launcher import session_log_tail
    return (f"--- node {node.info.get('node_id', '?')[:12]} pid {node.pid} "
            f"(alive: {node.alive()}), {node.session_dir}\n"
            + session_log_tail(node.session_dir, lines))
