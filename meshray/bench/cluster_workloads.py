"""Rows that bring up a runtime of their own: a fresh local one, or a cluster.

None of them can share the runner's init() session (needs_session=False):
the idle-memory row measures a runtime nothing has used yet, in a fresh
process (workloads.PROBES), and the multi-node rows start a local cluster
with the runtime's `Cluster` fixture and connect the driver to its head.

Same constraints as workloads.py, which loads this module (WORKLOAD_MODULES):
only the standard library and numpy at module level, remote functions
defined inside the prepare functions, and only Ray Core APIs that both
runtimes share.
"""
from __future__ import annotations

import functools
import os
import time

try:
    from . import workloads as base
except ImportError:  # loaded by path next to Ray (runner._load_workloads)
    import meshray_bench_workloads as base

__all__ = ["descendants", "settled", "idle_memory_probe", "READER_COUNTS"]

MIB = 2 ** 20
SETTLE_QUIET_S = 2.0      # the process tree must look the same for this long
SETTLE_RSS_TOLERANCE = 0.02
SETTLE_DEADLINE_S = 60.0
READER_COUNTS = (1, 2, 4)


# --------------------------------------------------------------------- idle memory
def descendants(root: int, parents: dict) -> list:
    """`root` and every process below it, given {pid: parent pid}."""
    children: dict = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, i = [root], 0
    while i < len(found):
        found.extend(sorted(children.get(found[i], ())))
        i += 1
    return found


def settled(history, quiet_s: float = SETTLE_QUIET_S,
            tolerance: float = SETTLE_RSS_TOLERANCE) -> bool:
    """Whether a process tree has stopped changing.

    `history` is a list of (seconds, frozenset of pids, total RSS) readings,
    oldest first. Settled means: every reading since the last one at least
    `quiet_s` old has the latest set of processes and an RSS within
    `tolerance` of the latest (so nothing changed for `quiet_s`). A runtime
    prestarts workers and they import for a while after init() returns;
    measuring before that would flatter whichever runtime starts them later.
    """
    if not history:
        return False
    now, pids, rss = history[-1]
    old = [i for i, (when, _, _) in enumerate(history) if when <= now - quiet_s]
    if not old:
        return False  # not watched for quiet_s yet
    return all(other == pids and abs(size - rss) <= tolerance * rss
               for _, other, size in history[old[-1]:])


def _parents() -> dict:
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue  # exited while we looked
        # The command name is in parentheses and may hold anything; the
        # fields after the last ")" are state, then the parent pid.
        parents[int(entry)] = int(stat[stat.rfind(")") + 2:].split()[1])
    return parents


def _status_kib(pid: int, path: str, field: str) -> int:
    """A "Field:  N kB" line of /proc/PID/<path>; 0 if gone or absent."""
    try:
        with open(f"/proc/{pid}/{path}") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _tree_reading(root: int) -> tuple:
    pids = descendants(root, _parents())
    return frozenset(pids), sum(_status_kib(pid, "status", "VmRSS") for pid in pids)


def _label(pid: int) -> str:
    """A short name for a process: its program, or the module or script an
    interpreter runs."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    argv = [arg for arg in argv if arg]
    if not argv:
        return "?"
    program = os.path.basename(argv[0])
    if program.startswith("python") and len(argv) > 1:
        rest = argv[1:]
        if rest[0] == "-m" and len(rest) > 1:
            return rest[1]
        return os.path.basename(rest[0])
    return program.split()[0][:40]


def idle_memory_probe(rt, num_cpus: int) -> dict:
    """RSS of this process and all it started, once a fresh init() has settled.

    Run in a fresh process (PROBES["idle memory"]), so that the driver's
    share is the runtime's and not what earlier rows left on its heap.
    """
    me = os.getpid()
    rt.init(num_cpus=num_cpus, include_dashboard=False)
    try:
        start = time.monotonic()
        history: list = []
        while True:
            pids, rss = _tree_reading(me)
            history.append((time.monotonic(), pids, rss))
            if settled(history):
                break
            if time.monotonic() - start > SETTLE_DEADLINE_S:
                counts = sorted({len(p) for _, p, _ in history[-20:]})
                raise TimeoutError(f"the runtime's processes did not settle within "
                                   f"{SETTLE_DEADLINE_S:.0f}s (recent process counts {counts}, "
                                   f"RSS {history[-1][2] // 1024} MB)")
            time.sleep(0.1)
        pss = sum(_status_kib(pid, "smaps_rollup", "Pss") for pid in pids)
        names = sorted(_label(pid) for pid in pids if pid != me)
    finally:
        rt.shutdown()
    return {"rss_mb": rss / 1024, "pss_mb": pss / 1024, "processes": len(pids),
            "settle_s": history[-1][0] - start, "names": names}


base.PROBES["idle memory"] = idle_memory_probe


@base._workload("idle memory of a fresh local runtime", "MB",
                "fresh process: init(), wait until its processes settle, sum the RSS of the "
                "driver and every process below it (MB = 2^20 bytes); process count, PSS "
                "and names in details (not a `ray microbenchmark` row)",
                needs_session=False, max_runs=3)
def _idle_memory(ctx: base.Context):
    details: dict = {"processes": [], "pss_mb": [], "names": []}

    def sample():
        result = base.run_probe(ctx, "idle memory")
        details["processes"].append(result["processes"])
        details["pss_mb"].append(round(result["pss_mb"], 1))
        if result["names"] not in details["names"]:
            details["names"].append(result["names"])
        return result["rss_mb"]

    return base.Sampled(sample, details=details)


# --------------------------------------------------------------------- multi-node
@base._workload("tasks across 3 nodes with 1 MiB args", "ops/s",
                "as 'tasks spilled across 3 local nodes', but every task takes a 1 MiB numpy "
                "array passed by value from the driver (not a `ray microbenchmark` row)",
                needs_session=False)
def _three_node_tasks_with_args(ctx: base.Context):
    import numpy as np

    return base.three_node_tasks(ctx, (np.ones(MIB, dtype=np.uint8),))


def _concurrent_readers(ctx: base.Context, readers: int):
    """One producer node and `readers` reader nodes, each reading the same object at once."""
    rt = ctx.rt
    size = ctx.size(1024 ** 3, 64 * MIB)
    store = 2 * size + 256 * MIB
    cluster, added = base._start_cluster(
        ctx, {"num_cpus": 1, "resources": {"bench_src": 1}, "object_store_memory": store},
        [{"num_cpus": 1, "resources": {f"bench_reader_{i}": 1}, "object_store_memory": store}
         for i in range(readers)])
    reader_seconds: list = []
    try:
        @rt.remote(num_cpus=0, resources={"bench_src": 0.01})
        def produce(nbytes):
            import numpy as np
            return np.ones(nbytes, dtype=np.uint8)

        @rt.remote(num_cpus=0)
        def consume(array):
            return array.nbytes, rt.get_runtime_context().get_node_id()

        # A resource only reader i's node has pins each read to its own node.
        consumers = [consume.options(resources={f"bench_reader_{i}": 0.01})
                     for i in range(readers)]

        def check(results, nbytes):
            if any(got != nbytes for got, _ in results):
                raise RuntimeError(f"readers saw {[got for got, _ in results]} bytes, "
                                   f"expected {nbytes}")
            if len({node for _, node in results}) != readers:
                raise RuntimeError(f"{readers} readers ran on fewer nodes: {results}")

        def warmup():
            small = produce.remote(1024)
            check(rt.get([c.remote(small) for c in consumers], timeout=120), 1024)

        def sample():
            ref = produce.remote(size)
            rt.wait([ref], fetch_local=False, timeout=120)
            start = time.perf_counter()
            deadline = time.monotonic() + 300
            index = {c.remote(ref): i for i, c in enumerate(consumers)}
            seconds = [0.0] * readers
            pending = list(index)
            while pending:
                done, pending = rt.wait(pending, num_returns=1,
                                        timeout=max(0.0, deadline - time.monotonic()))
                if not done:
                    raise TimeoutError(f"{len(pending)} of {readers} readers unfinished "
                                       f"after 300s")
                for finished in done:
                    seconds[index[finished]] = time.perf_counter() - start
            elapsed = time.perf_counter() - start
            check(rt.get(list(index), timeout=60), size)
            reader_seconds.append([round(s, 4) for s in seconds])
            del ref, index, pending, done
            return readers * size / 1e9 / elapsed
    except BaseException:
        base._stop_cluster(ctx, cluster)
        raise
    return base.Sampled(sample, warmup=warmup, cleanup=lambda: base._stop_cluster(ctx, cluster),
                        details={"bytes": size, "readers": readers,
                                 "reader_seconds": reader_seconds,
                                 "node_ids": base.cluster_node_ids(cluster, added)})


for _readers in READER_COUNTS:
    base._workload(f"1 GiB object transfer, {_readers} concurrent reader{'s' * (_readers > 1)}",
                   "GB/s",
                   f"a task on a producer node returns a 1 GiB array; {_readers} task(s), one on "
                   f"each reader node, read it at the same time; aggregate "
                   f"{_readers} x 1 GiB / elapsed, per-reader seconds in details "
                   f"(not a `ray microbenchmark` row)", needs_session=False, max_runs=5)(
        functools.partial(_concurrent_readers, readers=_readers))
