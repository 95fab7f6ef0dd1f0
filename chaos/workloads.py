"""Workloads: client traffic whose every operation can be judged afterwards.

A workload is only useful under faults if its results can be checked
without trusting the system under test, so each one is built around a
ground truth the checkers can recompute or read back:

* ``tasks``   -- fan-out/fan-in of pure functions (squares, then their sum):
  every result is recomputable from the arguments in the history.
* ``actors``  -- counters whose calls each carry a unique id; the actor
  appends the id to a file *before* it replies, so after the run the file
  says exactly which calls ran and how often, across restarts.
* ``objects`` -- a large array made on one node and consumed on another;
  its checksum is known in advance from the seed.
* ``placement-groups`` -- several separate driver processes racing for
  scarce bundle capacity; they record when they held what, and etcd's
  ``alloc/`` history is recorded for the over-commit replay.

Functions that run on workers live at module level here: the nodes a run
starts have the repository on PYTHONPATH, so workers import them by name.
"""
from __future__ import annotations

import importlib

import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from chaos.cluster import PG_RESOURCE, REPO_ROOT, VICTIM_RESOURCE
from chaos.history import History, load_history
from meshray.common.file_tail import read_tail

__all__ = ["RunContext", "Workload", "WORKLOADS", "node_probe", "TasksWorkload", "ActorsWorkload",
           "ObjectsWorkload", "PlacementGroupWorkload", "pg_api", "pg_driver_main"]


@dataclass
class RunContext:
    """Everything a run shares between workloads, nemeses and checkers."""
    cluster: object
    history: History
    seed: int
    work_dir: str                                # files workers write (busy/, actors/)
    options: dict = field(default_factory=dict)  # "workload.key" -> value (from --set)
    ray: object = None
    stop: threading.Event = field(default_factory=threading.Event)
    data: dict = field(default_factory=dict)     # per workload: what its checker needs
    skipped: dict = field(default_factory=dict)  # workload/nemesis name -> reason
    nemeses: list = field(default_factory=list)  # names in this run
    op_timeout: float = 90.0
    probe: object = None                         # the health check's remote function

    def option(self, workload: str, key: str, default):
        raw = self.options.get(f"{workload}.{key}")
        if raw is None:
            return default
        if isinstance(default, bool):
            return str(raw).lower() in ("1", "true", "yes", "on")
        return type(default)(raw) if default is not None else raw

    def rng(self, *salt) -> random.Random:
        """A generator seeded by the run seed and `salt`, so each workload
        thread draws the same sequence in every replay of a seed."""
        return random.Random(f"{self.seed}:" + ":".join(map(str, salt)))

    def victim_resources(self, amount: float) -> dict:
        """Ask for a sliver of the victim-only resource (local clusters), so the
        work lands where the faults are and never on the driver's node."""
        if getattr(self.cluster, "name", "") == "local":
            return {VICTIM_RESOURCE: amount}
        return {}

    @property
    def busy_dir(self) -> str:
        return os.path.join(self.work_dir, "busy")

    @property
    def actor_dir(self) -> str:
        return os.path.join(self.work_dir, "actors")


def _error_kind(exc: BaseException) -> str:
    """'info' when the operation may have taken effect, 'fail' when it did not."""
    from meshray import exceptions
    if isinstance(exc, exceptions.ActorUnavailableError) and not getattr(exc, "delivered", True):
        return "fail"     # never reached the actor: it did not run
    if isinstance(exc, (exceptions.GetTimeoutError, exceptions.ActorUnavailableError,
                        exceptions.WorkerCrashedError, TimeoutError, ConnectionError)):
        return "info"
    return "fail"


def _complete_with_error(handle, exc: BaseException) -> None:
    if _error_kind(exc) == "info":
        handle.info(exc)
    else:
        handle.fail(exc)


class Workload:
    """Base: a named traffic generator with per-thread loops."""
    name = ""
    summary = ""
    option_help: dict = {}

    def unavailable(self, ctx: RunContext) -> str | None:
        return None

    def setup(self, ctx: RunContext) -> None:
        pass

    def loops(self, ctx: RunContext) -> list[tuple[str, object]]:
        """(process name, callable(ctx)) pairs; each runs until ctx.stop is set."""
        return []

    def finish(self, ctx: RunContext) -> None:
        """After the loops ended: final reads and releasing what the workload holds."""


def node_probe() -> str:
    """The health check's task: pinned to one node, it proves the node runs work."""
    import meshray
    return meshray.get_runtime_context().get_node_id()


# ------------------------------------------------------------------ tasks
def square(x: int, delay: float, busy_dir: str) -> int:
    """The fan-out task: slow enough that faults hit it while it runs, and it
    marks its worker busy so kill-worker can aim at a running task."""
    path = os.path.join(busy_dir, str(os.getpid()))
    try:
        open(path, "w").close()
    except OSError:
        path = None
    try:
        time.sleep(delay)
        return x * x
    finally:
        if path:
            try:
                os.unlink(path)
            except OSError:
                pass


def total(*values: int) -> int:
    """The fan-in task: its arguments are the fan-out results (resolved refs)."""
    return sum(values)


class TasksWorkload(Workload):
    name = "tasks"
    summary = "fan-out of squares then a fan-in sum, with retries; every result recomputable"
    option_help = {"width": "tasks per fan-out (8)", "threads": "concurrent clients (2)",
                   "direct_threads": "clients that wait for each task in turn (1): their "
                                     "plain tasks are pushed on worker leases",
                   "max_retries": "task max_retries (5); 0 plants the lost-result bug",
                   "max_delay": "longest task sleep in seconds (0.8)"}

    def setup(self, ctx: RunContext) -> None:
        os.makedirs(ctx.busy_dir, exist_ok=True)
        ray = ctx.ray
        retries = ctx.option(self.name, "max_retries", 5)
        self.retries = retries
        self.square = ray.remote(max_retries=retries, num_cpus=0.5)(square)
        self.total = ray.remote(max_retries=retries, num_cpus=0.5)(total)
        ctx.data[self.name] = {"max_retries": retries}

    def loops(self, ctx: RunContext):
        threads = ctx.option(self.name, "threads", 2)
        direct = ctx.option(self.name, "direct_threads", 1)
        return ([(f"tasks-{i}", self._loop) for i in range(threads)]
                + [(f"tasks-direct-{i}", self._direct_loop) for i in range(direct)])

    def _loop(self, ctx: RunContext, process: str) -> None:
        """Fan-outs submitted at once (SPREAD), then their sum from the refs."""
        ray = ctx.ray

        def run(xs, delays):
            refs = [self.square.options(scheduling_strategy="SPREAD").remote(
                x, d, ctx.busy_dir) for x, d in zip(xs, delays)]
            total_ref = self.total.remote(*refs)
            values = ray.get(refs, timeout=ctx.op_timeout)
            return values, ray.get(total_ref, timeout=ctx.op_timeout)

        self._fan_outs(ctx, process, run, direct=False)

    def _direct_loop(self, ctx: RunContext, process: str) -> None:
        """Fan-outs whose tasks are waited for one at a time, with the default
        strategy and ready arguments: what a process pushes on a worker lease
        (core/task_leases.py), so faults meet pushed tasks too."""
        ray = ctx.ray

        def run(xs, delays):
            values = [ray.get(self.square.remote(x, d / 4, ctx.busy_dir), timeout=ctx.op_timeout)
                      for x, d in zip(xs, delays)]
            return values, ray.get(self.total.remote(*values), timeout=ctx.op_timeout)

        self._fan_outs(ctx, process, run, direct=True)

    def _fan_outs(self, ctx: RunContext, process: str, run, *, direct: bool) -> None:
        rng = ctx.rng(self.name, process)
        width = ctx.option(self.name, "width", 8)
        max_delay = ctx.option(self.name, "max_delay", 0.8)
        while not ctx.stop.is_set():
            xs = [rng.randrange(1, 10_000) for _ in range(width)]
            delays = [round(rng.uniform(0.05, max_delay), 3) for _ in range(width)]
            handle = ctx.history.invoke(process, "fan-out", {
                "xs": xs, "max_retries": self.retries, **({"direct": True} if direct else {})})
            try:
                values, total_value = run(xs, delays)
                handle.ok({"values": values, "total": total_value})
            except Exception as exc:  # noqa: BLE001 - every outcome goes in the history
                _complete_with_error(handle, exc)


# ------------------------------------------------------------------ actors
class Counter:
    """An actor that writes down each call it applies, before answering.

    The log is append-only and lives outside the actor process, so it
    survives the actor's death: a call that ran and then lost its reply
    shows up in the log, which is how duplicates and losses are counted.
    """

    def __init__(self, log_path: str, pid_path: str):
        self._log = open(log_path, "a", buffering=1)
        with open(pid_path + ".tmp", "w") as handle:
            handle.write(str(os.getpid()))
        os.replace(pid_path + ".tmp", pid_path)
        self.n = 0

    def incr(self, op_id: str, work: float = 0.0) -> int:
        if work:
            time.sleep(work)        # keeps calls in flight, where faults can catch them
        self._log.write(op_id + "\n")
        self._log.flush()
        self.n += 1
        return self.n

    def pid(self) -> int:
        return os.getpid()


# The two promises Ray documents for actor calls, by max_task_retries.
COUNTERS = {
    "alo": {"claim": "at-least-once", "max_task_retries": -1},
    "amo": {"claim": "at-most-once", "max_task_retries": 0},
}


class ActorsWorkload(Workload):
    name = "actors"
    summary = "two counters (max_task_retries=-1 and 0) whose every call id is logged by the actor"
    option_help = {"window": "calls in flight per counter (4)",
                   "pause": "seconds between windows (0.05), so a counter does not eat the CPUs",
                   "work": "seconds each call takes inside the actor (0.01)",
                   "alo_max_task_retries": "retries of the at-least-once counter (-1); 0 plants "
                                           "the bug 'claims at-least-once but does not retry'",
                   "amo_max_task_retries": "retries of the at-most-once counter (0)",
                   "slot": "start the counters on this node slot (-1: any victim; soft, so "
                           "restarts may move them)",
                   "allow_proxy": "run even in the proxy network mode (0); see docs/chaos.md"}

    def unavailable(self, ctx: RunContext) -> str | None:
        if getattr(ctx.cluster, "mode", "") == "proxy" and not ctx.option(
                self.name, "allow_proxy", False):
            return ("the proxy network mode mirrors actor ports by polling, and a call that "
                    "races an actor's (re)start finds no listener; meshray then stalls that "
                    "caller 60 s (a known bug), so use --netns for actors under partitions "
                    "(or --set actors.allow_proxy=1)")
        return None

    def setup(self, ctx: RunContext) -> None:
        os.makedirs(ctx.actor_dir, exist_ok=True)
        ray = ctx.ray
        self.handles = {}
        ctx.data[self.name] = {}
        for name, spec in COUNTERS.items():
            retries = ctx.option(self.name, f"{name}_max_task_retries", spec["max_task_retries"])
            log_path = os.path.join(ctx.actor_dir, f"{name}.log")
            pid_path = os.path.join(ctx.actor_dir, f"{name}.pid")
            actor = ray.remote(max_restarts=-1, max_task_retries=retries, num_cpus=0,
                               resources=ctx.victim_resources(1))(Counter)
            options = {"name": f"chaos-{name}"}
            slot = ctx.option(self.name, "slot", -1)
            if slot >= 0:
                from meshray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                    ctx.cluster.nodes[slot].node_id, soft=True)
            self.handles[name] = actor.options(**options).remote(log_path, pid_path)
            ctx.data[self.name][name] = {"claim": spec["claim"], "max_task_retries": retries,
                                         "log": log_path, "pid_file": pid_path}
        for name, handle in self.handles.items():      # both placed before faults start
            ray.get(handle.pid.remote(), timeout=60)

    def loops(self, ctx: RunContext):
        return [(f"{name}-0", self._loop) for name in self.handles]

    def _loop(self, ctx: RunContext, process: str) -> None:
        ray = ctx.ray
        name = process.split("-")[0]
        handle = self.handles[name]
        window = ctx.option(self.name, "window", 4)
        pause = ctx.option(self.name, "pause", 0.05)
        work = ctx.option(self.name, "work", 0.01)
        seq = 0
        while not ctx.stop.wait(pause):
            pending = []
            for _ in range(window):
                seq += 1
                op_id = f"{name}-{seq}"
                op = ctx.history.invoke(process, "incr", {"id": op_id}, op_id=op_id)
                try:
                    pending.append((op, handle.incr.remote(op_id, work)))
                except Exception as exc:  # noqa: BLE001
                    _complete_with_error(op, exc)
            for op, ref in pending:
                try:
                    op.ok(ray.get(ref, timeout=ctx.op_timeout))
                except Exception as exc:  # noqa: BLE001
                    _complete_with_error(op, exc)

    def finish(self, ctx: RunContext) -> None:
        for name, info in ctx.data[self.name].items():
            try:
                with open(info["log"]) as handle:
                    info["applied"] = [line.strip() for line in handle if line.strip()]
            except OSError:
                info["applied"] = []
        for handle in self.handles.values():       # release their resources
            try:
                ctx.ray.kill(handle)
            except Exception:  # noqa: BLE001 - already dead is fine
                pass

    @staticmethod
    def log_path(ctx: RunContext, name: str) -> str | None:
        """Where counter `name` writes each call it applies."""
        return ctx.data.get("actors", {}).get(name, {}).get("log")

    @staticmethod
    def actor_pids(ctx: RunContext) -> dict[str, int]:
        """Live pids of the counters, as they wrote them on (re)start."""
        out = {}
        for name, info in sorted(ctx.data.get("actors", {}).items()):
            try:
                with open(info["pid_file"]) as handle:
                    out[name] = int(handle.read().strip())
            except (OSError, ValueError):
                continue
        return out


# ------------------------------------------------------------------ objects
def make_array(seed: int, n: int):
    """The object a producer makes; the driver can make the same one to compare."""
    import numpy as np
    return (np.arange(n, dtype=np.int64) * 7 + seed) % 1_000_003


def produce(seed: int, n: int):
    import meshray
    return make_array(seed, n), meshray.get_runtime_context().get_node_id()


def consume(array) -> tuple[int, str]:
    import meshray
    return int(array.sum()), meshray.get_runtime_context().get_node_id()


class ObjectsWorkload(Workload):
    name = "objects"
    summary = "large arrays made on one node, summed on another (transfer + lineage rebuild)"
    option_help = {"size_mb": "array size in MB (8)", "max_retries": "task max_retries (5)"}

    def setup(self, ctx: RunContext) -> None:
        ray = ctx.ray
        retries = ctx.option(self.name, "max_retries", 5)
        self.retries = retries
        self.produce = ray.remote(max_retries=retries, num_returns=2, num_cpus=0.5,
                                  resources=ctx.victim_resources(0.01))(produce)
        self.consume = ray.remote(max_retries=retries, num_cpus=0.5)(consume)
        ctx.data[self.name] = {"max_retries": retries}

    def loops(self, ctx: RunContext):
        return [("objects-0", self._loop)]

    def _loop(self, ctx: RunContext, process: str) -> None:
        from meshray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        ray = ctx.ray
        rng = ctx.rng(self.name, process)
        n = int(ctx.option(self.name, "size_mb", 8.0) * 1024 * 1024 // 8)
        while not ctx.stop.is_set():
            seed = rng.randrange(1, 1_000_000)
            pick = rng.random()
            expected = int(make_array(seed, n).sum())
            handle = ctx.history.invoke(process, "transfer", {
                "seed": seed, "n": n, "expected": expected, "max_retries": self.retries})
            try:
                array_ref, where_ref = self.produce.options(scheduling_strategy="SPREAD").remote(
                    seed, n)
                producer = ray.get(where_ref, timeout=ctx.op_timeout)
                others = sorted(node["NodeID"] for node in ray.nodes()
                                if node["Alive"] and node["NodeID"] != producer)
                strategy = (NodeAffinitySchedulingStrategy(others[int(pick * len(others))],
                                                           soft=True) if others else "DEFAULT")
                checksum, consumer = ray.get(self.consume.options(
                    scheduling_strategy=strategy).remote(array_ref), timeout=ctx.op_timeout)
                handle.ok({"checksum": checksum, "producer": producer, "consumer": consumer})
            except Exception as exc:  # noqa: BLE001
                _complete_with_error(handle, exc)


# ------------------------------------------------------------------ placement groups
def pg_driver_command(address: str, *, seed: int, index: int, out: str, stop_file: str,
                      wait: float) -> list[str]:
    """The command line of one placement-group driver. The cluster token is
    not on it: it would show in `ps`, and a token may begin with "-", which
    the driver's argument parser would take for an option. The driver reads
    it from the pipe `_start_with_token` hands it."""
    return [sys.executable, "-m", "chaos", "_pg-driver", "--address", address,
            "--seed", str(seed), "--index", str(index), "--out", out, "--stop-file", stop_file,
            "--wait", str(wait)]


def _start_with_token(args: list, env: dict, token: str | None, **popen) -> subprocess.Popen:
    """Start `args` with the cluster token on a pipe (MESHRAY_TOKEN_FD), as a node hands
    its token to its workers."""
    from meshray import security
    env = {k: v for k, v in env.items() if k not in ("MESHRAY_TOKEN", "MESHRAY_TOKEN_FILE")}
    if not token:
        return subprocess.Popen(args, env=env, cwd=REPO_ROOT, **popen)
    fd = security.token_pipe(token)
    try:
        env[security.TOKEN_FD_ENV] = str(fd)
        return subprocess.Popen(args, env=env, cwd=REPO_ROOT, pass_fds=(fd,), **popen)
    finally:
        os.close(fd)


def pg_api():
    """Ray's placement-group API from meshray, or None while it does not exist."""
    try:
        module = importlib.import_module("meshray.util.placement_group")
        return module if hasattr(module, "placement_group") else None
    except ImportError:
        return None


class PlacementGroupWorkload(Workload):
    name = "placement-groups"
    summary = "several driver processes race to reserve scarce bundles, hold, release"
    option_help = {"drivers": "racing driver processes (3)", "wait": "pg.wait timeout s (3)"}

    def unavailable(self, ctx: RunContext) -> str | None:
        if pg_api() is None:
            return ("meshray.util.placement_group is not available in this build "
                    "(placement groups are not implemented yet)")
        if getattr(ctx.cluster, "name", "") != "local":
            return "needs a local cluster (scarce capacity is a resource the runner gives nodes)"
        return None

    def setup(self, ctx: RunContext) -> None:
        from meshray.placement.audit import AllocRecorder
        self.recorder = AllocRecorder(ctx.cluster.coordinator()).start()
        ctx.data[self.name] = {"capacity_per_node": ctx.cluster.pg_capacity,
                               "resource": PG_RESOURCE, "recorder": self.recorder}
        self.procs = []
        self.outputs = []

    def loops(self, ctx: RunContext):
        return [("pg-drivers", self._run_drivers)]

    def _run_drivers(self, ctx: RunContext, process: str) -> None:
        drivers = ctx.option(self.name, "drivers", 3)
        env = dict(os.environ, PYTHONFAULTHANDLER="1")
        env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [
            p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        for i in range(drivers):
            out = os.path.join(ctx.work_dir, f"pg-driver-{i}.jsonl")
            self.outputs.append(out)
            args = pg_driver_command(ctx.cluster.address, seed=ctx.seed, index=i, out=out,
                                     stop_file=os.path.join(ctx.work_dir, "pg-stop"),
                                     wait=ctx.option(self.name, "wait", 3.0))
            self.procs.append(_start_with_token(args, env, ctx.cluster.token, stdout=subprocess.DEVNULL,
                                                stderr=open(out + ".stderr", "w")))
        ctx.stop.wait()
        open(os.path.join(ctx.work_dir, "pg-stop"), "w").close()
        for proc in self.procs:
            try:
                proc.wait(ctx.op_timeout)
            except subprocess.TimeoutExpired:
                # Stuck past the run: its fault handler writes every thread's
                # stack to its stderr file (kept in the run's data) first.
                proc.send_signal(signal.SIGABRT)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def finish(self, ctx: RunContext) -> None:
        self.recorder.stop()
        for out in self.outputs:
            if os.path.exists(out):
                ctx.history.extend(load_history(out).ops())
        ctx.data[self.name]["driver_exit_codes"] = [p.returncode for p in self.procs]
        ctx.data[self.name]["driver_stderr"] = [read_tail(out + ".stderr", 4000)
                                                for out in self.outputs]


def run_over(stop_file: str, parent: int) -> bool:
    """Whether a racing driver's run is over: its stop file exists, or the
    run that started it is gone (its work dir removed, or its parent process
    exited -- an interrupted run never writes the stop file)."""
    return (os.path.exists(stop_file) or not os.path.isdir(os.path.dirname(stop_file))
            or os.getppid() != parent)


def pg_driver_main(args) -> int:
    """One racing driver (a separate process: one meshray driver per process)."""
    module = pg_api()
    if module is None:
        print("meshray.util.placement_group is not available", file=sys.stderr)
        return 2
    import meshray
    from meshray import security
    token = security.process_token()      # handed over on a pipe (_start_with_token)
    parent = os.getppid()
    history = History(args.out)
    process = f"pg-driver-{args.index}"
    # A driver may start while a fault is on (the etcd leader killed, a node
    # paused): joining is retried until the run ends, each failure recorded,
    # as a real driver's supervisor would restart it.
    while True:
        join = history.invoke(process, "join", {"address": args.address})
        try:
            meshray.init(address=args.address, _token=token, log_to_driver=False)
        except Exception as exc:  # noqa: BLE001 - recorded, then tried again
            join.fail(exc)
            if run_over(args.stop_file, parent):
                history.close()
                return 1
            time.sleep(0.5)
            continue
        join.ok()
        break
    rng = random.Random(f"{args.seed}:pg:{args.index}")
    table = getattr(module, "placement_group_table", None)
    try:
        while not run_over(args.stop_file, parent):
            count = rng.choice([1, 2])
            strategy = rng.choice(["PACK", "SPREAD"])
            bundles = [{PG_RESOURCE: 1.0} for _ in range(count)]
            create = history.invoke(process, "create", {"bundles": bundles, "strategy": strategy})
            try:
                pg = module.placement_group(bundles, strategy=strategy)
            except Exception as exc:  # noqa: BLE001
                create.fail(exc)
                time.sleep(0.2)
                continue
            pg_id = getattr(getattr(pg, "id", None), "hex", lambda: str(pg))()
            try:
                ready = pg.wait(timeout_seconds=args.wait)
            except Exception as exc:  # noqa: BLE001
                create.info(exc, value={"pg": pg_id})
                ready = False
            else:
                if ready:
                    placement = None
                    if table is not None:
                        try:
                            placement = table(pg).get("bundles_to_node_id")
                        except Exception:  # noqa: BLE001 - diagnostics only
                            placement = None
                    create.ok({"pg": pg_id, "bundles": bundles, "placement": placement})
                    time.sleep(rng.uniform(0.2, 1.5))
                else:
                    create.fail("not ready in time", value={"pg": pg_id})
            remove = history.invoke(process, "remove", {"pg": pg_id})
            try:
                module.remove_placement_group(pg)
                remove.ok()
            except Exception as exc:  # noqa: BLE001
                remove.info(exc)
    finally:
        history.close()
        meshray.shutdown()
    return 0


WORKLOADS = {w.name: w for w in (TasksWorkload, ActorsWorkload, ObjectsWorkload,
                                 PlacementGroupWorkload)}

