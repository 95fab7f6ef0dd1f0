"""What a node exports to Prometheus, built from plain snapshots (pure).

`node_families(snapshot, base)` turns the tables the daemon's loop copied
(node/metrics.py takes the copy) into metric families, and `UserMetrics` is
the node's aggregate of what its processes recorded with meshray.util.metrics.
Nothing here reads a clock or a socket, so the exported names, labels and
values are testable without a node. docs/observability.md ("Metrics") lists
every family.

Label cardinality is bounded: no ids besides the node's own, task and actor
names capped by `NameCap` (the rest are "other"), user series capped per
node (the rest dropped and counted).
"""
from __future__ import annotations

import threading

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from meshray.common.metric_rules import USER_METRIC_PREFIX

__all__ = ["ACTOR_STATES", "BASE_LABELS", "NameCap", "OTHER", "UserMetrics", "node_families"]

# Every series a node exports carries these (Ray's names where Ray has them).
BASE_LABELS = ("SessionName", "NodeAddress", "NodeId", "Version")
OTHER = "other"
DEFAULT_MAX_NAMES = 100
DEFAULT_MAX_USER_SERIES = 10_000
# The node's actor states, as Ray's ActorTableData names them.
ACTOR_STATES = {"PENDING": "PENDING_CREATION", "ALIVE": "ALIVE", "RESTARTING": "RESTARTING",
                "DEAD": "DEAD"}


class NameCap:
    """Task and actor names as label values: the first `limit` distinct ones, then OTHER.

    A name once admitted stays admitted, so one name never moves between
    series while the node runs.
    """

    def __init__(self, limit: int = DEFAULT_MAX_NAMES):
        self.limit = limit
        self._names: set = set()

    def __call__(self, name: str) -> str:
        if name in self._names:
            return name
        if len(self._names) < self.limit:
            self._names.add(name)
            return name
        return OTHER


class _Families:
    """Builds families whose samples all start with the node's base label values."""

    def __init__(self, base: dict):
        self.keys = list(BASE_LABELS)
        self.values = [str(base.get(key, "")) for key in BASE_LABELS]
        self.out: list = []

    def gauge(self, name: str, doc: str, labels=(), samples=None, value=None):
        family = GaugeMetricFamily(name, doc, labels=self.keys + list(labels))
        return self._fill(family, samples, value)

    def counter(self, name: str, doc: str, labels=(), samples=None, value=None):
        family = CounterMetricFamily(name, doc, labels=self.keys + list(labels))
        return self._fill(family, samples, value)

    def _fill(self, family, samples, value):
        if value is not None:
            family.add_metric(self.values, value)
        for label_values, sample in (samples or {}).items():
            if not isinstance(label_values, tuple):
                label_values = (label_values,)
            family.add_metric(self.values + [str(v) for v in label_values], sample)
        self.out.append(family)
        return family


def _task_families(out: _Families, loop: dict) -> None:
    ended = loop["tasks_ended"]
    gauge = dict(loop["tasks_live"])
    for key, count in ended.items():
        gauge[key] = gauge.get(key, 0) + count
    out.gauge("ray_tasks", "Tasks this node handles or handled, by state (final states "
              "count every task that ended here).", ("State", "Name", "IsRetry"), gauge)
    out.counter("meshray_tasks_finished", "Tasks that reached a final state on this node "
                "(FINISHED or FAILED).", ("State", "Name", "IsRetry"), ended)
    out.gauge("ray_actors", "Actors hosted on this node, by state.", ("State", "Name"),
              loop["actors"])
    out.gauge("ray_placement_groups", "Placement groups created through this node, by state.",
              ("State",), loop["placement_groups"])
    out.gauge("meshray_workers", "Worker processes of this node, by what they run (task, "
              "actor, or leased: held by a local process that pushes its tasks to it).",
              ("Kind",), loop["workers"])
    out.counter("meshray_worker_leases", "Worker lease requests granted or refused by this "
                "node, and granted leases ended (returned, revoked, lost).", ("State",),
                loop.get("leases", {}))


def _resource_families(out: _Families, loop: dict) -> None:
    samples = {}
    for name, total in loop["resources_total"].items():
        available = loop["resources_available"].get(name, 0.0)
        samples[(name, "AVAILABLE")] = available
        samples[(name, "USED")] = max(0.0, total - available)
    out.gauge("ray_resources", "Logical resources of this node, USED or AVAILABLE.",
              ("Name", "State"), samples)


def _memory_monitor_families(out: _Families, monitor: dict | None) -> None:
    if monitor is None:
        return
    out.counter("ray_memory_manager_worker_eviction", "Workers the node's memory monitor "
                "killed, by what they ran (Task or Actor) and its name.", ("Type", "Name"),
                monitor["evictions"])
    if monitor["usage_fraction"] is not None:
        out.gauge("meshray_memory_monitor_usage_fraction", "The node's memory usage as a "
                  "fraction of its tightest limit (host, cgroup), at the last sample.",
                  value=monitor["usage_fraction"])
    out.gauge("meshray_memory_monitor_threshold", "Usage fraction past which the memory "
              "monitor kills a worker (0 when the monitor is off).",
              value=monitor["threshold"] if monitor["enabled"] else 0.0)


def _store_families(out: _Families, store: dict) -> None:
    out.gauge("ray_object_store_memory", "Object store bytes by where they are: shared "
              "memory (MMAP_SHM) or spilled to disk (SPILLED).", ("Location",),
              {"MMAP_SHM": store.get("used_bytes", 0),
               "SPILLED": store.get("spilled_bytes", 0)})
    capacity = store.get("capacity", 0)
    out.gauge("ray_object_store_available_memory", "Free object store shared memory, bytes.",
              value=max(0, capacity - store.get("used_bytes", 0)))
    out.gauge("meshray_object_store_capacity_bytes", "Object store shared-memory capacity.",
              value=capacity)
    out.gauge("ray_object_store_num_local_objects", "Objects in this node's store.",
              value=store.get("num_objects", 0))
    out.counter("meshray_object_spilled_objects", "Objects spilled to disk.",
                value=store.get("spill_count", 0))
    out.counter("meshray_object_spilled_bytes", "Bytes spilled to disk.",
                value=store.get("spill_bytes_total", 0))
    out.counter("meshray_object_restored_objects", "Spilled objects read back into memory.",
                value=store.get("restore_count", 0))
    out.counter("meshray_object_restored_bytes", "Bytes read back from disk.",
                value=store.get("restore_bytes_total", 0))


def _cluster_families(out: _Families, snap: dict) -> None:
    transfer = snap["transfer"]
    out.counter("meshray_object_transfer_bytes", "Object bytes pulled from (received) or "
                "served to (sent) peer nodes.", ("Direction",),
                {"received": transfer["received"], "sent": transfer["sent"]})
    out.counter("meshray_object_transfer_data_link_bytes", "Of those, the bytes that travelled "
                "on the data link (large objects) rather than the PullObject RPC.",
                ("Direction",), {"received": transfer["data_link_received"],
                                 "sent": transfer["data_link_sent"]})
    lease = snap["lease"]
    out.gauge("meshray_etcd_lease_up", "1 while this node holds its etcd lease and is "
              "registered, else 0.", value=1.0 if lease["registered"] else 0.0)
    out.counter("meshray_etcd_registrations", "Times this node registered in etcd (more "
                "than 1: it lost its lease and rejoined).", value=lease["registrations"])
    out.counter("meshray_etcd_membership_errors", "Errors the membership loop survived.",
                value=lease["errors"])


def _host_families(out: _Families, host: dict) -> None:
    out.gauge("ray_node_cpu_utilization", "CPU utilization of this machine, percent (0..100).",
              value=host["cpu_percent"])
    out.gauge("ray_node_cpu_count", "CPU cores of this machine.", value=host["cpu_count"])
    out.gauge("ray_node_mem_used", "Memory in use on this machine, bytes.",
              value=host["mem_used"])
    out.gauge("ray_node_mem_available", "Memory available on this machine, bytes.",
              value=host["mem_available"])
    out.gauge("ray_node_mem_total", "Memory of this machine, bytes.", value=host["mem_total"])
    out.gauge("meshray_node_daemon_rss_bytes", "Resident memory of the node daemon process.",
              value=host["daemon_rss"])


def node_families(snap: dict, base: dict) -> list:
    """The node's own metric families from one snapshot (see node/metrics.py for its keys).

    `snap["loop"]` is None when the daemon's loop did not answer in time:
    the families read off the loop are left out of that scrape, not faked.
    """
    out = _Families(base)
    loop = snap.get("loop")
    if loop is not None:
        _task_families(out, loop)
        _resource_families(out, loop)
        _memory_monitor_families(out, loop.get("memory_monitor"))
    _store_families(out, snap["store"])
    _cluster_families(out, snap)
    _host_families(out, snap["host"])
    out.counter("meshray_metrics_snapshot_timeouts", "Scrapes the daemon's loop did not "
                "answer in time (task, actor and resource families were left out).",
                value=snap.get("snapshot_timeouts", 0))
    return out.out


class UserMetrics:
    """The node's aggregate of its processes' meshray.util.metrics reports.

    Counters and histograms add up what every process reported; a gauge
    keeps the last value any process set. A metric is defined by its first
    report (kind, tag keys, bucket bounds); a later report that disagrees is
    dropped and counted, as is a new series past `max_series`. Reports are
    applied on the daemon's loop and read by the scrape thread, hence the lock.
    """

    def __init__(self, max_series: int = DEFAULT_MAX_USER_SERIES):
        self.max_series = max_series
        self._lock = threading.Lock()
        self._meta: dict = {}       # name -> (kind, description, tag keys, boundaries)
        self._series: dict = {}     # (name, tag values) -> value | [bucket counts, sum]
        self.dropped = 0

    def apply(self, updates) -> None:
        with self._lock:
            for update in updates:
                self._apply_one(update)

    def _apply_one(self, update) -> None:
        name, kind = update.name, update.kind
        shape = (kind, tuple(update.tag_keys), tuple(update.boundaries))
        meta = self._meta.get(name)
        if meta is None:
            self._meta[name] = meta = (*shape[:2], update.description, shape[2])
        if (meta[0], meta[1], meta[3]) != shape:
            self.dropped += 1
            return
        key = (name, tuple(update.tag_values))
        current = self._series.get(key)
        if current is None and len(self._series) >= self.max_series:
            self.dropped += 1
            return
        if kind == "counter":
            self._series[key] = (current or 0.0) + update.value
        elif kind == "gauge":
            self._series[key] = update.value
        else:
            counts = current[0] if current else [0] * len(update.bucket_counts)
            self._series[key] = ([a + b for a, b in zip(counts, update.bucket_counts)],
                                 (current[1] if current else 0.0) + update.sum)

    def families(self, base: dict) -> list:
        out = _Families(base)
        with self._lock:
            by_name: dict = {}
            for (name, values), value in self._series.items():
                by_name.setdefault(name, []).append((values, value))
            metas = dict(self._meta)
            dropped = self.dropped
        for name, series in by_name.items():
            kind, keys, description, bounds = metas[name]
            labels = list(out.keys) + ["Component", *keys]
            full = USER_METRIC_PREFIX + name
            if kind == "histogram":
                family = HistogramMetricFamily(full, description, labels=labels)
                for values, (counts, total) in series:
                    cumulative, buckets = 0, []
                    for bound, count in zip([*map(_bound, bounds), "+Inf"], counts):
                        cumulative += count
                        buckets.append((bound, cumulative))
                    family.add_metric(out.values + ["core_worker", *values], buckets, total)
            else:
                maker = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                family = maker(full, description, labels=labels)
                for values, value in series:
                    family.add_metric(out.values + ["core_worker", *values], value)
            out.out.append(family)
        out.counter("meshray_metrics_user_updates_dropped", "User metric updates this node "
                    "dropped: a series past the node's cap, or a report that disagrees with "
                    "the metric's first definition.", value=dropped)
        return out.out


def _bound(value: float) -> str:
    return repr(float(value))
