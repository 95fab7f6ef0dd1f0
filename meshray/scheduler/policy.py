"""The scheduling policy: cluster view + request in, decision out.

This module does no I/O and keeps no state, so the node daemon can call it
on every submission (the common case costs a handful of dict lookups) and
tests can cover every branch in microseconds. The daemon owns everything
around it: the cluster view (kept current by an etcd watch), the local
queue, spill RPCs, and placement groups.

How the daemon uses a decision:

* `RunLocal` - run here now.
* `Spill(candidates)` - offer it to `candidates[0]`, then the next, ...; the
  local node is never in the list. A peer whose view was fresher may refuse;
  if all refuse, call `decide` again with those peers in
  `SchedulingRequest.excluded_nodes` (they count as busy, not as gone).
* `Wait` - some alive node could run it but none has room now: queue it
  and decide again when resources are freed or the view changes. Only the
  nodes in `feasible_nodes` may ever run it: when `may_run_on` says the
  local node is not one of them (hard node affinity to a peer, hard labels
  it lacks), the task must wait without being started here when local
  resources free up.
* `Infeasible` - no alive node could ever fit it: queue it, tell the driver
  once, retry when a node joins.
* `Unschedulable` - hard node affinity to a node that is dead, unknown or
  too small: fail the task (TaskUnschedulableError / ActorUnschedulableError).
  An unknown target is named in `unknown_node`: a view lags etcd by its
  watch, so a node that just joined may be unknown here yet a member; the
  caller may confirm with etcd before failing the task.
* `UsePlacementGroup` - the request belongs to a placement group; the
  caller routes it to the reserved bundle.

Tie-breaks are fixed so that every node given the same view decides the
same way; they are spelled out on `rank_nodes_default`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, FrozenSet, List, Mapping, Optional, Sequence, Tuple

from meshray.scheduler.resources import UNIT_SCALE, ResourceSet
from meshray.scheduler.strategies import (
    NodeAffinitySchedulingStrategy,
    NodeLabelSchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

__all__ = [
    "DEFAULT",
    "SPREAD",
    "NodeView",
    "SchedulingRequest",
    "Decision",
    "RunLocal",
    "Spill",
    "Wait",
    "Infeasible",
    "Unschedulable",
    "UsePlacementGroup",
    "decide",
    "pick_spill_candidates",
    "rank_nodes_default",
    "utilization",
    "validate_label_selector",
    "label_selector_matches",
    "may_run_on",
]

DEFAULT = "DEFAULT"
SPREAD = "SPREAD"


@dataclass
class NodeView:
    """One node as the local cluster view sees it (possibly a bit stale)."""

    node_id: str
    total: ResourceSet
    available: ResourceSet
    alive: bool = True
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass
class SchedulingRequest:
    """What to place and how.

    `arg_bytes_by_node` maps node id to how many bytes of the task's
    arguments already sit there (for locality). `label_selector` is Ray's
    `label_selector` option ({"key": "value" | "!value" | "in(a,b)" |
    "!in(a,b)"}). `excluded_nodes` are peers that just refused a spill.
    """

    resources: ResourceSet
    strategy: object = DEFAULT
    arg_bytes_by_node: Mapping[str, int] = field(default_factory=dict)
    label_selector: Optional[Mapping[str, str]] = None
    excluded_nodes: FrozenSet[str] = frozenset()


class Decision:
    """Base of all decisions; `kind` is a stable string for logs and metrics."""

    kind: ClassVar[str] = "decision"
    __slots__ = ()


@dataclass(frozen=True)
class RunLocal(Decision):
    kind: ClassVar[str] = "run_local"


@dataclass(frozen=True)
class Spill(Decision):
    candidates: Tuple[str, ...]
    kind: ClassVar[str] = "spill"


@dataclass(frozen=True)
class Wait(Decision):
    reason: str
    feasible_nodes: Tuple[str, ...] = ()
    kind: ClassVar[str] = "wait"


@dataclass(frozen=True)
class Infeasible(Decision):
    reason: str
    kind: ClassVar[str] = "infeasible"


@dataclass(frozen=True)
class Unschedulable(Decision):
    reason: str
    unknown_node: str = ""       # the target, when the view does not know it
    kind: ClassVar[str] = "unschedulable"


@dataclass(frozen=True)
class UsePlacementGroup(Decision):
    strategy: PlacementGroupSchedulingStrategy
    kind: ClassVar[str] = "placement_group"


_RUN_LOCAL = RunLocal()


# ---------------------------------------------------------------- labels
def _parse_selector_value(key: str, value: object) -> Tuple[bool, FrozenSet[str]]:
    if not isinstance(value, str):
        raise ValueError(
            f"label_selector value for key {key!r} must be a str such as 'v', '!v', "
            f"'in(a,b)' or '!in(a,b)', got {value!r} of type {type(value).__name__}."
        )
    negate = value.startswith("!")
    body = value[1:] if negate else value
    if body.startswith("in(") or body.endswith(")"):
        if not (body.startswith("in(") and body.endswith(")")):
            raise ValueError(
                f"label_selector value {value!r} for key {key!r} is malformed; expected "
                f"'in(a,b)' or '!in(a,b)'."
            )
        items = [v.strip() for v in body[3:-1].split(",")]
        if not items or any(not v for v in items):
            raise ValueError(
                f"label_selector value {value!r} for key {key!r} needs non-empty values "
                f"inside in(...)."
            )
        return negate, frozenset(items)
    return negate, frozenset((body,))


def validate_label_selector(selector: object) -> None:
    """Raise ValueError unless `selector` is a valid Ray-style label selector (or None)."""
    if selector is None:
        return
    if not isinstance(selector, Mapping):
        raise ValueError(
            f"label_selector must be a dict of str to str, got {selector!r} of type "
            f"{type(selector).__name__}."
        )
    for key, value in selector.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"label_selector keys must be non-empty str, got {key!r}.")
        _parse_selector_value(key, value)


def _compile_selector(selector: Optional[Mapping[str, str]]):
    if not selector:
        return None
    return [(key,) + _parse_selector_value(key, value) for key, value in selector.items()]


def _selector_ok(compiled, labels: Mapping[str, str]) -> bool:
    for key, negate, values in compiled:
        present = key in labels
        hit = present and labels[key] in values
        if hit == negate:
            return False
    return True


def label_selector_matches(labels: Mapping[str, str], selector: Optional[Mapping[str, str]]) -> bool:
    compiled = _compile_selector(selector)
    return True if compiled is None else _selector_ok(compiled, labels)


def may_run_on(strategy: object, node_id: str, labels: Mapping[str, str]) -> bool:
    """Whether the strategy's hard constraints ever allow the node, whatever its load.

    A daemon queues waiting work in one local queue that starts whatever fits
    when resources free; work that may run only on other nodes must wait
    apart from it, or a busy target would make a hard constraint soft.
    """
    if isinstance(strategy, NodeAffinitySchedulingStrategy):
        return strategy.soft or strategy.node_id == node_id
    if isinstance(strategy, NodeLabelSchedulingStrategy) and strategy.hard:
        return strategy.matches_hard(labels)
    return True


# ---------------------------------------------------------------- helpers
def _fits(need: Mapping[str, int], have: ResourceSet) -> bool:
    h = have.as_units()
    for name, u in need.items():
        if h.get(name, 0) < u:
            return False
    return True


def utilization(node: NodeView, names: Optional[Sequence[str]] = None) -> float:
    """Busiest-resource utilisation of `node` in [0, 1], over `names` (default: all it has).

    A node is as loaded as its most-used resource that matters to the
    request: 8 free CPUs don't help a GPU task on a node whose GPU is busy.
    """
    total = node.total.as_units()
    avail = node.available.as_units()
    worst = 0.0
    for name in names if names else total:
        t = total.get(name, 0)
        if t > 0:
            used = (t - avail.get(name, 0)) / t
            if used > worst:
                worst = used
    return worst


def rank_nodes_default(
    request: SchedulingRequest,
    ready: Sequence[NodeView],
    local_node_id: str,
    locality_node_id: Optional[str] = None,
    soft_pref: Optional[Callable[[Mapping[str, str]], bool]] = None,
) -> List[str]:
    """Order nodes that have room now, best first.

    Sort key, most significant first:
      1. matches the soft label preference (NodeLabelSchedulingStrategy soft),
      2. is the locality node (most argument bytes),
      3. is the local node,
      4. lowest utilisation of the requested resources (all, if none requested),
      5. node id, ascending - so equal nodes are ordered the same everywhere.
    """
    names = list(request.resources.as_units()) or None

    def key(n: NodeView):
        return (
            0 if soft_pref is None or soft_pref(n.labels) else 1,
            0 if n.node_id == locality_node_id else 1,
            0 if n.node_id == local_node_id else 1,
            utilization(n, names),
            n.node_id,
        )

    return [n.node_id for n in sorted(ready, key=key)]


def _placement(ranked: Sequence[str], local_node_id: str) -> Decision:
    if ranked[0] == local_node_id:
        return _RUN_LOCAL
    return Spill(tuple(n for n in ranked if n != local_node_id))


def _describe_gap(need: Mapping[str, int], nodes: Sequence[NodeView]) -> str:
    parts = []
    for name in need:
        best = max((n.total.units(name) for n in nodes), default=0)
        parts.append(f"{name}: {best / UNIT_SCALE:g}")
    return ", ".join(parts)


class _Filters:
    """Node filters derived from the request and strategy, compiled once per call."""

    __slots__ = ("selector", "hard", "soft")

    def __init__(self, request: SchedulingRequest, strategy: object):
        self.selector = _compile_selector(request.label_selector)
        self.hard = None
        self.soft = None
        if isinstance(strategy, NodeLabelSchedulingStrategy):
            if strategy.hard:
                self.hard = strategy.matches_hard
            if strategy.soft:
                self.soft = strategy.matches_soft

    def ok(self, n: NodeView) -> bool:
        if self.selector is not None and not _selector_ok(self.selector, n.labels):
            return False
        if self.hard is not None and not self.hard(n.labels):
            return False
        return True

    @property
    def any(self) -> bool:
        return self.selector is not None or self.hard is not None


def _classify(request: SchedulingRequest, nodes: Mapping[str, NodeView], filters: _Filters):
    need = request.resources.as_units()
    excluded = request.excluded_nodes
    feasible: List[NodeView] = []
    ready: List[NodeView] = []
    for n in nodes.values():
        if not n.alive or not filters.ok(n) or not _fits(need, n.total):
            continue
        feasible.append(n)
        if n.node_id not in excluded and _fits(need, n.available):
            ready.append(n)
    return need, feasible, ready


def _not_ready(request, nodes, need, feasible, local_node_id, filters) -> Decision:
    if not feasible:
        alive = [n for n in nodes.values() if n.alive]
        constraint = " matching the label constraints" if filters.any else ""
        return Infeasible(
            f"No alive node{constraint} can ever fit {request.resources.to_dict()} "
            f"({len(alive)} alive node(s); largest totals: {_describe_gap(need, alive) or 'n/a'})."
        )
    ids = sorted((n.node_id for n in feasible), key=lambda i: (i != local_node_id, i))
    return Wait(
        f"{len(feasible)} node(s) can fit {request.resources.to_dict()} but none has it "
        f"free now.",
        tuple(ids),
    )


def _locality_node(request, nodes, need, filters) -> Optional[NodeView]:
    # The node holding the most argument bytes among nodes that could run the
    # task at all; ties go to the lower node id (the local node is handled by
    # the caller, which prefers it on a tie).
    best = None
    best_bytes = 0
    for node_id, nbytes in request.arg_bytes_by_node.items():
        if nbytes <= 0 or node_id in request.excluded_nodes:
            continue
        n = nodes.get(node_id)
        if n is None or not n.alive or not filters.ok(n) or not _fits(need, n.total):
            continue
        if nbytes > best_bytes or (nbytes == best_bytes and best is not None and node_id < best.node_id):
            best, best_bytes = n, nbytes
    return best


def _decide_default(request, nodes, local_node_id, filters: _Filters) -> Decision:
    need = request.resources.as_units()
    local = nodes.get(local_node_id)
    local_ready = (
        local is not None
        and local.alive
        and local_node_id not in request.excluded_nodes
        and filters.ok(local)
        and _fits(need, local.available)
    )
    locality = _locality_node(request, nodes, need, filters)
    if locality is not None and request.arg_bytes_by_node.get(local_node_id, 0) >= request.arg_bytes_by_node[
        locality.node_id
    ]:
        locality = None  # the local node holds at least as much: no reason to move
    locality_ready = locality is not None and _fits(need, locality.available)

    # Fast path: the overwhelmingly common case, decided without scanning peers.
    if local_ready and not locality_ready and (filters.soft is None or filters.soft(local.labels)):
        return _RUN_LOCAL

    need, feasible, ready = _classify(request, nodes, filters)
    if not ready:
        return _not_ready(request, nodes, need, feasible, local_node_id, filters)
    ranked = rank_nodes_default(
        request,
        ready,
        local_node_id,
        locality.node_id if locality_ready else None,
        filters.soft,
    )
    return _placement(ranked, local_node_id)


def _decide_spread(request, nodes, local_node_id, spread_counter, filters) -> Decision:
    need, feasible, ready = _classify(request, nodes, filters)
    if not feasible:
        return _not_ready(request, nodes, need, feasible, local_node_id, filters)
    # Round-robin over every node that could run it, busy or not: views of
    # peers' availability lag, and a busy peer refuses (or queues) the task.
    ring = sorted(n.node_id for n in feasible)
    start = spread_counter % len(ring)
    return _placement(ring[start:] + ring[:start], local_node_id)


def _decide_affinity(request, nodes, local_node_id, s: NodeAffinitySchedulingStrategy, filters) -> Decision:
    need = request.resources.as_units()
    target = nodes.get(s.node_id)
    problem = None
    if target is None:
        problem = f"node {s.node_id} is not a known member of the cluster"
    elif not target.alive:
        problem = f"node {s.node_id} is dead or draining"
    elif not filters.ok(target):
        problem = f"node {s.node_id} does not match the label constraints"
    elif not _fits(need, target.total):
        problem = (
            f"node {s.node_id} can never fit {request.resources.to_dict()} "
            f"(its total is {target.total.to_dict()})"
        )
    if problem is not None:
        if s.soft:
            return _decide_default(request, nodes, local_node_id, filters)
        return Unschedulable(f"Hard NodeAffinitySchedulingStrategy cannot be satisfied: {problem}.",
                             s.node_id if target is None else "")

    if s.node_id not in request.excluded_nodes and _fits(need, target.available):
        return _RUN_LOCAL if s.node_id == local_node_id else Spill((s.node_id,))
    if s.soft and s._spill_on_unavailable:
        others = SchedulingRequest(
            request.resources,
            DEFAULT,
            request.arg_bytes_by_node,
            request.label_selector,
            request.excluded_nodes | {s.node_id},
        )
        decision = _decide_default(others, nodes, local_node_id, filters)
        if not isinstance(decision, (Wait, Infeasible)):
            return decision
    elif not s.soft and s._fail_on_unavailable:
        return Unschedulable(
            f"Node {s.node_id} has no room for {request.resources.to_dict()} now and "
            f"_fail_on_unavailable=True."
        )
    return Wait(
        f"Waiting for node {s.node_id} (node affinity) to free {request.resources.to_dict()}.",
        (s.node_id,),
    )


def decide(
    request: SchedulingRequest,
    nodes: Mapping[str, NodeView],
    local_node_id: str,
    spread_counter: int = 0,
) -> Decision:
    """Decide where `request` should run given the cluster view `nodes`.

    `spread_counter` is the caller's per-node SPREAD counter (incremented per
    SPREAD task) so consecutive SPREAD tasks go round-robin.
    """
    strategy = request.strategy
    if strategy is None:
        strategy = DEFAULT
    if isinstance(strategy, PlacementGroupSchedulingStrategy):
        if strategy.placement_group is not None:
            return UsePlacementGroup(strategy)
        strategy = DEFAULT
    filters = _Filters(request, strategy)
    if isinstance(strategy, str):
        if strategy == DEFAULT:
            return _decide_default(request, nodes, local_node_id, filters)
        if strategy == SPREAD:
            return _decide_spread(request, nodes, local_node_id, spread_counter, filters)
        raise ValueError(
            f"Unknown scheduling strategy {strategy!r}; expected 'DEFAULT', 'SPREAD' or a "
            f"strategy object from meshray.util.scheduling_strategies."
        )
    if isinstance(strategy, NodeAffinitySchedulingStrategy):
        return _decide_affinity(request, nodes, local_node_id, strategy, filters)
    if isinstance(strategy, NodeLabelSchedulingStrategy):
        return _decide_default(request, nodes, local_node_id, filters)
    raise ValueError(
        f"Unsupported scheduling strategy {strategy!r} of type {type(strategy).__name__}."
    )


def pick_spill_candidates(
    request: SchedulingRequest,
    nodes: Mapping[str, NodeView],
    local_node_id: str,
) -> Tuple[str, ...]:
    """Peers (never the local node) with room now, in DEFAULT preference order.

    For a node that must move work it already accepted (e.g. its view was
    stale) regardless of the task's strategy.
    """
    filters = _Filters(request, request.strategy)
    need, _feasible, ready = _classify(request, nodes, filters)
    locality = _locality_node(request, nodes, need, filters)
    locality_id = locality.node_id if locality is not None and _fits(need, locality.available) else None
    ranked = rank_nodes_default(request, ready, local_node_id, locality_id, filters.soft)
    return tuple(n for n in ranked if n != local_node_id)
