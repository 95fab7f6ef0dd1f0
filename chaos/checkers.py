"""Checkers: judge a finished run against the guarantees meshray makes.

Each checker quotes the promise it checks, reads only the history and what
the run observed afterwards (never the harness's own beliefs), and returns a
verdict: ``pass``, ``fail`` (with every violation listed) or ``skip`` (with
the reason).
"""
from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field

__all__ = ["Verdict", "Checker", "CHECKERS", "run_checkers", "group_of"]


@dataclass
class Verdict:
    checker: str
    guarantee: str
    status: str                   # pass | fail | skip
    summary: str
    details: dict = field(default_factory=dict)
    violations: list = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


class Checker:
    name = ""
    guarantee = ""

    def check(self, run) -> Verdict:
        raise NotImplementedError

    def verdict(self, summary: str, details: dict | None = None, violations=(),
                skip: str | None = None) -> Verdict:
        if skip:
            return Verdict(self.name, self.guarantee, "skip", skip, details or {})
        violations = list(violations)
        return Verdict(self.name, self.guarantee, "fail" if violations else "pass", summary,
                       details or {}, violations)


def _error_counts(ops) -> dict:
    counts = collections.Counter((op.error or "").split(":")[0] or "no completion" for op in ops)
    return dict(sorted(counts.items()))


class TaskResults(Checker):
    name = "task-results"
    guarantee = ("Every task result is present and correct: a task whose worker or node dies "
                 "is retried elsewhere (max_retries) and a lost object is rebuilt from lineage "
                 "(docs/architecture.md, \"Several nodes\").")

    def check(self, run) -> Verdict:
        pairs = run.history.pairs(f="fan-out") + run.history.pairs(f="transfer")
        if not pairs:
            return self.verdict("", skip="no tasks or objects workload ran")
        ok = wrong = 0
        tasks = 0
        missing_ops, violations = [], []
        for invoke, done in pairs:
            if invoke.f == "fan-out":
                xs = invoke.value["xs"]
                tasks += len(xs) + 1
                expected = {"values": [x * x for x in xs], "total": sum(x * x for x in xs)}
            else:
                tasks += 2
                expected = {"checksum": invoke.value["expected"]}
            if done is None or done.type != "ok":
                missing_ops.append(done or invoke)
                violations.append(f"{invoke.op_id} ({invoke.process}, max_retries="
                                  f"{invoke.value.get('max_retries')}): no result -- "
                                  f"{(done.error if done else 'never completed')}")
                continue
            got = {key: done.value.get(key) for key in expected}
            if got != expected:
                wrong += 1
                violations.append(f"{invoke.op_id}: wrong result {got} != expected {expected}")
            else:
                ok += 1
        details = {"operations": len(pairs), "tasks": tasks, "correct": ok, "wrong": wrong,
                   "missing": len(missing_ops), "missing_by_error": _error_counts(missing_ops)}
        summary = (f"{len(pairs)} ops ({tasks} tasks): {ok} correct, {wrong} wrong, "
                   f"{len(missing_ops)} without a result")
        return self.verdict(summary, details, violations)


class ActorDelivery(Checker):
    name = "actor-delivery"
    guarantee = ("Actor calls run at least once with max_task_retries=-1 (a call lost with "
                 "its actor is retried on the restarted actor) and at most once with "
                 "max_task_retries=0 (a call that may have run is failed, never resent).")

    def check(self, run) -> Verdict:
        counters = run.data.get("actors")
        if not counters:
            return self.verdict("", skip="no actors workload ran")
        details, violations, parts = {}, [], []
        for name, info in sorted(counters.items()):
            applied = collections.Counter(info.get("applied", []))
            pairs = run.history.pairs(process_prefix=f"{name}-", f="incr")
            ids = {invoke.op_id for invoke, _ in pairs}
            outcomes = collections.Counter(done.type if done else "pending" for _, done in pairs)
            # A call the *client* stopped waiting for (its get timed out) and that had not
            # run by the end may still have been going to: at-least-once is a promise
            # about eventually, so such calls are unresolved, not lost. Any answer from
            # meshray itself (ok, a failure, "unavailable") is final.
            unresolved = {invoke.op_id for invoke, done in pairs
                          if applied[invoke.op_id] == 0 and (
                              done is None or (done.error or "").startswith("GetTimeoutError"))}
            lost = sorted(i for i in ids if applied[i] == 0 and i not in unresolved)
            acked = {invoke.op_id for invoke, done in pairs if done is not None and done.type == "ok"}
            acked_lost = sorted(i for i in acked if applied[i] == 0)
            duplicated = {i: n for i, n in applied.items() if n > 1}
            phantom = sorted(i for i in applied if i not in ids)
            claim = info["claim"]
            stats = {"claim": claim, "max_task_retries": info["max_task_retries"],
                     "invoked": len(ids), **{k: outcomes.get(k, 0) for k in
                                             ("ok", "fail", "info", "pending")},
                     "applied": sum(applied.values()), "lost": len(lost),
                     "unresolved": len(unresolved),
                     "duplicated": len(duplicated),
                     "extra_applications": sum(n - 1 for n in duplicated.values()),
                     "acknowledged_but_not_applied": len(acked_lost),
                     "applied_but_never_invoked": len(phantom),
                     "lost_ids": lost[:20], "duplicated_ids": sorted(duplicated)[:20]}
            details[name] = stats
            if claim == "at-least-once" and lost:
                violations.append(f"{name}: {len(lost)} of {len(ids)} calls never ran although "
                                  f"the counter promises at-least-once (max_task_retries="
                                  f"{info['max_task_retries']}), e.g. {lost[:5]}")
            if claim == "at-most-once" and duplicated:
                violations.append(f"{name}: {len(duplicated)} calls ran more than once although "
                                  f"the counter promises at-most-once, e.g. "
                                  f"{sorted(duplicated)[:5]}")
            if acked_lost:
                violations.append(f"{name}: {len(acked_lost)} calls were acknowledged but the "
                                  f"actor never applied them, e.g. {acked_lost[:5]}")
            if phantom:
                violations.append(f"{name}: the actor applied {len(phantom)} ids nobody sent")
            parts.append(f"{name} ({claim}): {len(ids)} calls, {len(lost)} lost, "
                         f"{len(duplicated)} duplicated"
                         + (f", {len(unresolved)} unresolved (timed out)" if unresolved else ""))
        return self.verdict("; ".join(parts), details, violations)


class PlacementGroupOvercommit(Checker):
    name = "pg-no-overcommit"
    guarantee = ("A placement group is reserved atomically in one etcd transaction that "
                 "compares every allocation record, so no node's bundles ever exceed its "
                 "resources, at any revision (docs/placement-groups.md).")

    def check(self, run) -> Verdict:
        if "placement-groups" in run.skipped:
            return self.verdict("", skip=run.skipped["placement-groups"])
        data = run.data.get("placement-groups")
        if not data:
            return self.verdict("", skip="no placement-groups workload ran")
        from meshray.placement.audit import replay_allocations
        recorder = data["recorder"]
        replay = replay_allocations(recorder.initial, recorder.events)
        violations = list(replay.violations)
        held_violations, peak = self._observed_holds(run, data)
        violations += held_violations
        capacity = data["capacity_per_node"] * len(run.victim_slots)
        details = {"alloc_revisions_replayed": replay.revisions,
                   "peak_reserved_bundles": replay.peak_bundles,
                   "unparseable_records": len(replay.unparsed), "watch_resets": recorder.resets,
                   "peak_held_by_drivers": peak,
                   "capacity": capacity}
        summary = (f"{replay.revisions} alloc revisions replayed, peak {replay.peak_bundles} of "
                   f"{capacity} bundles reserved in etcd, "
                   + (f"peak {peak} held by drivers" if peak is not None
                      else "driver holds not judged (node faults)"))
        return self.verdict(summary, details, violations)

    @staticmethod
    def _observed_holds(run, data) -> tuple[list, int]:
        """Driver-observed holds can only under-state real ones (ready is seen
        after the reservation, removal is asked before the release), so their
        overlap exceeding capacity is a definite over-commit -- as long as no
        node was lost, which legitimately moves bundles behind the drivers' backs."""
        node_faults = {"kill-node", "pause-node", "partition-node"}
        if node_faults & set(run.nemeses):
            return [], None
        capacity = data["capacity_per_node"] * len(run.victim_slots)
        holds = {}
        for invoke, done in run.history.pairs(f="create"):
            if done is not None and done.type == "ok":
                holds[done.value["pg"]] = [done.time, None, len(done.value["bundles"])]
        for invoke, _ in run.history.pairs(f="remove"):
            if invoke.value["pg"] in holds:
                holds[invoke.value["pg"]][1] = invoke.time
        edges = []
        for start, end, count in holds.values():
            edges.append((start, count))
            edges.append((end if end is not None else float("inf"), -count))
        held = peak = 0
        violations = []
        for t, delta in sorted(edges, key=lambda e: (e[0], e[1])):
            held += delta
            peak = max(peak, held)
            if held > capacity:
                violations.append(f"t={run.history.relative(t)}s: drivers hold {held} bundles "
                                  f"at once, capacity is {capacity}")
        return violations, peak


class NoLeakedResources(Checker):
    name = "no-leaked-resources"
    guarantee = ("Resources come back: once the work is done, every live node's available "
                 "resources equal its total (checked after a settle deadline).")

    def check(self, run) -> Verdict:
        obs = run.observations.get("resources")
        if not obs:
            return self.verdict("", skip="no resource observation (run aborted early)")
        violations = [f"node {node[:12]} should be live but is not registered (its resources "
                      f"cannot be judged)" for node in obs.get("missing", [])]
        for node, view in sorted(obs["nodes"].items()):
            total, available = view["total"], view["available"]
            if available is None:
                violations.append(f"node {node[:12]} publishes no availability")
                continue
            for resource, amount in sorted(total.items()):
                if abs(available.get(resource, 0.0) - amount) > 1e-6:
                    violations.append(f"node {node[:12]} (slot {view.get('slot')}): {resource} "
                                      f"available {available.get(resource, 0.0)} != total {amount}")
        summary = (f"{len(obs['nodes'])} live nodes, settled after {obs['waited_s']}s"
                   if not violations else f"{len(violations)} resources not returned after "
                                          f"{obs['waited_s']}s")
        return self.verdict(summary, {"waited_s": obs["waited_s"],
                                      "deadline_s": obs["deadline_s"]}, violations)


class NoOrphans(Checker):
    name = "no-orphans"
    guarantee = ("Nothing outlives the cluster: after shutdown no worker, daemon or etcd "
                 "process remains and no /dev/shm/meshray-* segment of its nodes is left.")

    def check(self, run) -> Verdict:
        obs = run.observations.get("orphans")
        if not obs:
            return self.verdict("", skip="orphans are only checked for clusters the runner "
                                         "started and stopped")
        violations = [f"process {p['pid']} ({p['kind']} of slot {p['slot']}) still alive after "
                      f"shutdown" for p in obs["processes"]]
        violations += [f"{path} left by a node that was stopped gracefully"
                       for path in obs["shm_graceful"]]
        violations += [f"{path} left by a node that was SIGKILLed (its launcher must clear it)"
                       for path in obs["shm_killed"]]
        summary = (f"{obs['processes_seen']} processes seen, {len(obs['processes'])} left; "
                   f"{len(obs['shm_graceful']) + len(obs['shm_killed'])} shm dirs left "
                   f"({len(obs['shm_killed'])} of killed nodes)")
        return self.verdict(summary, dict(obs), violations)


class Recovery(Checker):
    name = "recovery"
    guarantee = ("The cluster recovers from each fault: after the fault every workload again "
                 "completes operations it invoked after it, and once healed the cluster is "
                 "whole (all nodes registered, a task runs on each) within the recovery bound.")

    def check(self, run) -> Verdict:
        faults = [f for f in run.faults if "inject_time" in f]
        if not faults:
            return self.verdict("", skip="no fault was injected")
        groups = collections.defaultdict(list)     # workload -> [(invoke, done)]
        for invoke, done in run.history.pairs():
            if invoke.process != "nemesis" and invoke.f != "crash":
                groups[group_of(invoke.process)].append((invoke, done))
        bound = run.recovery_bound
        violations, rows = [], []
        for fault in faults:
            t0 = fault["inject_time"]
            per_group, stalled, stalled_by = {}, 0.0, ""
            for group, pairs in sorted(groups.items()):
                after = [d.time for i, d in pairs
                         if i.time >= t0 and d is not None and d.type == "ok"]
                if any(i.time >= t0 for i, _ in pairs):
                    per_group[group] = round(min(after) - t0, 3) if after else None
                for i, d in pairs:          # work caught in flight by the fault
                    if i.time < t0 and (d is None or d.time > t0):
                        waited = (d.time if d else run.ended_at) - t0
                        if waited > stalled:
                            stalled, stalled_by = waited, group
            never = [g for g, v in per_group.items() if v is None]
            recovery = None if never or not per_group else max(per_group.values())
            healthy = fault.get("health_after", {})
            fault["recovery_s"], fault["stalled_s"] = recovery, round(stalled, 3)
            fault["stalled_by"] = stalled_by
            rows.append({"fault": fault["label"], "inject_at": run.history.relative(t0),
                         "recovery_s": recovery, "per_workload_s": per_group,
                         "in_flight_stalled_s": round(stalled, 3),
                         "in_flight_stalled_by": stalled_by,
                         "healthy_after_heal_s": healthy.get("elapsed_s"),
                         "healthy": healthy.get("ok")})
            if never:
                violations.append(f"{fault['label']}: {', '.join(never)} never completed an "
                                  f"operation invoked after the fault")
            elif recovery is not None and recovery > bound:
                violations.append(f"{fault['label']}: workloads recovered only {recovery}s after "
                                  f"the fault (bound {bound}s)")
            if healthy and not healthy.get("ok"):
                violations.append(f"{fault['label']}: cluster not healthy "
                                  f"{healthy.get('elapsed_s')}s after heal: {healthy.get('detail')}")
        times = sorted(r["recovery_s"] for r in rows if r["recovery_s"] is not None)
        summary = (f"{len(rows)} faults; recovery max {times[-1]:.2f}s, median "
                   f"{times[len(times) // 2]:.2f}s" if times
                   else f"{len(rows)} faults; no successful operation to measure")
        return self.verdict(summary, {"faults": rows, "bound_s": bound}, violations)


def group_of(process: str) -> str:
    """Workload of a history process: "tasks-1" -> "tasks", "pg-driver-2" -> "pg-driver"."""
    head, _, tail = process.rpartition("-")
    return head if tail.isdigit() and head else process


CHECKERS = {c.name: c for c in (TaskResults(), ActorDelivery(), PlacementGroupOvercommit(),
                                NoLeakedResources(), NoOrphans(), Recovery())}


def run_checkers(run, names: list[str] | None = None) -> list[Verdict]:
    out = []
    for name, checker in CHECKERS.items():
        if names is not None and name not in names:
            continue
        try:
            out.append(checker.check(run))
        except Exception as exc:  # noqa: BLE001 - a broken checker must not hide the others
            out.append(Verdict(name, checker.guarantee, "fail",
                               f"checker crashed: {type(exc).__name__}: {exc}",
                               violations=[f"checker crashed: {exc!r}"]))
    return out

