"""The node's memory monitor: sample usage, and kill one worker when it is too high.

Without it a node that runs out of memory meets the kernel's OOM killer,
which picks by size and may take the node daemon itself. The monitor acts
first: every `refresh_ms` it reads the node's memory (host, cgroup v2, cgroup
v1: the smallest limit counts) and, past the threshold, kills the worker the
policy picks (node/memory_policy.py). It kills one worker at a time and waits
for that one to be gone before it chooses again: memory is freed only when
the process has exited.

A killed task is retried by Ray's rules (node/memory_policy.py: apart from
its max_retries, after a doubling delay, never an owner's last task) or fails
with OutOfMemoryError naming the figures; a killed actor restarts if it has
restarts left, its death cause naming the figures. The verdict is put on the
worker before the kill (`oom_retry_in`, or the error), so the daemon's usual
worker-death path (`_worker_lost`) carries it out instead of reporting a crash.

Settings come from the node's environment, Ray's names or MESHRAY_ ones
(which win): see `MemorySettings.from_env`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

import psutil

from meshray import exceptions
from meshray.node import actors as actor_states
from meshray.node.memory_policy import (
    Candidate,
    MemoryReading,
    choose_victim,
    effective_usage,
    oom_retry_allowed,
    oom_retry_delay,
    over_threshold,
)
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["MemorySettings", "MemoryMonitor", "read_cgroup", "read_host", "TEST_LIMIT_ENV"]

log = logging.getLogger(__name__)

THRESHOLD_ENV = ("MESHRAY_memory_usage_threshold", "RAY_memory_usage_threshold")
REFRESH_ENV = ("MESHRAY_memory_monitor_refresh_ms", "RAY_memory_monitor_refresh_ms")
OOM_RETRIES_ENV = ("MESHRAY_task_oom_retries", "RAY_task_oom_retries")
OOM_DELAY_ENV = ("MESHRAY_task_oom_retry_delay_base_ms", "RAY_task_oom_retry_delay_base_ms")
# Test-only: pretend the node's workers live in a cgroup of this many bytes,
# whose usage is the sum of their RSS (so tests can trigger a kill on any host).
TEST_LIMIT_ENV = "MESHRAY_TEST_NODE_MEMORY_LIMIT"
# cgroup v1 writes "no limit" as a number near 2**63.
UNLIMITED = 1 << 60
# How often "over the threshold with nothing to kill" is logged.
NOTHING_TO_KILL_LOG_S = 30.0


def _env_value(environ, names, parse, expected: str):
    for name in names:
        raw = environ.get(name)
        if raw is None or raw == "":
            continue
        try:
            return parse(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r}: expected {expected}") from None
    return None


def _fraction(raw: str) -> float:
    value = float(raw)
    if not 0.0 < value <= 1.0:
        raise ValueError(raw)
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(raw)
    return value


def _retry_count(raw: str) -> int:
    value = int(raw)
    if value < -1:
        raise ValueError(raw)
    return value


@dataclass(frozen=True)
class MemorySettings:
    threshold: float = 0.95      # fraction of the limit past which a worker is killed
    refresh_ms: int = 250        # sampling interval; 0 disables the monitor
    test_limit: int = 0          # TEST_LIMIT_ENV (0: unset)
    oom_retries: int = -1        # retries of a task killed for memory (-1: no limit)
    oom_retry_delay_base_ms: int = 1000   # the first such retry's delay; doubles, capped at 60 s

    @classmethod
    def from_env(cls, environ=None) -> "MemorySettings":
        """Read the settings; a bad value raises ValueError naming the variable."""
        environ = os.environ if environ is None else environ
        threshold = _env_value(environ, THRESHOLD_ENV, _fraction, "a number in (0, 1]")
        refresh = _env_value(environ, REFRESH_ENV, _non_negative_int,
                             "a whole number of milliseconds >= 0 (0 disables)")
        test_limit = _env_value(environ, (TEST_LIMIT_ENV,), _non_negative_int,
                                "a whole number of bytes >= 0")
        retries = _env_value(environ, OOM_RETRIES_ENV, _retry_count,
                             "a whole number >= -1 (-1: retry without limit)")
        delay = _env_value(environ, OOM_DELAY_ENV, _non_negative_int,
                           "a whole number of milliseconds >= 0")
        return cls(threshold=cls.threshold if threshold is None else threshold,
                   refresh_ms=cls.refresh_ms if refresh is None else refresh,
                   test_limit=test_limit or 0,
                   oom_retries=cls.oom_retries if retries is None else retries,
                   oom_retry_delay_base_ms=cls.oom_retry_delay_base_ms if delay is None
                   else delay)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as handle:
            text = handle.read().strip()
    except OSError:
        return None
    if text == "max":
        return 0
    try:
        return int(text)
    except ValueError:
        return None


def _stat_value(path: str, key: str) -> int:
    try:
        with open(path) as handle:
            for line in handle:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def read_cgroup(root: str = "/sys/fs/cgroup") -> MemoryReading | None:
    """The cgroup's limit and usage (v2, else v1); None without a limit.

    Inactive file pages are left out of usage: the kernel reclaims them
    before it runs out, so counting them would kill for page cache.
    """
    limit = _read_int(os.path.join(root, "memory.max"))
    if limit is not None:
        current = _read_int(os.path.join(root, "memory.current")) or 0
        used = current - _stat_value(os.path.join(root, "memory.stat"), "inactive_file")
        source = "cgroup v2"
    else:
        v1 = os.path.join(root, "memory")
        limit = _read_int(os.path.join(v1, "memory.limit_in_bytes"))
        if limit is None:
            return None
        current = _read_int(os.path.join(v1, "memory.usage_in_bytes")) or 0
        used = current - _stat_value(os.path.join(v1, "memory.stat"), "total_inactive_file")
        source = "cgroup v1"
    if not limit or limit >= UNLIMITED:
        return None
    return MemoryReading(source, max(0, used), limit)


def read_host() -> MemoryReading:
    """The host's RAM: used is what is not available (free plus reclaimable)."""
    memory = psutil.virtual_memory()
    return MemoryReading("host", memory.total - memory.available, memory.total)


def process_rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except (psutil.Error, OSError):
        return 0


def _gb(size: int) -> str:
    return f"{size / (1 << 30):.2f}GB"


class MemoryMonitor:
    """Created and driven by the node daemon; reads its pool and tasks."""

    def __init__(self, daemon, settings: MemorySettings | None = None):
        self.daemon = daemon
        self.settings = settings or MemorySettings.from_env()
        self._victim = None               # the worker last killed, until it has exited
        self._quiet_until = 0.0
        # For the node's metrics: kills by (Type, Name), as Ray's
        # ray_memory_manager_worker_eviction_total, and the last sample.
        self.evictions: dict = {}
        self.last_fraction: float | None = None

    async def run(self, stopping: asyncio.Event) -> None:
        if self.settings.refresh_ms <= 0:
            log.info("memory monitor disabled (refresh_ms=0)")
            return
        interval = self.settings.refresh_ms / 1000.0
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), interval)
                return
            except asyncio.TimeoutError:
                pass
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a monitoring hiccup never takes the node down
                log.exception("memory monitor check failed")

    def metrics_snapshot(self, names) -> dict:
        """For the scrape thread: kills by (Type, capped Name), the last usage, the threshold."""
        evictions: dict = {}
        for (kind, name), count in list(self.evictions.items()):
            key = (kind, names(name))
            evictions[key] = evictions.get(key, 0) + count
        return {"evictions": evictions, "usage_fraction": self.last_fraction,
                "threshold": self.settings.threshold,
                "enabled": self.settings.refresh_ms > 0}

    def sample(self) -> MemoryReading | None:
        readings = [read_host(), read_cgroup()]
        if self.settings.test_limit:
            pool = self.daemon.pool
            used = sum(process_rss(worker.pid) for worker in list(pool.by_id.values())) \
                if pool is not None else 0
            readings.append(MemoryReading("test limit", used, self.settings.test_limit))
        return effective_usage(readings)

    def check(self) -> None:
        """One sample and, past the threshold, one kill."""
        if self._victim is not None:
            if self._victim.process.poll() is None:
                return                     # still exiting: its memory is not free yet
            self._victim = None
        usage = self.sample()
        if usage is not None:
            self.last_fraction = usage.fraction
        if not over_threshold(usage, self.settings.threshold):
            return
        workers = {}
        candidates = []
        for worker in list(self.daemon.pool.by_id.values()):
            candidate = self._candidate(worker)
            if candidate is not None:
                workers[worker.worker_id] = worker
                candidates.append(candidate)
        victim = choose_victim(usage, self.settings.threshold, candidates)
        if victim is None:
            now = time.monotonic()
            if now >= self._quiet_until:
                self._quiet_until = now + NOTHING_TO_KILL_LOG_S
                log.warning("memory on this node is %s / %s (%.3f, %s), over the threshold "
                            "%.2f, but no task or actor runs here to kill", _gb(usage.used),
                            _gb(usage.limit), usage.fraction, usage.source,
                            self.settings.threshold)
            return
        self._kill(workers[victim.worker_id], victim, usage)

    def _candidate(self, worker) -> Candidate | None:
        if worker.conn is None or worker.process.poll() is not None:
            return None
        entry = worker.actor
        if entry is not None:
            if entry.state != actor_states.ALIVE:
                return None
            return Candidate(worker.worker_id, entry.spec.owner_id, worker.started_at,
                             actor_states.restarts_left(entry), is_actor=True)
        run = worker.leased_task
        if worker.lease is not None and run is not None:
            # A task its lease's holder pushed: judged as the node's own are.
            return Candidate(worker.worker_id, worker.lease.holder.worker_id, run.started_at,
                             self._leased_retriable(worker, run))
        task = worker.current_task
        if task is None or task.state != "running" or task.cancelled:
            return None
        return Candidate(worker.worker_id, task.spec.owner_id, task.started_at,
                         self._retriable(task))

    def _leased_retriable(self, worker, run) -> bool:
        """As `_retriable`, for a pushed task (its earlier memory kills are
        not known here: each attempt counts as its first)."""
        return (oom_retry_allowed(run.max_retries, 0, self.settings.oom_retries)
                and not getattr(worker.lease.holder, "closed", False))

    def _retriable(self, task) -> bool:
        """Whether a memory kill of `task` may be retried (the policy may still
        make an owner's last task final)."""
        return (oom_retry_allowed(task.spec.max_retries, task.oom_kills, self.settings.oom_retries)
                and self.daemon._owner_present(task.owner) and not task.pg_dropped)

    def _kill(self, worker, victim: Candidate, usage: MemoryReading) -> None:
        daemon = self.daemon
        rss = process_rss(worker.pid)
        entry = worker.actor
        run = worker.leased_task if worker.lease is not None else None
        if entry is not None:
            name = entry.options.get("class_name") or entry.actor_id.hex()
            kind, what, task_id = "Actor", f"actor {name}", b""
        elif run is not None:
            name = run.name
            kind, what, task_id = "Task", f"task {name}", run.task_id
        else:
            name = worker.current_task.spec.name
            kind, what, task_id = "Task", f"task {name}", worker.current_task.task_id
        if victim.retriable:
            reason = "it was the newest retriable work of the owner with the most running tasks"
        elif entry is None and (self._leased_retriable(worker, run) if run is not None
                                else self._retriable(worker.current_task)):
            reason = ("it was its owner's last task running here, and each owner keeps one "
                      "task making progress: killing that one ends it for good")
        else:
            reason = "no retriable task or actor was left to kill"
        message = (
            f"The {what} (worker pid {worker.pid}, RSS {_gb(rss)}) was killed because node "
            f"{daemon.node_id.hex()} ({daemon.address}) ran low on memory: {_gb(usage.used)} / "
            f"{_gb(usage.limit)} ({usage.fraction:.3f}) used by {usage.source} figures, over "
            f"the memory usage threshold {self.settings.threshold}. It was chosen because "
            f"{reason}. Provision more memory, run fewer tasks at once (ask for more CPUs "
            "per task), or set RAY_memory_usage_threshold; RAY_memory_monitor_refresh_ms=0 "
            "disables the monitor.")
        if entry is not None:
            entry.kill_cause = message     # its death (or restart) says why
        else:
            worker.kill_error = exceptions.OutOfMemoryError(
                message, task_id=task_id, node_id=daemon.node_id, worker_id=worker.worker_id,
                memory_used=usage.used, memory_limit=usage.limit,
                threshold=self.settings.threshold, rss=rss)
            if victim.retriable and run is not None:
                # Its holder retries it after the delay (lease_end says so).
                worker.oom_retry_in = oom_retry_delay(
                    1, self.settings.oom_retry_delay_base_ms / 1000.0)
                worker.lease.holder.send(pb.ServerEvent(notice=pb.Notice(
                    text=f"{message} The task will be retried in {worker.oom_retry_in:g} s "
                         f"(RAY_task_oom_retries={self.settings.oom_retries}).")))
            elif victim.retriable:       # otherwise the error itself tells the owner
                task = worker.current_task
                task.oom_kills += 1
                worker.oom_retry_in = oom_retry_delay(
                    task.oom_kills, self.settings.oom_retry_delay_base_ms / 1000.0)
                task.owner.send(pb.ServerEvent(notice=pb.Notice(
                    text=f"{message} The task will be retried in {worker.oom_retry_in:g} s "
                         f"(memory kill {task.oom_kills}; RAY_task_oom_retries="
                         f"{self.settings.oom_retries}).")))
        log.warning("memory monitor: %s", message)
        key = (kind, name)
        self.evictions[key] = self.evictions.get(key, 0) + 1
        self._victim = worker
        daemon.pool.kill(worker)
