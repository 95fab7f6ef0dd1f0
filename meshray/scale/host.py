"""A process that runs many hollow nodes: `python -m meshray.scale.host`.

Every node is a `HollowNode` (meshray/node/hollow.py) with its own session
dir, store dir, gRPC port, lease, records, watches and membership thread;
they share this process's one event loop and, by default, one etcd
connection (``--etcd-connection shared``): one gRPC channel and one watch
stream carry every node's own watches and requests, so etcd still holds a
lease and four watches per node, but the host wakes one thread per delivered
change instead of two per node (docs/scale.md, fifth slice).
``--etcd-connection per-node`` gives each node a connection of its own, as
separate machines would have. The process takes the cluster
token like a node daemon (MESHRAY_TOKEN_FD pipe, or MESHRAY_TOKEN).

It is driven over stdin/stdout, one JSON object a line, by `meshray
scale-test` (meshray/scale/scale_test.py). The first line out is
``{"ready": true, "nodes": [...]}``; after that each command line in gets one
reply line:

- ``{"op": "status"}``: per node: registered, peers in its view, watch events,
  whose availability it follows (slice bits, how many)
- ``{"op": "crash", "ids": [...], "close_port": bool}``: those nodes go
  silent as if killed (node/hollow.py `crash`); the reply has each one's
  wall-clock kill time
- ``{"op": "deaths"}``: per live node, when it saw each peer die
- ``{"op": "stop"}``: stop every node, reply, exit (also on end of input)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time

__all__ = ["main", "HostConfig"]

log = logging.getLogger("meshray.scale.host")

DEFAULT_CPUS = 64.0
DEFAULT_STORE_BYTES = 8 << 20
MEMORY_BYTES = 64 << 30     # the `memory` resource each hollow node offers
# grpc's blocking waits (a watch stream's next event, a unary call) wake every
# 0.1 s so that a main thread can take signals. A host has ~4 such waiting
# threads per node -- 2,000 wakeups a second for 50 nodes, each taking the
# GIL -- where a real machine has a dozen. No thread of a host that waits in
# grpc is its main thread, and a finished call notifies its waiter anyway, so
# a longer slice costs nothing but those wakeups.
GRPC_WAIT_SLICE_S = 2.0
# Nodes of one host registering at once. Every registration is a change that
# each member's watches deliver, so a host that registers all its nodes at
# once starves its own lease keepers and leases lapse (nodes flap); a short
# window spreads the same work out. A node that does not register within
# JOIN_WAIT_S does not hold the others up any longer.
JOIN_WINDOW = 4
ETCD_CONNECTIONS = ("shared", "per-node")   # --etcd-connection: one for the host, or one each
JOIN_WAIT_S = 30.0


class HostConfig(argparse.Namespace):
    pass


def _number(kind, flag: str, *, zero_ok: bool = False):
    """An argparse type: a `kind` number > 0 (>= 0 with `zero_ok`), or an error naming `flag`."""
    def parse(text: str):
        try:
            value = kind(text)
            fine = value >= 0 if zero_ok else value > 0
        except ValueError:
            fine = False
        if not fine:
            raise argparse.ArgumentTypeError(
                f"{flag}={text!r}: expected a number {'>=' if zero_ok else '>'} 0")
        return value
    return parse


def parse_args(argv) -> HostConfig:
    parser = argparse.ArgumentParser(prog="python -m meshray.scale.host")
    parser.add_argument("--nodes", type=_number(int, "--nodes"), required=True,
                        help="hollow nodes to run in this process")
    parser.add_argument("--address", required=True, help="comma-separated etcd endpoints")
    parser.add_argument("--base-dir", required=True,
                        help="directory for the nodes' session dirs (made if missing)")
    parser.add_argument("--lease-ttl", type=_number(float, "--lease-ttl"), default=None)
    parser.add_argument("--cpus", type=_number(float, "--cpus"), default=DEFAULT_CPUS,
                        help=f"CPUs each node offers (default {DEFAULT_CPUS:g})")
    parser.add_argument("--task-s", type=_number(float, "--task-s", zero_ok=True), default=0.0,
                        help="seconds a simulated task runs (default 0)")
    parser.add_argument("--object-store-memory", type=_number(int, "--object-store-memory"),
                        default=DEFAULT_STORE_BYTES)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--etcd-connection", choices=ETCD_CONNECTIONS, default="shared",
                        help="one etcd connection for all of this host's nodes (default) "
                             "or one per node")
    parser.add_argument("--start-interval", type=_number(float, "--start-interval", zero_ok=True),
                        default=0.0, help="seconds between this host's node starts (default 0)")
    return parser.parse_args(argv, namespace=HostConfig())


class Host:
    """The hollow nodes of this process and the commands that drive them."""

    def __init__(self, args: HostConfig, token: str | None):
        self.args = args
        self.token = token
        self.nodes: list = []            # HollowNode, in start order
        self.crashed: set[str] = set()
        self.coordinator = None          # the nodes' shared etcd connection, if shared

    async def start(self) -> None:
        from meshray.common import ids
        from meshray.node.daemon import NodeConfig
        from meshray.node.hollow import HollowNode
        from meshray.node.membership import Membership

        args = self.args
        endpoints = [e for e in args.address.split(",") if e]
        loop = asyncio.get_running_loop()
        if args.etcd_connection == "shared":
            self.coordinator = await loop.run_in_executor(None, self._connect, endpoints)
        first = loop.time()
        for index in range(args.nodes):
            # Paced (--start-interval): the driver spreads the cluster's joins
            # evenly over its hosts instead of letting every host start at once.
            delay = first + index * args.start_interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            node_id = ids.new_id()
            session_dir = os.path.join(args.base_dir, node_id.hex()[:12])
            os.makedirs(session_dir, mode=0o700)
            config = NodeConfig(
                session_dir=session_dir, node_id=node_id,
                resources={"CPU": args.cpus, "memory": float(MEMORY_BYTES),
                           "object_store_memory": float(args.object_store_memory)},
                object_store_memory=args.object_store_memory, host=args.host,
                token=self.token, etcd_endpoints=endpoints, labels={"hollow": "1"},
                prestart_workers=0, extras=frozenset())
            node = HollowNode(config, task_s=args.task_s)
            self.nodes.append(node)
            if len(self.nodes) > JOIN_WINDOW:
                await self._registered(self.nodes[-1 - JOIN_WINDOW])
            await node.start()
            node.membership = Membership(node, endpoints, ttl=args.lease_ttl,
                                         coordinator=self.coordinator)
            node.membership.start(loop)

    def _connect(self, endpoints: list[str]):
        from meshray import security
        from meshray.coordination.client import Coordinator
        return Coordinator(endpoints, timeout=5.0,
                           **security.etcd_client_options(token=self.token))

    @staticmethod
    async def _registered(node) -> None:
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, node.membership.wait_registered, JOIN_WAIT_S):
            log.warning("hollow node %s did not register within %.0fs; starting the next "
                        "ones anyway", node.node_hex, JOIN_WAIT_S)

    # ------------------------------------------------------------ commands
    async def handle(self, command: dict) -> dict:
        op = command.get("op")
        if op == "status":
            return {"time": time.time(), "cpu_s": time.process_time(),
                    "threads": threading.active_count(), "nodes": [
                        {"id": node.node_hex, "registered": node.membership.registered,
                         "view": len(node.peers.view.nodes),
                         "watch_events": node.membership.watch_events,
                         "avail_bits": node.membership.avail_bits,
                         "avail_followed": len(node.peers.view.avail),
                         "crashed": node.node_hex in self.crashed} for node in self.nodes]}
        if op == "crash":
            wanted = set(command.get("ids") or ())
            unknown = wanted - {node.node_hex for node in self.nodes}
            if unknown:
                raise ValueError(f"ids={sorted(unknown)}: not nodes of this host")
            killed = {}
            for node in self.nodes:
                if node.node_hex in wanted and node.node_hex not in self.crashed:
                    killed[node.node_hex] = time.time()
                    self.crashed.add(node.node_hex)
                    await node.crash(close_port=bool(command.get("close_port", True)))
            return {"killed": killed}
        if op == "deaths":
            return {"deaths": {node.node_hex: dict(node.deaths) for node in self.nodes
                               if node.node_hex not in self.crashed}}
        if op == "stop":
            await self.stop()
            return {"stopped": len(self.nodes)}
        raise ValueError(f"op={op!r}: expected one of status, crash, deaths, stop")

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        live = [node for node in self.nodes
                if node.membership is not None and node.node_hex not in self.crashed]
        await asyncio.gather(*(loop.run_in_executor(None, node.membership.stop) for node in live),
                             return_exceptions=True)
        for node in self.nodes:
            try:
                await node.stop()
            except Exception:  # noqa: BLE001 - stop the others all the same
                log.exception("stopping hollow node %s failed", node.node_hex)
        if self.coordinator is not None:
            # Crashed nodes' lease keepers stopped without revoking; the
            # connection's close ends whatever else is left on it.
            self.coordinator.close()
            self.coordinator = None


async def _serve(args: HostConfig, replies) -> int:
    from meshray import security

    token = security.process_token()
    security.forget_token_environment()
    host = Host(args, token)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    # SIGTERM (the driver gives up on a host still starting its nodes, or a
    # `timeout` wrapper) stops every node started so far -- their store and
    # session dirs go with them -- instead of dying with them in place.
    starting = asyncio.current_task()
    terminated = ready_sent = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        if not ready_sent:
            starting.cancel()         # host.start() unwinds and stops what it started
        else:
            loop.create_task(_stop_and_finish(host, done))

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        await host.start()
    except BaseException:
        await host.stop()
        if terminated:
            return 128 + signal.SIGTERM
        raise
    ready_sent = True
    _reply(replies, {"ready": True, "nodes": [node.node_hex for node in host.nodes]})

    def read_commands() -> None:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                command = json.loads(line)
                reply = asyncio.run_coroutine_threadsafe(host.handle(command), loop).result()
            except Exception as exc:  # noqa: BLE001 - the caller gets the error
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            _reply(replies, reply)
            if isinstance(command, dict) and command.get("op") == "stop":
                break
        else:
            asyncio.run_coroutine_threadsafe(host.stop(), loop).result()
        loop.call_soon_threadsafe(done.set)

    threading.Thread(target=read_commands, name="meshray-scale-commands", daemon=True).start()
    await done.wait()
    return 128 + signal.SIGTERM if terminated else 0


async def _stop_and_finish(host: Host, done: asyncio.Event) -> None:
    try:
        await host.stop()
    finally:
        done.set()


def _reply(replies, obj: dict) -> None:
    replies.write(json.dumps(obj) + "\n")
    replies.flush()


def _lengthen_grpc_wait_slice(seconds: float = GRPC_WAIT_SLICE_S) -> bool:
    """Set grpc's wait slice (a private module constant, hence checked)."""
    from grpc import _common
    if not isinstance(getattr(_common, "MAXIMUM_WAIT_TIMEOUT", None), (int, float)):
        log.warning("grpc has no MAXIMUM_WAIT_TIMEOUT; its threads keep waking every 0.1 s")
        return False
    _common.MAXIMUM_WAIT_TIMEOUT = seconds
    return True


def main(argv=None) -> int:
    from meshray.rpc.limits import raise_nofile_limit

    args = parse_args(sys.argv[1:] if argv is None else argv)
    _lengthen_grpc_wait_slice()
    os.makedirs(args.base_dir, mode=0o700, exist_ok=True)
    logging.basicConfig(level=os.environ.get("MESHRAY_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        filename=os.path.join(args.base_dir, "host.log"))
    raise_nofile_limit()
    # Replies go on the real stdout; anything else printed goes to stderr.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return asyncio.run(_serve(args, replies))


if __name__ == "__main__":
    sys.exit(main())
