"""Nemeses: the faults a run injects, and the schedule that replays them.

Each nemesis knows how to inject one kind of fault and how to heal it, and
says up front whether this cluster can suffer it at all (a skip with the
reason beats a run that silently tested nothing). Faults run one at a time
from a schedule drawn entirely from the seed before the run starts -- times,
nemesis order, victim slots, failpoint specs -- so `--seed 7` replays the
same attack; only what the cluster does in response differs.

Around every fault the runner checks health (etcd answers, the expected
nodes are registered, a probe task runs on each live node): before, so a
fault never lands on a cluster still recovering from the previous one, and
after, to measure how long the cluster took to be whole again.
"""
from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field

__all__ = ["Nemesis", "Fault", "NEMESES", "make_schedule", "format_schedule"]


@dataclass
class Fault:
    """One planned fault: when, what, against whom, for how long."""
    at: float                 # seconds after the run starts
    nemesis: str
    hold: float               # seconds between inject and heal
    target: int               # victim slot, or an index resolved at run time
    params: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


class Nemesis:
    name = ""
    summary = ""
    hold_range = (0.0, 0.0)   # seconds the fault is held before healing
    targets_slot = True       # target is a victim slot
    target_text = "pick"      # how a non-slot target reads in the schedule

    def unavailable(self, cluster) -> str | None:
        return None

    def plan(self, rng: random.Random, lease_ttl: float) -> dict:
        """Extra parameters drawn at schedule time (so they replay)."""
        return {}

    def inject(self, ctx, fault: Fault) -> dict:
        raise NotImplementedError

    def heal(self, ctx, fault: Fault, injected: dict) -> dict:
        return {}


def _need(cluster, capability: str, why: str) -> str | None:
    return None if capability in cluster.capabilities else why


class KillNode(Nemesis):
    name = "kill-node"
    summary = "SIGKILL a node daemon (its workers die with it); heal starts a fresh node in its slot"
    hold_range = (2.0, 5.0)

    def unavailable(self, cluster):
        return _need(cluster, "kill-node", "no node daemon of this cluster runs on this machine")

    def inject(self, ctx, fault):
        node = ctx.cluster.kill_node(fault.target)
        return {"slot": fault.target, "node_id": node.node_id, "pid": node.pid}

    def heal(self, ctx, fault, injected):
        if "restart-node" not in ctx.cluster.capabilities:
            return {"restarted": False, "why": "external cluster: killed nodes are not replaced"}
        node = ctx.cluster.start_node(fault.target)
        return {"restarted": True, "node_id": node.node_id, "pid": node.pid}


class PauseNode(Nemesis):
    name = "pause-node"
    summary = "SIGSTOP a node daemon and its workers for longer than its lease, then SIGCONT"

    def unavailable(self, cluster):
        return _need(cluster, "pause-node", "no node daemon of this cluster runs on this machine")

    def plan(self, rng, lease_ttl):
        # Longer than the lease, so peers must declare the node dead while it is frozen.
        return {"hold": round(rng.uniform(2 * lease_ttl + 0.5, 2 * lease_ttl + 2), 2)}

    def inject(self, ctx, fault):
        node = ctx.cluster.pause_node(fault.target)
        return {"slot": fault.target, "node_id": node.node_id, "stopped": len(node.stopped_pids)}

    def heal(self, ctx, fault, injected):
        ctx.cluster.resume_node(fault.target)
        return {"resumed": True}


class KillWorker(Nemesis):
    name = "kill-worker"
    summary = "SIGKILL a worker process that is running a task (found as a daemon's child)"
    hold_range = (0.0, 0.0)
    targets_slot = False

    def unavailable(self, cluster):
        return _need(cluster, "workers", "worker processes are not visible from here")

    def inject(self, ctx, fault):
        from chaos.workloads import ActorsWorkload
        actor_pids = set(ActorsWorkload.actor_pids(ctx).values())
        workers = {pid: node for node in ctx.cluster.live_nodes() for pid in node.workers()}
        busy = []
        if os.path.isdir(ctx.busy_dir):
            busy = sorted(int(name) for name in os.listdir(ctx.busy_dir)
                          if name.isdigit() and int(name) in workers)
        candidates = busy or sorted(pid for pid in workers if pid not in actor_pids)
        if not candidates:
            return {"skipped": "no worker process to kill"}
        pid = candidates[fault.target % len(candidates)]
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return {"skipped": f"worker {pid} exited before the kill"}
        node = workers[pid]
        return {"pid": pid, "busy": bool(busy), "slot": node.slot, "node_id": node.node_id}


class KillActor(Nemesis):
    name = "kill-actor"
    summary = "SIGKILL the worker hosting an actor (the counters report their pids)"
    targets_slot = False

    def unavailable(self, cluster):
        return _need(cluster, "workers", "worker processes are not visible from here")

    def inject(self, ctx, fault):
        from chaos.workloads import ActorsWorkload
        pids = ActorsWorkload.actor_pids(ctx)
        if not pids:
            return {"skipped": "no actor workload running"}
        names = sorted(pids)
        name = names[fault.target % len(names)]
        busy = _applying_calls(ActorsWorkload.log_path(ctx, name))
        pids = ActorsWorkload.actor_pids(ctx)      # it may have restarted meanwhile
        if name not in pids:
            return {"skipped": f"actor {name} has no pid on record"}
        host = next((node for node in ctx.cluster.live_nodes()
                     if pids[name] in node.descendants()), None)
        try:
            os.kill(pids[name], signal.SIGKILL)
        except ProcessLookupError:
            return {"skipped": f"actor {name} pid {pids[name]} already gone"}
        return {"actor": name, "pid": pids[name], "busy": busy,
                "slot": host.slot if host else None, "node_id": host.node_id if host else None}


BUSY_WAIT_S = 5.0


def _applying_calls(log_path: str | None, wait_s: float = BUSY_WAIT_S) -> bool:
    """Whether the counter is applying calls now: its call log grows within
    `wait_s`. A kill aims at a busy actor where it can (so calls in flight are
    caught, as a crash mid-work would), and says whether it did."""
    if not log_path:
        return False
    def size():
        try:
            return os.path.getsize(log_path)
        except OSError:
            return -1
    start = size()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(0.02)
        if size() != start:
            return True
    return False


class KillEtcdLeader(Nemesis):
    name = "kill-etcd-leader"
    summary = "SIGKILL the leader of the 3-member etcd, restart it on its data after the hold"
    hold_range = (2.0, 5.0)
    targets_slot = False
    target_text = "leader"

    def unavailable(self, cluster):
        return _need(cluster, "etcd-members", "needs an etcd cluster of 3+ members started by the "
                                              "runner (use --etcd-members 3)")

    def inject(self, ctx, fault):
        etcd = ctx.cluster.etcd
        deadline = time.monotonic() + 10
        leader = etcd.leader_index()
        while leader is None and time.monotonic() < deadline:
            time.sleep(0.1)
            leader = etcd.leader_index()
        if leader is None:
            return {"skipped": "no etcd leader to kill"}
        etcd.kill_member(leader)
        return {"member": leader, "endpoint": etcd.members[leader].endpoint}

    def heal(self, ctx, fault, injected):
        ctx.cluster.restart_etcd_member(injected["member"], timeout=20.0)
        return {"restarted": injected["member"], "new_leader": ctx.cluster.etcd.leader_index()}


class PartitionNode(Nemesis):
    name = "partition-node"
    summary = "cut one node off from its peers and etcd (netns link down, or proxies blackholed)"

    def unavailable(self, cluster):
        return _need(cluster, "partition", "needs the netns (--netns, root) or proxy network "
                                           "mode of a local cluster")

    def plan(self, rng, lease_ttl):
        return {"hold": round(rng.uniform(2 * lease_ttl + 0.5, 2 * lease_ttl + 2), 2)}

    def inject(self, ctx, fault):
        ctx.cluster.partition(fault.target)
        node = ctx.cluster.nodes[fault.target]
        return {"slot": fault.target, "node_id": node.node_id, "how": ctx.cluster.mode}

    def heal(self, ctx, fault, injected):
        ctx.cluster.heal_partition(fault.target)
        return {"healed": True}


class _Failpoint(Nemesis):
    hold_range = (3.0, 6.0)
    specs: tuple = ()

    def unavailable(self, cluster):
        return _need(cluster, "failpoints", "needs a local cluster started with failpoint files")

    def plan(self, rng, lease_ttl):
        return {"spec": rng.choice(self.specs)}

    def inject(self, ctx, fault):
        ctx.cluster.set_failpoints(fault.target, fault.params["spec"])
        return {"slot": fault.target, "spec": fault.params["spec"]}

    def heal(self, ctx, fault, injected):
        ctx.cluster.set_failpoints(fault.target, "")
        return {"cleared": True}


class RpcDelay(_Failpoint):
    name = "rpc-delay"
    summary = "delay a node's peer deliveries, object pulls and actor calls (failpoints)"
    specs = ("peer.deliver=delay(300ms,0.5);peer.pull=delay(200ms,0.5);actor.call=delay(200ms,0.3)",
             "peer.deliver=delay(1s,0.2);actor.call=delay(500ms,0.2)")


class RpcDrop(_Failpoint):
    name = "rpc-drop"
    summary = "drop a node's peer deliveries, pulls or their replies (failpoints)"
    specs = ("peer.deliver=drop(0.3);peer.pull=drop(0.2)",
             "peer.deliver=drop_reply(0.2);peer.pull=drop(0.1)")


class RpcDropActor(_Failpoint):
    name = "rpc-drop-actor"
    summary = "break a node's actor call links now and then (failpoint actor.call=drop)"
    specs = ("actor.call=drop(0.05)", "actor.call=drop_reply(0.05)")


NEMESES = {n.name: n for n in (KillNode(), PauseNode(), KillWorker(), KillActor(),
                               KillEtcdLeader(), PartitionNode(), RpcDelay(), RpcDrop(),
                               RpcDropActor())}


def make_schedule(names: list[str], *, duration: float, seed: int, victim_slots: list[int],
                  lease_ttl: float = 2.0, interval: float = 10.0, warmup: float = 3.0,
                  settle: float = 5.0) -> list[Fault]:
    """The whole fault plan of a run, from the seed alone.

    Nemeses come round-robin in an order reshuffled every round, so a short
    run still meets each of them; a fault starts `interval` seconds (with
    jitter) after the previous one and must be healed `settle` seconds before
    the end, leaving the last one time to be recovered from.
    """
    unknown = [n for n in names if n not in NEMESES]
    if unknown:
        raise ValueError(f"unknown nemesis {unknown}; known: {sorted(NEMESES)}")
    if not names:
        return []
    if not victim_slots:
        raise ValueError("no victim slots (a run needs at least 2 nodes)")
    rng = random.Random(f"schedule:{seed}")
    plan: list[Fault] = []
    order: list[str] = []
    at = warmup
    while True:
        if not order:
            order = list(names)
            rng.shuffle(order)
        name = order.pop(0)
        nemesis = NEMESES[name]
        params = nemesis.plan(rng, lease_ttl)
        hold = params.pop("hold", None)
        if hold is None:
            hold = round(rng.uniform(*nemesis.hold_range), 2)
        target = (victim_slots[rng.randrange(len(victim_slots))] if nemesis.targets_slot
                  else rng.randrange(1000))
        start = round(at + rng.uniform(0, interval * 0.3), 2)
        if start + hold + settle > duration:
            break
        plan.append(Fault(start, name, hold, target, params))
        at = start + hold + interval
    return plan


def format_schedule(plan: list[Fault]) -> str:
    if not plan:
        return "  (no faults)"
    lines = []
    for i, fault in enumerate(plan):
        nemesis = NEMESES[fault.nemesis]
        target = (f"slot {fault.target}" if nemesis.targets_slot else
                  f"pick #{fault.target}" if nemesis.target_text == "pick" else nemesis.target_text)
        extra = f"  {fault.params['spec']}" if "spec" in fault.params else ""
        lines.append(f"  {i + 1:>2}. t={fault.at:>6.2f}s  {fault.nemesis:<17} {target:<10} "
                     f"hold {fault.hold:>4.1f}s{extra}")
    return "\n".join(lines)

