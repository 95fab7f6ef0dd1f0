"""Process entry point of a node daemon: `python -m meshray.node.main`.

Started by `meshray.init()` (then it watches a pipe from its driver and exits
with it, even when the driver is SIGKILLed) or by `meshray start`. With
--embedded-etcd it also runs the cluster's etcd member as its own child --
with etcd auth on when there is a cluster token, restarted if it dies --
and takes it down on exit.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import re
import shutil
import signal
import sys
import time

from meshray.common.heap import settle_heap
from meshray.node.drain import DRAIN_TIMEOUT_HELP

__all__ = ["main"]

log = logging.getLogger("meshray.node")


def _node_id(text: str) -> str:
    """Peers refuse batches from a node id of any other length (rpc/rules.py)."""
    from meshray.rpc.rules import NODE_ID_LEN
    if text and not re.fullmatch(r"[0-9a-f]{%d}" % (2 * NODE_ID_LEN), text):
        raise argparse.ArgumentTypeError(
            f"--node-id={text!r}: expected {2 * NODE_ID_LEN} lower-case hex digits")
    return text


def _port(text: str, flag: str = "--metrics-export-port") -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"{flag}={text!r}: expected a port number 0..65535 (0: a free port)")
    return port


def _parse(argv):
    parser = argparse.ArgumentParser(prog="meshray-node")
    parser.add_argument("--session-dir", required=True)
    parser.add_argument("--owns-session-dir", action="store_true")
    parser.add_argument("--node-id", default="", type=_node_id,
                        help="32 hex digits (default: a random id)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--advertise-host", default="",
                        help="address peers use to reach this node (default: --host, or this "
                             "machine's address when --host is 0.0.0.0)")
    parser.add_argument("--etcd", default="", help="comma-separated etcd endpoints")
    parser.add_argument("--embedded-etcd", action="store_true")
    parser.add_argument("--num-cpus", type=float, default=None)
    parser.add_argument("--num-gpus", type=float, default=None)
    parser.add_argument("--resources", default="{}")
    parser.add_argument("--labels", default="{}")
    parser.add_argument("--object-store-memory", type=int, default=None)
    parser.add_argument("--ready-fd", type=int, default=-1)
    parser.add_argument("--parent-fd", type=int, default=-1)
    parser.add_argument("--lease-ttl", type=float, default=None)
    parser.add_argument("--prestart-workers", type=int, default=None)
    parser.add_argument("--metrics-export-port", type=_port, default=0,
                        help="port of the Prometheus endpoint on --host (default: a free port)")
    parser.add_argument("--dashboard-port", type=lambda text: _port(text, "--dashboard-port"),
                        default=None, help="port of the HTTP API (jobs) on --host (default: "
                                           "8265, or a free port when taken)")
    parser.add_argument("--data-port", type=lambda text: _port(text, "--data-port"), default=0,
                        help="port of the data link (large objects' bytes between nodes) on "
                             "--host (default: a free port)")
    parser.add_argument("--no-dashboard", action="store_true",
                        help="serve no HTTP API (no dashboard, no jobs API): init("
                             "include_dashboard=False) for the node it starts")
    parser.add_argument("--memory", type=_bytes, default=None,
                        help="bytes of memory tasks may reserve (Ray's `memory` resource; "
                             "default: 70%% of this machine's memory)")
    parser.add_argument("--drain-timeout", type=_seconds, default=None, help=DRAIN_TIMEOUT_HELP)
    parser.add_argument("--cli", action="store_true", help="started by `meshray start`")
    return parser.parse_args(argv)


def _bytes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--memory={text!r}: expected a number of bytes > 0")
    return value


def _seconds(text: str) -> float:
    from meshray.node.drain import drain_timeout
    try:
        return drain_timeout(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--drain-timeout={text!r}: expected a finite number of seconds >= 0") from None


def node_resources(args, gpus) -> dict:
    """Total resources this node offers, with Ray's names and defaults."""
    import psutil

    from meshray.object_store.shm_dirs import default_capacity

    custom = json.loads(args.resources)
    if not isinstance(custom, dict):
        raise ValueError(f"--resources must be a JSON object, got {args.resources!r}")
    for key in ("CPU", "GPU"):
        if key in custom:
            raise ValueError(f"--resources must not set {key!r}; use --num-{key.lower()}s")
    resources = {"CPU": float(args.num_cpus if args.num_cpus is not None else os.cpu_count() or 1)}
    num_gpus = args.num_gpus if args.num_gpus is not None else float(len(gpus))
    if num_gpus:
        resources["GPU"] = float(num_gpus)
    store = args.object_store_memory or default_capacity()
    memory = getattr(args, "memory", None)
    resources["memory"] = float(memory if memory else int(psutil.virtual_memory().total * 0.7))
    resources["object_store_memory"] = float(store)
    resources[f"node:{args.host}"] = 1.0
    if gpus:
        from meshray.accelerators.nvidia import accelerator_type_from_name
        kind = accelerator_type_from_name(gpus[0].name)
        if kind:
            resources[f"accelerator_type:{kind}"] = 1.0
    resources.update({k: float(v) for k, v in custom.items()})
    return resources


async def _run(args) -> int:
    import psutil

    from meshray import security
    from meshray.accelerators.nvidia import detect_gpus
    from meshray.common import ids
    from meshray.node import drain, registry
    from meshray.node.daemon import EXTRAS, NodeConfig, NodeDaemon
    from meshray.node.membership import Membership

    loop = asyncio.get_running_loop()
    drain_timeout = drain.drain_timeout(args.drain_timeout)   # a bad setting fails at start
    # Refuse a run dir someone else controls before starting anything; the
    # record written there at the end of startup is what `meshray stop` and
    # init(address="auto") act on.
    registry.run_dir()
    token = security.process_token()          # the launcher's pipe, else MESHRAY_TOKEN(_FILE)
    security.forget_token_environment()       # nothing we start (etcd, workers) inherits it
    node_id = bytes.fromhex(args.node_id) if args.node_id else ids.new_id()
    from meshray.rpc.tls import TlsConfig
    tls = TlsConfig.from_env()                # fail fast on bad MESHRAY_TLS_*
    supervisor = etcd_started = None
    endpoints = [e for e in args.etcd.split(",") if e]
    if args.embedded_etcd:
        # etcd starts while the daemon does; its endpoint is filled in below.
        supervisor = _embedded_etcd(args.session_dir, token, persistent=args.cli)
        etcd_started = loop.run_in_executor(None, supervisor.start)
    if not args.cli and "MESHRAY_RUNTIME_ENV_CACHE_DIR" not in os.environ:
        # A private cluster (init() with no address) keeps its environments
        # in its session dir, so they go away with it; `meshray start` nodes
        # share the per-machine cache across sessions.
        os.environ["MESHRAY_RUNTIME_ENV_CACHE_DIR"] = os.path.join(args.session_dir, "runtime_env")
    gpus = detect_gpus()
    resources = node_resources(args, gpus)
    labels = json.loads(args.labels)
    if gpus:
        labels.setdefault("gpu_names", ",".join(g.name for g in gpus))
        labels.setdefault("gpu_memory_bytes", ",".join(str(g.memory_total_bytes) for g in gpus))
    gpu_ids = [g.index for g in gpus]
    total_gpus = resources.get("GPU", 0.0)
    if total_gpus != len(gpu_ids):
        # --num-gpus overrode detection: expose that many device ids.
        gpu_ids = gpu_ids[:int(total_gpus)] if total_gpus <= len(gpu_ids) else list(range(int(total_gpus)))
    if total_gpus != int(total_gpus):
        gpu_ids = []
    config = NodeConfig(
        session_dir=args.session_dir, node_id=node_id, resources=resources,
        object_store_memory=int(resources["object_store_memory"]), host=args.host,
        advertise_host=args.advertise_host,
        port=args.port, token=token,
        etcd_endpoints=endpoints, labels=labels, prestart_workers=args.prestart_workers,
        gpu_ids=gpu_ids, metrics_export_port=args.metrics_export_port,
        dashboard_port=args.dashboard_port, data_port=args.data_port,
        extras=frozenset(EXTRAS) - ({"http"} if args.no_dashboard else set()))
    daemon = NodeDaemon(config)
    try:
        await daemon.start()
    finally:
        if etcd_started is not None:
            await asyncio.wait([etcd_started])
    if etcd_started is not None:
        try:
            etcd_started.result()    # a member that cannot start at all fails the node
        except BaseException:
            await daemon.stop()
            raise
        endpoints.append(supervisor.etcd.endpoint)
    # The embedded etcd has exactly one login, whatever MESHRAY_ETCD_* say.
    own_login = (security.etcd_client_options(token=token, environ={})
                 if supervisor is not None else None)
    membership = Membership(daemon, endpoints, ttl=args.lease_ttl, etcd_options=own_login)
    daemon.membership = membership
    membership.start(loop)

    if token:
        security.write_token_file(os.path.join(args.session_dir, "token"), token)
    security.save_session_tls(args.session_dir, tls)
    record = {
        "node_id": node_id.hex(), "pid": os.getpid(), "address": daemon.address,
        "local_address": daemon.local_address, "etcd": ",".join(endpoints),
        "session_dir": args.session_dir, "cli": bool(args.cli),
        "embedded_etcd": supervisor is not None,
        "etcd_pid": supervisor.etcd.pid if supervisor else None,
        "started_at": time.time(), "store_dir": daemon.store_dir,
        "metrics_export_port": daemon.metrics.port,
        "dashboard_port": daemon.http.port, "dashboard_scheme": daemon.http.scheme,
        "create_time": psutil.Process().create_time(),
    }
    registry.write_record(node_id.hex(), record)
    if supervisor is not None:
        def etcd_restarted(pid: int) -> None:
            record["etcd_pid"] = pid
            registry.write_record(node_id.hex(), record)
        supervisor.on_restart = etcd_restarted
    settle_heap()
    if args.ready_fd >= 0:
        os.write(args.ready_fd, (json.dumps(record) + "\n").encode())
        os.close(args.ready_fd)

    # `meshray start` nodes drain on the first stop signal (node/drain.py);
    # nodes of a private or test cluster only when a drain timeout is set.
    drains = args.cli or args.drain_timeout is not None or bool(
        os.environ.get(drain.DRAIN_TIMEOUT_ENV))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, functools.partial(
            daemon.drain.on_stop_signal, sig.name, may_drain=drains, timeout_s=drain_timeout))
    if args.parent_fd >= 0:
        def parent_gone():
            try:
                data = os.read(args.parent_fd, 1)
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(args.parent_fd)
                daemon.request_stop()
        loop.add_reader(args.parent_fd, parent_gone)

    try:
        await daemon.wait_stopped()
    finally:
        log.info("node %s stopping", node_id.hex())
        await daemon.stop()
        await loop.run_in_executor(None, membership.stop)
        if supervisor is not None:
            await loop.run_in_executor(None, supervisor.stop)
        registry.remove_record(node_id.hex())
        if args.owns_session_dir:
            shutil.rmtree(args.session_dir, ignore_errors=True)
    return 0


def _embedded_etcd(session_dir: str, token: str | None, persistent: bool):
    """This node's etcd member, to run under supervision (auth on with a token).

    A ``meshray start`` node's store is restarted from its data dir, so it is
    ``persistent``: an etcd release known to lose data there is refused.

    A member that cannot start at all fails the node's startup with etcd's
    own error; once it has run, a death is the supervisor's to repair.
    """
    from meshray import security
    from meshray.coordination.embedded import EmbeddedEtcd
    from meshray.coordination.supervisor import EtcdSupervisor
    if token is None:
        log.warning("no cluster token: the embedded etcd runs without authentication, "
                    "open to every local user")
    etcd = EmbeddedEtcd(os.path.join(session_dir, "etcd"), host="127.0.0.1",
                        auth_user=security.ETCD_ROOT_USER,
                        auth_password=security.etcd_password(token) if token else None,
                        private_peer=True, persistent=persistent)
    return EtcdSupervisor(etcd)


def main(argv=None) -> int:
    from meshray.common.private_files import open_private_dir

    args = _parse(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.session_dir, mode=0o700, exist_ok=True)
    # The token, TLS settings, sockets and logs go here: it must be ours alone.
    os.close(open_private_dir(args.session_dir, what="session dir"))
    logging.basicConfig(
        level=os.environ.get("MESHRAY_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        filename=os.path.join(args.session_dir, "node.log"),
    )
    from meshray.rpc.limits import raise_nofile_limit
    before, after = raise_nofile_limit()      # workers inherit the raised limit
    if after != before:
        log.info("raised the open-file limit from %d to %d", before, after)
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
