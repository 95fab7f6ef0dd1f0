"""The node's Prometheus endpoint: `/metrics` and `/sd` on its metrics port.

One `NodeMetrics` per daemon. Its HTTP server runs on its own threads, never
on the daemon's event loop: a slow scraper cannot stall task dispatch. What
a scrape reads:

- the loop's tables (tasks, actors, groups, resources, workers) through one
  snapshot the loop itself takes when asked (`call_soon_threadsafe` and a
  future, with a deadline): the scrape thread never iterates a dict the loop
  mutates;
- counters kept as plain ints (transfer bytes) or behind their own lock (the
  object store's stats, user metrics, the etcd latency histogram);
- the machine, through psutil.

So the task hot path pays one call per finished task (`task_ended`, a dict
increment) and nothing per scrape. `/sd` answers Prometheus HTTP service
discovery with every live node's metrics endpoint, from this node's etcd
view; docs/observability.md shows the scrape configuration.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from meshray.node import metric_families as families
from meshray.node.metric_families import ACTOR_STATES, NameCap, UserMetrics

__all__ = ["NodeMetrics", "SNAPSHOT_TIMEOUT_S", "SPILL_DECISION_BUCKETS_S", "sd_targets"]

log = logging.getLogger(__name__)

SNAPSHOT_TIMEOUT_S = 2.0
# Placement decisions take ~0.1 ms on a sampled view and tens of ms on a whole
# view of a thousand nodes (docs/scale.md): buckets fine enough to tell them apart.
SPILL_DECISION_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                            0.025, 0.05, 0.1, 0.25, 1.0)


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("meshray")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


def sd_targets(records: dict) -> list:
    """Prometheus http_sd / file_sd groups for node records keyed by node id hex.

    A record without a metrics port (an older node) is left out; the host is
    the one peers dial (the record's advertised Address).
    """
    groups = []
    for node_hex, record in sorted(records.items()):
        port = record.get("MetricsExportPort") if isinstance(record, dict) else None
        address = record.get("Address") if isinstance(record, dict) else None
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            continue
        if not isinstance(address, str) or ":" not in address:
            continue
        host = address.rsplit(":", 1)[0]
        groups.append({"targets": [f"{host}:{port}"],
                       "labels": {"__meta_meshray_node_id": str(node_hex),
                                  "__meta_meshray_node_address": host}})
    return groups


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


class _Collector:
    """prometheus_client calls collect() on the scrape thread."""

    def __init__(self, owner: "NodeMetrics"):
        self.owner = owner

    def collect(self):
        owner = self.owner
        yield from families.node_families(owner.snapshot(), owner.base_labels)
        yield from owner.user.families(owner.base_labels)


class NodeMetrics:
    """Counters the daemon feeds, and the HTTP server that exports them."""

    def __init__(self, daemon, port: int = 0):
        from prometheus_client import CollectorRegistry, Histogram

        self.daemon = daemon
        self.requested_port = port
        self.port = 0
        self.bytes_received = 0          # peer transfers; plain ints, written on the loop
        self.bytes_sent = 0
        self.data_link_received = 0      # of which on the data link (rpc/data_link.py)
        self.data_link_sent = 0
        self.snapshot_timeouts = 0
        self.names = NameCap(int(os.environ.get("MESHRAY_METRICS_MAX_NAMES",
                                                families.DEFAULT_MAX_NAMES)))
        self.user = UserMetrics()
        self._ended: dict = {}           # (State, Name, IsRetry) -> count; loop-owned
        self._server = None
        self._thread = None
        self._loop = None
        self._process = None
        self._metrics_app = None
        self.base_labels = {
            "SessionName": os.path.basename(daemon.config.session_dir.rstrip("/")),
            "NodeAddress": daemon._advertised_host(), "NodeId": daemon.node_id.hex(),
            "Version": _version()}
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))
        self._etcd_latency = Histogram(
            "meshray_etcd_request_duration_seconds",
            "Round-trip time of this node's successful etcd requests.",
            [*families.BASE_LABELS, "Operation"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
        self._spill_decision = Histogram(
            "meshray_spill_decision_duration_seconds",
            "Time this node took to decide where a task that does not plainly run here goes "
            "(a peer, a queue here, or nowhere yet).",
            families.BASE_LABELS, registry=self.registry, buckets=SPILL_DECISION_BUCKETS_S)
        self._spill_decision_child = None

    # ------------------------------------------------------------ events
    def task_ended(self, state: str, name: str, attempt: int) -> None:
        """A task's final state was recorded here (node/task_events.py calls this)."""
        key = (state, self.names(name), "1" if attempt else "0")
        self._ended[key] = self._ended.get(key, 0) + 1

    def on_report(self, conn, msg) -> None:
        """A process's `metrics` event (checked by node/request_rules.py)."""
        self.user.apply(msg.updates)

    def spill_decided(self, seconds: float) -> None:
        """On the loop: one placement decision (node/cluster.py) took `seconds`."""
        child = self._spill_decision_child
        if child is None:
            child = self._spill_decision_child = self._spill_decision.labels(
                *[self.base_labels[k] for k in families.BASE_LABELS])
        child.observe(seconds)

    def etcd_round_trip(self, operation: str, seconds: float) -> None:
        """Any thread: one etcd request answered in `seconds`."""
        self._etcd_latency.labels(*[self.base_labels[k] for k in families.BASE_LABELS],
                                  operation).observe(seconds)

    # ------------------------------------------------------------ snapshot
    def _loop_tables(self) -> dict:
        """On the loop: copies of what the loop owns (small: counts, not records)."""
        daemon = self.daemon
        live: dict = {}
        for state, name, attempt in daemon.task_events.live_states():
            key = (state, self.names(name), "1" if attempt else "0")
            live[key] = live.get(key, 0) + 1
        actors: dict = {}
        for entry in daemon.actors.values():
            if entry.remote_node:
                continue            # the node it runs on counts it
            name = entry.options.get("class_name") or entry.spec.name
            key = (ACTOR_STATES.get(str(entry.state), str(entry.state)), self.names(name))
            actors[key] = actors.get(key, 0) + 1
        groups: dict = {}
        node_hex = daemon.node_id.hex()
        for record in list(daemon.placement.records.values()):
            if getattr(record, "creator_node", "") == node_hex:
                groups[record.state] = groups.get(record.state, 0) + 1
        workers: dict = {"task": 0, "actor": 0, "leased": 0}
        if daemon.pool is not None:
            for worker in daemon.pool.by_id.values():
                kind = ("actor" if worker.actor is not None
                        else "leased" if worker.lease is not None else "task")
                workers[kind] += 1
        leases = {(state,): count
                  for state, count in daemon.dispatch.machine.lease_life.counts.items()}
        return {"tasks_live": live, "tasks_ended": dict(self._ended), "actors": actors,
                "placement_groups": groups, "workers": workers, "leases": leases,
                "memory_monitor": daemon.memory_monitor.metrics_snapshot(self.names),
                "resources_total": daemon.resources.total.to_dict(),
                "resources_available": daemon.resources.available.to_dict()}

    def _ask_loop(self):
        loop = self._loop
        if loop is None or loop.is_closed():
            return None
        answer: concurrent.futures.Future = concurrent.futures.Future()

        def take() -> None:
            if answer.set_running_or_notify_cancel():
                try:
                    answer.set_result(self._loop_tables())
                except BaseException as exc:  # noqa: BLE001 - handed to the scrape thread
                    answer.set_exception(exc)
        try:
            loop.call_soon_threadsafe(take)
            return answer.result(SNAPSHOT_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            answer.cancel()
        except RuntimeError:       # the loop closed meanwhile
            return None
        self.snapshot_timeouts += 1
        log.warning("metrics scrape: the daemon's loop did not answer within %.1fs",
                    SNAPSHOT_TIMEOUT_S)
        return None

    def snapshot(self) -> dict:
        """Everything node_families needs; runs on the scrape thread."""
        import psutil

        membership = self.daemon.membership
        memory = psutil.virtual_memory()
        return {
            "loop": self._ask_loop(),
            "store": self.daemon.store.stats(),
            "transfer": {"received": self.bytes_received, "sent": self.bytes_sent,
                         "data_link_received": self.data_link_received,
                         "data_link_sent": self.data_link_sent},
            "lease": {"registered": bool(membership is not None and membership.registered),
                      "registrations": membership.lease_generation if membership else 0,
                      "errors": membership.loop_failures if membership else 0},
            "host": {"cpu_percent": psutil.cpu_percent(interval=None),
                     "cpu_count": psutil.cpu_count() or 0, "mem_total": memory.total,
                     "mem_available": memory.available,
                     "mem_used": memory.total - memory.available,
                     "daemon_rss": self._process.memory_info().rss},
            "snapshot_timeouts": self.snapshot_timeouts,
        }

    # ------------------------------------------------------------ http
    def _app(self, environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        if path == "/sd":
            body = json.dumps(self.service_discovery()).encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        if path in ("/", "/metrics"):
            return self._metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics or /sd\n"]

    def service_discovery(self) -> list:
        """Every live node's endpoint, from this node's etcd view (ourselves at least)."""
        membership = self.daemon.membership
        records = dict(membership.view_snapshot()[0]) if membership is not None else {}
        own = self.daemon.local_node_record()
        own["Address"] = self.daemon.address
        records.setdefault(self.daemon.node_id.hex(), own)
        return sd_targets(records)

    def start(self, loop) -> None:
        """Bind the port (the daemon's host: loopback unless told otherwise) and serve."""
        import psutil
        from prometheus_client import make_wsgi_app

        self._loop = loop
        self._process = psutil.Process()
        psutil.cpu_percent(interval=None)      # the first reading only sets the baseline
        self._metrics_app = make_wsgi_app(self.registry)
        host = self.daemon.config.host

        class Server(_Server):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        try:
            self._server = make_server(host, self.requested_port, self._app,
                                       server_class=Server, handler_class=_QuietHandler)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {host}:{self.requested_port} "
                          f"(--metrics-export-port): {exc.strerror}") from exc
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="meshray-metrics-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
