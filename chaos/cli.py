"""`python -m chaos`: run workloads against a cluster while nemeses attack it.

    python -m chaos list
    python -m chaos run --workload tasks,actors --nemesis kill-node,pause-node \\
        --nodes 4 --duration 120 --seed 7 [--netns] [--report out.json]
    python -m chaos run --address 127.0.0.1:2379 --workload tasks --nemesis kill-worker
    python -m chaos fuzz-wire --seed 7 --duration 60     (see chaos/fuzz_wire.py)

A run: print the fault schedule (drawn from the seed alone), start the
cluster, start the workloads, inject the faults one at a time (health check
before and after each), stop the workloads, let the cluster settle, shut it
down, then hand the history and the observations to the checkers. The exit
status is 0 when no checker found a violation, 1 when one did,
2 when the run itself could not be carried out.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

__all__ = ["RunConfig", "RunResult", "run_chaos", "main", "health_check"]

NETWORK_MODES = ("auto", "loopback", "proxy", "netns")


@dataclass
class RunConfig:
    workloads: list[str]
    nemeses: list[str]
    nodes: int = 4
    duration: float = 60.0
    seed: int = 0
    netns: bool = False
    network: str = "auto"
    address: str | None = None
    token: str | None = None
    etcd_members: int | None = None        # default: 3 when kill-etcd-leader runs, else 1
    lease_ttl: float = 2.0
    interval: float = 8.0
    warmup: float = 3.0
    op_timeout: float = 90.0
    settle_deadline: float = 30.0
    recovery_bound: float = 90.0
    options: dict = field(default_factory=dict)
    report: str | None = None
    history: str | None = None
    keep_dir: bool = False
    quiet: bool = False


@dataclass
class RunResult:
    """What the checkers read, and what the report is made of."""
    config: RunConfig
    history: object
    data: dict
    skipped: dict
    nemeses: list
    victim_slots: list
    schedule: list
    faults: list = field(default_factory=list)
    observations: dict = field(default_factory=dict)
    verdicts: list = field(default_factory=list)
    cluster: dict = field(default_factory=dict)
    harness_errors: list = field(default_factory=list)   # what kept the run from testing
    started_at: float = 0.0
    ended_at: float = 0.0

    @property
    def recovery_bound(self) -> float:
        return self.config.recovery_bound

    @property
    def ok(self) -> bool:
        return not self.harness_errors and not any(v.status == "fail" for v in self.verdicts)


def _say(config: RunConfig, text: str) -> None:
    if not config.quiet:
        print(text, flush=True)


# ------------------------------------------------------------------ health
def health_check(ctx, timeout: float, probe_timeout: float = 10.0) -> dict:
    """Wait until the cluster is whole: etcd answers, exactly the expected
    nodes are registered, and a probe task runs on each of them."""
    from meshray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from chaos.workloads import node_probe
    ray = ctx.ray
    if ctx.probe is None:             # one remote function per run
        ctx.probe = ray.remote(num_cpus=0, max_retries=0)(node_probe)
    probe = ctx.probe
    start = time.monotonic()
    deadline = start + timeout
    detail = ""
    while True:
        ok, detail = ctx.cluster.etcd_health()
        if ok:
            expected = ctx.cluster.expected_node_ids()
            try:
                registered = set(ctx.cluster.registered())
            except Exception as exc:  # noqa: BLE001
                registered, detail = set(), f"cannot list nodes: {exc}"
            missing = expected - registered
            if missing:
                ok, detail = False, f"not registered: {sorted(n[:8] for n in missing)}"
            else:
                refs = {node: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                    node, soft=False)).remote() for node in sorted(expected)}
                bad = []
                for node, ref in refs.items():
                    try:
                        if ray.get(ref, timeout=max(0.5, min(probe_timeout,
                                                             deadline - time.monotonic()))) != node:
                            bad.append(f"{node[:8]}: probe ran elsewhere")
                    except Exception as exc:  # noqa: BLE001
                        bad.append(f"{node[:8]}: {type(exc).__name__}")
                ok, detail = (not bad), ("; ".join(bad) or "all nodes answer")
        if ok or time.monotonic() >= deadline:
            return {"ok": ok, "elapsed_s": round(time.monotonic() - start, 3), "detail": detail}
        time.sleep(0.25)


# ------------------------------------------------------------------ nemesis thread
class NemesisRunner(threading.Thread):
    """Executes the schedule: one fault at a time, health-checked around it."""

    def __init__(self, ctx, schedule, config: RunConfig, faults: list, t0: float):
        super().__init__(name="chaos-nemesis", daemon=True)
        self.ctx, self.schedule, self.config, self.faults, self.t0 = ctx, schedule, config, faults, t0
        self.error: BaseException | None = None
        self.end = t0 + config.duration

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - reported by the runner
            self.error = exc

    def _run(self) -> None:
        from chaos.nemeses import NEMESES
        ctx = self.ctx
        for index, fault in enumerate(self.schedule):
            nemesis = NEMESES[fault.nemesis]
            label = f"#{index + 1} {fault.nemesis}" + (
                f" slot {fault.target}" if nemesis.targets_slot else "")
            record = {"index": index + 1, "label": label, **fault.to_json()}
            self.faults.append(record)
            if fault.nemesis in ctx.skipped:
                record["skipped"] = ctx.skipped[fault.nemesis]
                continue
            wait = self.t0 + fault.at - time.monotonic()
            if ctx.stop.wait(max(0.0, wait)):
                record["skipped"] = "run ended first"
                continue
            record["health_before"] = health_check(ctx, timeout=20.0)
            if not record["health_before"]["ok"]:
                record["skipped"] = f"cluster unhealthy before the fault: " \
                                    f"{record['health_before']['detail']}"
                _say(self.config, f"[{self._t()}] skip {label}: {record['skipped']}")
                continue
            op = ctx.history.invoke("nemesis", fault.nemesis,
                                    {"target": fault.target, **fault.params})
            record["inject_time"] = time.monotonic()
            try:
                injected = nemesis.inject(ctx, fault)
            except Exception as exc:  # noqa: BLE001
                op.fail(exc)
                record["error"] = f"inject failed: {type(exc).__name__}: {exc}"
                record.pop("inject_time")
                _say(self.config, f"[{self._t()}] {label}: {record['error']}")
                continue
            if "skipped" in injected:
                op.fail(injected["skipped"])
                record["skipped"] = injected["skipped"]
                record.pop("inject_time")
                _say(self.config, f"[{self._t()}] skip {label}: {injected['skipped']}")
                continue
            op.info("injected", value=injected)
            record["injected"] = injected
            _say(self.config, f"[{self._t()}] inject {label}: {injected}")
            time.sleep(fault.hold)        # a fault is healed even after the run's end
            heal = ctx.history.invoke("nemesis", f"heal-{fault.nemesis}", {"target": fault.target})
            record["heal_time"] = time.monotonic()
            try:
                healed = nemesis.heal(ctx, fault, injected)
                heal.ok(healed)
                record["healed"] = healed
            except Exception as exc:  # noqa: BLE001
                heal.fail(exc)
                record["error"] = f"heal failed: {type(exc).__name__}: {exc}"
            record["health_after"] = health_check(ctx, timeout=self.config.recovery_bound)
            _say(self.config, f"[{self._t()}] healed {label}: healthy="
                              f"{record['health_after']['ok']} after "
                              f"{record['health_after']['elapsed_s']}s")

    def _t(self) -> str:
        return f"{time.monotonic() - self.t0:6.1f}s"


# ------------------------------------------------------------------ the run
def _network_mode(config: RunConfig) -> str:
    if config.netns:
        return "netns"
    if config.network != "auto":
        return config.network
    return "proxy" if "partition-node" in config.nemeses else "loopback"


def _pushed_on_leases() -> int | None:
    """How many tasks this process pushed straight to leased workers (None: no session)."""
    from meshray.core import state as state_mod
    core = state_mod.state.core
    return core.leases.pushed if core is not None else None


def _settle_resources(cluster, deadline_s: float) -> dict:
    """Poll until every live node has all its resources back, or give up."""
    start = time.monotonic()
    view = {}
    while True:
        try:
            view = cluster.availability()
        except Exception:  # noqa: BLE001 - etcd may still be electing
            view = {}
        settled = cluster.expected_node_ids() <= set(view) and all(
            v["available"] is not None and all(
                abs(v["available"].get(k, 0.0) - amount) <= 1e-6
                for k, amount in v["total"].items()) for v in view.values())
        if settled or time.monotonic() - start > deadline_s:
            break
        time.sleep(0.25)
    slots = {n.node_id: n.slot for n in cluster.nodes.values()}
    for node, v in view.items():
        v["slot"] = slots.get(node)
    return {"settled": settled, "waited_s": round(time.monotonic() - start, 2),
            "deadline_s": deadline_s, "nodes": view,
            "missing": sorted(cluster.expected_node_ids() - set(view))}


def _orphans(cluster, grace_s: float = 5.0) -> dict:
    """What outlived a local cluster's shutdown (then removed, so a run never
    leaves garbage behind -- the verdict keeps the evidence)."""
    import psutil
    seen = dict(cluster.seen_pids)
    for pid in cluster.etcd_pids():
        seen.setdefault(pid, {"kind": "etcd", "slot": None, "create_time": None})

    def alive(pid, info):
        try:
            proc = psutil.Process(pid)
            if info.get("create_time") and abs(proc.create_time() - info["create_time"]) > 1e-3:
                return False          # pid reused by a process that is not ours
            return proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    deadline = time.monotonic() + grace_s
    left = [pid for pid, info in seen.items() if alive(pid, info)]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [pid for pid in left if alive(pid, seen[pid])]
    processes = [{"pid": pid, **{k: seen[pid].get(k) for k in ("kind", "slot")}} for pid in left]
    for pid in left:                               # ours by pid and start time: end them
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    from chaos.cluster import shm_dir_of
    killed = {n.node_id for n in cluster.retired + list(cluster.nodes.values())
              if n.state == "killed"}
    shm_graceful, shm_killed = [], []
    for node_id in cluster.all_node_ids():
        path = shm_dir_of(node_id)
        if os.path.exists(path):
            (shm_killed if node_id in killed else shm_graceful).append(path)
            shutil.rmtree(path, ignore_errors=True)
    return {"processes_seen": len(seen), "processes": processes,
            "shm_graceful": shm_graceful, "shm_killed": shm_killed, "cleaned_up": True}


def run_chaos(config: RunConfig) -> RunResult:
    """Carry out one run and judge it. Raises only when the run could not start."""
    import cloudpickle

    from chaos import workloads as wl
    from chaos.checkers import run_checkers
    from chaos.cluster import ExternalCluster, LocalCluster, describe
    from chaos.history import History
    from chaos.nemeses import NEMESES, format_schedule, make_schedule

    unknown_w = [w for w in config.workloads if w not in wl.WORKLOADS]
    unknown_n = [n for n in config.nemeses if n not in NEMESES]
    if unknown_w or unknown_n:
        raise ValueError(f"unknown workload(s) {unknown_w} / nemesis(es) {unknown_n}; "
                         "see `python -m chaos list`")
    if config.duration <= config.warmup:
        raise ValueError(f"--duration must exceed the {config.warmup}s warm-up")
    etcd_members = config.etcd_members or (3 if "kill-etcd-leader" in config.nemeses else 1)
    victim_slots = list(range(1, config.nodes))
    if config.address:
        cluster = ExternalCluster(config.address, token=config.token)
        victim_slots = [s for s in sorted(cluster.nodes) if s != 0]
        cloudpickle.register_pickle_by_value(wl)   # workers there cannot import chaos
    schedule = make_schedule(config.nemeses, duration=config.duration, seed=config.seed,
                             victim_slots=victim_slots, lease_ttl=config.lease_ttl,
                             interval=config.interval, warmup=config.warmup)
    _say(config, f"chaos run: seed={config.seed} duration={config.duration}s "
                 f"workloads={','.join(config.workloads)} nemeses={','.join(config.nemeses)}")
    _say(config, "fault schedule (replays with the same --seed, --duration, --nodes, --interval):")
    _say(config, format_schedule(schedule))

    if not config.address:
        cluster = LocalCluster(
            config.nodes, mode=_network_mode(config), etcd_members=etcd_members,
            lease_ttl=config.lease_ttl, seed=config.seed,
            failpoints=any(n.startswith("rpc-") for n in config.nemeses)).start()
    work_dir = os.path.join(getattr(cluster, "base_dir", "") or tempfile.mkdtemp(prefix="chaos-"),
                            "work")
    os.makedirs(work_dir, exist_ok=True)
    history_path = config.history or (config.report + ".history.jsonl" if config.report else
                                      os.path.join(work_dir, "history.jsonl"))
    if os.path.exists(history_path):
        os.unlink(history_path)
    history = History(history_path)
    ctx = wl.RunContext(cluster=cluster, history=history, seed=config.seed, work_dir=work_dir,
                        options=dict(config.options), nemeses=list(config.nemeses),
                        op_timeout=config.op_timeout)
    result = RunResult(config, history, ctx.data, ctx.skipped, list(config.nemeses),
                       victim_slots, [f.to_json() for f in schedule], cluster=describe(cluster))
    _say(config, f"cluster: {result.cluster['mode']}, {len(cluster.nodes)} nodes, etcd "
                 f"{cluster.address}")
    try:
        ctx.ray = cluster.connect()
        for name in config.nemeses:
            reason = NEMESES[name].unavailable(cluster)
            if reason:
                ctx.skipped[name] = reason
                _say(config, f"skip nemesis {name}: {reason}")
        active = []
        for name in config.workloads:
            workload = wl.WORKLOADS[name]()
            reason = workload.unavailable(ctx)
            if reason:
                ctx.skipped[name] = reason
                _say(config, f"skip workload {name}: {reason}")
                continue
            workload.setup(ctx)
            active.append(workload)
        result.started_at = t0 = time.monotonic()
        history.start = t0
        threads = []
        for workload in active:
            for process, loop in workload.loops(ctx):
                thread = threading.Thread(target=_guard, args=(loop, ctx, process),
                                          name=f"chaos-{process}", daemon=True)
                thread.start()
                threads.append(thread)
        nemesis = NemesisRunner(ctx, schedule, config, result.faults, t0)
        nemesis.start()
        ctx.stop.wait(config.duration)
        ctx.stop.set()
        _say(config, f"[{time.monotonic() - t0:6.1f}s] stopping workloads")
        for thread in threads:
            thread.join(config.op_timeout + 30)
        nemesis.join(config.recovery_bound + 60)
        if nemesis.error is not None:
            raise RuntimeError(f"nemesis runner failed: {nemesis.error!r}") from nemesis.error
        for workload in active:
            workload.finish(ctx)
        result.ended_at = time.monotonic()
        pushed = _pushed_on_leases()
        if pushed is not None:
            # (The tasks-direct loop's tasks go on worker leases: say that they did.)
            result.observations["tasks_pushed_on_leases"] = pushed
            _say(config, f"tasks pushed on worker leases by this driver: {pushed}")
        result.observations["resources"] = _settle_resources(cluster, config.settle_deadline)
    finally:
        try:
            cluster.disconnect()
        finally:
            history.close()           # the file; the ops stay in memory for the checkers
            if isinstance(cluster, LocalCluster):
                cluster.close(keep_dir=True)
                try:
                    result.observations["orphans"] = _orphans(cluster)
                finally:
                    if not config.keep_dir:
                        shutil.rmtree(cluster.base_dir, ignore_errors=True)
            else:
                cluster.close()
    result.harness_errors += [f"workload {op.process} crashed: {op.error}"
                              for op in history.ops() if op.f == "crash" and op.type == "fail"]
    result.harness_errors += [f"{f['label']}: {f['error']}" for f in result.faults
                              if f.get("error")]
    result.verdicts = run_checkers(result)
    report = build_report(result, history_path)
    if config.report:
        with open(config.report, "w") as handle:
            json.dump(report, handle, indent=2, default=str)
    _say(config, format_summary(result))
    if config.report:
        _say(config, f"report: {config.report}  history: {history_path}")
    return result


def _guard(loop, ctx, process: str) -> None:
    """A workload loop that crashes ends its own thread, not the run; the
    crash is recorded as an operation so the checkers see it."""
    try:
        loop(ctx, process)
    except BaseException as exc:  # noqa: BLE001
        op = ctx.history.invoke(process, "crash")
        op.fail(exc)


# ------------------------------------------------------------------ reporting
def _workload_stats(result: RunResult) -> dict:
    from chaos.checkers import group_of
    stats = collections.defaultdict(collections.Counter)
    for invoke, done in result.history.pairs():
        if invoke.process == "nemesis":
            continue
        group = group_of(invoke.process)
        stats[group]["ops"] += 1
        stats[group][done.type if done else "pending"] += 1
    return {k: dict(v) for k, v in sorted(stats.items())}


def build_report(result: RunResult, history_path: str) -> dict:
    injected = [f for f in result.faults if "inject_time" in f]
    return {
        "ok": result.ok,
        "config": {k: v for k, v in vars(result.config).items() if k != "token"},
        "cluster": result.cluster,
        "schedule": result.schedule,
        "faults": [{k: (result.history.relative(v) if k.endswith("_time") else v)
                    for k, v in f.items()} for f in result.faults],
        "faults_injected": len(injected),
        "faults_by_nemesis": dict(collections.Counter(f["nemesis"] for f in injected)),
        "skipped": result.skipped,
        "workloads": _workload_stats(result),
        "observations": {k: v for k, v in result.observations.items()},
        "verdicts": [v.to_json() for v in result.verdicts],
        "harness_errors": result.harness_errors,
        "history": history_path,
        "run_seconds": round(result.ended_at - result.started_at, 2) if result.ended_at else None,
    }


def format_summary(result: RunResult) -> str:
    lines = ["", "== workloads =="]
    lines.append(f"  {'workload':<16}{'ops':>7}{'ok':>7}{'fail':>7}{'info':>7}{'pending':>9}")
    for name, s in _workload_stats(result).items():
        lines.append(f"  {name:<16}{s.get('ops', 0):>7}{s.get('ok', 0):>7}{s.get('fail', 0):>7}"
                     f"{s.get('info', 0):>7}{s.get('pending', 0):>9}")
    lines.append("== faults ==")
    lines.append(f"  {'fault':<28}{'at':>8}{'healed':>8}{'healthy+':>10}{'recovery':>10}"
                 f"{'stall':>9}")
    for f in result.faults:
        if "inject_time" not in f:
            lines.append(f"  {f['label']:<28}  skipped: {f.get('skipped') or f.get('error')}")
            continue
        healthy = f.get("health_after", {})
        recovery = f.get("recovery_s")
        lines.append(
            f"  {f['label']:<28}{result.history.relative(f['inject_time']):>7.1f}s"
            f"{result.history.relative(f.get('heal_time', f['inject_time'])):>7.1f}s"
            f"{(str(healthy.get('elapsed_s')) + 's') if healthy else '-':>10}"
            f"{(f'{recovery:.2f}s' if recovery is not None else 'never'):>10}"
            f"{f.get('stalled_s', 0):>8.2f}s"
            + (f" {f['stalled_by']}" if f.get("stalled_by") else "")
            + ("" if healthy.get("ok", True) else "  NOT HEALTHY"))
    lines.append("  (recovery: fault -> every workload has completed an op invoked after it; "
                 "stall: longest wait of an op in flight at the fault, and its workload)")
    lines.append("== checkers ==")
    for v in result.verdicts:
        lines.append(f"  {v.checker:<22}{v.status.upper():<14}{v.summary}")
        for text in v.violations[:10]:
            text = " ".join(str(text).split())
            lines.append(f"      ! {text[:300]}{'...' if len(text) > 300 else ''}")
        if len(v.violations) > 10:
            lines.append(f"      ! ... {len(v.violations) - 10} more")
    for error in result.harness_errors:
        lines.append(f"  HARNESS ERROR: {error}")
    lines.append("RESULT: " + ("PASS" if result.ok else "FAIL"))
    return "\n".join(lines)


# ------------------------------------------------------------------ argv
def _split(text: str) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _parser(prog: str = "python -m chaos") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="show nemeses, workloads and checkers")
    run = sub.add_parser("run", help="run workloads under a fault schedule and check the result")
    run.add_argument("--workload", "--workloads", dest="workloads", default="tasks,actors",
                     help="comma-separated workloads (default: tasks,actors)")
    run.add_argument("--nemesis", "--nemeses", dest="nemeses", default="kill-node",
                     help="comma-separated nemeses (default: kill-node); '' for none")
    run.add_argument("--nodes", type=int, default=4, help="node daemons (slot 0 hosts the driver)")
    run.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    run.add_argument("--seed", type=int, default=0, help="seeds the schedule and the workloads")
    run.add_argument("--interval", type=float, default=8.0, help="seconds between faults")
    run.add_argument("--netns", action="store_true",
                     help="one network namespace per node (root): real partitions")
    run.add_argument("--network", choices=NETWORK_MODES, default="auto",
                     help="loopback, proxy or netns (auto: proxy if partition-node runs)")
    run.add_argument("--address", help="attack an existing cluster (etcd endpoints) instead")
    run.add_argument("--token", help="cluster token for --address (default: from its node)")
    run.add_argument("--etcd-members", type=int, default=None,
                     help="etcd members of a local cluster (default 3 with kill-etcd-leader)")
    run.add_argument("--lease-ttl", type=float, default=2.0, help="node lease TTL seconds")
    run.add_argument("--op-timeout", type=float, default=90.0,
                     help="seconds an operation may take before it counts as indeterminate")
    run.add_argument("--settle", type=float, default=30.0,
                     help="seconds to wait for resources to come back after the run")
    run.add_argument("--recovery-bound", type=float, default=90.0,
                     help="seconds within which each fault must be recovered from")
    run.add_argument("--set", action="append", default=[], metavar="WORKLOAD.KEY=VALUE",
                     help="workload option, e.g. tasks.max_retries=0 (see `list`)")
    run.add_argument("--report", help="write the JSON report here (history next to it)")
    run.add_argument("--history", help="write the JSON-lines history here")
    run.add_argument("--keep-dir", action="store_true", help="keep node logs and work files")
    run.add_argument("--dry-run", action="store_true", help="print the schedule and exit")
    run.add_argument("--verbose", action="store_true",
                     help="show meshray's own warnings (watch resumes, retries) in this process")
    from chaos.fuzz_wire import add_parser as add_fuzz_wire
    add_fuzz_wire(sub)
    pg = sub.add_parser("_pg-driver", help=argparse.SUPPRESS)
    for flag in ("--address", "--out", "--stop-file"):      # the token comes on a pipe
        pg.add_argument(flag, required=True)
    pg.add_argument("--seed", type=int, required=True)
    pg.add_argument("--index", type=int, required=True)
    pg.add_argument("--wait", type=float, default=3.0)
    return parser


def list_everything() -> str:
    from chaos.checkers import CHECKERS
    from chaos.nemeses import NEMESES
    from chaos.workloads import WORKLOADS
    lines = ["nemeses:"]
    lines += [f"  {n.name:<18} {n.summary}" for n in NEMESES.values()]
    lines.append("workloads:")
    for w in WORKLOADS.values():
        lines.append(f"  {w.name:<18} {w.summary}")
        for key, text in w.option_help.items():
            lines.append(f"  {'':<18}   --set {w.name}.{key}=...  {text}")
    lines.append("checkers:")
    lines += [f"  {c.name:<18} {c.guarantee}" for c in CHECKERS.values()]
    return "\n".join(lines)


def config_from_args(args) -> RunConfig:
    options = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set {item!r}: expected WORKLOAD.KEY=VALUE")
        options[key.strip()] = value.strip()
    return RunConfig(
        workloads=_split(args.workloads), nemeses=_split(args.nemeses), nodes=args.nodes,
        duration=args.duration, seed=args.seed, netns=args.netns, network=args.network,
        address=args.address, token=args.token, etcd_members=args.etcd_members,
        lease_ttl=args.lease_ttl, interval=args.interval, op_timeout=args.op_timeout,
        settle_deadline=args.settle, recovery_bound=args.recovery_bound, options=options,
        report=args.report, history=args.history, keep_dir=args.keep_dir)


def main(argv=None, prog: str = "python -m chaos") -> int:
    args = _parser(prog).parse_args(argv)
    if args.command == "list":
        print(list_everything())
        return 0
    if args.command == "fuzz-wire":
        from chaos.fuzz_wire import main as fuzz_wire_main
        return fuzz_wire_main(args)
    if args.command == "_pg-driver":
        from chaos.workloads import pg_driver_main
        return pg_driver_main(args)
    # Under faults meshray's client logs a warning per retry; the run's own
    # output is what matters here, the daemons keep their logs in their dirs.
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    if args.dry_run:
        from chaos.nemeses import format_schedule, make_schedule
        print(format_schedule(make_schedule(
            config.nemeses, duration=config.duration, seed=config.seed,
            victim_slots=list(range(1, config.nodes)), lease_ttl=config.lease_ttl,
            interval=config.interval, warmup=config.warmup)))
        return 0
    # SIGTERM unwinds like Ctrl-C, so the cluster, namespaces and links are torn down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = run_chaos(config)
    except (ValueError, ConnectionError, RuntimeError, TimeoutError) as exc:
        print(f"chaos: {exc}", file=sys.stderr)
        return 2
    return 0 if result.ok else 1
