"""Where a placement group's bundles go: cluster state in, assignment out.

Pure and deterministic (no I/O, no clocks, no randomness), so every node that
runs it on the same view picks the same nodes and tests cover each strategy
in microseconds. Safety does not rest on this module: the reservation
transaction (reservation.py) re-checks every node's capacity against etcd.
This module only has to propose something good.

Capacity has three layers per node:

* ``total`` — the node record's resources. Decides whether a group could
  *ever* be placed on the current nodes.
* ``reservable`` = total − bundles already reserved there (alloc record).
  The hard limit: a reservation above it is refused by the transaction.
* ``free_now`` = min(reservable, live availability hint). Bundles also wait
  for resources that ordinary tasks hold, as Ray's do; the hint is the
  node's published ``avail/`` value, a little stale by design, so it steers
  but never decides.

Finding the fewest nodes (PACK) or a perfect spread is bin packing, NP-hard in
general; the strategies below are greedy heuristics (largest bundle first)
with a second heuristic as fallback, plus exact bipartite matching for
STRICT_SPREAD, where a wrong greedy choice would report a feasible group as
infeasible.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from meshray.placement.records import (
    MAX_NODES_PER_TXN,
    PACK,
    STRATEGIES,
    STRICT_PACK,
    STRICT_SPREAD,
    PlacementGroupRecord,
)
from meshray.scheduler.resources import ResourceSet

__all__ = [
    "NodeCapacity",
    "Placed",
    "Infeasible",
    "place_bundles",
    "BatchPlacer",
    "validate_request_fits_bundle",
    "check_placement_group_index",
    "responsible_node",
]

Units = Dict[str, int]


@dataclass(frozen=True)
class NodeCapacity:
    """One live node as the placer sees it.

    ``reserved`` includes bundles of the group being re-placed that stay
    where they are (they keep occupying their node). ``available`` is the
    node's published availability, or None when unknown (then only
    reservations limit it).
    """

    node_id: str
    total: ResourceSet
    reserved: ResourceSet = field(default_factory=ResourceSet)
    available: Optional[ResourceSet] = None
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def reservable(self) -> ResourceSet:
        return ResourceSet.from_units(_clamped_sub(self.total.as_units(),
                                                   self.reserved.as_units()))

    @property
    def free_now(self) -> ResourceSet:
        reservable = self.reservable
        if self.available is None:
            return reservable
        avail = self.available.as_units()
        return ResourceSet.from_units({k: min(v, avail.get(k, 0))
                                       for k, v in reservable.as_units().items()})


@dataclass(frozen=True)
class Placed:
    """Bundle index -> node for the bundles that were asked to be placed."""

    assignment: Mapping[int, str]

    @property
    def ok(self) -> bool:
        return True

    @property
    def nodes(self) -> Tuple[str, ...]:
        return tuple(sorted(set(self.assignment.values())))


@dataclass(frozen=True)
class Infeasible:
    """No placement now. ``ever`` is True when even an empty cluster of the
    current nodes could not hold the group (it still waits: a bigger node may
    join), False when it only has to wait for capacity to free up."""

    reason: str
    ever: bool = False

    @property
    def ok(self) -> bool:
        return False


Decision = Union[Placed, Infeasible]


# --------------------------------------------------------------------------
# Fixed-point helpers (dicts of int units; ResourceSet is immutable and the
# heuristics deduct capacity many times).


def _clamped_sub(a: Mapping[str, int], b: Mapping[str, int]) -> Units:
    # Clamp, don't raise: an alloc record written against an older, larger
    # node record must not crash the placer; such a node simply has no room.
    return {k: max(0, v - b.get(k, 0)) for k, v in a.items()}


def _fits(need: Mapping[str, int], have: Mapping[str, int]) -> bool:
    for k, v in need.items():
        if have.get(k, 0) < v:
            return False
    return True


def _take(have: Units, need: Mapping[str, int]) -> None:
    for k, v in need.items():
        have[k] = have.get(k, 0) - v


def _add(a: Mapping[str, int], b: Mapping[str, int]) -> Units:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def _fmt(units: Mapping[str, int]) -> str:
    return "{" + ", ".join(f"{k!r}: {v / 10_000:g}" for k, v in sorted(units.items())) + "}"


class _Problem:
    """Shared state of one placement question, in units."""

    def __init__(self, bundles: Sequence[ResourceSet], todo: Sequence[int],
                 kept: Mapping[int, str], nodes: Sequence[str], capacity: Mapping[str, Units],
                 scale: Mapping[str, int], max_nodes: int):
        self.bundles = [b.as_units() for b in bundles]
        self.kept = kept
        self.nodes = list(nodes)
        self.capacity = capacity
        self.max_nodes = max_nodes
        self.scale = scale
        # Largest first: the big bundles are the ones that fail to fit late.
        self.todo = sorted(todo, key=lambda i: (-self.size(self.bundles[i]), i))

    def size(self, units: Mapping[str, int]) -> float:
        # Each resource as a share of the largest node's amount, summed, so
        # 1 GPU weighs like 1 of 1 GPUs, not like 1 of 64 CPUs.
        return sum(v / self.scale.get(k, 1) for k, v in units.items())

    def free(self) -> Dict[str, Units]:
        return {n: dict(self.capacity[n]) for n in self.nodes}


# --------------------------------------------------------------------------
# Strategies. Each returns {index: node} or None.


def _pack(p: _Problem) -> Optional[Dict[int, str]]:
    """Fewest nodes: all on one node if any can take them, else first-fit
    decreasing, opening the roomiest nodes first so fewer get opened."""
    candidates = p.nodes
    if not p.todo:
        return {}
    whole = {}
    for i in p.todo:
        whole = _add(whole, p.bundles[i])
    kept_nodes = set(p.kept.values())
    singles = [n for n in candidates if _fits(whole, p.capacity[n])]
    if singles:
        # Prefer a node that already holds part of the group, then the
        # tightest fit (leaves big nodes whole for big groups), then id.
        def single_key(n):
            left = _clamped_sub(p.capacity[n], whole)
            return (n not in kept_nodes, p.size(left), n)
        best = min(singles, key=single_key)
        return {i: best for i in p.todo}
    free = p.free()
    opened: List[str] = [n for n in candidates if n in kept_nodes]
    opened.sort()
    closed = sorted((n for n in candidates if n not in kept_nodes),
                    key=lambda n: (-p.size(p.capacity[n]), n))
    new_nodes: set = set()
    out: Dict[int, str] = {}
    for i in p.todo:
        need = p.bundles[i]
        target = next((n for n in opened if _fits(need, free[n])), None)
        if target is None:
            if len(new_nodes) >= p.max_nodes:
                return None
            target = next((n for n in closed if _fits(need, free[n])), None)
            if target is None:
                return None
            closed.remove(target)
            opened.append(target)
        if target not in new_nodes and len(new_nodes) >= p.max_nodes:
            return None
        new_nodes.add(target)
        _take(free[target], need)
        out[i] = target
    return out


def _spread(p: _Problem) -> Optional[Dict[int, str]]:
    """Best-effort distinct nodes: each bundle goes to a fitting node holding
    the fewest bundles of this group, the roomiest among those."""
    free = p.free()
    count: Dict[str, int] = {n: 0 for n in p.nodes}
    for node in p.kept.values():
        if node in count:
            count[node] += 1
    new_nodes: set = set()
    out: Dict[int, str] = {}
    for i in p.todo:
        need = p.bundles[i]
        fitting = [n for n in p.nodes if _fits(need, free[n])
                   and (n in new_nodes or len(new_nodes) < p.max_nodes)]
        if not fitting:
            return None
        target = min(fitting, key=lambda n: (count[n], -p.size(free[n]), n))
        new_nodes.add(target)
        count[target] += 1
        _take(free[target], need)
        out[i] = target
    return out


def _strict_pack(p: _Problem) -> Optional[Dict[int, str]]:
    kept_nodes = set(p.kept.values())
    if len(kept_nodes) > 1:
        return None  # a STRICT_PACK group is never split; nothing sane to add
    allowed = sorted(kept_nodes) if kept_nodes else p.nodes
    allowed = [n for n in allowed if n in p.capacity]
    if not p.todo:
        return {}
    whole: Units = {}
    for i in p.todo:
        whole = _add(whole, p.bundles[i])
    singles = [n for n in allowed if _fits(whole, p.capacity[n])]
    if not singles:
        return None
    best = min(singles, key=lambda n: (p.size(_clamped_sub(p.capacity[n], whole)), n))
    return {i: best for i in p.todo}


def _strict_spread(p: _Problem) -> Optional[Dict[int, str]]:
    """Distinct nodes for every bundle, none shared with kept bundles: a
    maximum bipartite matching (augmenting paths), so the answer is exact."""
    taken = set(p.kept.values())
    nodes = [n for n in p.nodes if n not in taken]
    if len(p.todo) > min(len(nodes), p.max_nodes):
        return None
    # Prefer roomy nodes so small bundles leave big nodes for big ones only
    # when the matching needs them to.
    order = sorted(nodes, key=lambda n: (-p.size(p.capacity[n]), n))
    options = {i: [n for n in order if _fits(p.bundles[i], p.capacity[n])] for i in p.todo}
    owner: Dict[str, int] = {}

    def augment(i: int, seen: set) -> bool:
        for n in options[i]:
            if n in seen:
                continue
            seen.add(n)
            if n not in owner or augment(owner[n], seen):
                owner[n] = i
                return True
        return False

    for i in p.todo:
        if not augment(i, set()):
            return None
    return {i: n for n, i in owner.items()}


def _solve(strategy: str, p: _Problem) -> Optional[Dict[int, str]]:
    if strategy == STRICT_PACK:
        return _strict_pack(p)
    if strategy == STRICT_SPREAD:
        return _strict_spread(p)
    if strategy == PACK:
        return _pack(p) or _spread(p)
    return _spread(p) or _pack(p)


# --------------------------------------------------------------------------
# Entry point


def _explain_ever(strategy: str, bundles: Sequence[ResourceSet], nodes: Sequence[NodeCapacity],
                  max_nodes: int) -> str:
    if not nodes:
        return "there are no live nodes"
    totals = {n.node_id: n.total.as_units() for n in nodes}
    for i, bundle in enumerate(bundles):
        if not any(_fits(bundle.as_units(), t) for t in totals.values()):
            return (f"bundle {i} {_fmt(bundle.as_units())} does not fit the total resources of "
                    f"any live node")
    if strategy == STRICT_PACK:
        whole: Units = {}
        for b in bundles:
            whole = _add(whole, b.as_units())
        return (f"STRICT_PACK needs {_fmt(whole)} on one node and no live node has that much "
                f"in total")
    if strategy == STRICT_SPREAD:
        return (f"STRICT_SPREAD needs {len(bundles)} distinct nodes that each fit their bundle "
                f"(at most {max_nodes} per group); the {len(nodes)} live node(s) cannot")
    return (f"{strategy} cannot fit the bundles into the live nodes' total resources using at "
            f"most {max_nodes} nodes")


def place_bundles(bundles: Sequence[Union[ResourceSet, Mapping[str, float]]], strategy: str,
                  nodes: Iterable[NodeCapacity], *, kept: Optional[Mapping[int, str]] = None,
                  max_nodes: int = MAX_NODES_PER_TXN, use_availability: bool = True) -> Decision:
    """Assign every bundle not in ``kept`` to a node, honouring ``strategy``.

    ``kept`` maps indices that stay where they are to their (live) node; it
    is how RESCHEDULING re-places only the bundles a dead node took with it.
    ``max_nodes`` bounds the distinct nodes that receive a bundle, because
    the reservation writes them all in one etcd transaction.
    ``use_availability=False`` ignores the live hints and reserves against
    unreserved capacity alone.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown placement strategy {strategy!r}; expected one of "
                         f"{', '.join(STRATEGIES)}")
    sets = [b if isinstance(b, ResourceSet) else ResourceSet(b) for b in bundles]
    kept = dict(kept or {})
    for i in kept:
        if not 0 <= i < len(sets):
            raise ValueError(f"kept bundle index {i} out of range for {len(sets)} bundles")
    node_list = sorted(nodes, key=lambda n: n.node_id)
    by_id = {n.node_id: n for n in node_list}
    kept = {i: node for i, node in kept.items() if node in by_id}
    todo = [i for i in range(len(sets)) if i not in kept]
    if not todo:
        return Placed({})
    ids = [n.node_id for n in node_list]
    scale: Dict[str, int] = {}
    for n in node_list:
        for k, v in n.total.as_units().items():
            scale[k] = max(scale.get(k, 0), v)
    scale = {k: max(v, 1) for k, v in scale.items()}

    def attempt(capacity: Mapping[str, Units], with_kept: bool) -> Optional[Dict[int, str]]:
        problem = _Problem(sets, todo if with_kept else range(len(sets)),
                           kept if with_kept else {}, ids, capacity, scale, max_nodes)
        return _solve(strategy, problem)

    now = {n.node_id: dict((n.free_now if use_availability else n.reservable).as_units())
           for n in node_list}
    found = attempt(now, True)
    if found is not None:
        return Placed(found)
    totals = {n.node_id: dict(n.total.as_units()) for n in node_list}
    if attempt(totals, False) is None:
        return Infeasible(_explain_ever(strategy, sets, node_list, max_nodes), ever=True)
    if use_availability:
        unreserved = {n.node_id: dict(n.reservable.as_units()) for n in node_list}
        if attempt(unreserved, True) is not None:
            return Infeasible("waiting for running tasks to free resources on the nodes that "
                              "could hold the remaining bundles")
    return Infeasible("not enough unreserved resources right now; waiting for other placement "
                      "groups to be removed or for nodes to join")


class BatchPlacer:
    """Decide many groups one after another against shared capacities.

    The node daemon reserves a burst of new groups in a few transactions
    instead of one each; within a transaction, every group must see the
    bundles of the groups decided before it. Each ``place`` call is
    ``place_bundles`` on the current capacities, and a Placed decision is
    charged to them at once: its bundles count as reserved (and, when the
    node published availability, as no longer available) for every later
    call. Infeasible decisions charge nothing. Pure, like the rest of this
    module; the caller commits the result in one transaction that pins
    every node it writes, so a wrong view only costs a retry.
    """

    def __init__(self, nodes: Iterable[NodeCapacity], *, use_availability: bool = True):
        self._nodes: Dict[str, NodeCapacity] = {n.node_id: n for n in nodes}
        self.use_availability = use_availability

    @property
    def nodes(self) -> List[NodeCapacity]:
        """The capacities as the decisions so far left them, by node id."""
        return [self._nodes[n] for n in sorted(self._nodes)]

    def place(self, bundles: Sequence[Union[ResourceSet, Mapping[str, float]]], strategy: str,
              *, max_nodes: int = MAX_NODES_PER_TXN) -> Decision:
        sets = [b if isinstance(b, ResourceSet) else ResourceSet(b) for b in bundles]
        decision = place_bundles(sets, strategy, self._nodes.values(), max_nodes=max_nodes,
                                 use_availability=self.use_availability)
        if decision.ok:
            for index, node_id in decision.assignment.items():
                self._charge(node_id, sets[index])
        return decision

    def _charge(self, node_id: str, bundle: ResourceSet) -> None:
        node = self._nodes[node_id]
        available = node.available
        if available is not None:
            available = ResourceSet.from_units(_clamped_sub(available.as_units(),
                                                            bundle.as_units()))
        self._nodes[node_id] = NodeCapacity(node.node_id, node.total, node.reserved + bundle,
                                            available, node.labels)


# --------------------------------------------------------------------------
# Submit-time check and helpers


def _bundles_of(pg: Any) -> List[Dict[str, float]]:
    if isinstance(pg, PlacementGroupRecord):
        return [dict(b) for b in pg.bundles]
    if isinstance(pg, Mapping) and "bundles" in pg:
        raw = pg["bundles"]
        if isinstance(raw, Mapping):  # a placement_group_table() entry
            return [dict(raw[k]) for k in sorted(raw, key=int)]
        return [dict(b) for b in raw]
    specs = getattr(pg, "bundle_specs", None)
    if specs is not None and not isinstance(pg, (list, tuple)):
        return [dict(b) for b in specs]
    if isinstance(pg, (list, tuple)):
        return [dict(b) for b in pg]
    raise TypeError(f"expected a placement group, its record or its bundle list, got "
                    f"{type(pg).__name__}")


def validate_request_fits_bundle(pg_record_or_bundles: Any, bundle_index: int,
                                 request_resources: Optional[Mapping[str, float]]) -> None:
    """Raise ValueError when a task/actor can never run in the bundle(s) it names.

    Catching this at submit time matters: otherwise the task would queue on
    the bundle's node forever, since no release can ever make it fit.
    ``bundle_index=-1`` means any bundle of the group. Zero-resource requests
    (e.g. the ``ready()`` probe) fit every bundle.
    """
    bundles = _bundles_of(pg_record_or_bundles)
    if isinstance(bundle_index, bool) or not isinstance(bundle_index, int):
        raise ValueError(f"placement group bundle index must be an int, got {bundle_index!r}")
    if bundle_index < -1 or bundle_index >= len(bundles):
        raise ValueError(
            f"placement group bundle index {bundle_index} is invalid: the group has "
            f"{len(bundles)} bundle(s), so valid indexes are 0-{len(bundles) - 1} or -1 (any).")
    request = ResourceSet(request_resources or {})
    if request.is_empty():
        return
    candidates = range(len(bundles)) if bundle_index == -1 else [bundle_index]
    for i in candidates:
        if request.fits_in(ResourceSet(bundles[i])):
            return
    where = ("any bundle of the placement group" if bundle_index == -1
             else f"bundle {bundle_index} of the placement group")
    shown = bundles if bundle_index == -1 else bundles[bundle_index]
    raise ValueError(
        f"Cannot schedule the request {request.to_dict()} with the placement group: it does "
        f"not fit {where} ({shown}). Ask for less, or create the group with bigger bundles.")


def check_placement_group_index(placement_group: Any, bundle_index: int) -> None:
    """ValueError unless ``bundle_index`` names a bundle of the group (or is
    -1, any bundle). ``placement_group`` is a handle (``is_empty``,
    ``bundle_count``) or None."""
    if placement_group is None or placement_group.is_empty:
        if bundle_index != -1:
            raise ValueError("If placement group is not set, the value of bundle index must "
                             "be -1.")
        return
    count = placement_group.bundle_count
    if isinstance(bundle_index, bool) or not isinstance(bundle_index, int) or \
            not -1 <= bundle_index < count:
        raise ValueError(f"placement group bundle index {bundle_index!r} is invalid. Valid "
                         f"placement group indexes: 0-{count - 1} (or -1 for any)")


def responsible_node(pg_id: str, live_node_ids: Iterable[str]) -> Optional[str]:
    """The live node that should act first on ``pg_id`` (rendezvous hashing).

    Every daemon may safely act on every group (the transactions make
    concurrent attempts harmless), but N daemons racing on each node death
    wastes N−1 transactions per group. A daemon acts at once when it is the
    responsible node and otherwise only after a grace delay, as a fallback
    for a responsible node that died or is slow. Deterministic, so all
    nodes agree given the same view, and stable: a node joining or leaving
    only moves the groups that hash to it.
    """
    best, best_score = None, None
    for node in live_node_ids:
        score = hashlib.blake2b(f"{pg_id}/{node}".encode(), digest_size=8).digest()
        if best_score is None or (score, node) > (best_score, best):
            best, best_score = node, score
    return best
