"""The microbenchmark workloads, written once and run on either runtime.

Every workload is a `prepare(ctx)` function that receives the runtime module
(`ray` or `meshray`) in `ctx.rt` and returns the operation to time. Both
runtimes therefore run literally the same code, which is what makes the
meshray/Ray ratio meaningful. Rows named after a `ray microbenchmark` row do
the same work as that row (same batch sizes, same counting), so numbers can be
held against Ray's published ones too.

Constraints this module lives under, and why:

* Only the standard library and numpy at module level: the Ray side loads this
  file into an interpreter that has Ray but none of meshray's dependencies.
* Remote functions and actor classes are defined *inside* the prepare
  functions. cloudpickle ships closures by value, so workers never need to
  import this module (the Ray workers could not); their bodies may refer only
  to closure variables, builtins, stdlib modules, numpy and the runtime.
* Nothing here decides how long to time or what to do with failures: that is
  the runner's job, so the methodology is in one place.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Optional

__all__ = [
    "Context",
    "Timed",
    "Sampled",
    "Workload",
    "WORKLOADS",
    "ROW_NAMES",
    "select",
    "init_probe",
    "run_probe",
    "PROBES",
    "LOWER_IS_BETTER",
    "WORKLOAD_MODULES",
]


@dataclass
class Context:
    """What a workload may know about the run it is part of."""

    rt: ModuleType
    runtime: str                 # "meshray" or "ray"
    num_cpus: int
    quick: bool
    runs: int
    python: str = sys.executable  # the interpreter that has `rt`, for fresh-process probes
    runner_path: str = ""        # runner.py, started as a file for those probes
    workdir: str = field(default_factory=tempfile.gettempdir)

    def size(self, full, quick):
        """Full-size batch normally, a token one under --quick (a smoke test)."""
        return quick if self.quick else full

    def node_args(self, **args) -> dict:
        """Cluster node arguments; Ray's nodes also get their dashboard switched off."""
        if self.runtime == "ray":
            args.setdefault("include_dashboard", False)
        return args

    def cluster_class(self):
        """Ray's `ray.cluster_utils.Cluster` or meshray's `meshray.testing.Cluster`.

        Both have the same interface, so the multi-node workloads below are
        runtime-agnostic; a runtime without the fixture raises here and its
        rows report n/a.
        """
        if self.runtime == "ray":
            module = importlib.import_module("ray.cluster_utils")
        else:
            module = importlib.import_module(f"{self.rt.__name__}.testing")
        return module.Cluster

    def placement_group_api(self):
        module = importlib.import_module(f"{self.rt.__name__}.util.placement_group")
        return module.placement_group, module.remove_placement_group


@dataclass
class Timed:
    """An operation timed by repetition: the rate is per_call * calls / seconds.

    per_call is what one call counts as (1000 for a batch of 1000 tasks, GB
    for a put of a large array). With per_op_seconds the row reports seconds
    per call instead of a rate (latency rows).
    """

    op: Callable[[], object]
    per_call: float = 1.0
    per_op_seconds: bool = False
    cleanup: Optional[Callable[[], None]] = None
    details: dict = field(default_factory=dict)


@dataclass
class Sampled:
    """An operation too expensive to repeat in a loop: each call is one sample.

    `sample()` returns the measured value itself (seconds, or GB/s), timing
    only the part that matters and leaving setup (a fresh cluster node, a
    fresh 1 GiB object) out of the clock.
    """

    sample: Callable[[], float]
    cleanup: Optional[Callable[[], None]] = None
    details: dict = field(default_factory=dict)
    warmup: Optional[Callable[[], None]] = None


@dataclass(frozen=True)
class Workload:
    name: str
    unit: str                    # "ops/s", "GB/s", or one of LOWER_IS_BETTER
    prepare: Callable[[Context], object]
    needs_session: bool = True   # runs inside the shared init() session
    max_runs: Optional[int] = None
    note: str = ""


WORKLOADS: list[Workload] = []

# Units where a smaller value is the better result (latencies, footprints);
# every other unit is a rate. MB is 2**20 bytes, as ps and top count memory.
LOWER_IS_BETTER = frozenset({"s", "ms", "MB"})


def _workload(name: str, unit: str, note: str, *, needs_session: bool = True,
              max_runs: Optional[int] = None):
    def register(prepare):
        WORKLOADS.append(Workload(name, unit, prepare, needs_session, max_runs, note))
        return prepare
    return register


def _kill_actors(rt, *handles) -> None:
    """Release actors now rather than whenever their handles are collected,
    so the next row does not share the CPUs with them."""
    kill = getattr(rt, "kill", None)
    for handle in handles:
        if kill is not None:
            try:
                kill(handle)
            except Exception:  # noqa: BLE001 - best effort; the session ends anyway
                pass


def _tasks(rt):
    @rt.remote
    def small_value():
        return b"ok"

    @rt.remote
    def make_refs(n):
        return [rt.put(1) for _ in range(n)]

    return small_value, make_refs


def _actors(rt):
    """Actor classes as in Ray's ray_perf: trivial methods, num_cpus=0.

    num_cpus=0 everywhere so that the number of actors a row creates never
    depends on how many CPUs the machine has.
    """
    class Actor:
        def small_value(self):
            return b"ok"

        def small_value_arg(self, x):
            return b"ok"

    class AsyncActor:
        async def small_value(self):
            return b"ok"

    class Client:
        def __init__(self, servers):
            self.servers = list(servers)

        def small_value_batch(self, n):
            refs = []
            for server in self.servers:
                refs.extend(server.small_value.remote() for _ in range(n))
            rt.get(refs)

    make = rt.remote(num_cpus=0)
    return make(Actor), make(AsyncActor), make(Client)


# --------------------------------------------------------------------- tasks
@_workload("single client tasks sync", "ops/s",
           "one task submitted and waited for at a time: the round-trip latency of a task")
def _tasks_sync(ctx: Context):
    small_value, _ = _tasks(ctx.rt)
    rt = ctx.rt
    return Timed(lambda: rt.get(small_value.remote()))


@_workload("single client tasks async", "ops/s",
           "1000 tasks submitted, then all fetched with one get(); counts tasks")
def _tasks_async(ctx: Context):
    small_value, _ = _tasks(ctx.rt)
    rt, n = ctx.rt, ctx.size(1000, 100)
    return Timed(lambda: rt.get([small_value.remote() for _ in range(n)]), per_call=n)


@_workload("single client tasks and get batch", "ops/s",
           "as 'tasks async', but counts batches of 1000 (Ray's definition)")
def _tasks_and_get_batch(ctx: Context):
    small_value, _ = _tasks(ctx.rt)
    rt, n = ctx.rt, ctx.size(1000, 100)
    return Timed(lambda: rt.get([small_value.remote() for _ in range(n)]))


# --------------------------------------------------------------------- actors
@_workload("1:1 actor calls sync", "ops/s", "one actor, one call in flight")
def _actor_sync(ctx: Context):
    rt = ctx.rt
    actor_cls, _, _ = _actors(rt)
    actor = actor_cls.remote()
    rt.get(actor.small_value.remote())
    return Timed(lambda: rt.get(actor.small_value.remote()),
                 cleanup=lambda: _kill_actors(rt, actor))


@_workload("1:1 actor calls async", "ops/s", "one actor, 1000 calls then one get()")
def _actor_async(ctx: Context):
    rt, n = ctx.rt, ctx.size(1000, 100)
    actor_cls, _, _ = _actors(rt)
    actor = actor_cls.remote()
    rt.get(actor.small_value.remote())
    return Timed(lambda: rt.get([actor.small_value.remote() for _ in range(n)]), per_call=n,
                 cleanup=lambda: _kill_actors(rt, actor))


@_workload("1:1 actor calls concurrent", "ops/s",
           "as 'actor calls async' on a threaded actor (max_concurrency=16)")
def _actor_concurrent(ctx: Context):
    rt, n = ctx.rt, ctx.size(1000, 100)
    actor_cls, _, _ = _actors(rt)
    actor = actor_cls.options(max_concurrency=16).remote()
    rt.get(actor.small_value.remote())
    return Timed(lambda: rt.get([actor.small_value.remote() for _ in range(n)]), per_call=n,
                 cleanup=lambda: _kill_actors(rt, actor))


@_workload("1:n actor calls async", "ops/s",
           "a client actor calls num_cpus/2 server actors, 5000 calls each")
def _actor_one_to_n(ctx: Context):
    rt, n = ctx.rt, ctx.size(5000, 100)
    actor_cls, _, client_cls = _actors(rt)
    servers = [actor_cls.remote() for _ in range(max(1, ctx.num_cpus // 2))]
    client = client_cls.remote(servers)
    rt.get(client.small_value_batch.remote(1))
    return Timed(lambda: rt.get(client.small_value_batch.remote(n)), per_call=n * len(servers),
                 cleanup=lambda: _kill_actors(rt, client, *servers))


@_workload("n:n actor calls async", "ops/s",
           "4 tasks each make 5000 calls spread over num_cpus/2 actors")
def _actor_n_to_n(ctx: Context):
    rt, n, m = ctx.rt, ctx.size(5000, 100), 4
    actor_cls, _, _ = _actors(rt)
    actors = [actor_cls.remote() for _ in range(max(1, ctx.num_cpus // 2))]

    @rt.remote
    def work(handles, count):
        rt.get([handles[i % len(handles)].small_value.remote() for i in range(count)])

    rt.get([a.small_value.remote() for a in actors])
    return Timed(lambda: rt.get([work.remote(actors, n) for _ in range(m)]), per_call=m * n,
                 cleanup=lambda: _kill_actors(rt, *actors))


@_workload("1:1 async-actor calls sync", "ops/s", "an asyncio actor, one call in flight")
def _async_actor_sync(ctx: Context):
    rt = ctx.rt
    _, async_cls, _ = _actors(rt)
    actor = async_cls.remote()
    rt.get(actor.small_value.remote())
    return Timed(lambda: rt.get(actor.small_value.remote()),
                 cleanup=lambda: _kill_actors(rt, actor))


@_workload("1:1 async-actor calls async", "ops/s", "an asyncio actor, 1000 calls then one get()")
def _async_actor_async(ctx: Context):
    rt, n = ctx.rt, ctx.size(1000, 100)
    _, async_cls, _ = _actors(rt)
    actor = async_cls.remote()
    rt.get(actor.small_value.remote())
    return Timed(lambda: rt.get([actor.small_value.remote() for _ in range(n)]), per_call=n,
                 cleanup=lambda: _kill_actors(rt, actor))


@_workload("1:1 actor calls with args (1 MiB)", "ops/s",
           "100 calls, each passing a 1 MiB numpy array by value (serialized every call) "
           "(not a `ray microbenchmark` row)")
def _actor_with_args(ctx: Context):
    import numpy as np

    rt, n = ctx.rt, ctx.size(100, 10)
    actor_cls, _, _ = _actors(rt)
    actor = actor_cls.remote()
    payload = np.ones(1024 * 1024, dtype=np.uint8)
    rt.get(actor.small_value_arg.remote(payload))
    return Timed(lambda: rt.get([actor.small_value_arg.remote(payload) for _ in range(n)]),
                 per_call=n, cleanup=lambda: _kill_actors(rt, actor))


# --------------------------------------------------------------------- objects
@_workload("single client put calls (Plasma Store)", "ops/s", "put() of a small int")
def _put_small(ctx: Context):
    rt = ctx.rt
    return Timed(lambda: rt.put(0))


@_workload("single client get calls (Plasma Store)", "ops/s",
           "get() of one small put() object, again and again")
def _get_small(ctx: Context):
    rt = ctx.rt
    ref = rt.put(0)
    return Timed(lambda: rt.get(ref))


@_workload("single client put gigabytes", "GB/s",
           "put() of an 800 MiB numpy array of zeros (1 GB = 1e9 bytes)")
def _put_gigabytes(ctx: Context):
    import numpy as np

    rt = ctx.rt
    array = np.zeros(ctx.size(100 * 1024 * 1024, 1024 * 1024), dtype=np.int64)
    return Timed(lambda: rt.put(array), per_call=array.nbytes / 1e9)


@_workload("single client wait 1k refs", "ops/s",
           "1000 tasks, then 1000 wait() calls each taking one ready ref off the list")
def _wait_refs(ctx: Context):
    small_value, _ = _tasks(ctx.rt)
    rt, n = ctx.rt, ctx.size(1000, 100)

    def op():
        not_ready = [small_value.remote() for _ in range(n)]
        fetch_local = True
        for _ in range(n):
            _, not_ready = rt.wait(not_ready, fetch_local=fetch_local)
            fetch_local = False  # asked once; later waits need not re-request

    return Timed(op)


@_workload("single client get object containing 10k refs", "ops/s",
           "get() of a list of 10000 refs that a task put()")
def _get_containing_refs(ctx: Context):
    _, make_refs = _tasks(ctx.rt)
    rt = ctx.rt
    ref = make_refs.remote(ctx.size(10000, 1000))
    rt.get(ref)
    return Timed(lambda: rt.get(ref))


# --------------------------------------------------------------------- placement groups
@_workload("placement group create/removal", "ops/s",
           "100 one-bundle groups created, waited for, removed; counts groups")
def _pg_create_removal(ctx: Context):
    create, remove = ctx.placement_group_api()
    count = ctx.size(100, 10)

    def op():
        groups = [create([{"custom": 0.001}]) for _ in range(count)]
        for group in groups:
            if not group.wait(timeout_seconds=30):
                raise TimeoutError("placement group not ready within 30s")
        for group in groups:
            remove(group)

    return Timed(op, per_call=count)


@_workload("placement group create->ready->remove latency", "s",
           "one {CPU: 1} group: create, get(pg.ready()), remove; seconds per cycle")
def _pg_latency(ctx: Context):
    create, remove = ctx.placement_group_api()
    rt = ctx.rt

    def op():
        group = create([{"CPU": 1}])
        rt.get(group.ready(), timeout=30)
        remove(group)

    return Timed(op, per_op_seconds=True)


# --------------------------------------------------------------------- startup
def init_probe(rt: ModuleType, num_cpus: int) -> dict:
    """Seconds from init() to the first task's result, in a process that has
    never initialised the runtime (the runner calls this in a fresh child)."""
    start = time.perf_counter()
    rt.init(num_cpus=num_cpus, include_dashboard=False)

    @rt.remote
    def first():
        return 1

    rt.get(first.remote())
    elapsed = time.perf_counter() - start
    rt.shutdown()
    return {"init_to_first_result_s": elapsed}


# Measurements that need a process of their own, in which the runtime was
# never initialised: `runner.py --probe NAME` calls PROBES[NAME](rt, num_cpus)
# and prints the dict it returns (plus the runtime's import time).
PROBES: dict[str, Callable[[ModuleType, int], dict]] = {"init": init_probe}


def run_probe(ctx: Context, name: str, timeout: float = 180) -> dict:
    """Run PROBES[name] in a fresh interpreter of the runtime under test."""
    proc = subprocess.run(
        [ctx.python, ctx.runner_path, "--runtime", ctx.runtime, "--probe", name,
         "--num-cpus", str(ctx.num_cpus)],
        capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} probe failed (rc {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout)[-800:]}")
    return json.loads(lines[-1])


@_workload("init to first result", "s",
           "fresh process: init() (starting a private cluster) until the first task's "
           "result arrives; import time is in details", needs_session=False)
def _init_to_first_result(ctx: Context):
    imports: list = []

    def sample():
        result = run_probe(ctx, "init")
        imports.append(result["import_s"])
        return result["init_to_first_result_s"]

    details: dict = {"import_s": imports}
    return Sampled(sample, details=details)


# --------------------------------------------------------------------- runtime envs
def _fresh_working_dir(ctx: Context, tag: str) -> str:
    """A small package directory with content no earlier run has shipped."""
    import uuid
    path = os.path.join(ctx.workdir, f"bench-wd-{tag}-{uuid.uuid4().hex[:8]}")
    os.makedirs(path)
    with open(os.path.join(path, "bench_wd_mod.py"), "w") as handle:
        handle.write(f"TAG = {uuid.uuid4().hex!r}\n" + "# padding\n" * 2000)
    return path


def _env_task(rt):
    if getattr(rt, "__name__", "") == "ray":
        # Ray ships local directories only for the whole job (ray.init), so a
        # per-task working_dir has no counterpart there.
        raise NotImplementedError("Ray accepts a local working_dir only in init()")

    @rt.remote(num_cpus=0)
    def tag():
        import bench_wd_mod
        return bench_wd_mod.TAG
    return tag


@_workload("runtime env: first task with a new working_dir (cold)", "s",
           "a task whose runtime_env names a working_dir never shipped before: upload, "
           "unpack on the node, start an environment worker, run")
def _working_dir_cold(ctx: Context):
    rt = ctx.rt
    task = _env_task(rt)

    def sample():
        path = _fresh_working_dir(ctx, "cold")
        try:
            start = time.perf_counter()
            rt.get(task.options(runtime_env={"working_dir": path}).remote(), timeout=300)
            return time.perf_counter() - start
        finally:
            shutil.rmtree(path, ignore_errors=True)

    return Sampled(sample)


@_workload("runtime env: first task with a cached working_dir (warm)", "s",
           "the same working_dir again after it was set up once: what a cached environment "
           "adds to a task's start (compare 'single client tasks sync' latency)")
def _working_dir_warm(ctx: Context):
    rt = ctx.rt
    task = _env_task(rt)
    path = _fresh_working_dir(ctx, "warm")
    env = {"working_dir": path}
    rt.get(task.options(runtime_env=env).remote(), timeout=300)

    def sample():
        start = time.perf_counter()
        rt.get(task.options(runtime_env=env).remote(), timeout=300)
        return time.perf_counter() - start

    return Sampled(sample, cleanup=lambda: shutil.rmtree(path, ignore_errors=True))


@_workload("runtime env: first task with a cached pip env", "s",
           "a task whose runtime_env pip list was installed once before (an empty requirement "
           "set plus env_vars, so no package index is needed)")
def _pip_warm(ctx: Context):
    rt = ctx.rt
    if ctx.runtime == "ray":
        # Ray builds pip envs with virtualenv and pip from the index; on a
        # machine without one its setup fails, so there is nothing to compare.
        raise NotImplementedError("Ray's pip runtime env needs a package index here")

    @rt.remote(num_cpus=0)
    def ping():
        return 1

    env = {"pip": ["pip"], "env_vars": {"BENCH_PIP_ENV": "1"}}
    rt.get(ping.options(runtime_env=env).remote(), timeout=600)

    def sample():
        start = time.perf_counter()
        rt.get(ping.options(runtime_env=env).remote(), timeout=300)
        return time.perf_counter() - start

    return Sampled(sample)


# --------------------------------------------------------------------- multi-node
def _start_cluster(ctx: Context, head_args: dict, nodes: list):
    """A local cluster with the driver connected to its head node."""
    cluster_cls = ctx.cluster_class()
    cluster = cluster_cls(initialize_head=True, head_node_args=ctx.node_args(**head_args))
    try:
        added = [cluster.add_node(**ctx.node_args(**args)) for args in nodes]
        cluster.wait_for_nodes()
        ctx.rt.init(address=cluster.address)
    except BaseException:
        cluster.shutdown()
        raise
    return cluster, added


def _stop_cluster(ctx: Context, cluster) -> None:
    try:
        ctx.rt.shutdown()
    finally:
        cluster.shutdown()


def cluster_node_ids(cluster, added) -> list:
    """The ids of a cluster's nodes, reported so that a check can tell that
    the row left nothing of them behind (their stores, for one)."""
    nodes = [cluster.head_node, *added]
    return [getattr(node, "node_id", None) for node in nodes if node is not None]


def three_node_tasks(ctx: Context, args: tuple) -> Timed:
    """Ten-millisecond num_cpus=1 tasks, each given `args`, over three one-CPU nodes."""
    rt = ctx.rt
    cluster, added = _start_cluster(ctx, {"num_cpus": 1}, [{"num_cpus": 1}, {"num_cpus": 1}])
    try:
        @rt.remote(num_cpus=1)
        def ten_ms(*payload):
            time.sleep(0.01)
            return rt.get_runtime_context().get_node_id(), sum(a.nbytes for a in payload)

        n = ctx.size(60, 12)
        sent = sum(a.nbytes for a in args)
        warm = rt.get([ten_ms.remote(*args) for _ in range(n)], timeout=120)
        if any(got != sent for _, got in warm):
            raise RuntimeError(f"tasks saw argument bytes {sorted({g for _, g in warm})}, "
                               f"expected {sent}")
    except BaseException:
        _stop_cluster(ctx, cluster)
        raise
    return Timed(lambda: rt.get([ten_ms.remote(*args) for _ in range(n)], timeout=120),
                 per_call=n, cleanup=lambda: _stop_cluster(ctx, cluster),
                 details={"nodes_used_in_warmup": len({node for node, _ in warm}),
                          "node_ids": cluster_node_ids(cluster, added)})


@_workload("tasks spilled across 3 local nodes", "ops/s",
           "3 one-CPU nodes; 60 tasks of num_cpus=1 sleeping 10 ms each, submitted from the "
           "head; the ideal is 300/s (100/s if nothing spills)", needs_session=False)
def _spilled_tasks(ctx: Context):
    return three_node_tasks(ctx, ())


@_workload("1 GiB object transfer between two nodes", "GB/s",
           "a task on the head returns a 1 GiB array; a task on a second node reads it; "
           "times only the second task", needs_session=False, max_runs=5)
def _object_transfer(ctx: Context):
    rt = ctx.rt
    size = ctx.size(1024 ** 3, 64 * 1024 ** 2)
    store = 2 * size + 256 * 1024 ** 2
    cluster, _ = _start_cluster(
        ctx, {"num_cpus": 1, "resources": {"bench_src": 1}, "object_store_memory": store},
        [{"num_cpus": 1, "resources": {"bench_dst": 1}, "object_store_memory": store}])
    try:
        @rt.remote(num_cpus=0, resources={"bench_src": 0.01})
        def produce(nbytes):
            import numpy as np
            return np.ones(nbytes, dtype=np.uint8)

        @rt.remote(num_cpus=0, resources={"bench_dst": 0.01})
        def consume(array):
            return array.nbytes

        def warmup():
            rt.get(consume.remote(produce.remote(1024)), timeout=120)

        def sample():
            ref = produce.remote(size)
            rt.wait([ref], fetch_local=False, timeout=120)
            start = time.perf_counter()
            got = rt.get(consume.remote(ref), timeout=300)
            elapsed = time.perf_counter() - start
            if got != size:
                raise RuntimeError(f"consumer saw {got} bytes, expected {size}")
            del ref
            return size / 1e9 / elapsed
    except BaseException:
        _stop_cluster(ctx, cluster)
        raise
    return Sampled(sample, warmup=warmup, cleanup=lambda: _stop_cluster(ctx, cluster),
                   details={"bytes": size})


@_workload("node failure recovery time", "s",
           "a running task's node is killed (remove_node, not graceful); seconds until the "
           "retried task's result arrives from a spare node", needs_session=False, max_runs=3)
def _node_failure_recovery(ctx: Context):
    rt = ctx.rt
    # The head has no CPU, so the task can only run on the node we kill.
    cluster, (victim,) = _start_cluster(ctx, {"num_cpus": 0}, [{"num_cpus": 1}])
    workdir = tempfile.mkdtemp(prefix="meshray-bench-recovery-", dir=ctx.workdir)
    stop_file = os.path.join(workdir, "stop")
    driver_node = rt.get_runtime_context().get_node_id()
    if driver_node and driver_node == getattr(victim, "node_id", None):
        _stop_cluster(ctx, cluster)
        shutil.rmtree(workdir, ignore_errors=True)
        raise RuntimeError("the driver attached to a worker node, not the head; killing that "
                           "node would measure the driver's death, not recovery")
    state = {"victim": victim, "round": 0}

    @rt.remote(num_cpus=1, max_retries=3)
    def survivor(marker, stop):
        # First attempt: announce, then stay busy until the node dies under us
        # (or the benchmark ends). A retry sees the marker and returns at once.
        if os.path.exists(marker):
            return "retried"
        open(marker, "w").close()
        deadline = time.monotonic() + 300
        while not os.path.exists(stop) and time.monotonic() < deadline:
            time.sleep(0.05)
        return "first attempt"

    def sample():
        state["round"] += 1
        marker = os.path.join(workdir, f"started-{state['round']}")
        ref = survivor.remote(marker, stop_file)
        deadline = time.monotonic() + 120
        while not os.path.exists(marker):
            if time.monotonic() > deadline:
                raise TimeoutError("the task never started on the node to be killed")
            time.sleep(0.01)
        spare = cluster.add_node(**ctx.node_args(num_cpus=1))
        cluster.wait_for_nodes()
        start = time.perf_counter()
        cluster.remove_node(state["victim"], allow_graceful=False)
        outcome = rt.get(ref, timeout=300)
        elapsed = time.perf_counter() - start
        if outcome != "retried":
            raise RuntimeError(f"task was not retried after its node died: {outcome!r}")
        state["victim"] = spare
        return elapsed

    def cleanup():
        open(stop_file, "w").close()
        try:
            _stop_cluster(ctx, cluster)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    return Sampled(sample, cleanup=cleanup)


# --------------------------------------------------------------------- more rows
# The one list of the modules that add rows to WORKLOADS, in table order. They
# live next to this file and obey its constraints; each imports this module
# for its helpers: relatively inside the meshray package, and by the name
# runner._load_workloads gives this file when it loads it by path next to Ray.
WORKLOAD_MODULES = ("latency_workloads", "cluster_workloads")


def _load_workload_modules() -> None:
    if __package__:
        for name in WORKLOAD_MODULES:
            importlib.import_module(f"{__package__}.{name}")
        return
    here = os.path.dirname(os.path.abspath(__file__))
    for name in WORKLOAD_MODULES:
        spec = importlib.util.spec_from_file_location(f"meshray_bench_{name}",
                                                      os.path.join(here, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)


_load_workload_modules()

ROW_NAMES: list[str] = [w.name for w in WORKLOADS]


def select(patterns) -> list[Workload]:
    """Workloads whose name contains any of the (case-insensitive) substrings."""
    if not patterns:
        return list(WORKLOADS)
    wanted = [p.lower() for p in patterns]
    return [w for w in WORKLOADS if any(p in w.name.lower() for p in wanted)]
