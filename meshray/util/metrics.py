"""Application metrics (`ray.util.metrics`): Counter, Gauge, Histogram.

Usable in a driver, a task or an actor. Values are exported by the node the
process is connected to, on its Prometheus endpoint, as ``ray_<name>`` (a
counter as ``ray_<name>_total``) with the metric's tags, the node's labels
and ``Component="core_worker"`` (docs/observability.md, "Metrics").

Recording never sends a message: it updates this process's pending table
under a lock, and one background thread sends what changed at most every
FLUSH_INTERVAL_S over the process's session stream (a ``metrics`` event), so
a hot loop of ``inc()`` costs dictionary updates, not RPCs. Values recorded
in the last interval before a process dies are lost; a driver's are sent by
``shutdown()``.

Where Ray warns and silently discards a metric with an invalid name, this
raises ValueError naming it: a metric that never shows up is harder to find
than an error at the line that made it.
"""
from __future__ import annotations

import bisect
import math
import threading
from typing import Dict, Optional, Sequence, Tuple, Union

from meshray.common.metric_rules import (
    MAX_DESCRIPTION_LEN,
    MAX_TAG_KEYS,
    MAX_TAG_VALUE_LEN,
    boundaries_problem,
    metric_name_problem,
    tag_key_problem,
)
from meshray.core import state as state_mod

__all__ = ["Counter", "Gauge", "Histogram"]

FLUSH_INTERVAL_S = 1.0
Number = Union[int, float]


class _Pending:
    """This process's updates not sent yet, keyed by (name, tag values)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.entries: dict = {}       # (name, values) -> [metric, value, buckets, sum]
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None

    def record(self, metric: "Metric", values: tuple, value: float) -> None:
        key = (metric._name, values)
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                entry = self.entries[key] = [metric, 0.0, None, 0.0]
            if metric._kind == "counter":
                entry[1] += value
            elif metric._kind == "gauge":
                entry[1] = value
            else:
                if entry[2] is None:
                    entry[2] = [0] * (len(metric.boundaries) + 1)
                entry[2][bisect.bisect_left(metric.boundaries, value)] += 1
                entry[3] += value
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="meshray-metrics",
                                               daemon=True)
                self.thread.start()

    def take(self) -> dict:
        with self.lock:
            taken, self.entries = self.entries, {}
        return taken

    def put_back(self, taken: dict) -> None:
        """Keep updates that could not be sent (no session yet) for the next flush."""
        with self.lock:
            for key, entry in taken.items():
                newer = self.entries.get(key)
                if newer is None:
                    self.entries[key] = entry
                elif entry[0]._kind == "counter":
                    newer[1] += entry[1]
                elif entry[0]._kind == "histogram" and entry[2] is not None:
                    newer[2] = [a + b for a, b in zip(newer[2] or [0] * len(entry[2]), entry[2])]
                    newer[3] += entry[3]

    def _run(self) -> None:
        while True:
            self.wake.wait(FLUSH_INTERVAL_S)
            self.wake.clear()
            try:
                flush()
            except Exception:  # noqa: BLE001 - metrics must never break the process
                pass


_pending = _Pending()


def _updates(taken: dict) -> list:
    from meshray.rpc.generated import meshray_pb2 as pb
    out = []
    for (name, values), (metric, value, buckets, total) in taken.items():
        update = pb.MetricUpdate(name=name, kind=metric._kind, description=metric._description,
                                 tag_keys=metric._tag_keys, tag_values=values)
        if metric._kind == "histogram":
            update.boundaries.extend(metric.boundaries)
            update.bucket_counts.extend(buckets or [])
            update.sum = total
        else:
            update.value = value
        out.append(update)
    return out


def flush(core=None) -> None:
    """Send what was recorded since the last flush (kept for later while unconnected)."""
    core = core or state_mod.state.core
    taken = _pending.take()
    if not taken:
        return
    if core is None:
        _pending.put_back(taken)
        return
    core.send_metrics(_updates(taken))


_flush = flush     # the name meshray.shutdown() calls


def _bounded(value, kind: type, limit: int, what: str):
    """`value` if it is a `kind` of at most `limit` items (else TypeError / ValueError)."""
    if not isinstance(value, kind):
        raise TypeError(f"{what} must be a {kind.__name__}, got {type(value).__name__}")
    if len(value) > limit:
        raise ValueError(f"{what} has {len(value)} items; at most {limit} are allowed")
    return value


class Metric:
    """What Counter, Gauge and Histogram share: name, description, tags."""

    _kind = ""

    def __init__(self, name: str, description: str = "",
                 tag_keys: Optional[Tuple[str, ...]] = None):
        problem = metric_name_problem(name)
        if problem is not None:
            raise ValueError(f"metric name={name!r} is not valid: expected {problem}")
        _bounded(description, str, MAX_DESCRIPTION_LEN, f"description of metric {name!r}")
        tag_keys = _bounded(tuple() if tag_keys is None else tag_keys, tuple, MAX_TAG_KEYS,
                            f"tag_keys of metric {name!r}")
        for key in tag_keys:
            if not isinstance(key, str):
                raise TypeError(f"tag keys of metric {name!r} must be str, got {key!r}")
            problem = tag_key_problem(key)
            if problem is not None:
                raise ValueError(f"tag key {key!r} of metric {name!r} is not valid: "
                                 f"expected {problem}")
        if len(set(tag_keys)) != len(tag_keys):
            raise ValueError(f"tag_keys={tag_keys!r} of metric {name!r} repeat a key")
        self._name = name
        self._description = description
        self._tag_keys = tag_keys
        self._default_tags: Dict[str, str] = {}

    def set_default_tags(self, default_tags: Dict[str, str]) -> "Metric":
        """Tags used by every record call that does not pass them; returns self."""
        if not isinstance(default_tags, dict):
            raise TypeError(f"default_tags of metric {self._name!r} must be a dict, "
                            f"got {type(default_tags).__name__}")
        self._check_tags(default_tags)
        self._default_tags = dict(default_tags)
        return self

    def _check_tags(self, tags: dict) -> None:
        for key, value in tags.items():
            if key not in self._tag_keys:
                raise ValueError(f"unrecognized tag key {key!r} for metric {self._name!r} "
                                 f"(its tag_keys are {self._tag_keys!r})")
            if not isinstance(value, str):
                raise TypeError(f"tag values must be str: {key!r}={value!r} "
                                f"(metric {self._name!r})")
            if len(value) > MAX_TAG_VALUE_LEN:
                raise ValueError(f"tag {key!r} of metric {self._name!r} is {len(value)} "
                                 f"characters long; at most {MAX_TAG_VALUE_LEN} are allowed")

    def _tag_values(self, tags: Optional[Dict[str, str]]) -> tuple:
        if tags:
            if not isinstance(tags, dict):
                raise TypeError(f"tags of metric {self._name!r} must be a dict, "
                                f"got {type(tags).__name__}")
            self._check_tags(tags)
            final = {**self._default_tags, **tags}
        else:
            final = self._default_tags
        missing = [key for key in self._tag_keys if key not in final]
        if missing:
            raise ValueError(f"missing value for tag key(s) {', '.join(missing)} of metric "
                             f"{self._name!r}")
        return tuple(final[key] for key in self._tag_keys)

    def _record(self, value: Number, tags: Optional[Dict[str, str]]) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"value must be int or float, got {type(value).__name__} "
                            f"(metric {self._name!r})")
        if not math.isfinite(value):
            raise ValueError(f"value={value!r} of metric {self._name!r} must be finite")
        _pending.record(self, self._tag_values(tags), float(value))

    @property
    def info(self) -> dict:
        return {"name": self._name, "description": self._description,
                "tag_keys": self._tag_keys, "default_tags": self._default_tags}

    def __reduce__(self):
        return _rebuild, (type(self), self._init_args(), self._default_tags)

    def _init_args(self) -> tuple:
        return (self._name, self._description, self._tag_keys)


def _rebuild(cls, args: tuple, default_tags: dict) -> Metric:
    return cls(*args).set_default_tags(default_tags)


class Counter(Metric):
    """A count that only goes up; exported as Prometheus counter ``ray_<name>_total``."""

    _kind = "counter"

    def inc(self, value: Number = 1.0, tags: Optional[Dict[str, str]] = None) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            raise ValueError(f"value must be > 0, got {value!r} (counter {self._name!r})")
        self._record(value, tags)


class Gauge(Metric):
    """The last value set; exported as Prometheus gauge ``ray_<name>``."""

    _kind = "gauge"

    def set(self, value: Optional[Number], tags: Optional[Dict[str, str]] = None) -> None:
        if value is None:
            return
        self._record(value, tags)


class Histogram(Metric):
    """Observations counted in buckets; exported as Prometheus histogram ``ray_<name>``."""

    _kind = "histogram"

    def __init__(self, name: str, description: str = "", boundaries: Sequence[float] = None,
                 tag_keys: Optional[Tuple[str, ...]] = None):
        super().__init__(name, description, tag_keys)
        problem = boundaries_problem(list(boundaries) if boundaries is not None else None)
        if problem is not None:
            raise ValueError(f"boundaries={boundaries!r} of histogram {name!r} are not valid: "
                             f"expected {problem}")
        self.boundaries = [float(b) for b in boundaries]

    def observe(self, value: Number, tags: Optional[Dict[str, str]] = None) -> None:
        self._record(value, tags)

    @property
    def info(self) -> dict:
        return {**super().info, "boundaries": self.boundaries}

    def _init_args(self) -> tuple:
        return (self._name, self._description, self.boundaries, self._tag_keys)
